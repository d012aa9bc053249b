//! The engine: every rule of the broker (Rooms, numbering, idempotency, fan-out, delivery
//! queues, retention) as core code over the key-value seam of `storage::kv`, so that a backend
//! only stores and a second backend cannot disagree with the first about what a rule does. Each
//! batch of operations is applied in a `Txn` over a fresh snapshot, each operation under its own
//! savepoint, and committed as one durable batch. This file holds Rooms, event types, events,
//! publishing and the retention sweep; `delivery.rs` the subscriptions and their queues;
//! `records.rs` the administrative records and the audit log.

mod delivery;
#[cfg(test)]
mod read_tests;
mod records;

pub(crate) use delivery::{ack_id, parse_ack_id};

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::ids::{EventId, EventTypeName, OrderingKey, Principal, RoomName, Sequence};
use crate::model::{
    Event, EventFilter, EventType, EventTypeSpec, EventTypeVersion, NewRoom, Page,
    PutEventTypeOutcome, Receipt, Retention, Room, RoomPatch, RoomStatus, StoredResponse,
    SweepReport,
};
use crate::storage::codec::{decode, decode_with_tail, encode, encode_with_tail};
use crate::storage::kv::Space;
use crate::storage::kv::{KvStore, LAYOUT_VERSION};
use crate::storage::txn::{Def, Table, Txn};
use crate::storage::{
    Applied, DeliveryDefaults, PreparedEvent, PublishTarget, RecordKind, RoomQuota, Storage,
    WriteOp, WriteOutput,
};
use crate::storage::{FaultyKv, RedbKv};
use crate::subscription::RetryOverrides;
use delivery::{
    DeliveryRecordInit, FanoutCache, ATTEMPTS, DEAD_LETTERS, DELETED_SUBS, DELIVERIES, ROOM_SUBS,
    SUBSCRIPTIONS, SUB_STATS,
};
use records::{AUDIT, RECORDS};

// Tables. Rooms are keyed by name; everything inside a Room by the Room's incarnation id, so that
// deleting a Room is one small write and its contents are purged later in bounded batches.
/// Counters: `next_room_id`, `format`.
pub(super) const META: Def<String, u64> = Def::new(Space::Meta);
/// Room name -> RoomRecord.
pub(super) const ROOMS: Def<String, Vec<u8>> = Def::new(Space::Rooms);
/// Room id -> (next log offset, events stored, payload bytes stored).
pub(super) const ROOM_STATS: Def<u64, (u64, u64, u64)> = Def::new(Space::RoomStats);
/// (room id, type name) -> TypeRecord.
const EVENT_TYPES: Def<(u64, String), Vec<u8>> = Def::new(Space::EventTypes);
/// (room id, type name, version) -> VersionRecord.
const SCHEMAS: Def<(u64, String, u32), Vec<u8>> = Def::new(Space::Schemas);
/// Event id -> EventRecord (metadata and payload).
pub(super) const EVENTS: Def<u128, Vec<u8>> = Def::new(Space::Events);
/// (room id, log offset) -> event id: the Room's events in acceptance order.
pub(super) const ROOM_LOG: Def<(u64, u64), u128> = Def::new(Space::RoomLog);
/// (room id, key) -> last sequence assigned, as of the Room's sequence checkpoint. Never
/// decreases, even when retention removes events, so that a key's sequence never repeats.
const KEY_SEQ: Def<(u64, String), u64> = Def::new(Space::KeySeq);
/// Room id -> the log offset up to which KEY_SEQ is complete. Sequences assigned after it are
/// recovered from the Room's log (see `SeqCache`).
const SEQ_CHECKPOINT: Def<u64, u64> = Def::new(Space::SeqCheckpoint);
/// (room id, publisher, idempotency key) -> IdempotencyRecord.
const IDEMPOTENCY: Def<(u64, String, String), Vec<u8>> = Def::new(Space::Idempotency);
/// (expires at, room id, publisher, idempotency key) -> (): the expiry index the sweep walks.
const IDEM_EXPIRY: Def<(u64, u64, String, String), ()> = Def::new(Space::IdemExpiry);
/// (principal, idempotency key) -> ResponseRecord: API responses remembered for replay.
const RESPONSES: Def<(String, String), Vec<u8>> = Def::new(Space::Responses);
/// (expires at, principal, idempotency key) -> (): the expiry index of RESPONSES.
const RESPONSE_EXPIRY: Def<(u64, String, String), ()> = Def::new(Space::ResponseExpiry);
/// Ids of deleted Rooms whose contents the sweep has not finished purging.
const DELETED_ROOMS: Def<u64, ()> = Def::new(Space::DeletedRooms);

/// Sequences are checkpointed into KEY_SEQ after this many events, bounding the log replay at
/// open to about this many records.
const SEQ_CHECKPOINT_EVENTS: u64 = 50_000;
/// ... or when this many keys have sequences newer than their checkpoint, bounding memory.
const SEQ_CACHE_KEYS_MAX: usize = 16_384;

/// The last sequence of every key that received events since the last checkpoint.
///
/// Why: writing each key's counter on every publish dirtied one more B-tree page per event at a
/// random position, and dirty pages are what a durable commit pays for; the benchmark showed it
/// costing about a fifth of publish throughput. The Room log already records every event's key and
/// sequence in the same transaction that assigns them, so the counters can be written back in bulk
/// and rebuilt from the log after the checkpoint whenever memory and disk may disagree: at open,
/// and after any failed commit.
#[derive(Default)]
struct SeqCache {
    last: HashMap<(u64, String), u64>,
    events_since_checkpoint: u64,
    /// False after a failed rebuild: publishing is refused until a rebuild succeeds, because a
    /// sequence taken from a stale counter could repeat.
    valid: bool,
    /// What each change of this batch replaced, so that one failed operation can be undone
    /// alone (see [`Txn::savepoint`]).
    undo: Vec<((u64, String), Option<u64>)>,
}

/// Where [`SeqCache::rollback`] returns to.
#[derive(Clone, Copy)]
struct SeqSavepoint {
    undo: usize,
    events_since_checkpoint: u64,
}

impl SeqCache {
    fn set(&mut self, key: (u64, String), seq: u64) {
        let before = self.last.insert(key.clone(), seq);
        self.undo.push((key, before));
    }

