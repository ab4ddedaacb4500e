//! End to end over real MQTT: the `sphinx-key` binary against the broker's embedded MQTT server
//! on 127.0.0.1 (token checked, topics ACL'd), driven with recorded CLN requests.

mod common;

use std::process::{Child, Command, Stdio};

use common::{ask, auth, die_with_test, next_message, stop, trace_requests, ALICE};
use sphinx_mqtt_server::{self as mqtt, MqttConfig};
use sphinx_wire::serial::{Reply, Request};

fn spawn_signer(dir: &std::path::Path, addr: std::net::SocketAddr) -> Child {
    die_with_test(&mut Command::new(env!("CARGO_BIN_EXE_sphinx-key")))
        // The node id as client id: the identity (topic prefix) these tests' broker gives.
        .env("SPHINX_KEY_CLIENT_ID", ALICE)
        .args(["run", "--status", "none", "--log", "warn", "--dev-fixed-clock", "1795466257"])
        .arg("--data-dir")
        .arg(dir)
        .arg("--broker")
        .arg(addr.to_string())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signer_serves_over_mqtt_reconnects_and_reports_errors() {
    let dir = std::env::temp_dir().join(format!("sphinx-key-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_sphinx-key"))
        .args(["init", "--seed-hex", &"41".repeat(32), "--log", "warn"])
        .arg("--data-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), ALICE);

    let mut cfg = MqttConfig::new("127.0.0.1:0".parse().unwrap());
    cfg.max_payload = 17 << 20;
    let (h, mut rx) = mqtt::start(cfg, auth()).await.unwrap();
    let child = spawn_signer(&dir, h.local_addr());

    let (topic, _) = next_message(&mut rx).await;
    assert_eq!(topic, format!("{ALICE}/hello"));
    let reqs = trace_requests();
    let (topic, p) = ask(&h, &mut rx, &reqs[0]).await;
    assert_eq!(topic, format!("{ALICE}/vls-res"));
    let rep = Reply::decode(&p).unwrap();
    assert_eq!((rep.seq, &rep.message[..2]), (0, &[0u8, 114][..]));

    // Requests answered in order, each matched by its seq (latency: `cargo bench -p sphinx-standin`).
    let n = 40;
    for r in &reqs[1..=n] {
        let (topic, p) = ask(&h, &mut rx, r).await;
        assert_eq!(topic, format!("{ALICE}/vls-res"));
        assert_eq!(Reply::decode(&p).unwrap().seq, r.seq);
    }

    // A bad request is reported on {id}/error as seq | text, and the signer keeps going.
    let bad = Request { seq: 777, peer_id: [0; 33], dbid: 0, message: vec![0, 1, 2] };
    let (topic, p) = ask(&h, &mut rx, &bad).await;
    assert_eq!(topic, format!("{ALICE}/error"));
    assert_eq!(u16::from_be_bytes([p[0], p[1]]), 777);
    assert!(String::from_utf8_lossy(&p[2..]).contains("type 1"), "{:?}", String::from_utf8_lossy(&p[2..]));

    // Kill the device; a new process reconnects with a fresh token, says hello, and answers a
    // redelivered request from its reply log (identical bytes).
    let last = &reqs[n];
    let (_, before) = ask(&h, &mut rx, last).await;
    stop(child);
    let child = spawn_signer(&dir, h.local_addr());
    let (topic, _) = next_message(&mut rx).await;
    assert_eq!(topic, format!("{ALICE}/hello"));
    let (_, again) = ask(&h, &mut rx, last).await;
    assert_eq!(before, again);
    for r in &reqs[n + 1..] {
        let (topic, p) = ask(&h, &mut rx, r).await;
        assert_eq!(topic, format!("{ALICE}/vls-res"), "seq {}", r.seq);
        assert_eq!(Reply::decode(&p).unwrap().seq, r.seq);
    }
    // Broker drops the client: it reconnects by itself.
    h.disconnect(ALICE);
    let (topic, _) = next_message(&mut rx).await;
    assert_eq!(topic, format!("{ALICE}/hello"));

    stop(child);
    h.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
