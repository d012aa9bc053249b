//! The delivery side of the engine: subscriptions, per-subscription delivery queues, leases, outcomes,
//! dead letters and the attempt log. Queues are keyed by (subscription, Room log offset), so
//! fan-out at publish time appends at the end of each subscription's range (one page per
//! subscription per commit, not one per event), and a key's deliveries come in sequence order
//! because the writer assigns offset and sequence together.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Engine, Tables};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::ids::{
    EventId, EventTypeName, OrderingKey, Principal, RoomName, Sequence, SubscriptionId,
};
use crate::retry::{self, Next};
use crate::storage::codec::{decode, encode};
use crate::storage::kv::Space;
use crate::storage::txn::{Def, Table, Txn};
use crate::storage::{
    AckAction, DeliveryDefaults, DeliveryOp, DueDelivery, LeaseGrant, WriteOutput,
};
use crate::subscription::{
    Attempt, AttemptOutcome, BlockedKey, DeadLetter, DeliveryMode, DeliveryState, EventDelivery,
    NewSubscription, PushEndpoint, RetryOverrides, Subscription, SubscriptionPatch,
    SubscriptionStatus,
};
use crate::webhook::PushResponse;

/// Subscription id -> SubRecord.
pub(super) const SUBSCRIPTIONS: Def<u128, Vec<u8>> = Def::new(Space::Subscriptions);
/// (Room id, subscription id) -> (): who to fan out to.
pub(super) const ROOM_SUBS: Def<(u64, u128), ()> = Def::new(Space::RoomSubs);
/// Subscription id -> (backlog, dead letters).
pub(super) const SUB_STATS: Def<u128, (u64, u64)> = Def::new(Space::SubStats);
/// (subscription id, Room log offset) -> DeliveryRecord: what is still owed.
pub(super) const DELIVERIES: Def<(u128, u64), Vec<u8>> = Def::new(Space::Deliveries);
/// (subscription id, Room log offset) -> DeadRecord.
pub(super) const DEAD_LETTERS: Def<(u128, u64), Vec<u8>> = Def::new(Space::DeadLetters);
/// (subscription id, Room log offset, attempt) -> AttemptRecord.
pub(super) const ATTEMPTS: Def<(u128, u64, u32), Vec<u8>> = Def::new(Space::Attempts);
/// Ids of deleted subscriptions whose queues the sweep has not finished purging.
pub(super) const DELETED_SUBS: Def<u128, ()> = Def::new(Space::DeletedSubs);

#[derive(Serialize, Deserialize, Clone)]
enum StoredMode {
    Push(PushEndpoint),
    Pull,
}

#[derive(Serialize, Deserialize, Clone)]
struct SecretRecord {
    secret: String,
    /// `None` for the current secret; a rotated-out secret stays valid until then.
    valid_until: Option<Timestamp>,
}

#[derive(Serialize, Deserialize, Clone)]
pub(super) struct SubRecord {
    room_id: u64,
    room: RoomName,
    subscriber: Principal,
    event_types: Option<Vec<EventTypeName>>,
    mode: StoredMode,
    ordered: bool,
    retry: RetryOverrides,
    in_flight_max: u32,
    queue_depth_max: u64,
    status: SubscriptionStatus,
    status_reason: Option<String>,
    secrets: Vec<SecretRecord>,
    /// True while a seek rebuilds the queue: nothing is handed out meanwhile, so that events
    /// published during the seek cannot overtake older ones of their key being queued again.
    seeking: bool,
    created_at: Timestamp,
    updated_at: Timestamp,
}

