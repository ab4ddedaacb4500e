//! The key-version-value store under the VLS persister: redb on disk, or memory for tests.
//!
//! Both backends sit behind [`TxnStore`], which buffers every write between `enter()` and
//! `commit()` and then writes them with one `put_batch`. For redb that is one write transaction,
//! committed with redb's default `Durability::Immediate` (fsync) before it returns.
//!
//! With LSS off, `TxnStore` behaves exactly as `vls_persist`'s `TransactionalKVVStore` (same
//! versions, same batch), so the on-disk state is the same as before LSS existed. With LSS on it
//! follows LSS's version rule instead, as VLS's `CloudKVVStore` does: every key written in a
//! transaction gets the committed version + 1 (0 if new) however often it is written, and each
//! transaction that changes synced state also writes [`WRITER_KEY`] (this signer's id, one version
//! up), so two signers of one node always collide on a key and a stale one gets a conflict
//! instead of forking the state. [`LOCAL_ONLY_KEYS`] stay on the device.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use lightning_signer::persist::{Error as PersistError, Mutations, SignerId};
use lightning_signer::SendSync;
use vls_persist::kvv::memory::MemoryKVVStore;
use vls_persist::kvv::redb::RedbKVVStore;
use vls_persist::kvv::{JsonFormat, KVVPersister, KVVStore, KVV};

/// The persister handed to VLS: JSON values in a transactional KVV store.
pub(crate) type Persister = KVVPersister<TxnStore, JsonFormat>;

/// The last writer of the synced state: this signer's 16-byte id, one version more per
/// transaction (the key VLS's `CloudKVVStore` uses, so upstream signers read the same state).
pub const WRITER_KEY: &str = "_WRITER";

/// Keys that are never sent to LSS: the stored `hsmd_init` is a cache of what lightningd sends
/// on every start (the broker replays it in init-3), not state; the unacknowledged-transaction
/// record and the pinned LSS server key describe the device's relation to LSS.
pub const LOCAL_ONLY_KEYS: &[&str] = &[crate::INIT_KEY, crate::UNACKED_KEY, crate::LSS_SERVER_KEY];

/// Is `key` part of the state kept in LSS?
pub(crate) fn synced(key: &str) -> bool {
    !LOCAL_ONLY_KEYS.contains(&key)
}

/// Signer id of the in-memory store (redb keeps its own random one; VLS uses it only for LSS).
const MEMORY_SIGNER_ID: SignerId = *b"sphinx-in-memory";

/// A KVV store that is either in memory or in redb, shared by reference so that the
/// transactional wrapper above it can be dropped (abandoning its uncommitted writes) and rebuilt.
#[derive(Clone)]
pub(crate) enum AnyStore {
    /// In-memory (tests and benchmarks).
    Memory(Arc<MemoryKVVStore>),
    /// redb in a state directory.
    Redb(Arc<RedbKVVStore>),
}

impl AnyStore {
    pub(crate) fn memory() -> Self {
        AnyStore::Memory(Arc::new(MemoryKVVStore::new(MEMORY_SIGNER_ID)))
    }

    /// Opens redb under `dir` (the file is `dir/redb`). `RedbKVVStore::new` panics on a bad
    /// directory or a corrupt file; the caller catches that.
    pub(crate) fn open_redb(dir: &Path) -> Self {
        AnyStore::Redb(Arc::new(RedbKVVStore::new(dir)))
    }

    /// True if nothing else (an old persister or node) still holds this store.
    pub(crate) fn is_unique(&self) -> bool {
        match self {
            AnyStore::Memory(s) => Arc::strong_count(s) == 1,
            AnyStore::Redb(s) => Arc::strong_count(s) == 1,
        }
    }
}

impl SendSync for AnyStore {}

/// Iterator over a prefix of an [`AnyStore`].
pub(crate) struct Iter(std::vec::IntoIter<KVV>);

impl Iterator for Iter {
    type Item = KVV;
    fn next(&mut self) -> Option<KVV> {
        self.0.next()
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Memory($s) => $e,
            AnyStore::Redb($s) => $e,
        }
    };
}

impl KVVStore for AnyStore {
    type Iter = Iter;

