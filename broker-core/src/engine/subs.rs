//! Subscriptions: the stored record (mode, event types, ordering, retry overrides, limits,
//! status, signing secrets, the seek flag), creating, updating, changing the status of, deleting
//! and rotating the secret of one, and reading them; and `apply_delivery`, which hands every
//! delivery operation to the file that holds it (`queue.rs`, `replay.rs`).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::rooms::RoomRecord;
use super::spaces::{ROOMS, ROOM_SUBS, SUBSCRIPTIONS, SUB_STATS};
use super::{Engine, Tables};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::ids::{EventTypeName, Principal, RoomName, SubscriptionId};
use crate::storage::codec::{decode, encode};
use crate::storage::txn::Txn;
use crate::storage::{DeliveryDefaults, DeliveryOp, WriteOutput};
use crate::subscription::{
    DeliveryMode, NewSubscription, PushEndpoint, RetryOverrides, Subscription, SubscriptionPatch,
    SubscriptionStatus,
};

#[derive(Serialize, Deserialize, Clone)]
pub(super) enum StoredMode {
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
    pub(super) room_id: u64,
    pub(super) room: RoomName,
    subscriber: Principal,
    pub(super) event_types: Option<Vec<EventTypeName>>,
    pub(super) mode: StoredMode,
    pub(super) ordered: bool,
    pub(super) retry: RetryOverrides,
    in_flight_max: u32,
    pub(super) queue_depth_max: u64,
    pub(super) status: SubscriptionStatus,
    pub(super) status_reason: Option<String>,
    secrets: Vec<SecretRecord>,
    /// True while a seek rebuilds the queue: nothing is handed out meanwhile, so that events
    /// published during the seek cannot overtake older ones of their key being queued again.
    pub(super) seeking: bool,
    created_at: Timestamp,
    pub(super) updated_at: Timestamp,
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

impl<'t> Tables<'t> {
    pub(super) fn sub_record(&self, id: u128) -> Result<SubRecord> {
        match self.subscriptions.get(id)? {
            Some(g) => decode(&g),
            None => Err(sub_not_found(id)),
        }
    }

    pub(super) fn store_sub(&mut self, id: u128, rec: &SubRecord) -> Result<()> {
        self.subscriptions.insert(id, encode(rec)?.as_slice())?;
        // Any change may alter fan-out; the cache entry is rebuilt on next use.
        self.fanout.remove(&rec.room_id);
        Ok(())
    }

    /// A subscription's (backlog, dead letters): its row, plus every node's share on a
    /// shared store.
    pub(super) fn sub_stats(&mut self, id: u128) -> Result<(u64, u64)> {
        if !self.shared {
            return Ok(self.sub_stats.get(id)?.unwrap_or_default());
        }
        // A publish batch asks for each target's counts once per event: the shares are read
        // (a range, one statement on PostgreSQL) once per batch.
        let (b, d) = match self.counts_cache.get(&id) {
            Some(c) => *c,
            None => {
                let (b, d) = counts(&self.sub_stats, &self.sub_stats_share, true, id)?;
                let c = (i128::from(b), i128::from(d));
                self.counts_cache.insert(id, c);
                c
            }
        };
        Ok((clamp(b), clamp(d)))
    }

    /// Changes a subscription's counts by `backlog` and `dead` (never below zero): on a store
    /// this broker alone writes, in its row; on a shared one, in this node's share, so that
    /// nodes counting the same subscription never write the same row.
    pub(super) fn bump_sub_stats(&mut self, id: u128, backlog: i64, dead: i64) -> Result<()> {
        self.bump_sub_stats_from(id, None, backlog, dead)
    }

