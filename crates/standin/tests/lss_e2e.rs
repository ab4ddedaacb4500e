//! LSS backup end to end, through the real binaries:
//!
//! FakeLightningd ──fd 3──▶ sphinx-broker ──MQTT──▶ sphinx-key run ──▶ VLS (redb state)
//!                                 └──gRPC──▶ lssd (redb)
//!
//! - `fresh_device_restored_from_lss_alone_continues_the_session`: the broker runs with
//!   `SPHINX_BROKER_LSS_URL`; device A answers the first half of a recorded session, is
//!   SIGKILLed, and device B (empty data dir, same seed, `sphinx-key init`) takes over: it is
//!   rebuilt from LSS alone by the init dance and answers the second half. Every reply of the
//!   whole session must be byte-identical to the in-process oracle's (LSS off).
//! - `lss_down_at_start_keeps_the_signer_not_ready_until_it_is_up`: LSS unreachable when the
//!   signer says hello: the broker logs a clear error, the signer is not ready (lightningd's
//!   `hsmd_init` is not answered), and once lssd is up the dance is retried and the session
//!   completes, again byte-identical.
//! - `a_backed_up_device_signs_nothing_for_a_broker_without_lss`: the same running device, first
//!   behind a broker with LSS, then behind one without: `hsmd_init` is answered, every other
//!   request refused with the reason (docs/signer.md "Once backed up, always backed up");
//!   restarted with `SPHINX_KEY_ALLOW_WITHOUT_LSS`, it answers them as the oracle does.
//!
//! Needs the binaries next to this test's directory (`target/release/{sphinx-broker,sphinx-key,lssd}`):
//! `cargo build --release -p sphinx-broker -p sphinx-key -p sphinx-lssd` first.

mod common;

use std::ffi::OsString;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::recorded_session;
use sphinx_lss::lssd::Lssd;
use sphinx_standin::harness::{
    bin, broker_envs, free_port, init_signer, log_text, tail, wait_log, SignerProcess, TempDir,
};
use sphinx_standin::lightningd::{BrokerOutput, SpawnOptions};
use sphinx_standin::replay::{self, ReplayOptions, ReplayReport};
use sphinx_standin::trace::Trace;

const API_TOKEN: &str = "lss-e2e-api-token-0123456789";

