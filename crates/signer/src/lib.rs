//! The sphinx-key signing core (hardware-agnostic): VLS handlers over durable redb state.
//!
//! A [`Signer`] owns one VLS node for one 32-byte seed. [`Signer::handle`] takes one serial
//! request (an hsmd message plus its client context and sequence number), runs it through VLS
//! inside one persister transaction, commits that transaction durably together with a dedupe
//! record of the reply, and only then returns the reply.
//!
//! Rules (see docs/signer.md):
//! - `hsmd_init` (11) and `hsmd_init2` are always answered by a fresh VLS `InitHandler` on the
//!   existing node, whenever they arrive; the last one is stored, so a reopened signer resumes
//!   with the negotiated protocol without waiting for the broker's replay.
//! - Requests with dbid 0 go to the root handler, the others to a channel handler for
//!   `(peer_id, dbid)`.
//! - A request delivered twice (same seq, same frame bytes) returns the stored reply and does not
//!   run VLS again; one that changed nothing has no record (and no commit): VLS answers it
//!   again. The last [`DEDUPE_SLOTS`] records are kept, keyed by `seq % DEDUPE_SLOTS`.
//! - Nothing from the network or the disk may crash the process: VLS panics are caught, turned
//!   into [`Error`]s, and the node is rebuilt from the persisted state without the failed
//!   request's mutations.
//! - Owner control messages ([`Signer::handle_control`], see docs/control.md) are checked
//!   against the owner key and the nonce window and committed in the same kind of transaction.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod control;
mod lss;
mod policy;
pub mod status;
mod store;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bitcoin::hashes::{sha256, Hash};
use bitcoin::secp256k1::{PublicKey, Secp256k1, SecretKey};
use bitcoin::Network;
use lightning_signer::node::{Node, NodeConfig, NodeServices};
use lightning_signer::persist::Persist;
use lightning_signer::signer::derive::key_derive;
use lightning_signer::signer::{ClockStartingTimeFactory, StartingTimeFactory};
use lightning_signer::util::clock::{Clock, ManualClock, StandardClock};
use lightning_signer::SendSync;
use serde::{Deserialize, Serialize};
use sphinx_wire::serial::{Reply, Request};
use tracing::{debug, info, warn};
use vls_persist::kvv::KVVStore;
use vls_protocol::model::PubKey;
use vls_protocol::msgs::{Message, DEFAULT_MAX_PROTOCOL_VERSION};
use vls_protocol_signer::approver::Approve;
use vls_protocol_signer::handler::{Handler, HandlerBuilder, InitHandler, RootHandler};

pub use control::{ControlAction, ControlOutcome, NONCE_KEY, POLICY_KEY};
pub use lss::{lss_value_key, Held, LssPhase, Outcome, Output, Released, StagedCommit, LSS_GROUP_MAX, MAX_QUEUED};
pub use policy::{PolicyConfig, DEFAULT_SWEEP_MIN_FEERATE_PER_KW};
pub use status::{NoIndicator, RecordingIndicator, Status, StatusIndicator};
pub use store::{LOCAL_ONLY_KEYS, WRITER_KEY};

use store::{AnyStore, Persister};

/// How many recent replies are kept for duplicate delivery (keyed by `seq % DEDUPE_SLOTS`).
pub const DEDUPE_SLOTS: u16 = 64;
/// KVV key prefix of the dedupe records (`sphinx/reply/{seq % 64}`).
pub const REPLY_KEY_PREFIX: &str = "sphinx/reply/";
/// KVV key of the last `hsmd_init` message (type + body) that completed negotiation.
pub const INIT_KEY: &str = "sphinx/init";
/// KVV key of the last LSS-backed transaction's before-images, written in that transaction
/// (docs/signer.md "Stage and commit"): it lets init-2 roll that one transaction forward or back.
pub const UNACKED_KEY: &str = "sphinx/lss-unacked";
/// KVV key of the LSS server key this device's state is backed up to (pinned at its first
/// init dance, docs/signer.md "One LSS server").
pub const LSS_SERVER_KEY: &str = "sphinx/lss-server";

/// `hsmd_client_hsmfd`: answered by the broker, never by the signer.
const CLIENT_HSMFD: u16 = 9;

/// Where the signer's notion of "now" comes from (invoice expiry, velocity control, key entropy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ClockConfig {
    /// The system clock.
    #[default]
    System,
    /// A clock stopped at this many seconds since the UNIX epoch; also fixes VLS's
    /// starting-time entropy, so two signers with the same seed and config reply identically.
    /// For tests, benchmarks and replays only.
    Fixed(u64),
}

/// Everything a [`Signer`] needs besides its seed and state directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignerConfig {
    /// Bitcoin network of the node.
    pub network: Network,
    /// Policy settings (strict by default).
    pub policy: PolicyConfig,
    /// Clock source.
    pub clock: ClockConfig,
}

impl SignerConfig {
    /// Strict policy and the system clock on `network`.
    pub fn new(network: Network) -> Self {
        SignerConfig { network, policy: PolicyConfig::default(), clock: ClockConfig::System }
    }
}

/// Why a request, or opening the signer, failed. The text says what failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The state directory cannot be created or opened.
    #[error("cannot open signer state in {path}: {reason}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The state directory belongs to another seed.
    #[error("state holds node {found}, but this seed's node is {expected}: wrong seed or wrong state directory")]
    WrongSeed {
        /// Node id in the state.
        found: String,
        /// Node id of the seed.
        expected: String,
    },
    /// The state directory belongs to another network.
    #[error("state holds a node on {found}, but the signer is configured for {expected}")]
    WrongNetwork {
        /// Network in the state.
        found: String,
        /// Configured network.
        expected: String,
    },
    /// The message is shorter than its 2-byte type.
    #[error("hsmd message of {0} bytes has no type")]
    NoType(usize),
    /// The message does not decode as the hsmd message its type says.
    #[error("cannot decode hsmd message type {msg_type} ({name}): {reason}")]
    Decode {
        /// Message type.
        msg_type: u16,
        /// Message name.
        name: String,
        /// Decoder's error.
        reason: String,
    },
    /// A message the broker must answer itself.
    #[error("hsmd message type {0} is answered by the broker, not the signer")]
    NotForSigner(u16),
    /// A request arrived before any `hsmd_init` completed.
    #[error("hsmd message type {0} ({1}) before hsmd_init")]
    NotInitialized(u16, String),
    /// VLS refused the request (policy violation or bad argument).
    #[error("VLS refused hsmd message type {msg_type} ({name}): {reason}")]
    Refused {
        /// Message type.
        msg_type: u16,
        /// Message name.
        name: String,
        /// VLS's reason.
        reason: String,
    },
    /// VLS panicked on the request; the state was reloaded from disk.
    #[error("VLS failed on hsmd message type {msg_type} ({name}): {reason} (state reloaded from disk)")]
    Panic {
        /// Message type.
        msg_type: u16,
        /// Message name.
        name: String,
        /// The panic message.
        reason: String,
    },
    /// `hsmd_init` produced no reply.
    #[error("hsmd message type {0} produced no reply")]
    NoReply(u16),
    /// Writing the state failed; the request's changes were discarded and nothing was signed.
    #[error("persisting signer state failed: {0}")]
    Persist(String),
    /// The node could not be built from the persisted state.
    #[error("signer state unavailable: {0}")]
    Unavailable(String),
    /// The MQTT payload is not a serial request frame.
    #[error("bad request frame: {0}")]
    Frame(#[from] sphinx_wire::serial::Error),
    /// LSS backup is on but this signer's state is not in sync with it (the init dance has not
    /// delivered LSS's state yet, or a conflict made it stale): it signs nothing until it is.
    #[error("not in sync with LSS ({0}): refusing to sign until the broker's init dance restores the state")]
    LssNotSynced(String),
    /// A request's state is still waiting for LSS's acknowledgement.
    #[error("a request is waiting for LSS to store its state (seq {0}); one at a time")]
    LssBusy(u16),
    /// An LSS message from the broker that does not fit (bad bytes, wrong step, bad HMAC, a state
    /// that is behind this device's or forks from it). The signer keeps its own state and signs
    /// nothing with LSS's.
    #[error("LSS: {0}")]
    Lss(String),
}

