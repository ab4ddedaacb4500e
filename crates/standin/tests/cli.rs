//! The `fake-lightningd` binary: help, PASS on a faithful hsmd, FAIL (exit 1) on a wrong one,
//! exit 2 when the broker cannot start.

mod common;

use std::process::Command;

use common::{script, tempdir, trace_path};

const BIN: &str = env!("CARGO_BIN_EXE_fake-lightningd");
const ECHO: &str = env!("CARGO_BIN_EXE_fake-hsmd-echo");

#[test]
fn help() {
    let o = Command::new(BIN).arg("--help").output().unwrap();
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("--broker") && s.contains("--trace") && s.contains("--seed-hex"), "{s}");
}

#[test]
fn pass_with_canned_replies_across_a_restart() {
    let d = tempdir("cli");
    let trace = trace_path("force-close", "bob");
    let o = Command::new(BIN)
        .args(["--broker", ECHO, "--no-oracle", "--trace"])
        .arg(&trace)
        .env("FAKE_HSMD_CANNED", &trace)
        .env("FAKE_HSMD_RUN_FILE", d.join("runs"))
        .args(["--", "--developer"])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{s}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(s.contains("RESULT: PASS"), "{s}");
    assert!(s.contains("lightningd restarted"), "{s}");
    assert!(s.contains("hsmd_check_pubkey"), "{s}");
    assert_eq!(s.lines().filter(|l| l.trim_end().ends_with(" ok")).count(), 160, "{s}");
}

#[test]
fn fail_on_wrong_replies_and_on_bad_version() {
    let trace = trace_path("open-pay-close", "alice");
    let o = Command::new(BIN).args(["--broker", ECHO, "--quiet", "--trace"]).arg(&trace).output().unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{s}");
    assert!(s.contains("MISMATCH") && s.contains("RESULT: FAIL"), "{s}");

    let d = tempdir("cli-bad");
    let wrong = script(&d, "old-broker", "echo v24.11");
    let o = Command::new(BIN).arg("--broker").arg(&wrong).arg("--trace").arg(&trace).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad version"));
}