/// The broker's `GET /v1/signers` body (plain HTTP/1.1 on loopback, no client crate).
/// `GET path` on `addr` (HTTP/1.1, the whole response as text).
fn http_get(addr: &str, path: &str, headers: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn signers_json(api: &str) -> String {
    http_get(api, "/v1/signers", &format!("Authorization: Bearer {API_TOKEN}\r\n"))
}

fn options(d: &TempDir, listen: &str, lss_url: &str, api: &str) -> ReplayOptions {
    let mut opts = broker_options(d, "broker", listen);
    for (k, v) in
        [("SPHINX_BROKER_LSS_URL", lss_url), ("SPHINX_BROKER_API_LISTEN", api), ("SPHINX_BROKER_API_TOKEN", API_TOKEN)]
    {
        opts.envs.push((OsString::from(k), OsString::from(v)));
    }
    opts
}

/// A broker in `d/{name}` (log `d/{name}.log`) for signers on `listen`, without LSS.
fn broker_options(d: &TempDir, name: &str, listen: &str) -> ReplayOptions {
    let mut opts = ReplayOptions::new(bin("sphinx-broker").unwrap());
    opts.envs = broker_envs(&d.join(name), listen);
    opts.spawn = SpawnOptions {
        call_timeout: Duration::from_secs(30),
        init_timeout: Duration::from_secs(60),
        output: BrokerOutput::File(d.join(&format!("{name}.log"))),
        ..SpawnOptions::default()
    };
    opts
}

fn logs(d: &TempDir) -> String {
    format!(
        "--- broker log ---\n{}\n--- signer a ---\n{}\n--- signer b ---\n{}",
        tail(&d.join("broker.log"), 5000),
        tail(&d.join("signer-a.log"), 3000),
        tail(&d.join("signer-b.log"), 3000)
    )
}

/// Every reply equals the in-process oracle's (LSS off), and the broker exited cleanly.
fn assert_like_oracle(tr: &Trace, seed: [u8; 32], clock: u64, report: &ReplayReport, d: &TempDir) {
    replay::signer::assert_like_oracle(tr, seed, clock, report, || logs(d));
}

#[test]
fn fresh_device_restored_from_lss_alone_continues_the_session() {
    let (tr, seed, clock) = recorded_session("open-pay-close", "alice");
    let d = TempDir::new("lss-e2e-restore").unwrap();
    let lssd = Lssd::start_temp("e2e-restore").unwrap();
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let key = bin("sphinx-key").unwrap();
    init_signer(&key, &d.join("signer-a"), seed).unwrap();
    let a = SignerProcess::start(&key, &d.join("signer-a"), &listen, clock, &d.join("signer-a.log"), &[]).unwrap();
    let mut current = Some(a);

    // Mid-session: a channel is open and payments are under way (request 63 on opens it), so
    // device B cannot answer the rest without A's state.
    let half = 90;
    assert!(half < tr.request_count());
    let api = format!("127.0.0.1:{}", free_port().unwrap());
    let opts = options(&d, &listen, &lssd.url(), &api);
    let mut api_seen = Vec::new();
    let mut device_seen = Vec::new();
    let metrics = format!("127.0.0.1:{}", free_port().unwrap());
    let mut on_step = |s: &replay::Step| {
        if s.index == 10 || s.index == half + 10 {
            api_seen.push(signers_json(&api));
        }
        if s.index == half + 10 {
            // The device's own view: its status page and metrics say it is backed up.
            device_seen.push(http_get(&metrics, "/status.json", ""));
            device_seen.push(http_get(&metrics, "/metrics", ""));
        }
        if s.index + 1 == half {
            // A dies for good; B has never seen this node: it can only be rebuilt from LSS.
            if let Some(mut a) = current.take() {
                a.kill().unwrap();
            }
            init_signer(&key, &d.join("signer-b"), seed).unwrap();
            current = Some(
                SignerProcess::start(
                    &key,
                    &d.join("signer-b"),
                    &listen,
                    clock,
                    &d.join("signer-b.log"),
                    &[("SPHINX_KEY_METRICS_LISTEN", &metrics)],
                )
                .unwrap(),
            );
        }
    };
    let report = replay::replay(&tr, &opts, &mut on_step).unwrap_or_else(|e| panic!("{e}\n{}", logs(&d)));
    drop(current);
    assert_like_oracle(&tr, seed, clock, &report, &d);
    // The broker's log names the server's key (`LSS server … server=<hex>`); the API shows it.
    let broker_log = log_text(&d.join("broker.log"));
    let server_key: String = broker_log
        .split("server=")
        .nth(1)
        .map(|rest| rest.chars().take_while(|c| c.is_ascii_hexdigit()).collect())
        .unwrap_or_default();
    assert_eq!(server_key.len(), 66, "the server key in the broker's log\n{}", logs(&d));
    for body in &api_seen {
        assert!(body.contains(r#""lss":"synced""#) && body.contains(r#""lss_error":null"#), "/v1/signers: {body}");
        assert!(body.contains(&format!(r#""lss_server":"{server_key}""#)), "/v1/signers: {body}");
    }
    assert_eq!(api_seen.len(), 2);
    match device_seen.as_slice() {
        [status, metrics] => {
            assert!(status.contains(r#""lss":"synced""#), "/status.json: {status}");
            assert!(metrics.contains("sphinx_key_lss_synced 1"), "/metrics: {metrics}");
        }
        other => panic!("the device's pages were not read: {other:?}"),
    }

    let b_log = log_text(&d.join("signer-b.log"));
    assert!(b_log.contains("state restored from LSS"), "B was not restored from LSS\n{}", logs(&d));
    assert_eq!(broker_log.matches("LSS: signer in sync").count(), 2, "one dance per device\n{}", logs(&d));
}

#[test]
fn lss_down_at_start_keeps_the_signer_not_ready_until_it_is_up() {
    let (tr, seed, clock) = recorded_session("open-pay-close", "alice");
    let d = TempDir::new("lss-e2e-down").unwrap();
    let lss_port = free_port().unwrap();
    let lss_url = format!("http://127.0.0.1:{lss_port}");
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let key = bin("sphinx-key").unwrap();
    init_signer(&key, &d.join("signer-a"), seed).unwrap();
    let _a = SignerProcess::start(&key, &d.join("signer-a"), &listen, clock, &d.join("signer-a.log"), &[]).unwrap();

    // Once the broker reports the failed dance, bring LSS up on the configured port.
    let broker_log = d.join("broker.log");
    let lss_dir = d.join("lssd");
    let api = format!("127.0.0.1:{}", free_port().unwrap());
    let api2 = api.clone();
    let started: Arc<Mutex<Option<(Instant, Lssd)>>> = Arc::default();
    let starter = {
        let started = started.clone();
        std::thread::spawn(move || {
            let line = wait_log(&broker_log, "init dance failed", Duration::from_secs(60))?;
            let body = signers_json(&api2);
            if !(body.contains(r#""lss":"error""#) && body.contains("cannot reach LSS")) {
                return Err(format!("/v1/signers while LSS is down: {body}"));
            }
            let lssd = Lssd::start_in(&lss_dir, Some(lss_port))?;
            *started.lock().unwrap() = Some((Instant::now(), lssd));
            Ok::<String, String>(line)
        })
    };

    let mut first_reply = None;
    let opts = options(&d, &listen, &lss_url, &api);
    let report = replay::replay(&tr, &opts, &mut |s| {
        if s.index == 0 {
            first_reply = Some(Instant::now());
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&d)));
    let failed = starter.join().unwrap().unwrap_or_else(|e| panic!("{e}\n{}", logs(&d)));
    assert!(failed.contains("cannot reach LSS"), "not a clear error: {failed}");
    let lss_up = started.lock().unwrap().as_ref().map(|(t, _)| *t).unwrap();
    assert!(first_reply.unwrap() > lss_up, "lightningd's init was answered while LSS was down\n{}", logs(&d));
    assert_like_oracle(&tr, seed, clock, &report, &d);
}

/// A device once backed up to LSS, then behind a broker without `[lss]` (the same device, a new
/// broker that never runs the init dance): lightningd's `hsmd_init` is answered, every signing
/// request is refused with the reason, and nothing changes on the device.
#[test]
fn a_backed_up_device_signs_nothing_for_a_broker_without_lss() {
    let (tr, seed, clock) = recorded_session("open-pay-close", "alice");
    let d = TempDir::new("lss-e2e-required").unwrap();
    let lssd = Lssd::start_temp("e2e-required").unwrap();
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let key = bin("sphinx-key").unwrap();
    init_signer(&key, &d.join("signer-a"), seed).unwrap();
    let mut a = SignerProcess::start(&key, &d.join("signer-a"), &listen, clock, &d.join("signer-a.log"), &[]).unwrap();

    // Backed up: the first requests through a broker with LSS.
    let api = format!("127.0.0.1:{}", free_port().unwrap());
    let mut s = replay::Session::start(&tr, options(&d, &listen, &lssd.url(), &api)).unwrap();
    s.set_wait_listen(&listen).unwrap();
    s.run_until(|ex| ex.index >= 20);
    let first = s.close();
    assert!(first.errors().next().is_none(), "with LSS: {:?}\n{}", first.errors().next(), logs(&d));

    // The same device, a broker without [lss] (its own data dir and log).
    let mut s = replay::Session::start(&tr, broker_options(&d, "broker-no-lss", &listen)).unwrap();
    s.set_wait_listen(&listen).unwrap();
    s.run_until(|ex| ex.index >= 10);
    let second = s.close();
    let init = second.steps.iter().find(|st| st.msg_type == sphinx_wire::hsmd::HSMD_INIT);
    assert!(init.is_some_and(|st| st.reply.is_ok()), "hsmd_init is answered: {init:?}\n{}", logs(&d));
    let signed: Vec<u16> = second
        .steps
        .iter()
        .filter(|st| st.msg_type != sphinx_wire::hsmd::HSMD_INIT && st.reply.is_ok())
        .map(|st| st.msg_type)
        .collect();
    assert!(signed.is_empty(), "nothing signed without LSS: {signed:?}\n{}", logs(&d));
    assert!(second.errors().next().is_some(), "the requests failed\n{}", logs(&d));
    let device = log_text(&d.join("signer-a.log"));
    assert!(device.contains("backed up to LSS, and the broker has not synced it"), "the reason\n{}", logs(&d));

    // The operator's decision on the device: restarted with --allow-without-lss, it signs for
    // that broker (without backup) the same requests, as the in-process signer answers them.
    a.kill().unwrap();
    let _a = SignerProcess::start(
        &key,
        &d.join("signer-a"),
        &listen,
        clock,
        &d.join("signer-a.log"),
        &[("SPHINX_KEY_ALLOW_WITHOUT_LSS", "true")],
    )
    .unwrap();
    let mut s = replay::Session::start(&tr, broker_options(&d, "broker-no-lss-2", &listen)).unwrap();
    s.set_wait_listen(&listen).unwrap();
    s.run_until(|ex| ex.index >= 10);
    let third = s.close();
    assert!(third.errors().next().is_none(), "allowed without LSS: {:?}\n{}", third.errors().next(), logs(&d));
    let mut oracle =
        replay::signer::in_memory(seed, &replay::signer::replay_config(clock, Default::default())).unwrap();
    let expected = replay::oracle_replay(&tr, &mut oracle, true);
    // Only the first requests were replayed; each of them as the oracle answered it.
    let mismatches: Vec<_> = replay::compare_with_oracle(&third.steps, &expected)
        .into_iter()
        .filter(|m| m.what != "not replayed end to end")
        .collect();
    assert!(mismatches.is_empty() && third.steps.len() >= 10, "{mismatches:?}\n{}", logs(&d));
}
