//! The read side of the delivery queues, each read over its own snapshot: due work for the
//! dispatchers, dead letters, the attempt log, blocked keys, queue health, one delivery's state,
//! an event's deliveries, the offsets a seek starts from, and the count of every delivery owed.

use std::collections::HashSet;

use uuid::Uuid;

use super::events::decode_event_header;
use super::queue::{AttemptRecord, DeadRecord, DeliveryRecord};
use super::spaces::{
    ATTEMPTS, DEAD_LETTERS, DELIVERIES, EVENTS, READY, ROOM_LOG, ROOM_STATS, ROOM_SUBS,
};
use super::Engine;
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::ids::{EventId, RoomName, Sequence, SubscriptionId};
use crate::storage::codec::decode;
use crate::storage::txn::Txn;
use crate::storage::{Busy, DueDelivery};
use crate::subscription::{
    Attempt, AttemptOutcome, BlockedKey, DeadLetter, DeliveryState, EventDelivery,
};

/// Read side.
impl Engine {
    pub(super) fn due_read(
        &self,
        id: SubscriptionId,
        now: Timestamp,
        busy: &Busy,
        limit: usize,
    ) -> Result<(Vec<DueDelivery>, Option<Timestamp>)> {
        let txn = self.begin_read()?;
        let sub_id = id.0.as_u128();
        let sub = self.read_sub(&txn, sub_id)?;
        if sub.seeking {
            return Ok((Vec::new(), None));
        }
        let table = txn.open_table(DELIVERIES)?;
        // With ordering, a key with a push under way is blocked, not only when that push is of
        // its head: a redrive can put an older event in front of one already out, and a push
        // holds its key until it ends even when its delivery was stopped or seeked past.
        // What may go out comes from the front of the index by due time (with ordering, only
        // keys' heads are in it), so nothing blocked is walked past (issue 15, defect 6): a
        // pass skips at most the busy deliveries and the heads of busy keys.
        let ready = txn.open_table(READY)?;
        let mut due = Vec::new();
        for entry in ready.range((sub_id, 0, 0)..=(sub_id, now.0, u64::MAX))? {
            if due.len() >= limit {
                break;
            }
            let ((_, _, offset), ()) = entry?;
            if busy.contains(offset) {
                continue;
            }
            let Some(v) = table.get((sub_id, offset))? else {
                continue;
            };
            let rec = DeliveryRecord::decode(&v)?;
            if sub.ordered && busy.holds_key(&rec.key) {
                continue;
            }
            due.push(DueDelivery {
                offset,
                event_id: EventId(Uuid::from_u128(rec.event_id)),
                key: rec.key,
                attempt: rec.attempts + 1,
                published_at: rec.published_at,
                queueing: rec.queueing,
            });
        }
        let next = match now.0.checked_add(1) {
            Some(after) => ready
                .first((sub_id, after, 0)..=(sub_id, u64::MAX, u64::MAX))?
                .map(|((_, at, _), ())| Timestamp(at)),
            None => None,
        };
        Ok((due, next))
    }

    pub(super) fn dead_letters_read(
        &self,
        id: SubscriptionId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<(u64, DeadLetter)>, bool)> {
        let txn = self.begin_read()?;
        let sub_id = id.0.as_u128();
        self.read_sub(&txn, sub_id)?;
        let Some(start) = after.map_or(Some(0), |a| a.checked_add(1)) else {
            return Ok((Vec::new(), false));
        };
        let mut out = Vec::new();
        let mut more = false;
        for item in txn
            .open_table(DEAD_LETTERS)?
            .range((sub_id, start)..=(sub_id, u64::MAX))?
        {
            if out.len() >= limit {
                more = true;
                break;
            }
            let (k, v) = item?;
            let d = DeadRecord::decode(&v)?;
            out.push((
                k.1,
                DeadLetter {
                    event_id: EventId(Uuid::from_u128(d.delivery.event_id)),
                    key: d.delivery.key,
                    sequence: Sequence(d.delivery.sequence),
                    attempts: d.delivery.attempts,
                    reason: d.reason,
                    last_error: d.delivery.last_error,
                    dead_at: d.dead_at,
                },
            ));
        }
        Ok((out, more))
    }