    fn forget_room(&mut self, room_id: u64) {
        let keys: Vec<(u64, String)> = self
            .last
            .keys()
            .filter(|(rid, _)| *rid == room_id)
            .cloned()
            .collect();
        for k in keys {
            let before = self.last.remove(&k);
            self.undo.push((k, before));
        }
    }

    fn savepoint(&self) -> SeqSavepoint {
        SeqSavepoint {
            undo: self.undo.len(),
            events_since_checkpoint: self.events_since_checkpoint,
        }
    }

    fn rollback(&mut self, sp: SeqSavepoint) {
        while self.undo.len() > sp.undo {
            let Some((k, before)) = self.undo.pop() else {
                break;
            };
            match before {
                Some(v) => self.last.insert(k, v),
                None => self.last.remove(&k),
            };
        }
        self.events_since_checkpoint = sp.events_since_checkpoint;
    }
}

#[derive(Serialize, Deserialize)]
pub(super) struct RoomRecord {
    pub(super) id: u64,
    description: String,
    owner: Principal,
    status: RoomStatus,
    pub(super) ordered: bool,
    retention: Retention,
    pub(super) retry: RetryOverrides,
    created_at: Timestamp,
    updated_at: Timestamp,
}

/// A Room's counters: (next log offset, events stored, payload bytes stored).
type RoomStats = (u64, u64, u64);

#[derive(Serialize, Deserialize)]
struct TypeRecord {
    description: String,
    version: u32,
    created_at: Timestamp,
    updated_at: Timestamp,
}

#[derive(Serialize, Deserialize)]
struct VersionRecord {
    /// The schema as compact JSON text (postcard cannot carry a `serde_json::Value`).
    schema_json: String,
    key_pointer: Option<String>,
    created_at: Timestamp,
}

#[derive(Serialize, Deserialize)]
pub(super) struct EventRecord {
    pub(super) room_id: u64,
    room: RoomName,
    pub(super) event_type: EventTypeName,
    version: u32,
    pub(super) key: OrderingKey,
    pub(super) sequence: u64,
    pub(super) offset: u64,
    publisher: Principal,
    pub(super) received_at: Timestamp,
    idempotency_key: Option<String>,
    /// Stored raw after the encoded fields (see `encode_event`), not through serde.
    #[serde(skip)]
    payload: Vec<u8>,
}

fn encode_event(rec: &EventRecord) -> Result<Vec<u8>> {
    encode_with_tail(rec, &rec.payload)
}

/// An event record without its payload (which stays unread): for scans that need metadata only.
pub(super) fn decode_event_header(bytes: &[u8]) -> Result<EventRecord> {
    decode_with_tail::<EventRecord>(bytes).map(|(rec, _)| rec)
}

fn decode_event(bytes: &[u8]) -> Result<EventRecord> {
    let (mut rec, payload): (EventRecord, &[u8]) = decode_with_tail(bytes)?;
    rec.payload = payload.to_vec();
    Ok(rec)
}

#[derive(Serialize, Deserialize)]
struct ResponseRecord {
    request_hash: [u8; 32],
    response: StoredResponse,
    expires_at: Timestamp,
}

#[derive(Serialize, Deserialize)]
struct IdempotencyRecord {
    request_hash: [u8; 32],
    receipt: Receipt,
    expires_at: Timestamp,
}

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

/// The key of a Room incarnation's policy record; the value is `b"approval"` when subscriptions
/// need approval. Kept out of `RoomRecord` so that stored Rooms keep their layout.
fn policy_key(room_id: u64) -> String {
    room_id.to_string()
}

const APPROVAL: &[u8] = b"approval";

fn room_from(
    name: &str,
    r: RoomRecord,
    stats: (u64, u64, u64),
    subscription_approval: bool,
) -> Result<Room> {
    Ok(Room {
        subscription_approval,
        name: RoomName::new(name).map_err(|e| Error::Storage(format!("stored room name: {e}")))?,
        description: r.description,
        owner: r.owner,
        status: r.status,
        ordered: r.ordered,
        retention: r.retention,
        retry: r.retry,
        created_at: r.created_at,
        updated_at: r.updated_at,
        events_stored: stats.1,
        bytes_stored: stats.2,
    })
}

fn event_from(id: u128, r: EventRecord) -> Event {
    Event {
        id: EventId(Uuid::from_u128(id)),
        room: r.room,
        event_type: r.event_type,
        version: r.version,
        key: r.key,
        sequence: Sequence(r.sequence),
        publisher: r.publisher,
        received_at: r.received_at,
        idempotency_key: r.idempotency_key,
        payload: r.payload,
    }
}

fn parse_schema(text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| Error::Storage(format!("stored schema: {e}")))
}

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
}

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

    pub(super) fn room_id_of(&self, room: &RoomName) -> Result<u64> {
        self.require_room_id(room)
    }

    fn init(
        kv: Arc<dyn KvStore>,
        faults: Arc<crate::storage::StorageFaults>,
        defaults: DeliveryDefaults,
    ) -> Result<Self> {
        let txn = Txn::new(kv.snapshot()?);
        {
            let meta = txn.open_table(META)?;
            match meta.get("layout_version")? {
                None => {
                    meta.insert("layout_version", LAYOUT_VERSION)?;
                    meta.insert("next_room_id", 1)?;
                }
                Some(LAYOUT_VERSION) => {}
                Some(other) => {
                    return Err(Error::Storage(format!(
                        "data file has layout version {other}; this build reads version {LAYOUT_VERSION}"
                    )))
                }
            }
            let cleared = delivery::clear_interrupted_seeks(&txn)?;
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
            kv,
        };
        let rebuilt = store.rebuild_seqs()?;
        *store.seqs.lock().unwrap_or_else(|p| p.into_inner()) = rebuilt;
        Ok(store)
    }

    /// Reads every Room's log after its sequence checkpoint to recover the sequences that are
    /// committed but not yet checkpointed.
    fn rebuild_seqs(&self) -> Result<SeqCache> {
        let txn = self.begin_read()?;
        let stats = txn.open_table(ROOM_STATS)?;
        let deleted = txn.open_table(DELETED_ROOMS)?;
        let checkpoints = txn.open_table(SEQ_CHECKPOINT)?;
        let log = txn.open_table(ROOM_LOG)?;
        let events = txn.open_table(EVENTS)?;
        let mut cache = SeqCache {
            valid: true,
            ..SeqCache::default()
        };
        for item in stats.iter()? {
            let rid = item?.0;
            if deleted.get(rid)?.is_some() {
                continue;
            }
            let from = checkpoints.get(rid)?.unwrap_or(0);
            for entry in log.range((rid, from)..=(rid, u64::MAX))? {
                let id = entry?.1;
                let Some(g) = events.get(id)? else { continue };
                let (rec, _payload): (EventRecord, &[u8]) = decode_with_tail(&g)?;
                let last = cache.last.entry((rid, rec.key.to_string())).or_insert(0);
                *last = (*last).max(rec.sequence);
                cache.events_since_checkpoint += 1;
            }
        }
        Ok(cache)
    }

    fn approval_read(&self, room_id: u64) -> Result<bool> {
        Ok(self
            .record_read(RecordKind::RoomPolicy, &policy_key(room_id))?
            .is_some_and(|v| v == APPROVAL))
    }

    fn read_room(&self, name: &RoomName) -> Result<Option<(RoomRecord, RoomStats)>> {
        let txn = self.begin_read()?;
        let rooms = txn.open_table(ROOMS)?;
        let Some(rec) = rooms.get(name.as_str())? else {
            return Ok(None);
        };
        let rec: RoomRecord = decode(&rec)?;
        let stats = txn.open_table(ROOM_STATS)?.get(rec.id)?.unwrap_or_default();
        Ok(Some((rec, stats)))
    }

    fn require_room_id(&self, name: &RoomName) -> Result<u64> {
        self.read_room(name)?
            .map(|(r, _)| r.id)
            .ok_or_else(|| Error::RoomNotFound {
                room: name.to_string(),
            })
    }
}

