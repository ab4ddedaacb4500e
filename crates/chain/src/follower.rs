//! The chain follower: brings the signer's tracker to bitcoind's best chain, one block at a time.
//!
//! Each step asks bitcoind for the block after the signer's tip. If it builds on the tip, it is
//! checked (proof of work, merkle root, witness commitment) and added with a txoo proof; if the
//! tip is no longer in bitcoind's chain, the tip is removed (a reorg is followed block by block:
//! `RemoveBlock`s down to the fork point, then `AddBlock`s). When the signer is at bitcoind's
//! tip, the follower asks for a signed heartbeat now and then and polls bitcoind.
//!
//! Failures (bitcoind down or warming up, a bad or oversized reply, bad login, a refused block, a
//! slow or absent signer) are logged and retried with exponential backoff; after any failure the
//! signer's tip is read again, so the follower never acts on a stale idea of the signer's state.
//! A panic ends the task; the supervisor in `lib.rs` starts a new follower.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bitcoin::hash_types::FilterHeader;
use bitcoin::hashes::Hash;
use bitcoin::key::Keypair;
use bitcoin::secp256k1::{All, Secp256k1};
use bitcoin::{Block, BlockHash, Network};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};
use txoo::filter::BlockSpendFilter;
use txoo::proof::TxoProof;
use txoo::util::sign_attestation;
use txoo::Attestation;

use crate::rpc::{chain_name, RpcClient, RpcError};
use crate::signer::{NodeInfo, SignerCallError, SignerChain};
use crate::{CatchUp, ChainLink, Failure, FollowerConfig, FollowerStatus, Phase};

/// Why one step of following failed; `E` is the [`ChainLink`]'s error.
#[derive(Debug, thiserror::Error)]
pub enum FollowError<E> {
    /// bitcoind could not be asked.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The signer did not take a chain request.
    #[error("signer: {0}")]
    Signer(#[from] SignerCallError<E>),
    /// bitcoind follows another chain than the broker's network.
    #[error("bitcoind is on chain {bitcoind:?}, but the broker is configured for {expected:?}")]
    WrongChain {
        /// What bitcoind says.
        bitcoind: String,
        /// What the broker expects.
        expected: String,
    },
    /// bitcoind served a block that is not valid: refused, the signer is not asked.
    #[error("refusing block {hash} at height {height} from bitcoind: {reason}")]
    BadBlock {
        /// Height it was served at.
        height: u32,
        /// Its hash.
        hash: BlockHash,
        /// What is wrong.
        reason: String,
    },
    /// The signer's tip cannot be related to bitcoind's chain.
    #[error("{0}")]
    Unrelated(String),
    /// bitcoind is behind the signer and still syncing: nothing to do until it catches up.
    #[error("{0}")]
    Waiting(String),
}

/// Exponential backoff between retries.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// From `min`, doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max, next: min }
    }
    /// The delay to wait now; the following one is twice as long (capped).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
    /// Back to the minimum after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// What one step did.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Added,
    Removed,
    Synced,
}

/// Filter headers by block hash, with their heights; seeded with the genesis block (all-zero
/// filter header, as VLS's tracker starts) and txoo's checkpoints.
struct FilterHeaders {
    map: HashMap<BlockHash, (u32, FilterHeader)>,
    anchors: Vec<BlockHash>,
    file: Option<PathBuf>,
    dirty: bool,
}

impl FilterHeaders {
    fn new(network: Network, file: Option<PathBuf>) -> FilterHeaders {
        let mut map = HashMap::new();
        let mut anchors = Vec::new();
        let genesis = bitcoin::blockdata::constants::genesis_block(network).block_hash();
        map.insert(genesis, (0, FilterHeader::all_zeros()));
        anchors.push(genesis);
        let checkpoints: &[(u32, &str, &str, &str)] = match network {
            Network::Bitcoin => txoo::CHECKPOINTS_BITCOIN,
            Network::Testnet => txoo::CHECKPOINTS_TESTNET,
            _ => &[],
        };
        for c in checkpoints {
            // Constants compiled into txoo (it asserts them in its own tests).
            let (height, hash, fh, _) = txoo::decode_checkpoint(*c);
            map.insert(hash, (height, fh));
            anchors.push(hash);
        }
        let mut f = FilterHeaders { map, anchors, file, dirty: false };
        f.load();
        f
    }

