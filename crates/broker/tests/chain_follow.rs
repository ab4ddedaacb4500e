//! Chain tracking end to end: a fake `bitcoind -regtest` (crates/fake-bitcoind) serving real
//! mined blocks, the broker's follower and relay, and a real VLS signer (`sphinx_signer::Signer`)
//! behind a `SignerLink` that hands each published request to it in order, as the MQTT path does.
//!
//! No test sleeps to synchronise: each waits (with a bound) for the follower's status or the
//! signer's answers.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bitcoin::hash_types::FilterHeader;
use bitcoin::hashes::Hash;
use bitcoin::key::Keypair;
use bitcoin::secp256k1::Secp256k1;
use bitcoin::{Block, BlockHash, Network, Transaction, Witness};
use fake_bitcoind::{Config as FakeConfig, FakeBitcoind};
use sphinx_broker::chain::signer::SignerChain;
use sphinx_broker::chain::{self, BitcoindSettings, FollowerConfig, FollowerHandle, FollowerStatus, Phase};
use sphinx_broker::pin::PinStore;
use sphinx_broker::relay::{self, LinkEvent, RelayConfig, RelayError, RelayHandle, SignerLink};
use sphinx_signer::{ClockConfig, Signer, SignerConfig};
use sphinx_wire::serial::{Reply, Request};
use sphinx_wire::ClientContext;
use tokio::sync::{mpsc, watch};
use txoo::filter::BlockSpendFilter;
use txoo::proof::TxoProof;
use txoo::util::sign_attestation;
use txoo::Attestation;

const ALICE_SEED: [u8; 32] = [0x41; 32];
/// T0 of the open-pay-close trace (testdata/traces/README.md).
const T0: u64 = 1_795_466_157;
/// How long any single wait may take before the test fails.
const BOUND: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------- the signer behind the link

/// What the fake signer did, in order: message types, and whether they were answered.
#[derive(Default)]
struct Journal {
    types: Vec<u16>,
}

type Shared<T> = Arc<Mutex<T>>;

/// A `SignerLink` that runs every published request through a real `Signer` on its own thread,
/// in publish order, and reports the reply (or refusal) back to the relay.
struct SignerBehindLink {
    jobs: std::sync::mpsc::Sender<Vec<u8>>,
}

impl SignerLink for SignerBehindLink {
    fn publish(
        &self,
        _topic: String,
        payload: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        let r = self.jobs.send(payload).map_err(|e| e.to_string());
        Box::pin(async move { r })
    }
    fn disconnect(&self, _identity: &str) {}
}