fn type_not_found(room: &RoomName, name: &EventTypeName) -> Error {
    Error::EventTypeNotFound {
        room: room.to_string(),
        event_type: name.to_string(),
    }
}

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
}

impl<'t> Tables<'t> {
    fn open(
        txn: &Txn,
        seqs: &'t mut SeqCache,
        fanout: &'t mut FanoutCache,
        defaults: DeliveryDefaults,
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
            records: txn.open_table(RECORDS)?,
            audit: txn.open_table(AUDIT)?,
            txn: txn.clone(),
            seqs,
            fanout,
            touched: HashSet::new(),
            observed: Vec::new(),
            defaults,
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

    pub(super) fn room_record(&self, name: &RoomName) -> Result<RoomRecord> {
        match self.rooms.get(name.as_str())? {
            Some(g) => decode(&g),
            None => Err(Error::RoomNotFound {
                room: name.to_string(),
            }),
        }
    }

    pub(super) fn stats(&self, room_id: u64) -> Result<(u64, u64, u64)> {
        Ok(self.room_stats.get(room_id)?.unwrap_or_default())
    }

    fn store_room(&mut self, name: &RoomName, rec: &RoomRecord) -> Result<Room> {
        self.rooms.insert(name.as_str(), encode(rec)?.as_slice())?;
        let stats = self.stats(rec.id)?;
        let approval = self
            .records
            .get((RecordKind::RoomPolicy.as_str(), policy_key(rec.id).as_str()))?
            .is_some_and(|g| g == APPROVAL);
        room_from(name.as_str(), decode(&encode(rec)?)?, stats, approval)
    }

    fn set_approval(&mut self, room_id: u64, on: bool) -> Result<()> {
        let key = policy_key(room_id);
        if on {
            self.records
                .insert((RecordKind::RoomPolicy.as_str(), key.as_str()), APPROVAL)?;
        } else {
            self.records
                .remove((RecordKind::RoomPolicy.as_str(), key.as_str()))?;
        }
        Ok(())
    }

    /// Counts the Rooms: (active or disabled, pending, pending owned by `owner`).
    fn room_counts(&self, owner: &Principal) -> Result<(u64, u64, u64)> {
        let (mut active, mut pending, mut mine) = (0, 0, 0);
        for r in self.rooms.iter()? {
            let (_, v) = r?;
            let rec: RoomRecord = decode(&v)?;
            if rec.status == RoomStatus::Pending {
                pending += 1;
                if rec.owner == *owner {
                    mine += 1;
                }
            } else {
                active += 1;
            }
        }
        Ok((active, pending, mine))
    }

    fn create_room(&mut self, now: Timestamp, room: NewRoom, quota: RoomQuota) -> Result<Room> {
        if self.rooms.get(room.name.as_str())?.is_some() {
            return Err(Error::RoomExists {
                room: room.name.to_string(),
            });
        }
        let (active, pending, mine) = self.room_counts(&room.owner)?;
        if room.approved {
            if active >= quota.rooms_max as u64 {
                return Err(Error::limit(
                    "rooms_max",
                    quota.rooms_max as u64,
                    active + 1,
                ));
            }
        } else {
            if mine >= quota.pending_per_owner_max as u64 {
                return Err(Error::limit(
                    "pending_rooms_per_application_max",
                    quota.pending_per_owner_max as u64,
                    mine + 1,
                ));
            }
            if pending >= quota.pending_max as u64 {
                return Err(Error::limit(
                    "pending_rooms_max",
                    quota.pending_max as u64,
                    pending + 1,
                ));
            }
        }
        let id = self.meta.get("next_room_id")?.unwrap_or(1);
        self.meta.insert("next_room_id", id + 1)?;
        self.room_stats.insert(id, (0, 0, 0))?;
        let rec = RoomRecord {
            id,
            description: room.description,
            owner: room.owner,
            status: if room.approved {
                RoomStatus::Active
            } else {
                RoomStatus::Pending
            },
            ordered: room.ordered,
            retention: room.retention,
            retry: room.retry,
            created_at: now,
            updated_at: now,
        };
        self.set_approval(id, room.subscription_approval)?;
        self.store_room(&room.name, &rec)
    }

    fn update_room(&mut self, now: Timestamp, name: &RoomName, patch: RoomPatch) -> Result<Room> {
        let mut rec = self.room_record(name)?;
        if let Some(status) = patch.status {
            match (rec.status, status) {
                // Not even to disabled: a disabled Room counts as an active one, and could be
                // enabled again without an administrator's approval.
                (RoomStatus::Pending, _) => {
                    return Err(Error::invalid(
                        "status",
                        "a pending room changes status only by approval (or is deleted)",
                    ))
                }
                (_, RoomStatus::Pending) => {
                    return Err(Error::invalid(
                        "status",
                        "a room cannot be set back to pending",
                    ))
                }
                (_, s) => rec.status = s,
            }
        }
        if let Some(d) = patch.description {
            rec.description = d;
        }
        if let Some(o) = patch.ordered {
            rec.ordered = o;
        }
        if let Some(r) = patch.retention {
            rec.retention = r;
        }
        if let Some(r) = patch.retry {
            rec.retry = r;
        }
        if let Some(a) = patch.subscription_approval {
            self.set_approval(rec.id, a)?;
        }
        rec.updated_at = now;
        self.store_room(name, &rec)
    }

    fn approve_room(&mut self, now: Timestamp, name: &RoomName, rooms_max: usize) -> Result<Room> {
        let mut rec = self.room_record(name)?;
        match rec.status {
            RoomStatus::Pending => {
                let (active, _, _) = self.room_counts(&rec.owner)?;
                if active >= rooms_max as u64 {
                    return Err(Error::limit("rooms_max", rooms_max as u64, active + 1));
                }
                rec.status = RoomStatus::Active;
                rec.updated_at = now;
                self.store_room(name, &rec)
            }
            RoomStatus::Active => self.store_room(name, &rec),
            RoomStatus::Disabled => Err(Error::RoomNotActive {
                room: name.to_string(),
                status: "disabled".into(),
            }),
        }
    }

    fn delete_room(&mut self, name: &RoomName) -> Result<()> {
        let rec = self.room_record(name)?;
        self.rooms.remove(name.as_str())?;
        self.deleted_rooms.insert(rec.id, ())?;
        self.set_approval(rec.id, false)?;
        // Its subscriptions go with it: their queues point into the Room's log.
        self.delete_room_subscriptions(rec.id)?;
        self.seqs.forget_room(rec.id);
        Ok(())
    }

    fn remember_response(
        &mut self,
        principal: &Principal,
        key: &str,
        request_hash: [u8; 32],
        response: StoredResponse,
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<()> {
        let k = (principal.as_str(), key);
        let live = match self.responses.get(k)? {
            Some(g) => decode::<ResponseRecord>(&g)?.expires_at > now,
            None => false,
        };
        if live {
            return Ok(());
        }
        let rec = ResponseRecord {
            request_hash,
            response,
            expires_at,
        };
        self.responses.insert(k, encode(&rec)?.as_slice())?;
        self.response_expiry
            .insert((expires_at.0, principal.as_str(), key), ())?;
        Ok(())
    }

    fn delete_event_type(&mut self, room: &RoomName, name: &EventTypeName) -> Result<()> {
        let rid = self.room_record(room)?.id;
        match self.event_types.remove((rid, name.as_str()))? {
            Some(_) => Ok(()),
            None => Err(type_not_found(room, name)),
        }
    }

    fn put_event_type(
        &mut self,
        now: Timestamp,
        room: &RoomName,
        spec: EventTypeSpec,
        types_max: usize,
        versions_max: u32,
        create_only: bool,
    ) -> Result<PutEventTypeOutcome> {
        let room_rec = self.room_record(room)?;
        let rid = room_rec.id;
        let name = spec.name.as_str();
        let schema_json = spec.schema.to_string();
        let existing: Option<TypeRecord> = match self.event_types.get((rid, name))? {
            Some(g) => Some(decode(&g)?),
            None => None,
        };
        if create_only && existing.is_some() {
            return Err(Error::EventTypeExists {
                room: room.to_string(),
                event_type: name.to_string(),
            });
        }
        let (mut type_rec, created, new_version) = match existing {
            None => {
                let count = self.event_types.range((rid, "")..(rid + 1, ""))?.count();
                if count >= types_max {
                    return Err(Error::limit(
                        "event_types_per_room_max",
                        types_max as u64,
                        count as u64 + 1,
                    ));
                }
                // A type deleted earlier left its versions behind; numbering continues after
                // them so that a (type, version) pair never names two different schemas.
                let last = match self
                    .schemas
                    .range_rev((rid, name, 0)..=(rid, name, u32::MAX))?
                    .next()
                {
                    Some(item) => item?.0 .2,
                    None => 0,
                };
                if last >= versions_max {
                    return Err(Error::limit(
                        "schema_versions_max",
                        versions_max.into(),
                        u64::from(last) + 1,
                    ));
                }
                let rec = TypeRecord {
                    description: spec.description.clone(),
                    version: last + 1,
                    created_at: now,
                    updated_at: now,
                };
                (rec, true, true)
            }
            Some(mut rec) => {
                let current: VersionRecord = match self.schemas.get((rid, name, rec.version))? {
                    Some(g) => decode(&g)?,
                    None => {
                        return Err(Error::Storage(format!(
                            "missing schema version {} of {name}",
                            rec.version
                        )))
                    }
                };
                let changed =
                    current.schema_json != schema_json || current.key_pointer != spec.key_pointer;
                if changed {
                    if rec.version >= versions_max {
                        return Err(Error::limit(
                            "schema_versions_max",
                            versions_max.into(),
                            u64::from(rec.version) + 1,
                        ));
                    }
                    rec.version += 1;
                    rec.updated_at = now;
                }
                if rec.description != spec.description {
                    rec.description = spec.description.clone();
                    rec.updated_at = now;
                }
                (rec, false, changed)
            }
        };
        if new_version {
            let v = VersionRecord {
                schema_json,
                key_pointer: spec.key_pointer.clone(),
                created_at: now,
            };
            self.schemas
                .insert((rid, name, type_rec.version), encode(&v)?.as_slice())?;
        }
        type_rec.description = spec.description;
        self.event_types
            .insert((rid, name), encode(&type_rec)?.as_slice())?;
        let current: VersionRecord = match self.schemas.get((rid, name, type_rec.version))? {
            Some(g) => decode(&g)?,
            None => return Err(Error::Storage("schema version vanished".into())),
        };
        Ok(PutEventTypeOutcome {
            event_type: EventType {
                room: room.clone(),
                name: spec.name,
                description: type_rec.description,
                version: type_rec.version,
                schema: parse_schema(&current.schema_json)?,
                key_pointer: current.key_pointer,
                created_at: type_rec.created_at,
                updated_at: type_rec.updated_at,
            },
            created,
            new_version,
        })
    }

    fn publish(&mut self, now: Timestamp, ev: PreparedEvent) -> Result<Receipt> {
        if !self.seqs.valid {
            return Err(Error::Storage(
                "sequence counters could not be recovered after a failed commit".into(),
            ));
        }
        // The Room may have been disabled or replaced since the caller validated against it.
        let room = self.room_record(&ev.room)?;
        if room.id != ev.room_id {
            return Err(Error::RoomNotFound {
                room: ev.room.to_string(),
            });
        }
        if room.status != RoomStatus::Active {
            return Err(Error::RoomNotActive {
                room: ev.room.to_string(),
                status: room.status.as_str().into(),
            });
        }
        if let Some(claim) = &ev.idempotency {
            let k = (room.id, ev.publisher.as_str(), claim.key.as_str());
            let prior: Option<IdempotencyRecord> = match self.idempotency.get(k)? {
                Some(g) => Some(decode(&g)?),
                None => None,
            };
            if let Some(prior) = prior {
                if prior.expires_at > now {
                    if prior.request_hash == claim.request_hash {
                        return Ok(Receipt {
                            duplicate: true,
                            ..prior.receipt
                        });
                    }
                    return Err(Error::IdempotencyConflict {
                        key: claim.key.clone(),
                    });
                }
                self.idem_expiry.remove((
                    prior.expires_at.0,
                    room.id,
                    ev.publisher.as_str(),
                    claim.key.as_str(),
                ))?;
            }
        }
        let id = ev.event_id.0.as_u128();
        if ev.id_from_publisher {
            // A publisher's id names one event: the same publisher sending the same event again
            // (same Room incarnation, type, key and payload bytes) gets the first receipt;
            // anything else is a conflict, with the same answer whoever the first event's
            // publisher is, so that the answer does not tell whose id it is.
            let prior: Option<EventRecord> = match self.events.get(id)? {
                Some(g) => {
                    let (prior, payload): (EventRecord, &[u8]) = decode_with_tail(&g)?;
                    let same = prior.room_id == room.id
                        && prior.event_type == ev.event_type
                        && prior.publisher == ev.publisher
                        && prior.key == ev.key
                        && payload == ev.payload.as_slice();
                    if !same {
                        return Err(Error::EventIdConflict {
                            id: ev.event_id.to_string(),
                        });
                    }
                    Some(prior)
                }
                None => None,
            };
            if let Some(prior) = prior {
                return Ok(Receipt {
                    id: ev.event_id,
                    room: prior.room,
                    event_type: prior.event_type,
                    version: prior.version,
                    key: prior.key,
                    sequence: Sequence(prior.sequence),
                    received_at: prior.received_at,
                    duplicate: true,
                });
            }
        }
        let seq_key = (room.id, ev.key.as_str().to_string());
        let last = match self.seqs.last.get(&seq_key) {
            Some(&s) => s,
            None => self.key_seq.get((room.id, ev.key.as_str()))?.unwrap_or(0),
        };
        let seq = last + 1;
        let (offset, count, bytes) = self.stats(room.id)?;
        self.room_stats.insert(
            room.id,
            (offset + 1, count + 1, bytes + ev.payload.len() as u64),
        )?;
        self.room_log.insert((room.id, offset), id)?;
        let receipt = Receipt {
            id: ev.event_id,
            room: ev.room.clone(),
            event_type: ev.event_type.clone(),
            version: ev.version,
            key: ev.key.clone(),
            sequence: Sequence(seq),
            received_at: now,
            duplicate: false,
        };
        if let Some(claim) = &ev.idempotency {
            let expires_at = now.plus_ms(claim.window_ms);
            let rec = IdempotencyRecord {
                request_hash: claim.request_hash,
                receipt: receipt.clone(),
                expires_at,
            };
            self.idempotency.insert(
                (room.id, ev.publisher.as_str(), claim.key.as_str()),
                encode(&rec)?.as_slice(),
            )?;
            self.idem_expiry.insert(
                (
                    expires_at.0,
                    room.id,
                    ev.publisher.as_str(),
                    claim.key.as_str(),
                ),
                (),
            )?;
        }
        let rec = EventRecord {
            room_id: room.id,
            room: ev.room,
            event_type: ev.event_type,
            version: ev.version,
            key: ev.key,
            sequence: seq,
            offset,
            publisher: ev.publisher,
            received_at: now,
            idempotency_key: ev.idempotency.map(|c| c.key),
            payload: ev.payload,
        };
        self.events.insert(id, encode_event(&rec)?.as_slice())?;
        // The delivery obligations, in the same transaction as the event.
        self.fan_out(
            now,
            room.id,
            offset,
            &DeliveryRecordInit {
                event_id: id,
                event_type: &rec.event_type,
                key: &rec.key,
                sequence: seq,
            },
        )?;
        // Last, so that a refused publish leaves the counters alone. A storage error after this
        // point fails the whole commit, and the writer then rebuilds the counters from disk.
        self.seqs.set(seq_key, seq);
        self.seqs.events_since_checkpoint += 1;
        Ok(receipt)
    }

    /// Writes every counter newer than its checkpoint into KEY_SEQ and moves each Room's
    /// checkpoint to the end of its log, in the current transaction.
    fn checkpoint_seqs(&mut self) -> Result<()> {
        let mut rooms = HashSet::new();
        for ((rid, key), seq) in self.seqs.last.drain() {
            if self.deleted_rooms.get(rid)?.is_some() {
                continue;
            }
            self.key_seq.insert((rid, key.as_str()), seq)?;
            rooms.insert(rid);
        }
        for rid in rooms {
            let (next_offset, _, _) = self.stats(rid)?;
            self.seq_checkpoint.insert(rid, next_offset)?;
        }
        self.seqs.events_since_checkpoint = 0;
        Ok(())
    }

    /// Removes one event and its index entries, keeping the Room's counters right.
    fn remove_event(&mut self, id: u128, rec: &EventRecord) -> Result<()> {
        self.events.remove(id)?;
        self.room_log.remove((rec.room_id, rec.offset))?;
        let stats = self.room_stats.get(rec.room_id)?;
        if let Some((offset, count, bytes)) = stats {
            self.room_stats.insert(
                rec.room_id,
                (
                    offset,
                    count.saturating_sub(1),
                    bytes.saturating_sub(rec.payload.len() as u64),
                ),
            )?;
        }
        Ok(())
    }

    fn sweep(&mut self, now: Timestamp, delete_max: usize) -> Result<SweepReport> {
        if !self.seqs.valid {
            // Removing events whose sequences only the log knows could let a counter go back.
            return Err(Error::Storage(
                "sequence counters are not recovered; retention waits".into(),
            ));
        }
        let mut report = SweepReport::default();
        let mut budget = delete_max;
        // Retention may remove events after the checkpoint, whose sequences the log replay would
        // then miss; checkpoint first so that no counter can go back.
        self.checkpoint_seqs()?;

        // 1. Expired idempotency records.
        let expired: Vec<(u64, u64, String, String)> = self
            .idem_expiry
            .range((0u64, 0u64, "", "")..(now.0, 0u64, "", ""))?
            .take(budget)
            .map(|r| {
                r.map(|(k, _)| {
                    let (e, rid, p, key) = k;
                    (e, rid, p.to_string(), key.to_string())
                })
            })
            .collect::<std::result::Result<_, _>>()?;
        for (e, rid, p, key) in &expired {
            self.idem_expiry
                .remove((*e, *rid, p.as_str(), key.as_str()))?;
            self.idempotency.remove((*rid, p.as_str(), key.as_str()))?;
        }
        report.idempotency_removed = expired.len() as u64;
        budget -= expired.len();

        // 1b. Expired remembered API responses. A record replaced after its expiry has a later
        // expiry entry of its own, so only a record whose expiry matches is removed.
        let expired: Vec<(u64, String, String)> = self
            .response_expiry
            .range((0u64, "", "")..(now.0, "", ""))?
            .take(budget)
            .map(|r| {
                r.map(|(k, _)| {
                    let (e, p, key) = k;
                    (e, p.to_string(), key.to_string())
                })
            })
            .collect::<std::result::Result<_, _>>()?;
        for (e, p, key) in &expired {
            self.response_expiry
                .remove((*e, p.as_str(), key.as_str()))?;
            let current = match self.responses.get((p.as_str(), key.as_str()))? {
                Some(g) => Some(decode::<ResponseRecord>(&g)?.expires_at.0),
                None => None,
            };
            if current == Some(*e) {
                self.responses.remove((p.as_str(), key.as_str()))?;
            }
        }
        report.idempotency_removed += expired.len() as u64;
        budget -= expired.len();

        // 2. Contents of deleted Rooms.
        let deleted: Vec<u64> = self
            .deleted_rooms
            .iter()?
            .map(|r| r.map(|(k, _)| k))
            .collect::<std::result::Result<_, _>>()?;
        for rid in deleted {
            if budget == 0 {
                break;
            }
            let removed = self.purge_room(rid, budget)?;
            report.deleted_room_records_removed += removed as u64;
            budget -= removed.min(budget);
        }

        // 3. Retention bounds of live Rooms.
        let rooms: Vec<RoomRecord> = self
            .rooms
            .iter()?
            .map(|r| r.and_then(|(_, v)| decode(&v)))
            .collect::<Result<_>>()?;
        for room in rooms {
            if budget == 0 {
                break;
            }
            if room.retention.age_ms_max.is_none() && room.retention.bytes_max.is_none() {
                continue;
            }
            let (removed, kept) = self.enforce_retention(now, &room, budget)?;
            report.events_removed += removed;
            report.events_kept_owed += kept;
            budget -= (removed as usize).min(budget);
        }
        // 4. Expired dead letters and the queues of deleted subscriptions.
        if budget > 0 {
            let (expired, purged) = self.sweep_delivery(now, budget)?;
            report.dead_letters_expired = expired;
            report.deleted_subscription_records_removed = purged;
            budget -= ((expired + purged) as usize).min(budget);
        }
        report.more = budget == 0;
        Ok(report)
    }

    /// Deletes up to `budget` records of a deleted Room; returns how many. Removes the Room's
    /// tombstone once nothing of it is left.
    fn purge_room(&mut self, rid: u64, budget: usize) -> Result<usize> {
        let mut left = budget;
        let log: Vec<(u64, u128)> = self
            .room_log
            .range((rid, 0)..=(rid, u64::MAX))?
            .take(left)
            .map(|r| r.map(|(k, v)| (k.1, v)))
            .collect::<std::result::Result<_, _>>()?;
        for &(offset, id) in &log {
            let rec: Option<EventRecord> = match self.events.get(id)? {
                Some(g) => Some(decode_event(&g)?),
                None => None,
            };
            match rec {
                Some(rec) => self.remove_event(id, &rec)?,
                None => {
                    self.room_log.remove((rid, offset))?;
                }
            }
        }
        left -= log.len();
        // Each index is emptied in turn; `left` reaching zero means more remains for next time.
        macro_rules! purge_prefix {
            ($table:expr, $range:expr, $to_owned:expr, $k:ident => $as_key:expr) => {{
                if left == 0 {
                    return Ok(budget);
                }
                let keys: Vec<_> = $table
                    .range($range)?
                    .take(left)
                    .map(|r| r.map(|(k, _)| $to_owned(k)))
                    .collect::<std::result::Result<_, _>>()?;
                for $k in &keys {
                    $table.remove($as_key)?;
                }
                left -= keys.len();
            }};
        }
        purge_prefix!(
            self.key_seq,
            (rid, "")..(rid + 1, ""),
            |k| k,
            k => (k.0, k.1.as_str())
        );
        purge_prefix!(
            self.event_types,
            (rid, "")..(rid + 1, ""),
            |k| k,
            k => (k.0, k.1.as_str())
        );
        purge_prefix!(
            self.schemas,
            (rid, "", 0u32)..(rid + 1, "", 0u32),
            |k| k,
            k => (k.0, k.1.as_str(), k.2)
        );
        purge_prefix!(
            self.idempotency,
            (rid, "", "")..(rid + 1, "", ""),
            |k| k,
            k => (k.0, k.1.as_str(), k.2.as_str())
        );
        if left > 0 {
            // Nothing of the Room is left but its counters. Idempotency expiry entries without a
            // record are dropped harmlessly by the expiry step when they fall due.
            self.room_stats.remove(rid)?;
            self.seq_checkpoint.remove(rid)?;
            self.deleted_rooms.remove(rid)?;
        }
        Ok(budget - left)
    }

    /// Removes a Room's oldest events while they break its age or byte bound, skipping events
    /// still owed to a subscriber. Returns (removed, kept because owed).
    fn enforce_retention(
        &mut self,
        now: Timestamp,
        room: &RoomRecord,
        budget: usize,
    ) -> Result<(u64, u64)> {
        let (_, _, mut bytes) = self.stats(room.id)?;
        let scan_max = budget.saturating_mul(4);
        let log: Vec<u128> = self
            .room_log
            .range((room.id, 0)..=(room.id, u64::MAX))?
            .take(scan_max)
            .map(|r| r.map(|(_, v)| v))
            .collect::<std::result::Result<_, _>>()?;
        let (mut removed, mut kept) = (0u64, 0u64);
        for id in log {
            if removed as usize >= budget {
                break;
            }
            let rec: EventRecord = match self.events.get(id)? {
                Some(g) => decode_event(&g)?,
                None => continue,
            };
            let too_old = room
                .retention
                .age_ms_max
                .is_some_and(|a| now.ms_since(rec.received_at) > a);
            let too_big = room.retention.bytes_max.is_some_and(|b| bytes > b);
            if !too_old && !too_big {
                break;
            }
            // An event a subscriber is still owed (pending, in flight or dead-lettered) stays.
            if self.is_owed(room.id, rec.offset)? {
                kept += 1;
                continue;
            }
            bytes = bytes.saturating_sub(rec.payload.len() as u64);
            self.forget_attempts(room.id, rec.offset)?;
            self.remove_event(id, &rec)?;
            removed += 1;
        }
        Ok((removed, kept))
    }
}

impl Storage for Engine {
    fn apply(&self, now: Timestamp, ops: Vec<WriteOp>) -> Result<Applied> {
        let mut seqs = self.seqs.lock().unwrap_or_else(|p| p.into_inner());
        let mut fanout = self.fanout.lock().unwrap_or_else(|p| p.into_inner());
        let defaults = self.delivery_defaults();
        let outcome = (|| {
            let txn = Txn::new(self.kv.snapshot()?);
            let mut results = Vec::with_capacity(ops.len());
            let touched;
            let observed;
            {
                let mut tables = Tables::open(&txn, &mut seqs, &mut fanout, defaults)?;
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
                        // The fan-out cache may describe what was undone.
                        tables.fanout.clear();
                    }
                    results.push(result);
                }
                if tables.seqs.events_since_checkpoint >= SEQ_CHECKPOINT_EVENTS
                    || tables.seqs.last.len() >= SEQ_CACHE_KEYS_MAX
                {
                    tables.checkpoint_seqs()?;
                }
                touched = std::mem::take(&mut tables.touched);
                observed = std::mem::take(&mut tables.observed);
            }
            let batch = txn.take_batch();
            // The snapshot goes before the commit (an in-memory backend then need not copy).
            drop(txn);
            self.kv.commit(batch)?;
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
        busy: &HashSet<u64>,
        limit: usize,
        scan_max: usize,
    ) -> Result<(Vec<crate::storage::DueDelivery>, Option<Timestamp>)> {
        self.blocking(|| self.due_read(id, now, busy, limit, scan_max))
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
        self.blocking(|| {
            let (room_id, offset) = {
                let txn = self.begin_read()?;
                let events = txn.open_table(EVENTS)?;
                let Some(g) = events.get(id.0.as_u128())? else {
                    return Err(Error::EventNotFound { id: id.to_string() });
                };
                let rec = decode_event_header(&g)?;
                (rec.room_id, rec.offset)
            };
            self.event_deliveries_read(room_id, offset, now)
        })
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
        self.blocking(|| {
            let txn = self.begin_read()?;
            let t = txn.open_table(RESPONSES)?;
            let Some(g) = t.get((principal.as_str(), key))? else {
                return Ok(None);
            };
            let rec: ResponseRecord = decode(&g)?;
            Ok((rec.expires_at > now).then_some((rec.request_hash, rec.response)))
        })
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
        self.blocking(|| {
            let txn = self.begin_read()?;
            let events = txn.open_table(EVENTS)?;
            let Some(g) = events.get(id.0.as_u128())? else {
                return Ok(None);
            };
            Ok(Some(decode_event_header(&g)?.offset))
        })
    }

    fn deliveries_total(&self) -> Result<u64> {
        self.blocking(|| self.table_len_deliveries())
    }

    fn room(&self, name: &RoomName) -> Result<Option<Room>> {
        self.blocking(|| {
            let Some((rec, stats)) = self.read_room(name)? else {
                return Ok(None);
            };
            let approval = self.approval_read(rec.id)?;
            room_from(name.as_str(), rec, stats, approval).map(Some)
        })
    }

    fn rooms(&self, after: Option<&RoomName>, limit: usize) -> Result<Vec<Room>> {
        self.blocking(|| {
            let txn = self.begin_read()?;
            let rooms = txn.open_table(ROOMS)?;
            let stats = txn.open_table(ROOM_STATS)?;
            let start = after.map(RoomName::as_str).unwrap_or("");
            let mut out = Vec::new();
            for item in rooms.range(start..)? {
                let (k, v) = item?;
                if after.is_some_and(|a| a.as_str() == k) {
                    continue;
                }
                if out.len() >= limit {
                    break;
                }
                let rec: RoomRecord = decode(&v)?;
                let s = stats.get(rec.id)?.unwrap_or_default();
                let approval = self.approval_read(rec.id)?;
                out.push(room_from(&k, rec, s, approval)?);
            }
            Ok(out)
        })
    }

    fn publish_target(&self, room: &RoomName, event_type: &EventTypeName) -> Result<PublishTarget> {
        self.blocking(|| {
            let txn = self.begin_read()?;
            let rooms = txn.open_table(ROOMS)?;
            let rec: RoomRecord = match rooms.get(room.as_str())? {
                Some(g) => decode(&g)?,
                None => {
                    return Err(Error::RoomNotFound {
                        room: room.to_string(),
                    })
                }
            };
            if rec.status != RoomStatus::Active {
                return Err(Error::RoomNotActive {
                    room: room.to_string(),
                    status: rec.status.as_str().into(),
                });
            }
            let types = txn.open_table(EVENT_TYPES)?;
            let t: TypeRecord = match types.get((rec.id, event_type.as_str()))? {
                Some(g) => decode(&g)?,
                None => return Err(type_not_found(room, event_type)),
            };
            let schemas = txn.open_table(SCHEMAS)?;
            let v: VersionRecord = match schemas.get((rec.id, event_type.as_str(), t.version))? {
                Some(g) => decode(&g)?,
                None => return Err(Error::Storage("missing current schema version".into())),
            };
            Ok(PublishTarget {
                room_id: rec.id,
                version: t.version,
                key_pointer: v.key_pointer,
            })
        })
    }

    fn event_type(&self, room: &RoomName, name: &EventTypeName) -> Result<EventType> {
        self.blocking(|| {
            let rid = self.require_room_id(room)?;
            let txn = self.begin_read()?;
            let types = txn.open_table(EVENT_TYPES)?;
            let t: TypeRecord = match types.get((rid, name.as_str()))? {
                Some(g) => decode(&g)?,
                None => return Err(type_not_found(room, name)),
            };
            let v = self.event_type_version(rid, room, name, t.version)?;
            Ok(EventType {
                room: room.clone(),
                name: name.clone(),
                description: t.description,
                version: t.version,
                schema: v.schema,
                key_pointer: v.key_pointer,
                created_at: t.created_at,
                updated_at: t.updated_at,
            })
        })
    }

    fn event_types(&self, room: &RoomName) -> Result<Vec<EventType>> {
        self.blocking(|| {
            let rid = self.require_room_id(room)?;
            let names: Vec<String> = {
                let txn = self.begin_read()?;
                let types = txn.open_table(EVENT_TYPES)?;
                types
                    .range((rid, "")..(rid + 1, ""))?
                    .map(|r| r.map(|(k, _)| k.1.to_string()))
                    .collect::<std::result::Result<_, _>>()?
            };
            names
                .into_iter()
                .map(|n| {
                    let name = EventTypeName::new(n)
                        .map_err(|e| Error::Storage(format!("stored type name: {e}")))?;
                    self.event_type(room, &name)
                })
                .collect()
        })
    }

    fn event_type_version(
        &self,
        room_id: u64,
        room: &RoomName,
        name: &EventTypeName,
        version: u32,
    ) -> Result<EventTypeVersion> {
        self.blocking(|| {
            let txn = self.begin_read()?;
            let schemas = txn.open_table(SCHEMAS)?;
            let v: VersionRecord = match schemas.get((room_id, name.as_str(), version))? {
                Some(g) => decode(&g)?,
                None => {
                    return Err(Error::EventTypeNotFound {
                        room: room.to_string(),
                        event_type: format!("{name}@{version}"),
                    })
                }
            };
            Ok(EventTypeVersion {
                version,
                schema: parse_schema(&v.schema_json)?,
                key_pointer: v.key_pointer,
                created_at: v.created_at,
            })
        })
    }

    fn room_id(&self, room: &RoomName) -> Result<u64> {
        self.blocking(|| self.require_room_id(room))
    }

    fn event(&self, id: EventId) -> Result<Option<Event>> {
        self.blocking(|| {
            let txn = self.begin_read()?;
            let events = txn.open_table(EVENTS)?;
            let id = id.0.as_u128();
            let Some(g) = events.get(id)? else {
                return Ok(None);
            };
            let rec: EventRecord = decode_event(&g)?;
            // An event of a deleted Room awaiting purge is no longer visible.
            let deleted = txn.open_table(DELETED_ROOMS)?.get(rec.room_id)?.is_some();
            Ok((!deleted).then(|| event_from(id, rec)))
        })
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
        self.blocking(|| {
            let rid = self.require_room_id(room)?;
            self.scan_log(rid, filter, limit, scan_max, |offset, event| {
                // Each event's deliveries come from their own read: a log page is a report, and a
                // delivery settling between two events' reads is simply newer news.
                let deliveries = self.event_deliveries_read(rid, offset, now)?;
                Ok(keep(&event, &deliveries).then_some((event, deliveries)))
            })
        })
    }

    fn events(
        &self,
        room: &RoomName,
        filter: &EventFilter,
        limit: usize,
        scan_max: usize,
    ) -> Result<Page<Event>> {
        self.blocking(|| {
            let rid = self.require_room_id(room)?;
            self.scan_log(rid, filter, limit, scan_max, |_, event| Ok(Some(event)))
        })
    }
}

impl Engine {
    /// Walks a Room's log from the filter's cursor, keeping events that match the filter and
    /// that `map` turns into items, until `limit` items or `scan_max` positions.
    fn scan_log<T>(
        &self,
        rid: u64,
        filter: &EventFilter,
        limit: usize,
        scan_max: usize,
        mut map: impl FnMut(u64, Event) -> Result<Option<T>>,
    ) -> Result<Page<T>> {
        let start = match &filter.cursor {
            None => 0,
            Some(c) => c
                .parse::<u64>()
                .map_err(|_| Error::invalid("cursor", "not a cursor this listing returned"))?,
        };
        let txn = self.begin_read()?;
        let events = txn.open_table(EVENTS)?;
        // Every listing walks the Room's log; the cursor is the next offset to read. There is no
        // per-key index because one would cost a B-tree page per event at a random position on
        // every commit; a key's events are in sequence order in the log anyway, since the
        // writer assigns offset and sequence together.
        let log = txn.open_table(ROOM_LOG)?;
        let positions = log
            .range((rid, start)..=(rid, u64::MAX))?
            .map(|r| r.map(|(k, v)| (k.1, v)));
        let mut items = Vec::new();
        let mut next_cursor = None;
        for (scanned, item) in positions.enumerate() {
            let (pos, id) = item?;
            if items.len() >= limit || scanned >= scan_max {
                next_cursor = Some(pos.to_string());
                break;
            }
            let Some(g) = events.get(id)? else { continue };
            let rec: EventRecord = decode_event(&g)?;
            let keep = filter.key.as_ref().is_none_or(|k| *k == rec.key)
                && filter
                    .event_type
                    .as_ref()
                    .is_none_or(|t| *t == rec.event_type)
                && filter
                    .publisher
                    .as_ref()
                    .is_none_or(|p| *p == rec.publisher)
                && filter.since.is_none_or(|s| rec.received_at >= s)
                && filter.until.is_none_or(|u| rec.received_at < u);
            if keep {
                if let Some(item) = map(pos, event_from(id, rec))? {
                    items.push(item);
                }
            }
        }
        Ok(Page { items, next_cursor })
    }
}