/// A failed request as reported on the `{id}/error` topic.
#[derive(Debug)]
pub struct FrameError {
    /// Sequence number of the request (read from the frame header; 0 if it is too short).
    pub seq: u16,
    /// What failed.
    pub error: Error,
}

impl FrameError {
    /// The `{id}/error` payload ([`sphinx_wire::error_report`]).
    pub fn payload(&self) -> Vec<u8> {
        sphinx_wire::error_report::encode(self.seq, &self.error.to_string())
    }
}

/// Counters, for tests and the status endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SignerStats {
    /// Requests run through VLS (including init).
    pub vls_calls: u64,
    /// Requests answered from the dedupe records without running VLS.
    pub dedupe_hits: u64,
    /// Times the node was rebuilt from persisted state after a failure.
    pub rebuilds: u64,
    /// Requests signed concurrently with others of the same batch and kept
    /// ([`Signer::set_sign_threads`]).
    pub concurrent: u64,
}

/// The record kept per dedupe slot.
#[derive(Serialize, Deserialize)]
struct ReplyRecord {
    seq: u16,
    /// sha256 of the request frame, hex.
    hash: String,
    /// The reply message (type + body), hex.
    reply: String,
}

enum Backend {
    Memory(AnyStore),
    Redb { dir: PathBuf, store: Option<AnyStore> },
}

struct Core {
    persister: Arc<Persister>,
    node: Arc<Node>,
    approver: Arc<dyn Approve>,
    root: Option<RootHandler>,
    /// The owner's limits in force (stored `sphinx/policy`, else the configured ones).
    limits: sphinx_wire::control::Policy,
    /// The state was backed up to LSS (it holds the writer key): read once per build, since
    /// only an init-2 (which rebuilds the core) brings the key, and nothing removes it.
    backed_up: bool,
}

/// The signing core: one VLS node, its persisted state, and the request rules above.
pub struct Signer {
    seed: [u8; 32],
    cfg: SignerConfig,
    backend: Backend,
    core: Option<Core>,
    node_id: PublicKey,
    node_secret: SecretKey,
    stats: SignerStats,
    /// The key that signs control messages (default: the node key).
    owner: PublicKey,
    /// Set once the owner reset the keys: the signer then refuses every request.
    reset: Option<ControlAction>,
    /// LSS backup, once the broker started the init dance (`None`: LSS off, today's behaviour).
    lss: Option<lss::LssState>,
    /// Threads a batch's independent channel requests are signed on ([`Signer::set_sign_threads`]).
    sign_threads: usize,
    /// Sign without LSS although this device's state was backed up to LSS
    /// ([`Signer::set_allow_without_lss`]).
    allow_without_lss: bool,
    /// The LSS server key the operator configured ([`Signer::set_lss_server`]).
    lss_server: Option<[u8; 33]>,
}

struct FixedStartingTime(u64);

impl SendSync for FixedStartingTime {}

impl StartingTimeFactory for FixedStartingTime {
    fn starting_time(&self) -> (u64, u32) {
        (self.0, 0)
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}

fn msg_name(msg_type: u16) -> String {
    vls_protocol::msgs::message_name_from_vec(&msg_type.to_be_bytes())
}

/// The node key pair VLS derives from `seed` on `network`.
fn node_keys(seed: &[u8; 32], network: Network) -> (PublicKey, SecretKey) {
    let style = NodeConfig::new(network).key_derivation_style;
    key_derive(style, network).node_keys(seed, &Secp256k1::new())
}

/// The node key pair of `seed` on `network` (as VLS derives it): the device key that signs
/// control responses and, unless a separate owner key is set, the owner key that signs control
/// requests (`sphinx-key ctl` uses it with the seed in the data directory).
pub fn node_keys_for_seed(seed: &[u8; 32], network: Network) -> (PublicKey, SecretKey) {
    node_keys(seed, network)
}

/// The node id (compressed public key) of `seed` on `network`, without opening any state.
pub fn node_id_for_seed(seed: &[u8; 32], network: Network) -> [u8; 33] {
    node_keys(seed, network).0.serialize()
}

/// Decodes an hsmd message (type + body); never panics.
fn decode(message: &[u8], msg_type: u16) -> Result<Message, Error> {
    match catch_unwind(|| vls_protocol::msgs::from_vec(message.to_vec())) {
        Ok(Ok(m)) => Ok(m),
        Ok(Err(e)) => Err(Error::Decode { msg_type, name: msg_name(msg_type), reason: e.to_string() }),
        Err(p) => Err(Error::Decode { msg_type, name: msg_name(msg_type), reason: panic_text(p) }),
    }
}

impl Signer {
    /// Opens (or creates) the node state in `state_dir` (vls-persist KVV on redb) for `seed`.
    pub fn open(seed: [u8; 32], state_dir: &Path, cfg: &SignerConfig) -> Result<Signer, Error> {
        let dir_err = |reason: String| Error::StateDir { path: state_dir.to_path_buf(), reason };
        std::fs::create_dir_all(state_dir).map_err(|e| dir_err(e.to_string()))?;
        if !state_dir.is_dir() {
            return Err(dir_err("not a directory".into()));
        }
        let store = open_redb(state_dir)?;
        Self::with_backend(seed, cfg, Backend::Redb { dir: state_dir.to_path_buf(), store: Some(store) })
    }

    /// Same signer with an in-memory store (the in-process oracle for tests/benchmarks).
    pub fn in_memory(seed: [u8; 32], cfg: &SignerConfig) -> Result<Signer, Error> {
        Self::with_backend(seed, cfg, Backend::Memory(AnyStore::memory()))
    }

    fn with_backend(seed: [u8; 32], cfg: &SignerConfig, backend: Backend) -> Result<Signer, Error> {
        let (node_id, node_secret) = node_keys(&seed, cfg.network);
        let mut s = Signer {
            seed,
            cfg: cfg.clone(),
            backend,
            core: None,
            node_id,
            node_secret,
            stats: SignerStats::default(),
            owner: node_id,
            reset: None,
            lss: None,
            sign_threads: 1,
            allow_without_lss: false,
            lss_server: None,
        };
        s.core = Some(s.build_core()?);
        info!(node_id = %s.node_id, initialized = s.is_initialized(), "signer opened");
        Ok(s)
    }

    /// The node id (compressed public key).
    pub fn node_id(&self) -> [u8; 33] {
        self.node_id.serialize()
    }

    /// The node id in hex (the MQTT client id and username).
    pub fn node_id_hex(&self) -> String {
        hex::encode(self.node_id())
    }

