//! The retention sweep: expired idempotency records and remembered responses, the contents of
//! deleted Rooms, events past their Room's age or byte bound (unless a subscriber is still owed
//! them), expired dead letters and the queues of deleted subscriptions. A run removes at most its
//! budget of records, so that one sweep is one bounded write.

use super::events::{decode_event, EventRecord, ResponseRecord};
use super::queue::DeadRecord;
use super::rooms::RoomRecord;
use super::Tables;
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::model::SweepReport;
use crate::storage::codec::decode;

impl<'t> Tables<'t> {
    pub(super) fn sweep(&mut self, now: Timestamp, delete_max: usize) -> Result<SweepReport> {
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
        // 4. The counts' shares of nodes no longer alive (a shared store).
        if budget > 0 {
            budget -= self.fold_shares(now, budget)?.min(budget);
        }
        // 5. Expired dead letters and the queues of deleted subscriptions.
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
            self.meta
                .remove(format!("retention_cursor/{rid}").as_str())?;
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
        // Each sweep goes on from where the last one stopped, so that events still owed at the
        // front of the log (which stay) cannot hide removable ones behind them from every sweep
        // (issue 15, defect 6). The cursor goes back to the front once a sweep reaches events
        // within the bounds (the log is in acceptance order) or the end of the log, so that
        // events no longer owed are looked at again.
        let cursor_key = format!("retention_cursor/{}", room.id);
        let from = self.meta.get(cursor_key.as_str())?.unwrap_or(0);
        let log: Vec<(u64, u128)> = self
            .room_log
            .range((room.id, from)..=(room.id, u64::MAX))?
            .take(scan_max)
            .map(|r| r.map(|(k, v)| (k.1, v)))
            .collect::<std::result::Result<_, _>>()?;
        let mut next_from = match log.last() {
            Some((offset, _)) if log.len() == scan_max => offset + 1,
            _ => 0,
        };
        let (mut removed, mut kept) = (0u64, 0u64);
        for (offset, id) in log {
            if removed as usize >= budget {
                next_from = offset;
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
                next_from = 0;
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
        if next_from == 0 {
            self.meta.remove(cursor_key.as_str())?;
        } else {
            self.meta.insert(cursor_key.as_str(), next_from)?;
        }
        Ok((removed, kept))
    }

    /// Whether any subscription still owes this event (pending, in flight or dead-lettered).
    pub(super) fn is_owed(&mut self, room_id: u64, offset: u64) -> Result<bool> {
        let subs: Vec<u128> = self
            .room_subs
            .range((room_id, 0u128)..=(room_id, u128::MAX))?
            .map(|r| r.map(|(k, _)| k.1))
            .collect::<std::result::Result<_, _>>()?;
        for s in subs {
            if self.deliveries.get((s, offset))?.is_some()
                || self.dead_letters.get((s, offset))?.is_some()
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Removes the attempt log of an event that retention removed.
    pub(super) fn forget_attempts(&mut self, room_id: u64, offset: u64) -> Result<()> {
        let subs: Vec<u128> = self
            .room_subs
            .range((room_id, 0u128)..=(room_id, u128::MAX))?
            .map(|r| r.map(|(k, _)| k.1))
            .collect::<std::result::Result<_, _>>()?;
        for s in subs {
            let keys: Vec<u32> = self
                .attempts
                .range((s, offset, 0)..=(s, offset, u32::MAX))?
                .map(|r| r.map(|(k, _)| k.2))
                .collect::<std::result::Result<_, _>>()?;
            for a in keys {
                self.attempts.remove((s, offset, a))?;
            }
        }
        Ok(())
    }

    /// Dead letters older than the retention, and the queues of deleted subscriptions, up to
    /// `budget` records. Returns (dead letters expired, deleted-subscription records removed).
    pub(super) fn sweep_delivery(
        &mut self,
        now: Timestamp,
        mut budget: usize,
    ) -> Result<(u64, u64)> {
        let mut expired = 0u64;
        let keep_ms = self.defaults.dead_letter_retention_ms;
        let subs: Vec<u128> = self
            .sub_stats
            .iter()?
            .map(|r| r.map(|(k, _)| k))
            .collect::<std::result::Result<_, _>>()?;
        for s in subs {
            if budget == 0 {
                break;
            }
            let (_, dead) = self.sub_stats(s)?;
            if dead == 0 {
                continue;
            }
            // Dead letters are kept in log order, not in the order they died: each sweep goes on
            // from where the last one stopped, so that recent ones at the front cannot hide
            // expired ones behind them from every sweep (issue 15, defect 6).
            let cursor_key = format!("dead_cursor/{s:032x}");
            let from = self.meta.get(cursor_key.as_str())?.unwrap_or(0);
            let window: Vec<(u64, Timestamp)> = self
                .dead_letters
                .range((s, from)..=(s, u64::MAX))?
                .take(budget)
                .map(|r| r.and_then(|(k, v)| Ok((k.1, DeadRecord::decode(&v)?.dead_at))))
                .collect::<Result<_>>()?;
            match window.last() {
                Some((offset, _)) if window.len() == budget => {
                    self.meta.insert(cursor_key.as_str(), offset + 1)?
                }
                _ => self.meta.remove(cursor_key.as_str()).map(|_| ())?,
            }
            let old: Vec<u64> = window
                .into_iter()
                .filter(|(_, at)| now.ms_since(*at) > keep_ms)
                .map(|(o, _)| o)
                .collect();
            for o in &old {
                self.dead_letters.remove((s, *o))?;
            }
            self.bump_sub_stats(s, 0, -(old.len() as i64))?;
            expired += old.len() as u64;
            budget -= old.len().min(budget);
        }
        let mut purged = 0u64;
        let deleted: Vec<u128> = self
            .deleted_subs
            .iter()?
            .map(|r| r.map(|(k, _)| k))
            .collect::<std::result::Result<_, _>>()?;
        for s in deleted {
            if budget == 0 {
                break;
            }
            let mut removed = 0usize;
            macro_rules! purge {
                ($table:expr, $range:expr) => {{
                    let keys: Vec<_> = $table
                        .range($range)?
                        .take(budget - removed)
                        .map(|r| r.map(|(k, _)| k))
                        .collect::<std::result::Result<_, _>>()?;
                    for k in keys {
                        $table.remove(k)?;
                        removed += 1;
                    }
                }};
            }
            purge!(self.deliveries, (s, 0)..=(s, u64::MAX));
            purge!(self.dead_letters, (s, 0)..=(s, u64::MAX));
            purge!(self.attempts, (s, 0, 0)..=(s, u64::MAX, u32::MAX));
            purge!(self.ready, (s, 0, 0)..=(s, u64::MAX, u64::MAX));
            purge!(self.key_queue, (s, "", 0)..(s + 1, "", 0));
            purge!(self.key_head, (s, "")..(s + 1, ""));
            purge!(self.key_versions, (s, "")..(s + 1, ""));
            if removed < budget {
                self.forget_sub_stats(s)?;
                self.forget_dispatch(s)?;
                self.deleted_subs.remove(s)?;
                self.meta.remove(format!("dead_cursor/{s:032x}").as_str())?;
            }
            purged += removed as u64;
            budget -= removed.min(budget);
        }
        Ok((expired, purged))
    }
}
