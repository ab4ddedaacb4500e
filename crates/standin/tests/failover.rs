//! Several signers for one node, end to end, through the real binaries:
//!
//! FakeLightningd ──fd 3──▶ sphinx-broker ──MQTT──▶ sphinx-key run (device-a, active)
//!                                 │          └──▶ sphinx-key run (device-b, standby)
//!                                 └──gRPC──▶ lssd (redb)
//!
//! Both devices have the same seed, their own data directories and client ids. The lightningd
//! stand-in replays a recorded CLN session; every reply of the whole session must be
//! byte-identical to the in-process oracle's (one signer, LSS off).
//!
//! - `sigkill_of_the_active_device_mid_session_the_standby_finishes_it`: device A is SIGKILLed
//!   mid-session (a channel open, payments under way); B, on standby, takes over and finishes the
//!   session. A is then started again: it catches up from LSS and shows as standby in
//!   `/v1/signers`.
//! - `a_stopped_active_device_is_fenced_by_the_failover_bound_and_returns_as_standby`: A is
//!   SIGSTOPped (not killed) with a request on its way: after `SPHINX_BROKER_FAILOVER` the
//!   broker fences A, brings B in and re-sends the request; A is SIGCONTed later: whatever it
//!   still says is ignored, it logs in again and stands by. No fork: the session stays
//!   byte-identical.
//!
//! Needs the binaries next to this test's directory (`target/release/{sphinx-broker,sphinx-key,lssd}`):
//! `cargo build --release -p sphinx-broker -p sphinx-key -p sphinx-lssd` first.

mod common;

use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use common::recorded_session;
use sphinx_lss::lssd::Lssd;
use sphinx_standin::harness::{bin, broker_envs, free_port, init_signer, log_text, tail, SignerProcess, TempDir};
use sphinx_standin::lightningd::{BrokerOutput, SpawnOptions};
use sphinx_standin::replay::{self, ReplayOptions, ReplayReport};
use sphinx_standin::trace::Trace;

const API_TOKEN: &str = "failover-e2e-api-token-0123456789";
const WAIT: Duration = Duration::from_secs(60);

/// The broker's `GET /v1/signers` body (plain HTTP/1.1 on loopback, no client crate).
fn signers_json(api: &str) -> String {
    api_get(api, "/v1/signers")
}

