//! The engine: every rule of the broker (Rooms, numbering, idempotency, fan-out, delivery
//! queues, retention) as core code over the key-value seam of `storage::kv`, so that a backend
//! only stores and a second backend cannot disagree with the first about what a rule does. Each
//! batch of operations is applied in a `Txn` over a fresh snapshot, each operation under its own
//! savepoint, and committed as one durable batch. This file holds the [`Engine`] (opening) and
//! [`Tables`], the write transaction's tables, which each file below extends with an `impl` block
//! of its own concern:
//!
//! - `storage_impl.rs`: the `Storage` implementation (`apply`, `recover`, the reads);
//! - `spaces.rs`: the key spaces (`Def` constants) and the layout version;
//! - `rooms.rs`: Rooms, their approval policy, event types and schema versions;
//! - `events.rs`: event records, publishing, idempotency, the sequence counters and checkpoints;
//! - `sweep.rs`: the retention sweep, and the purge of deleted Rooms and subscriptions;
//! - `reads.rs`: the reads of Rooms, event types and events, and the walk of a Room's log;
//! - `subs.rs`: subscriptions (records, create, update, status, secrets, reads) and the dispatch
//!   of delivery operations;
//! - `fanout.rs`: the delivery obligations of a new event and the cached fan-out targets;
//! - `queue.rs`: the delivery queues: leases, settling, push outcomes, retries, dead letters and
//!   the attempt log;
//! - `replay.rs`: seek, redrive and the purge of dead letters;
//! - `queue_reads.rs`: the reads of the queues (due work, dead letters, attempts, health, seek
//!   offsets);
//! - `records.rs`: the administrative records and the audit log;
//! - `copy.rs`: the copy of an embedded store into PostgreSQL (`postroom migrate-data`);
//! - `owners.rs`: push leases on a store several brokers share (which node pushes what).

pub(crate) mod copy;
#[cfg(test)]
mod copy_tests;
mod events;
mod fanout;
#[cfg(test)]
mod layout_tests;
#[cfg(test)]
mod owner_tests;
mod owners;
#[cfg(test)]
mod pg_tests;
mod pull;
mod queue;
mod queue_reads;
#[cfg(test)]
mod read_tests;
mod reads;
mod ready;
mod records;
mod replay;
mod rooms;
#[cfg(test)]
mod shared_tests;
mod spaces;
mod storage_impl;
mod subs;
mod sweep;
#[cfg(test)]
mod volatile_tests;

pub use copy::{copy_embedded_to_postgres, CopyReport};
pub(crate) use queue::{ack_id, parse_ack_id};

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::ids::{EventId, EventTypeName, Principal, RoomName};
use crate::model::{Event, EventFilter, EventType, EventTypeVersion, Page, Room, StoredResponse};
use crate::storage::kv::{KvStore, LAYOUT_VERSION};
use crate::storage::txn::{Table, Txn};
use crate::storage::{Applied, DeliveryDefaults, PublishTarget, Storage, WriteOp, WriteOutput};
use crate::storage::{FaultyKv, RedbKv};
use events::{SeqCache, SEQ_CACHE_KEYS_MAX, SEQ_CHECKPOINT_EVENTS};
use fanout::FanoutCache;
use records::{AUDIT, RECORDS};
use spaces::{
    ATTEMPTS, DEAD_LETTERS, DELETED_ROOMS, DELETED_SUBS, DELIVERIES, EVENTS, EVENT_TYPES,
    IDEMPOTENCY, IDEM_EXPIRY, KEY_SEQ, META, RESPONSES, RESPONSE_EXPIRY, ROOMS, ROOM_LOG,
    ROOM_STATS, ROOM_SUBS, SCHEMAS, SEQ_CHECKPOINT, SUBSCRIPTIONS, SUB_STATS,
};

