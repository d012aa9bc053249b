//! Pulling: leases handed out from the front of the ready index (an expired lease noticed on
//! the way is a failed attempt, retried or dead-lettered per the policy), and their settling
//! (ack, nack, extend, terminate). Split from `queue.rs`, which keeps the records, outcomes and
//! the failure path both share.

use uuid::Uuid;

use super::queue::{ack_id, AttemptRecord, DeliveryRecord, Failure};
use super::subs::StoredMode;
use super::Tables;
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::ids::EventId;
use crate::storage::codec::decode;
use crate::storage::{AckAction, LeaseGrant, LeaseRef, WriteOutput};
use crate::subscription::{AttemptOutcome, SubscriptionStatus};

impl<'t> Tables<'t> {
    pub(super) fn lease(
        &mut self,
        now: Timestamp,
        sub_id: u128,
        max: usize,
        lease_ms: u64,
    ) -> Result<WriteOutput> {
        let sub = self.sub_record(sub_id)?;
        if !matches!(sub.mode, StoredMode::Pull) {
            return Err(Error::invalid(
                "subscription",
                "pull is only for pull subscriptions",
            ));
        }
        if sub.status != SubscriptionStatus::Active || sub.seeking {
            // Resuming or finishing a seek is a write, which wakes waiting pullers.
            return Ok(WriteOutput::Leased {
                grants: Vec::new(),
                next_due: None,
            });
        }
        let mut grants = Vec::new();
        // What may go out comes from the front of the index (with ordering, keys' heads only,
        // each held while an older lease of its key is out), so nothing blocked is walked past
        // (issue 15, defect 6). Each pass moves every entry it takes out of the due range (leased
        // until later, rescheduled, dead-lettered) or leases it; a few passes take what an
        // expired lease's reschedule makes due again at once.
        // One walk over what is due now (a view as of its start: each record is read again
        // before use). An expired lease handled here is leased again at once if it is due; a
        // key is looked at once per pull, so a head dead-lettered by its expiry does not let
        // the key's next event out in the same pull (as a pull that saw the queue before).
        let due: Vec<u64> = {
            let mut v = Vec::new();
            for entry in self
                .ready
                .range((sub_id, 0, 0)..=(sub_id, now.0, u64::MAX))?
            {
                let ((_, _, offset), ()) = entry?;
                v.push(offset);
                if v.len() >= max.saturating_mul(4).max(64) {
                    break;
                }
            }
            v
        };
        let mut keys_seen = std::collections::HashSet::new();
        {
            for offset in due {
                // Once the pull is served, the rest of the walk only notices leases that ran
                // out, so that they are counted and rescheduled when a pull passes them, not
                // only when one is short of work.
                let full = grants.len() >= max;
                let Some(g) = self.deliveries.get((sub_id, offset))? else {
                    continue;
                };
                let mut rec = DeliveryRecord::decode(&g)?;
                if full && rec.lease_until.is_none_or(|until| until > now) {
                    continue;
                }
                if sub.ordered && !keys_seen.insert(rec.key.clone()) {
                    continue;
                }
                if let Some(until) = rec.lease_until {
                    if until > now {
                        continue;
                    }
                    // The lease ran out: that attempt failed, after as long as the lease was
                    // held (its row says when it was leased; this row replaces it).
                    let leased_at = match self.attempts.get((sub_id, offset, rec.attempts))? {
                        Some(g) => decode::<AttemptRecord>(&g)?.at,
                        None => until,
                    };
                    self.log_attempt(
                        sub_id,
                        offset,
                        rec.attempts,
                        &AttemptRecord {
                            event_id: rec.event_id,
                            outcome: AttemptOutcome::LeaseExpired,
                            status: None,
                            error: Some("lease expired".into()),
                            latency_ms: until.ms_since(leased_at),
                            at: now,
                        },
                        rec.published_at,
                    )?;
                    let snapshot = rec.clone();
                    // The attempt failed at the deadline, however late a pull notices: the
                    // backoff counts from there, so the schedule does not depend on when pullers
                    // call.
                    self.fail(
                        until,
                        &sub,
                        sub_id,
                        offset,
                        snapshot,
                        Failure::new(None, "lease expired"),
                    )?;
                    // Re-read: it may now be scheduled later or dead-lettered.
                    match self.deliveries.get((sub_id, offset))? {
                        Some(g) => rec = DeliveryRecord::decode(&g)?,
                        None => continue,
                    }
                }
                if full || rec.next_attempt_at > now {
                    continue;
                }
                // With ordering, an expired lease's reschedule may have left the key held.
                if sub.ordered
                    && self
                        .key_head
                        .get((sub_id, rec.key.as_str()))?
                        .is_some_and(|(due, head, _, _)| head != offset || due > now.0)
                {
                    continue;
                }
                // Only while some head moved by a settle that a crash could still undo.
                if sub.ordered && !(self.heads_moved.is_empty() && self.unsynced_heads.is_empty()) {
                    let mark = super::head_mark(sub_id, rec.key.as_str());
                    if self.heads_moved.contains(&mark) || self.unsynced_heads.contains(&mark) {
                        self.needs_durable = true;
                    }
                }
                rec.attempts += 1;
                let until = now.plus_ms(lease_ms);
                rec.lease_until = Some(until);
                rec.lease_epoch = self.epoch;
                self.put_delivery(sub_id, offset, &rec)?;
                self.log_attempt(
                    sub_id,
                    offset,
                    rec.attempts,
                    &AttemptRecord {
                        event_id: rec.event_id,
                        outcome: AttemptOutcome::Leased,
                        status: None,
                        error: None,
                        latency_ms: 0,
                        at: now,
                    },
                    rec.published_at,
                )?;
                grants.push(LeaseGrant {
                    offset,
                    attempt: rec.attempts,
                    epoch: self.epoch,
                    lease_until: until,
                    event_id: EventId(Uuid::from_u128(rec.event_id)),
                });
            }
        }
        // The earliest later time at which something falls due by time alone (a lease or a
        // retry delay runs out), so that a long-poll knows when to look again.
        let (_, next_due) = self.ready_at(sub_id, now, 0, &|_| false)?;
        Ok(WriteOutput::Leased { grants, next_due })
    }

