//! The redb backend, and the only file that names redb: one redb table of bytes per key space,
//! one write transaction per batch committed with `Durability::Immediate` (so that a caller told
//! "done" can lose nothing), MVCC read transactions as snapshots (a read never waits for the
//! writer).
//!
//! A data file of storage layout 1 (the previous release's typed tables) is migrated in place
//! when it is opened (see `redb_migrate.rs`).
//!
//! After a failed commit redb refuses further writes until the database is opened again (its
//! in-memory state may disagree with the file), so [`KvStore::recover`] reopens a file-backed
//! database: once the cause is gone (space freed), writes succeed again without a restart.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use redb::{
    Database, Durability, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable,
    TableDefinition,
};

use super::kv::{Batch, Entry, KvStore, Order, Snapshot, Space};
use crate::error::{Error, Result};

/// The definition of a space's table. Names carry a `kv.` prefix so that they never meet the
/// typed tables of the first layout.
pub(super) fn table(space: Space) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    TableDefinition::new(TABLE_NAMES[space as usize - 1])
}

const TABLE_NAMES: [&str; 29] = [
    "kv.meta",
    "kv.rooms",
    "kv.room_stats",
    "kv.event_types",
    "kv.schemas",
    "kv.events",
    "kv.room_log",
    "kv.key_seq",
    "kv.seq_checkpoint",
    "kv.idempotency",
    "kv.idempotency_expiry",
    "kv.responses",
    "kv.response_expiry",
    "kv.deleted_rooms",
    "kv.subscriptions",
    "kv.room_subs",
    "kv.sub_stats",
    "kv.deliveries",
    "kv.dead_letters",
    "kv.attempts",
    "kv.deleted_subs",
    "kv.records",
    "kv.audit",
    "kv.ready",
    "kv.key_queue",
    "kv.key_head",
    "kv.dispatch_leases",
    "kv.sub_stats_share",
    "kv.key_versions",
];

impl From<redb::Error> for Error {
    fn from(e: redb::Error) -> Self {
        Error::Storage(e.to_string())
    }
}
macro_rules! storage_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Storage(e.to_string())
            }
        }
    )*};
}
storage_errors!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

pub(super) fn err(e: impl std::fmt::Display) -> Error {
    Error::Storage(e.to_string())
}

/// Where the database lives, for reopening.
enum Origin {
    File {
        path: PathBuf,
        cache_bytes: usize,
    },
    Memory,
    /// A file behind a backend that can be made to fail like a full disk (tests).
    #[cfg(any(test, feature = "fault-injection"))]
    Fillable {
        path: PathBuf,
        full: Arc<std::sync::atomic::AtomicBool>,
    },
}

/// The redb backend.
pub(crate) struct RedbKv {
    /// `None` while a reopen has not succeeded: every use fails until one does.
    db: RwLock<Option<Arc<Database>>>,
    origin: Origin,
}

impl RedbKv {
    /// Opens (creating when absent) the database file at `path`.
    pub(crate) fn open(path: &Path, cache_bytes: usize) -> Result<RedbKv> {
        let db = Self::open_file(path, cache_bytes)?;
        Ok(RedbKv {
            db: RwLock::new(Some(Arc::new(db))),
            origin: Origin::File {
                path: path.to_path_buf(),
                cache_bytes,
            },
        })
    }

    /// A database in memory only, for tests and examples.
    pub(crate) fn in_memory(cache_bytes: usize) -> Result<RedbKv> {
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(err)?;
        Self::create_tables(&db)?;
        Ok(RedbKv {
            db: RwLock::new(Some(Arc::new(db))),
            origin: Origin::Memory,
        })
    }

    fn open_file(path: &Path, cache_bytes: usize) -> Result<Database> {
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(err)?;
        // A file of the previous release is migrated in place before anything reads it.
        super::redb_migrate::migrate_if_needed(&db, path)?;
        Self::create_tables(&db)?;
        Ok(db)
    }