    pub(super) fn attempts_read(
        &self,
        id: SubscriptionId,
        after: Option<(u64, u32)>,
        limit: usize,
    ) -> Result<crate::storage::AttemptPage> {
        let txn = self.begin_read()?;
        let sub_id = id.0.as_u128();
        self.read_sub(&txn, sub_id)?;
        let table = txn.open_table(ATTEMPTS)?;
        let mut out = Vec::new();
        let mut more = false;
        let start = after.map_or((sub_id, 0, 0), |(o, a)| (sub_id, o, a.saturating_add(1)));
        for item in table.range(start..=(sub_id, u64::MAX, u32::MAX))? {
            if out.len() >= limit {
                more = true;
                break;
            }
            let (k, v) = item?;
            let (_, offset, attempt) = k;
            let a: AttemptRecord = decode(&v)?;
            out.push((
                (offset, attempt),
                Attempt {
                    event_id: EventId(Uuid::from_u128(a.event_id)),
                    attempt,
                    at: a.at,
                    outcome: a.outcome,
                    status: a.status,
                    error: a.error,
                    latency_ms: a.latency_ms,
                },
            ));
        }
        Ok((out, more))
    }

    pub(super) fn blocked_keys_read(
        &self,
        id: SubscriptionId,
        now: Timestamp,
        limit: usize,
        scan_max: usize,
    ) -> Result<Vec<BlockedKey>> {
        let txn = self.begin_read()?;
        let sub_id = id.0.as_u128();
        let sub = self.read_sub(&txn, sub_id)?;
        if sub.ordered {
            return self.blocked_heads(&txn, sub_id, now, limit, scan_max);
        }
        let mut heads = HashSet::new();
        let mut out = Vec::new();
        for item in txn
            .open_table(DELIVERIES)?
            .range((sub_id, 0)..=(sub_id, u64::MAX))?
            .take(scan_max)
        {
            if out.len() >= limit {
                break;
            }
            let (_, v) = item?;
            let rec = DeliveryRecord::decode(&v)?;
            if !heads.insert(rec.key.clone()) {
                continue;
            }
            out.extend(blocked_by(rec, now));
        }
        Ok(out)
    }

    /// An ordered subscription's blocked keys, from its index of key heads (one entry per key
    /// with deliveries), so that a key with any number of events queued behind its head hides
    /// no other key: at most `scan_max` keys are looked at, not `scan_max` deliveries.
    fn blocked_heads(
        &self,
        txn: &Txn,
        sub_id: u128,
        now: Timestamp,
        limit: usize,
        scan_max: usize,
    ) -> Result<Vec<BlockedKey>> {
        let heads = txn.open_table(super::spaces::KEY_HEAD)?;
        let deliveries = txn.open_table(DELIVERIES)?;
        let mut out = Vec::new();
        let end = (sub_id.saturating_add(1), String::new());
        for item in heads.range((sub_id, String::new())..end)?.take(scan_max) {
            if out.len() >= limit {
                break;
            }
            let (_, (_, offset, _, _)) = item?;
            let Some(g) = deliveries.get((sub_id, offset))? else {
                continue;
            };
            let rec = DeliveryRecord::decode(&g)?;
            out.extend(blocked_by(rec, now));
        }
        Ok(out)
    }

