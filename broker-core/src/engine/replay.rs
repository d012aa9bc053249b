//! Replay and repair of a subscription's queue, on request: the steps of a seek (clear the queue
//! below a point, queue the Room's log again from a point, end the seek; and, at open, ending
//! seeks a crash interrupted), the redrive of dead letters and their purge.

use super::events::decode_event_header;
use super::queue::{DeadRecord, DeliveryRecord};
use super::spaces::SUBSCRIPTIONS;
use super::subs::SubRecord;
use super::Tables;
use crate::clock::Timestamp;
use crate::error::Result;
use crate::storage::codec::{decode, encode};
use crate::storage::txn::{Table, Txn};
use crate::storage::WriteOutput;

/// Up to `limit` offsets of one subscription's entries in `table`, from `from` up to `below`.
fn offsets_in(
    table: &Table<(u128, u64), Vec<u8>>,
    sub: u128,
    from: u64,
    below: u64,
    limit: usize,
) -> Result<Vec<u64>> {
    table
        .range((sub, from)..(sub, below))?
        .take(limit)
        .map(|r| r.map(|(k, _)| k.1))
        .collect::<std::result::Result<_, _>>()
}

/// A seek interrupted by a crash leaves its flag set; at open the flag is cleared so that the
/// subscription is not stalled for ever. The queue then holds what the seek had queued so far.
pub(super) fn clear_interrupted_seeks(txn: &Txn) -> Result<u64> {
    let table = txn.open_table(SUBSCRIPTIONS)?;
    let stuck: Vec<(u128, SubRecord)> = table
        .iter()?
        .map(|r| r.and_then(|(k, v)| Ok((k, decode::<SubRecord>(&v)?))))
        .filter(|r| r.as_ref().map(|(_, s)| s.seeking).unwrap_or(true))
        .collect::<Result<_>>()?;
    for (id, mut rec) in stuck.iter().map(|(i, r)| (*i, r.clone())) {
        rec.seeking = false;
        table.insert(id, encode(&rec)?.as_slice())?;
    }
    Ok(stuck.len() as u64)
}

/// The `META` key of the last queueing number given (see `DeliveryRecord::queueing`).
const QUEUEINGS: &str = "queueings";

impl<'t> Tables<'t> {
    /// Removes up to `limit` dead letters of a subscription.
    pub(super) fn purge_dead(&mut self, id: u128, limit: usize) -> Result<WriteOutput> {
        self.sub_record(id)?;
        let keys = offsets_in(&self.dead_letters, id, 0, u64::MAX, limit)?;
        for k in &keys {
            self.dead_letters.remove((id, *k))?;
        }
        self.bump_sub_stats(id, 0, -(keys.len() as i64))?;
        Ok(WriteOutput::Count {
            n: keys.len() as u64,
            more: keys.len() == limit,
        })
    }

    /// A step of a seek: marks the subscription as seeking and removes up to `limit` of its
    /// deliveries below `below`.
    pub(super) fn seek_clear(&mut self, id: u128, below: u64, limit: usize) -> Result<WriteOutput> {
        let mut rec = self.sub_record(id)?;
        if !rec.seeking {
            rec.seeking = true;
            self.store_sub(id, &rec)?;
        }
        let keys = offsets_in(&self.deliveries, id, 0, below, limit)?;
        for k in &keys {
            self.remove_delivery(id, *k)?;
        }
        self.bump_sub_stats(id, -(keys.len() as i64), 0)?;
        Ok(WriteOutput::Count {
            n: keys.len() as u64,
            more: keys.len() == limit,
        })
    }

    /// Ends a seek: the subscription hands out messages again.
    pub(super) fn seek_done(&mut self, id: u128) -> Result<WriteOutput> {
        let mut rec = self.sub_record(id)?;
        rec.seeking = false;
        self.store_sub(id, &rec)?;
        self.touched.insert(id);
        Ok(WriteOutput::Subscription(
            self.subscription_out(id, &rec)?,
            None,
        ))
    }

