//! Fan-out: the delivery obligations of a new event, written in the transaction that stores it
//! (a delivery for each subscription that wants the event, or a dead letter when its queue is
//! full), and the targets of each Room, which the writer caches and drops on any subscription
//! change or failed operation.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::events::DeliveryRecordInit;
use super::queue::{DeadRecord, DeliveryRecord};
use super::Tables;
use crate::clock::Timestamp;
use crate::error::Result;
use crate::ids::EventTypeName;
use crate::subscription::SubscriptionStatus;

/// A subscription the writer fans out to, cached per Room.
#[derive(Clone)]
pub(crate) struct FanoutTarget {
    id: u128,
    event_types: Option<HashSet<EventTypeName>>,
    queue_depth_max: u64,
}

pub(super) type FanoutCache = HashMap<u64, Arc<Vec<FanoutTarget>>>;

impl<'t> Tables<'t> {
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
                published_at: d.received_at,
                schedule_from: now,
                attempts: 0,
                attempts_base: 0,
                next_attempt_at: now,
                lease_until: None,
                last_error: None,
                queueing: 0,
                lease_epoch: 0,
            };
            let counts = self.sub_stats(t.id)?;
            if counts.0 >= t.queue_depth_max {
                let dead_rec = DeadRecord {
                    delivery: rec,
                    reason: "queue_full".into(),
                    dead_at: now,
                };
                self.dead_letters
                    .insert((t.id, offset), dead_rec.encode()?.as_slice())?;
                self.bump_sub_stats_from(t.id, Some(counts), 0, 1)?;
                self.observed
                    .push(crate::storage::Observation::DeadLettered {
                        sub: t.id,
                        reason: "queue_full",
                    });
            } else {
                self.put_delivery(t.id, offset, &rec)?;
                self.bump_sub_stats_from(t.id, Some(counts), 1, 0)?;
            }
            self.touched.insert(t.id);
        }
        Ok(())
    }
}
