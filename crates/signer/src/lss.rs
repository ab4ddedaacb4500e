//! LSS backup on the signer (docs/signer.md "LSS"; formats in docs/wire.md "LSS").
//!
//! LSS is off until the broker starts the init dance ([`Signer::lss_init`]); a broker without
//! LSS never does, and the signer then behaves exactly as before. Once on:
//! - init-1 ([`Signer::lss_init`]): the signer's persistence key, auth token and a fresh nonce.
//! - init-2 ([`Signer::lss_restore`]): LSS's state, checked against its HMAC with that nonce,
//!   is merged into the device's: newer LSS versions are taken (a standby catching up, a fresh
//!   device restored from LSS alone), while state the device has and LSS lacks or has older is
//!   refused (LSS rolled back, or another history of this node). A device that never synced
//!   uploads what it has. The answer carries what LSS must store.
//! - Per request ([`Signer::stage`]): the mutations go out on `lss-res` and the reply is held
//!   until [`Signer::lss_stored`] sees LSS's HMAC over exactly them. The local commit runs while
//!   the `Put` does ([`Signer::take_staged_commit`]; or at the acknowledgement, for a front end
//!   that does not take it) and writes, in the same transaction, the before-images of what it
//!   changes ([`crate::UNACKED_KEY`]), so that init-2 can roll that one transaction forward (LSS
//!   lacks it) or back (LSS went on without it) instead of taking it for a rollback or a fork.
//!   A conflict ([`Signer::lss_conflict`]) leaves the signer stale: it signs nothing until the
//!   next init dance.
//!
//! - Requests handed over together share one transaction, one `lss-res` and one `Put`
//!   ([`LSS_GROUP_MAX`], `Signer::stage_group`); [`Released`] lists their outputs in order.
//! - The device stays with LSS: once its state is backed up it signs nothing for a broker that
//!   does not sync it, and only with the LSS server it was first synced with
//!   ([`crate::LSS_SERVER_KEY`]), unless the operator says otherwise on the device.

use std::panic::{catch_unwind, AssertUnwindSafe};

use bitcoin::secp256k1::PublicKey;
use lightning_signer::persist::Mutations;
use rand::RngCore;
use sphinx_wire::lss::{self, InitResponse, Msg, Mutation, Response, SignerMutations};
use sphinx_wire::serial::Reply;
use tracing::{info, warn};
use vls_persist::kvv::{KVVStore, KVV};

use crate::store::{synced, AnyStore, Persister, WRITER_KEY};
use crate::{commit, panic_text, Backend, ControlOutcome, Error, Signer, REPLY_KEY_PREFIX};

/// What became of a request (or control message) at its commit point.
#[derive(Debug)]
pub enum Outcome<T> {
    /// Committed (or nothing to commit): release it now.
    Ready(T),
    /// Its state waits for LSS: publish `lss_res` on `lss-res`; the output is held until
    /// [`Signer::lss_stored`] releases it.
    Backup {
        /// `Response::VlsMuts` payload.
        lss_res: Vec<u8>,
    },
}

/// An output held until LSS acknowledged its state.
#[derive(Debug)]
pub enum Held {
    /// A request's reply (for `vls-res`).
    Reply(Reply),
    /// A control message's signed response (for `control-res`).
    Control(ControlOutcome),
}

/// The outputs an LSS acknowledgement released, in the order they were staged.
pub type Released = Vec<Held>;

/// Where the signer is with LSS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LssPhase {
    /// init-1 answered; waiting for LSS's state (init-2). Signs nothing.
    Identified,
    /// In sync with LSS: requests are staged and backed up.
    Synced,
    /// A conflict or a failed acknowledgement: the local state may be stale. Signs nothing until
    /// the next init dance.
    Stale,
    /// A new broker session ([`Signer::new_session`]) that has not run the init dance: what was
    /// in sync was so with the previous broker. Signs nothing until this one syncs it.
    Unsynced,
}

struct Pending {
    seq: u16,
    expected: [u8; lss::HASH_LEN],
    held: Vec<Held>,
    commit: LocalCommit,
    /// A request of the group failed after changing the in-memory node: rebuild it from disk
    /// once the group's state is committed.
    rebuild: bool,
}

/// Where a staged transaction's local commit is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LocalCommit {
    /// Still open: committed at the acknowledgement.
    Open,
    /// Handed to the front end ([`Signer::take_staged_commit`]), not reported back yet.
    Running,
    /// On disk, with its before-images.
    Done,
}

/// A staged transaction's local commit, to run while its `lss-res` crosses to LSS
/// ([`Signer::take_staged_commit`]): on another thread, with the signer left alone until
/// [`Signer::staged_commit_done`] reports it.
pub struct StagedCommit {
    persister: std::sync::Arc<Persister>,
}

impl StagedCommit {
    /// Commits durably (one redb transaction, fsync).
    pub fn run(self) -> Result<(), Error> {
        commit(&self.persister)
    }
}

/// One key of the last LSS-backed transaction ([`crate::UNACKED_KEY`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct UnackedKey {
    key: String,
    /// Version and value (hex) before the transaction; `None`: the transaction created it.
    before: Option<(u64, String)>,
    /// The version the transaction wrote.
    after: u64,
}

fn encode_unacked(keys: &[UnackedKey]) -> Vec<u8> {
    serde_json::to_vec(keys).unwrap_or_default()
}

fn decode_unacked(raw: &[u8]) -> Result<Vec<UnackedKey>, Error> {
    if raw.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_slice(raw).map_err(|e| Error::Persist(format!("{}: {e}", crate::UNACKED_KEY)))
}

/// Broker messages (`vls`, `control`) that arrive while a request waits for LSS are queued and
/// handled after its acknowledgement, in order; beyond this many they are refused.
pub const MAX_QUEUED: usize = 1000;

/// Why a device backed up to LSS refuses a broker session that did not sync it.
const NOT_SYNCED_BY_BROKER: &str = "this device's state is backed up to LSS, and the broker has not synced it: a \
     broker without [lss] cannot use it (run the device with --allow-without-lss to sign without backup)";

