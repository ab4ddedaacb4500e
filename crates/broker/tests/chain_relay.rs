//! Chain following behind the broker's relay: the follower (crate `sphinx-chain`) sends its
//! messages through `RelayHandle` (its `ChainLink`), a `SignerLink` hands each published request
//! to a real VLS signer (`sphinx_signer::Signer`) in order, as the MQTT path does, and a fake
//! `bitcoind -regtest` serves real mined blocks. What only the relay and the hsmd face decide is
//! tested here: fairness with CLN's requests, the request bound, and when following starts.
//! The follower's own behaviour (reorgs, bad blocks, bitcoind outages, restarts) is tested
//! without the relay in `crates/chain/tests/chain_follow.rs`.
//!
//! No test sleeps to synchronise: each waits (with a bound) for the follower's status or the
//! signer's answers.

#[path = "../../chain/tests/common/mod.rs"]
mod chain_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bitcoin::Network;
use chain_common::{
    fake, fast_follower, init_logs, init_request, logged_in, temp_dir, trace_requests, wait_status, wait_synced,
    TempDir, TestSigner,
};
use sphinx_broker::pin::PinStore;
use sphinx_broker::relay::{self, LinkEvent, PublishError, RelayConfig, RelayHandle, SignerLink};
use sphinx_chain::signer::SignerChain;
use sphinx_chain::{self as chain, BitcoindSettings, FollowerConfig, FollowerHandle, Phase};
use sphinx_wire::serial::{Reply, Request};
use sphinx_wire::{error_report, ClientContext};
use tokio::sync::{mpsc, watch};

/// A `SignerLink` that runs every published request through the signer on its own thread, in
/// publish order, and reports the reply (or refusal) back to the relay.
struct SignerBehindLink {
    jobs: std::sync::mpsc::Sender<Vec<u8>>,
}

impl SignerLink for SignerBehindLink {
    fn publish(&self, _topic: &str, payload: bytes::Bytes) -> Result<(), PublishError> {
        let payload = payload.to_vec();
        self.jobs.send(payload).map_err(|_| PublishError::Closed)
    }
    fn disconnect(&self, _identity: &str) {}
}

struct Harness {
    relay: RelayHandle,
    signer: Arc<TestSigner>,
    init_done: watch::Sender<bool>,
    _dir: TempDir,
}

impl Harness {
    /// Relay + signer, signer connected, `hsmd_init` done.
    async fn new(name: &str) -> Harness {
        Self::with_timeout(name, Duration::from_secs(60)).await
    }

    async fn with_timeout(name: &str, request_timeout: Duration) -> Harness {
        let h = Self::uninitialised(name, request_timeout).await;
        h.relay.call(ClientContext::ROOT, init_request()).await.expect("hsmd_init");
        h
    }

    /// Relay and connected signer, before lightningd's `hsmd_init`.
    async fn uninitialised(name: &str, request_timeout: Duration) -> Harness {
        init_logs();
        let dir = temp_dir(name);
        let signer = Arc::new(TestSigner::new(&dir.0, false));
        let (events, ev_rx) = mpsc::channel(4096);
        let (jobs_tx, jobs_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        {
            let (signer, events, id) = (signer.clone(), events.clone(), signer.node_hex.clone());
            std::thread::spawn(move || {
                while let Ok(frame) = jobs_rx.recv() {
                    let Ok(req) = Request::decode(&frame) else { continue };
                    let ev = match signer.handle(&req) {
                        None => continue, // "disconnected": the relay resends on hello
                        Some(Ok(reply)) => LinkEvent::Reply(
                            id.clone(),
                            Reply { seq: reply.seq, message: reply.message }.encode().into(),
                        ),
                        Some(Err(text)) => LinkEvent::Error(id.clone(), error_report::encode(req.seq, &text)),
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
            failover: Duration::from_secs(10),
            waiting_log_interval: Duration::from_secs(3600),
        };
        let relay = relay::spawn(cfg, Arc::new(SignerBehindLink { jobs: jobs_tx }), ev_rx, pin);
        events.send(LinkEvent::Hello(signer.node_hex.clone())).await.unwrap();
        let (init_done, _) = watch::channel(false);
        Harness { relay, signer, init_done, _dir: dir }
    }

    /// Starts the follower against `settings` (fast polling, heartbeat on every poll).
    fn follow(&self, settings: BitcoindSettings) -> FollowerHandle {
        let h = chain::spawn(fast_follower(settings, None), self.relay.clone(), self.init_done.subscribe());
        self.init_done.send_replace(true);
        h
    }

    fn chain(&self) -> SignerChain<RelayHandle> {
        SignerChain::new(self.relay.clone())
    }

    fn types(&self) -> Vec<u16> {
        self.signer.types()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_cln_requests_keep_flowing_during_1000_block_catch_up() {
    let h = Harness::new("catchup").await;
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

/// A signer that stalls past the request bound: the follower's call fails, it backs off, reads
/// the signer's tip again and carries on; no block is skipped or added twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_slow_signer_timeouts_are_retried_from_the_signers_tip() {
    let h = Harness::with_timeout("slow", Duration::from_millis(300)).await;
    let btc = fake(true, None).await;
    btc.mine(5);
    // The third AddBlock takes longer than the relay's bound.
    h.signer.stall_once(2005, Duration::from_millis(900));
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

/// The wiring the broker uses: the follower waits for `HsmdServer::init_done()`, i.e. until a
/// signer has answered lightningd's `hsmd_init` on fd 3, then follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_follower_starts_when_lightningds_init_is_answered() {
    use std::io::{Read, Write};
    let h = Harness::uninitialised("wiring", Duration::from_secs(60)).await;
    let btc = fake(true, None).await;
    btc.mine(3);
    let server = Arc::new(
        sphinx_broker::hsmd::HsmdServer::new(
            h.relay.clone(),
            Network::Regtest,
            sphinx_wire::hsmd::ClnRelease::V25_12,
            None,
            false,
        )
        .unwrap(),
    );
    let mut cfg = FollowerConfig::new(logged_in(&btc), Network::Regtest);
    cfg.poll_interval = Duration::from_millis(20);
    let mut f = chain::spawn(cfg, h.relay.clone(), server.init_done());
    let (mut lightningd, hsmd_end) = std::os::unix::net::UnixStream::pair().unwrap();
    let serving = tokio::spawn(server.clone().serve_root(hsmd_end));
    wait_status(&mut f, "waiting for init", |s| s.phase == Phase::WaitingForInit).await;
    assert!(h.types().is_empty(), "no chain request before hsmd_init");
    // lightningd sends hsmd_init on fd 3 and reads the reply.
    let init = init_request();
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
