//! `sphinx-key run --metrics-listen` against the broker's embedded MQTT server, read with a real
//! HTTP client (hyper): Prometheus metrics and the status page follow the requests, failures,
//! policy refusals and reconnects of a device whose seed is encrypted and unlocked from a
//! systemd-style credential.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use common::{ask, auth, die_with_test, next_message, stop, trace_requests, ALICE, T};
use http_body_util::{BodyExt, Full};
use sphinx_mqtt_server::{self as mqtt, MqttConfig};
use sphinx_wire::serial::Request;

const BIN: &str = env!("CARGO_BIN_EXE_sphinx-key");

/// `GET`/`POST path` on the device's listener: (status, content type, body).
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(T, send.send_request(req)).await.expect("answer in time").unwrap();
    let status = resp.status().as_u16();
    let ct = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, ct, String::from_utf8(body.to_vec()).unwrap())
}

async fn metrics(addr: SocketAddr) -> String {
    let (status, ct, body) = http(addr, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    body
}

/// The value of the sample `series` (name and labels exactly as Prometheus prints them).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn status(addr: SocketAddr) -> serde_json::Value {
    let (code, ct, body) = http(addr, "GET", "/status.json").await;
    assert_eq!((code, ct.as_str()), (200, "application/json"));
    serde_json::from_str(&body).unwrap()
}