/// Most requests staged together in one transaction, one `lss-res` and one `Put` (LSS group
/// commit, [`Signer::on_messages`]).
pub const LSS_GROUP_MAX: usize = 64;

pub(crate) struct LssState {
    phase: LssPhase,
    /// `(suffix, payload)` received while `pending`; dropped with it (the broker re-sends).
    queued: std::collections::VecDeque<(&'static str, Vec<u8>)>,
    secret: [u8; lss::HASH_LEN],
    /// Key of the per-value tags ([`lss_value_key`]).
    value_key: [u8; lss::HASH_LEN],
    nonce: Option<[u8; lss::HASH_LEN]>,
    pending: Option<Pending>,
    /// What building the node wrote (a new node), to be sent to LSS in init-2-res.
    built: Vec<Mutation>,
    /// LSS acknowledged the transaction the device's [`crate::UNACKED_KEY`] describes (known
    /// only in this process: after a restart it may or may not have been).
    last_acked: bool,
    /// The server key init-1 offered (pinned by a successful init-2).
    server: [u8; 33],
}

impl LssState {
    pub(crate) fn note_built(&mut self, muts: Mutations) {
        self.built = to_wire(muts);
    }
}

fn to_wire(m: Mutations) -> Vec<Mutation> {
    m.into_iter().map(|(key, (version, value))| Mutation { key, version, value }).collect()
}

/// The key of the tag the signer appends to every value it stores in LSS
/// (`sphinx_wire::lss::seal_value`): derived from the seed alone, so that neither the LSS server
/// (which shares the ECDH secret and so can make every shared HMAC) nor the broker can make a
/// value this signer accepts. Every device of one node derives the same key.
pub fn lss_value_key(seed: &[u8; 32]) -> [u8; lss::HASH_LEN] {
    use bitcoin::hashes::{sha256, Hash, HashEngine, Hmac, HmacEngine};
    let mut e = HmacEngine::<sha256::Hash>::new(seed);
    e.input(b"sphinx-key/lss-value-tag/v1");
    Hmac::<sha256::Hash>::from_engine(e).to_byte_array()
}

fn lss_err(text: impl Into<String>) -> Error {
    Error::Lss(text.into())
}

/// How init-2's state meets the device's.
enum Plan {
    /// Write these LSS entries locally (newer than the device's); `wipe` first when the device
    /// holds only a never-used node.
    Adopt { entries: Vec<Mutation>, wipe: bool },
    /// LSS holds nothing: send the device's state (versions restarted at 0, as LSS requires).
    Upload,
    /// LSS lacks the device's last transaction: send these (its keys as the device holds them).
    RollForward(Vec<Mutation>),
}

/// Decides how LSS's state `remote` and the device's synced state `local` (both sorted) meet.
fn plan(remote: &[Mutation], local: &[KVV]) -> Result<Plan, Error> {
    let local_synced = local.iter().any(|KVV(k, _)| k == WRITER_KEY);
    if remote.is_empty() {
        if local_synced {
            warn!("LSS holds nothing for this signer, but the device synced with an LSS before: uploading its state again");
        }
        return Ok(Plan::Upload);
    }
    if !local_synced {
        // Never synced: only a device that never answered anything may take LSS's state.
        let used = local.iter().any(|KVV(k, _)| k.starts_with(REPLY_KEY_PREFIX) || k == crate::NONCE_KEY);
        if used {
            return Err(lss_err(
                "this device has state that was never backed up, and LSS holds another state of this node: \
                 refusing to merge them (wipe the device's state directory to restore it from LSS)",
            ));
        }
        return Ok(Plan::Adopt { entries: remote.to_vec(), wipe: true });
    }
    let local_map: std::collections::BTreeMap<&str, &(u64, Vec<u8>)> =
        local.iter().map(|KVV(k, vv)| (k.as_str(), vv)).collect();
    let mut adopt = Vec::new();
    for m in remote {
        match local_map.get(m.key.as_str()) {
            None => adopt.push(m.clone()),
            Some((v, _)) if m.version > *v => adopt.push(m.clone()),
            Some((v, val)) if m.version == *v && *val == m.value => {}
            Some((v, _)) if m.version == *v => {
                return Err(lss_err(format!(
                    "LSS and the device hold different values of {} at version {v}: forked state",
                    m.key
                )))
            }
            Some((v, _)) => {
                return Err(lss_err(format!(
                    "LSS holds {} at version {}, older than the device's {v}: LSS was rolled back or is another server",
                    m.key, m.version
                )))
            }
        }
    }
    let remote_keys: std::collections::BTreeSet<&str> = remote.iter().map(|m| m.key.as_str()).collect();
    if let Some(KVV(k, (v, _))) = local.iter().find(|KVV(k, _)| !remote_keys.contains(k.as_str())) {
        return Err(lss_err(format!(
            "the device holds {k} (version {v}) that LSS does not: LSS was rolled back or is another server"
        )));
    }
    Ok(Plan::Adopt { entries: adopt, wipe: false })
}

/// [`plan`], knowing the device's last LSS-backed transaction `unacked` (its
/// [`crate::UNACKED_KEY`], if LSS may not have acknowledged it). Where `plan` refuses, that one
/// transaction may explain it:
/// - LSS holds its keys as they were before it: LSS never stored it (the device stopped before
///   the acknowledgement, or LSS dropped it). It is rolled forward: sent again in init-2-res.
///   That loses nothing: VLS made that state, and its reply, if it left, is the one a redelivery
///   gets.
/// - LSS holds other values that are newer than before it (values only a device of this node
///   can make, [`lss_value_key`]): another signer went on from the state before it, so its reply
///   never left. It is rolled back: the device takes LSS's state.
///
/// Anything else is `plan`'s refusal. A record whose versions the device no longer holds is stale
/// and ignored.
fn plan_with(remote: &[Mutation], local: &[KVV], unacked: &[UnackedKey]) -> Result<Plan, Error> {
    let first = plan(remote, local);
    if first.is_ok() || unacked.is_empty() {
        return first;
    }
    // Each key's state before the transaction, decoded once.
    let mut befores = Vec::with_capacity(unacked.len());
    for u in unacked {
        let before = match &u.before {
            None => None,
            Some((v, val)) => match hex::decode(val) {
                Ok(val) => Some((*v, val)),
                Err(_) => return first,
            },
        };
        befores.push((u.key.as_str(), before));
    }
    let mut base: std::collections::BTreeMap<&str, (u64, Vec<u8>)> =
        local.iter().map(|KVV(k, vv)| (k.as_str(), vv.clone())).collect();
    for (u, (key, before)) in unacked.iter().zip(&befores) {
        if base.get(key).map(|(v, _)| *v) != Some(u.after) {
            return first;
        }
        match before {
            None => base.remove(key),
            Some(vv) => base.insert(key, vv.clone()),
        };
    }
    let base: Vec<KVV> = base.into_iter().map(|(k, vv)| KVV(k.to_string(), vv)).collect();
    let remote_map: std::collections::BTreeMap<&str, (u64, &[u8])> =
        remote.iter().map(|m| (m.key.as_str(), (m.version, m.value.as_slice()))).collect();
    let lss_lacks_it = befores
        .iter()
        .all(|(key, before)| remote_map.get(key).copied() == before.as_ref().map(|(v, val)| (*v, val.as_slice())));
    match plan(remote, &base) {
        Ok(Plan::Adopt { entries, wipe: false }) if lss_lacks_it && entries.is_empty() => {
            let local_map: std::collections::BTreeMap<&str, &(u64, Vec<u8>)> =
                local.iter().map(|KVV(k, vv)| (k.as_str(), vv)).collect();
            let muts = unacked
                .iter()
                .filter_map(|u| {
                    local_map.get(u.key.as_str()).map(|(v, val)| Mutation::new(u.key.clone(), *v, val.clone()))
                })
                .collect();
            Ok(Plan::RollForward(muts))
        }
        Ok(Plan::Adopt { .. }) if !lss_lacks_it => Ok(Plan::Adopt { entries: remote.to_vec(), wipe: true }),
        _ => first,
    }
}

fn kvvs(m: &[Mutation]) -> Vec<KVV> {
    m.iter().map(|m| KVV(m.key.clone(), (m.version, m.value.clone()))).collect()
}

fn store_err(what: &str, e: lightning_signer::persist::Error) -> Error {
    Error::Persist(format!("{what}: {e:?}"))
}

impl Signer {
    /// Where the signer is with LSS (`None`: LSS off).
    pub fn lss_phase(&self) -> Option<LssPhase> {
        self.lss.as_ref().map(|l| l.phase)
    }

