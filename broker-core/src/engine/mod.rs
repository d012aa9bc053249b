//! The engine: every rule of the broker (Rooms, numbering, idempotency, fan-out, delivery
//! queues, retention) as core code over the key-value seam of `storage::kv`, so that a backend
//! only stores and a second backend cannot disagree with the first about what a rule does. Each
//! batch of operations is applied in a `Txn` over a fresh snapshot, each operation under its own
//! savepoint, and committed as one durable batch. This file holds the [`Engine`] (opening, and
//! the `Storage` implementation: `apply`, and the reads, whose bodies are in the read files) and
//! [`Tables`], the write transaction's tables, which each file below extends with an `impl` block
//! of its own concern:
//!
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
//! - `records.rs`: the administrative records and the audit log.

mod events;
mod fanout;
#[cfg(test)]
mod layout_tests;
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
mod spaces;
mod subs;
mod sweep;
#[cfg(test)]
mod volatile_tests;

pub(crate) use queue::{ack_id, parse_ack_id};

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

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
    /// Volatile commits since the last durable one (see [`VOLATILE_RUN_MAX`]).
    volatile_run: std::sync::atomic::AtomicU32,
    /// The epoch the leases granted now carry (see [`crate::storage::LeaseRef::epoch`]): one
    /// more than `META` "epoch" at each open and after each `recover` (a reopen after an I/O
    /// error also loses pending volatile commits).
    epoch: std::sync::atomic::AtomicU64,
    /// Whether `epoch` is not stored yet. It is stored by the first batch that leases (made
    /// durable for it), not at open, so that opening a store writes nothing (a broker must
    /// start, and serve reads, on a full disk).
    epoch_unstored: std::sync::atomic::AtomicBool,
}

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
            let cleared = replay::clear_interrupted_seeks(&txn)?;
            if cleared > 0 {
                tracing::warn!(
                    subscriptions = cleared,
                    "seeks interrupted by a restart were ended; repeat them to replay fully"
                );
            }
        }
        let batch = txn.take_batch();
        drop(txn);
        kv.commit(batch)?;
        tracing::debug!(backend = kv.kind(), "storage opened");
        let store = Engine {
            seqs: Mutex::new(SeqCache::default()),
            fanout: Mutex::new(FanoutCache::default()),
            defaults: std::sync::RwLock::new(defaults),
            faults,
            reads_block: kv.reads_block(),
            volatile_run: Default::default(),
            epoch: epoch.into(),
            epoch_unstored: true.into(),
            kv,
        };
        let rebuilt = store.rebuild_seqs()?;
        *store.seqs.lock().unwrap_or_else(|p| p.into_inner()) = rebuilt;
        store.with_tables(|t| t.ensure_ready_index())?;
        Ok(store)
    }

    /// Runs `f` over the tables in a transaction of its own and commits it (at open, before
    /// the writer starts).
    fn with_tables<T>(&self, f: impl FnOnce(&mut Tables<'_>) -> Result<T>) -> Result<T> {
        let mut seqs = self.seqs.lock().unwrap_or_else(|p| p.into_inner());
        let mut fanout = self.fanout.lock().unwrap_or_else(|p| p.into_inner());
        let txn = Txn::new(self.kv.snapshot()?);
        let out = {
            let mut tables = Tables::open(
                &txn,
                &mut seqs,
                &mut fanout,
                self.delivery_defaults(),
                self.epoch.load(std::sync::atomic::Ordering::Acquire),
            )?;
            f(&mut tables)?
        };
        let batch = txn.take_batch();
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
    pub(super) deliveries: Table<(u128, u64), Vec<u8>>,
    pub(super) dead_letters: Table<(u128, u64), Vec<u8>>,
    pub(super) attempts: Table<(u128, u64, u32), Vec<u8>>,
    pub(super) deleted_subs: Table<u128, ()>,
    pub(super) ready: Table<(u128, u64, u64), ()>,
    pub(super) key_queue: Table<(u128, String, u64), ()>,
    pub(super) key_head: Table<(u128, String), (u64, u64, u64, u64)>,
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
    /// What the batch did that operators count, handed over after commit.
    pub(super) observed: Vec<crate::storage::Observation>,
    pub(super) defaults: DeliveryDefaults,
    /// The engine's boot number, carried by the leases this batch grants.
    pub(super) epoch: u64,
}

impl<'t> Tables<'t> {
    fn open(
        txn: &Txn,
        seqs: &'t mut SeqCache,
        fanout: &'t mut FanoutCache,
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
            deliveries: txn.open_table(DELIVERIES)?,
            dead_letters: txn.open_table(DEAD_LETTERS)?,
            attempts: txn.open_table(ATTEMPTS)?,
            deleted_subs: txn.open_table(DELETED_SUBS)?,
            ready: txn.open_table(spaces::READY)?,
            key_queue: txn.open_table(spaces::KEY_QUEUE)?,
            key_head: txn.open_table(spaces::KEY_HEAD)?,
            ordered_cache: HashMap::new(),
            records: txn.open_table(RECORDS)?,
            audit: txn.open_table(AUDIT)?,
            txn: txn.clone(),
            seqs,
            fanout,
            touched: HashSet::new(),
            observed: Vec::new(),
            defaults,
            epoch,
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

impl Storage for Engine {
    fn apply(&self, now: Timestamp, ops: Vec<WriteOp>) -> Result<Applied> {
        let mut seqs = self.seqs.lock().unwrap_or_else(|p| p.into_inner());
        let mut fanout = self.fanout.lock().unwrap_or_else(|p| p.into_inner());
        let defaults = self.delivery_defaults();
        // The first batch that leases (the only operations that are volatile) stores the
        // epoch its leases carry, durably, so that no lease of a later boot has that epoch.
        let store_epoch = self
            .epoch_unstored
            .load(std::sync::atomic::Ordering::Acquire)
            && ops.iter().any(WriteOp::volatile);
        // A commit of leases alone need not wait for the disk (issue 15, item 7): after a crash
        // its messages are offered again, as when a lease runs out.
        let volatile = ops.iter().all(WriteOp::volatile)
            && !store_epoch
            && self.volatile_run.load(std::sync::atomic::Ordering::Relaxed) < VOLATILE_RUN_MAX;
        let outcome = (|| {
            let txn = Txn::new(self.kv.snapshot()?);
            let mut results = Vec::with_capacity(ops.len());
            let touched;
            let observed;
            {
                let epoch = self.epoch.load(std::sync::atomic::Ordering::Acquire);
                let mut tables = Tables::open(&txn, &mut seqs, &mut fanout, defaults, epoch)?;
                if store_epoch {
                    tables.meta.insert("epoch", epoch)?;
                }
                for op in ops {
                    // Each operation succeeds or changes nothing, alone: a failure (a logical
                    // refusal, a record that does not decode) undoes its own writes and no
                    // other operation's.
                    let sp = txn.savepoint();
                    let seq_sp = tables.seqs.savepoint();
                    let observed_before = tables.observed.len();
                    let result = tables.apply(now, op);
                    if result.is_err() {
                        txn.rollback_to(sp);
                        tables.seqs.rollback(seq_sp);
                        tables.observed.truncate(observed_before);
                        // The fan-out cache, and the cache of which subscriptions are ordered,
                        // may describe what was undone.
                        tables.fanout.clear();
                        tables.ordered_cache.clear();
                    }
                    results.push(result);
                }
                #[cfg(test)]
                if CHECK_READY_INDEX.load(std::sync::atomic::Ordering::Relaxed) {
                    tables.check_ready_index()?;
                }
                if tables.seqs.events_since_checkpoint >= SEQ_CHECKPOINT_EVENTS
                    || tables.seqs.last.len() >= SEQ_CACHE_KEYS_MAX
                {
                    tables.checkpoint_seqs()?;
                }
                touched = std::mem::take(&mut tables.touched);
                observed = std::mem::take(&mut tables.observed);
            }
            let mut batch = txn.take_batch();
            batch.volatile = volatile;
            // The snapshot goes before the commit (an in-memory backend then need not copy).
            drop(txn);
            let empty = batch.is_empty();
            self.kv.commit(batch)?;
            if store_epoch {
                self.epoch_unstored
                    .store(false, std::sync::atomic::Ordering::Release);
            }
            if !empty {
                let run = if volatile {
                    self.volatile_run.load(std::sync::atomic::Ordering::Relaxed) + 1
                } else {
                    0
                };
                self.volatile_run
                    .store(run, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(Applied {
                results,
                touched: touched
                    .into_iter()
                    .map(|id| crate::ids::SubscriptionId(Uuid::from_u128(id)))
                    .collect(),
                observed,
            })
        })();
        match &outcome {
            Ok(_) => seqs.undo.clear(),
            Err(_) => {
                // The fan-out cache may describe uncommitted subscription changes.
                fanout.clear();
                // Memory may now be ahead of what is stored: take the counters from it.
                *seqs = self.rebuild_seqs().unwrap_or_else(|e| {
                    tracing::error!(error = %e, "cannot rebuild sequence counters; publishing is refused");
                    SeqCache::default()
                });
            }
        }
        outcome
    }

    fn recover(&self) -> Result<()> {
        let mut seqs = self.seqs.lock().unwrap_or_else(|p| p.into_inner());
        self.fanout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.kv.recover()?;
        *seqs = self.rebuild_seqs()?;
        // A reopen may have lost volatile commits (leases): leases granted from now on carry a
        // new epoch, so that an ack id of a lost lease cannot settle the next lease of its
        // message. One more than the stored epoch: if this boot's epoch was never stored, no
        // lease of it was committed (the first is durable and stores it), so reusing it is safe.
        let stored = Txn::new(self.kv.snapshot()?)
            .open_table::<String, u64>(META)?
            .get("epoch")?
            .unwrap_or(0);
        self.epoch.store(
            stored.saturating_add(1),
            std::sync::atomic::Ordering::Release,
        );
        self.epoch_unstored
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    fn subscription(
        &self,
        id: crate::ids::SubscriptionId,
    ) -> Result<crate::subscription::Subscription> {
        self.blocking(|| self.subscription_read(id))
    }

    fn subscriptions(&self, room: &RoomName) -> Result<Vec<crate::subscription::Subscription>> {
        self.blocking(|| self.subscriptions_read(room))
    }

    fn push_subscriptions(&self) -> Result<Vec<crate::ids::SubscriptionId>> {
        self.blocking(|| self.push_subscriptions_read())
    }

    fn signing_secrets(
        &self,
        id: crate::ids::SubscriptionId,
        now: Timestamp,
    ) -> Result<Vec<String>> {
        self.blocking(|| self.signing_secrets_read(id, now))
    }

    fn due(
        &self,
        id: crate::ids::SubscriptionId,
        now: Timestamp,
        busy: &crate::storage::Busy,
        limit: usize,
    ) -> Result<(Vec<crate::storage::DueDelivery>, Option<Timestamp>)> {
        self.blocking(|| self.due_read(id, now, busy, limit))
    }

    fn dead_letters(
        &self,
        id: crate::ids::SubscriptionId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<(u64, crate::subscription::DeadLetter)>, bool)> {
        self.blocking(|| self.dead_letters_read(id, after, limit))
    }

    fn attempts(
        &self,
        id: crate::ids::SubscriptionId,
        after: Option<(u64, u32)>,
        limit: usize,
    ) -> Result<(Vec<((u64, u32), crate::subscription::Attempt)>, bool)> {
        self.blocking(|| self.attempts_read(id, after, limit))
    }

    fn blocked_keys(
        &self,
        id: crate::ids::SubscriptionId,
        now: Timestamp,
        limit: usize,
        scan_max: usize,
    ) -> Result<Vec<crate::subscription::BlockedKey>> {
        self.blocking(|| self.blocked_keys_read(id, now, limit, scan_max))
    }

    fn event_deliveries(
        &self,
        id: EventId,
        now: Timestamp,
    ) -> Result<Vec<crate::subscription::EventDelivery>> {
        self.blocking(|| self.event_deliveries_by_id_read(id, now))
    }

    fn seek_offsets(&self, room: &RoomName, at: Option<Timestamp>) -> Result<(u64, u64)> {
        self.blocking(|| self.offsets_for_seek(room, at))
    }

    fn record(&self, kind: crate::storage::RecordKind, id: &str) -> Result<Option<Vec<u8>>> {
        self.blocking(|| self.record_read(kind, id))
    }

    fn records(
        &self,
        kind: crate::storage::RecordKind,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        self.blocking(|| self.records_read(kind, prefix, after, limit))
    }

    fn audit(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        self.blocking(|| self.audit_read(after, limit))
    }

    fn stored_response(
        &self,
        principal: &Principal,
        key: &str,
        now: Timestamp,
    ) -> Result<Option<([u8; 32], StoredResponse)>> {
        self.blocking(|| self.stored_response_read(principal, key, now))
    }

    fn queued(
        &self,
        id: crate::ids::SubscriptionId,
        offset: u64,
        event: EventId,
        now: Timestamp,
    ) -> Result<Option<(u32, bool)>> {
        self.blocking(|| self.queued_read(id.0.as_u128(), offset, event, now))
    }

    fn event_offset(&self, id: EventId) -> Result<Option<u64>> {
        self.blocking(|| self.event_offset_read(id))
    }

    fn deliveries_total(&self) -> Result<u64> {
        self.blocking(|| self.table_len_deliveries())
    }

    fn room(&self, name: &RoomName) -> Result<Option<Room>> {
        self.blocking(|| self.room_read(name))
    }

    fn rooms(&self, after: Option<&RoomName>, limit: usize) -> Result<Vec<Room>> {
        self.blocking(|| self.rooms_read(after, limit))
    }

    fn publish_target(&self, room: &RoomName, event_type: &EventTypeName) -> Result<PublishTarget> {
        self.blocking(|| self.publish_target_read(room, event_type))
    }

    fn event_type(&self, room: &RoomName, name: &EventTypeName) -> Result<EventType> {
        self.blocking(|| self.event_type_read(room, name))
    }

    fn event_types(&self, room: &RoomName) -> Result<Vec<EventType>> {
        self.blocking(|| self.event_types_read(room))
    }

    fn event_type_version(
        &self,
        room_id: u64,
        room: &RoomName,
        name: &EventTypeName,
        version: u32,
    ) -> Result<EventTypeVersion> {
        self.blocking(|| self.event_type_version_read(room_id, room, name, version))
    }

    fn room_id(&self, room: &RoomName) -> Result<u64> {
        self.blocking(|| self.require_room_id(room))
    }

    fn event(&self, id: EventId) -> Result<Option<Event>> {
        self.blocking(|| self.event_read(id))
    }

    fn set_delivery_defaults(&self, defaults: DeliveryDefaults) {
        *self.defaults.write().unwrap_or_else(|p| p.into_inner()) = defaults;
    }

    fn queue_health(
        &self,
        id: crate::ids::SubscriptionId,
        now: Timestamp,
        scan_max: usize,
    ) -> Result<crate::storage::QueueHealth> {
        self.blocking(|| self.queue_health_read(id, now, scan_max))
    }

    fn event_log(
        &self,
        room: &RoomName,
        filter: &EventFilter,
        keep: &(dyn Fn(&Event, &[crate::subscription::EventDelivery]) -> bool + Sync),
        limit: usize,
        scan_max: usize,
        now: Timestamp,
    ) -> Result<Page<crate::storage::LoggedEvent>> {
        self.blocking(|| self.event_log_read(room, filter, keep, limit, scan_max, now))
    }

    fn events(
        &self,
        room: &RoomName,
        filter: &EventFilter,
        limit: usize,
        scan_max: usize,
    ) -> Result<Page<Event>> {
        self.blocking(|| self.events_read(room, filter, limit, scan_max))
    }
}
