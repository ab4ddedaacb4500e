//! The `sphinx-key` binary over real MQTT (the broker crate's embedded server on 127.0.0.1):
//! owner control messages on `{id}/control` → `{id}/control-res`, `sphinx-key ctl` through an
//! HTTP endpoint shaped like the broker API, the owner's resets, and TLS to the broker (CA file,
//! pinned fingerprint, wrong fingerprint refused).

#[path = "../../tls/tests/common/mod.rs"]
mod certs;
mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use bitcoin::secp256k1::{PublicKey, Secp256k1, SecretKey};
use bytes::Bytes;
use certs::self_signed;
use common::{auth, die_with_test, stop, trace_requests, Dir, ALICE, T};
use sphinx_mqtt_server::{self as mqtt, MqttConfig, MqttEvent, MqttEvents, MqttHandle, TlsSettings};
use sphinx_wire::control::{
    build_request, parse_response, ControlMessage as M, ControlResponse as R, Interval, Policy,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_sphinx-key");

fn alice_keys() -> (PublicKey, SecretKey) {
    sphinx_signer::node_keys_for_seed(&[0x41; 32], bitcoin::Network::Regtest)
}

fn sphinx_key(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN).args(args).arg("--data-dir").arg(dir).arg("--log").arg("warn").output().unwrap()
}

fn init_alice(dir: &Path, extra: &[&str]) {
    let mut args = vec!["init", "--seed-hex"];
    let seed = "41".repeat(32);
    args.push(&seed);
    args.extend_from_slice(extra);
    let out = sphinx_key(dir, &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), ALICE);
}

fn spawn_signer(dir: &Path, addr: std::net::SocketAddr, extra: &[&str]) -> Child {
    die_with_test(&mut Command::new(BIN))
        // The node id as client id: the identity (topic prefix) these tests' broker gives.
        .env("SPHINX_KEY_CLIENT_ID", ALICE)
        .args(["run", "--status", "none", "--log", "info", "--dev-fixed-clock", "1795466257"])
        .arg("--data-dir")
        .arg(dir)
        .arg("--broker")
        .arg(addr.to_string())
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

async fn server(tls: Option<TlsSettings>) -> (MqttHandle, MqttEvents) {
    let cfg = MqttConfig { tls, ..MqttConfig::new("127.0.0.1:0".parse().unwrap()) };
    mqtt::start(cfg, auth()).await.unwrap()
}

async fn next_message(rx: &mut MqttEvents, wait: Duration) -> Option<(String, Bytes)> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(MqttEvent::Message { topic, payload, .. })) => return Some((topic, payload)),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return None,
        }
    }
}

/// Waits for `{id}/hello` (skipping the `bye` of a process that stopped before).
async fn expect_hello(rx: &mut MqttEvents) {
    loop {
        let (topic, _) = next_message(rx, T).await.expect("hello in time");
        if topic == format!("{ALICE}/bye") {
            continue;
        }
        assert_eq!(topic, format!("{ALICE}/hello"));
        return;
    }
}

/// `spawn_signer` with `extra`, returned once its hello has arrived.
async fn start_signer(dir: &Path, h: &MqttHandle, rx: &mut MqttEvents, extra: &[&str]) -> Child {
    let child = spawn_signer(dir, h.local_addr(), extra);
    expect_hello(rx).await;
    child
}

/// Publishes a control request and returns the verified answer from `{id}/control-res`.
async fn control(h: &MqttHandle, rx: &mut MqttEvents, req: Vec<u8>, nonce: u64) -> R {
    h.publish(&format!("{ALICE}/control"), Bytes::from(req)).unwrap();
    let (topic, p) = next_message(rx, T).await.expect("control response in time");
    assert_eq!(topic, format!("{ALICE}/control-res"));
    parse_response(&p, &alice_keys().0, nonce).expect("device-signed response")
}

async fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    for _ in 0..200 {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("sphinx-key did not exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_messages_over_mqtt_and_reset_keys() {
    let dir = Dir::new("ctl", "mqtt");
    init_alice(&dir.0, &[]);
    let (h, mut rx) = server(None).await;
    let child = start_signer(&dir.0, &h, &mut rx, &[]).await;
    let (_, sk) = alice_keys();

    let p = Policy { msat_per_interval: 9_000_000, interval: Interval::Hourly, htlc_limit_msat: 3_000_000 };
    assert_eq!(control(&h, &mut rx, build_request(&M::Nonce, 0, &sk).unwrap(), 0).await, R::Nonce(0));
    assert_eq!(control(&h, &mut rx, build_request(&M::UpdatePolicy(p), 1, &sk).unwrap(), 1).await, R::PolicyUpdated(p));
    // Replayed, forged and garbage requests: a signed Error on control-res.
    let r = control(&h, &mut rx, build_request(&M::UpdatePolicy(p), 1, &sk).unwrap(), 1).await;
    assert!(matches!(r, R::Error(ref t) if t.contains("nonce")), "{r:?}");
    let forger = SecretKey::from_slice(&[9; 32]).unwrap();
    let r = control(&h, &mut rx, build_request(&M::ResetAll, 2, &forger).unwrap(), 2).await;
    assert!(matches!(r, R::Error(ref t) if t.contains("signature")), "{r:?}");
    let r = control(&h, &mut rx, b"garbage".to_vec(), 0).await;
    assert!(matches!(r, R::Error(_)), "{r:?}");

    // The policy survives a restart of the device.
    stop(child);
    let mut child = start_signer(&dir.0, &h, &mut rx, &[]).await;
    assert_eq!(control(&h, &mut rx, build_request(&M::QueryPolicy, 2, &sk).unwrap(), 2).await, R::PolicyCurrent(p));

    // ResetKeys: acknowledged first, then the seed is gone and the process stops with exit 3.
    assert_eq!(control(&h, &mut rx, build_request(&M::ResetKeys, 3, &sk).unwrap(), 3).await, R::ResetKeys);
    let st = wait_exit(&mut child).await;
    assert_eq!(st.code(), Some(3), "exit code: needs init");
    assert!(!dir.0.join("seed").exists());
    assert!(dir.0.join("state").exists(), "ResetKeys keeps the state");
    // It starts and explains what it needs.
    let out = sphinx_key(&dir.0, &["run", "--broker", &h.local_addr().to_string()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sphinx-key init"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Re-importing the same seed continues with the same state (policy and nonce kept).
    init_alice(&dir.0, &[]);
    let mut child = start_signer(&dir.0, &h, &mut rx, &[]).await;
    assert_eq!(control(&h, &mut rx, build_request(&M::Nonce, 0, &sk).unwrap(), 0).await, R::Nonce(3));
    assert_eq!(control(&h, &mut rx, build_request(&M::QueryPolicy, 4, &sk).unwrap(), 4).await, R::PolicyCurrent(p));
    // ResetAll: seed and state gone.
    assert_eq!(control(&h, &mut rx, build_request(&M::ResetAll, 5, &sk).unwrap(), 5).await, R::ResetAll);
    assert_eq!(wait_exit(&mut child).await.code(), Some(3));
    assert!(!dir.0.join("seed").exists());
    assert!(!dir.0.join("state").exists());
    h.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_owner_key_set_at_init() {
    let dir = Dir::new("ctl", "owner");
    let owner = SecretKey::from_slice(&[7; 32]).unwrap();
    let owner_pk = hex::encode(PublicKey::from_secret_key(&Secp256k1::new(), &owner).serialize());
    init_alice(&dir.0, &["--owner-pubkey", &owner_pk]);
    let (h, mut rx) = server(None).await;
    let child = start_signer(&dir.0, &h, &mut rx, &[]).await;
    let (_, node_sk) = alice_keys();
    let r = control(&h, &mut rx, build_request(&M::QueryPolicy, 1, &node_sk).unwrap(), 1).await;
    assert!(matches!(r, R::Error(ref t) if t.contains("signature")), "the node key is no longer the owner: {r:?}");
    let r = control(&h, &mut rx, build_request(&M::QueryPolicy, 1, &owner).unwrap(), 1).await;
    assert_eq!(r, R::PolicyCurrent(Policy::default()));
    stop(child);
    h.shutdown();
}

/// A stand-in for the broker's HTTP API: `POST /v1/signers/{id}/control` with a bearer token;
/// the body goes to `{id}/control`, the answer from `{id}/control-res` is the response body.
async fn fake_api(h: MqttHandle, mut rx: MqttEvents, token: &'static str) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            let mut buf = Vec::new();
            let (head_len, content_len) = loop {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "client closed early");
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..i]).to_string();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap())
                        })
                        .unwrap_or(0);
                    break (i + 4, len);
                }
            };
            while buf.len() < head_len + content_len {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.unwrap();
                buf.extend_from_slice(&chunk[..n]);
            }
            let head = String::from_utf8_lossy(&buf[..head_len]).to_string();
            let body = buf[head_len..head_len + content_len].to_vec();
            let ok_path = head.starts_with(&format!("POST /v1/signers/{ALICE}/control HTTP/1.1"));
            let ok_auth = head.contains(&format!("Authorization: Bearer {token}"));
            let (status, resp) = if !ok_path {
                ("404 Not Found", b"no such signer".to_vec())
            } else if !ok_auth {
                ("401 Unauthorized", b"bad token".to_vec())
            } else {
                h.publish(&format!("{ALICE}/control"), Bytes::from(body)).unwrap();
                let (topic, p) = next_message(&mut rx, T).await.expect("control-res");
                assert_eq!(topic, format!("{ALICE}/control-res"));
                ("200 OK", p.to_vec())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                resp.len()
            );
            s.write_all(head.as_bytes()).await.unwrap();
            s.write_all(&resp).await.unwrap();
            let _ = s.shutdown().await;
        }
    });
    addr
}