    /// A fresh MQTT login token for time `ts` (unix seconds), signed with the node key
    /// ([`sphinx_wire::token::make`]).
    pub fn login_token(&self, ts: u32) -> String {
        sphinx_wire::token::make(&self.node_secret, ts)
    }

    /// The configuration the signer runs with.
    pub fn config(&self) -> &SignerConfig {
        &self.cfg
    }

    /// True once an `hsmd_init` negotiation has completed (now or in a previous run).
    pub fn is_initialized(&self) -> bool {
        self.core.as_ref().is_some_and(|c| c.root.is_some())
    }

    /// Counters since this `Signer` was created.
    pub fn stats(&self) -> SignerStats {
        self.stats
    }

    fn services(&self, persister: Arc<Persister>, policy: &PolicyConfig) -> NodeServices {
        let (clock, starting_time_factory): (Arc<dyn Clock>, Arc<dyn StartingTimeFactory>) = match self.cfg.clock {
            ClockConfig::System => (Arc::new(StandardClock()), ClockStartingTimeFactory::new()),
            ClockConfig::Fixed(t) => {
                (Arc::new(ManualClock::new(Duration::from_secs(t))), Arc::new(FixedStartingTime(t)))
            }
        };
        NodeServices {
            validator_factory: policy.validator_factory(self.cfg.network),
            starting_time_factory,
            persister,
            clock,
            trusted_oracle_pubkeys: vec![],
        }
    }

    /// Builds the node (and the root handler, if an init was stored) from the persisted state.
    fn build_core(&mut self) -> Result<Core, Error> {
        let store = match &mut self.backend {
            Backend::Memory(s) => s.clone(),
            Backend::Redb { dir, store } => {
                if store.is_none() {
                    *store = Some(open_redb(dir)?);
                }
                store.clone().expect("just set")
            }
        };
        let persister = Arc::new(store::persister(store, self.lss.is_some()));

        // Refuse a state that belongs to another seed or network before VLS asserts on it.
        let nodes = catch_unwind(AssertUnwindSafe(|| persister.get_nodes()))
            .map_err(|p| Error::Unavailable(format!("reading nodes: {}", panic_text(p))))?
            .map_err(|e| Error::Unavailable(format!("reading nodes: {e:?}")))?;
        for (id, entry) in &nodes {
            if *id != self.node_id {
                return Err(Error::WrongSeed { found: id.to_string(), expected: self.node_id.to_string() });
            }
            if entry.network != self.cfg.network.to_string() {
                return Err(Error::WrongNetwork {
                    found: entry.network.clone(),
                    expected: self.cfg.network.to_string(),
                });
            }
        }

        // The owner's limits: stored by an UpdatePolicy, else the configured ones.
        let limits = control::stored_limits(&persister)?.unwrap_or(self.cfg.policy.limits);
        let policy = PolicyConfig { limits, ..self.cfg.policy.clone() };
        let approver = policy.approver();
        let services = self.services(persister.clone(), &policy);
        begin(&persister)?;
        let built = catch_unwind(AssertUnwindSafe(|| {
            HandlerBuilder::new(self.cfg.network, 0, services, self.seed)
                .approver(approver.clone())
                .allowlist(self.cfg.policy.allowlist.clone())
                .build()
        }));
        let init = match built {
            Ok(Ok(init)) => init,
            Ok(Err(e)) => return Err(Error::Unavailable(format!("building node: {e:?}"))),
            Err(p) => return Err(Error::Unavailable(format!("building node: {}", panic_text(p)))),
        };
        // What building wrote (a new node): the LSS restore sends it to LSS (init-2-res).
        let built_muts = persister.prepare();
        commit(&persister)?;
        if let Some(l) = self.lss.as_mut() {
            l.note_built(built_muts);
        }
        let node = init.node().clone();
        restore_velocity(&persister, &node);
        if node.get_id() != self.node_id {
            return Err(Error::WrongSeed { found: node.get_id().to_string(), expected: self.node_id.to_string() });
        }
        let backed_up = matches!(persister.get(store::WRITER_KEY), Ok(Some(_)));
        let mut core = Core { persister, node, approver, root: None, limits, backed_up };

        // Resume the last negotiated protocol.
        if let Ok(Some((_, raw))) = core.persister.get(INIT_KEY) {
            if raw.len() >= 2 {
                let t = u16::from_be_bytes([raw[0], raw[1]]);
                match decode(&raw, t).and_then(|m| run_init(&core, m, t)) {
                    Ok((true, _, init)) => core.root = Some(init.into()),
                    Ok(_) => warn!("stored hsmd_init did not complete negotiation"),
                    Err(e) => warn!("stored hsmd_init failed: {e}"),
                }
            }
        }
        Ok(core)
    }

    /// Drops the in-memory node and handlers and rebuilds them from the persisted state.
    fn rebuild(&mut self) {
        self.stats.rebuilds += 1;
        self.core = None;
        if let Backend::Redb { store, .. } = &mut self.backend {
            // Reopen redb from disk if nothing else holds it (it is then closed by the drop).
            if store.as_ref().is_some_and(|s| s.is_unique()) {
                *store = None;
                debug!("reopening redb for the rebuild");
            } else {
                debug!("redb still referenced; rebuilding on the open handle");
            }
        }
        match self.build_core() {
            Ok(c) => self.core = Some(c),
            Err(e) => warn!("rebuilding signer state failed (will retry on next request): {e}"),
        }
    }

    fn core(&mut self) -> Result<&Core, Error> {
        if self.core.is_none() {
            self.core = Some(self.build_core()?);
        }
        Ok(self.core.as_ref().expect("just built"))
    }

    /// Handles one MQTT `vls` payload (a serial request frame) and returns the encoded reply
    /// frame for `vls-res`, or the error to publish on `error`.
    pub fn handle_frame(&mut self, frame: &[u8]) -> Result<Vec<u8>, FrameError> {
        let seq = Request::seq_of(frame);
        let req = Request::decode(frame).map_err(|e| FrameError { seq, error: e.into() })?;
        self.handle(&req).map(|r| r.encode()).map_err(|error| FrameError { seq, error })
    }

    /// Handles one request; all state it changed is durably committed (fsync) BEFORE this returns Ok.
    /// With LSS backup on, requests go through [`Signer::stage`] instead (this refuses them).
    pub fn handle(&mut self, req: &Request) -> Result<Reply, Error> {
        if self.lss.is_some() {
            return Err(Error::Lss("backup is on: requests go through stage() and the LSS acknowledgement".into()));
        }
        match self.stage(req)? {
            Outcome::Ready(r) => Ok(r),
            // Without LSS nothing waits for an acknowledgement.
            Outcome::Backup { .. } => Err(Error::LssBusy(req.seq)),
        }
    }

