//! The index of what may go out next (issue 15, defect 6 and item 1): for each subscription, the
//! deliveries that may be handed out by when they fall due, so that finding ready work is a range
//! read from the front of the index and never walks past blocked work. Without ordering, every
//! delivery is in it; with ordering, only each key's head (its oldest delivery), so that ten
//! thousand events behind a failing head cost the other keys nothing.
//!
//! The rules, kept by [`Tables::put_delivery`] and [`Tables::remove_delivery`], which every write
//! of a delivery goes through:
//! - A delivery's due time is its lease's end while it is leased (when it runs out, the lease is
//!   handled as failed) and its next attempt's time otherwise.
//! - With ordering, a key's entry is its head, due at the later of the head's due time and the
//!   key's *hold*: when an older event is queued in front of a head that is leased (a redrive or a
//!   seek), the key stays held until that lease ends (or the delivery holding it is settled), so
//!   that two events of a key are never out at once. A hold in the past holds nothing.
//!
//! `KEY_HEAD` remembers each key's entry, so that moving it is two point writes.

use super::queue::DeliveryRecord;
use super::Tables;
use crate::clock::Timestamp;
use crate::error::Result;

/// The `META` key set once every subscription's index has been built.
pub(super) const READY_INDEX_MARK: &str = "ready_index";

/// A key's entry in `KEY_HEAD`: (due, head offset, held until, held by), where the hold is
/// (0, 0) when none is set.
type HeadEntry = (u64, u64, u64, u64);

/// The hold (until, by) after the lease of delivery `by_now` until `until_now` holds the key:
/// the holder's own lease, changed (extended or cut short), or a later one replaces it.
fn raise((until, by): (u64, u64), until_now: u64, by_now: u64) -> (u64, u64) {
    if by_now == by || until_now > until {
        (until_now, by_now)
    } else {
        (until, by)
    }
}

/// The hold after the lease of delivery `offset` ended (settled, removed, or given back): a
/// hold it set ends.
fn end_by((until, by): (u64, u64), offset: u64) -> (u64, u64) {
    if by == offset {
        (0, 0)
    } else {
        (until, by)
    }
}

/// When a delivery falls due, for the index.
pub(super) fn due_of(rec: &DeliveryRecord) -> Timestamp {
    rec.lease_until.unwrap_or(rec.next_attempt_at)
}

impl<'t> Tables<'t> {
    /// Whether a subscription is ordered (read once per batch).
    pub(super) fn is_ordered(&mut self, sub: u128) -> Result<bool> {
        if let Some(&o) = self.ordered_cache.get(&sub) {
            return Ok(o);
        }
        let o = self.sub_record(sub)?.ordered;
        self.ordered_cache.insert(sub, o);
        Ok(o)
    }

    /// Writes a delivery, new or changed, and keeps the index right.
    pub(super) fn put_delivery(
        &mut self,
        sub: u128,
        offset: u64,
        rec: &DeliveryRecord,
    ) -> Result<()> {
        let old = match self.deliveries.get((sub, offset))? {
            Some(g) => Some(DeliveryRecord::decode(&g)?),
            None => None,
        };
        self.deliveries
            .insert((sub, offset), rec.encode()?.as_slice())?;
        if !self.is_ordered(sub)? {
            if let Some(o) = &old {
                self.ready.remove((sub, due_of(o).0, offset))?;
            }
            self.ready.insert((sub, due_of(rec).0, offset), ())?;
            return Ok(());
        }
        let key = rec.key.as_str();
        let current = self.key_head.get((sub, key))?;
        if old.is_none() {
            self.key_queue.insert((sub, key, offset), ())?;
            self.touch_key(sub, key)?;
            return match current {
                // The key's first delivery is its head.
                None => self.place_head(sub, key, None, Some((offset, rec)), (0, 0)),
                // Queued behind the head: the key's entry does not change.
                Some((_, head, _, _)) if offset > head => Ok(()),
                // An older event queued in front of the head (a redrive, a seek): it becomes
                // the head, and if the displaced head is leased, the key is held until that
                // lease ends.
                Some((_, head, until, by)) => {
                    let mut hold = (until, by);
                    if let Some(g) = self.deliveries.get((sub, head))? {
                        if let Some(lease) = DeliveryRecord::decode(&g)?.lease_until {
                            hold = raise(hold, lease.0, head);
                        }
                    }
                    self.place_head(sub, key, current, Some((offset, rec)), hold)
                }
            };
        }
        match current {
            // The head changed: its lease is its due time, not a hold, and any hold it set
            // ends.
            Some((_, head, until, by)) if head == offset => {
                let hold = end_by((until, by), offset);
                self.place_head(sub, key, current, Some((offset, rec)), hold)
            }
            // A lease on a delivery that is not its key's head (displaced by an older event)
            // holds the key as long; without a lease, any hold it set ends.
            Some((_, _, until, by)) => {
                let hold = match rec.lease_until {
                    Some(lease) => raise((until, by), lease.0, offset),
                    None => end_by((until, by), offset),
                };
                if hold == (until, by) {
                    return Ok(());
                }
                self.refresh_head(sub, key, current, hold)
            }
            // No entry for a stored delivery's key (not expected): found again from the queue.
            None => {
                let hold = rec
                    .lease_until
                    .map_or((0, 0), |lease| raise((0, 0), lease.0, offset));
                self.refresh_head(sub, key, None, hold)
            }
        }
    }

