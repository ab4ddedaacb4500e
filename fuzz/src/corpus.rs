//! Reading and replaying `fuzz/corpus/<target>/` outside cargo-fuzz. Not part of the fuzz
//! library: compiled with `#[path]` into the main workspace's corpus tests
//! (`crates/wire/tests/fuzz_corpus.rs`, `crates/mqtt-server/tests/mqtt_fuzz_corpus.rs`,
//! `crates/broker/tests/config_fuzz_corpus.rs`, `crates/chain/tests/chain_fuzz_corpus.rs`), whose
//! crates sit two levels below the repository root. Uses `std` only.

use std::path::{Path, PathBuf};

/// Every file of `fuzz/corpus/<target>/` with its bytes, sorted by path; panics if there are none.
pub fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
            (p, data)
        })
        .collect()
}

/// Runs `check` on every file of `target`'s corpus; panics naming the first file it fails on.
pub fn replay(target: &str, check: fn(&[u8])) {
    let files = corpus(target);
    for (path, data) in &files {
        if std::panic::catch_unwind(|| check(data)).is_err() {
            panic!("{target}: {} fails its check", path.display());
        }
    }
    println!("{target}: {} inputs replayed", files.len());
}