    fn put(&self, key: &str, value: Vec<u8>) -> Result<(), PersistError> {
        each!(self, s => s.put(key, value))
    }
    fn put_with_version(&self, key: &str, version: u64, value: Vec<u8>) -> Result<(), PersistError> {
        each!(self, s => s.put_with_version(key, version, value))
    }
    fn put_batch(&self, kvvs: Vec<KVV>) -> Result<(), PersistError> {
        each!(self, s => s.put_batch(kvvs))
    }
    fn get(&self, key: &str) -> Result<Option<(u64, Vec<u8>)>, PersistError> {
        each!(self, s => s.get(key))
    }
    fn get_version(&self, key: &str) -> Result<Option<u64>, PersistError> {
        each!(self, s => s.get_version(key))
    }
    fn get_prefix(&self, prefix: &str) -> Result<Iter, PersistError> {
        let v: Vec<KVV> = each!(self, s => s.get_prefix(prefix)?.collect());
        Ok(Iter(v.into_iter()))
    }
    fn delete(&self, key: &str) -> Result<(), PersistError> {
        each!(self, s => s.delete(key))
    }
    fn clear_database(&self) -> Result<(), PersistError> {
        each!(self, s => s.clear_database())
    }
    fn reset_versions(&self) -> Result<(), PersistError> {
        each!(self, s => s.reset_versions())
    }
    fn signer_id(&self) -> SignerId {
        each!(self, s => s.signer_id())
    }
}

type VersionedValue = (u64, Vec<u8>);
pub(crate) type Log = BTreeMap<String, VersionedValue>;

/// A transactional wrapper: writes between `enter` and `commit` are buffered and written as one
/// batch; outside a transaction they go straight through. See the module docs for the two
/// version rules.
pub(crate) struct TxnStore {
    inner: AnyStore,
    log: Mutex<Option<Log>>,
    lss: AtomicBool,
    /// Writes buffered in transactions so far (see [`TxnStore::writes`]).
    writes: AtomicU64,
}

impl SendSync for TxnStore {}

impl TxnStore {
    fn log(&self) -> MutexGuard<'_, Option<Log>> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Switches to LSS's version rule (one version step per transaction, and the writer key).
    pub(crate) fn set_lss(&self, on: bool) {
        self.lss.store(on, Ordering::SeqCst);
    }

    fn lss(&self) -> bool {
        self.lss.load(Ordering::SeqCst)
    }

    /// The store under the transactions (for the LSS restore, which writes LSS's versions as they are).
    pub(crate) fn inner(&self) -> &AnyStore {
        &self.inner
    }

    /// Drops the open transaction's writes (the caller also drops the in-memory node that made them).
    pub(crate) fn abort(&self) {
        *self.log() = None;
    }

    /// How many writes transactions have buffered so far: a request whose handling did not move
    /// it changed nothing (no record, no commit needed). Cheaper than comparing snapshots.
    pub(crate) fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// A transaction is open.
    pub(crate) fn in_transaction(&self) -> bool {
        self.log().is_some()
    }

    /// A copy of the open transaction's writes (`None`: no transaction): a group commit takes
    /// one before each request so that a refused request's writes can be taken back without
    /// losing the batch's earlier ones.
    pub(crate) fn snapshot(&self) -> Option<Log> {
        self.log().clone()
    }

    /// Puts the open transaction back to `snap` (from [`TxnStore::snapshot`]).
    pub(crate) fn restore(&self, snap: Option<Log>) {
        *self.log() = snap;
    }

    /// The writer-key entry the open transaction adds when it changes synced state (LSS on).
    fn writer_entry(&self, log: &Log) -> Result<Option<(String, VersionedValue)>, PersistError> {
        if !self.lss() || !log.keys().any(|k| synced(k)) {
            return Ok(None);
        }
        let version = self.inner.get_version(WRITER_KEY)?.map(|v| v + 1).unwrap_or(0);
        Ok(Some((WRITER_KEY.to_string(), (version, self.inner.signer_id().to_vec()))))
    }
}

impl KVVStore for TxnStore {
    type Iter = Iter;

    fn put(&self, key: &str, value: Vec<u8>) -> Result<(), PersistError> {
        let version = if self.lss() { self.inner.get_version(key)? } else { self.get_version(key)? };
        self.put_with_version(key, version.map(|v| v + 1).unwrap_or(0), value)
    }