    /// The device's committed state that LSS holds too (every key but [`crate::LOCAL_ONLY_KEYS`]),
    /// sorted: after an acknowledged request it equals LSS's state for this signer.
    pub fn synced_state(&mut self) -> Result<Vec<Mutation>, Error> {
        let store = self.core()?.persister.inner().clone();
        let all = store.get_prefix("").map_err(|e| store_err("reading state", e))?;
        Ok(all
            .filter(|KVV(k, _)| synced(k))
            .map(|KVV(key, (version, value))| Mutation { key, version, value })
            .collect())
    }

    /// The device's state was backed up to LSS (it holds the writer key).
    fn backed_up(&self) -> bool {
        self.core.as_ref().is_some_and(|c| c.backed_up)
    }

    /// A new broker session began (the front end's MQTT connection): a request waiting for LSS
    /// is dropped (its reply was never released; the broker re-sends what is unanswered), and a
    /// device that was in sync with the last broker signs nothing until this one runs the init
    /// dance. A broker without LSS never does: the device then refuses as one backed up
    /// (unless `--allow-without-lss`, which then lets it sign without backup).
    pub fn new_session(&mut self) {
        if self.lss.is_none() {
            return;
        }
        self.drop_pending();
        if self.allow_without_lss {
            // The operator's choice: LSS off until a broker starts the dance again.
            if let Some(c) = self.core.as_ref() {
                c.persister.set_lss(false);
            }
            self.lss = None;
        } else if let Some(l) = self.lss.as_mut() {
            l.phase = LssPhase::Unsynced;
        }
    }

    /// Refuses to sign when LSS is on but not in sync, or a request is still waiting; and when it
    /// is off for a device whose state LSS holds, unless the operator allowed it.
    pub(crate) fn lss_ready(&self) -> Result<(), Error> {
        match &self.lss {
            // Once backed up, always backed up: a broker that does not sync a device whose state
            // LSS holds (the writer key) would otherwise let it sign state that no other signer
            // of this node can be restored to, and a standby later restored from LSS would sign
            // on the older state.
            None if !self.allow_without_lss && self.backed_up() => {
                Err(Error::LssNotSynced(NOT_SYNCED_BY_BROKER.into()))
            }
            None => Ok(()),
            Some(l) => match (&l.pending, l.phase) {
                (Some(p), _) => Err(Error::LssBusy(p.seq)),
                (None, LssPhase::Synced) => Ok(()),
                (None, LssPhase::Identified) => Err(Error::LssNotSynced("waiting for LSS's state (init-2)".into())),
                (None, LssPhase::Stale) => Err(Error::LssNotSynced("stale after an LSS conflict".into())),
                (None, LssPhase::Unsynced) => Err(Error::LssNotSynced(NOT_SYNCED_BY_BROKER.into())),
            },
        }
    }

    /// Ends a request's transaction: commits it (LSS off, or nothing to back up), or keeps it
    /// open and returns the `lss-res` payload (LSS on).
    pub(crate) fn finish(&mut self, p: &Persister, seq: u16) -> Result<Option<Vec<u8>>, Error> {
        if let Some(l) = self.lss.as_mut() {
            let key = l.value_key;
            let muts: Vec<Mutation> = to_wire(p.prepare()).into_iter().map(|m| lss::seal_value(&key, m)).collect();
            if !muts.is_empty() {
                // The before-images go to disk with the transaction (module docs).
                let inner = p.inner();
                let mut unacked = Vec::with_capacity(muts.len());
                for m in &muts {
                    let before = inner.get(&m.key).map_err(|e| store_err("reading state", e))?;
                    unacked.push(UnackedKey {
                        key: m.key.clone(),
                        before: before.map(|(v, val)| (v, hex::encode(val))),
                        after: m.version,
                    });
                }
                p.put(crate::UNACKED_KEY, encode_unacked(&unacked)).map_err(|e| store_err("staging", e))?;
                let expected = lss::server_hmac(&l.secret, &muts);
                let res = Response::VlsMuts(SignerMutations { client_hmac: lss::client_hmac(&l.secret, &muts), muts });
                l.pending =
                    Some(Pending { seq, expected, held: Vec::new(), commit: LocalCommit::Open, rebuild: false });
                return Ok(Some(res.encode()));
            }
        }
        commit(p).map(|()| None)
    }

