//! Chain tracking: follows bitcoind and feeds a VLS signer's chain tracker (see docs/chain.md).
//!
//! Once the signer is initialised, the follower ([`spawn`]) reads the signer's tip (`TipInfo`),
//! walks bitcoind's best chain from there (`getblockchaininfo`, `getblockhash`,
//! `getblock <hash> 0`, `getblockheader <hash> false`) and sends each block to the signer with a
//! txoo proof (`ForwardWatches` + `AddBlock`), takes reorganised blocks off (`ReverseWatches` +
//! `RemoveBlock`), and, when at the tip, fetches a signed heartbeat (`GetHeartbeat`).
//!
//! The signer is reached through a [`ChainLink`]: one message out, its reply back, awaited before
//! the next. The broker implements it with its relay (so chain traffic interleaves with CLN's
//! requests in the relay's FIFO queue); tests implement it with an in-process signer.
//!
//! The crate is [`rpc`] (bitcoind JSON-RPC client), [`signer`] (the chain messages over a
//! [`ChainLink`]) and [`follower`] (the loop). [`spawn`] runs the loop under a supervisor: a
//! failed step is retried by the loop itself, and a panic anywhere in its task (a bug, or one in
//! the link) restarts it from the signer's tip after a backoff. Both are logged, counted and
//! shown in [`FollowerStatus`] (a `watch`, for the operator API and a metrics exporter).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod follower;
pub mod rpc;
pub mod signer;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitcoin::{BlockHash, Network};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info};

use crate::follower::Backoff;

pub use rpc::RpcLimits;
pub use signer::Heartbeat;

/// How chain messages reach the signer: one request, one reply (the seam between this crate and
/// whatever carries requests to the signer).
pub trait ChainLink: Send + Sync + 'static {
    /// Why a request got no reply (for the broker's relay: refused, timed out, relay stopped).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Sends `msg` (a VLS message: type + body) to the signer as a request of lightningd's root
    /// connection, and returns the signer's reply (type + body).
    fn request(&self, msg: Vec<u8>) -> impl Future<Output = Result<Vec<u8>, Self::Error>> + Send;
}

/// A shared link is a link (the supervisor keeps one to hand to each restarted follower).
impl<L: ChainLink> ChainLink for Arc<L> {
    type Error = L::Error;

    fn request(&self, msg: Vec<u8>) -> impl Future<Output = Result<Vec<u8>, Self::Error>> + Send {
        (**self).request(msg)
    }
}

/// Where bitcoind is and how to log in (the `[bitcoind]` table of the broker's config file).
/// Both keys are unset by default: chain tracking is off.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BitcoindSettings {
    /// JSON-RPC URL, optionally with `user:password@` (e.g. `http://user:pass@127.0.0.1:18443`).
    pub url: Option<String>,
    /// bitcoind's `.cookie` file, used when the URL carries no credentials.
    pub cookie_file: Option<std::path::PathBuf>,
}

impl BitcoindSettings {
    /// Whether chain following is configured (a URL is set).
    pub fn enabled(&self) -> bool {
        self.url.is_some()
    }

    /// Checks the settings without contacting bitcoind (for a fail-fast start-up check).
    pub fn check(&self, network: Network) -> Result<(), rpc::RpcError> {
        match &self.url {
            Some(url) => rpc::parse_endpoint(url, self.cookie_file.clone(), network).map(|_| ()),
            None => Ok(()),
        }
    }
}

/// Everything the follower needs besides the [`ChainLink`].
#[derive(Clone, Debug)]
pub struct FollowerConfig {
    /// bitcoind's URL and login.
    pub settings: BitcoindSettings,
    /// The network the broker (and lightningd) runs on; bitcoind must be on it too.
    pub network: Network,
    /// How often bitcoind is polled for new blocks once the signer is at its tip.
    pub poll_interval: Duration,
    /// How often a signed heartbeat is fetched from the signer while at the tip.
    pub heartbeat_interval: Duration,
    /// First retry delay after a failure; doubles on each further failure.
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Bound on one bitcoind call (connect, request and the whole reply).
    pub rpc_timeout: Duration,
    /// Byte bounds on each bitcoind reply (head, header lines, body).
    pub rpc_limits: rpc::RpcLimits,
    /// Where recent spend-filter headers are kept across restarts (`None`: recomputed from
    /// genesis or txoo's latest checkpoint after a restart).
    pub filter_cache: Option<PathBuf>,
    /// During a catch-up, the progress (blocks behind, rate, time left) is logged at most this
    /// often. Default 10 s.
    pub progress_log_interval: Duration,
}