/// The delivery engine: every rule of the broker, as core code over a [`KvStore`] that only
/// stores. The writer thread calls [`Storage::apply`]; reads come from any thread.
pub(crate) struct Engine {
    kv: Arc<dyn KvStore>,
    /// Only the writer thread locks this, so it is never contended.
    seqs: Mutex<SeqCache>,
    /// Fan-out targets per Room, kept by the writer (locked after `seqs`, by the writer only).
    fanout: Mutex<FanoutCache>,
    /// Broker-wide delivery defaults (the base of every retry policy).
    defaults: std::sync::RwLock<DeliveryDefaults>,
    /// Injected faults (tests and simulations only; see `faults.rs`).
    faults: Arc<crate::storage::StorageFaults>,
    /// Whether the backend's reads may wait long (see [`KvStore::reads_block`]).
    reads_block: bool,
    /// Whether other processes commit to the store too (see [`KvStore::shared`]).
    shared: bool,
    /// This engine's id among the processes sharing the store: the node id of its push leases
    /// and the sender of its notices (`remote_wake.rs`). Random at each open.
    origin: u128,
    /// Volatile commits since the last durable one (see [`VOLATILE_RUN_MAX`]).
    volatile_run: std::sync::atomic::AtomicU32,
    /// The ordered keys (as [`head_mark`]s) whose head left in a volatile commit not yet made
    /// durable: a lease of such a key's next delivery is committed durably (see
    /// [`Tables::needs_durable`]). Locked by the writer only, after `fanout`.
    unsynced_heads: Mutex<HashSet<u64>>,
    /// The epoch the leases granted now carry (see [`crate::storage::LeaseRef::epoch`]): one
    /// more than `META` "epoch" at each open and after each `recover` (a reopen after an I/O
    /// error also loses pending volatile commits).
    epoch: std::sync::atomic::AtomicU64,
    /// Whether `epoch` is not stored yet. It is stored by the first volatile batch (made
    /// durable for it), not at open, so that opening a store writes nothing (a broker must
    /// start, and serve reads, on a full disk).
    epoch_unstored: std::sync::atomic::AtomicBool,
}

/// Tries `f` again while it loses races to other brokers on a shared store
/// (`Error::StorageConflict`), at most [`OPEN_CONFLICT_TRIES`] times in all.
fn on_conflict_retry<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let mut tries = 1;
    loop {
        match f() {
            Err(Error::StorageConflict { .. }) if tries < OPEN_CONFLICT_TRIES => tries += 1,
            other => return other,
        }
    }
}

/// How often an opening tries its commits when other brokers sharing the store win the race:
/// each loss means another broker committed, so a few tries are enough for many opening
/// together.
const OPEN_CONFLICT_TRIES: u32 = 32;

/// At most this many volatile commits in a row: then one is made durable, so that a store that
/// frees space only on durable commits (redb) does not grow under a long run of leases alone.
const VOLATILE_RUN_MAX: u32 = 64;

impl Engine {
    /// Opens the redb file at `path`, creating it when absent.
    pub(crate) fn open(
        path: &Path,
        cache_bytes: usize,
        defaults: DeliveryDefaults,
    ) -> Result<Self> {
        Self::over(Arc::new(RedbKv::open(path, cache_bytes)?), defaults)
    }

    /// The PostgreSQL database `config` names, its schema created or upgraded first.
    pub(crate) fn open_postgres(
        config: &crate::storage::PostgresConfig,
        defaults: DeliveryDefaults,
    ) -> Result<Self> {
        Self::over(Arc::new(crate::storage::PgKv::open(config)?), defaults)
    }

    /// A redb database that lives in memory only, for tests and examples.
    pub(crate) fn in_memory(cache_bytes: usize, defaults: DeliveryDefaults) -> Result<Self> {
        Self::over(Arc::new(RedbKv::in_memory(cache_bytes)?), defaults)
    }

    /// The engine over any backend (wrapped so that tests can inject commit failures).
    pub(crate) fn over(kv: Arc<dyn KvStore>, defaults: DeliveryDefaults) -> Result<Self> {
        Self::over_with(kv, Arc::default(), defaults)
    }

    /// The engine over a backend, with fault switches made beforehand.
    pub(crate) fn over_with(
        kv: Arc<dyn KvStore>,
        faults: Arc<crate::storage::StorageFaults>,
        defaults: DeliveryDefaults,
    ) -> Result<Self> {
        let faulty = FaultyKv::with(kv, faults.clone());
        Self::init(Arc::new(faulty), faults, defaults)
    }

    /// A redb file whose writes fail like a full disk's while its faults say so.
    #[cfg(any(test, feature = "fault-injection"))]
    pub(crate) fn open_fillable(path: &Path, defaults: DeliveryDefaults) -> Result<Self> {
        let faults = Arc::<crate::storage::StorageFaults>::default();
        let kv = RedbKv::open_fillable(path, faults.disk_flag())?;
        Self::over_with(Arc::new(kv), faults, defaults)
    }

    /// The switches that make this engine's commits fail (tests and simulations).
    pub(crate) fn faults(&self) -> Arc<crate::storage::StorageFaults> {
        self.faults.clone()
    }

    /// A read view of everything committed.
    pub(super) fn begin_read(&self) -> Result<Txn> {
        Ok(Txn::reader(self.kv.snapshot()?))
    }

