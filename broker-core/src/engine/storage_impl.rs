//! The engine's side of the `Storage` trait, the seam between the engine and the rest of the
//! core: `apply` (one batch of operations in one transaction, each under its own savepoint,
//! committed durably or, for leases and pullers' settles alone, volatile), `sync`, `recover`,
//! and the reads, whose bodies
//! are in the read files. Split from `mod.rs`, which keeps opening the engine and the tables.

use uuid::Uuid;

use super::*;

impl Storage for Engine {
    fn shared(&self) -> bool {
        self.shared
    }

    fn origin(&self) -> u128 {
        self.origin
    }

    fn take_notices(&self) -> Option<tokio::sync::mpsc::Receiver<String>> {
        self.kv.take_notices()
    }

    fn apply(&self, now: Timestamp, ops: Vec<WriteOp>) -> Result<Applied> {
        let mut seqs = self.seqs.lock().unwrap_or_else(|p| p.into_inner());
        let mut fanout = self.fanout.lock().unwrap_or_else(|p| p.into_inner());
        let mut unsynced = self
            .unsynced_heads
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let defaults = self.delivery_defaults();
        // The first batch of volatile operations (leases, settles) stores the epoch its leases
        // carry, durably, so that no lease of a later boot has that epoch.
        let store_epoch = self
            .epoch_unstored
            .load(std::sync::atomic::Ordering::Acquire)
            && ops.iter().any(WriteOp::volatile);
        // A commit of leases and settles alone need not wait for the disk (issue 15, item 7):
        // after a crash their messages are offered again, as when a lease runs out.
        let mut volatile = defaults.volatile_commits
            && ops.iter().all(WriteOp::volatile)
            && !store_epoch
            && self.volatile_run.load(std::sync::atomic::Ordering::Relaxed) < VOLATILE_RUN_MAX;
        let outcome = (|| {
            let txn = Txn::new(self.kv.snapshot()?);
            let mut results = Vec::with_capacity(ops.len());
            let touched;
            let released;
            let observed;
            let heads_moved;
            let stored_epoch;
            {
                let mut epoch = self.epoch.load(std::sync::atomic::Ordering::Acquire);
                if self.shared {
                    // Another process may have changed a Room's subscriptions.
                    fanout.clear();
                }
                let mut tables =
                    Tables::open(&txn, &mut seqs, &mut fanout, &unsynced, defaults, epoch)?;
                tables.shared = self.shared;
                tables.origin = self.origin;
                if store_epoch {
                    // A fenced increment: another broker sharing the store may have stored
                    // this epoch (or a later one) since this one opened; then this boot leases
                    // under the next one, so that no two boots share an epoch.
                    let stored = tables.meta.get("epoch")?.unwrap_or(0);
                    if stored >= epoch {
                        epoch = stored.saturating_add(1);
                        tables.epoch = epoch;
                    }
                    tables.meta.insert("epoch", epoch)?;
                }
                stored_epoch = epoch;
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
                        tables.counts_cache.clear();
                    }
                    results.push(result);
                }
                #[cfg(test)]
                if CHECK_READY_INDEX.load(std::sync::atomic::Ordering::Relaxed) {
                    tables.check_ready_index()?;
                }
                if !self.shared
                    && (tables.seqs.events_since_checkpoint >= SEQ_CHECKPOINT_EVENTS
                        || tables.seqs.last.len() >= SEQ_CACHE_KEYS_MAX)
                {
                    tables.checkpoint_seqs()?;
                }
                touched = std::mem::take(&mut tables.touched);
                released = std::mem::take(&mut tables.released);
                observed = std::mem::take(&mut tables.observed);
                heads_moved = std::mem::take(&mut tables.heads_moved);
                volatile &= !tables.needs_durable;
            }
            let mut batch = txn.take_batch();
            batch.volatile = volatile;
            if self.shared {
                txn.fence(&mut batch)?;
                // The other nodes wake the same subscriptions once this commits.
                let queues: Vec<u128> = touched.iter().copied().collect();
                batch.notify = crate::remote_wake::encode(self.origin, &queues, &released);
            }
            // The snapshot goes before the commit (an in-memory backend then need not copy).
            drop(txn);
            let empty = batch.is_empty();
            self.kv.commit(batch)?;
            if store_epoch {
                self.epoch
                    .store(stored_epoch, std::sync::atomic::Ordering::Release);
                self.epoch_unstored
                    .store(false, std::sync::atomic::Ordering::Release);
            }
            if !empty {
                let run = if volatile {
                    unsynced.extend(heads_moved);
                    self.volatile_run.load(std::sync::atomic::Ordering::Relaxed) + 1
                } else {
                    unsynced.clear();
                    0
                };
                self.volatile_run
                    .store(run, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(Applied {
                unsynced: self.volatile_run.load(std::sync::atomic::Ordering::Relaxed) > 0,
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

    fn sync(&self) -> Result<()> {
        let mut unsynced = self
            .unsynced_heads
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.volatile_run.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            return Ok(());
        }
        self.kv.sync()?;
        self.volatile_run
            .store(0, std::sync::atomic::Ordering::Relaxed);
        unsynced.clear();
        Ok(())
    }

    fn recover(&self) -> Result<()> {
        let mut seqs = self.seqs.lock().unwrap_or_else(|p| p.into_inner());
        self.fanout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.kv.recover()?;
        // What was volatile is lost or kept; either way no head waits on it any more.
        self.unsynced_heads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.volatile_run
            .store(0, std::sync::atomic::Ordering::Relaxed);
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

    fn dispatch_lease(
        &self,
        id: crate::ids::SubscriptionId,
    ) -> Result<Option<crate::ownership::DispatchLease>> {
        self.blocking(|| self.dispatch_lease_read(id))
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