/// Starts the device and returns it with the metrics address it logged.
fn spawn_device(dir: &Path, creds: &Path, broker: SocketAddr, extra: &[&str]) -> (Child, SocketAddr) {
    let mut child = die_with_test(&mut Command::new(BIN))
        .args(["run", "--status", "none", "--log", "info", "--dev-fixed-clock", "1795466257"])
        // The node id as client id: the identity (topic prefix) these tests' broker gives.
        .env("SPHINX_KEY_CLIENT_ID", ALICE)
        .args(["--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir)
        .arg("--broker")
        .arg(broker.to_string())
        .args(extra)
        .env("CREDENTIALS_DIRECTORY", creds)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("the device logs its metrics address").unwrap();
        if let Some(rest) = line.split_once("metrics on http://").map(|(_, r)| r) {
            break rest.split('/').next().unwrap().parse().unwrap();
        }
    };
    // Keep draining the log so the device never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_page_follow_the_device() {
    let dir = std::env::temp_dir().join(format!("sphinx-key-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let creds = dir.join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(creds.join("sphinx-key-passphrase"), "metrics test").unwrap();
    let data = dir.join("data");
    let out = Command::new(BIN)
        .args(["init", "--encrypt", "--seed-hex", &"41".repeat(32), "--log", "warn"])
        .arg("--data-dir")
        .arg(&data)
        .env("CREDENTIALS_DIRECTORY", &creds)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Initial owner limits from the config file: an HTLC limit that the recorded session breaks.
    std::fs::write(data.join("sphinx-key.toml"), "htlc_limit_msat = 40000000\n").unwrap();

    let mut cfg = MqttConfig::new("127.0.0.1:0".parse().unwrap());
    cfg.max_payload = 17 << 20;
    let (h, mut rx) = mqtt::start(cfg, auth()).await.unwrap();
    let (child, web) = spawn_device(&data, &creds, h.local_addr(), &[]);
    let (topic, _) = next_message(&mut rx).await;
    assert_eq!(topic, format!("{ALICE}/hello"));

    // The page and its assets, embedded in the binary.
    let (code, ct, page) = http(web, "GET", "/").await;
    assert_eq!((code, ct.as_str()), (200, "text/html; charset=utf-8"));
    assert!(page.contains("<script src=\"/status.js\"") && page.contains("id=\"node_id\""), "{page}");
    let (code, ct, js) = http(web, "GET", "/status.js").await;
    assert_eq!((code, ct.as_str()), (200, "text/javascript; charset=utf-8"));
    assert!(js.contains("/status.json") && js.contains("setTimeout(refresh"), "the page refreshes itself");
    assert_eq!(http(web, "GET", "/status.css").await.0, 200);
    assert_eq!(http(web, "GET", "/nope").await.0, 404);
    assert_eq!(http(web, "POST", "/metrics").await.0, 405);

    let s = status(web).await;
    assert_eq!(s["node_id"], ALICE);
    assert_eq!((s["state"].as_str(), s["connected"].as_bool()), (Some("connected"), Some(true)));
    assert_eq!(s["requests_ok"], 0);
    let m = metrics(web).await;
    assert_eq!(
        sample(&m, &format!("sphinx_key_device{{node_id=\"{ALICE}\",version=\"{}\"}}", env!("CARGO_PKG_VERSION"))),
        Some(1.0),
        "{m}"
    );
    assert_eq!(sample(&m, "sphinx_key_connected"), Some(1.0));
    assert_eq!(sample(&m, "sphinx_key_state{state=\"connected\"}"), Some(1.0));
    assert_eq!(sample(&m, "sphinx_key_requests_total{outcome=\"ok\"}"), Some(0.0));

    // Requests until the HTLC limit refuses one.
    let reqs = trace_requests();
    let mut ok = 0;
    let mut refused = None;
    for r in &reqs {
        let (topic, p) = ask(&h, &mut rx, r).await;
        if topic == format!("{ALICE}/error") {
            refused = Some(String::from_utf8_lossy(&p[2..]).into_owned());
            break;
        }
        assert_eq!(topic, format!("{ALICE}/vls-res"));
        ok += 1;
    }
    let refused = refused.expect("the HTLC over the limit is refused");
    assert!(ok > 10, "{ok} requests before the refusal");
    // And an undecodable one.
    let bad = Request { seq: 777, peer_id: [0; 33], dbid: 0, message: vec![0, 1, 2] };
    assert_eq!(ask(&h, &mut rx, &bad).await.0, format!("{ALICE}/error"));

    let m = metrics(web).await;
    assert_eq!(sample(&m, "sphinx_key_requests_total{outcome=\"ok\"}"), Some(ok as f64), "{m}");
    assert_eq!(sample(&m, "sphinx_key_requests_total{outcome=\"failed\"}"), Some(2.0), "{m}");
    assert_eq!(sample(&m, "sphinx_key_request_duration_seconds_count"), Some(ok as f64 + 2.0), "{m}");
    assert!(sample(&m, "sphinx_key_request_duration_seconds_sum").unwrap() > 0.0);
    // VLS 1.0.0-rc.1 names the check, not the policy tag, in this refusal.
    let policy = "sphinx_key_request_failures_total{msg_type=\"SignRemoteCommitmentTx\",reason=\"policy\",\
                  policy=\"validate_commitment_tx\"}";
    assert_eq!(sample(&m, policy), Some(1.0), "{policy} not in\n{m}\nfor {refused}");
    let decode = "sphinx_key_request_failures_total{msg_type=\"Ecdh\",reason=\"decode\",policy=\"\"}";
    assert_eq!(sample(&m, decode), Some(1.0), "{m}");
    let s = status(web).await;
    assert_eq!((s["requests_ok"].as_u64(), s["requests_failed"].as_u64()), (Some(ok), Some(2)));
    let last = s["last_error"]["text"].as_str().unwrap();
    assert!(last.contains("request failed"), "{last}");
    assert_eq!(s["state"], "error", "the last request failed");

    // The broker drops the device: it comes back, and that is a reconnect.
    h.disconnect(ALICE);
    let (topic, _) = next_message(&mut rx).await;
    assert_eq!(topic, format!("{ALICE}/hello"));
    let m = metrics(web).await;
    assert_eq!(sample(&m, "sphinx_key_reconnects_total"), Some(1.0), "{m}");
    assert_eq!(status(web).await["reconnects"], 1);

    stop(child);
    h.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn metrics_listener_is_loopback_unless_allowed() {
    let o = Command::new(BIN)
        .args(["run", "--status", "none", "--log", "warn", "--metrics-listen", "0.0.0.0:0"])
        .arg("--data-dir")
        .arg(std::env::temp_dir().join("sphinx-key-metrics-none"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not a loopback address") && err.contains("metrics_allow_non_loopback"), "{err}");
    let o = Command::new(BIN)
        .args(["run", "--status", "none", "--log", "warn", "--metrics-listen", "nonsense"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad metrics listen address"));
}