    /// Holds an output until the staged state is acknowledged.
    pub(crate) fn hold(&mut self, h: Held) {
        if let Some(p) = self.lss.as_mut().and_then(|l| l.pending.as_mut()) {
            p.held.push(h);
        }
    }

    /// Drops a staged transaction and the in-memory state that made it.
    fn drop_pending(&mut self) {
        if let Some(l) = self.lss.as_mut() {
            if !l.queued.is_empty() {
                warn!(
                    queued = l.queued.len(),
                    "dropping queued broker messages (the broker re-sends what is unanswered)"
                );
                l.queued.clear();
            }
        }
        if let Some(p) = self.lss.as_mut().and_then(|l| l.pending.take()) {
            warn!(seq = p.seq, held = p.held.len(), "dropping state LSS did not acknowledge; nothing was released");
            // Committed already: on disk with its before-images, for the next init-2 to resolve.
            if p.commit != LocalCommit::Done {
                if let Some(c) = self.core.as_ref() {
                    c.persister.abort();
                }
                self.rebuild();
            } else if p.rebuild {
                self.rebuild();
            }
        }
    }

    /// The staged transaction's local commit, for the front end to run while the `lss-res` it
    /// just published crosses to LSS (one fsync off the reply's path); `None` if nothing is
    /// staged or it was taken already. Until [`Signer::staged_commit_done`] reports it, the
    /// front end hands the signer nothing else.
    pub fn take_staged_commit(&mut self) -> Option<StagedCommit> {
        let persister = self.core.as_ref()?.persister.clone();
        let p = self.lss.as_mut()?.pending.as_mut().filter(|p| p.commit == LocalCommit::Open)?;
        p.commit = LocalCommit::Running;
        Some(StagedCommit { persister })
    }

    /// Reports how a [`StagedCommit`] ended. A failure drops the staged state (nothing is
    /// released) and leaves the signer stale: LSS may hold the state the device lacks, and the
    /// next init dance takes it.
    pub fn staged_commit_done(&mut self, result: Result<(), Error>) {
        let Some(l) = self.lss.as_mut() else { return };
        let Some(p) = l.pending.as_mut().filter(|p| p.commit == LocalCommit::Running) else { return };
        match result {
            Ok(()) => {
                p.commit = LocalCommit::Done;
                l.last_acked = false;
            }
            Err(e) => {
                warn!(error = %e, seq = p.seq, "local commit failed; re-syncing from LSS");
                p.commit = LocalCommit::Open;
                l.phase = LssPhase::Stale;
                self.drop_pending();
            }
        }
    }