    /// Removes a delivery (settled, dead-lettered, dropped by a seek) and keeps the index right;
    /// returns what it was.
    pub(super) fn remove_delivery(
        &mut self,
        sub: u128,
        offset: u64,
    ) -> Result<Option<DeliveryRecord>> {
        let Some(g) = self.deliveries.remove((sub, offset))? else {
            return Ok(None);
        };
        let old = DeliveryRecord::decode(&g)?;
        if !self.is_ordered(sub)? {
            self.ready.remove((sub, due_of(&old).0, offset))?;
            return Ok(Some(old));
        }
        let key = old.key.as_str();
        self.key_queue.remove((sub, key, offset))?;
        self.touch_key(sub, key)?;
        let current = self.key_head.get((sub, key))?;
        let hold = current.map_or((0, 0), |(_, _, until, by)| end_by((until, by), offset));
        if current.is_some_and(|(_, head, _, _)| head == offset) {
            self.heads_moved.insert(super::head_mark(sub, key));
        }
        match current {
            // Neither the head nor the holder left: the key's entry does not change.
            Some((_, head, until, by)) if head != offset && hold == (until, by) => {}
            _ => self.refresh_head(sub, key, current, hold)?,
        }
        Ok(Some(old))
    }

    /// Finds a key's head (its oldest queued delivery) and puts its entry where the head and
    /// `hold` say.
    fn refresh_head(
        &mut self,
        sub: u128,
        key: &str,
        current: Option<HeadEntry>,
        hold: (u64, u64),
    ) -> Result<()> {
        let head = self
            .key_queue
            .first((sub, key, 0)..=(sub, key, u64::MAX))?
            .map(|entry| entry.0 .2);
        let Some(offset) = head else {
            return self.place_head(sub, key, current, None, hold);
        };
        let g = self.deliveries.get((sub, offset))?.ok_or_else(|| {
            crate::error::Error::Storage(format!(
                "queue index names a delivery that is not stored ({offset})"
            ))
        })?;
        let rec = DeliveryRecord::decode(&g)?;
        self.place_head(sub, key, current, Some((offset, &rec)), hold)
    }

    /// Moves a key's entry from `current` to where its head (`None`: the key has none left)
    /// and its hold (until, by) put it.
    fn place_head(
        &mut self,
        sub: u128,
        key: &str,
        current: Option<HeadEntry>,
        head: Option<(u64, &DeliveryRecord)>,
        (until, by): (u64, u64),
    ) -> Result<()> {
        let want = head.map(|(offset, rec)| (due_of(rec).0.max(until), offset, until, by));
        if current == want {
            return Ok(());
        }
        self.touch_key(sub, key)?;
        if let Some((due, offset, _, _)) = current {
            self.ready.remove((sub, due, offset))?;
        }
        match want {
            Some((due, offset, until, by)) => {
                self.ready.insert((sub, due, offset), ())?;
                self.key_head.insert((sub, key), (due, offset, until, by))?;
            }
            None => {
                self.key_head.remove((sub, key))?;
            }
        }
        Ok(())
    }