async fn ctl(dir: &Path, api: std::net::SocketAddr, token: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let url = format!("http://{api}");
    let mut full = vec!["ctl", "--url", &url, "--token", token];
    full.extend_from_slice(args);
    let dir = dir.to_path_buf();
    let args: Vec<String> = full.iter().map(|s| s.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN).args(&args).arg("--data-dir").arg(&dir).arg("--log").arg("warn").output().unwrap()
    })
    .await
    .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_cli_through_the_broker_api() {
    let dir = Dir::new("ctl", "cli");
    init_alice(&dir.0, &[]);
    let (h, mut rx) = server(None).await;
    let child = start_signer(&dir.0, &h, &mut rx, &[]).await;
    let api = fake_api(h.clone(), rx, "sekrit").await;

    let (code, out, err) = ctl(&dir.0, api, "sekrit", &["query-policy"]).await;
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["PolicyCurrent"]["interval"], "daily");

    // Only the given field changes; the others are read first and kept.
    let (code, out, err) = ctl(&dir.0, api, "sekrit", &["update-policy", "--msat-per-interval", "123000"]).await;
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["PolicyUpdated"]["msat_per_interval"], 123000);
    assert_eq!(v["PolicyUpdated"]["htlc_limit_msat"], Policy::default().htlc_limit_msat);

    let (code, out, err) =
        ctl(&dir.0, api, "sekrit", &["update-allowlist", "bcrt1qwd0sxj7f47k67wysm20xut2drv7t2stu7fesk4"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("address:bcrt1qwd0sxj7f47k67wysm20xut2drv7t2stu7fesk4"), "{out}");
    let (code, out, err) = ctl(&dir.0, api, "sekrit", &["query-all"]).await;
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["AllCurrent"]["velocity"]["limit_msat"], 123000);

    // Refusals: a device Error exits non-zero (and is printed); a replayed nonce likewise.
    let (code, out, _) = ctl(&dir.0, api, "sekrit", &["ota", "--version", "2", "--url", "https://x"]).await;
    assert_eq!(code, Some(1));
    assert!(out.contains("OTA is not supported on Linux"), "{out}");
    let (code, out, _) = ctl(&dir.0, api, "sekrit", &["--nonce", "1", "query-policy"]).await;
    assert_eq!(code, Some(1));
    assert!(out.contains("rejected"), "{out}");
    // A wrong token: the API's HTTP error.
    let (code, _, err) = ctl(&dir.0, api, "wrong", &["query-policy"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("401"), "{err}");
    // A separate owner key file that the device does not accept.
    let kf = dir.0.join("other.key");
    std::fs::write(&kf, "07".repeat(32)).unwrap();
    let (code, _, err) =
        ctl(&dir.0, api, "sekrit", &["--owner-key-file", kf.to_str().unwrap(), "--node-id", ALICE, "query-policy"])
            .await;
    assert_eq!(code, Some(1));
    assert!(err.contains("signature"), "{err}");

    stop(child);
    h.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_broker_with_ca_or_pinned_fingerprint() {
    let dir = Dir::new("ctl", "tls");
    init_alice(&dir.0, &[]);
    let broker = self_signed(&dir.0, "broker");
    let other_fp = self_signed(&dir.0, "other").fingerprint;
    let (fp, ca) = (broker.fingerprint, broker.crt.clone());
    let (h, mut rx) = server(Some(TlsSettings { cert_chain: broker.crt, private_key: broker.key })).await;

    for extra in [
        vec!["--tls-ca".to_string(), ca.to_string_lossy().into_owned()],
        vec!["--tls-fingerprint".into(), fp.to_string()],
    ] {
        let args: Vec<&str> = extra.iter().map(|s| s.as_str()).collect();
        let child = start_signer(&dir.0, &h, &mut rx, &args).await;
        // And it serves over TLS.
        let (_, sk) = alice_keys();
        assert_eq!(control(&h, &mut rx, build_request(&M::Nonce, 0, &sk).unwrap(), 0).await, R::Nonce(0));
        stop(child);
    }

    // A wrong fingerprint: never connects, and says why.
    let mut child = spawn_signer(&dir.0, h.local_addr(), &["--tls-fingerprint", &other_fp.to_string()]);
    assert!(next_message(&mut rx, Duration::from_secs(3)).await.is_none(), "connected with a wrong pin");
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("certificate") || err.contains("Tls"), "{err}");
    // Plaintext to a TLS listener fails too.
    let child = spawn_signer(&dir.0, h.local_addr(), &[]);
    assert!(next_message(&mut rx, Duration::from_secs(2)).await.is_none());
    stop(child);
    h.shutdown();
}

