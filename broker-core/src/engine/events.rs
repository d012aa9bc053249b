//! Events and publishing: the event record and its encoding (the payload stored raw after the
//! header), publishing with its idempotency (and the API responses remembered for replay), the
//! per-key sequence counters with their in-memory cache (`SeqCache`) and checkpoints, and the
//! removal of one event. A published event fans out (`fanout.rs`) in the same transaction.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::spaces::{DELETED_ROOMS, EVENTS, ROOM_LOG, ROOM_STATS, SEQ_CHECKPOINT};
use super::{Engine, Tables};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::ids::{EventId, EventTypeName, OrderingKey, Principal, RoomName, Sequence};
use crate::model::{Event, Receipt, RoomStatus, StoredResponse};
use crate::storage::codec::{decode, decode_with_tail, encode, encode_with_tail};
use crate::storage::PreparedEvent;

/// Sequences are checkpointed into KEY_SEQ after this many events, bounding the log replay at
/// open to about this many records.
pub(super) const SEQ_CHECKPOINT_EVENTS: u64 = 50_000;
/// ... or when this many keys have sequences newer than their checkpoint, bounding memory.
pub(super) const SEQ_CACHE_KEYS_MAX: usize = 16_384;

/// The last sequence of every key that received events since the last checkpoint.
///
/// Why: writing each key's counter on every publish dirtied one more B-tree page per event at a
/// random position, and dirty pages are what a durable commit pays for; the benchmark showed it
/// costing about a fifth of publish throughput. The Room log already records every event's key and
/// sequence in the same transaction that assigns them, so the counters can be written back in bulk
/// and rebuilt from the log after the checkpoint whenever memory and disk may disagree: at open,
/// and after any failed commit.
#[derive(Default)]
pub(super) struct SeqCache {
    pub(super) last: HashMap<(u64, String), u64>,
    pub(super) events_since_checkpoint: u64,
    /// False after a failed rebuild: publishing is refused until a rebuild succeeds, because a
    /// sequence taken from a stale counter could repeat.
    pub(super) valid: bool,
    /// What each change of this batch replaced, so that one failed operation can be undone
    /// alone (see [`Txn::savepoint`](crate::storage::txn::Txn::savepoint)).
    pub(super) undo: Vec<((u64, String), Option<u64>)>,
    /// The acceptance time of each Room's newest event, as far as known: an event is never
    /// stamped earlier than the one before it in its Room, even when the wall clock steps back,
    /// so that a Room's log is in `received_at` order and a seek by time can search it
    /// (issue 15, defect 10). Only grows, so a value from an undone operation is harmless.
    pub(super) received: HashMap<u64, Timestamp>,
}

/// Where [`SeqCache::rollback`] returns to.
#[derive(Clone, Copy)]
pub(super) struct SeqSavepoint {
    undo: usize,
    events_since_checkpoint: u64,
}

impl SeqCache {
    fn set(&mut self, key: (u64, String), seq: u64) {
        let before = self.last.insert(key.clone(), seq);
        self.undo.push((key, before));
    }