    /// Handles one request up to its commit. VLS validates and signs inside a persister
    /// transaction, and the request's changes (with its dedupe record) are collected there.
    /// - Nothing changed, or LSS is off: committed locally (fsync) and [`Outcome::Ready`].
    /// - LSS on and state changed: the transaction stays open and the reply is held;
    ///   [`Outcome::Backup`] carries the `lss-res` payload (mutations and client HMAC). The reply
    ///   is released by [`Signer::lss_stored`] once LSS acknowledged exactly these mutations
    ///   (then committed locally), or dropped by a conflict ([`Signer::lss_conflict`]).
    pub fn stage(&mut self, req: &Request) -> Result<Outcome<Reply>, Error> {
        if let Some(r) = self.reset {
            return Err(Error::Unavailable(format!(
                "the owner reset this device ({r:?}): it signs nothing until it is initialised again (`sphinx-key init`)"
            )));
        }
        let (msg, msg_type, hash, slot_key) = match self.prepare(req)? {
            Prepared::Init(msg, msg_type) => return self.handle_init(req, msg, msg_type).map(Outcome::Ready),
            Prepared::Recorded(reply) => return Ok(Outcome::Ready(reply)),
            Prepared::Run { msg, msg_type, hash, slot_key } => (msg, msg_type, hash, slot_key),
        };
        let core = self.core()?;
        let Some(root) = core.root.as_ref() else {
            return Err(Error::NotInitialized(msg_type, msg_name(msg_type)));
        };
        let persister = core.persister.clone();
        let node = core.node.clone();
        begin(&persister)?;
        let writes = persister.writes();
        let res = call_vls(root, req, msg);
        self.stats.vls_calls += 1;
        let name = || msg_name(msg_type);
        match res {
            Ok(Ok(reply)) => {
                let done = catch_unwind(AssertUnwindSafe(|| {
                    record_if_changed(&persister, &node, writes, &slot_key, req.seq, hash, &reply)
                }));
                let done = match done {
                    Ok(Ok(())) => self.finish(&persister, req.seq),
                    Ok(Err(e)) => Err(Error::Persist(format!("{e:?}"))),
                    Err(p) => Err(Error::Persist(panic_text(p))),
                };
                let reply = Reply { seq: req.seq, message: reply };
                match done {
                    Ok(None) => Ok(Outcome::Ready(reply)),
                    Ok(Some(lss_res)) => {
                        self.hold(Held::Reply(reply));
                        Ok(Outcome::Backup { lss_res })
                    }
                    Err(e) => {
                        self.rebuild();
                        Err(e)
                    }
                }
            }
            Ok(Err(e)) => {
                // A failed operation must not change state; if it left writes, discard them
                // together with the in-memory node.
                let stranded = !persister.prepare().is_empty()
                    || !matches!(
                        catch_unwind(AssertUnwindSafe(|| node_state_on_disk(&persister, &node))),
                        Ok(Ok(true))
                    );
                if stranded || commit(&persister).is_err() {
                    warn!(msg_type, "refused request left changes; reloading state");
                    self.rebuild();
                }
                Err(Error::Refused { msg_type, name: name(), reason: vls_error_text(&e) })
            }
            Err(p) => {
                let reason = panic_text(p);
                warn!(msg_type, %reason, "VLS panicked; reloading state");
                self.rebuild();
                Err(Error::Panic { msg_type, name: name(), reason })
            }
        }
    }

    /// Lets a device whose state was backed up to LSS sign for a broker without LSS (the
    /// operator's decision on the device: by default it refuses, docs/signer.md "Once backed
    /// up, always backed up").
    pub fn set_allow_without_lss(&mut self, allow: bool) {
        self.allow_without_lss = allow;
    }

    /// The LSS server (its compressed public key) this device is backed up to: the broker's
    /// init-1 must offer exactly this one, and it replaces the key pinned at the first dance
    /// (the operator's way to move the device to another server). `None`: the pinned key, or
    /// at the first dance whatever the broker offers.
    pub fn set_lss_server(&mut self, key: Option<[u8; 33]>) {
        self.lss_server = key;
    }

    /// Signs a batch's requests of different channels on up to `n` threads (1, the default: one
    /// at a time). See [`Signer::handle_batch`].
    pub fn set_sign_threads(&mut self, n: usize) {
        self.sign_threads = n.clamp(1, MAX_SIGN_THREADS);
    }