    /// Runs a read where blocking is allowed: on a backend whose reads wait (on the network),
    /// inside `block_in_place` when called from a tokio worker, so that the worker's other tasks
    /// move on meanwhile; inline otherwise (redb reads come from its cache and the mapped file).
    fn blocking<T>(&self, read: impl FnOnce() -> Result<T>) -> Result<T> {
        if self.reads_block {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
                    return tokio::task::block_in_place(read);
                }
            }
        }
        read()
    }

    pub(super) fn delivery_defaults(&self) -> DeliveryDefaults {
        self.defaults
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn init(
        kv: Arc<dyn KvStore>,
        faults: Arc<crate::storage::StorageFaults>,
        defaults: DeliveryDefaults,
    ) -> Result<Self> {
        // Brokers opening one shared store together race for the open commit: the loser reads
        // again and tries again.
        let epoch = on_conflict_retry(|| Self::open_commit(&kv))?;
        tracing::debug!(backend = kv.kind(), "storage opened");
        let store = Engine {
            seqs: Mutex::new(SeqCache::default()),
            fanout: Mutex::new(FanoutCache::default()),
            defaults: std::sync::RwLock::new(defaults),
            faults,
            reads_block: kv.reads_block(),
            shared: kv.shared(),
            origin: uuid::Uuid::new_v4().as_u128(),
            volatile_run: Default::default(),
            unsynced_heads: Mutex::default(),
            epoch: epoch.into(),
            epoch_unstored: true.into(),
            kv,
        };
        let rebuilt = store.rebuild_seqs()?;
        *store.seqs.lock().unwrap_or_else(|p| p.into_inner()) = rebuilt;
        on_conflict_retry(|| store.with_tables(|t| t.ensure_ready_index()))?;
        Ok(store)
    }

    /// The commit every opening makes: the layout mark (and its upgrade), interrupted seeks
    /// ended; returns this boot's lease epoch.
    fn open_commit(kv: &Arc<dyn KvStore>) -> Result<u64> {
        let txn = Txn::new(kv.snapshot()?);
        let epoch;
        {
            let meta = txn.open_table(META)?;
            // Stored with the first lease of this boot (see `epoch_unstored`).
            epoch = meta.get("epoch")?.unwrap_or(0).saturating_add(1);
            match meta.get("layout_version")? {
                None => {
                    meta.insert("layout_version", LAYOUT_VERSION)?;
                    meta.insert("next_room_id", 1)?;
                }
                Some(LAYOUT_VERSION) => {}
                // Layout 2 had no index of ready work: it is built below (the mark removed here
                // makes sure of it, even if the process stops in between).
                Some(2) => {
                    meta.remove(ready::READY_INDEX_MARK)?;
                    meta.insert("layout_version", LAYOUT_VERSION)?;
                    tracing::info!("data file upgraded to storage layout {LAYOUT_VERSION}: the index of ready work is built now");
                }
                Some(other) => {
                    return Err(Error::Storage(format!(
                        "data file has layout version {other}; this build reads version {LAYOUT_VERSION}"
                    )))
                }
            }
            // With a shared store this also ends a seek another broker is running (its next
            // step fails; the seek can be repeated): better than leaving a seek whose broker
            // died holding its subscription for ever. Seeks owned by a live broker are issue 16.
            let cleared = replay::clear_interrupted_seeks(&txn)?;
            if cleared > 0 {
                tracing::warn!(
                    subscriptions = cleared,
                    "seeks interrupted by a restart were ended; repeat them to replay fully"
                );
            }
        }
        let mut batch = txn.take_batch();
        if kv.shared() {
            txn.fence(&mut batch)?;
        }
        drop(txn);
        kv.commit(batch)?;
        Ok(epoch)
    }

    /// Runs `f` over the tables in a transaction of its own and commits it (at open, before
    /// the writer starts).
    fn with_tables<T>(&self, f: impl FnOnce(&mut Tables<'_>) -> Result<T>) -> Result<T> {
        let mut seqs = self.seqs.lock().unwrap_or_else(|p| p.into_inner());
        let mut fanout = self.fanout.lock().unwrap_or_else(|p| p.into_inner());
        let txn = Txn::new(self.kv.snapshot()?);
        let unsynced = HashSet::new();
        let out = {
            let mut tables = Tables::open(
                &txn,
                &mut seqs,
                &mut fanout,
                &unsynced,
                self.delivery_defaults(),
                self.epoch.load(std::sync::atomic::Ordering::Acquire),
            )?;
            tables.shared = self.shared;
            tables.origin = self.origin;
            f(&mut tables)?
        };
        let mut batch = txn.take_batch();
        if self.shared {
            txn.fence(&mut batch)?;
        }
        drop(txn);
        self.kv.commit(batch)?;
        Ok(out)
    }
}

/// Set by the simulation: every batch checks the ready index against the queues before it
/// commits (a full walk, so only where a test asks for it).
#[cfg(test)]
pub(crate) static CHECK_READY_INDEX: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Every table, opened once per write transaction, with the writer's in-memory state.
pub(super) struct Tables<'t> {
    meta: Table<String, u64>,
    pub(super) rooms: Table<String, Vec<u8>>,
    room_stats: Table<u64, (u64, u64, u64)>,
    event_types: Table<(u64, String), Vec<u8>>,
    schemas: Table<(u64, String, u32), Vec<u8>>,
    pub(super) events: Table<u128, Vec<u8>>,
    pub(super) room_log: Table<(u64, u64), u128>,
    key_seq: Table<(u64, String), u64>,
    seq_checkpoint: Table<u64, u64>,
    idempotency: Table<(u64, String, String), Vec<u8>>,
    idem_expiry: Table<(u64, u64, String, String), ()>,
    responses: Table<(String, String), Vec<u8>>,
    response_expiry: Table<(u64, String, String), ()>,
    deleted_rooms: Table<u64, ()>,
    pub(super) subscriptions: Table<u128, Vec<u8>>,
    pub(super) room_subs: Table<(u64, u128), ()>,
    pub(super) sub_stats: Table<u128, (u64, u64)>,
    pub(super) sub_stats_share: Table<(u128, u128), (u64, u64)>,
    /// On a shared store, each subscription's counts as summed in this batch (its row and
    /// every node's share, read once), kept up to date by this batch's changes.
    pub(super) counts_cache: HashMap<u128, (i128, i128)>,
    pub(super) key_versions: Table<(u128, String), u64>,
    pub(super) deliveries: Table<(u128, u64), Vec<u8>>,
    pub(super) dead_letters: Table<(u128, u64), Vec<u8>>,
    pub(super) attempts: Table<(u128, u64, u32), Vec<u8>>,
    pub(super) deleted_subs: Table<u128, ()>,
    pub(super) ready: Table<(u128, u64, u64), ()>,
    pub(super) key_queue: Table<(u128, String, u64), ()>,
    pub(super) key_head: Table<(u128, String), (u64, u64, u64, u64)>,
    pub(super) dispatch_leases: Table<u128, (u128, u64, u64)>,
    /// Whether each subscription is ordered, as read in this batch.
    pub(super) ordered_cache: HashMap<u128, bool>,
    pub(super) records: Table<(String, String), Vec<u8>>,
    pub(super) audit: Table<u64, Vec<u8>>,
    /// The transaction every table above writes in.
    pub(super) txn: Txn,
    seqs: &'t mut SeqCache,
    pub(super) fanout: &'t mut FanoutCache,
    /// Subscriptions whose queues this batch changed, to wake their dispatchers after commit.
    pub(super) touched: HashSet<u128>,
    /// Subscriptions whose push lease this batch released, for the other nodes' notice.
    pub(super) released: Vec<u128>,
    /// What the batch did that operators count, handed over after commit.
    pub(super) observed: Vec<crate::storage::Observation>,
    pub(super) defaults: DeliveryDefaults,
    /// The engine's boot number, carried by the leases this batch grants.
    pub(super) epoch: u64,
    /// Ordered keys whose head left in this batch (as [`head_mark`]s).
    pub(super) heads_moved: HashSet<u64>,
    /// Ordered keys whose head left in an earlier volatile commit not yet durable.
    pub(super) unsynced_heads: &'t HashSet<u64>,
    /// Whether other processes commit to the store too: sequences then come from their rows,
    /// not from `seqs` (see [`KvStore::shared`]).
    pub(super) shared: bool,
    /// This engine's node id (`Storage::origin`): the row of `sub_stats_share` it writes.
    pub(super) origin: u128,
    /// Set when the batch hands out a key's next delivery while the settle that let it go
    /// (an ack, a termination, a dead-lettering) may still be undone by a crash: the batch is
    /// then committed durably, so that no crash can bring back a delivery of a key after its
    /// successor went out (per-key order holds across crashes, issue 15).
    pub(super) needs_durable: bool,
}