impl FollowerConfig {
    /// Defaults: poll every 2 s on regtest and 30 s elsewhere, heartbeat every minute, backoff
    /// 0.5 s doubling to 30 s, 30 s per bitcoind call, [`rpc::RpcLimits::default`] per reply,
    /// no filter-header file.
    pub fn new(settings: BitcoindSettings, network: Network) -> FollowerConfig {
        let poll = if network == Network::Regtest { Duration::from_secs(2) } else { Duration::from_secs(30) };
        FollowerConfig {
            settings,
            network,
            poll_interval: poll,
            heartbeat_interval: Duration::from_secs(60),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            rpc_timeout: Duration::from_secs(30),
            rpc_limits: rpc::RpcLimits::default(),
            filter_cache: None,
            progress_log_interval: Duration::from_secs(10),
        }
    }

    /// Keeps the filter-header cache in `data_dir/chain-filter-headers`.
    pub fn with_data_dir(mut self, data_dir: &Path) -> FollowerConfig {
        self.filter_cache = Some(data_dir.join("chain-filter-headers"));
        self
    }
}

/// What the follower is doing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    /// No bitcoind configured.
    #[default]
    Disabled,
    /// Waiting until a signer has answered `hsmd_init`.
    WaitingForInit,
    /// First contact with bitcoind and the signer.
    Starting,
    /// Sending blocks; the signer is behind bitcoind.
    CatchingUp,
    /// The signer is at bitcoind's tip.
    Synced,
    /// The last step failed; retrying after a backoff.
    Retrying,
}

impl Phase {
    /// Its name in the operator API (`disabled`, `waiting_for_init`, `starting`, `catching_up`,
    /// `synced`, `retrying`).
    pub fn name(self) -> &'static str {
        match self {
            Phase::Disabled => "disabled",
            Phase::WaitingForInit => "waiting_for_init",
            Phase::Starting => "starting",
            Phase::CatchingUp => "catching_up",
            Phase::Synced => "synced",
            Phase::Retrying => "retrying",
        }
    }
}

/// A failure of the follower, kept after it recovers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// What went wrong (the error, or the panic message of a restarted task).
    pub text: String,
    /// When (Unix seconds).
    pub time: u64,
    /// Whether the follower's task panicked and was restarted (otherwise a step failed and was
    /// retried).
    pub restarted: bool,
}

/// A catch-up in progress: the signer's tracker was more than one block behind bitcoind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatchUp {
    /// The signer's height when the catch-up began.
    pub from_height: u32,
    /// bitcoind's height as last seen.
    pub target_height: u32,
    /// Blocks the signer is behind bitcoind now.
    pub behind: u32,
    /// Blocks added since the catch-up began.
    pub blocks_done: u32,
    /// Milliseconds since the catch-up began.
    pub elapsed_ms: u64,
}

impl CatchUp {
    /// Blocks added per second since the catch-up began (0 before the first millisecond).
    pub fn blocks_per_sec(&self) -> f64 {
        if self.elapsed_ms == 0 {
            return 0.0;
        }
        self.blocks_done as f64 * 1000.0 / self.elapsed_ms as f64
    }

    /// Seconds left at that rate, once there is a rate.
    pub fn eta_secs(&self) -> Option<u64> {
        let rate = self.blocks_per_sec();
        (rate > 0.0).then(|| (self.behind as f64 / rate).ceil() as u64)
    }

    /// How far along, 0.0 ..= 1.0.
    pub fn fraction(&self) -> f64 {
        let total = self.blocks_done as u64 + self.behind as u64;
        if total == 0 {
            return 1.0;
        }
        self.blocks_done as f64 / total as f64
    }
}

/// The follower's state, for logs, tests, the operator API and a metrics exporter (the counters
/// only grow while the broker runs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FollowerStatus {
    /// What it is doing.
    pub phase: Phase,
    /// The signer's tracker tip as last seen (height, hash).
    pub signer_tip: Option<(u32, BlockHash)>,
    /// bitcoind's best block as last seen.
    pub bitcoind_tip: Option<(u32, BlockHash)>,
    /// Blocks added to the signer's tracker since start.
    pub blocks_added: u64,
    /// Blocks removed (reorgs) since start.
    pub blocks_removed: u64,
    /// Failed steps in a row (0 when the last step worked).
    pub consecutive_failures: u32,
    /// Failures since start (failed steps and restarts).
    pub failures_total: u64,
    /// Times the follower's task panicked and was restarted, since start.
    pub restarts: u64,
    /// The current failure, while it lasts (cleared by the next successful step).
    pub last_error: Option<String>,
    /// The most recent failure and its time, kept after recovery.
    pub last_failure: Option<Failure>,
    /// The latest signed heartbeat from the signer.
    pub heartbeat: Option<Heartbeat>,
    /// The catch-up in progress, while the signer is more than one block behind (`None` once it
    /// is at bitcoind's tip).
    pub catch_up: Option<CatchUp>,
}

/// A running follower.
pub struct FollowerHandle {
    /// Its status, updated as it goes.
    pub status: watch::Receiver<FollowerStatus>,
    /// The supervisor's task (runs until aborted, which stops the follower too; ends by itself
    /// only when chain tracking is off or lightningd never got an `hsmd_init` answer).
    pub task: JoinHandle<()>,
}