    /// Group commit: handles `reqs` in arrival order and commits the state of all of them in ONE
    /// durable transaction (one fsync), then returns their results in the same order. Every
    /// `Ok` reply is on disk when this returns, as with [`Signer::handle`], and the replies and
    /// the state are the ones one-at-a-time handling gives (same VLS calls in the same order on
    /// the same state; the store's versions advance per write either way).
    ///
    /// A request refused (or panicking) inside the batch must take back only its own writes:
    /// the transaction is reset to its copy from before that request; if the refusal left state
    /// in memory or in the transaction, the batch so far is committed first and then the node is
    /// rebuilt from disk (as one-at-a-time handling does), so the earlier requests' state is
    /// neither lost nor mixed with the refused one's. An `hsmd_init` (its own transaction) also
    /// commits the batch so far first. With LSS on, requests go one at a time ([`Signer::stage`]).
    ///
    /// With [`Signer::set_sign_threads`] > 1, a run of consecutive requests of distinct channels
    /// (a channeld's steady-state requests, [`PARALLEL_TYPES`]) is signed concurrently: VLS
    /// locks each channel on its own, so they do not wait for one another. Their writes go to the
    /// same open transaction; the replies are what one-at-a-time handling gives (each request
    /// reads and writes only its own channel's state; requests of one connection are never in
    /// one run, it waits for each reply). If any of them fails, nothing of the run is kept: its
    /// writes are taken back, the batch so far is committed, the node is rebuilt from disk and
    /// the run's requests go one at a time as above.
    pub fn handle_batch(&mut self, reqs: &[Request]) -> Vec<Result<Reply, Error>> {
        if self.lss.is_some() || reqs.len() <= 1 {
            return reqs.iter().map(|r| self.handle(r)).collect();
        }
        let mut results: Vec<Option<Result<Reply, Error>>> = (0..reqs.len()).map(|_| None).collect();
        // Replies waiting for the batch's commit: (index, reply).
        let mut staged: Vec<(usize, Reply)> = Vec::new();
        let mut i = 0;
        while i < reqs.len() {
            let run = self.parallel_run_len(&reqs[i..]);
            if run >= 2 {
                if let Some(outcomes) = self.parallel_step(&reqs[i..i + run]) {
                    for (k, r) in outcomes.into_iter().enumerate() {
                        match r {
                            Ok(reply) => staged.push((i + k, reply)),
                            Err(e) => results[i + k] = Some(Err(e)),
                        }
                    }
                } else {
                    self.flush_batch(&mut staged, &mut results);
                    self.rebuild();
                    for (k, req) in reqs[i..i + run].iter().enumerate() {
                        self.serial_step(i + k, req, &mut staged, &mut results);
                    }
                }
                i += run;
                continue;
            }
            self.serial_step(i, &reqs[i], &mut staged, &mut results);
            i += 1;
        }
        self.flush_batch(&mut staged, &mut results);
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Unavailable("request not handled".into()))))
            .collect()
    }

    /// Request `i` of a batch, one at a time ([`Signer::batch_step`]).
    fn serial_step(
        &mut self,
        i: usize,
        req: &Request,
        staged: &mut Vec<(usize, Reply)>,
        results: &mut [Option<Result<Reply, Error>>],
    ) {
        match self.batch_step(req) {
            Step::Staged(reply) => staged.push((i, reply)),
            Step::Failed(e) => results[i] = Some(Err(e)),
            Step::FlushThen(e) => {
                self.flush_batch(staged, results);
                self.rebuild();
                results[i] = Some(Err(e));
            }
            Step::Alone => {
                self.flush_batch(staged, results);
                results[i] = Some(self.handle(req));
            }
        }
    }

    /// How many of `reqs`, from the first, can be signed concurrently: channel requests of
    /// [`PARALLEL_TYPES`], each of a different channel (dbid).
    fn parallel_run_len(&self, reqs: &[Request]) -> usize {
        if self.sign_threads < 2 || self.reset.is_some() {
            return 0;
        }
        let mut dbids = Vec::new();
        reqs.iter()
            .take_while(|r| {
                let ok = r.dbid != 0
                    && !dbids.contains(&r.dbid)
                    && sphinx_wire::hsmd::msg_type(&r.message).is_ok_and(|t| PARALLEL_TYPES.contains(&t));
                dbids.push(r.dbid);
                ok
            })
            .count()
    }

    /// Signs `reqs` (a run of [`Signer::parallel_run_len`]) concurrently inside the open batch
    /// transaction: per request its staged reply, or an error that changed nothing (it could
    /// not be decoded, …). `None`: a VLS call failed or the state could not be recorded; the
    /// transaction is back to before the run and the in-memory node must be rebuilt.
    fn parallel_step(&mut self, reqs: &[Request]) -> Option<Vec<Result<Reply, Error>>> {
        let mut out: Vec<Option<Result<Reply, Error>>> = Vec::with_capacity(reqs.len());
        let mut calls = Vec::new();
        let mut records = Vec::new();
        for (k, req) in reqs.iter().enumerate() {
            match self.prepare(req) {
                Ok(Prepared::Run { msg, hash, slot_key, .. }) => {
                    out.push(None);
                    calls.push((req, msg));
                    records.push((k, hash, slot_key));
                }
                Ok(Prepared::Recorded(reply)) => out.push(Some(Ok(reply))),
                Ok(Prepared::Init(..)) => return None,
                Err(e) => out.push(Some(Err(e))),
            }
        }
        let threads = self.sign_threads;
        let core = self.core().ok()?;
        let root = core.root.as_ref()?;
        let (persister, node) = (core.persister.clone(), core.node.clone());
        let before = undo_point(&persister).ok()?;
        let writes = persister.writes();
        let n = calls.len();
        let signed = call_vls_concurrently(root, calls, threads);
        self.stats.vls_calls += n as u64;
        let mut replies = Vec::with_capacity(n);
        for r in signed {
            match r {
                Ok(Ok(reply)) => replies.push(reply),
                _ => {
                    persister.restore(before);
                    return None;
                }
            }
        }
        // As `record_if_changed` for each: the node state once, then a record for every request
        // of the run if the run changed anything (requests that change nothing then get one
        // too: same transaction, harmless).
        let recorded = catch_unwind(AssertUnwindSafe(|| -> Result<(), lightning_signer::persist::Error> {
            sync_node_state(&persister, &node)?;
            if persister.writes() == writes {
                return Ok(());
            }
            for ((k, hash, slot_key), reply) in records.iter().zip(&replies) {
                put_record(&persister, slot_key, reqs[*k].seq, hash.clone(), reply)?;
            }
            Ok(())
        }));
        if !matches!(recorded, Ok(Ok(()))) {
            persister.restore(before);
            return None;
        }
        self.stats.concurrent += n as u64;
        for ((k, _, _), message) in records.into_iter().zip(replies) {
            out[k] = Some(Ok(Reply { seq: reqs[k].seq, message }));
        }
        out.into_iter().map(|r| r.or_else(|| Some(Err(Error::Unavailable("request not handled".into()))))).collect()
    }

    /// Commits the open batch transaction and releases its replies (or fails them all).
    fn flush_batch(&mut self, staged: &mut Vec<(usize, Reply)>, results: &mut [Option<Result<Reply, Error>>]) {
        let done = match self.core.as_ref() {
            Some(c) => commit(&c.persister),
            None if staged.is_empty() => Ok(()),
            None => Err(Error::Unavailable("signer state lost before the batch commit".into())),
        };
        match done {
            Ok(()) => {
                for (i, reply) in staged.drain(..) {
                    results[i] = Some(Ok(reply));
                }
            }
            Err(e) => {
                warn!(requests = staged.len(), error = %e, "batch commit failed; nothing of it was released");
                for (i, _) in staged.drain(..) {
                    results[i] = Some(Err(Error::Persist(e.to_string())));
                }
                self.rebuild();
            }
        }
    }

    /// One request of a batch, inside the batch's open transaction (see [`Signer::handle_batch`]).
    pub(crate) fn batch_step(&mut self, req: &Request) -> Step {
        if self.reset.is_some() {
            return Step::Alone;
        }
        let (msg, msg_type, hash, slot_key) = match self.prepare(req) {
            Err(e) => return Step::Failed(e),
            Ok(Prepared::Init(..)) => return Step::Alone,
            // Read through the open transaction: a record staged earlier in this batch counts,
            // and its reply is released with the batch's commit like the others.
            Ok(Prepared::Recorded(reply)) => return Step::Staged(reply),
            Ok(Prepared::Run { msg, msg_type, hash, slot_key }) => (msg, msg_type, hash, slot_key),
        };
        let core = match self.core() {
            Ok(c) => c,
            Err(e) => return Step::Failed(e),
        };
        let Some(root) = core.root.as_ref() else {
            return Step::Failed(Error::NotInitialized(msg_type, msg_name(msg_type)));
        };
        let persister = core.persister.clone();
        let node = core.node.clone();
        let before = match undo_point(&persister) {
            Ok(b) => b,
            Err(e) => return Step::Failed(e),
        };
        let writes = persister.writes();
        let res = call_vls(root, req, msg);
        self.stats.vls_calls += 1;
        let name = || msg_name(msg_type);
        match res {
            Ok(Ok(reply)) => {
                let done = catch_unwind(AssertUnwindSafe(|| {
                    record_if_changed(&persister, &node, writes, &slot_key, req.seq, hash, &reply)
                }));
                match done {
                    Ok(Ok(())) => Step::Staged(Reply { seq: req.seq, message: reply }),
                    Ok(Err(e)) => {
                        persister.restore(before);
                        Step::FlushThen(Error::Persist(format!("{e:?}")))
                    }
                    Err(p) => {
                        persister.restore(before);
                        Step::FlushThen(Error::Persist(panic_text(p)))
                    }
                }
            }
            Ok(Err(e)) => {
                let error = Error::Refused { msg_type, name: name(), reason: vls_error_text(&e) };
                // A failed operation must not change state: if it left writes or in-memory state,
                // take its writes back, commit the batch so far, and reload the node from disk.
                let stranded = persister.snapshot() != before
                    || !matches!(
                        catch_unwind(AssertUnwindSafe(|| node_state_on_disk(&persister, &node))),
                        Ok(Ok(true))
                    );
                if stranded {
                    warn!(msg_type, "refused request left changes; committing the batch so far and reloading state");
                    persister.restore(before);
                    return Step::FlushThen(error);
                }
                Step::Failed(error)
            }
            Err(p) => {
                let reason = panic_text(p);
                warn!(msg_type, %reason, "VLS panicked; committing the batch so far and reloading state");
                persister.restore(before);
                Step::FlushThen(Error::Panic { msg_type, name: name(), reason })
            }
        }
    }

    /// The checks [`Signer::stage`] and the batch step share, before VLS runs: the message type
    /// and decoding, init messages (their own transaction), LSS readiness, the dedupe record (a
    /// request delivered again gets its stored reply, read through any open transaction), an
    /// initialised node, and the funding outpoint of a `setup_channel`.
    fn prepare(&mut self, req: &Request) -> Result<Prepared, Error> {
        let msg_type = sphinx_wire::hsmd::msg_type(&req.message).map_err(|_| Error::NoType(req.message.len()))?;
        if msg_type == CLIENT_HSMFD {
            return Err(Error::NotForSigner(msg_type));
        }
        let msg = decode(&req.message, msg_type)?;
        if matches!(msg, Message::HsmdInit(_) | Message::HsmdInit2(_)) {
            return Ok(Prepared::Init(msg, msg_type));
        }
        // Built first: whether LSS must be on depends on the state.
        self.core()?;
        self.lss_ready()?;
        let hash = hex::encode(sha256::Hash::hash(&req.encode()).to_byte_array());
        let slot_key = format!("{REPLY_KEY_PREFIX}{}", req.seq % DEDUPE_SLOTS);
        let core = self.core()?;
        if let Some(message) = recorded_reply(&core.persister, &slot_key, req.seq, &hash) {
            debug!(seq = req.seq, msg_type, "duplicate request: stored reply");
            self.stats.dedupe_hits += 1;
            return Ok(Prepared::Recorded(Reply { seq: req.seq, message }));
        }
        if core.root.is_none() {
            return Err(Error::NotInitialized(msg_type, msg_name(msg_type)));
        }
        if let Message::SetupChannel(m) = &msg {
            funding_outpoint_unused(&core.node, &req.peer_id, req.dbid, m)?;
        }
        Ok(Prepared::Run { msg, msg_type, hash, slot_key })
    }

    fn handle_init(&mut self, req: &Request, msg: Message, msg_type: u16) -> Result<Reply, Error> {
        self.core()?;
        self.stats.vls_calls += 1;
        let core = self.core.as_mut().expect("core");
        let persister = core.persister.clone();
        begin(&persister)?;
        match run_init(core, msg, msg_type) {
            Ok((done, Some(reply), init)) => {
                if done {
                    core.root = Some(init.into());
                    let same = matches!(persister.get(INIT_KEY), Ok(Some((_, ref v))) if *v == req.message);
                    if !same {
                        if let Err(e) = persister.put(INIT_KEY, req.message.clone()) {
                            self.rebuild();
                            return Err(Error::Persist(format!("{e:?}")));
                        }
                    }
                }
                if let Err(e) = commit(&persister) {
                    self.rebuild();
                    return Err(e);
                }
                info!(msg_type, "hsmd init negotiated");
                Ok(Reply { seq: req.seq, message: reply })
            }
            Ok((_, None, _)) => {
                let _ = commit(&persister);
                Err(Error::NoReply(msg_type))
            }
            Err(e) => {
                self.rebuild();
                Err(e)
            }
        }
    }
}