    /// Creates every space's table, so that a snapshot can open any of them.
    fn create_tables(db: &Database) -> Result<()> {
        let txn = db.begin_write().map_err(err)?;
        for space in Space::ALL {
            txn.open_table(table(space)).map_err(err)?;
        }
        txn.commit().map_err(err)
    }

    /// A file-backed database whose writes fail with "no space left on device" while `full` is
    /// set, the way a full disk fails them (tests and fault injection).
    #[cfg(any(test, feature = "fault-injection"))]
    pub(crate) fn open_fillable(
        path: &Path,
        full: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<RedbKv> {
        let db = fillable::open(path, full.clone())?;
        Ok(RedbKv {
            db: RwLock::new(Some(Arc::new(db))),
            origin: Origin::Fillable {
                path: path.to_path_buf(),
                full,
            },
        })
    }

    fn db(&self) -> Result<Arc<Database>> {
        self.db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| Error::Storage("the database is closed until it can be reopened".into()))
    }
}

struct RedbSnapshot {
    txn: ReadTransaction,
    tables: [OnceLock<ReadOnlyTable<&'static [u8], &'static [u8]>>; Space::ALL.len()],
}

impl RedbSnapshot {
    fn table(&self, space: Space) -> Result<&ReadOnlyTable<&'static [u8], &'static [u8]>> {
        let slot = &self.tables[space as usize - 1];
        if let Some(t) = slot.get() {
            return Ok(t);
        }
        let t = self.txn.open_table(table(space)).map_err(err)?;
        Ok(slot.get_or_init(|| t))
    }
}

impl Snapshot for RedbSnapshot {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .table(space)?
            .get(key)
            .map_err(err)?
            .map(|g| g.value().to_vec()))
    }

    fn range(
        &self,
        space: Space,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        order: Order,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        if empty_range(&start, &end) {
            return Ok(Vec::new());
        }
        let range = self
            .table(space)?
            .range::<&[u8]>((start, end))
            .map_err(err)?;
        let pair = |r: std::result::Result<_, redb::StorageError>| {
            r.map_err(err).map(
                |(k, v): (redb::AccessGuard<&[u8]>, redb::AccessGuard<&[u8]>)| {
                    (k.value().to_vec(), v.value().to_vec())
                },
            )
        };
        match order {
            Order::Ascending => range.take(limit).map(pair).collect(),
            Order::Descending => range.rev().take(limit).map(pair).collect(),
        }
    }
}

/// True when no key lies between the bounds (redb refuses such a range).
fn empty_range(start: &Bound<&[u8]>, end: &Bound<&[u8]>) -> bool {
    match (start, end) {
        (Bound::Included(a), Bound::Included(b)) => a > b,
        (Bound::Included(a) | Bound::Excluded(a), Bound::Excluded(b))
        | (Bound::Excluded(a), Bound::Included(b)) => a >= b,
        _ => false,
    }
}

impl KvStore for RedbKv {
    fn snapshot(&self) -> Result<Arc<dyn Snapshot>> {
        let txn = self.db()?.begin_read().map_err(err)?;
        Ok(Arc::new(RedbSnapshot {
            txn,
            tables: Default::default(),
        }))
    }

    fn sync(&self) -> Result<()> {
        // An empty transaction committed durably: redb makes it, and every non-durable commit
        // before it, durable.
        let db = self.db()?;
        let mut txn = db.begin_write().map_err(err)?;
        txn.set_durability(Durability::Immediate).map_err(err)?;
        txn.commit().map_err(err)
    }