/// A compact mark of an ordered (subscription, key) for [`Tables::heads_moved`]. Two keys may
/// share a mark; that only makes a commit durable that need not be.
pub(super) fn head_mark(sub: u128, key: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    sub.hash(&mut h);
    key.hash(&mut h);
    h.finish()
}

impl<'t> Tables<'t> {
    fn open(
        txn: &Txn,
        seqs: &'t mut SeqCache,
        fanout: &'t mut FanoutCache,
        unsynced_heads: &'t HashSet<u64>,
        defaults: DeliveryDefaults,
        epoch: u64,
    ) -> Result<Self> {
        Ok(Tables {
            meta: txn.open_table(META)?,
            rooms: txn.open_table(ROOMS)?,
            room_stats: txn.open_table(ROOM_STATS)?,
            event_types: txn.open_table(EVENT_TYPES)?,
            schemas: txn.open_table(SCHEMAS)?,
            events: txn.open_table(EVENTS)?,
            room_log: txn.open_table(ROOM_LOG)?,
            key_seq: txn.open_table(KEY_SEQ)?,
            seq_checkpoint: txn.open_table(SEQ_CHECKPOINT)?,
            idempotency: txn.open_table(IDEMPOTENCY)?,
            idem_expiry: txn.open_table(IDEM_EXPIRY)?,
            responses: txn.open_table(RESPONSES)?,
            response_expiry: txn.open_table(RESPONSE_EXPIRY)?,
            deleted_rooms: txn.open_table(DELETED_ROOMS)?,
            subscriptions: txn.open_table(SUBSCRIPTIONS)?,
            room_subs: txn.open_table(ROOM_SUBS)?,
            sub_stats: txn.open_table(SUB_STATS)?,
            sub_stats_share: txn.open_table(spaces::SUB_STATS_SHARE)?,
            counts_cache: HashMap::new(),
            key_versions: txn.open_table(spaces::KEY_VERSIONS)?,
            deliveries: txn.open_table(DELIVERIES)?,
            dead_letters: txn.open_table(DEAD_LETTERS)?,
            attempts: txn.open_table(ATTEMPTS)?,
            deleted_subs: txn.open_table(DELETED_SUBS)?,
            ready: txn.open_table(spaces::READY)?,
            key_queue: txn.open_table(spaces::KEY_QUEUE)?,
            key_head: txn.open_table(spaces::KEY_HEAD)?,
            dispatch_leases: txn.open_table(spaces::DISPATCH_LEASES)?,
            ordered_cache: HashMap::new(),
            records: txn.open_table(RECORDS)?,
            audit: txn.open_table(AUDIT)?,
            txn: txn.clone(),
            seqs,
            fanout,
            touched: HashSet::new(),
            released: Vec::new(),
            observed: Vec::new(),
            defaults,
            epoch,
            heads_moved: HashSet::new(),
            unsynced_heads,
            shared: false,
            origin: 0,
            needs_durable: false,
        })
    }