    /// init-1: `lss::Msg::Init` (the LSS server key) → the `init-1-res` payload: the signer's LSS
    /// client id (persistence key), auth token and a fresh nonce. A request still waiting for LSS
    /// is dropped (its reply was never released); the signer signs nothing until init-2.
    pub fn lss_init(&mut self, init_1_msg: &[u8]) -> Result<Vec<u8>, Error> {
        let init = match Msg::decode(init_1_msg).map_err(|e| lss_err(format!("init-1: {e}")))? {
            Msg::Init(i) => i,
            other => return Err(lss_err(format!("init-1 carries {other:?}"))),
        };
        let server = PublicKey::from_slice(&init.server_pubkey)
            .map_err(|e| lss_err(format!("init-1: server key is not a public key: {e}")))?;
        self.check_server(&init.server_pubkey)?;
        self.drop_pending();
        let last_acked = self.lss.as_ref().is_some_and(|l| l.last_acked);
        let core = self.core()?;
        core.persister.set_lss(true);
        let node = core.node.clone();
        let keys = catch_unwind(AssertUnwindSafe(|| {
            (node.get_persistence_pubkey().serialize(), node.get_persistence_shared_secret(&server))
        }));
        let (client_id, secret) = keys.map_err(|p| lss_err(format!("persistence keys: {}", panic_text(p))))?;
        let mut nonce = [0u8; lss::HASH_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        self.lss = Some(LssState {
            phase: LssPhase::Identified,
            queued: Default::default(),
            secret,
            value_key: lss_value_key(&self.seed),
            nonce: Some(nonce),
            pending: None,
            built: Vec::new(),
            last_acked,
            server: init.server_pubkey,
        });
        info!(client_id = %hex::encode(client_id), "LSS: identified to the broker's LSS");
        let r = InitResponse { client_id, auth_token: lss::auth_token(&secret), nonce: Some(nonce) };
        Ok(Response::Init(r).encode())
    }

    /// Refuses an LSS server other than the one this device is backed up to (or configured for):
    /// a broker could otherwise point the device at a server of its own, stop the real backups,
    /// and later restore a standby from the real one, which would sign on older state.
    fn check_server(&mut self, offered: &[u8; 33]) -> Result<(), Error> {
        if let Some(want) = self.lss_server {
            if want != *offered {
                return Err(lss_err(format!(
                    "the broker offers LSS server {}, but this device is configured for {}: refusing",
                    hex::encode(offered),
                    hex::encode(want)
                )));
            }
            return Ok(());
        }
        let pinned =
            self.core()?.persister.inner().get(crate::LSS_SERVER_KEY).map_err(|e| store_err("reading state", e))?;
        match pinned {
            Some((_, p)) if !p.is_empty() && p != offered.as_slice() => Err(lss_err(format!(
                "the broker offers LSS server {}, but this device is backed up to {}: refusing (if the server \
                 really changed, run the device with --lss-server-pubkey {})",
                hex::encode(offered),
                hex::encode(&p),
                hex::encode(offered)
            ))),
            _ => Ok(()),
        }
    }

    /// Pins the server of a completed init-2 (if not pinned to it already).
    fn pin_server(&mut self, server: [u8; 33]) -> Result<(), Error> {
        let store = self.backend_store()?;
        let pinned = store.get(crate::LSS_SERVER_KEY).map_err(|e| store_err("reading state", e))?;
        if pinned.as_ref().is_some_and(|(_, p)| p.as_slice() == server.as_slice()) {
            return Ok(());
        }
        let version = pinned.map_or(0, |(v, _)| v + 1);
        let kvv = vec![KVV(crate::LSS_SERVER_KEY.to_string(), (version, server.to_vec()))];
        store.put_batch(kvv).map_err(|e| store_err("pinning the LSS server", e))?;
        info!(server = %hex::encode(server), "LSS: this device is backed up to this server");
        Ok(())
    }

    /// init-2: `lss::Msg::Created` (LSS's state with its HMAC over init-1's nonce) → the
    /// `init-2-res` payload with the mutations LSS must store (module docs). A state that fails
    /// its HMAC, is behind the device's or forks from it is refused and changes nothing.
    pub fn lss_restore(&mut self, init_2_msg: &[u8]) -> Result<Vec<u8>, Error> {
        let (secret, value_key, nonce, server) = match self.lss.as_mut() {
            Some(l) if l.phase == LssPhase::Identified => match l.nonce.take() {
                Some(n) => (l.secret, l.value_key, n, l.server),
                None => return Err(lss_err("init-2 repeated: its nonce was used")),
            },
            _ => return Err(lss_err("init-2 before init-1")),
        };
        let state = match Msg::decode(init_2_msg).map_err(|e| lss_err(format!("init-2: {e}")))? {
            Msg::Created(s) => s,
            other => return Err(lss_err(format!("init-2 carries {other:?}"))),
        };
        if state.server_hmac != Some(lss::shared_hmac(&secret, &nonce, &state.muts)) {
            return Err(lss_err(format!(
                "LSS state ({} keys) fails its HMAC: tampered with, replayed or not from this LSS; refusing it",
                state.muts.len()
            )));
        }
        // The shared HMAC proves the state crossed the broker unchanged, not that LSS's store
        // holds what this signer wrote: each value's own tag does.
        let remote: Vec<Mutation> = state
            .muts
            .into_iter()
            .filter(|m| synced(&m.key))
            .map(|m| lss::open_value(&value_key, m))
            .collect::<Result<_, _>>()
            .map_err(|e| lss_err(format!("{e}; refusing LSS's state (nothing changed, nothing signed)")))?;
        let local: Vec<KVV> = self.synced_state()?.into_iter().map(|m| KVV(m.key, (m.version, m.value))).collect();
        let marker =
            self.core()?.persister.inner().get(crate::UNACKED_KEY).map_err(|e| store_err("reading state", e))?;
        let unacked = match (&marker, self.lss.as_ref().is_some_and(|l| l.last_acked)) {
            // Unreadable: the strict rules alone decide (they refuse what the record would explain).
            (Some((_, raw)), false) => decode_unacked(raw).unwrap_or_else(|e| {
                warn!(error = %e, "ignoring an unreadable record of the last transaction");
                Vec::new()
            }),
            _ => Vec::new(),
        };
        let mut upload: std::collections::BTreeMap<String, Mutation> = Default::default();
        match plan_with(&remote, &local, &unacked)? {
            Plan::Adopt { entries, wipe } => {
                if wipe {
                    self.replace_local(kvvs(&entries))?;
                } else {
                    // The store itself, not a node built on it.
                    let store = self.backend_store()?;
                    store.put_batch(kvvs(&entries)).map_err(|e| store_err("writing LSS state", e))?;
                }
                info!(keys = entries.len(), wiped = wipe, "LSS: state restored from LSS");
            }
            Plan::Upload => {
                let store = self.core()?.persister.inner().clone();
                store.reset_versions().map_err(|e| store_err("restarting versions", e))?;
                // New versions: the record of the last transaction no longer describes them.
                if marker.as_ref().is_some_and(|(_, raw)| !raw.is_empty()) {
                    store.delete(crate::UNACKED_KEY).map_err(|e| store_err("clearing the LSS record", e))?;
                }
                // Every backed-up state has a writer key (kept if the device has one).
                if store.get(WRITER_KEY).map_err(|e| store_err("reading state", e))?.is_none() {
                    let writer = vec![KVV(WRITER_KEY.to_string(), (0, store.signer_id().to_vec()))];
                    store.put_batch(writer).map_err(|e| store_err("writing the writer key", e))?;
                }
                for KVV(k, (_, v)) in store.get_prefix("").map_err(|e| store_err("reading state", e))? {
                    if synced(&k) {
                        upload.insert(k.clone(), Mutation::new(k, 0, v));
                    }
                }
                info!(keys = upload.len(), "LSS: LSS holds nothing for this signer; sending the device's state");
            }
            Plan::RollForward(muts) => {
                warn!(keys = muts.len(), "LSS lacks the device's last transaction: sending it again");
                for m in muts {
                    upload.insert(m.key.clone(), m);
                }
            }
        }

        self.pin_server(server)?;
        // Reload the node from what is now on disk; a new node's creation goes to LSS too.
        self.core = None;
        self.reopen_store();
        let core = self.build_core()?;
        self.core = Some(core);
        if let Some(l) = self.lss.as_mut() {
            for m in std::mem::take(&mut l.built) {
                upload.insert(m.key.clone(), m);
            }
            l.phase = LssPhase::Synced;
        }
        let muts: Vec<Mutation> = upload.into_values().map(|m| lss::seal_value(&value_key, m)).collect();
        Ok(Response::Created(SignerMutations { client_hmac: lss::client_hmac(&secret, &muts), muts }).encode())
    }

    /// Closes redb (if nothing else holds it) so the next build reads it afresh.
    fn reopen_store(&mut self) {
        if let Backend::Redb { store, .. } = &mut self.backend {
            if store.as_ref().is_some_and(|s| s.is_unique()) {
                *store = None;
            }
        }
    }

    /// Replaces the local state by `entries` (LSS's), keeping the local-only keys but the record
    /// of the last transaction (it goes with the state it described): on a never-used device, or
    /// on one whose last transaction LSS went on without. On disk the new state is built whole
    /// beside the old and moved over it (`crate::replace_redb`): a crash leaves one or the other.
    fn replace_local(&mut self, entries: Vec<KVV>) -> Result<(), Error> {
        let store = self.core()?.persister.inner().clone();
        let mut all: Vec<KVV> = store
            .get_prefix("")
            .map_err(|e| store_err("reading state", e))?
            .filter(|KVV(k, _)| !synced(k) && k != crate::UNACKED_KEY)
            .collect();
        all.extend(entries);
        drop(store);
        self.core = None;
        match &mut self.backend {
            Backend::Memory(s) => {
                *s = AnyStore::memory();
                s.put_batch(all).map_err(|e| store_err("writing LSS state", e))?;
            }
            Backend::Redb { dir, store } => {
                if !store.as_ref().is_some_and(|s| s.is_unique()) {
                    return Err(lss_err("cannot replace the local state: it is still in use"));
                }
                *store = None;
                crate::replace_redb(dir, all)?;
                *store = Some(crate::open_redb(dir)?);
            }
        }
        Ok(())
    }

    /// The backend's store (opened if closed), without building a node on it.
    fn backend_store(&mut self) -> Result<AnyStore, Error> {
        match &mut self.backend {
            Backend::Memory(s) => Ok(s.clone()),
            Backend::Redb { dir, store } => {
                if store.is_none() {
                    *store = Some(crate::open_redb(dir)?);
                }
                store.clone().ok_or_else(|| lss_err("state store missing"))
            }
        }
    }

    /// `lss-msg`: LSS stored the staged mutations. If its HMAC is the one expected for exactly
    /// them, the state is committed locally and the held outputs are released, in order.
    /// Otherwise nothing is released and the signer is stale until the next init dance.
    pub fn lss_stored(&mut self, lss_msg: &[u8]) -> Result<Released, Error> {
        let msg = Msg::decode(lss_msg).map_err(|e| lss_err(format!("lss-msg: {e}")));
        let pending = self.lss.as_mut().and_then(|l| l.pending.take());
        let Some(pending) = pending else {
            return Err(lss_err("lss-msg while nothing waits for LSS"));
        };
        let ok = matches!(&msg, Ok(Msg::Stored(s)) if s.server_hmac == Some(pending.expected));
        if !ok {
            // Put it back so it is dropped with the in-memory state that made it.
            if let Some(l) = self.lss.as_mut() {
                l.pending = Some(pending);
                l.phase = LssPhase::Stale;
            }
            self.drop_pending();
            return Err(match msg {
                Err(e) => e,
                Ok(m) => lss_err(format!(
                    "LSS's acknowledgement does not prove it stored this state ({m:?}); nothing released, re-syncing"
                )),
            });
        }
        let committed = match pending.commit {
            LocalCommit::Done => Some(Ok(())),
            LocalCommit::Open => self.core.as_ref().map(|c| commit(&c.persister)),
            LocalCommit::Running => {
                if let Some(l) = self.lss.as_mut() {
                    l.pending = Some(pending);
                }
                return Err(lss_err("lss-msg before the staged commit was reported (front-end bug)"));
            }
        };
        match committed {
            Some(Ok(())) => {
                if let Some(l) = self.lss.as_mut() {
                    l.last_acked = true;
                }
                if pending.rebuild {
                    self.rebuild();
                }
                Ok(pending.held)
            }
            Some(Err(e)) => {
                self.rebuild();
                if let Some(l) = self.lss.as_mut() {
                    l.phase = LssPhase::Stale;
                }
                Err(e)
            }
            None => Err(lss_err("signer state unavailable at commit")),
        }
    }

    /// `lss-conflict`: LSS holds newer state than this signer. The staged state is dropped (its
    /// outputs are never released) and the signer signs nothing until the next init dance.
    /// Returns the `lss-conflict-res` payload.
    pub fn lss_conflict(&mut self) -> Vec<u8> {
        self.drop_pending();
        if let Some(l) = self.lss.as_mut() {
            l.phase = LssPhase::Stale;
        }
        warn!("LSS conflict: this signer's state is stale; waiting for the broker to re-sync it");
        Response::PutConflictConfirmed.encode()
    }
}

impl Signer {
    /// Can a run of requests be staged as one group now (in sync, nothing waiting for LSS)?
    pub(crate) fn lss_groupable(&self) -> bool {
        self.reset.is_none() && self.lss.is_some() && self.lss_ready().is_ok()
    }

