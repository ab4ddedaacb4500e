//! Shared test helpers (no external crates).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub use sphinx_standin::harness::TempDir;
use sphinx_standin::trace::{scenario_for_path, seed_for_path, Trace};

/// A temporary directory for a test (panics if the system has none).
pub fn tempdir(tag: &str) -> TempDir {
    TempDir::new(tag).expect("cannot create a temporary directory")
}

/// Writes an executable shell script.
///
/// A child process (`sh -c 'cat > …'`) writes it, so that this multi-threaded test process never
/// holds the file open for writing: a child that another test thread forks meanwhile would inherit
/// that fd until its exec, and executing the script then fails with ETXTBSY ("Text file busy").
pub fn script(dir: &TempDir, name: &str, body: &str) -> PathBuf {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let p = dir.join(name);
    let mut writer = Command::new("sh")
        .args(["-c", "cat > \"$1\" && chmod 755 \"$1\"", "sh"])
        .arg(&p)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    writer.stdin.take().unwrap().write_all(format!("#!/bin/sh\n{body}\n").as_bytes()).unwrap();
    assert!(writer.wait().unwrap().success(), "writing {}", p.display());
    p
}

/// `testdata/traces/<scenario>/<node>.jsonl`.
pub fn trace_path(scenario: &str, node: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/traces").join(scenario).join(format!("{node}.jsonl"))
}

/// The recorded session `<scenario>/<node>`: its trace, its node's seed and its scenario's fixed clock.
pub fn recorded_session(scenario: &str, node: &str) -> (Trace, [u8; 32], u64) {
    let path = trace_path(scenario, node);
    let tr = Trace::load(&path).unwrap();
    let seed = seed_for_path(&path).unwrap();
    let clock = scenario_for_path(&path).unwrap().fixed_clock();
    (tr, seed, clock)
}

pub const ALL_TRACES: [(&str, &str); 4] =
    [("open-pay-close", "alice"), ("open-pay-close", "bob"), ("force-close", "alice"), ("force-close", "bob")];