    fn get(&self, hash: &BlockHash) -> Option<(u32, FilterHeader)> {
        self.map.get(hash).copied()
    }

    fn insert(&mut self, hash: BlockHash, height: u32, fh: FilterHeader) {
        self.map.insert(hash, (height, fh));
        self.dirty = true;
        if self.map.len() > 6000 {
            let top = self.map.values().map(|(h, _)| *h).max().unwrap_or(0);
            let anchors = self.anchors.clone();
            self.map.retain(|k, (h, _)| *h + 3000 >= top || anchors.contains(k));
        }
    }

    /// Loads `height hash filter_header` lines; a bad file is ignored (everything can be recomputed).
    fn load(&mut self) {
        let Some(path) = &self.file else { return };
        let Ok(text) = std::fs::read_to_string(path) else { return };
        let mut n = 0;
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let (Some(h), Some(b), Some(f)) = (it.next(), it.next(), it.next()) else { continue };
            let (Ok(h), Ok(b), Ok(f)) = (h.parse::<u32>(), b.parse::<BlockHash>(), f.parse::<FilterHeader>()) else {
                continue;
            };
            self.map.insert(b, (h, f));
            n += 1;
        }
        debug!(entries = n, file = %path.display(), "filter headers loaded");
    }

    /// Saves the most recent entries (atomically: temporary file, then rename).
    fn save(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let Some(path) = &self.file else { return };
        let mut entries: Vec<_> = self.map.iter().map(|(b, (h, f))| (*h, *b, *f)).collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.0));
        entries.truncate(300);
        let text: String = entries.iter().map(|(h, b, f)| format!("{h} {b} {f}\n")).collect();
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path)) {
            warn!(file = %path.display(), error = %e, "cannot save filter headers (they will be recomputed)");
        }
    }
}

/// The follower's state.
pub(crate) struct Follower<L> {
    cfg: FollowerConfig,
    rpc: RpcClient,
    signer: SignerChain<L>,
    status: watch::Sender<FollowerStatus>,
    /// What we believe the signer's tip is; `None` = ask it.
    tip: Option<(u32, BlockHash)>,
    filters: FilterHeaders,
    secp: Secp256k1<All>,
    oracle: Keypair,
    node: Option<NodeInfo>,
    last_heartbeat: Option<Instant>,
    catching_up: bool,
    /// When the current catch-up began and the signer's height then.
    catch_up_start: Option<(Instant, u32)>,
    /// When progress was last logged (rate-limited by `progress_log_interval`).
    last_progress_log: Option<Instant>,
}

impl<L: ChainLink> Follower<L> {
    pub(crate) fn new(
        cfg: FollowerConfig,
        rpc: RpcClient,
        signer: SignerChain<L>,
        status: watch::Sender<FollowerStatus>,
    ) -> Follower<L> {
        let secp = Secp256k1::new();
        // The broker attests its own filters: the signer trusts no oracle key by default, so the
        // key is only there because a txoo proof must carry an attestation (docs/chain.md).
        let oracle = Keypair::new(&secp, &mut bitcoin::secp256k1::rand::thread_rng());
        let filters = FilterHeaders::new(cfg.network, cfg.filter_cache.clone());
        Follower {
            cfg,
            rpc,
            signer,
            status,
            tip: None,
            filters,
            secp,
            oracle,
            node: None,
            last_heartbeat: None,
            catching_up: false,
            catch_up_start: None,
            last_progress_log: None,
        }
    }

    fn set(&self, f: impl FnOnce(&mut FollowerStatus)) {
        self.status.send_modify(f);
    }