    fn apply(&mut self, now: Timestamp, op: WriteOp) -> Result<WriteOutput> {
        match op {
            WriteOp::CreateRoom { room, quota } => {
                self.create_room(now, room, quota).map(WriteOutput::Room)
            }
            WriteOp::UpdateRoom { name, patch } => {
                self.update_room(now, &name, patch).map(WriteOutput::Room)
            }
            WriteOp::ApproveRoom { name, rooms_max } => self
                .approve_room(now, &name, rooms_max)
                .map(WriteOutput::Room),
            WriteOp::DeleteRoom { name } => self.delete_room(&name).map(|()| WriteOutput::Deleted),
            WriteOp::PutEventType {
                room,
                spec,
                types_max,
                versions_max,
                create_only,
            } => self
                .put_event_type(now, &room, spec, types_max, versions_max, create_only)
                .map(WriteOutput::EventType),
            WriteOp::RememberResponse {
                principal,
                key,
                request_hash,
                response,
                expires_at,
            } => self
                .remember_response(&principal, &key, request_hash, response, expires_at, now)
                .map(|()| WriteOutput::Deleted),
            WriteOp::DeleteEventType { room, name } => self
                .delete_event_type(&room, &name)
                .map(|()| WriteOutput::Deleted),
            WriteOp::Publish(events) => {
                let mut receipts = Vec::with_capacity(events.len());
                for event in events {
                    // Each event succeeds or changes nothing, alone.
                    let sp = self.txn.savepoint();
                    let seq_sp = self.seqs.savepoint();
                    let result = self.publish(now, event);
                    if result.is_err() {
                        self.txn.rollback_to(sp);
                        self.seqs.rollback(seq_sp);
                        self.counts_cache.clear();
                    }
                    receipts.push(result);
                }
                Ok(WriteOutput::Receipts(receipts))
            }
            WriteOp::Sweep { delete_max } => self.sweep(now, delete_max).map(WriteOutput::Swept),
            WriteOp::Delivery(op) => self.apply_delivery(now, op),
            WriteOp::Records(op) => (op.0)(self, now),
        }
    }
}