    pub(super) fn redrive(
        &mut self,
        now: Timestamp,
        sub_id: u128,
        offsets: Option<Vec<u64>>,
        limit: usize,
    ) -> Result<WriteOutput> {
        self.sub_record(sub_id)?;
        let chosen: Vec<u64> = match offsets {
            Some(o) => o.into_iter().take(limit).collect(),
            None => offsets_in(&self.dead_letters, sub_id, 0, u64::MAX, limit)?,
        };
        let mut n = 0u64;
        for offset in &chosen {
            let dead: Option<DeadRecord> = match self.dead_letters.get((sub_id, *offset))? {
                Some(g) => Some(DeadRecord::decode(&g)?),
                None => None,
            };
            let Some(dead) = dead else { continue };
            self.dead_letters.remove((sub_id, *offset))?;
            if self.deliveries.get((sub_id, *offset))?.is_some() {
                // Already queued again (by a seek): the dead letter is stale; keep the live one.
                self.bump_sub_stats(sub_id, 0, -1)?;
                continue;
            }
            // A fresh schedule: the attempts limit and the time to live count from now, while
            // attempt numbers carry on so that the log keeps every attempt apart.
            let rec = DeliveryRecord {
                attempts_base: dead.delivery.attempts,
                next_attempt_at: now,
                lease_until: None,
                schedule_from: now,
                ..dead.delivery
            };
            self.put_delivery(sub_id, *offset, &rec)?;
            self.bump_sub_stats(sub_id, 1, -1)?;
            n += 1;
        }
        self.touched.insert(sub_id);
        Ok(WriteOutput::Count {
            n,
            more: chosen.len() == limit,
        })
    }

    pub(super) fn seek_enqueue(
        &mut self,
        now: Timestamp,
        sub_id: u128,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<WriteOutput> {
        let sub = self.sub_record(sub_id)?;
        let entries: Vec<(u64, u128)> = self
            .room_log
            .range((sub.room_id, from)..(sub.room_id, to))?
            .take(limit)
            .map(|r| r.map(|(k, v)| (k.1, v)))
            .collect::<std::result::Result<_, _>>()?;
        // One number for the deliveries this step queues again, above every number given before
        // (a push still under way names the queueing it was handed out from).
        let queueing = self.meta.get(QUEUEINGS)?.unwrap_or(0) + 1;
        self.meta.insert(QUEUEINGS, queueing)?;
        let mut n = 0;
        for &(offset, id) in &entries {
            let Some(g) = self.events.get(id)? else {
                continue;
            };
            let ev = decode_event_header(&g)?;
            drop(g);
            if sub
                .event_types
                .as_ref()
                .is_some_and(|t| !t.contains(&ev.event_type))
            {
                continue;
            }
            if self.deliveries.get((sub_id, offset))?.is_some() {
                continue;
            }
            // A dead letter of the same event is replaced by the new delivery, so that one event
            // is never both owed and dead.
            if self.dead_letters.remove((sub_id, offset))?.is_some() {
                self.bump_sub_stats(sub_id, 0, -1)?;
            }
            let last = self.last_attempt_no(sub_id, offset)?;
            let rec = DeliveryRecord {
                event_id: id,
                event_type: ev.event_type,
                key: ev.key,
                sequence: ev.sequence,
                published_at: ev.received_at,
                schedule_from: now,
                attempts: last,
                attempts_base: last,
                next_attempt_at: now,
                lease_until: None,
                last_error: None,
                queueing,
                lease_epoch: 0,
            };
            self.put_delivery(sub_id, offset, &rec)?;
            n += 1;
        }
        self.bump_sub_stats(sub_id, n as i64, 0)?;
        self.touched.insert(sub_id);
        let next = entries.last().map(|(o, _)| o + 1);
        Ok(WriteOutput::Seeked {
            n,
            next: if entries.len() == limit { next } else { None },
        })
    }
}
