//! Replays every file of `fuzz/corpus/{mqtt_packet,broker_config}/` through the same checks the
//! fuzz targets run (`fuzz/src/broker_checks.rs`, included here), so CI exercises the corpora and
//! every regression input without a nightly toolchain or cargo-fuzz.

#[path = "../../../fuzz/src/broker_checks.rs"]
mod broker_checks;

use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
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
            let data =
                std::fs::read(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
            (p, data)
        })
        .collect()
}

fn replay(target: &str, check: fn(&[u8])) {
    let files = corpus(target);
    for (path, data) in &files {
        if std::panic::catch_unwind(|| check(data)).is_err() {
            panic!("{target}: {} fails its check", path.display());
        }
    }
    println!("{target}: {} inputs replayed", files.len());
}

#[test]
fn mqtt_packet_corpus() {
    replay("mqtt_packet", broker_checks::mqtt_packet);
}

#[test]
fn broker_config_corpus() {
    replay("broker_config", broker_checks::broker_config);
}
