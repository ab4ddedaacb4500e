//! The key-version-value store under the VLS persister: redb on disk, or memory for tests.
//!
//! Both backends sit behind `vls_persist`'s [`TransactionalKVVStore`], which buffers every write
//! between `enter()` and `commit()` and then writes them with one `put_batch`. For redb that is one
//! write transaction, committed with redb's default `Durability::Immediate` (fsync) before it returns.

use std::path::Path;
use std::sync::Arc;

use lightning_signer::persist::{Error as PersistError, SignerId};
use lightning_signer::SendSync;
use vls_persist::kvv::memory::MemoryKVVStore;
use vls_persist::kvv::redb::RedbKVVStore;
use vls_persist::kvv::transactional::TransactionalKVVStore;
use vls_persist::kvv::{JsonFormat, KVVPersister, KVVStore, KVV};

/// The persister handed to VLS: JSON values in a transactional KVV store.
pub(crate) type Persister = KVVPersister<TransactionalKVVStore<AnyStore>, JsonFormat>;

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

/// Wraps a store in a fresh transactional persister.
pub(crate) fn persister(store: AnyStore) -> Persister {
    KVVPersister(TransactionalKVVStore::new(store), JsonFormat)
}
