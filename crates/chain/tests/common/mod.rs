//! Helpers of the chain-following tests: a real VLS signer (`sphinx_signer::Signer`) that
//! journals what it handles, the fake bitcoind, and waits on the follower's status. Shared by
//! this crate's `tests/chain_follow.rs` (signer called directly) and the broker's
//! `tests/chain_relay.rs` (signer behind the relay), which includes this file with `#[path]`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bitcoin::{BlockHash, Network};
use fake_bitcoind::{Config as FakeConfig, FakeBitcoind};
use sphinx_chain::{BitcoindSettings, FollowerConfig, FollowerHandle, FollowerStatus, Phase};
use sphinx_signer::{ClockConfig, Signer, SignerConfig};
use sphinx_wire::serial::{Reply, Request};
use sphinx_wire::ClientContext;

pub const ALICE_SEED: [u8; 32] = [0x41; 32];
/// T0 of the open-pay-close trace (testdata/traces/README.md).
pub const T0: u64 = 1_795_466_157;
/// How long any single wait may take before the test fails.
pub const BOUND: Duration = Duration::from_secs(120);

type Shared<T> = Arc<Mutex<T>>;

/// A real signer, in memory or on disk, that records the type of every message it handled, in
/// order, and can be made to stall once (a slow signer) or be reopened from disk (a restart).
pub struct TestSigner {
    signer: Shared<Option<Signer>>,
    /// Message types handled, in order.
    journal: Shared<Vec<u16>>,
    /// Makes the signer stall once on the next message of a type.
    stall: Shared<Option<(u16, Duration)>>,
    /// Its node id, hex.
    pub node_hex: String,
    state: PathBuf,
}

impl TestSigner {
    /// Alice's signer: in memory, or on disk in `dir/signer`.
    pub fn new(dir: &Path, on_disk: bool) -> TestSigner {
        let state = dir.join("signer");
        let signer = if on_disk {
            Signer::open(ALICE_SEED, &state, &signer_config()).unwrap()
        } else {
            Signer::in_memory(ALICE_SEED, &signer_config()).unwrap()
        };
        let node_hex = signer.node_id_hex();
        TestSigner {
            signer: Arc::new(Mutex::new(Some(signer))),
            journal: Default::default(),
            stall: Default::default(),
            node_hex,
            state,
        }
    }

    /// Handles one request as the signer device does; `None` if the signer is not running.
    pub fn handle(&self, req: &Request) -> Option<Result<Reply, String>> {
        let ty = u16::from_be_bytes([req.message[0], req.message[1]]);
        let pause = {
            let mut st = self.stall.lock().unwrap();
            match *st {
                Some((t, d)) if t == ty => {
                    *st = None;
                    Some(d)
                }
                _ => None,
            }
        };
        if let Some(d) = pause {
            // Simulated slowness of the signer (not synchronisation).
            std::thread::sleep(d);
        }
        let result = self.signer.lock().unwrap().as_mut()?.handle(req).map_err(|e| e.to_string());
        self.journal.lock().unwrap().push(ty);
        Some(result)
    }

    /// The signer process restarts: its state is reopened from disk (an on-disk signer only).
    pub fn restart(&self) {
        let mut s = self.signer.lock().unwrap();
        *s = None;
        *s = Some(Signer::open(ALICE_SEED, &self.state, &signer_config()).unwrap());
    }

    /// The next message of type `ty` takes `d` longer.
    pub fn stall_once(&self, ty: u16, d: Duration) {
        *self.stall.lock().unwrap() = Some((ty, d));
    }

    /// Message types handled so far, in order.
    pub fn types(&self) -> Vec<u16> {
        self.journal.lock().unwrap().clone()
    }
}

pub struct TempDir(pub PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn temp_dir(name: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("sphinx-chain-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

pub fn signer_config() -> SignerConfig {
    SignerConfig { network: Network::Regtest, policy: Default::default(), clock: ClockConfig::Fixed(T0 + 100) }
}

/// Logs to the test output (`RUST_LOG=sphinx_chain=debug cargo test … -- --nocapture`).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("sphinx_chain=info")),
        )
        .with_test_writer()
        .try_init();
}

/// Root-connection and client requests of alice's open-pay-close trace: (context, message).
pub fn trace_requests() -> Vec<(ClientContext, Vec<u8>)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/traces/open-pay-close/alice.jsonl");
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["dir"] != "req" {
            continue;
        }
        let ty = v["type"].as_u64().unwrap();
        if ty == 9 || ty == 33 {
            continue;
        }
        let ctx = &v["ctx"];
        let mut peer_id = [0u8; 33];
        if let Some(p) = ctx["peer_id"].as_str() {
            peer_id.copy_from_slice(&hex::decode(p).unwrap());
        }
        let c = ClientContext {
            peer_id,
            dbid: ctx["dbid"].as_u64().unwrap(),
            permissions: ctx["permissions"].as_u64().unwrap(),
        };
        out.push((c, hex::decode(v["hex"].as_str().unwrap()).unwrap()));
    }
    out
}

/// lightningd's `hsmd_init` from the trace.
pub fn init_request() -> Vec<u8> {
    trace_requests().into_iter().find(|(_, m)| m[..2] == [0, 11]).unwrap().1
}

pub fn settings(url: String, cookie: Option<PathBuf>) -> BitcoindSettings {
    BitcoindSettings { url: Some(url), cookie_file: cookie }
}

/// `btc`'s URL with the login a `fake(true, _)` accepts.
pub fn logged_in(btc: &FakeBitcoind) -> BitcoindSettings {
    settings(btc.url_with_login("alice", "s3cret"), None)
}

pub async fn fake(users: bool, cookie_dir: Option<PathBuf>) -> FakeBitcoind {
    let mut cfg = FakeConfig::default();
    if users {
        cfg.users.push(("alice".into(), "s3cret".into()));
    }
    cfg.cookie_dir = cookie_dir;
    FakeBitcoind::start(cfg).await.unwrap()
}

/// The follower's settings in these tests: fast polling, a heartbeat on every poll, short backoff.
pub fn fast_follower(settings: BitcoindSettings, cache: Option<PathBuf>) -> FollowerConfig {
    let mut cfg = FollowerConfig::new(settings, Network::Regtest);
    cfg.filter_cache = cache;
    cfg.poll_interval = Duration::from_millis(20);
    cfg.heartbeat_interval = Duration::ZERO;
    cfg.backoff_min = Duration::from_millis(20);
    cfg.backoff_max = Duration::from_millis(200);
    cfg.rpc_timeout = Duration::from_secs(10);
    cfg
}

/// Waits (bounded) until the follower's status satisfies `f`.
pub async fn wait_status(h: &mut FollowerHandle, what: &str, f: impl FnMut(&FollowerStatus) -> bool) -> FollowerStatus {
    let r = match tokio::time::timeout(BOUND, h.status.wait_for(f)).await {
        Ok(Ok(s)) => Some(s.clone()),
        Ok(Err(_)) => panic!("follower stopped while waiting for: {what}"),
        Err(_) => None,
    };
    r.unwrap_or_else(|| panic!("timed out waiting for: {what}; status {:?}", *h.status.borrow()))
}

pub async fn wait_synced(h: &mut FollowerHandle, tip: (u32, BlockHash)) -> FollowerStatus {
    wait_status(h, &format!("signer at {tip:?}"), |s| s.phase == Phase::Synced && s.signer_tip == Some(tip)).await
}