/// `GET path` on the broker's API, with the token: the whole response.
fn api_get(api: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(api) else { return String::new() };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {api}\r\nAuthorization: Bearer {API_TOKEN}\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// `client_id`'s role in the signer list ("active", "standby", …), if it is listed.
fn role_of(api: &str, client_id: &str) -> Option<String> {
    let body = signers_json(api);
    let json = body.split("\r\n\r\n").nth(1)?;
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v["signers"]
        .as_array()?
        .iter()
        .find(|s| s["client_id"] == client_id)
        .and_then(|s| s["role"].as_str().map(str::to_string))
}

/// Waits (bounded) until `client_id` has `role`.
fn wait_role(api: &str, client_id: &str, role: &str, d: &TempDir) {
    let deadline = Instant::now() + WAIT;
    while role_of(api, client_id).as_deref() != Some(role) {
        assert!(
            Instant::now() < deadline,
            "{client_id} not {role} within {WAIT:?}: {}\n{}",
            signers_json(api),
            logs(d)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn options(d: &TempDir, listen: &str, lss_url: &str, api: &str, failover_secs: u64) -> ReplayOptions {
    let mut opts = ReplayOptions::new(bin("sphinx-broker").unwrap());
    opts.envs = broker_envs(&d.join("broker"), listen);
    let failover = failover_secs.to_string();
    for (k, v) in [
        ("SPHINX_BROKER_LSS_URL", lss_url),
        ("SPHINX_BROKER_API_LISTEN", api),
        ("SPHINX_BROKER_API_TOKEN", API_TOKEN),
        ("SPHINX_BROKER_FAILOVER", failover.as_str()),
    ] {
        opts.envs.push((OsString::from(k), OsString::from(v)));
    }
    opts.spawn = SpawnOptions {
        call_timeout: Duration::from_secs(60),
        init_timeout: Duration::from_secs(60),
        output: BrokerOutput::File(d.join("broker.log")),
        ..SpawnOptions::default()
    };
    opts
}

fn logs(d: &TempDir) -> String {
    format!(
        "--- broker log ---\n{}\n--- signer a ---\n{}\n--- signer b ---\n{}",
        tail(&d.join("broker.log"), 6000),
        tail(&d.join("signer-a.log"), 3000),
        tail(&d.join("signer-b.log"), 3000)
    )
}

fn start(key: &Path, d: &TempDir, name: &str, listen: &str, clock: u64) -> SignerProcess {
    let client_id = format!("device-{name}");
    SignerProcess::start(
        key,
        &d.join(&format!("signer-{name}")),
        listen,
        clock,
        &d.join(&format!("signer-{name}.log")),
        &[("SPHINX_KEY_CLIENT_ID", client_id.as_str())],
    )
    .unwrap()
}

/// `sphinx-key ctl signers` against the broker's API: the table it prints.
fn ctl_signers(key: &Path, api: &str) -> String {
    let out = std::process::Command::new(key)
        .args(["ctl", "--url", &format!("http://{api}"), "--token", API_TOKEN, "signers"])
        .output()
        .unwrap();
    assert!(out.status.success(), "ctl signers: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every reply equals the in-process oracle's (LSS off), and the broker exited cleanly.
fn assert_like_oracle(tr: &Trace, seed: [u8; 32], clock: u64, report: &ReplayReport, d: &TempDir) {
    replay::signer::assert_like_oracle(tr, seed, clock, report, || logs(d));
}

/// Mid-session: a channel is open and payments are under way (request 63 on opens it).
const HALF: usize = 90;
/// When B joins (A is active and has answered lightningd's init by then).
const B_JOINS: usize = 5;

#[test]
fn sigkill_of_the_active_device_mid_session_the_standby_finishes_it() {
    let (tr, seed, clock) = recorded_session("open-pay-close", "alice");
    assert!(HALF + 30 < tr.request_count());
    let d = TempDir::new("failover-kill").unwrap();
    let lssd = Lssd::start_temp("failover-kill").unwrap();
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let api = format!("127.0.0.1:{}", free_port().unwrap());
    let key = bin("sphinx-key").unwrap();
    init_signer(&key, &d.join("signer-a"), seed).unwrap();
    init_signer(&key, &d.join("signer-b"), seed).unwrap();
    let mut a = Some(start(&key, &d, "a", &listen, clock));
    let mut b = None;
    let mut b_role_when_a_returns = None;
    let mut ctl_table = None;
    let mut metrics = String::new();
    let opts = options(&d, &listen, &lssd.url(), &api, 10);
    let report = replay::replay(&tr, &opts, &mut |s: &replay::Step| {
        if s.index == B_JOINS {
            wait_role(&api, "device-a", "active", &d);
            b = Some(start(&key, &d, "b", &listen, clock));
            wait_role(&api, "device-b", "standby", &d);
        }
        if s.index + 1 == HALF {
            // The active device crashes; the standby must take over.
            if let Some(mut a) = a.take() {
                a.kill().unwrap();
            }
        }
        if s.index == HALF + 20 {
            assert_eq!(role_of(&api, "device-b").as_deref(), Some("active"), "{}", logs(&d));
            // A comes back: it catches up from LSS and stands by.
            a = Some(start(&key, &d, "a", &listen, clock));
            wait_role(&api, "device-a", "standby", &d);
            b_role_when_a_returns = role_of(&api, "device-b");
            ctl_table = Some(ctl_signers(&key, &api));
            // The gauge is set right after the role (same relay event): poll it, bounded.
            let deadline = Instant::now() + WAIT;
            metrics = api_get(&api, "/metrics");
            while !metrics.lines().any(|l| l == "sphinx_broker_signers_standby 1") && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
                metrics = api_get(&api, "/metrics");
            }
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&d)));
    drop((a, b));
    assert_like_oracle(&tr, seed, clock, &report, &d);
    assert_eq!(b_role_when_a_returns.as_deref(), Some("active"), "B stays active when A returns");
    // One failover so far, one standby (A, back).
    assert!(metrics.lines().any(|l| l == "sphinx_broker_failovers_total 1"), "{metrics}");
    assert!(metrics.lines().any(|l| l == "sphinx_broker_signers_standby 1"), "{metrics}");
    // What the operator sees with `sphinx-key ctl signers`.
    let table = ctl_table.unwrap();
    let line = |c: &str| table.lines().find(|l| l.starts_with(c)).unwrap_or_default().to_string();
    assert!(line("device-a").contains("standby") && line("device-a").contains("synced"), "{table}");
    assert!(line("device-b").contains("active") && line("device-b").contains("synced"), "{table}");
    let broker_log = log_text(&d.join("broker.log"));
    assert!(broker_log.contains("failover: bringing in a standby"), "no failover logged\n{}", logs(&d));
    assert!(
        log_text(&d.join("signer-a.log")).matches("LSS: identified").count() >= 2,
        "A danced again when it returned\n{}",
        logs(&d)
    );
}

#[test]
fn a_stopped_active_device_is_fenced_by_the_failover_bound_and_returns_as_standby() {
    let (tr, seed, clock) = recorded_session("open-pay-close", "alice");
    let d = TempDir::new("failover-stop").unwrap();
    let lssd = Lssd::start_temp("failover-stop").unwrap();
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let api = format!("127.0.0.1:{}", free_port().unwrap());
    let key = bin("sphinx-key").unwrap();
    init_signer(&key, &d.join("signer-a"), seed).unwrap();
    init_signer(&key, &d.join("signer-b"), seed).unwrap();
    let a = start(&key, &d, "a", &listen, clock);
    let mut b = None;
    let mut stopped_at = None;
    let mut slow_step = None;
    let opts = options(&d, &listen, &lssd.url(), &api, 2);
    let report = replay::replay(&tr, &opts, &mut |s: &replay::Step| {
        if s.index == B_JOINS {
            wait_role(&api, "device-a", "active", &d);
            b = Some(start(&key, &d, "b", &listen, clock));
            wait_role(&api, "device-b", "standby", &d);
        }
        if s.index + 1 == HALF {
            // A hangs (connection open, nothing answered): the next request waits for it.
            a.signal(libc::SIGSTOP).unwrap();
            stopped_at = Some(Instant::now());
        }
        if s.index == HALF {
            slow_step = stopped_at.map(|t| t.elapsed());
        }
        if s.index == HALF + 10 {
            assert_eq!(role_of(&api, "device-b").as_deref(), Some("active"), "{}", logs(&d));
            // A wakes up: its session was closed by the broker; it logs in again and stands by.
            a.signal(libc::SIGCONT).unwrap();
            wait_role(&api, "device-a", "standby", &d);
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&d)));
    drop(b);
    assert_like_oracle(&tr, seed, clock, &report, &d);
    let waited = slow_step.expect("the request after the stop was answered");
    assert!(waited >= Duration::from_secs(2), "answered after {waited:?}: before the failover bound?");
    let broker_log = log_text(&d.join("broker.log"));
    assert!(broker_log.contains("missed the failover bound"), "not fenced by the bound\n{}", logs(&d));
    assert_eq!(broker_log.matches("failover: bringing in a standby").count(), 1, "{}", logs(&d));
    drop(a);
}