    /// Walks the start of a subscription's queue (in log order, so the first delivery is the
    /// oldest): leases held now, keys whose head has failed, and the oldest event's age.
    pub(super) fn queue_health_read(
        &self,
        id: SubscriptionId,
        now: Timestamp,
        scan_max: usize,
    ) -> Result<crate::storage::QueueHealth> {
        let txn = self.begin_read()?;
        let sub_id = id.0.as_u128();
        let sub = self.read_sub(&txn, sub_id)?;
        let mut heads = HashSet::new();
        let mut health = crate::storage::QueueHealth {
            complete: true,
            ..Default::default()
        };
        if sub.ordered {
            // From the index of key heads, as in `blocked_heads`; one more than the window
            // tells whether it saw every key.
            let blocked = self.blocked_heads(&txn, sub_id, now, scan_max + 1, scan_max + 1)?;
            health.blocked_keys = blocked.len().min(scan_max) as u64;
            let keys = txn
                .open_table(super::spaces::KEY_HEAD)?
                .range((sub_id, String::new())..(sub_id.saturating_add(1), String::new()))?
                .take(scan_max + 1)
                .count();
            health.complete = keys <= scan_max;
        }
        let deliveries = txn.open_table(DELIVERIES)?;
        for (n, item) in deliveries
            .range((sub_id, 0)..=(sub_id, u64::MAX))?
            .enumerate()
        {
            if n >= scan_max {
                health.complete = false;
                break;
            }
            let (_, v) = item?;
            let rec = DeliveryRecord::decode(&v)?;
            if health.oldest_published_at.is_none() {
                health.oldest_published_at = Some(rec.published_at);
            }
            if rec.lease_until.is_some_and(|u| u > now) {
                health.in_flight += 1;
            }
            // As in `blocked_keys_read`: a head that has failed holds its key back.
            if !sub.ordered
                && heads.insert(rec.key.clone())
                && rec.attempts > 0
                && rec.last_error.is_some()
            {
                health.blocked_keys += 1;
            }
        }
        Ok(health)
    }

    pub(super) fn queued_read(
        &self,
        sub: u128,
        offset: u64,
        event: EventId,
        now: Timestamp,
    ) -> Result<Option<(u32, bool)>> {
        let txn = self.begin_read()?;
        let deliveries = txn.open_table(DELIVERIES)?;
        let Some(g) = deliveries.get((sub, offset))? else {
            return Ok(None);
        };
        let r = DeliveryRecord::decode(&g)?;
        // An offset of an earlier incarnation of the Room names another event.
        if r.event_id != event.0.as_u128() {
            return Ok(None);
        }
        Ok(Some((r.attempts, r.lease_until.is_some_and(|u| u > now))))
    }

    pub(super) fn event_deliveries_read(
        &self,
        room_id: u64,
        offset: u64,
        now: Timestamp,
    ) -> Result<Vec<EventDelivery>> {
        self.event_deliveries_in(&self.begin_read()?, room_id, offset, now)
    }