    pub(super) fn forget_room(&mut self, room_id: u64) {
        self.received.remove(&room_id);
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

    pub(super) fn savepoint(&self) -> SeqSavepoint {
        SeqSavepoint {
            undo: self.undo.len(),
            events_since_checkpoint: self.events_since_checkpoint,
        }
    }

    pub(super) fn rollback(&mut self, sp: SeqSavepoint) {
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
pub(super) struct EventRecord {
    pub(super) room_id: u64,
    room: RoomName,
    pub(super) event_type: EventTypeName,
    version: u32,
    pub(super) key: OrderingKey,
    pub(super) sequence: u64,
    pub(super) offset: u64,
    pub(super) publisher: Principal,
    pub(super) received_at: Timestamp,
    idempotency_key: Option<String>,
    /// Stored raw after the encoded fields (see `encode_event`), not through serde.
    #[serde(skip)]
    pub(super) payload: Vec<u8>,
}

fn encode_event(rec: &EventRecord) -> Result<Vec<u8>> {
    encode_with_tail(rec, &rec.payload)
}

/// An event record without its payload (which stays unread): for scans that need metadata only.
pub(super) fn decode_event_header(bytes: &[u8]) -> Result<EventRecord> {
    decode_with_tail::<EventRecord>(bytes).map(|(rec, _)| rec)
}

pub(super) fn decode_event(bytes: &[u8]) -> Result<EventRecord> {
    let (mut rec, payload): (EventRecord, &[u8]) = decode_with_tail(bytes)?;
    rec.payload = payload.to_vec();
    Ok(rec)
}

#[derive(Serialize, Deserialize)]
pub(super) struct ResponseRecord {
    pub(super) request_hash: [u8; 32],
    pub(super) response: StoredResponse,
    pub(super) expires_at: Timestamp,
}

#[derive(Serialize, Deserialize)]
struct IdempotencyRecord {
    request_hash: [u8; 32],
    receipt: Receipt,
    expires_at: Timestamp,
}

pub(super) fn event_from(id: u128, r: EventRecord) -> Event {
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

/// What fan-out needs to know of a new event.
pub(super) struct DeliveryRecordInit<'a> {
    pub event_id: u128,
    /// When the event was accepted.
    pub received_at: Timestamp,
    pub event_type: &'a EventTypeName,
    pub key: &'a OrderingKey,
    pub sequence: u64,
}

impl<'t> Tables<'t> {
    /// The acceptance time of the Room's newest event (at log position `next - 1`), from memory
    /// or, the first time, from the log.
    fn received_floor(&mut self, room_id: u64, next: u64) -> Result<Timestamp> {
        // Another process may have published since: a shared store's log is the only truth.
        if let Some(&t) = self.seqs.received.get(&room_id).filter(|_| !self.shared) {
            return Ok(t);
        }
        let Some(prev) = next.checked_sub(1) else {
            return Ok(Timestamp(0));
        };
        let Some(id) = self.room_log.get((room_id, prev))? else {
            return Ok(Timestamp(0));
        };
        Ok(match self.events.get(id)? {
            Some(g) => decode_event_header(&g)?.received_at,
            None => Timestamp(0),
        })
    }

    pub(super) fn remember_response(
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

    pub(super) fn publish(&mut self, now: Timestamp, ev: PreparedEvent) -> Result<Receipt> {
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
        // With a shared store the key's row is always current (written with every publish, and
        // fenced: see `KvStore::shared`); otherwise the row is as of the Room's checkpoint and
        // memory holds what came since.
        let last = match self.seqs.last.get(&seq_key).filter(|_| !self.shared) {
            Some(&s) => s,
            None => self.key_seq.get((room.id, ev.key.as_str()))?.unwrap_or(0),
        };
        let seq = last + 1;
        let (offset, count, bytes) = self.stats(room.id)?;
        let received_at = self.received_floor(room.id, offset)?.max(now);
        self.seqs.received.insert(room.id, received_at);
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
            received_at,
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
            received_at,
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
                received_at,
                event_type: &rec.event_type,
                key: &rec.key,
                sequence: seq,
            },
        )?;
        // Last, so that a refused publish leaves the counters alone. A storage error after this
        // point fails the whole commit, and the writer then rebuilds the counters from disk.
        if self.shared {
            self.key_seq.insert((room.id, seq_key.1.as_str()), seq)?;
        } else {
            self.seqs.set(seq_key, seq);
            self.seqs.events_since_checkpoint += 1;
        }
        Ok(receipt)
    }

    /// Writes every counter newer than its checkpoint into KEY_SEQ and moves each Room's
    /// checkpoint to the end of its log, in the current transaction.
    pub(super) fn checkpoint_seqs(&mut self) -> Result<()> {
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
    pub(super) fn remove_event(&mut self, id: u128, rec: &EventRecord) -> Result<()> {
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
}

impl Engine {
    /// Reads every Room's log after its sequence checkpoint to recover the sequences that are
    /// committed but not yet checkpointed.
    pub(super) fn rebuild_seqs(&self) -> Result<SeqCache> {
        if self.shared {
            // Nothing is kept in memory: every key's row is current (see `KvStore::shared`).
            return Ok(SeqCache {
                valid: true,
                ..SeqCache::default()
            });
        }
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
}