    fn commit(&self, batch: Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let db = self.db()?;
        let mut txn = db.begin_write().map_err(err)?;
        // Stated explicitly: every commit but a volatile one is durable before any caller hears
        // of it. A volatile one is written without an fsync and made durable by the next
        // durable commit (or when the database is closed).
        txn.set_durability(if batch.volatile {
            Durability::None
        } else {
            Durability::Immediate
        })
        .map_err(err)?;
        for e in &batch.expect {
            let t = txn.open_table(table(e.space)).map_err(err)?;
            let now = t
                .get(e.key.as_slice())
                .map_err(err)?
                .map(|g| g.value().to_vec());
            if now != e.value {
                drop(t);
                txn.abort().map_err(err)?;
                return Err(Error::StorageConflict {
                    detail: format!("{}: a key changed since it was read", e.space.name()),
                });
            }
        }
        let mut writes = batch.writes;
        // Grouped by space so that each table is opened once.
        writes.sort_by_key(|w| w.space);
        let mut i = 0;
        while i < writes.len() {
            let space = writes[i].space;
            let mut t = txn.open_table(table(space)).map_err(err)?;
            while i < writes.len() && writes[i].space == space {
                let w = &writes[i];
                match &w.value {
                    Some(v) => {
                        t.insert(w.key.as_slice(), v.as_slice()).map_err(err)?;
                    }
                    None => {
                        t.remove(w.key.as_slice()).map_err(err)?;
                    }
                }
                i += 1;
            }
        }
        txn.commit().map_err(err)
    }

    fn recover(&self) -> Result<()> {
        let reopen = || match &self.origin {
            Origin::File { path, cache_bytes } => Self::open_file(path, *cache_bytes).map(Some),
            Origin::Memory => Ok(None),
            #[cfg(any(test, feature = "fault-injection"))]
            Origin::Fillable { path, full } => fillable::open(path, full.clone()).map(Some),
        };
        if matches!(self.origin, Origin::Memory) {
            return Ok(());
        }
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        // redb allows one open Database per file: the old one must be gone before the new one
        // opens. Until the reopen succeeds every use fails (a later `recover` tries again).
        drop(slot.take());
        *slot = reopen()?.map(Arc::new);
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "redb"
    }
}

/// A redb storage backend over a file that fails like a full disk on demand.
#[cfg(any(test, feature = "fault-injection"))]
mod fillable {
    use std::ops::Bound;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use redb::backends::FileBackend;
    use redb::{BackendError, Database, StorageBackend};

    use super::{err, RedbKv};
    use crate::error::Result;

    #[derive(Debug)]
    struct Fillable {
        file: FileBackend,
        full: Arc<AtomicBool>,
    }

    impl Fillable {
        fn check(&self) -> std::io::Result<()> {
            if self.full.load(Ordering::SeqCst) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "No space left on device (injected)",
                ));
            }
            Ok(())
        }
    }

    impl StorageBackend for Fillable {
        fn len(&self) -> std::io::Result<u64> {
            self.file.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.file.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.file.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.check()?;
            self.file.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.file.write(offset, data)
        }
        fn close(&self) -> std::io::Result<()> {
            self.file.close()
        }
        fn try_lock_range(&self, a: Bound<u64>, b: Bound<u64>) -> Result<bool, BackendError> {
            self.file.try_lock_range(a, b)
        }
        fn try_lock_shared_range(
            &self,
            a: Bound<u64>,
            b: Bound<u64>,
        ) -> Result<bool, BackendError> {
            self.file.try_lock_shared_range(a, b)
        }
        fn lock_range(&self, a: Bound<u64>, b: Bound<u64>) -> Result<(), BackendError> {
            self.file.lock_range(a, b)
        }
        fn lock_shared_range(&self, a: Bound<u64>, b: Bound<u64>) -> Result<(), BackendError> {
            self.file.lock_shared_range(a, b)
        }
        fn unlock_range(&self, a: Bound<u64>, b: Bound<u64>) -> Result<(), BackendError> {
            self.file.unlock_range(a, b)
        }
        fn query_lock_range(&self, a: Bound<u64>, b: Bound<u64>) -> Result<bool, BackendError> {
            self.file.query_lock_range(a, b)
        }
    }

    /// Opens (creating) the file behind a [`Fillable`] backend.
    pub(super) fn open(path: &Path, full: Arc<AtomicBool>) -> Result<Database> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(err)?;
        let backend = Fillable {
            file: FileBackend::new(file).map_err(err)?,
            full,
        };
        let db = Database::builder()
            .create_with_backend(backend)
            .map_err(err)?;
        RedbKv::create_tables(&db)?;
        Ok(db)
    }
}