    /// [`Tables::bump_sub_stats`] when the caller has just read the counts (`known`, from
    /// [`Tables::sub_stats`] in this batch): on a store this broker alone writes, the row is not
    /// read again.
    pub(super) fn bump_sub_stats_from(
        &mut self,
        id: u128,
        known: Option<(u64, u64)>,
        backlog: i64,
        dead: i64,
    ) -> Result<()> {
        if backlog == 0 && dead == 0 {
            return Ok(());
        }
        if self.shared {
            if let Some(c) = self.counts_cache.get_mut(&id) {
                c.0 += i128::from(backlog);
                c.1 += i128::from(dead);
            }
            let (b, d) = self
                .sub_stats_share
                .get((id, self.origin))?
                .unwrap_or_default();
            self.sub_stats_share.insert(
                (id, self.origin),
                (b.wrapping_add(backlog as u64), d.wrapping_add(dead as u64)),
            )
        } else {
            let (b, d) = match known {
                Some(k) => k,
                None => self.sub_stats.get(id)?.unwrap_or_default(),
            };
            self.sub_stats.insert(
                id,
                (
                    b.saturating_add_signed(backlog),
                    d.saturating_add_signed(dead),
                ),
            )
        }
    }

    /// Moves the shares of nodes no longer alive (no `node/<id>` record: closed, or silent
    /// for ten push leases) into their subscriptions' rows, at most `budget` of them, so that
    /// the shares stay one per live node (a node draws a new id each time it starts). A node
    /// that writes its share meanwhile makes this batch lose the race. Returns how many moved.
    pub(super) fn fold_shares(&mut self, now: Timestamp, budget: usize) -> Result<usize> {
        if !self.shared {
            return Ok(0);
        }
        // Reading every share is a walk over subscriptions × nodes: once a minute per node is
        // enough for rows that only need to stay few.
        let last_key = format!("fold_at/{}", Uuid::from_u128(self.origin));
        let last = self.meta.get(last_key.as_str())?.unwrap_or(0);
        if now.as_ms().saturating_sub(last) < FOLD_EVERY_MS {
            return Ok(0);
        }
        self.meta.insert(last_key.as_str(), now.as_ms())?;
        let shares: Vec<((u128, u128), (u64, u64))> = self
            .sub_stats_share
            .iter()?
            .collect::<std::result::Result<_, _>>()?;
        let mut folded = 0;
        for ((sub, node), (db, dd)) in shares {
            if folded == budget {
                break;
            }
            let alive = format!("node/{}", Uuid::from_u128(node));
            if node == self.origin
                || self
                    .records
                    .get((crate::storage::RecordKind::Setting.as_str(), alive.as_str()))?
                    .is_some()
            {
                continue;
            }
            // Wrapping, as the shares are: the row may go below zero for a while (this node
            // settled what a node that left had counted), and only the sum is a count.
            let (b, d) = self.sub_stats.get(sub)?.unwrap_or_default();
            self.sub_stats
                .insert(sub, (b.wrapping_add(db), d.wrapping_add(dd)))?;
            self.sub_stats_share.remove((sub, node))?;
            self.counts_cache.remove(&sub);
            folded += 1;
        }
        Ok(folded)
    }

    /// Removes a purged subscription's counts, every node's share included.
    pub(super) fn forget_sub_stats(&mut self, id: u128) -> Result<()> {
        self.counts_cache.remove(&id);
        self.sub_stats.remove(id)?;
        let shares: Vec<(u128, u128)> = self
            .sub_stats_share
            .range((id, 0)..=(id, u128::MAX))?
            .map(|r| r.map(|(k, _)| k))
            .collect::<std::result::Result<_, _>>()?;
        for k in shares {
            self.sub_stats_share.remove(k)?;
        }
        Ok(())
    }

    pub(super) fn subscription_out(&self, id: u128, rec: &SubRecord) -> Result<Subscription> {
        let room_retry = self.room_retry(rec.room_id, &rec.room)?;
        Ok(to_subscription(
            id,
            rec,
            &room_retry,
            counts(&self.sub_stats, &self.sub_stats_share, self.shared, id)?,
            &self.defaults,
        ))
    }

