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
//! [`ChainLink`]) and [`follower`] (the loop).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod follower;
pub mod rpc;
pub mod signer;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bitcoin::{BlockHash, Network};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info};

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
    /// Bound on one bitcoind call.
    pub rpc_timeout: Duration,
    /// Where recent spend-filter headers are kept across restarts (`None`: recomputed from
    /// genesis or txoo's latest checkpoint after a restart).
    pub filter_cache: Option<PathBuf>,
}

impl FollowerConfig {
    /// Defaults: poll every 2 s on regtest and 30 s elsewhere, heartbeat every minute, backoff
    /// 0.5 s doubling to 30 s, 30 s per bitcoind call, no filter-header file.
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
            filter_cache: None,
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

/// The follower's state, for logs, tests and an operator status endpoint.
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
    /// Failed steps since start.
    pub failures_total: u64,
    /// The last failure, while it lasts.
    pub last_error: Option<String>,
    /// The latest signed heartbeat from the signer.
    pub heartbeat: Option<Heartbeat>,
}

/// A running follower.
pub struct FollowerHandle {
    /// Its status, updated as it goes.
    pub status: watch::Receiver<FollowerStatus>,
    /// The task (runs until aborted; ends by itself only when chain tracking is off or
    /// lightningd never got an `hsmd_init` answer).
    pub task: JoinHandle<()>,
}

/// Starts following bitcoind for the signer behind `link`, once `init_done` becomes true (the
/// broker sets it when a signer has answered lightningd's `hsmd_init`).
///
/// With no URL configured, it logs that chain tracking is off and ends. Settings that cannot
/// work (bad URL) are logged as an error and the task ends (check them at start-up with
/// [`BitcoindSettings::check`]).
pub fn spawn<L: ChainLink>(cfg: FollowerConfig, link: L, init_done: watch::Receiver<bool>) -> FollowerHandle {
    let (tx, rx) = watch::channel(FollowerStatus::default());
    let Some(url) = cfg.settings.url.clone() else {
        info!("no bitcoind configured: chain tracking is off (the signer's tracker is not fed)");
        return FollowerHandle { status: rx, task: tokio::spawn(async {}) };
    };
    let ep = match rpc::parse_endpoint(&url, cfg.settings.cookie_file.clone(), cfg.network) {
        Ok(ep) => ep,
        Err(e) => {
            error!("chain tracking disabled: {e}");
            tx.send_modify(|s| s.last_error = Some(e.to_string()));
            return FollowerHandle { status: rx, task: tokio::spawn(async move { drop(tx) }) };
        }
    };
    info!(host = %ep.host, port = ep.port, cookie = matches!(ep.login, rpc::Login::Cookie(_)), "chain tracking configured");
    let client = rpc::RpcClient::new(ep, cfg.rpc_timeout);
    let f = follower::Follower::new(cfg, client, signer::SignerChain::new(link), tx);
    FollowerHandle { status: rx, task: tokio::spawn(f.run(init_done)) }
}

/// Fetches the signer's latest signed heartbeat (for the operator), verified against the node's
/// heartbeat key.
pub async fn fetch_heartbeat<L: ChainLink>(link: L) -> Result<Heartbeat, signer::SignerCallError<L::Error>> {
    let chain = signer::SignerChain::new(link);
    let node = chain.node_info().await?;
    chain.heartbeat(Some(&node.heartbeat_key)).await
}