    /// LSS group commit: stages `payloads` (`vls` request frames, in order) in one transaction,
    /// each seeing the ones before it, and backs them up with one `lss-res`; their replies are
    /// held until its acknowledgement, as one request's. A request that fails without changing
    /// anything is answered at once; one that needs a transaction of its own (`hsmd_init`) ends
    /// the group before it, one that failed after changing the in-memory node ends it after it
    /// (the node is rebuilt once the group is committed). Returns the outputs and how many
    /// payloads were taken; the caller handles the rest.
    pub(crate) fn stage_group(&mut self, payloads: &[&[u8]]) -> (Vec<Output>, usize) {
        use sphinx_wire::topics as t;
        let mut out = Vec::new();
        let mut held: Vec<Reply> = Vec::new();
        let mut rebuild = false;
        let mut taken = payloads.len();
        let error = |seq: u16, error: Error| failed(crate::FrameError { seq, error });
        for (k, payload) in payloads.iter().enumerate() {
            let seq = sphinx_wire::serial::Request::seq_of(payload);
            let req = match sphinx_wire::serial::Request::decode(payload) {
                Ok(r) => r,
                Err(e) => {
                    out.push(error(seq, e.into()));
                    continue;
                }
            };
            match self.batch_step(&req) {
                crate::Step::Staged(reply) => held.push(reply),
                crate::Step::Failed(e) => out.push(error(seq, e)),
                crate::Step::FlushThen(e) => {
                    out.push(error(seq, e));
                    rebuild = true;
                    taken = k + 1;
                    break;
                }
                crate::Step::Alone => {
                    taken = k;
                    break;
                }
            }
        }
        let Some(persister) = self.core.as_ref().map(|c| c.persister.clone()) else {
            out.extend(held.into_iter().map(|r| error(r.seq, Error::Unavailable("signer state lost".into()))));
            return (out, taken);
        };
        let first = held.first().map_or(0, |r| r.seq);
        match self.finish(&persister, first) {
            Ok(None) => {
                out.extend(held.into_iter().map(|r| publish(t::VLS_RES, r.encode())));
                if rebuild {
                    self.rebuild();
                }
            }
            Ok(Some(lss_res)) => {
                if let Some(p) = self.lss.as_mut().and_then(|l| l.pending.as_mut()) {
                    p.rebuild = rebuild;
                    p.held.extend(held.into_iter().map(Held::Reply));
                }
                out.push(publish(t::LSS_RES, lss_res));
            }
            Err(e) => {
                warn!(requests = held.len(), error = %e, "group commit failed; nothing of it was released");
                out.extend(held.into_iter().map(|r| error(r.seq, Error::Persist(e.to_string()))));
                persister.abort();
                self.rebuild();
            }
        }
        (out, taken)
    }
}

/// What to publish (or do) in answer to one message from the broker.
#[derive(Debug)]
pub enum Output {
    /// Publish `payload` on `{id}/{topic}`.
    Publish {
        /// Topic suffix (`sphinx_wire::topics`).
        topic: &'static str,
        /// Payload.
        payload: Vec<u8>,
    },
    /// A control message's outcome: publish `response` on `control-res`, then carry out its
    /// action (the resets, which only the device's front end can do).
    Control(ControlOutcome),
}

fn publish(topic: &'static str, payload: Vec<u8>) -> Output {
    Output::Publish { topic, payload }
}

/// A failed request: logged, and its report on `error` (`seq | text`).
pub(crate) fn failed(e: crate::FrameError) -> Output {
    warn!(seq = e.seq, error = %e.error, "request failed");
    publish(sphinx_wire::topics::ERROR, e.payload())
}

impl Signer {
    /// Handles one message the broker sent on `{id}/{suffix}` and says what to publish: the one
    /// path every front end (sphinx-key's MQTT client, tests) takes. `vls` and `init-3-msg` carry
    /// serial request frames; `control` owner messages; `init-1-msg`, `init-2-msg`, `lss-msg`,
    /// `lss-conflict` LSS messages. Failures are published on `error` (`seq | text`).
    pub fn on_message(&mut self, suffix: &str, payload: &[u8]) -> Vec<Output> {
        use sphinx_wire::topics as t;
        let err = |e: &Error| publish(t::ERROR, sphinx_wire::error_report::encode(0, &e.to_string()));
        // While a request waits for LSS, later requests wait behind it (in order).
        if let Some(l) = self.lss.as_mut().filter(|l| l.pending.is_some()) {
            let queued_suffix = match suffix {
                t::VLS => Some(t::VLS),
                t::CONTROL => Some(t::CONTROL),
                _ => None,
            };
            if let Some(q) = queued_suffix {
                if l.queued.len() < MAX_QUEUED {
                    l.queued.push_back((q, payload.to_vec()));
                    return Vec::new();
                }
                let seq = sphinx_wire::serial::Request::seq_of(payload);
                let busy = Error::LssBusy(l.pending.as_ref().map(|p| p.seq).unwrap_or(0));
                return vec![publish(t::ERROR, crate::FrameError { seq, error: busy }.payload())];
            }
        }
        match suffix {
            t::VLS | t::INIT_3_MSG => {
                let answer = if suffix == t::VLS { t::VLS_RES } else { t::INIT_3_RES };
                let seq = sphinx_wire::serial::Request::seq_of(payload);
                let staged =
                    sphinx_wire::serial::Request::decode(payload).map_err(Error::from).and_then(|req| self.stage(&req));
                match staged {
                    Ok(Outcome::Ready(reply)) => vec![publish(answer, reply.encode())],
                    Ok(Outcome::Backup { lss_res }) => vec![publish(t::LSS_RES, lss_res)],
                    Err(error) => vec![failed(crate::FrameError { seq, error })],
                }
            }
            t::CONTROL => match self.stage_control(payload) {
                Outcome::Ready(o) => vec![Output::Control(o)],
                Outcome::Backup { lss_res } => vec![publish(t::LSS_RES, lss_res)],
            },
            t::INIT_1_MSG => match self.lss_init(payload) {
                Ok(r) => vec![publish(t::INIT_1_RES, r)],
                Err(e) => vec![err(&e)],
            },
            t::INIT_2_MSG => match self.lss_restore(payload) {
                Ok(r) => vec![publish(t::INIT_2_RES, r)],
                Err(e) => {
                    warn!(error = %e, "LSS state refused");
                    vec![err(&e)]
                }
            },
            t::LSS_MSG => match self.lss_stored(payload) {
                Ok(released) => {
                    let mut out: Vec<Output> = released
                        .into_iter()
                        .map(|h| match h {
                            Held::Reply(r) => publish(t::VLS_RES, r.encode()),
                            Held::Control(o) => Output::Control(o),
                        })
                        .collect();
                    // Then what waited behind it (grouped again), in order: what comes after the
                    // next staged group is queued again.
                    let queued: Vec<(&'static str, Vec<u8>)> =
                        self.lss.as_mut().map(|l| l.queued.drain(..).collect()).unwrap_or_default();
                    let views: Vec<(&str, &[u8])> = queued.iter().map(|(s, p)| (*s, p.as_slice())).collect();
                    out.extend(self.on_messages(&views));
                    out
                }
                Err(e) => vec![err(&e)],
            },
            t::LSS_CONFLICT => vec![publish(t::LSS_CONFLICT_RES, self.lss_conflict())],
            other => {
                vec![publish(t::ERROR, sphinx_wire::error_report::encode(0, &format!("unexpected topic {other}")))]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(k: &str, v: u64, val: &[u8]) -> Mutation {
        Mutation::new(k, v, val.to_vec())
    }
    fn l(k: &str, v: u64, val: &[u8]) -> KVV {
        KVV(k.to_string(), (v, val.to_vec()))
    }
    fn err(p: Result<Plan, Error>) -> String {
        match p {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn merge_rules_take_newer_lss_state_and_refuse_rollbacks_and_forks() {
        let local = vec![l(WRITER_KEY, 3, b"me"), l("node/state/x", 5, b"s5"), l("sphinx/reply/1", 2, b"r")];
        // LSS newer (a standby catching up): newer and new keys are adopted, equal ones skipped.
        let remote = vec![
            m(WRITER_KEY, 4, b"other"),
            m("channel/a", 0, b"c"),
            m("node/state/x", 6, b"s6"),
            m("sphinx/reply/1", 2, b"r"),
        ];
        match plan(&remote, &local) {
            Ok(Plan::Adopt { entries, wipe: false }) => {
                let keys: Vec<_> = entries.iter().map(|m| m.key.as_str()).collect();
                assert_eq!(keys, vec![WRITER_KEY, "channel/a", "node/state/x"]);
            }
            _ => panic!("expected adopt"),
        }
        // LSS older than the device: rolled back.
        let older = vec![m(WRITER_KEY, 3, b"me"), m("node/state/x", 4, b"s4"), m("sphinx/reply/1", 2, b"r")];
        assert!(err(plan(&older, &local)).contains("rolled back"));
        // A key the device has and LSS lacks.
        let missing = vec![m(WRITER_KEY, 3, b"me"), m("node/state/x", 5, b"s5")];
        assert!(err(plan(&missing, &local)).contains("does not"));
        // Same version, another value: a fork.
        let fork = vec![m(WRITER_KEY, 3, b"me"), m("node/state/x", 5, b"X"), m("sphinx/reply/1", 2, b"r")];
        assert!(err(plan(&fork, &local)).contains("forked"));
    }

    #[test]
    fn never_synced_devices_upload_or_restore_but_never_merge_histories() {
        // LSS empty: whatever the device has is uploaded.
        assert!(matches!(plan(&[], &[l("node/state/x", 7, b"s")]), Ok(Plan::Upload)));
        assert!(matches!(plan(&[], &[]), Ok(Plan::Upload)));
        // A fresh device (a node created at open, nothing answered) takes LSS's state whole.
        let remote = vec![m(WRITER_KEY, 9, b"w"), m("node/state/x", 40, b"s")];
        assert!(matches!(plan(&remote, &[l("node/state/x", 0, b"new")]), Ok(Plan::Adopt { wipe: true, .. })));
        // A device that answered requests without backup does not take another history.
        let used = vec![l("node/state/x", 3, b"s"), l("sphinx/reply/4", 0, b"r")];
        assert!(err(plan(&remote, &used)).contains("never backed up"));
    }

    fn u(k: &str, before: Option<(u64, &[u8])>, after: u64) -> UnackedKey {
        UnackedKey { key: k.to_string(), before: before.map(|(v, val)| (v, hex::encode(val))), after }
    }

    #[test]
    fn the_last_transaction_is_rolled_forward_when_lss_lacks_it_and_back_when_lss_went_on_without_it() {
        // The device's last transaction T wrote x 5 → 6, created channel/b, bumped the writer.
        let local =
            vec![l(WRITER_KEY, 4, b"me"), l("channel/b", 0, b"b"), l("node/state/x", 6, b"s6"), l("r", 1, b"r")];
        let t =
            vec![u(WRITER_KEY, Some((3, b"me")), 4), u("channel/b", None, 0), u("node/state/x", Some((5, b"s5")), 6)];
        let base = vec![m(WRITER_KEY, 3, b"me"), m("node/state/x", 5, b"s5"), m("r", 1, b"r")];
        // Without the record, LSS at the state before T looks rolled back: refused.
        assert!(err(plan_with(&base, &local, &[])).contains("rolled back"));
        // With it: LSS lacks T, which is sent again (its keys as the device holds them).
        match plan_with(&base, &local, &t) {
            Ok(Plan::RollForward(muts)) => {
                assert_eq!(muts, vec![m(WRITER_KEY, 4, b"me"), m("channel/b", 0, b"b"), m("node/state/x", 6, b"s6")])
            }
            _ => panic!("expected a roll forward"),
        }
        // LSS holds T: nothing to resolve.
        let with_t =
            vec![m(WRITER_KEY, 4, b"me"), m("channel/b", 0, b"b"), m("node/state/x", 6, b"s6"), m("r", 1, b"r")];
        assert!(
            matches!(plan_with(&with_t, &local, &t), Ok(Plan::Adopt { ref entries, wipe: false }) if entries.is_empty())
        );
        // Another signer went on from the state before T (same versions, its own values): T is
        // rolled back and LSS's state taken whole.
        let other = vec![m(WRITER_KEY, 4, b"other"), m("node/state/x", 6, b"o6"), m("r", 2, b"r2")];
        match plan_with(&other, &local, &t) {
            Ok(Plan::Adopt { entries, wipe: true }) => assert_eq!(entries, other),
            _ => panic!("expected LSS's state"),
        }
        // LSS older than the state before T: refused as ever.
        let older = vec![m(WRITER_KEY, 2, b"me"), m("node/state/x", 4, b"s4"), m("r", 1, b"r")];
        assert!(err(plan_with(&older, &local, &t)).contains("rolled back"));
        // LSS at the state before T but behind on another key: not T's doing, refused.
        let behind = vec![m(WRITER_KEY, 3, b"me"), m("node/state/x", 5, b"s5"), m("r", 0, b"r0")];
        assert!(err(plan_with(&behind, &local, &t)).contains("rolled back"));
        // A record the device's versions no longer match is stale: ignored.
        let moved =
            vec![l(WRITER_KEY, 5, b"me"), l("channel/b", 1, b"b"), l("node/state/x", 7, b"s7"), l("r", 1, b"r")];
        assert!(err(plan_with(&base, &moved, &t)).contains("rolled back"));
    }
}