    pub(super) fn room_retry(&self, room_id: u64, room: &RoomName) -> Result<RetryOverrides> {
        match self.rooms.get(room.as_str())? {
            Some(g) => {
                let r: RoomRecord = decode(&g)?;
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
                let was_ordered = rec.ordered;
                apply_patch(&mut rec, patch)?;
                rec.updated_at = now;
                self.store_sub(id, &rec)?;
                if rec.ordered != was_ordered {
                    // The index has one shape per ordering: build it again in the new one.
                    self.rebuild_ready(id)?;
                }
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
            DeliveryOp::Lease { id, max, lease_ms } => {
                self.lease(now, id.0.as_u128(), max, lease_ms)
            }
            DeliveryOp::Settle { id, refs, action } => {
                self.settle(now, id.0.as_u128(), refs, action)
            }
            DeliveryOp::PushOutcome {
                id,
                due,
                response,
                lease,
            } => {
                if let Some((node, epoch)) = lease {
                    self.check_dispatch(id.0.as_u128(), node, epoch)?;
                }
                self.push_outcome(now, id.0.as_u128(), &due, response)
                    .map(|()| WriteOutput::Deleted)
            }
            DeliveryOp::ClaimDispatch { id, node, lease_ms } => self
                .claim_dispatch(now, id.0.as_u128(), node, lease_ms)
                .map(WriteOutput::Dispatch),
            DeliveryOp::ReleaseDispatch { ids, node } => self
                .release_dispatch(&ids, node)
                .map(|n| WriteOutput::Count { n, more: false }),
            DeliveryOp::Redrive { id, offsets, limit } => {
                self.redrive(now, id.0.as_u128(), offsets, limit)
            }
            DeliveryOp::PurgeDead { id, limit } => self.purge_dead(id.0.as_u128(), limit),
            DeliveryOp::SeekClear { id, below, limit } => {
                self.seek_clear(id.0.as_u128(), below, limit)
            }
            DeliveryOp::StopEvent { event } => self.stop_event(now, event),
            DeliveryOp::SeekDone { id } => self.seek_done(id.0.as_u128()),
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
}

/// Read side.
impl Engine {
    pub(super) fn read_sub(&self, txn: &Txn, id: u128) -> Result<SubRecord> {
        match txn.open_table(SUBSCRIPTIONS)?.get(id)? {
            Some(g) => decode(&g),
            None => Err(sub_not_found(id)),
        }
    }

    fn read_subscription(&self, txn: &Txn, id: u128) -> Result<Subscription> {
        let rec = self.read_sub(txn, id)?;
        let stats = counts(
            &txn.open_table(SUB_STATS)?,
            &txn.open_table(super::spaces::SUB_STATS_SHARE)?,
            self.shared,
            id,
        )?;
        let room_retry = match txn.open_table(ROOMS)?.get(rec.room.as_str())? {
            Some(g) => {
                let r: RoomRecord = decode(&g)?;
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
}

/// A subscription's (backlog, dead letters) from its row and, on a shared store, the nodes'
/// shares (wrapping deltas, summed, never below zero).
fn counts(
    row: &crate::storage::txn::Table<u128, (u64, u64)>,
    shares: &crate::storage::txn::Table<(u128, u128), (u64, u64)>,
    shared: bool,
    id: u128,
) -> Result<(u64, u64)> {
    let (b, d) = row.get(id)?.unwrap_or_default();
    if !shared {
        return Ok((b, d));
    }
    // On a shared store the row is a wrapping value too (see `fold_shares`).
    let (mut b, mut d) = (i128::from(b as i64), i128::from(d as i64));
    for r in shares.range((id, 0)..=(id, u128::MAX))? {
        let (_, (sb, sd)) = r?;
        b += i128::from(sb as i64);
        d += i128::from(sd as i64);
    }
    Ok((clamp(b), clamp(d)))
}

/// How often a node folds the counts shares of nodes that left.
const FOLD_EVERY_MS: u64 = 60_000;

/// A summed count as stored: never below zero.
fn clamp(n: i128) -> u64 {
    u64::try_from(n.max(0)).unwrap_or(u64::MAX)
}