    pub(super) fn settle(
        &mut self,
        now: Timestamp,
        sub_id: u128,
        refs: Vec<LeaseRef>,
        action: AckAction,
    ) -> Result<WriteOutput> {
        let sub = self.sub_record(sub_id)?;
        let mut results = Vec::with_capacity(refs.len());
        for LeaseRef {
            offset,
            attempt,
            epoch,
        } in refs
        {
            let rec: Option<DeliveryRecord> = match self.deliveries.get((sub_id, offset))? {
                Some(g) => Some(DeliveryRecord::decode(&g)?),
                None => None,
            };
            // Only the current lease may be settled; a stale ack id means the message was
            // redelivered (or already settled) and the caller must not assume its action held.
            // The epoch tells apart a lease a crash undid from the one granted after it under
            // the same attempt number.
            let Some(mut rec) = rec.filter(|r| {
                r.attempts == attempt
                    && r.lease_until.is_some_and(|u| u > now)
                    && epoch.is_none_or(|e| e == r.lease_epoch)
            }) else {
                results.push(Err(Error::LeaseNotHeld {
                    ack_id: ack_id(offset, attempt, epoch.unwrap_or(0)),
                }));
                continue;
            };
            let outcome = match action {
                AckAction::Ack => {
                    self.complete(sub_id, offset)?;
                    AttemptOutcome::Acked
                }
                AckAction::Nack { delay_ms } => {
                    match delay_ms {
                        Some(d) => {
                            rec.lease_until = None;
                            rec.next_attempt_at = now.plus_ms(d);
                            rec.last_error = Some("nacked".into());
                            let policy = sub.retry.apply(
                                &self
                                    .room_retry(sub.room_id, &sub.room)?
                                    .apply(&self.defaults.retry),
                            );
                            if rec.attempts.saturating_sub(rec.attempts_base) >= policy.attempts_max
                            {
                                self.dead_letter(
                                    now,
                                    sub_id,
                                    offset,
                                    rec.clone(),
                                    "attempts_exhausted",
                                )?;
                            } else {
                                self.put_delivery(sub_id, offset, &rec)?;
                                self.touched.insert(sub_id);
                            }
                        }
                        None => self.fail(
                            now,
                            &sub,
                            sub_id,
                            offset,
                            rec.clone(),
                            Failure::new(None, "nacked"),
                        )?,
                    }
                    AttemptOutcome::Nacked
                }
                AckAction::Extend { lease_ms } => {
                    rec.lease_until = Some(now.plus_ms(lease_ms));
                    self.put_delivery(sub_id, offset, &rec)?;
                    results.push(Ok(()));
                    continue;
                }
                AckAction::Term => {
                    self.dead_letter(now, sub_id, offset, rec.clone(), "terminated")?;
                    AttemptOutcome::Terminated
                }
            };
            self.log_attempt(
                sub_id,
                offset,
                attempt,
                &AttemptRecord {
                    event_id: rec.event_id,
                    outcome,
                    status: None,
                    error: None,
                    latency_ms: 0,
                    at: now,
                },
                rec.published_at,
            )?;
            results.push(Ok(()));
        }
        Ok(WriteOutput::Settled(results))
    }
}