#[derive(Serialize, Deserialize, Clone)]
pub(super) struct DeliveryRecord {
    event_id: u128,
    event_type: EventTypeName,
    key: OrderingKey,
    sequence: u64,
    published_at: Timestamp,
    /// Attempts so far, counted over the delivery's whole life so that every attempt in the log
    /// has its own number.
    attempts: u32,
    /// `attempts` when the current schedule started (0, or the count at a redrive or seek): the
    /// policy's `attempts_max` counts from here.
    attempts_base: u32,
    next_attempt_at: Timestamp,
    /// Set while leased to a puller.
    lease_until: Option<Timestamp>,
    last_error: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct DeadRecord {
    delivery: DeliveryRecord,
    reason: String,
    dead_at: Timestamp,
}

#[derive(Serialize, Deserialize)]
struct AttemptRecord {
    event_id: u128,
    outcome: AttemptOutcome,
    status: Option<u16>,
    error: Option<String>,
    latency_ms: u64,
    at: Timestamp,
}

/// A subscription the writer fans out to, cached per Room.
#[derive(Clone)]
pub(crate) struct FanoutTarget {
    id: u128,
    event_types: Option<HashSet<EventTypeName>>,
    queue_depth_max: u64,
}

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

fn sub_not_found(id: u128) -> Error {
    Error::SubscriptionNotFound {
        id: SubscriptionId(Uuid::from_u128(id)).to_string(),
    }
}

fn to_subscription(
    id: u128,
    r: &SubRecord,
    room_retry: &RetryOverrides,
    stats: (u64, u64),
    d: &DeliveryDefaults,
) -> Subscription {
    Subscription {
        id: SubscriptionId(Uuid::from_u128(id)),
        room: r.room.clone(),
        subscriber: r.subscriber.clone(),
        event_types: r.event_types.clone(),
        mode: match &r.mode {
            StoredMode::Push(p) => DeliveryMode::Push(p.clone()),
            StoredMode::Pull => DeliveryMode::Pull,
        },
        ordered: r.ordered,
        retry: r.retry.clone(),
        retry_effective: r.retry.apply(&room_retry.apply(&d.retry)),
        in_flight_max: r.in_flight_max,
        queue_depth_max: r.queue_depth_max,
        status: r.status,
        status_reason: r.status_reason.clone(),
        backlog: stats.0,
        dead_letters: stats.1,
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

/// The ack id handed to pullers: the log offset and the attempt it leases.
pub(crate) fn ack_id(offset: u64, attempt: u32) -> String {
    format!("{offset}-{attempt}")
}

/// Parses an ack id; a malformed one is bad input.
pub(crate) fn parse_ack_id(s: &str) -> Result<(u64, u32)> {
    s.split_once('-')
        .and_then(|(o, a)| Some((o.parse().ok()?, a.parse().ok()?)))
        .ok_or_else(|| {
            Error::invalid(
                "ack_id",
                format!("`{s}` is not an ack id this broker issued"),
            )
        })
}

impl<'t> Tables<'t> {
    fn sub_record(&self, id: u128) -> Result<SubRecord> {
        match self.subscriptions.get(id)? {
            Some(g) => decode(&g),
            None => Err(sub_not_found(id)),
        }
    }

    fn store_sub(&mut self, id: u128, rec: &SubRecord) -> Result<()> {
        self.subscriptions.insert(id, encode(rec)?.as_slice())?;
        // Any change may alter fan-out; the cache entry is rebuilt on next use.
        self.fanout.remove(&rec.room_id);
        Ok(())
    }

    fn sub_stats(&self, id: u128) -> Result<(u64, u64)> {
        Ok(self.sub_stats.get(id)?.unwrap_or_default())
    }

    fn subscription_out(&self, id: u128, rec: &SubRecord) -> Result<Subscription> {
        let room_retry = self.room_retry(rec.room_id, &rec.room)?;
        Ok(to_subscription(
            id,
            rec,
            &room_retry,
            self.sub_stats(id)?,
            &self.defaults,
        ))
    }

    fn room_retry(&self, room_id: u64, room: &RoomName) -> Result<RetryOverrides> {
        match self.rooms.get(room.as_str())? {
            Some(g) => {
                let r: super::RoomRecord = decode(&g)?;
                Ok(if r.id == room_id {
                    r.retry
                } else {
                    RetryOverrides::default()
                })
            }
            None => Ok(RetryOverrides::default()),
        }
    }

    pub(super) fn apply_delivery(&mut self, now: Timestamp, op: DeliveryOp) -> Result<WriteOutput> {
        match op {
            DeliveryOp::Create {
                room,
                id,
                new,
                secret,
            } => self.create_sub(now, &room, id, new, secret),
            DeliveryOp::Update { id, patch } => {
                let id = id.0.as_u128();
                let mut rec = self.sub_record(id)?;
                apply_patch(&mut rec, patch)?;
                rec.updated_at = now;
                self.store_sub(id, &rec)?;
                Ok(WriteOutput::Subscription(
                    self.subscription_out(id, &rec)?,
                    None,
                ))
            }
            DeliveryOp::SetStatus {
                id,
                to,
                reason,
                from,
            } => {
                let id = id.0.as_u128();
                let mut rec = self.sub_record(id)?;
                if rec.status != to && !from.contains(&rec.status) {
                    return Err(Error::SubscriptionState {
                        id: SubscriptionId(Uuid::from_u128(id)).to_string(),
                        status: rec.status.as_str().into(),
                        wanted: to.as_str().into(),
                    });
                }
                // A reason given for a status the subscription already has replaces its reason
                // (e.g. a paused subscription whose subscriber then lost its right).
                if rec.status != to || (reason.is_some() && rec.status_reason != reason) {
                    rec.status = to;
                    rec.status_reason = reason;
                    rec.updated_at = now;
                    self.store_sub(id, &rec)?;
                    self.touched.insert(id);
                }
                Ok(WriteOutput::Subscription(
                    self.subscription_out(id, &rec)?,
                    None,
                ))
            }
            DeliveryOp::Delete { id } => {
                let id = id.0.as_u128();
                let rec = self.sub_record(id)?;
                self.subscriptions.remove(id)?;
                self.room_subs.remove((rec.room_id, id))?;
                self.deleted_subs.insert(id, ())?;
                self.fanout.remove(&rec.room_id);
                self.touched.insert(id);
                Ok(WriteOutput::Deleted)
            }
            DeliveryOp::RotateSecret {
                id,
                secret,
                old_valid_until,
            } => {
                let id = id.0.as_u128();
                let mut rec = self.sub_record(id)?;
                if !matches!(rec.mode, StoredMode::Push(_)) {
                    return Err(Error::invalid(
                        "subscription",
                        "only push subscriptions have a signing secret",
                    ));
                }
                // Keep only secrets still in their grace period, then demote the current one.
                rec.secrets
                    .retain(|s| s.valid_until.is_none_or(|u| u > now));
                for s in rec.secrets.iter_mut().filter(|s| s.valid_until.is_none()) {
                    s.valid_until = Some(old_valid_until);
                }
                rec.secrets.push(SecretRecord {
                    secret: secret.clone(),
                    valid_until: None,
                });
                rec.updated_at = now;
                self.store_sub(id, &rec)?;
                Ok(WriteOutput::Subscription(
                    self.subscription_out(id, &rec)?,
                    Some(secret),
                ))
            }
            DeliveryOp::Lease {
                id,
                max,
                lease_ms,
                scan_max,
            } => self.lease(now, id.0.as_u128(), max, lease_ms, scan_max),
            DeliveryOp::Settle { id, refs, action } => {
                self.settle(now, id.0.as_u128(), refs, action)
            }
            DeliveryOp::PushOutcome {
                id,
                offset,
                attempt,
                response,
            } => self
                .push_outcome(now, id.0.as_u128(), offset, attempt, response)
                .map(|()| WriteOutput::Deleted),
            DeliveryOp::Redrive { id, offsets, limit } => {
                self.redrive(now, id.0.as_u128(), offsets, limit)
            }
            DeliveryOp::PurgeDead { id, limit } => {
                let id = id.0.as_u128();
                self.sub_record(id)?;
                let keys = offsets_in(&self.dead_letters, id, 0, u64::MAX, limit)?;
                for k in &keys {
                    self.dead_letters.remove((id, *k))?;
                }
                let (backlog, dead) = self.sub_stats(id)?;
                self.sub_stats
                    .insert(id, (backlog, dead.saturating_sub(keys.len() as u64)))?;
                Ok(WriteOutput::Count {
                    n: keys.len() as u64,
                    more: keys.len() == limit,
                })
            }
            DeliveryOp::SeekClear { id, below, limit } => {
                let id = id.0.as_u128();
                let mut rec = self.sub_record(id)?;
                if !rec.seeking {
                    rec.seeking = true;
                    self.store_sub(id, &rec)?;
                }
                let keys = offsets_in(&self.deliveries, id, 0, below, limit)?;
                for k in &keys {
                    self.deliveries.remove((id, *k))?;
                }
                let (backlog, dead) = self.sub_stats(id)?;
                self.sub_stats
                    .insert(id, (backlog.saturating_sub(keys.len() as u64), dead))?;
                Ok(WriteOutput::Count {
                    n: keys.len() as u64,
                    more: keys.len() == limit,
                })
            }
            DeliveryOp::StopEvent { event } => self.stop_event(now, event),
            DeliveryOp::SeekDone { id } => {
                let id = id.0.as_u128();
                let mut rec = self.sub_record(id)?;
                rec.seeking = false;
                self.store_sub(id, &rec)?;
                self.touched.insert(id);
                Ok(WriteOutput::Subscription(
                    self.subscription_out(id, &rec)?,
                    None,
                ))
            }
            DeliveryOp::SeekEnqueue {
                id,
                from,
                to,
                limit,
            } => self.seek_enqueue(now, id.0.as_u128(), from, to, limit),
        }
    }

    fn create_sub(
        &mut self,
        now: Timestamp,
        room: &RoomName,
        id: SubscriptionId,
        new: NewSubscription,
        secret: Option<String>,
    ) -> Result<WriteOutput> {
        let room_rec = self.room_record(room)?;
        let id = id.0.as_u128();
        let rec = SubRecord {
            room_id: room_rec.id,
            room: room.clone(),
            subscriber: new.subscriber,
            event_types: new.event_types,
            mode: match new.mode {
                DeliveryMode::Push(p) => StoredMode::Push(p),
                DeliveryMode::Pull => StoredMode::Pull,
            },
            ordered: new.ordered.unwrap_or(room_rec.ordered),
            retry: new.retry,
            in_flight_max: new.in_flight_max.unwrap_or(self.defaults.in_flight_max),
            queue_depth_max: new.queue_depth_max.unwrap_or(self.defaults.queue_depth_max),
            status: if new.approved {
                SubscriptionStatus::Active
            } else {
                SubscriptionStatus::Pending
            },
            status_reason: None,
            seeking: false,
            secrets: secret
                .iter()
                .map(|s| SecretRecord {
                    secret: s.clone(),
                    valid_until: None,
                })
                .collect(),
            created_at: now,
            updated_at: now,
        };
        let per_room = self
            .room_subs
            .range((room_rec.id, 0u128)..=(room_rec.id, u128::MAX))?
            .count();
        if per_room >= self.defaults.subscriptions_per_room_max {
            return Err(Error::limit(
                "subscriptions_per_room_max",
                self.defaults.subscriptions_per_room_max as u64,
                per_room as u64 + 1,
            ));
        }
        self.room_subs.insert((room_rec.id, id), ())?;
        self.sub_stats.insert(id, (0, 0))?;
        self.store_sub(id, &rec)?;
        self.touched.insert(id);
        Ok(WriteOutput::Subscription(
            self.subscription_out(id, &rec)?,
            secret,
        ))
    }

    /// Deletes every subscription of a deleted Room (their queues are purged by the sweep).
    pub(super) fn delete_room_subscriptions(&mut self, room_id: u64) -> Result<()> {
        let ids: Vec<u128> = self
            .room_subs
            .range((room_id, 0u128)..=(room_id, u128::MAX))?
            .map(|r| r.map(|(k, _)| k.1))
            .collect::<std::result::Result<_, _>>()?;
        for id in ids {
            self.subscriptions.remove(id)?;
            self.room_subs.remove((room_id, id))?;
            self.deleted_subs.insert(id, ())?;
            self.touched.insert(id);
        }
        self.fanout.remove(&room_id);
        Ok(())
    }

    /// Subscriptions to fan a Room's events out to: active and paused ones (a paused
    /// subscription keeps queueing so that nothing is lost while it is paused).
    /// Shared, not copied: this runs for every published event.
    fn fanout_targets(&mut self, room_id: u64) -> Result<Arc<Vec<FanoutTarget>>> {
        if let Some(t) = self.fanout.get(&room_id) {
            return Ok(t.clone());
        }
        let ids: Vec<u128> = self
            .room_subs
            .range((room_id, 0u128)..=(room_id, u128::MAX))?
            .map(|r| r.map(|(k, _)| k.1))
            .collect::<std::result::Result<_, _>>()?;
        let mut targets = Vec::new();
        for id in ids {
            let rec = self.sub_record(id)?;
            if matches!(
                rec.status,
                SubscriptionStatus::Active | SubscriptionStatus::Paused
            ) {
                targets.push(FanoutTarget {
                    id,
                    event_types: rec.event_types.map(|v| v.into_iter().collect()),
                    queue_depth_max: rec.queue_depth_max,
                });
            }
        }
        let targets = Arc::new(targets);
        self.fanout.insert(room_id, targets.clone());
        Ok(targets)
    }

    /// Records the delivery obligations of a new event, in the transaction that stores it.
    pub(super) fn fan_out(
        &mut self,
        now: Timestamp,
        room_id: u64,
        offset: u64,
        d: &DeliveryRecordInit<'_>,
    ) -> Result<()> {
        for t in self.fanout_targets(room_id)?.iter() {
            if t.event_types
                .as_ref()
                .is_some_and(|types| !types.contains(d.event_type))
            {
                continue;
            }
            let rec = DeliveryRecord {
                event_id: d.event_id,
                event_type: d.event_type.clone(),
                key: d.key.clone(),
                sequence: d.sequence,
                published_at: now,
                attempts: 0,
                attempts_base: 0,
                next_attempt_at: now,
                lease_until: None,
                last_error: None,
            };
            let (backlog, dead) = self.sub_stats(t.id)?;
            if backlog >= t.queue_depth_max {
                let dead_rec = DeadRecord {
                    delivery: rec,
                    reason: "queue_full".into(),
                    dead_at: now,
                };
                self.dead_letters
                    .insert((t.id, offset), encode(&dead_rec)?.as_slice())?;
                self.sub_stats.insert(t.id, (backlog, dead + 1))?;
                self.observed
                    .push(crate::storage::Observation::DeadLettered {
                        sub: t.id,
                        reason: "queue_full",
                    });
            } else {
                self.deliveries
                    .insert((t.id, offset), encode(&rec)?.as_slice())?;
                self.sub_stats.insert(t.id, (backlog + 1, dead))?;
            }
            self.touched.insert(t.id);
        }
        Ok(())
    }

    /// Dead-letters every undelivered copy of one event (reason `stopped`). A copy being pushed
    /// right now is stopped too; its outcome finds no delivery and is ignored like any other
    /// late outcome.
    fn stop_event(&mut self, now: Timestamp, event: EventId) -> Result<WriteOutput> {
        let (room_id, offset) = match self.events.get(event.0.as_u128())? {
            Some(g) => {
                let h = super::decode_event_header(&g)?;
                (h.room_id, h.offset)
            }
            None => {
                return Err(Error::EventNotFound {
                    id: event.to_string(),
                })
            }
        };
        let subs: Vec<u128> = self
            .room_subs
            .range((room_id, 0u128)..=(room_id, u128::MAX))?
            .map(|r| r.map(|(k, _)| k.1))
            .collect::<std::result::Result<_, _>>()?;
        let mut n = 0;
        for sub in subs {
            let mut rec: DeliveryRecord = match self.deliveries.get((sub, offset))? {
                Some(g) => decode(&g)?,
                None => continue,
            };
            let attempt = self.last_attempt_no(sub, offset)?.max(rec.attempts) + 1;
            // The stop is an attempt of its own: a redrive continues after it, rather than
            // logging its next attempt under the same number.
            rec.attempts = attempt;
            self.log_attempt(
                sub,
                offset,
                attempt,
                &AttemptRecord {
                    event_id: rec.event_id,
                    outcome: AttemptOutcome::DeadLettered,
                    status: None,
                    error: Some("stopped by the publisher".into()),
                    latency_ms: 0,
                    at: now,
                },
                rec.published_at,
            )?;
            self.dead_letter(now, sub, offset, rec, "stopped")?;
            n += 1;
        }
        Ok(WriteOutput::Count { n, more: false })
    }

    /// The highest attempt number logged for a delivery, 0 if none.
    fn last_attempt_no(&self, sub: u128, offset: u64) -> Result<u32> {
        Ok(
            match self
                .attempts
                .range_rev((sub, offset, 0)..=(sub, offset, u32::MAX))?
                .next()
            {
                Some(item) => item?.0 .2,
                None => 0,
            },
        )
    }

    /// Logs one attempt; `published_at` is the event's, for the delivery latency metric.
    fn log_attempt(
        &mut self,
        sub: u128,
        offset: u64,
        attempt: u32,
        rec: &AttemptRecord,
        published_at: Timestamp,
    ) -> Result<()> {
        self.attempts
            .insert((sub, offset, attempt), encode(rec)?.as_slice())?;
        // Observed here because this is the one place every attempt passes; counted after the
        // commit, so that a failed commit counts nothing.
        self.observed.push(crate::storage::Observation::Attempt {
            sub,
            event: rec.event_id,
            outcome: rec.outcome,
            published_at,
            at: rec.at,
        });
        Ok(())
    }

    /// Moves a delivery to the dead letters.
    fn dead_letter(
        &mut self,
        now: Timestamp,
        sub: u128,
        offset: u64,
        rec: DeliveryRecord,
        reason: &'static str,
    ) -> Result<()> {
        self.deliveries.remove((sub, offset))?;
        let dead = DeadRecord {
            delivery: rec,
            reason: reason.into(),
            dead_at: now,
        };
        self.dead_letters
            .insert((sub, offset), encode(&dead)?.as_slice())?;
        self.observed
            .push(crate::storage::Observation::DeadLettered { sub, reason });
        let (backlog, dead_n) = self.sub_stats(sub)?;
        self.sub_stats
            .insert(sub, (backlog.saturating_sub(1), dead_n + 1))?;
        self.touched.insert(sub);
        Ok(())
    }

    fn complete(&mut self, sub: u128, offset: u64) -> Result<()> {
        self.deliveries.remove((sub, offset))?;
        let (backlog, dead) = self.sub_stats(sub)?;
        self.sub_stats
            .insert(sub, (backlog.saturating_sub(1), dead))?;
        self.touched.insert(sub);
        Ok(())
    }

    /// After a failed attempt: schedule the next one or dead-letter.
    fn fail(
        &mut self,
        now: Timestamp,
        sub: &SubRecord,
        sub_id: u128,
        offset: u64,
        mut rec: DeliveryRecord,
        failure: Failure,
    ) -> Result<()> {
        let Failure {
            retry_after_ms,
            error,
        } = failure;
        let room_retry = self.room_retry(sub.room_id, &sub.room)?;
        let policy = sub.retry.apply(&room_retry.apply(&self.defaults.retry));
        let seed = (rec.event_id as u64) ^ u64::from(rec.attempts);
        rec.last_error = Some(error);
        rec.lease_until = None;
        let in_schedule = rec.attempts.saturating_sub(rec.attempts_base);
        match retry::next_after_failure(
            &policy,
            in_schedule,
            rec.published_at,
            now,
            retry_after_ms,
            self.defaults.retry_after_ms_max,
            seed,
        ) {
            Next::RetryAt(at) => {
                rec.next_attempt_at = at;
                self.deliveries
                    .insert((sub_id, offset), encode(&rec)?.as_slice())?;
                self.touched.insert(sub_id);
                Ok(())
            }
            Next::AttemptsExhausted => {
                self.dead_letter(now, sub_id, offset, rec, "attempts_exhausted")
            }
            Next::TtlExpired => self.dead_letter(now, sub_id, offset, rec, "ttl_expired"),
        }
    }

    fn push_outcome(
        &mut self,
        now: Timestamp,
        sub_id: u128,
        offset: u64,
        attempt: u32,
        resp: PushResponse,
    ) -> Result<()> {
        // The subscription or the delivery may be gone (deleted, seeked, redriven): nothing to do.
        let Ok(sub) = self.sub_record(sub_id) else {
            return Ok(());
        };
        let mut rec: DeliveryRecord = match self.deliveries.get((sub_id, offset))? {
            Some(g) => decode(&g)?,
            None => return Ok(()),
        };
        if rec.attempts + 1 != attempt {
            return Ok(());
        }
        rec.attempts = attempt;
        let ok = resp.status.is_some_and(|s| (200..300).contains(&s));
        self.log_attempt(
            sub_id,
            offset,
            attempt,
            &AttemptRecord {
                event_id: rec.event_id,
                outcome: if ok {
                    AttemptOutcome::Delivered
                } else {
                    AttemptOutcome::Failed
                },
                status: resp.status,
                error: resp.error.clone(),
                latency_ms: resp.latency_ms,
                at: now,
            },
            rec.published_at,
        )?;
        if ok {
            return self.complete(sub_id, offset);
        }
        let error = match (resp.status, &resp.error) {
            (Some(s), _) => format!("HTTP {s}"),
            (None, Some(e)) => e.clone(),
            (None, None) => "no response".into(),
        };
        if resp.status == Some(410) {
            // The receiver unsubscribed: stop, keep the backlog, say why.
            let mut sub = sub;
            sub.status = SubscriptionStatus::Disabled;
            sub.status_reason = Some("endpoint answered 410 Gone".into());
            sub.updated_at = now;
            self.store_sub(sub_id, &sub)?;
            rec.last_error = Some(error);
            self.deliveries
                .insert((sub_id, offset), encode(&rec)?.as_slice())?;
            return Ok(());
        }
        let retry_after = match resp.status {
            Some(429 | 503) => resp.retry_after_ms,
            _ => None,
        };
        self.fail(
            now,
            &sub,
            sub_id,
            offset,
            rec,
            Failure {
                retry_after_ms: retry_after,
                error,
            },
        )
    }

    fn lease(
        &mut self,
        now: Timestamp,
        sub_id: u128,
        max: usize,
        lease_ms: u64,
        scan_max: usize,
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
        let candidates: Vec<(u64, DeliveryRecord)> = self
            .deliveries
            .range((sub_id, 0)..=(sub_id, u64::MAX))?
            .take(scan_max)
            .map(|r| r.and_then(|(k, v)| Ok((k.1, decode::<DeliveryRecord>(&v)?))))
            .collect::<Result<_>>()?;
        // With ordering, only the first undelivered event of each key may go out, and not while
        // any event of the key is leased (a redrive can put an older event in front of one out).
        let leased: HashSet<OrderingKey> = if sub.ordered {
            candidates
                .iter()
                .filter(|(_, r)| r.lease_until.is_some_and(|u| u > now))
                .map(|(_, r)| r.key.clone())
                .collect()
        } else {
            HashSet::new()
        };
        let mut heads = HashSet::new();
        let mut grants = Vec::new();
        // The earliest later time at which a message looked at falls due by time alone: its
        // lease runs out (which also frees its key, with ordering) or its retry delay does.
        // Events behind a key's head fall due only by a write (an ack), which wakes pullers.
        let mut next_due: Option<Timestamp> = None;
        let mut due_at = |t: Timestamp| next_due = Some(next_due.map_or(t, |n| n.min(t)));
        for (offset, mut rec) in candidates {
            if grants.len() >= max {
                break;
            }
            if let Some(until) = rec.lease_until.filter(|u| *u > now) {
                due_at(until);
            }
            if sub.ordered && !heads.insert(rec.key.clone()) {
                continue;
            }
            if sub.ordered && leased.contains(&rec.key) && rec.lease_until.is_none_or(|u| u <= now)
            {
                continue;
            }
            if let Some(until) = rec.lease_until {
                if until > now {
                    continue;
                }
                // The lease ran out: that attempt failed, after as long as the lease was held
                // (its row says when it was leased; this row replaces it).
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
                // The attempt failed at the deadline, however late a pull notices: the backoff
                // counts from there, so the schedule does not depend on when pullers call.
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
                    Some(g) => rec = decode(&g)?,
                    None => continue,
                }
            }
            if rec.next_attempt_at > now {
                due_at(rec.next_attempt_at);
                continue;
            }
            rec.attempts += 1;
            let until = now.plus_ms(lease_ms);
            rec.lease_until = Some(until);
            self.deliveries
                .insert((sub_id, offset), encode(&rec)?.as_slice())?;
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
                lease_until: until,
                event_id: EventId(Uuid::from_u128(rec.event_id)),
            });
        }
        Ok(WriteOutput::Leased { grants, next_due })
    }