/// Starts following bitcoind for the signer behind `link`, once `init_done` becomes true (the
/// broker sets it when a signer has answered lightningd's `hsmd_init`).
///
/// With no URL configured, it logs that chain tracking is off and ends. Settings that cannot
/// work (bad URL) are logged as an error and the task ends (check them at start-up with
/// [`BitcoindSettings::check`]).
pub fn spawn<L: ChainLink>(cfg: FollowerConfig, link: L, init_done: watch::Receiver<bool>) -> FollowerHandle {
    spawn_reporting(cfg, link, init_done, watch::channel(FollowerStatus::default()).0)
}

/// [`spawn`], reporting into `status` (a channel made before the follower, e.g. so that the
/// operator API can hold its receiver from the start).
pub fn spawn_reporting<L: ChainLink>(
    cfg: FollowerConfig,
    link: L,
    init_done: watch::Receiver<bool>,
    status: watch::Sender<FollowerStatus>,
) -> FollowerHandle {
    let rx = status.subscribe();
    let Some(url) = cfg.settings.url.clone() else {
        info!("no bitcoind configured: chain tracking is off (the signer's tracker is not fed)");
        status.send_modify(|s| s.phase = Phase::Disabled);
        return FollowerHandle { status: rx, task: tokio::spawn(async {}) };
    };
    let ep = match rpc::parse_endpoint(&url, cfg.settings.cookie_file.clone(), cfg.network) {
        Ok(ep) => ep,
        Err(e) => {
            error!("chain tracking disabled: {e}");
            let failure = Failure { text: e.to_string(), time: sphinx_wire::unix_now(), restarted: false };
            status.send_modify(|s| {
                s.phase = Phase::Disabled;
                s.last_error = Some(failure.text.clone());
                s.last_failure = Some(failure);
            });
            return FollowerHandle { status: rx, task: tokio::spawn(async move { drop(status) }) };
        }
    };
    info!(host = %ep.host, port = ep.port, cookie = matches!(ep.login, rpc::Login::Cookie(_)), "chain tracking configured");
    status.send_modify(|s| s.phase = Phase::WaitingForInit);
    FollowerHandle { status: rx, task: tokio::spawn(supervise(cfg, ep, Arc::new(link), init_done, status)) }
}

/// Aborts the task when dropped (so that aborting the supervisor stops the follower too).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The text of a panic payload.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> &str {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => s,
        (_, Some(s)) => s,
        _ => "(no message)",
    }
}

/// Runs the follower in its own task and starts a fresh one (new connection, signer's tip read
/// again) after a backoff whenever that task panics. The counters in `status` carry over.
async fn supervise<L: ChainLink>(
    cfg: FollowerConfig,
    ep: rpc::Endpoint,
    link: Arc<L>,
    init_done: watch::Receiver<bool>,
    status: watch::Sender<FollowerStatus>,
) {
    let mut backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max);
    loop {
        let client = rpc::RpcClient::with_limits(ep.clone(), cfg.rpc_timeout, cfg.rpc_limits);
        let f = follower::Follower::new(cfg.clone(), client, signer::SignerChain::new(link.clone()), status.clone());
        let started = Instant::now();
        let mut task = AbortOnDrop(tokio::spawn(f.run(init_done.clone())));
        let payload = match (&mut task.0).await {
            Ok(()) => return,
            Err(e) if e.is_panic() => e.into_panic(),
            Err(_) => return, // cancelled: the runtime is shutting down
        };
        if started.elapsed() >= cfg.backoff_max {
            // It ran for a while: this is not a crash loop.
            backoff.reset();
        }
        let delay = backoff.next_delay();
        let text = format!("the chain follower's task panicked: {}", panic_text(payload.as_ref()));
        let restarts = status.borrow().restarts + 1;
        error!(restarts, restart_in = ?delay, "{text}; restarting it from the signer's tip");
        let failure = Failure { text: text.clone(), time: sphinx_wire::unix_now(), restarted: true };
        status.send_modify(|s| {
            s.phase = Phase::Retrying;
            s.restarts = restarts;
            s.failures_total += 1;
            s.consecutive_failures = s.consecutive_failures.saturating_add(1);
            s.last_error = Some(text);
            s.last_failure = Some(failure);
        });
        tokio::time::sleep(delay).await;
    }
}

/// Fetches the signer's latest signed heartbeat (for the operator), verified against the node's
/// heartbeat key.
pub async fn fetch_heartbeat<L: ChainLink>(link: L) -> Result<Heartbeat, signer::SignerCallError<L::Error>> {
    let chain = signer::SignerChain::new(link);
    let node = chain.node_info().await?;
    chain.heartbeat(Some(&node.heartbeat_key)).await
}