    /// [`Engine::event_deliveries_read`] within a read already open.
    pub(super) fn event_deliveries_in(
        &self,
        txn: &Txn,
        room_id: u64,
        offset: u64,
        now: Timestamp,
    ) -> Result<Vec<EventDelivery>> {
        let subs: Vec<u128> = txn
            .open_table(ROOM_SUBS)?
            .range((room_id, 0u128)..=(room_id, u128::MAX))?
            .map(|r| r.map(|(k, _)| k.1))
            .collect::<std::result::Result<_, _>>()?;
        let deliveries = txn.open_table(DELIVERIES)?;
        let dead = txn.open_table(DEAD_LETTERS)?;
        let attempts = txn.open_table(ATTEMPTS)?;
        let mut out = Vec::new();
        for s in subs {
            let id = SubscriptionId(Uuid::from_u128(s));
            if let Some(g) = deliveries.get((s, offset))? {
                let r = DeliveryRecord::decode(&g)?;
                let leased = r.lease_until.is_some_and(|u| u > now);
                out.push(EventDelivery {
                    subscription: id,
                    state: if leased {
                        DeliveryState::InFlight
                    } else {
                        DeliveryState::Pending
                    },
                    attempts: r.attempts,
                    next_attempt_at: (!leased).then_some(r.next_attempt_at),
                    last_error: r.last_error,
                });
            } else if let Some(g) = dead.get((s, offset))? {
                let d = DeadRecord::decode(&g)?;
                out.push(EventDelivery {
                    subscription: id,
                    state: DeliveryState::DeadLettered,
                    attempts: d.delivery.attempts,
                    next_attempt_at: None,
                    last_error: d.delivery.last_error,
                });
            } else {
                let mut last = None;
                for item in attempts.range((s, offset, 0)..=(s, offset, u32::MAX))? {
                    let (k, v) = item?;
                    last = Some((k.2, decode::<AttemptRecord>(&v)?));
                }
                if let Some((n, a)) = last {
                    if matches!(a.outcome, AttemptOutcome::Delivered | AttemptOutcome::Acked) {
                        out.push(EventDelivery {
                            subscription: id,
                            state: DeliveryState::Delivered,
                            attempts: n,
                            next_attempt_at: None,
                            last_error: None,
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    /// The first log offset of a Room whose event was received at or after `t` (offsets and
    /// receive times rise together, so this is a binary search), and the Room's next offset.
    pub(super) fn offsets_for_seek(
        &self,
        room: &RoomName,
        t: Option<Timestamp>,
    ) -> Result<(u64, u64)> {
        let room_id = self.room_id_of(room)?;
        let txn = self.begin_read()?;
        let log = txn.open_table(ROOM_LOG)?;
        let events = txn.open_table(EVENTS)?;
        let stats = txn.open_table(ROOM_STATS)?;
        let end = stats.get(room_id)?.map(|g| g.0).unwrap_or(0);
        let first_at = |from: u64| -> Result<Option<(u64, Timestamp)>> {
            let Some(item) = log.range((room_id, from)..(room_id, end))?.next() else {
                return Ok(None);
            };
            let (k, v) = item?;
            let at = match events.get(v)? {
                Some(g) => decode_event_header(&g)?.received_at,
                None => Timestamp(0),
            };
            Ok(Some((k.1, at)))
        };
        let Some(t) = t else {
            return Ok((first_at(0)?.map_or(end, |(o, _)| o), end));
        };
        // Search on positions: the answer is the smallest position p such that the first entry
        // at or after p (if any) was received at or after `t`. Holes in the log (events removed
        // by retention) are skipped by `first_at`, and every step shrinks [lo, hi).
        let (mut lo, mut hi) = (0u64, end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match first_at(mid)? {
                Some((o, at)) if at < t => lo = o + 1,
                _ => hi = mid,
            }
        }
        Ok((lo, end))
    }

    /// Every delivery still owed, counted one by one (tests compare it with the counters).
    pub(super) fn table_len_deliveries(&self) -> Result<u64> {
        let txn = self.begin_read()?;
        let mut n = 0u64;
        for item in txn.open_table(DELIVERIES)?.iter()? {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// The read of [`Storage::event_deliveries`](crate::storage::Storage::event_deliveries): where
    /// the event is in its Room's log, then its deliveries.
    pub(super) fn event_deliveries_by_id_read(
        &self,
        id: EventId,
        now: Timestamp,
    ) -> Result<Vec<crate::subscription::EventDelivery>> {
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
    }
}

/// The blocked key a key's head delivery makes, if it does: a head that has failed at least
/// once is what holds its key back.
fn blocked_by(rec: DeliveryRecord, now: Timestamp) -> Option<BlockedKey> {
    (rec.attempts > 0 && rec.last_error.is_some()).then(|| BlockedKey {
        key: rec.key,
        head_event_id: EventId(Uuid::from_u128(rec.event_id)),
        sequence: Sequence(rec.sequence),
        attempts: rec.attempts,
        last_error: rec.last_error,
        next_attempt_at: rec.next_attempt_at.max(now),
    })
}
