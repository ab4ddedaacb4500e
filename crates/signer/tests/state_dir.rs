//! The state directory across crashes while its database is created (`Signer::open`).
//!
//! redb creating its file in place and killed before the header is whole leaves a file it can
//! never open ("invalid data"), so a device killed during its first start could never start
//! again (seen in `standin/tests/lss_crash.rs`). The database is now created in a scratch
//! directory and renamed into place; these tests pin the states a crash can leave.

mod common;

use common::*;
use sphinx_signer::{Error, Signer};

const ALICE_SEED: [u8; 32] = [0x41; 32];

fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn a_first_open_leaves_only_the_database_and_a_reopen_keeps_it() {
    let dir = temp_dir("state-first-open");
    let cfg = config(1_700_000_000);
    let id = Signer::open(ALICE_SEED, &dir, &cfg).unwrap().node_id();
    assert_eq!(entries(&dir), vec!["redb".to_string()]);
    let len = std::fs::metadata(dir.join("redb")).unwrap().len();
    assert!(len > 0);
    assert_eq!(Signer::open(ALICE_SEED, &dir, &cfg).unwrap().node_id(), id);
}

#[test]
fn a_creation_cut_short_leaves_nothing_that_stops_the_next_start() {
    let dir = temp_dir("state-cut-short");
    let cfg = config(1_700_000_000);
    // What a kill during creation leaves now: a scratch directory with a torn file (and no
    // `redb`), or, before redb's first write, an empty `redb`.
    let scratch = dir.join(".creating-4242");
    std::fs::create_dir(&scratch).unwrap();
    std::fs::write(scratch.join("redb"), b"redb\x1a\x0a\xa9\x0d\x0a torn header").unwrap();
    std::fs::write(dir.join("redb"), b"").unwrap();
    let s = Signer::open(ALICE_SEED, &dir, &cfg).unwrap();
    drop(s);
    assert_eq!(entries(&dir), vec!["redb".to_string()], "scratch removed, database created");
}

#[test]
fn a_torn_database_with_a_name_is_refused_clearly_and_left_alone() {
    let dir = temp_dir("state-torn");
    let cfg = config(1_700_000_000);
    let torn = b"redb\x1a\x0a\xa9\x0d\x0a torn header".to_vec();
    std::fs::write(dir.join("redb"), &torn).unwrap();
    match Signer::open(ALICE_SEED, &dir, &cfg) {
        Err(Error::StateDir { reason, .. }) => assert!(!reason.is_empty()),
        Err(e) => panic!("expected a state directory error, got {e}"),
        Ok(_) => panic!("a torn database must not open as an empty state"),
    }
    // It may hold state: never replaced or deleted by the signer.
    assert_eq!(std::fs::read(dir.join("redb")).unwrap(), torn);
}
