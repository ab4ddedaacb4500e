//! Chain tracking over the real request path: the broker's embedded MQTT server and relay
//! (`sphinx_broker::start`), a `sphinx-key run` signer process (VLS on redb) connected over MQTT,
//! and the fake bitcoind.
//!
//! Needs the `sphinx-key` binary next to this test's directory (`target/release/sphinx-key`):
//! `cargo build --release -p sphinx-key` first (scripts/test builds every binary before testing).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bitcoin::Network;
use common::{start_key, trace_request, Dir, KeyProc};
use fake_bitcoind::{Config as FakeConfig, FakeBitcoind};
use sphinx_broker::api::ApiToken;
use sphinx_broker::config::Config;
use sphinx_chain::signer::SignerChain;
use sphinx_chain::{self as chain, BitcoindSettings, FollowerConfig, FollowerStatus, Phase};
use sphinx_wire::ClientContext;
use tokio::sync::watch;

const CLOCK: u64 = 1_795_466_257;
const BOUND: Duration = Duration::from_secs(120);

fn key_bin() -> PathBuf {
    let p = common::key_bin_path().unwrap();
    assert!(p.is_file(), "{} not found: cargo build --release -p sphinx-key first", p.display());
    p
}

fn start_signer(data: &Path, broker: &str) -> KeyProc {
    start_key(&key_bin(), data, broker, &["--dev-fixed-clock", &CLOCK.to_string()])
}

const API_TOKEN: &str = "chain-e2e-api-token-0123456789";

/// `GET path` on the operator API at `addr` with the token: the JSON body of a 200.
async fn api_get(addr: std::net::SocketAddr, path: &str) -> serde_json::Value {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(io).await.unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::AUTHORIZATION, format!("Bearer {API_TOKEN}"))
        .body(Empty::new())
        .unwrap();
    let resp = tokio::time::timeout(BOUND, sender.send_request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), hyper::StatusCode::OK, "GET {path}");
    let body = tokio::time::timeout(BOUND, resp.into_body().collect()).await.unwrap().unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

async fn wait(
    rx: &mut watch::Receiver<FollowerStatus>,
    what: &str,
    f: impl FnMut(&FollowerStatus) -> bool,
) -> FollowerStatus {
    let r = match tokio::time::timeout(BOUND, rx.wait_for(f)).await {
        Ok(Ok(s)) => Some(s.clone()),
        _ => None,
    };
    r.unwrap_or_else(|| panic!("timed out waiting for {what}: {:?}", *rx.borrow()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_e2e_over_mqtt_with_a_signer_process() {
    let dir = Dir::fresh("sphinx-chain-e2e");

    let mut cfg = Config { network: Network::Regtest, data_dir: dir.0.join("broker"), ..Config::default() };
    cfg.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    cfg.api.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.api.token = Some(ApiToken::new(API_TOKEN).unwrap());
    let broker = sphinx_broker::start(&cfg).await.unwrap();
    let listen = broker.mqtt.local_addr().to_string();
    let signer = start_signer(&dir.0.join("key"), &listen);

    // lightningd's hsmd_init, held by the relay until the signer connects and answers it.
    let reply = tokio::time::timeout(BOUND, broker.relay.call(ClientContext::ROOT, trace_request(11)))
        .await
        .unwrap_or_else(|_| panic!("no init reply; signer log:\n{}", signer.log()))
        .unwrap();
    assert_eq!(&reply[..2], &[0, 114]);

    let btc = FakeBitcoind::start(FakeConfig { users: vec![("u".into(), "p".into())], ..FakeConfig::default() })
        .await
        .unwrap();
    btc.mine(300);
    let mut fc = FollowerConfig::new(
        BitcoindSettings { url: Some(btc.url_with_login("u", "p")), cookie_file: None },
        Network::Regtest,
    )
    .with_data_dir(&cfg.data_dir);
    fc.poll_interval = Duration::from_millis(20);
    fc.heartbeat_interval = Duration::ZERO;
    let (init_done, init_rx) = watch::channel(true);
    let mut f = chain::spawn_reporting(fc, broker.relay.clone(), init_rx, broker.chain_status.clone());

    // CLN requests keep flowing over MQTT while 300 blocks are caught up.
    let check_pubkey = trace_request(28);
    let mut during = 0;
    let mut max = Duration::ZERO;
    let target = btc.tip();
    loop {
        let t = Instant::now();
        let r = broker.relay.call(ClientContext::ROOT, check_pubkey.clone()).await.unwrap();
        max = max.max(t.elapsed());
        assert_eq!(&r[..2], &[0, 128]);
        let s = f.status.borrow().clone();
        if s.signer_tip.is_some_and(|t| t.0 > 0 && t.0 < 300) {
            during += 1;
        }
        if s.phase == Phase::Synced && s.signer_tip == Some(target) {
            break;
        }
    }
    eprintln!("over MQTT: {during} CLN requests answered during the catch-up, max latency {max:?}");
    assert!(during >= 10, "{during}");

    // A reorg and a bad block, over the same path.
    btc.reorg(3, 5);
    wait(&mut f.status, "reorg followed", |s| s.phase == Phase::Synced && s.signer_tip == Some(btc.tip())).await;
    let tip = btc.tip();
    btc.push_unchecked(btc.bad_pow_block());
    wait(&mut f.status, "bad PoW refused", |s| {
        s.last_error.as_deref().is_some_and(|e| e.contains("bad proof of work"))
    })
    .await;
    let chain = SignerChain::new(broker.relay.clone());
    assert_eq!(chain.tip().await.unwrap(), tip);
    let s = f.status.borrow().clone();
    assert_eq!(s.blocks_removed, 3);
    let hb = chain::fetch_heartbeat(broker.relay.clone()).await.unwrap();
    assert!(hb.verified);
    assert_eq!((hb.chain_height, hb.chain_tip), tip);

    // The operator sees the same through the API: tips, counters, the refused block.
    let api = broker.api.as_ref().unwrap().local_addr();
    let v = api_get(api, "/v1/chain").await;
    eprintln!("GET /v1/chain: {v}");
    assert_eq!(v["signer_tip"]["height"], tip.0);
    assert_eq!(v["signer_tip"]["hash"], tip.1.to_string());
    assert_eq!(v["bitcoind_tip"]["height"], tip.0 + 1);
    assert_eq!(v["blocks_removed"], 3);
    assert_eq!(v["restarts"], 0);
    assert_eq!(v["phase"], "retrying");
    assert!(v["failures_total"].as_u64().unwrap() >= 1);
    assert!(v["last_error"].as_str().unwrap().contains("bad proof of work"), "{v}");
    let failure = &v["last_failure"];
    assert!(failure["text"].as_str().unwrap().contains("bad proof of work"), "{v}");
    assert!(failure["time"].as_u64().unwrap() > 1_700_000_000 && failure["restarted"] == false, "{v}");
    assert_eq!(v["heartbeat"]["verified"], true);
    f.task.abort();
    drop(init_done);
    drop(signer);
}