    fn settle(
        &mut self,
        now: Timestamp,
        sub_id: u128,
        refs: Vec<(u64, u32)>,
        action: AckAction,
    ) -> Result<WriteOutput> {
        let sub = self.sub_record(sub_id)?;
        let mut results = Vec::with_capacity(refs.len());
        for (offset, attempt) in refs {
            let rec: Option<DeliveryRecord> = match self.deliveries.get((sub_id, offset))? {
                Some(g) => Some(decode(&g)?),
                None => None,
            };
            // Only the current lease may be settled; a stale ack id means the message was
            // redelivered (or already settled) and the caller must not assume its action held.
            let Some(mut rec) =
                rec.filter(|r| r.attempts == attempt && r.lease_until.is_some_and(|u| u > now))
            else {
                results.push(Err(Error::LeaseNotHeld {
                    ack_id: ack_id(offset, attempt),
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
                                self.deliveries
                                    .insert((sub_id, offset), encode(&rec)?.as_slice())?;
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
                    self.deliveries
                        .insert((sub_id, offset), encode(&rec)?.as_slice())?;
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

    fn redrive(
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
                Some(g) => Some(decode(&g)?),
                None => None,
            };
            let Some(dead) = dead else { continue };
            self.dead_letters.remove((sub_id, *offset))?;
            if self.deliveries.get((sub_id, *offset))?.is_some() {
                // Already queued again (by a seek): the dead letter is stale; keep the live one.
                let (backlog, dead_n) = self.sub_stats(sub_id)?;
                self.sub_stats
                    .insert(sub_id, (backlog, dead_n.saturating_sub(1)))?;
                continue;
            }
            // A fresh schedule: the attempts limit and the time to live count from now, while
            // attempt numbers carry on so that the log keeps every attempt apart.
            let rec = DeliveryRecord {
                attempts_base: dead.delivery.attempts,
                next_attempt_at: now,
                lease_until: None,
                published_at: now,
                ..dead.delivery
            };
            self.deliveries
                .insert((sub_id, *offset), encode(&rec)?.as_slice())?;
            let (backlog, dead_n) = self.sub_stats(sub_id)?;
            self.sub_stats
                .insert(sub_id, (backlog + 1, dead_n.saturating_sub(1)))?;
            n += 1;
        }
        self.touched.insert(sub_id);
        Ok(WriteOutput::Count {
            n,
            more: chosen.len() == limit,
        })
    }

    fn seek_enqueue(
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
        let mut n = 0;
        for &(offset, id) in &entries {
            let Some(g) = self.events.get(id)? else {
                continue;
            };
            let ev = super::decode_event_header(&g)?;
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
                let (backlog, dead) = self.sub_stats(sub_id)?;
                self.sub_stats
                    .insert(sub_id, (backlog, dead.saturating_sub(1)))?;
            }
            let last = self.last_attempt_no(sub_id, offset)?;
            let rec = DeliveryRecord {
                event_id: id,
                event_type: ev.event_type,
                key: ev.key,
                sequence: ev.sequence,
                published_at: now,
                attempts: last,
                attempts_base: last,
                next_attempt_at: now,
                lease_until: None,
                last_error: None,
            };
            self.deliveries
                .insert((sub_id, offset), encode(&rec)?.as_slice())?;
            n += 1;
        }
        let (backlog, dead) = self.sub_stats(sub_id)?;
        self.sub_stats.insert(sub_id, (backlog + n, dead))?;
        self.touched.insert(sub_id);
        let next = entries.last().map(|(o, _)| o + 1);
        Ok(WriteOutput::Seeked {
            n,
            next: if entries.len() == limit { next } else { None },
        })
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
            let old: Vec<u64> = self
                .dead_letters
                .range((s, 0)..=(s, u64::MAX))?
                .take(budget)
                .map(|r| r.and_then(|(k, v)| Ok((k.1, decode::<DeadRecord>(&v)?.dead_at))))
                .filter(|r| {
                    r.as_ref()
                        .map(|(_, at)| now.ms_since(*at) > keep_ms)
                        .unwrap_or(true)
                })
                .map(|r| r.map(|(o, _)| o))
                .collect::<Result<_>>()?;
            for o in &old {
                self.dead_letters.remove((s, *o))?;
            }
            let (backlog, dead) = self.sub_stats(s)?;
            self.sub_stats
                .insert(s, (backlog, dead.saturating_sub(old.len() as u64)))?;
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
            if removed < budget {
                self.sub_stats.remove(s)?;
                self.deleted_subs.remove(s)?;
            }
            purged += removed as u64;
            budget -= removed.min(budget);
        }
        Ok((expired, purged))
    }
}

/// Why an attempt failed, for scheduling the next one.
pub(super) struct Failure {
    /// The receiver's Retry-After, when it sent one with 429 or 503.
    retry_after_ms: Option<u64>,
    error: String,
}

impl Failure {
    fn new(retry_after_ms: Option<u64>, error: &str) -> Self {
        Failure {
            retry_after_ms,
            error: error.to_string(),
        }
    }
}

/// What fan-out needs to know of a new event.
pub(super) struct DeliveryRecordInit<'a> {
    pub event_id: u128,
    pub event_type: &'a EventTypeName,
    pub key: &'a OrderingKey,
    pub sequence: u64,
}

fn apply_patch(rec: &mut SubRecord, patch: SubscriptionPatch) -> Result<()> {
    if let Some(t) = patch.event_types {
        rec.event_types = t;
    }
    if let Some(p) = patch.push {
        match &mut rec.mode {
            StoredMode::Push(current) => *current = p,
            StoredMode::Pull => {
                return Err(Error::invalid(
                    "push",
                    "a pull subscription has no push endpoint",
                ))
            }
        }
    }
    if let Some(o) = patch.ordered {
        rec.ordered = o;
    }
    if let Some(r) = patch.retry {
        rec.retry = r;
    }
    if let Some(m) = patch.in_flight_max {
        rec.in_flight_max = m;
    }
    if let Some(m) = patch.queue_depth_max {
        rec.queue_depth_max = m;
    }
    Ok(())
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

/// Read side.
impl Engine {
    fn read_sub(&self, txn: &Txn, id: u128) -> Result<SubRecord> {
        match txn.open_table(SUBSCRIPTIONS)?.get(id)? {
            Some(g) => decode(&g),
            None => Err(sub_not_found(id)),
        }
    }

    fn read_subscription(&self, txn: &Txn, id: u128) -> Result<Subscription> {
        let rec = self.read_sub(txn, id)?;
        let stats = txn.open_table(SUB_STATS)?.get(id)?.unwrap_or_default();
        let room_retry = match txn.open_table(super::ROOMS)?.get(rec.room.as_str())? {
            Some(g) => {
                let r: super::RoomRecord = decode(&g)?;
                if r.id == rec.room_id {
                    r.retry
                } else {
                    RetryOverrides::default()
                }
            }
            None => RetryOverrides::default(),
        };
        Ok(to_subscription(
            id,
            &rec,
            &room_retry,
            stats,
            &self.delivery_defaults(),
        ))
    }

    pub(super) fn subscription_read(&self, id: SubscriptionId) -> Result<Subscription> {
        let txn = self.begin_read()?;
        self.read_subscription(&txn, id.0.as_u128())
    }

    pub(super) fn subscriptions_read(&self, room: &RoomName) -> Result<Vec<Subscription>> {
        let room_id = self.room_id_of(room)?;
        let txn = self.begin_read()?;
        let ids: Vec<u128> = txn
            .open_table(ROOM_SUBS)?
            .range((room_id, 0u128)..=(room_id, u128::MAX))?
            .map(|r| r.map(|(k, _)| k.1))
            .collect::<std::result::Result<_, _>>()?;
        ids.into_iter()
            .map(|id| self.read_subscription(&txn, id))
            .collect()
    }

    pub(super) fn push_subscriptions_read(&self) -> Result<Vec<SubscriptionId>> {
        let txn = self.begin_read()?;
        let mut out = Vec::new();
        for item in txn.open_table(SUBSCRIPTIONS)?.iter()? {
            let (k, v) = item?;
            let rec: SubRecord = decode(&v)?;
            if matches!(rec.mode, StoredMode::Push(_)) {
                out.push(SubscriptionId(Uuid::from_u128(k)));
            }
        }
        Ok(out)
    }

    pub(super) fn signing_secrets_read(
        &self,
        id: SubscriptionId,
        now: Timestamp,
    ) -> Result<Vec<String>> {
        let txn = self.begin_read()?;
        let rec = self.read_sub(&txn, id.0.as_u128())?;
        Ok(rec
            .secrets
            .into_iter()
            .filter(|s| s.valid_until.is_none_or(|u| u > now))
            .map(|s| s.secret)
            .collect())
    }

    pub(super) fn due_read(
        &self,
        id: SubscriptionId,
        now: Timestamp,
        busy: &HashSet<u64>,
        limit: usize,
        scan_max: usize,
    ) -> Result<(Vec<DueDelivery>, Option<Timestamp>)> {
        let txn = self.begin_read()?;
        let sub_id = id.0.as_u128();
        let sub = self.read_sub(&txn, sub_id)?;
        if sub.seeking {
            return Ok((Vec::new(), None));
        }
        let table = txn.open_table(DELIVERIES)?;
        // With ordering, a key with any delivery in flight is blocked, not only when its head is:
        // a redrive can put an older event in front of one already out. The in-flight keys are
        // read by point lookups (at most `in_flight_max` of them), so that the queue itself is
        // decoded only as far as needed: decoding the whole window first, on every freed slot,
        // was the largest cost of the push path in the profile (issue 8).
        let blocked: HashSet<OrderingKey> = if sub.ordered {
            let mut keys = HashSet::new();
            for &offset in busy {
                if let Some(v) = table.get((sub_id, offset))? {
                    keys.insert(decode::<DeliveryRecord>(&v)?.key);
                }
            }
            keys
        } else {
            HashSet::new()
        };
        let mut heads = HashSet::new();
        let mut due = Vec::new();
        let mut next: Option<Timestamp> = None;
        // Stopping once `limit` are found leaves `next` covering only what was read; that is
        // enough, because every slot is then taken and the dispatcher looks again when one frees.
        for entry in table
            .range((sub_id, 0)..=(sub_id, u64::MAX))?
            .take(scan_max)
        {
            if due.len() >= limit {
                break;
            }
            let (k, v) = entry?;
            let offset = k.1;
            if busy.contains(&offset) {
                continue;
            }
            let rec: DeliveryRecord = decode(&v)?;
            if sub.ordered && (blocked.contains(&rec.key) || !heads.insert(rec.key.clone())) {
                continue;
            }
            if rec.next_attempt_at > now {
                next = Some(next.map_or(rec.next_attempt_at, |n| n.min(rec.next_attempt_at)));
                continue;
            }
            due.push(DueDelivery {
                offset,
                event_id: EventId(Uuid::from_u128(rec.event_id)),
                attempt: rec.attempts + 1,
                published_at: rec.published_at,
            });
        }
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
            let d: DeadRecord = decode(&v)?;
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
        self.read_sub(&txn, sub_id)?;
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
            let rec: DeliveryRecord = decode(&v)?;
            if !heads.insert(rec.key.clone()) {
                continue;
            }
            // A head that has failed at least once is what holds its key back.
            if rec.attempts > 0 && rec.last_error.is_some() {
                out.push(BlockedKey {
                    key: rec.key,
                    head_event_id: EventId(Uuid::from_u128(rec.event_id)),
                    sequence: Sequence(rec.sequence),
                    attempts: rec.attempts,
                    last_error: rec.last_error,
                    next_attempt_at: rec.next_attempt_at.max(now),
                });
            }
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
        self.read_sub(&txn, sub_id)?;
        let mut heads = HashSet::new();
        let mut health = crate::storage::QueueHealth {
            complete: true,
            ..Default::default()
        };
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
            let rec: DeliveryRecord = decode(&v)?;
            if health.oldest_published_at.is_none() {
                health.oldest_published_at = Some(rec.published_at);
            }
            if rec.lease_until.is_some_and(|u| u > now) {
                health.in_flight += 1;
            }
            // As in `blocked_keys_read`: a head that has failed holds its key back.
            if heads.insert(rec.key.clone()) && rec.attempts > 0 && rec.last_error.is_some() {
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
        let r: DeliveryRecord = decode(&g)?;
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
        let txn = self.begin_read()?;
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
                let r: DeliveryRecord = decode(&g)?;
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
                let d: DeadRecord = decode(&g)?;
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
        let log = txn.open_table(super::ROOM_LOG)?;
        let events = txn.open_table(super::EVENTS)?;
        let stats = txn.open_table(super::ROOM_STATS)?;
        let end = stats.get(room_id)?.map(|g| g.0).unwrap_or(0);
        let first_at = |from: u64| -> Result<Option<(u64, Timestamp)>> {
            let Some(item) = log.range((room_id, from)..(room_id, end))?.next() else {
                return Ok(None);
            };
            let (k, v) = item?;
            let at = match events.get(v)? {
                Some(g) => super::decode_event_header(&g)?.received_at,
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
}

pub(super) type FanoutCache = HashMap<u64, Arc<Vec<FanoutTarget>>>;