    /// Follows until the task is dropped.
    pub(crate) async fn run(mut self, mut init_done: watch::Receiver<bool>) {
        if !*init_done.borrow() {
            self.set(|s| s.phase = Phase::WaitingForInit);
        }
        if init_done.wait_for(|v| *v).await.is_err() {
            info!("hsmd_init was never answered; chain follower not started");
            return;
        }
        info!(network = %self.cfg.network, "signer initialised: following bitcoind");
        self.set(|s| s.phase = Phase::Starting);
        let mut backoff = Backoff::new(self.cfg.backoff_min, self.cfg.backoff_max);
        // After a restart, the failure that caused it counts until the next success.
        let mut failures = self.status.borrow().consecutive_failures;
        loop {
            match self.step().await {
                Ok(step) => {
                    if failures > 0 {
                        info!(after_failures = failures, "chain following recovered");
                        failures = 0;
                    }
                    backoff.reset();
                    self.set(|s| {
                        s.consecutive_failures = 0;
                        s.last_error = None;
                    });
                    if step == Step::Synced {
                        self.on_synced().await;
                        tokio::time::sleep(self.cfg.poll_interval).await;
                    } else {
                        // Let CLN's callers and other tasks run between blocks.
                        tokio::task::yield_now().await;
                    }
                }
                Err(e) => {
                    failures += 1;
                    self.tip = None;
                    self.rpc_reset_if_needed(&e);
                    let delay = backoff.next_delay();
                    let text = e.to_string();
                    match &e {
                        FollowError::BadBlock { .. } | FollowError::WrongChain { .. } | FollowError::Unrelated(_) => {
                            error!(attempt = failures, retry_in = ?delay, "chain following: {text}")
                        }
                        FollowError::Rpc(RpcError::Unauthorized(_))
                        | FollowError::Rpc(RpcError::Config(_))
                        | FollowError::Rpc(RpcError::BadReply { .. }) => {
                            error!(attempt = failures, retry_in = ?delay, "chain following: {text}")
                        }
                        FollowError::Signer(SignerCallError::Link { .. })
                        | FollowError::Signer(SignerCallError::BadReply { .. }) => {
                            error!(attempt = failures, retry_in = ?delay, "chain following: {text}")
                        }
                        _ => warn!(attempt = failures, retry_in = ?delay, "chain following: {text}"),
                    }
                    let failure = Failure { text: text.clone(), time: sphinx_wire::unix_now(), restarted: false };
                    self.set(|s| {
                        s.phase = Phase::Retrying;
                        s.consecutive_failures = failures;
                        s.failures_total += 1;
                        s.last_error = Some(text);
                        s.last_failure = Some(failure);
                    });
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    fn rpc_reset_if_needed(&mut self, e: &FollowError<L::Error>) {
        if matches!(e, FollowError::Rpc(_)) {
            self.rpc.disconnect();
        }
    }

    async fn on_synced(&mut self) {
        if self.catching_up {
            self.catching_up = false;
            let done = self.catch_up_start.take();
            if let Some((h, hash)) = self.tip {
                let (blocks, secs) =
                    done.map(|(t, from)| (h.saturating_sub(from), t.elapsed().as_secs_f64())).unwrap_or_default();
                let rate = if secs > 0.0 { blocks as f64 / secs } else { 0.0 };
                info!(
                    height = h,
                    tip = %hash,
                    blocks,
                    secs = format!("{secs:.1}"),
                    blocks_per_sec = format!("{rate:.1}"),
                    "signer's chain tracker is at bitcoind's tip (catch-up done)"
                );
            }
        }
        self.filters.save();
        self.set(|s| {
            s.phase = Phase::Synced;
            s.catch_up = None;
        });
        let due = self.last_heartbeat.is_none_or(|t| t.elapsed() >= self.cfg.heartbeat_interval);
        if !due {
            return;
        }
        if self.node.is_none() {
            match self.signer.node_info().await {
                Ok(n) => self.node = Some(n),
                Err(e) => {
                    warn!("cannot get the signer's node info for heartbeats: {e}");
                    return;
                }
            }
        }
        let key = self.node.as_ref().map(|n| n.heartbeat_key);
        match self.signer.heartbeat(key.as_ref()).await {
            Ok(hb) => {
                self.last_heartbeat = Some(Instant::now());
                if hb.verified {
                    debug!(height = hb.chain_height, tip = %hb.chain_tip, "signed heartbeat");
                } else {
                    error!(height = hb.chain_height, "the signer's heartbeat signature does not verify");
                }
                self.set(|s| s.heartbeat = Some(hb));
            }
            Err(e) => warn!("cannot get a heartbeat from the signer: {e}"),
        }
    }

    /// One block added or removed, or the news that the signer is at bitcoind's tip.
    async fn step(&mut self) -> Result<Step, FollowError<L::Error>> {
        let info = self.rpc.chain_info().await?;
        let expected = chain_name(self.cfg.network);
        if info.chain != expected {
            return Err(FollowError::WrongChain { bitcoind: info.chain, expected: expected.into() });
        }
        self.set(|s| s.bitcoind_tip = Some((info.blocks, info.best)));
        let (h, tip) = match self.tip {
            Some(t) => t,
            None => {
                let t = self.signer.tip().await?;
                self.tip = Some(t);
                self.set(|s| s.signer_tip = Some(t));
                t
            }
        };
        if info.blocks > h && !self.catching_up && info.blocks - h > 1 {
            self.catching_up = true;
            self.catch_up_start = Some((Instant::now(), h));
            self.last_progress_log = Some(Instant::now());
            info!(signer = h, bitcoind = info.blocks, behind = info.blocks - h, "catching up with bitcoind");
            self.set(|s| s.phase = Phase::CatchingUp);
        }
        if self.catching_up {
            self.progress(h, info.blocks);
        }
        if info.best == tip {
            return Ok(Step::Synced);
        }
        let prev_fh = self.filter_header(h, tip).await?;
        match self.rpc.block_hash(h + 1).await? {
            Some(next) => {
                let block = self.rpc.block(&next).await?;
                if block.header.prev_blockhash == tip {
                    self.add(h + 1, block, prev_fh).await?;
                    return Ok(Step::Added);
                }
                match self.rpc.block_hash(h).await? {
                    Some(x) if x == tip => Err(FollowError::BadBlock {
                        height: h + 1,
                        hash: next,
                        reason: format!(
                            "its parent is {}, but bitcoind's block at height {h} is {tip}: broken parent link",
                            block.header.prev_blockhash
                        ),
                    }),
                    _ => self.remove(h, tip, &info).await,
                }
            }
            None => match self.rpc.block_hash(h).await? {
                Some(x) if x == tip => Ok(Step::Synced),
                _ => self.remove(h, tip, &info).await,
            },
        }
    }

    /// Reports catch-up progress in the status at every step, and in the log at most every
    /// `progress_log_interval`.
    fn progress(&mut self, height: u32, target: u32) {
        let Some((started, from)) = self.catch_up_start else { return };
        let c = CatchUp {
            from_height: from,
            target_height: target,
            behind: target.saturating_sub(height),
            blocks_done: height.saturating_sub(from),
            elapsed_ms: started.elapsed().as_millis() as u64,
        };
        if self.last_progress_log.is_none_or(|t| t.elapsed() >= self.cfg.progress_log_interval) && c.behind > 0 {
            self.last_progress_log = Some(Instant::now());
            info!(
                signer = height,
                bitcoind = target,
                behind = c.behind,
                blocks_per_sec = format!("{:.1}", c.blocks_per_sec()),
                eta_secs = ?c.eta_secs(),
                percent = format!("{:.1}", c.fraction() * 100.0),
                "catching up with bitcoind"
            );
        }
        self.set(|s| s.catch_up = Some(c));
    }

    /// The filter header of `hash` (at `height`), recomputed from the nearest known block if needed.
    async fn filter_header(&mut self, height: u32, hash: BlockHash) -> Result<FilterHeader, FollowError<L::Error>> {
        if let Some((_, fh)) = self.filters.get(&hash) {
            return Ok(fh);
        }
        let mut path = Vec::new();
        let mut cur = hash;
        let mut cur_height = height;
        let mut fh = loop {
            if let Some((_, fh)) = self.filters.get(&cur) {
                break fh;
            }
            if cur_height == 0 {
                return Err(FollowError::Unrelated(format!(
                    "the signer's chain (tip {hash} at height {height}) does not start at this network's genesis block"
                )));
            }
            let header = self.rpc.header(&cur).await.map_err(|e| match e {
                RpcError::Rpc { code: -5, .. } => FollowError::Unrelated(format!(
                    "the signer's block {cur} (height {cur_height}) is unknown to bitcoind: is bitcoind on the right chain and synced?"
                )),
                e => e.into(),
            })?;
            path.push((cur_height, cur));
            cur = header.prev_blockhash;
            cur_height -= 1;
        };
        if path.len() > 10 {
            info!(
                blocks = path.len(),
                from = cur_height + 1,
                "recomputing spend-filter headers up to the signer's tip"
            );
        }
        for (h, b) in path.into_iter().rev() {
            let block = self.rpc.block(&b).await?;
            fh = BlockSpendFilter::from_block(&block).filter_header(&fh);
            self.filters.insert(b, h, fh);
        }
        Ok(fh)
    }

    fn prove(
        &self,
        height: u32,
        block: &Block,
        prev_fh: &FilterHeader,
        fh: FilterHeader,
        watches: &(Vec<bitcoin::Txid>, Vec<bitcoin::OutPoint>),
    ) -> TxoProof {
        let att = Attestation {
            block_hash: block.block_hash(),
            block_height: height,
            filter_header: fh,
            time: sphinx_wire::unix_now(),
        };
        let signed = sign_attestation(att, &self.oracle, &self.secp);
        let pubkey = self.oracle.public_key();
        TxoProof::prove(vec![(pubkey, signed)], prev_fh, block, height, &watches.1, &watches.0)
    }

    async fn add(&mut self, height: u32, block: Block, prev_fh: FilterHeader) -> Result<(), FollowError<L::Error>> {
        let hash = block.block_hash();
        check_block(&block, self.cfg.network).map_err(|reason| FollowError::BadBlock { height, hash, reason })?;
        let watches = self.signer.forward_watches().await?;
        let fh = BlockSpendFilter::from_block(&block).filter_header(&prev_fh);
        let proof = self.prove(height, &block, &prev_fh, fh, &watches);
        self.signer.add_block(&block, proof).await?;
        self.filters.insert(hash, height, fh);
        if height % 100 == 0 {
            // A long catch-up keeps its place across a broker restart.
            self.filters.save();
        }
        self.tip = Some((height, hash));
        debug!(height, %hash, txs = block.txdata.len(), "block added to the signer's tracker");
        self.set(|s| {
            s.signer_tip = Some((height, hash));
            s.blocks_added += 1;
        });
        Ok(())
    }

    async fn remove(
        &mut self,
        height: u32,
        tip: BlockHash,
        info: &crate::rpc::ChainInfo,
    ) -> Result<Step, FollowError<L::Error>> {
        if height == 0 {
            return Err(FollowError::Unrelated(format!(
                "the signer's genesis block {tip} is not bitcoind's: wrong network?"
            )));
        }
        if info.blocks < height && (info.ibd || info.headers > info.blocks) {
            // Not a reorg: bitcoind is still syncing (initial download, reindex, catching up).
            return Err(FollowError::Waiting(format!(
                "bitcoind is behind the signer and still syncing (blocks {}, headers {}, signer at {height}); waiting",
                info.blocks, info.headers
            )));
        }
        let block = self.rpc.block(&tip).await.map_err(|e| match e {
            RpcError::Rpc { code: -5, .. } => FollowError::Unrelated(format!(
                "the signer's tip {tip} (height {height}) is unknown to bitcoind: is bitcoind on the right chain and synced?"
            )),
            e => e.into(),
        })?;
        check_block(&block, self.cfg.network).map_err(|reason| FollowError::BadBlock { height, hash: tip, reason })?;
        let prev_hash = block.header.prev_blockhash;
        let prev_header = self.rpc.header(&prev_hash).await?;
        let prev_fh = self.filter_header(height - 1, prev_hash).await?;
        let fh = BlockSpendFilter::from_block(&block).filter_header(&prev_fh);
        let watches = self.signer.reverse_watches().await?;
        let proof = self.prove(height, &block, &prev_fh, fh, &watches);
        self.signer.remove_block(&block, proof, prev_header, prev_fh).await?;
        info!(height, removed = %tip, new_tip = %prev_hash, "reorg: block removed from the signer's tracker");
        self.tip = Some((height - 1, prev_hash));
        self.set(|s| {
            s.signer_tip = Some((height - 1, prev_hash));
            s.blocks_removed += 1;
        });
        Ok(Step::Removed)
    }
}

/// Checks what a header and its transactions must satisfy before the signer sees them:
/// proof of work under the block's own target and the network's limit, merkle root, and the
/// witness commitment.
pub fn check_block(block: &Block, network: Network) -> Result<(), String> {
    let header = &block.header;
    let target = header.target();
    if target > network.params().max_attainable_target {
        return Err(format!("target {:x} is above the network's proof-of-work limit", target));
    }
    if header.validate_pow(target).is_err() {
        return Err(format!("bad proof of work: hash {} is above its target {:x}", header.block_hash(), target));
    }
    if !block.check_merkle_root() {
        return Err("the merkle root does not match the transactions".into());
    }
    if !block.check_witness_commitment() {
        return Err("the witness commitment does not match the transactions".into());
    }
    Ok(())
}