impl Signer {
    /// Handles several messages the broker sent, in arrival order, and says what to publish, in
    /// the same order: [`Signer::on_message`] for each, except that consecutive `vls` requests
    /// are handled as one group commit: [`Signer::handle_batch`] when LSS is off, one staged
    /// transaction and one `lss-res` when it is on (at most [`LSS_GROUP_MAX`]; their replies
    /// follow its acknowledgement, errors of requests that changed nothing come at once).
    pub fn on_messages(&mut self, msgs: &[(&str, &[u8])]) -> Vec<Output> {
        use sphinx_wire::topics as t;
        let mut out = Vec::new();
        let mut i = 0;
        while i < msgs.len() {
            let run = msgs[i..].iter().take_while(|(s, _)| *s == t::VLS).count();
            if run >= 2 && self.lss_groupable() {
                let payloads: Vec<&[u8]> = msgs[i..i + run.min(lss::LSS_GROUP_MAX)].iter().map(|(_, p)| *p).collect();
                let (outs, taken) = self.stage_group(&payloads);
                out.extend(outs);
                if taken > 0 {
                    i += taken;
                    continue;
                }
            }
            if self.lss.is_some() || run <= 1 {
                out.extend(self.on_message(msgs[i].0, msgs[i].1));
                i += 1;
                continue;
            }
            let mut reqs = Vec::with_capacity(run);
            let mut slots = Vec::with_capacity(run);
            for (_, payload) in &msgs[i..i + run] {
                let seq = Request::seq_of(payload);
                match Request::decode(payload) {
                    Ok(r) => {
                        slots.push(Ok(reqs.len()));
                        reqs.push(r);
                    }
                    Err(e) => slots.push(Err(FrameError { seq, error: e.into() })),
                }
            }
            let mut results = self.handle_batch(&reqs).into_iter();
            for slot in slots {
                let r = match slot {
                    Ok(k) => match results.next() {
                        Some(Ok(reply)) => Ok(reply),
                        Some(Err(error)) => Err(FrameError { seq: reqs[k].seq, error }),
                        None => Err(FrameError { seq: reqs[k].seq, error: Error::Unavailable("no result".into()) }),
                    },
                    Err(e) => Err(e),
                };
                out.push(match r {
                    Ok(reply) => Output::Publish { topic: t::VLS_RES, payload: reply.encode() },
                    Err(e) => lss::failed(e),
                });
            }
            i += run;
        }
        out
    }
}

/// A request after [`Signer::prepare`].
enum Prepared {
    /// `hsmd_init` / `hsmd_init2`: handled in a transaction of its own.
    Init(Message, u16),
    /// Delivered again: the stored reply, VLS not run.
    Recorded(Reply),
    /// To run through VLS; `slot_key` is its dedupe slot, `hash` the frame's hash.
    Run { msg: Message, msg_type: u16, hash: String, slot_key: String },
}

/// What became of one request of a batch ([`Signer::handle_batch`]).
pub(crate) enum Step {
    /// Its state is in the open transaction; the reply is released by the batch's commit.
    Staged(Reply),
    /// Failed without touching state; the batch goes on.
    Failed(Error),
    /// Failed after changing state (now taken back from the transaction): commit the batch so
    /// far, then rebuild the node from disk.
    FlushThen(Error),
    /// Needs a transaction of its own (`hsmd_init`, or a reset device's refusal): commit the
    /// batch so far, then handle it one at a time.
    Alone,
}

/// Runs an init message through a fresh `InitHandler` on the node.
fn run_init(core: &Core, msg: Message, msg_type: u16) -> Result<(bool, Option<Vec<u8>>, InitHandler), Error> {
    let mut init = InitHandler::new(0, core.node.clone(), core.approver.clone(), DEFAULT_MAX_PROTOCOL_VERSION);
    let res = catch_unwind(AssertUnwindSafe(|| init.handle(msg)));
    match res {
        Ok(Ok((done, reply))) => Ok((done, reply.map(|r| r.as_vec()), init)),
        Ok(Err(e)) => Err(Error::Refused { msg_type, name: msg_name(msg_type), reason: vls_error_text(&e) }),
        Err(p) => Err(Error::Panic { msg_type, name: msg_name(msg_type), reason: panic_text(p) }),
    }
}