struct Harness {
    relay: RelayHandle,
    events: mpsc::Sender<LinkEvent>,
    signer: Shared<Option<Signer>>,
    journal: Shared<Journal>,
    node_hex: String,
    init_done: watch::Sender<bool>,
    /// Makes the signer stall once on the next message of a type (a slow signer).
    stall: Shared<Option<(u16, Duration)>>,
    _dir: TempDir,
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("sphinx-chain-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

fn signer_config() -> SignerConfig {
    SignerConfig { network: Network::Regtest, policy: Default::default(), clock: ClockConfig::Fixed(T0 + 100) }
}

impl Harness {
    /// Relay + signer (in memory, or on disk under `state`), signer connected, `hsmd_init` done.
    async fn new(name: &str, on_disk: bool) -> Harness {
        Self::with_timeout(name, on_disk, Duration::from_secs(60)).await
    }

    async fn with_timeout(name: &str, on_disk: bool, request_timeout: Duration) -> Harness {
        let h = Self::uninitialised(name, on_disk, request_timeout).await;
        let init = trace_requests().into_iter().find(|(_, m)| m[..2] == [0, 11]).unwrap().1;
        h.relay.call(ClientContext::ROOT, init).await.expect("hsmd_init");
        h
    }

    /// Relay and connected signer, before lightningd's `hsmd_init`.
    async fn uninitialised(name: &str, on_disk: bool, request_timeout: Duration) -> Harness {
        init_logs();
        let dir = temp_dir(name);
        let signer = if on_disk {
            Signer::open(ALICE_SEED, &dir.0.join("signer"), &signer_config()).unwrap()
        } else {
            Signer::in_memory(ALICE_SEED, &signer_config()).unwrap()
        };
        let node_hex = signer.node_id_hex();
        let signer = Arc::new(Mutex::new(Some(signer)));
        let journal: Shared<Journal> = Default::default();
        let (events, ev_rx) = mpsc::channel(4096);
        let (jobs_tx, jobs_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let stall: Shared<Option<(u16, Duration)>> = Default::default();
        {
            let (signer, journal, events, id) = (signer.clone(), journal.clone(), events.clone(), node_hex.clone());
            let stall = stall.clone();
            std::thread::spawn(move || {
                while let Ok(frame) = jobs_rx.recv() {
                    let Ok(req) = Request::decode(&frame) else { continue };
                    let ty = u16::from_be_bytes([req.message[0], req.message[1]]);
                    let pause = {
                        let mut st = stall.lock().unwrap();
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
                    let result = {
                        let mut s = signer.lock().unwrap();
                        match s.as_mut() {
                            Some(s) => s.handle(&req).map_err(|e| e.to_string()),
                            None => continue, // "disconnected": the relay resends on hello
                        }
                    };
                    journal.lock().unwrap().types.push(ty);
                    let ev = match result {
                        Ok(reply) => {
                            LinkEvent::Reply(id.clone(), Reply { seq: reply.seq, message: reply.message }.encode())
                        }
                        Err(text) => {
                            let mut p = req.seq.to_be_bytes().to_vec();
                            p.extend_from_slice(text.as_bytes());
                            LinkEvent::Error(id.clone(), p)
                        }
                    };
                    if events.blocking_send(ev).is_err() {
                        return;
                    }
                }
            });
        }
        let pin = Arc::new(PinStore::open(&dir.0.join("broker")).unwrap());
        let cfg = RelayConfig {
            queue_capacity: 1000,
            max_inflight: 64,
            request_timeout,
            waiting_log_interval: Duration::from_secs(3600),
        };
        let relay = relay::spawn(cfg, Arc::new(SignerBehindLink { jobs: jobs_tx }), ev_rx, pin);
        events.send(LinkEvent::Hello(node_hex.clone())).await.unwrap();
        let (init_done, _) = watch::channel(false);
        Harness { relay, events, signer, journal, node_hex, init_done, stall, _dir: dir }
    }

    /// Starts the follower against `settings` (fast polling, heartbeat on every poll).
    fn follow(&self, settings: BitcoindSettings) -> FollowerHandle {
        self.follow_with_cache(settings, None)
    }

    fn follow_with_cache(&self, settings: BitcoindSettings, cache: Option<PathBuf>) -> FollowerHandle {
        let mut cfg = FollowerConfig::new(settings, Network::Regtest);
        cfg.filter_cache = cache;
        cfg.poll_interval = Duration::from_millis(20);
        cfg.heartbeat_interval = Duration::ZERO;
        cfg.backoff_min = Duration::from_millis(20);
        cfg.backoff_max = Duration::from_millis(200);
        cfg.rpc_timeout = Duration::from_secs(10);
        let h = chain::spawn(cfg, self.relay.clone(), self.init_done.subscribe());
        self.init_done.send_replace(true);
        h
    }

    fn chain(&self) -> SignerChain {
        SignerChain::new(self.relay.clone())
    }

    fn types(&self) -> Vec<u16> {
        self.journal.lock().unwrap().types.clone()
    }
}

/// Logs to the test output (`RUST_LOG=sphinx_broker=debug cargo test … -- --nocapture`).
fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("sphinx_broker::chain=info")),
        )
        .with_test_writer()
        .try_init();
}

/// Root-connection and client requests of alice's open-pay-close trace: (context, message).
fn trace_requests() -> Vec<(ClientContext, Vec<u8>)> {
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

fn settings(url: String, cookie: Option<PathBuf>) -> BitcoindSettings {
    BitcoindSettings { url: Some(url), cookie_file: cookie }
}

/// `btc`'s URL with the login a `fake(true, _)` accepts.
fn logged_in(btc: &FakeBitcoind) -> BitcoindSettings {
    settings(btc.url_with_login("alice", "s3cret"), None)
}

async fn fake(users: bool, cookie_dir: Option<PathBuf>) -> FakeBitcoind {
    let mut cfg = FakeConfig::default();
    if users {
        cfg.users.push(("alice".into(), "s3cret".into()));
    }
    cfg.cookie_dir = cookie_dir;
    FakeBitcoind::start(cfg).await.unwrap()
}

/// Waits (bounded) until the follower's status satisfies `f`.
async fn wait_status(h: &mut FollowerHandle, what: &str, f: impl FnMut(&FollowerStatus) -> bool) -> FollowerStatus {
    let r = match tokio::time::timeout(BOUND, h.status.wait_for(f)).await {
        Ok(Ok(s)) => Some(s.clone()),
        Ok(Err(_)) => panic!("follower stopped while waiting for: {what}"),
        Err(_) => None,
    };
    r.unwrap_or_else(|| panic!("timed out waiting for: {what}; status {:?}", *h.status.borrow()))
}

async fn wait_synced(h: &mut FollowerHandle, tip: (u32, BlockHash)) -> FollowerStatus {
    wait_status(h, &format!("signer at {tip:?}"), |s| s.phase == Phase::Synced && s.signer_tip == Some(tip)).await
}

/// The filter header of the active block at `height`, computed from genesis as the tracker does.
fn filter_header_at(f: &FakeBitcoind, height: u32) -> FilterHeader {
    let mut fh = FilterHeader::all_zeros();
    for h in 1..=height {
        let b = f.block(&f.block_hash(h).unwrap()).unwrap();
        fh = BlockSpendFilter::from_block(&b).filter_header(&fh);
    }
    fh
}

fn proof_for(block: &Block, height: u32, prev_fh: &FilterHeader) -> TxoProof {
    let secp = Secp256k1::new();
    let key = Keypair::new(&secp, &mut bitcoin::secp256k1::rand::thread_rng());
    let fh = BlockSpendFilter::from_block(block).filter_header(prev_fh);
    let att = Attestation { block_hash: block.block_hash(), block_height: height, filter_header: fh, time: 0 };
    let signed = sign_attestation(att, &key, &secp);
    TxoProof::prove(vec![(key.public_key(), signed)], prev_fh, block, height, &[], &[])
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_signer_tip_follows_new_blocks_with_heartbeats() {
    let h = Harness::new("follow", false).await;
    let btc = fake(true, None).await;
    btc.mine(5);
    let mut f = h.follow(logged_in(&btc));
    wait_synced(&mut f, btc.tip()).await;
    btc.mine(3);
    let s = wait_synced(&mut f, btc.tip()).await;
    assert_eq!(s.blocks_added, 8);
    assert_eq!(h.chain().tip().await.unwrap(), btc.tip());
    // A signed heartbeat for the tip, verified against the node's heartbeat key.
    let s =
        wait_status(&mut f, "heartbeat at tip", |s| s.heartbeat.as_ref().is_some_and(|hb| hb.chain_height == 8)).await;
    let hb = s.heartbeat.unwrap();
    assert!(hb.verified, "heartbeat signature verifies");
    assert_eq!(hb.chain_tip, btc.tip().1);
    let op = chain::fetch_heartbeat(&h.relay).await.unwrap();
    assert!(op.verified && op.chain_height == 8);
    // Only the calls the docs list were used.
    for m in ["getblockchaininfo", "getblockhash", "getblock"] {
        assert!(btc.calls(m) > 0, "{m} used");
    }
    assert_eq!(btc.calls("getblockheader"), 0, "no header walk needed from genesis");
    f.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_three_block_reorg_is_followed_remove_then_add() {
    let h = Harness::new("reorg", false).await;
    let btc = fake(true, None).await;
    btc.mine(10);
    let mut f = h.follow(logged_in(&btc));
    wait_synced(&mut f, btc.tip()).await;
    let before = h.types().len();
    let old_tip = btc.tip();
    let new = btc.reorg(3, 4);
    assert_eq!(btc.tip(), (11, *new.last().unwrap()));
    let s = wait_synced(&mut f, btc.tip()).await;
    assert_eq!(s.blocks_removed, 3);
    let after: Vec<u16> = h.types()[before..].iter().copied().filter(|t| *t == 2005 || *t == 2006).collect();
    assert_eq!(after, vec![2006, 2006, 2006, 2005, 2005, 2005, 2005], "RemoveBlock ×3 then AddBlock ×4");
    assert_ne!(h.chain().tip().await.unwrap().1, old_tip.1);
    assert_eq!(h.chain().tip().await.unwrap(), btc.tip());
    f.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_bad_pow_and_broken_parent_are_refused_and_state_unchanged() {
    let h = Harness::new("badblock", false).await;
    let btc = fake(true, None).await;
    btc.mine(5);
    let tip5 = btc.tip();
    let mut f = h.follow(logged_in(&btc));
    wait_synced(&mut f, tip5).await;

    // bitcoind (lying) serves a block with bad proof of work: the follower refuses it.
    let bad = btc.bad_pow_block();
    btc.push_unchecked(bad.clone());
    let s = wait_status(&mut f, "bad PoW refused", |s| {
        s.last_error.as_deref().is_some_and(|e| e.contains("bad proof of work"))
    })
    .await;
    assert!(s.last_error.unwrap().contains(&bad.block_hash().to_string()));
    assert_eq!(h.chain().tip().await.unwrap(), tip5, "signer's tip unchanged");

    // A block that does not build on bitcoind's own block at the previous height.
    btc.pop(1);
    btc.push_unchecked(btc.broken_parent_block());
    wait_status(&mut f, "broken parent refused", |s| {
        s.last_error.as_deref().is_some_and(|e| e.contains("broken parent link"))
    })
    .await;
    assert_eq!(h.chain().tip().await.unwrap(), tip5, "signer's tip unchanged");
    assert!(!h.types().contains(&2006), "nothing was removed from the signer");

    // bitcoind fixes itself: following resumes.
    btc.pop(1);
    btc.mine(2);
    wait_synced(&mut f, btc.tip()).await;
    f.task.abort();
    let tip7 = btc.tip();

    // The signer's tracker refuses them too, when they reach it directly.
    let chain = h.chain();
    let prev_fh = filter_header_at(&btc, 7);
    let bad = btc.bad_pow_block();
    let err = chain.add_block(&bad, proof_for(&bad, 8, &prev_fh)).await.unwrap_err();
    eprintln!("signer on bad PoW: {err}");
    assert!(matches!(err, chain::signer::SignerCallError::Relay { source: RelayError::Refused(_), .. }), "{err}");
    assert_eq!(chain.tip().await.unwrap(), tip7, "signer's tip unchanged after a bad-PoW AddBlock");
    let orphan = btc.broken_parent_block();
    let err = chain.add_block(&orphan, proof_for(&orphan, 8, &prev_fh)).await.unwrap_err();
    eprintln!("signer on broken parent: {err}");
    assert!(err.is_orphan(), "{err}");
    assert_eq!(chain.tip().await.unwrap(), tip7, "signer's tip unchanged after an orphan AddBlock");
    // And it still takes the real next block.
    btc.mine(1);
    let next = btc.block(&btc.tip().1).unwrap();
    chain.add_block(&next, proof_for(&next, 8, &prev_fh)).await.unwrap();
    assert_eq!(chain.tip().await.unwrap(), btc.tip());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_bitcoind_down_at_start_restarting_and_warming_up_is_survived() {
    let h = Harness::new("restart", false).await;
    let cookie_dir = h._dir.0.join("bitcoind");
    let btc = fake(false, Some(cookie_dir.clone())).await;
    let cookie = btc.cookie_file().unwrap();
    btc.stop().await; // down (and no cookie) when the follower starts
    let mut f = h.follow(settings(btc.url(), Some(cookie.clone())));
    let s = wait_status(&mut f, "failures while bitcoind is down", |s| s.consecutive_failures >= 3).await;
    eprintln!("while down: {:?}", s.last_error);
    assert!(s.last_error.unwrap().contains("cookie"));

    btc.restart().await.unwrap(); // new cookie
    btc.mine(5);
    wait_synced(&mut f, btc.tip()).await;

    // Goes away mid-run; blocks arrive meanwhile.
    btc.stop().await;
    btc.mine(3);
    let failed_before = f.status.borrow().failures_total;
    wait_status(&mut f, "failure noticed", |s| s.failures_total > failed_before).await;
    // Comes back warming up (error -28), then ready, with yet another cookie.
    btc.set_warmup(Some("Loading block index…"));
    btc.restart().await.unwrap();
    let s = wait_status(&mut f, "warm-up seen", |s| s.last_error.as_deref().is_some_and(|e| e.contains("warming up")))
        .await;
    eprintln!("warming up: {:?}", s.last_error);
    btc.set_warmup(None);
    let s = wait_synced(&mut f, btc.tip()).await;
    assert_eq!(s.signer_tip.unwrap().0, 8);
    assert_eq!(h.chain().tip().await.unwrap(), btc.tip());

    // A wrong password is reported as such, not as an outage.
    f.task.abort();
    let btc2 = fake(true, None).await;
    let mut f2 = h.follow(settings(btc2.url_with_login("alice", "wrong"), None));
    let s = wait_status(&mut f2, "401 reported", |s| s.last_error.is_some()).await;
    assert!(s.last_error.unwrap().contains("rejected the login"));
    f2.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_cln_requests_keep_flowing_during_1000_block_catch_up() {
    let h = Harness::new("catchup", false).await;
    let btc = fake(true, None).await;
    btc.mine(1000);
    let check_pubkey = trace_requests().into_iter().find(|(c, m)| c.dbid == 0 && m[..2] == [0, 28]).unwrap().1;
    let f = h.follow(logged_in(&btc));
    let target = btc.tip();
    let mut latencies = Vec::new();
    let mut during = 0usize;
    let mut worst_ahead = 0usize;
    loop {
        let journal_before = h.types().len();
        let t = Instant::now();
        let reply = h.relay.call(ClientContext::ROOT, check_pubkey.clone()).await.expect("CLN request answered");
        let latency = t.elapsed();
        assert_eq!(&reply[..2], &[0, 128]);
        latencies.push(latency);
        // How many chain requests did the signer handle between our call and its answer?
        let types = h.types();
        let ours = journal_before
            + types[journal_before..].iter().position(|t| *t == 28).expect("our request is in the journal");
        let ahead = types[journal_before..ours].iter().filter(|t| **t >= 1000).count();
        worst_ahead = worst_ahead.max(ahead);
        let s = f.status.borrow().clone();
        let height = s.signer_tip.map(|t| t.0).unwrap_or(0);
        if height > 0 && height < 1000 {
            during += 1;
        }
        if s.phase == Phase::Synced && s.signer_tip == Some(target) {
            break;
        }
    }
    latencies.sort();
    let max = *latencies.last().unwrap();
    let median = latencies[latencies.len() / 2];
    eprintln!(
        "{} CLN requests during catch-up of 1000 blocks: median {median:?}, max {max:?}, at most {worst_ahead} chain requests ahead of one",
        latencies.len()
    );
    assert!(during >= 50, "CLN requests were answered while blocks were being caught up ({during})");
    assert!(worst_ahead <= 2, "a CLN request waits behind at most the follower's one outstanding request (+1 race)");
    assert!(max < Duration::from_secs(2), "CLN latency stays bounded during the catch-up: {max:?}");
    assert_eq!(h.chain().tip().await.unwrap(), target);
    f.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_tracker_state_persists_across_signer_restart() {
    let h = Harness::new("persist", true).await;
    let btc = fake(true, None).await;
    btc.mine(20);
    let mut f = h.follow(logged_in(&btc));
    wait_synced(&mut f, btc.tip()).await;
    // The signer process "restarts": state reopened from its redb directory.
    h.events.send(LinkEvent::Gone(h.node_hex.clone())).await.unwrap();
    {
        let mut s = h.signer.lock().unwrap();
        *s = None;
        *s = Some(Signer::open(ALICE_SEED, &h._dir.0.join("signer"), &signer_config()).unwrap());
    }
    h.events.send(LinkEvent::Hello(h.node_hex.clone())).await.unwrap();
    assert_eq!(h.chain().tip().await.unwrap(), btc.tip(), "tracker tip read back from disk");
    btc.mine(2);
    wait_synced(&mut f, btc.tip()).await;
    f.task.abort();
}

/// The funding transaction alice signed in the recorded trace, confirmed in a mined block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_block_confirming_the_traced_funding_tx_updates_watches() {
    let h = Harness::new("funding", false).await;
    // Replay alice's session up to the funding signature (setup_channel, then sign_withdrawal).
    let mut withdrawal = None;
    for (ctx, msg) in trace_requests().into_iter().skip(1) {
        let ty = u16::from_be_bytes([msg[0], msg[1]]);
        let reply = h.relay.call(ctx, msg).await.unwrap_or_else(|e| panic!("trace request {ty}: {e}"));
        if ty == 7 {
            withdrawal = Some(reply);
            break;
        }
    }
    let reply = withdrawal.expect("sign_withdrawal in the trace");
    let psbt = match vls_protocol::msgs::from_vec(reply).unwrap() {
        vls_protocol::msgs::Message::SignWithdrawalReply(r) => r.psbt.0.inner,
        m => panic!("unexpected {m:?}"),
    };
    let mut tx: Transaction = psbt.unsigned_tx.clone();
    for (i, input) in psbt.inputs.iter().enumerate() {
        if let Some((pk, sig)) = input.partial_sigs.iter().next() {
            tx.input[i].witness = Witness::from_slice(&[sig.to_vec(), pk.to_bytes()]);
        }
    }
    let funding_txid = tx.compute_txid();
    let (txids, outpoints) = h.chain().forward_watches().await.unwrap();
    assert!(txids.contains(&funding_txid), "the signer watches for the funding tx");
    assert!(!outpoints.iter().any(|o| o.txid == funding_txid));

    let btc = fake(true, None).await;
    btc.mine(101);
    let funding_block = btc.mine_with(vec![tx]);
    btc.mine(5);
    let mut f = h.follow(logged_in(&btc));
    wait_synced(&mut f, btc.tip()).await;
    assert!(btc.block(&funding_block).unwrap().txdata.iter().any(|t| t.compute_txid() == funding_txid));
    let (_, outpoints) = h.chain().forward_watches().await.unwrap();
    assert!(
        outpoints.iter().any(|o| o.txid == funding_txid),
        "after the confirming block the signer watches the funding outpoint: {outpoints:?}"
    );
    f.task.abort();
}

/// A signer that stalls past the request bound: the follower's call fails, it backs off, reads
/// the signer's tip again and carries on; no block is skipped or added twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_slow_signer_timeouts_are_retried_from_the_signers_tip() {
    let h = Harness::with_timeout("slow", false, Duration::from_millis(300)).await;
    let btc = fake(true, None).await;
    btc.mine(5);
    // The third AddBlock takes longer than the relay's bound.
    *h.stall.lock().unwrap() = Some((2005, Duration::from_millis(900)));
    let mut f = h.follow(logged_in(&btc));
    let s = wait_status(&mut f, "timeout reported", |s| {
        s.last_error.as_deref().is_some_and(|e| e.contains("no reply from the signer"))
    })
    .await;
    eprintln!("slow signer: {:?}", s.last_error);
    let s = wait_synced(&mut f, btc.tip()).await;
    assert!(s.failures_total >= 1);
    // The late AddBlock was applied by the signer; the follower noticed from TipInfo.
    let adds = h.types().iter().filter(|t| **t == 2005).count();
    assert_eq!(adds, 5, "each block added exactly once");
    assert_eq!(h.chain().tip().await.unwrap(), btc.tip());
    f.task.abort();
}

/// A restarted broker resumes from the signer's tip: from its filter-header file without any
/// header walk, or, without it, by recomputing filter headers back to genesis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_follower_restart_resumes_from_the_signers_tip() {
    let h = Harness::new("resume", false).await;
    let btc = fake(true, None).await;
    btc.mine(30);
    let cache = h._dir.0.join("chain-filter-headers");
    let url = btc.url_with_login("alice", "s3cret");
    let mut f = h.follow_with_cache(settings(url.clone(), None), Some(cache.clone()));
    wait_synced(&mut f, btc.tip()).await;
    f.task.abort();
    assert!(cache.exists(), "filter headers saved");

    btc.mine(3);
    let mut f = h.follow_with_cache(settings(url.clone(), None), Some(cache.clone()));
    wait_synced(&mut f, btc.tip()).await;
    f.task.abort();
    assert_eq!(btc.calls("getblockheader"), 0, "resumed from the saved filter headers");

    btc.mine(2);
    let blocks_before = btc.calls("getblock");
    let mut f = h.follow(settings(url, None));
    wait_synced(&mut f, btc.tip()).await;
    f.task.abort();
    assert_eq!(btc.calls("getblockheader"), 33, "walked back from the signer's tip to genesis");
    assert_eq!(btc.calls("getblock") - blocks_before, 33 + 2, "recomputed 33 filter headers, then added 2 blocks");
    assert_eq!(h.chain().tip().await.unwrap(), btc.tip());
}

/// bitcoind behind the signer while it syncs (reindex, initial download) is waited for, not
/// taken for a reorg: nothing is removed from the signer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_bitcoind_behind_and_syncing_is_not_a_reorg() {
    let h = Harness::new("behind", false).await;
    let btc = fake(true, None).await;
    let hashes = btc.mine(10);
    let mut f = h.follow(logged_in(&btc));
    wait_synced(&mut f, btc.tip()).await;
    let tip = btc.tip();
    btc.pop(3);
    btc.set_syncing(Some(3));
    let s = wait_status(&mut f, "waiting for bitcoind", |s| {
        s.last_error.as_deref().is_some_and(|e| e.contains("still syncing"))
    })
    .await;
    eprintln!("behind: {:?}", s.last_error);
    assert_eq!(h.chain().tip().await.unwrap(), tip);
    for hash in &hashes[7..] {
        btc.push_unchecked(btc.block(hash).unwrap());
    }
    btc.set_syncing(None);
    wait_synced(&mut f, tip).await;
    assert!(!h.types().contains(&2006), "no RemoveBlock");
    f.task.abort();
}

/// The wiring the broker uses: the follower waits for `HsmdServer::init_done()`, i.e. until a
/// signer has answered lightningd's `hsmd_init` on fd 3, then follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_follower_starts_when_lightningds_init_is_answered() {
    use std::io::{Read, Write};
    let h = Harness::uninitialised("wiring", false, Duration::from_secs(60)).await;
    let btc = fake(true, None).await;
    btc.mine(3);
    let server =
        Arc::new(sphinx_broker::hsmd::HsmdServer::new(h.relay.clone(), Network::Regtest, None, false).unwrap());
    let mut cfg = FollowerConfig::new(logged_in(&btc), Network::Regtest);
    cfg.poll_interval = Duration::from_millis(20);
    let mut f = chain::spawn(cfg, h.relay.clone(), server.init_done());
    let (mut lightningd, hsmd_end) = std::os::unix::net::UnixStream::pair().unwrap();
    let serving = tokio::spawn(server.clone().serve_root(hsmd_end));
    wait_status(&mut f, "waiting for init", |s| s.phase == Phase::WaitingForInit).await;
    assert!(h.types().is_empty(), "no chain request before hsmd_init");
    // lightningd sends hsmd_init on fd 3 and reads the reply.
    let init = trace_requests().into_iter().find(|(_, m)| m[..2] == [0, 11]).unwrap().1;
    let reply = tokio::task::spawn_blocking(move || {
        let mut frame = (init.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&init);
        lightningd.write_all(&frame).unwrap();
        let mut len = [0u8; 4];
        lightningd.read_exact(&mut len).unwrap();
        let mut reply = vec![0u8; u32::from_be_bytes(len) as usize];
        lightningd.read_exact(&mut reply).unwrap();
        (lightningd, reply)
    })
    .await
    .unwrap();
    assert_eq!(&reply.1[..2], &[0, 114], "init_reply_v4");
    wait_synced(&mut f, btc.tip()).await;
    assert_eq!(h.types()[0], 11, "hsmd_init first, then chain traffic");
    drop(reply.0); // lightningd closes fd 3: the hsmd server ends
    serving.await.unwrap().unwrap();
    f.task.abort();
}
