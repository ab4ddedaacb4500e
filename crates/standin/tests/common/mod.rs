//! Shared test helpers (no external crates).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub use sphinx_standin::harness::TempDir;

/// A temporary directory for a test (panics if the system has none).
pub fn tempdir(tag: &str) -> TempDir {
    TempDir::new(tag).expect("cannot create a temporary directory")
}

/// Writes an executable shell script.
pub fn script(dir: &TempDir, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// `testdata/traces/<scenario>/<node>.jsonl`.
pub fn trace_path(scenario: &str, node: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/traces").join(scenario).join(format!("{node}.jsonl"))
}

pub const ALL_TRACES: [(&str, &str); 4] =
    [("open-pay-close", "alice"), ("open-pay-close", "bob"), ("force-close", "alice"), ("force-close", "bob")];