/// VLS 1.0.0-rc.1 restores a node's velocity controls from disk and then replaces them with
/// fresh ones from the policy (`Node::new_full`), so a restarted signer would forget what it
/// spent in the current interval: a restart would reset the owner's limits. Put the persisted
/// controls back, unless the policy's limit or interval changed since (then VLS's reset stands,
/// as it does for a spec change at run time).
fn restore_velocity(p: &Persister, node: &Node) {
    let stored = match p.get(&node_state_key(node)) {
        Ok(Some((_, v))) => v,
        _ => return,
    };
    let entry: vls_persist::model::NodeStateEntry =
        match <vls_persist::kvv::JsonFormat as vls_persist::kvv::ValueFormat>::de_value(&stored) {
            Ok(e) => e,
            Err(e) => {
                warn!("stored node state unreadable for velocity restore: {e:?}");
                return;
            }
        };
    let same_spec = |a: &lightning_signer::util::velocity::VelocityControl,
                     b: &lightning_signer::util::velocity::VelocityControl| {
        a.limit == b.limit && a.bucket_interval == b.bucket_interval && a.buckets.len() == b.buckets.len()
    };
    let mut st = node.get_state();
    let vc: lightning_signer::util::velocity::VelocityControl = entry.velocity_control.into();
    if same_spec(&vc, &st.velocity_control) {
        st.velocity_control = vc;
    }
    let fc: lightning_signer::util::velocity::VelocityControl = entry.fee_velocity_control.into();
    if same_spec(&fc, &st.fee_velocity_control) {
        st.fee_velocity_control = fc;
    }
}

/// KVV key of the node state, as vls-persist names it.
fn node_state_key(node: &Node) -> String {
    format!("node/state/{}", hex::encode(node.get_id().serialize()))
}

/// The node state as vls-persist would write it.
fn node_state_value(node: &Node) -> Result<Vec<u8>, lightning_signer::persist::Error> {
    let entry: vls_persist::model::NodeStateEntry = (&*node.get_state()).into();
    <vls_persist::kvv::JsonFormat as vls_persist::kvv::ValueFormat>::ser_value(&entry)
}

/// Is the in-memory node state the one on disk (or in the open transaction)?
fn node_state_on_disk(p: &Persister, node: &Node) -> Result<bool, lightning_signer::persist::Error> {
    let value = node_state_value(node)?;
    Ok(matches!(p.get(&node_state_key(node))?, Some((_, v)) if v == value))
}

/// VLS changes some node state in memory without persisting it (seen: the fee velocity of
/// `sign_withdrawal`, payment velocity and issued invoices), to be written with the next node
/// update. A crash before that update would lose it, and a restarted signer would have forgotten
/// what it spent. So every request's transaction also carries the node state whenever it differs
/// from what is stored: nothing the device answered for is ever only in memory.
fn sync_node_state(p: &Persister, node: &Node) -> Result<(), lightning_signer::persist::Error> {
    if node_state_on_disk(p, node)? {
        return Ok(());
    }
    p.put(&node_state_key(node), node_state_value(node)?)
}

/// After a request VLS answered: brings the node state into the transaction, and records the
/// reply for dedupe when the request changed anything (`writes`: the store's write count before
/// it). A request that changed nothing gets no record and, alone, no commit and no fsync:
/// answering it again gives the same answer from the same state, and a reply a record would
/// replay has left the device already, so nothing is lost or revealed (docs/signer.md).
/// The record (hex and JSON of the reply) is only built when it is stored.
fn record_if_changed(
    p: &Persister,
    node: &Node,
    writes: u64,
    slot_key: &str,
    seq: u16,
    hash: String,
    reply: &[u8],
) -> Result<(), lightning_signer::persist::Error> {
    sync_node_state(p, node)?;
    if p.writes() == writes {
        return Ok(());
    }
    put_record(p, slot_key, seq, hash, reply)
}

/// Stores the dedupe record of request `seq` (frame hash `hash`) answered with `reply`.
fn put_record(
    p: &Persister,
    slot_key: &str,
    seq: u16,
    hash: String,
    reply: &[u8],
) -> Result<(), lightning_signer::persist::Error> {
    let record = ReplyRecord { seq, hash, reply: hex::encode(reply) };
    let value = serde_json::to_vec(&record)
        .map_err(|e| lightning_signer::persist::Error::Internal(format!("dedupe record: {e}")))?;
    p.put(slot_key, value)
}

fn vls_error_text(e: &vls_protocol_signer::handler::Error) -> String {
    use vls_protocol_signer::handler::Error as E;
    match e {
        E::Protocol(p) => format!("protocol: {p}"),
        E::Signing(s) => format!("{:?}: {}", s.code(), s.message()),
        E::Temporary(s) => format!("temporary {:?}: {}", s.code(), s.message()),
    }
}

/// Most threads [`Signer::set_sign_threads`] takes.
pub const MAX_SIGN_THREADS: usize = 8;

/// The requests a batch may sign concurrently ([`Signer::handle_batch`]): a channeld's
/// steady-state requests, each on its own channel's state (sign_penalty_to_us,
/// get_per_commitment_point, sign_remote_commitment_tx, sign_remote_htlc_tx,
/// validate_commitment_tx, validate_revocation, revoke_commitment_tx).
pub const PARALLEL_TYPES: [u16; 7] = [14, 18, 19, 20, 35, 36, 40];

/// [`call_vls`] for each of `calls` on up to `threads` threads (this one included); the results
/// in the order of `calls`.
fn call_vls_concurrently(
    root: &RootHandler,
    calls: Vec<(&Request, Message)>,
    threads: usize,
) -> Vec<std::thread::Result<Result<Vec<u8>, vls_protocol_signer::handler::Error>>> {
    let per = calls.len().div_ceil(threads.max(1)).max(1);
    let mut chunks: Vec<Vec<(&Request, Message)>> = Vec::new();
    let mut calls = calls.into_iter().peekable();
    while calls.peek().is_some() {
        chunks.push(calls.by_ref().take(per).collect());
    }
    let mut chunks = chunks.into_iter();
    let Some(first) = chunks.next() else { return Vec::new() };
    std::thread::scope(|s| {
        let others: Vec<_> = chunks
            .map(|c| {
                let len = c.len();
                let run = move || c.into_iter().map(|(r, m)| call_vls(root, r, m)).collect::<Vec<_>>();
                (len, std::thread::Builder::new().name("sign".into()).spawn_scoped(s, run))
            })
            .collect();
        let mut out: Vec<_> = first.into_iter().map(|(r, m)| call_vls(root, r, m)).collect();
        for (len, h) in others {
            // `call_vls` catches VLS's panics; this is the thread itself failing (or not starting:
            // its calls did not run, and the caller redoes the run one at a time).
            match h.ok().and_then(|h| h.join().ok()) {
                Some(v) => out.extend(v),
                None => out
                    .extend((0..len).map(|_| Err(Box::new("signing thread failed") as Box<dyn std::any::Any + Send>))),
            }
        }
        out
    })
}

/// Runs one request through VLS (the root handler, or a channel client's for a dbid), a panic
/// caught: what [`Signer::stage`] and the batch path both call.
fn call_vls(
    root: &RootHandler,
    req: &Request,
    msg: Message,
) -> std::thread::Result<Result<Vec<u8>, vls_protocol_signer::handler::Error>> {
    catch_unwind(AssertUnwindSafe(|| {
        let r = if req.dbid == 0 {
            root.handle(msg)
        } else {
            root.for_new_client(req.dbid, PubKey(req.peer_id), req.dbid).handle(msg)
        };
        r.map(|reply| reply.as_vec())
    }))
}

/// The stored reply of the dedupe record in `slot_key` when it is for this very request (same
/// seq, same frame hash).
fn recorded_reply(p: &Persister, slot_key: &str, seq: u16, hash: &str) -> Option<Vec<u8>> {
    load_record(p, slot_key)
        .filter(|rec| rec.seq == seq && rec.hash == hash)
        .and_then(|rec| hex::decode(&rec.reply).ok())
}