    fn put_with_version(&self, key: &str, version: u64, value: Vec<u8>) -> Result<(), PersistError> {
        let mut guard = self.log();
        let Some(log) = guard.as_mut() else {
            return self.inner.put_with_version(key, version, value);
        };
        // LSS: compare with what is committed (a key may be rewritten in one transaction);
        // otherwise with the transaction's view, as `TransactionalKVVStore`.
        let existing = match (self.lss(), log.get(key)) {
            (false, Some((v, val))) => Some((*v, val.clone())),
            _ => self.inner.get(key)?,
        };
        if let Some((v, val)) = existing {
            if version < v || (version == v && val != value) {
                return Err(PersistError::VersionMismatch);
            }
            if version == v {
                return Ok(());
            }
        }
        log.insert(key.to_string(), (version, value));
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn put_batch(&self, kvvs: Vec<KVV>) -> Result<(), PersistError> {
        if self.log().is_none() {
            return self.inner.put_batch(kvvs);
        }
        for KVV(key, (version, value)) in kvvs {
            self.put_with_version(&key, version, value)?;
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<(u64, Vec<u8>)>, PersistError> {
        if let Some(Some(e)) = self.log().as_ref().map(|l| l.get(key).cloned()) {
            return Ok(Some(e));
        }
        self.inner.get(key)
    }

    fn get_version(&self, key: &str) -> Result<Option<u64>, PersistError> {
        if let Some(Some((v, _))) = self.log().as_ref().map(|l| l.get(key).cloned()) {
            return Ok(Some(v));
        }
        self.inner.get_version(key)
    }

    fn get_prefix(&self, prefix: &str) -> Result<Iter, PersistError> {
        let mut all: Log = self.inner.get_prefix(prefix)?.map(KVV::into_inner).collect();
        if let Some(log) = self.log().as_ref() {
            for (k, vv) in log.range(prefix.to_string()..).take_while(|(k, _)| k.starts_with(prefix)) {
                all.insert(k.clone(), vv.clone());
            }
        }
        Ok(Iter(all.into_iter().map(|(k, vv)| KVV(k, vv)).collect::<Vec<_>>().into_iter()))
    }

    fn delete(&self, key: &str) -> Result<(), PersistError> {
        self.put(key, Vec::new())
    }

    fn clear_database(&self) -> Result<(), PersistError> {
        if self.log().as_ref().is_some_and(|l| !l.is_empty()) {
            return Err(PersistError::Internal("cannot clear the database with pending writes".into()));
        }
        self.inner.clear_database()
    }

    fn enter(&self) -> Result<(), PersistError> {
        let mut log = self.log();
        if log.is_some() {
            return Err(PersistError::Internal("transaction already open".into()));
        }
        *log = Some(Log::new());
        Ok(())
    }

    /// The open transaction's writes of synced state, sorted by key, with the writer key (LSS
    /// on); every write (LSS off, as `TransactionalKVVStore`).
    fn prepare(&self) -> Mutations {
        let guard = self.log();
        let Some(log) = guard.as_ref() else {
            return Mutations::new();
        };
        let mut out: Log =
            log.iter().filter(|(k, _)| !self.lss() || synced(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        if let Ok(Some((k, v))) = self.writer_entry(log) {
            out.insert(k, v);
        }
        Mutations::from_vec(out.into_iter().collect())
    }

    fn commit(&self) -> Result<(), PersistError> {
        let mut guard = self.log();
        let Some(mut log) = guard.take() else {
            return Ok(());
        };
        if let Some((k, v)) = self.writer_entry(&log)? {
            log.insert(k, v);
        }
        if log.is_empty() {
            return Ok(());
        }
        self.inner.put_batch(log.into_iter().map(|(k, vv)| KVV(k, vv)).collect())
    }

    fn put_batch_unlogged(&self, kvvs: Vec<KVV>) -> Result<(), PersistError> {
        if self.log().is_some() {
            return Err(PersistError::Internal("cannot write around an open transaction".into()));
        }
        self.inner.put_batch(kvvs)
    }

    fn reset_versions(&self) -> Result<(), PersistError> {
        if self.log().is_some() {
            return Err(PersistError::Internal("cannot reset versions in a transaction".into()));
        }
        self.inner.reset_versions()
    }

    fn signer_id(&self) -> SignerId {
        self.inner.signer_id()
    }
}

/// Wraps a store in a fresh transactional persister (`lss`: LSS's version rule).
pub(crate) fn persister(store: AnyStore, lss: bool) -> Persister {
    KVVPersister(
        TxnStore { inner: store, log: Mutex::new(None), lss: AtomicBool::new(lss), writes: AtomicU64::new(0) },
        JsonFormat,
    )
}
