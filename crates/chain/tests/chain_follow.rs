//! Chain following end to end without the broker: a fake `bitcoind -regtest`
//! (crates/fake-bitcoind) serving real mined blocks, the follower, and a real VLS signer
//! (`sphinx_signer::Signer`) behind a [`ChainLink`] that calls it directly. The same follower
//! behind the broker's relay is tested in `crates/broker/tests/chain_relay.rs`.
//!
//! No test sleeps to synchronise: each waits (with a bound) for the follower's status or the
//! signer's answers.

mod common;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use bitcoin::hash_types::FilterHeader;
use bitcoin::hashes::Hash;
use bitcoin::key::Keypair;
use bitcoin::secp256k1::Secp256k1;
use bitcoin::{Block, Transaction, Witness};
use common::{
    fake, fast_follower, init_logs, init_request, logged_in, settings, temp_dir, trace_requests, wait_status,
    wait_synced, TempDir, TestSigner,
};
use fake_bitcoind::FakeBitcoind;
use sphinx_chain::signer::{SignerCallError, SignerChain};
use sphinx_chain::{self as chain, BitcoindSettings, ChainLink, FollowerHandle};
use sphinx_wire::serial::Request;
use sphinx_wire::ClientContext;
use tokio::sync::watch;
use txoo::filter::BlockSpendFilter;
use txoo::proof::TxoProof;
use txoo::util::sign_attestation;
use txoo::Attestation;

// ---------------------------------------------------------------- the signer behind the link

/// The signer's refusal (or absence), as the link reports it.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "signer refused the request: {}", self.0)
    }
}

impl std::error::Error for Refused {}

/// A [`ChainLink`] that hands each request to the signer in this process, numbered as the
/// broker numbers them.
#[derive(Clone)]
struct DirectLink {
    signer: Arc<TestSigner>,
    next_seq: Arc<AtomicU16>,
}

impl DirectLink {
    /// One request with its connection's context, answered by the signer (on a blocking thread:
    /// it may fsync).
    async fn call(&self, ctx: ClientContext, message: Vec<u8>) -> Result<Vec<u8>, Refused> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let req = Request { seq, peer_id: ctx.peer_id, dbid: ctx.dbid, message };
        let signer = self.signer.clone();
        match tokio::task::spawn_blocking(move || signer.handle(&req)).await.unwrap() {
            Some(Ok(reply)) => Ok(reply.message),
            Some(Err(text)) => Err(Refused(text)),
            None => Err(Refused("signer not running".into())),
        }
    }
}

impl ChainLink for DirectLink {
    type Error = Refused;

    fn request(&self, msg: Vec<u8>) -> impl Future<Output = Result<Vec<u8>, Refused>> + Send {
        self.call(ClientContext::ROOT, msg)
    }
}

struct Harness {
    link: DirectLink,
    init_done: watch::Sender<bool>,
    _dir: TempDir,
}

impl Harness {
    /// A signer (in memory, or on disk), initialised with lightningd's `hsmd_init`.
    async fn new(name: &str, on_disk: bool) -> Harness {
        init_logs();
        let dir = temp_dir(name);
        let signer = Arc::new(TestSigner::new(&dir.0, on_disk));
        let link = DirectLink { signer, next_seq: Arc::new(AtomicU16::new(0)) };
        link.call(ClientContext::ROOT, init_request()).await.expect("hsmd_init");
        let (init_done, _) = watch::channel(false);
        Harness { link, init_done, _dir: dir }
    }

    /// Starts the follower against `settings` (fast polling, heartbeat on every poll).
    fn follow(&self, settings: BitcoindSettings) -> FollowerHandle {
        self.follow_with_cache(settings, None)
    }

    fn follow_with_cache(&self, settings: BitcoindSettings, cache: Option<PathBuf>) -> FollowerHandle {
        let h = chain::spawn(fast_follower(settings, cache), self.link.clone(), self.init_done.subscribe());
        self.init_done.send_replace(true);
        h
    }

    fn chain(&self) -> SignerChain<DirectLink> {
        SignerChain::new(self.link.clone())
    }

    fn types(&self) -> Vec<u16> {
        self.link.signer.types()
    }
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
    let op = chain::fetch_heartbeat(h.link.clone()).await.unwrap();
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
    assert!(matches!(err, SignerCallError::Link { source: Refused(_), .. }), "{err}");
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
async fn chain_tracker_state_persists_across_signer_restart() {
    let h = Harness::new("persist", true).await;
    let btc = fake(true, None).await;
    btc.mine(20);
    let mut f = h.follow(logged_in(&btc));
    wait_synced(&mut f, btc.tip()).await;
    // The signer process "restarts": state reopened from its redb directory.
    h.link.signer.restart();
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
        let reply = h.link.call(ctx, msg).await.unwrap_or_else(|e| panic!("trace request {ty}: {e}"));
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

/// A [`ChainLink`] that panics on the first `AddBlock` after [`PanicOnce::arm`]: a bug anywhere in
/// the follower's task (here in the link, which is outside code to the follower).
#[derive(Clone)]
struct PanicOnce {
    inner: DirectLink,
    armed: Arc<std::sync::atomic::AtomicBool>,
}

impl PanicOnce {
    fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }
}

impl ChainLink for PanicOnce {
    type Error = Refused;