fn open_redb(dir: &Path) -> Result<AnyStore, Error> {
    let err = |reason: String| Error::StateDir { path: dir.to_path_buf(), reason };
    create_redb_whole(dir).map_err(|e| err(format!("cannot create the state database: {e}")))?;
    catch_unwind(|| AnyStore::open_redb(dir)).map_err(|p| err(panic_text(p)))
}

/// The file `vls_persist`'s redb store keeps under its directory.
const REDB_FILE: &str = "redb";
/// Scratch directories of [`create_redb_whole`] start so.
const CREATING_PREFIX: &str = ".creating-";

/// Creates the state database in a scratch directory and moves it into place whole (fsynced
/// file, rename, fsynced directory). redb creating its file in place, killed before the header
/// is complete, leaves a file it can never open again ("invalid data"): the device could not
/// start (found by `standin/tests/lss_crash.rs`). A zero-length file is what a crash before
/// redb's first write left; it never held state, so it is created again. Scratch directories a
/// crash left are removed.
fn create_redb_whole(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(CREATING_PREFIX) {
            std::fs::remove_dir_all(entry.path())?;
        }
    }
    let path = dir.join(REDB_FILE);
    match std::fs::metadata(&path) {
        Ok(m) if m.len() > 0 => return Ok(()),
        Ok(_) => {
            warn!(path = %path.display(), "empty state database (a crash while it was created): creating it again")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    install_redb(dir, Vec::new())
}

/// Builds a state database holding exactly `kvvs` in a scratch directory (written, fsynced) and
/// renames it over `dir/redb`, then fsyncs the directory: a crash before the rename leaves what
/// was there (and a scratch directory the next [`create_redb_whole`] removes), after it the new
/// database. The caller holds no handle on the old one.
fn install_redb(dir: &Path, kvvs: Vec<vls_persist::kvv::KVV>) -> std::io::Result<()> {
    use vls_persist::kvv::KVVStore;
    let scratch = dir.join(format!("{CREATING_PREFIX}{}", std::process::id()));
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)?;
    }
    std::fs::create_dir(&scratch)?;
    let new = catch_unwind(|| AnyStore::open_redb(&scratch)).map_err(|p| std::io::Error::other(panic_text(p)))?;
    if !kvvs.is_empty() {
        // vls-persist's redb store panics on a redb error: a full or failing disk is an error here.
        match catch_unwind(AssertUnwindSafe(|| new.put_batch(kvvs))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(std::io::Error::other(format!("writing the new state: {e:?}"))),
            Err(p) => return Err(std::io::Error::other(format!("writing the new state: {}", panic_text(p)))),
        }
    }
    drop(new);
    std::fs::File::open(scratch.join(REDB_FILE))?.sync_all()?;
    std::fs::rename(scratch.join(REDB_FILE), dir.join(REDB_FILE))?;
    std::fs::File::open(dir)?.sync_all()?;
    std::fs::remove_dir_all(&scratch)
}

/// Replaces the state database under `dir` by one holding exactly `kvvs`, whole
/// ([`install_redb`]).
fn replace_redb(dir: &Path, kvvs: Vec<vls_persist::kvv::KVV>) -> Result<(), Error> {
    install_redb(dir, kvvs)
        .map_err(|e| Error::StateDir { path: dir.to_path_buf(), reason: format!("replacing the state: {e}") })
}

/// Opens a transaction unless one is open (a batch's), and returns a copy of it: the point a
/// failed request's writes are taken back to.
fn undo_point(p: &Persister) -> Result<Option<store::Log>, Error> {
    if !p.in_transaction() {
        begin(p)?;
    }
    Ok(p.snapshot())
}

fn begin(p: &Persister) -> Result<(), Error> {
    match catch_unwind(AssertUnwindSafe(|| p.enter())) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::Persist(format!("starting transaction: {e:?}"))),
        Err(x) => Err(Error::Persist(format!("starting transaction: {}", panic_text(x)))),
    }
}

fn commit(p: &Persister) -> Result<(), Error> {
    match catch_unwind(AssertUnwindSafe(|| p.commit())) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::Persist(format!("commit: {e:?}"))),
        Err(x) => Err(Error::Persist(format!("commit: {}", panic_text(x)))),
    }
}

fn load_record(p: &Persister, key: &str) -> Option<ReplyRecord> {
    let (_, v) = p.get(key).ok()??;
    serde_json::from_slice(&v).ok()
}

/// The named check `policy-setup-channel-funding-outpoint-unused`: refuses a `setup_channel`
/// whose funding outpoint another channel already has. VLS 1.0.0-rc.1 accepts it, but a node
/// holding two channels on one outpoint cannot be restored ("tracker not found for point"), so a
/// hostile host could make the device unable to start again (found by `benches/startup.rs`).
/// Setting up the same channel again is not refused.
fn funding_outpoint_unused(
    node: &Node,
    peer_id: &[u8; 33],
    dbid: u64,
    m: &vls_protocol::msgs::SetupChannel,
) -> Result<(), Error> {
    use lightning_signer::channel::{ChannelId, ChannelSlot};
    let this = ChannelId::new_from_peer_id_and_oid(peer_id, dbid);
    let outpoint = bitcoin::OutPoint { txid: m.funding_txid, vout: u32::from(m.funding_txout) };
    for (id, slot) in node.get_channels().iter() {
        if *id == this {
            continue;
        }
        let taken =
            slot.lock().is_ok_and(|s| matches!(&*s, ChannelSlot::Ready(c) if c.setup.funding_outpoint == outpoint));
        if taken {
            return Err(Error::Refused {
                msg_type: 31,
                name: msg_name(31),
                reason: format!(
                    "policy-setup-channel-funding-outpoint-unused: funding outpoint {outpoint} is already channel {id}'s"
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod send_check {
    #[test]
    fn signer_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<super::Signer>();
    }
}

#[cfg(test)]
mod replace_check {
    use vls_persist::kvv::{KVVStore, KVV};

    #[test]
    fn the_state_database_is_replaced_whole_and_a_crashed_replacement_leaves_the_old_one() {
        let dir = std::env::temp_dir().join(format!("sphinx-replace-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let old = super::open_redb(&dir).unwrap();
        old.put_batch(vec![KVV("a".into(), (7, b"old".to_vec()))]).unwrap();
        drop(old);
        // A replacement that died before its rename: its scratch directory, the old state intact.
        let scratch = dir.join(format!("{}dead", super::CREATING_PREFIX));
        std::fs::create_dir(&scratch).unwrap();
        std::fs::write(scratch.join(super::REDB_FILE), b"half-written").unwrap();
        let reopened = super::open_redb(&dir).unwrap();
        assert_eq!(reopened.get("a").unwrap(), Some((7, b"old".to_vec())));
        assert!(!scratch.exists(), "a dead replacement's scratch directory is removed at open");
        drop(reopened);
        // A completed one: exactly the new keys, at their versions (lower ones too).
        super::replace_redb(&dir, vec![KVV("b".into(), (3, b"new".to_vec()))]).unwrap();
        let new = super::open_redb(&dir).unwrap();
        assert_eq!(new.get("a").unwrap(), None);
        assert_eq!(new.get("b").unwrap(), Some((3, b"new".to_vec())));
        drop(new);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