    /// On a shared store, bumps the key's version (see `Space::KeyVersions`): this batch
    /// changed the key's queue or head, so any other node's batch that changed it since this
    /// one's snapshot fails this one's commit, and the other way round.
    fn touch_key(&mut self, sub: u128, key: &str) -> Result<()> {
        if !self.shared {
            return Ok(());
        }
        let v = self.key_versions.get((sub, key))?.unwrap_or(0);
        self.key_versions.insert((sub, key), v.wrapping_add(1))
    }

    /// Builds a subscription's index from its queue (after a layout without the index, or when
    /// the subscription's ordering changes).
    pub(super) fn rebuild_ready(&mut self, sub: u128) -> Result<()> {
        let stale: Vec<(u128, u64, u64)> = self
            .ready
            .range((sub, 0, 0)..=(sub, u64::MAX, u64::MAX))?
            .map(|r| r.map(|(k, ())| k))
            .collect::<Result<_>>()?;
        for k in stale {
            self.ready.remove(k)?;
        }
        let queued: Vec<(u128, String, u64)> = self
            .key_queue
            .range((sub, "", 0)..(sub + 1, "", 0))?
            .map(|r| r.map(|(k, ())| k))
            .collect::<Result<_>>()?;
        for k in queued {
            self.key_queue.remove(k)?;
        }
        let heads: Vec<(u128, String)> = self
            .key_head
            .range((sub, "")..(sub + 1, ""))?
            .map(|r| r.map(|(k, _)| k))
            .collect::<Result<_>>()?;
        for k in heads {
            self.key_head.remove(k)?;
        }
        self.ordered_cache.remove(&sub);
        let ordered = self.is_ordered(sub)?;
        let deliveries: Vec<(u64, DeliveryRecord)> = self
            .deliveries
            .range((sub, 0)..=(sub, u64::MAX))?
            .map(|r| r.and_then(|(k, v)| Ok((k.1, DeliveryRecord::decode(&v)?))))
            .collect::<Result<_>>()?;
        // Per key (with ordering): its head (the first in log order) with its due time, and the
        // hold of the latest lease among its other deliveries (until, holder), as
        // `put_delivery` would have left them: a leased delivery behind the head (an older
        // event queued in front of it) holds the key until its lease ends.
        let mut keys: std::collections::BTreeMap<String, (u64, u64, u64, u64)> =
            std::collections::BTreeMap::new();
        for (offset, rec) in deliveries {
            if !ordered {
                self.ready.insert((sub, due_of(&rec).0, offset), ())?;
                continue;
            }
            self.key_queue.insert((sub, rec.key.as_str(), offset), ())?;
            match keys.get_mut(rec.key.as_str()) {
                None => {
                    keys.insert(rec.key.as_str().to_string(), (due_of(&rec).0, offset, 0, 0));
                }
                Some(entry) => {
                    if let Some(until) = rec.lease_until {
                        if until.0 > entry.2 {
                            (entry.2, entry.3) = (until.0, offset);
                        }
                    }
                }
            }
        }
        for (key, (head_due, head, until, by)) in keys {
            let due = head_due.max(until);
            self.ready.insert((sub, due, head), ())?;
            self.key_head
                .insert((sub, key.as_str()), (due, head, until, by))?;
        }
        Ok(())
    }

    /// Builds the index of every subscription once, for a store written before it existed.
    pub(super) fn ensure_ready_index(&mut self) -> Result<()> {
        const MARK: &str = READY_INDEX_MARK;
        if self.meta.get(MARK)?.is_some() {
            return Ok(());
        }
        let subs: Vec<u128> = self
            .subscriptions
            .iter()?
            .map(|r| r.map(|(k, _)| k))
            .collect::<Result<_>>()?;
        for sub in subs {
            self.rebuild_ready(sub)?;
        }
        self.meta.insert(MARK, 1)?;
        Ok(())
    }