    fn request(&self, msg: Vec<u8>) -> impl Future<Output = Result<Vec<u8>, Refused>> + Send {
        let add_block = msg.get(..2) == Some(&2005u16.to_be_bytes()[..]);
        let panic_now = add_block && self.armed.swap(false, Ordering::SeqCst);
        let inner = self.inner.clone();
        async move {
            if panic_now {
                panic!("injected panic in the signer link");
            }
            inner.call(ClientContext::ROOT, msg).await
        }
    }
}

/// The follower's task panics: it is restarted, follows new blocks again, and the failure is
/// reported in its status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_follower_restarts_after_its_task_panics_and_reports_it() {
    let h = Harness::new("panic", false).await;
    let btc = fake(true, None).await;
    btc.mine(5);
    let link = PanicOnce { inner: h.link.clone(), armed: Default::default() };
    let mut f = chain::spawn(fast_follower(logged_in(&btc), None), link.clone(), h.init_done.subscribe());
    h.init_done.send_replace(true);
    wait_synced(&mut f, btc.tip()).await;
    let failures_before = f.status.borrow().failures_total;

    link.arm();
    btc.mine(3);
    let s = wait_synced(&mut f, btc.tip()).await;
    assert_eq!(h.chain().tip().await.unwrap(), btc.tip(), "the signer follows new blocks again");
    assert!(s.failures_total > failures_before, "the failure is counted: {s:?}");
    assert_eq!(s.blocks_added, 8, "each block added once: {s:?}");
    assert_eq!(s.restarts, 1, "one restart: {s:?}");
    let failure = s.last_failure.expect("the failure is kept after recovery");
    assert!(failure.restarted && failure.text.contains("injected panic in the signer link"), "{failure:?}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(failure.time <= now && failure.time + 600 > now, "failure time {} (now {now})", failure.time);
    assert_eq!(s.last_error, None, "recovered: no current error");
    btc.mine(2);
    wait_synced(&mut f, btc.tip()).await;
    f.task.abort();
}

/// A hostile answer that used to panic the follower's task (a chunk size whose sum with the
/// body so far overflows): an error, retried; the follower keeps following.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_follower_survives_a_bitcoind_answer_that_overflows_the_chunk_arithmetic() {
    let h = Harness::new("hostile", false).await;
    let btc = fake(true, None).await;
    btc.mine(3);
    let mut f = h.follow(logged_in(&btc));
    wait_synced(&mut f, btc.tip()).await;
    btc.answer_raw_once(
        "getblock",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\nffffffffffffffff\r\n"
            .to_vec(),
    );
    btc.mine(2);
    let s = wait_synced(&mut f, btc.tip()).await;
    assert_eq!(btc.raw_answers_pending(), 0, "the hostile answer was sent");
    assert!(s.failures_total >= 1, "the bad answer is counted as a failure: {s:?}");
    assert_eq!(s.restarts, 0, "an error, not a panic: {s:?}");
    let failure = s.last_failure.expect("the failure is kept after recovery");
    assert!(!failure.restarted && failure.text.contains("getblock"), "{failure:?}");
    assert_eq!(h.chain().tip().await.unwrap(), btc.tip());
    f.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_catch_up_reports_progress_then_clears_it() {
    let h = Harness::new("catch-up-progress", false).await;
    let btc = fake(true, None).await;
    btc.mine(150);
    let mut f = h.follow(logged_in(&btc));
    // Mid-way: how far, how fast, how long still.
    let s = wait_status(&mut f, "catch-up progress with a rate", |s| {
        s.catch_up.as_ref().is_some_and(|c| c.blocks_done >= 20 && c.behind > 0 && c.elapsed_ms > 0)
    })
    .await;
    let c = s.catch_up.unwrap();
    assert_eq!(s.phase, sphinx_chain::Phase::CatchingUp);
    assert_eq!((c.from_height, c.target_height), (0, 150));
    assert_eq!(c.blocks_done + c.behind, 150, "{c:?}");
    assert!(c.blocks_per_sec() > 0.0 && c.eta_secs().is_some(), "{c:?}");
    assert!(c.fraction() > 0.0 && c.fraction() < 1.0, "{c:?}");
    // At the tip: no catch-up any more.
    let s = wait_synced(&mut f, btc.tip()).await;
    assert_eq!(s.catch_up, None);
    f.task.abort();
}