fn msg_type(r: &sphinx_wire::serial::Request) -> u16 {
    u16::from_be_bytes([r.message[0], r.message[1]])
}

/// Sends one request on `{id}/vls`; returns the topic and payload of the answer.
async fn ask(h: &MqttHandle, rx: &mut MqttEvents, r: &sphinx_wire::serial::Request) -> (String, Bytes) {
    h.publish(&format!("{ALICE}/vls"), Bytes::from(r.encode())).unwrap();
    next_message(rx, T).await.expect("an answer, not a hang")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_limits_bite_over_mqtt() {
    let reqs = trace_requests();
    let (_, sk) = alice_keys();
    let (h, mut rx) = server(None).await;

    // Velocity: the 50,000 sat invoice fits, the 1,000 sat keysend after it does not. The refusal
    // is an ordinary reply (approved = false) that CLN turns into a failed payment.
    let dir = Dir::new("ctl", "velocity");
    init_alice(&dir.0, &[]);
    let child = start_signer(&dir.0, &h, &mut rx, &[]).await;
    let p = Policy { msat_per_interval: 50_500_000, ..Policy::default() };
    assert_eq!(control(&h, &mut rx, build_request(&M::UpdatePolicy(p), 1, &sk).unwrap(), 1).await, R::PolicyUpdated(p));
    let mut seen = 0;
    for r in &reqs {
        let (topic, payload) = ask(&h, &mut rx, r).await;
        assert_eq!(topic, format!("{ALICE}/vls-res"), "seq {}", r.seq);
        let rep = sphinx_wire::serial::Reply::decode(&payload).unwrap();
        match msg_type(r) {
            38 => {
                assert_eq!(rep.message, vec![0, 138, 1], "invoice approved");
                seen += 1;
            }
            39 => {
                assert_eq!(rep.message, vec![0, 139, 0], "keysend refused");
                seen += 1;
                break;
            }
            _ => {}
        }
    }
    assert_eq!(seen, 2);
    stop(child);

    // HTLC limit below the traced 50,000 sat HTLC: the commitment carrying it is refused on
    // {id}/error with its sequence number.
    let dir = Dir::new("ctl", "htlc");
    init_alice(&dir.0, &[]);
    let child = start_signer(&dir.0, &h, &mut rx, &[]).await;
    let p = Policy { htlc_limit_msat: 40_000_000, ..Policy::default() };
    assert_eq!(control(&h, &mut rx, build_request(&M::UpdatePolicy(p), 1, &sk).unwrap(), 1).await, R::PolicyUpdated(p));
    let mut refused = None;
    for r in &reqs {
        let (topic, payload) = ask(&h, &mut rx, r).await;
        if topic == format!("{ALICE}/error") {
            let sphinx_wire::error_report::ErrorReport { seq, text } = sphinx_wire::error_report::decode(&payload);
            assert_eq!(seq, Some(r.seq));
            refused = Some((msg_type(r), text));
            break;
        }
        assert_eq!(topic, format!("{ALICE}/vls-res"));
    }
    let (ty, text) = refused.expect("the HTLC over the limit is refused");
    assert!([19, 35, 5].contains(&ty), "type {ty}: {text}");
    assert!(text.contains("policy-commitment-htlc-inflight-limit") || text.contains("sum of HTLC values"), "{text}");
    stop(child);
    h.shutdown();
}