    /// The deliveries of a subscription due at `now`, from the front of the index, skipping
    /// `skip`, at most `limit`; and the earliest later due time in the index.
    pub(super) fn ready_at(
        &self,
        sub: u128,
        now: Timestamp,
        limit: usize,
        skip: &dyn Fn(u64) -> bool,
    ) -> Result<(Vec<u64>, Option<Timestamp>)> {
        let mut out = Vec::new();
        let due_now = match limit {
            0 => None,
            _ => Some(self.ready.range((sub, 0, 0)..=(sub, now.0, u64::MAX))?),
        };
        for entry in due_now.into_iter().flatten() {
            if out.len() >= limit {
                break;
            }
            let ((_, _, offset), ()) = entry?;
            if !skip(offset) {
                out.push(offset);
            }
        }
        let next = match now.0.checked_add(1) {
            Some(after) => self
                .ready
                .first((sub, after, 0)..=(sub, u64::MAX, u64::MAX))?
                .map(|((_, due, _), ())| Timestamp(due)),
            None => None,
        };
        Ok((out, next))
    }
}

#[cfg(test)]
impl<'t> Tables<'t> {
    /// Checks the index against the queues (tests): every delivery of an ordered subscription is
    /// in its key's queue, each key's head entry is its first delivery, and `READY` holds
    /// exactly the heads (ordered) or every delivery (unordered).
    pub(super) fn check_ready_index(&mut self) -> Result<()> {
        use std::collections::{BTreeMap, BTreeSet};
        let subs: Vec<u128> = self
            .subscriptions
            .iter()?
            .map(|r| r.map(|(k, _)| k))
            .collect::<Result<_>>()?;
        for sub in subs {
            let ordered = self.sub_record(sub)?.ordered;
            let mut want = BTreeSet::new();
            let mut first: BTreeMap<String, u64> = BTreeMap::new();
            // Per key: the head's due time and the latest lease behind it, from which the key's
            // entry must be due (as a rebuild computes it).
            let mut rebuilt: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            for item in self.deliveries.range((sub, 0)..=(sub, u64::MAX))? {
                let ((_, offset), v) = item?;
                let rec = DeliveryRecord::decode(&v)?;
                if !ordered {
                    want.insert((due_of(&rec).0, offset));
                } else {
                    match rebuilt.get_mut(rec.key.as_str()) {
                        None => {
                            rebuilt.insert(rec.key.to_string(), (due_of(&rec).0, 0));
                        }
                        Some(e) => e.1 = e.1.max(rec.lease_until.map_or(0, |t| t.0)),
                    }
                    first.entry(rec.key.to_string()).or_insert(offset);
                    if !self
                        .key_queue
                        .contains_key((sub, rec.key.as_str(), offset))?
                    {
                        return Err(crate::error::Error::Storage(format!(
                            "index: delivery {offset} of key {} is not in its key queue",
                            rec.key
                        )));
                    }
                }
            }
            for (key, offset) in &first {
                let head = self.key_head.get((sub, key.as_str()))?;
                if head.map(|h| h.1) != Some(*offset) {
                    return Err(crate::error::Error::Storage(format!(
                        "index: key {key} head is {head:?}, its first delivery {offset}"
                    )));
                }
                let h = head.unwrap_or_default();
                let (head_due, held) = rebuilt.get(key).copied().unwrap_or_default();
                if h.0 != head_due.max(held) {
                    return Err(crate::error::Error::Storage(format!(
                        "index: key {key} is due at {} in the index, at {} by its queue \
                         (head due {head_due}, held until {held})",
                        h.0,
                        head_due.max(held)
                    )));
                }
                want.insert((h.0, h.1));
            }
            let have: BTreeSet<(u64, u64)> = self
                .ready
                .range((sub, 0, 0)..=(sub, u64::MAX, u64::MAX))?
                .map(|r| r.map(|((_, d, o), ())| (d, o)))
                .collect::<Result<_>>()?;
            if have != want {
                return Err(crate::error::Error::Storage(format!(
                    "index: ready {have:?}, expected {want:?}"
                )));
            }
        }
        Ok(())
    }
}
