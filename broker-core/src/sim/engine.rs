//! The simulation's only contact with the engine: the [`Storage`] interface, driven the way
//! `writer.rs`, `dispatch.rs`, `delivery_api.rs` and `seek.rs` drive it, but from one thread,
//! with the simulated clock, and without the writer, tokio or HTTP in between. When that
//! interface changes, this file (and `backend.rs`) is what follows it.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::clock::Timestamp;
use crate::error::Result;
use crate::ids::{EventId, EventTypeName, OrderingKey, Principal, RoomName, SubscriptionId};
use crate::model::{Event, EventTypeSpec, NewRoom};
use crate::storage::{
    AckAction, DeliveryOp, DueDelivery, PreparedEvent, PublishTarget, RoomQuota, Storage,
    StorageFaults, WriteOp, WriteOutput,
};
use crate::subscription::{
    Attempt, DeadLetter, EventDelivery, NewSubscription, Subscription, SubscriptionStatus,
};
use crate::webhook::PushResponse;

use super::backend::Opened;

/// Passed wherever the interface still takes a scan window: large enough never to bind.
pub(super) const SCAN_MAX: usize = 1 << 20;
/// Page size when listing dead letters and attempts (small, so that paging is exercised).
const PAGE: usize = 64;

/// One write, in the simulation's terms.
#[derive(Debug)]
pub(super) enum Op {
    CreateRoom {
        room: RoomName,
        ordered: bool,
        age_ms_max: Option<u64>,
    },
    PutType {
        room: RoomName,
        name: EventTypeName,
    },
    CreateSub {
        room: RoomName,
        id: SubscriptionId,
        new: Box<NewSubscription>,
    },
    Publish {
        room: RoomName,
        /// (type, where it stands now, key, id, payload)
        events: Vec<(EventTypeName, PublishTarget, OrderingKey, EventId, Vec<u8>)>,
    },
    PushOutcome {
        sub: SubscriptionId,
        due: crate::storage::DueDelivery,
        response: PushResponse,
    },
    Lease {
        sub: SubscriptionId,
        max: usize,
        lease_ms: u64,
    },
    Settle {
        sub: SubscriptionId,
        refs: Vec<(u64, u32)>,
        action: AckAction,
    },
    SetStatus {
        sub: SubscriptionId,
        to: SubscriptionStatus,
    },
    SeekClear {
        sub: SubscriptionId,
        below: u64,
        limit: usize,
    },
    SeekEnqueue {
        sub: SubscriptionId,
        from: u64,
        to: u64,
        limit: usize,
    },
    SeekDone {
        sub: SubscriptionId,
    },
    Redrive {
        sub: SubscriptionId,
        offsets: Option<Vec<u64>>,
        limit: usize,
    },
    Stop {
        event: EventId,
    },
    /// A retention sweep of at most `delete_max` records.
    Sweep {
        delete_max: usize,
    },
}

/// The statuses a pause and a resume start from, as `delivery_api.rs` has them.
fn status_from(to: SubscriptionStatus) -> &'static [SubscriptionStatus] {
    match to {
        SubscriptionStatus::Paused => &[SubscriptionStatus::Active],
        _ => &[SubscriptionStatus::Paused, SubscriptionStatus::Disabled],
    }
}

impl Op {
    fn into_write(self) -> WriteOp {
        let d = WriteOp::Delivery;
        match self {
            Op::CreateRoom {
                room,
                ordered,
                age_ms_max,
            } => {
                let admin = Principal::new("sim").expect("principal");
                let mut new = NewRoom::new(room, admin).approved();
                new.ordered = ordered;
                new.retention.age_ms_max = age_ms_max;
                WriteOp::CreateRoom {
                    room: new,
                    quota: RoomQuota {
                        rooms_max: 100,
                        pending_max: 10,
                        pending_per_owner_max: 10,
                    },
                }
            }
            Op::PutType { room, name } => WriteOp::PutEventType {
                room,
                spec: EventTypeSpec {
                    name,
                    description: String::new(),
                    schema: serde_json::json!({"type": "object"}),
                    key_pointer: None,
                },
                types_max: 100,
                versions_max: 10,
                create_only: true,
            },
            Op::CreateSub { room, id, new } => {
                let push = matches!(new.mode, crate::subscription::DeliveryMode::Push(_));
                d(DeliveryOp::Create {
                    room,
                    id,
                    new: *new,
                    secret: push.then(crate::webhook::new_secret),
                })
            }
            Op::Publish { room, events } => WriteOp::Publish(
                events
                    .into_iter()
                    .map(
                        |(event_type, target, key, event_id, payload)| PreparedEvent {
                            room: room.clone(),
                            room_id: target.room_id,
                            event_type,
                            version: target.version,
                            key,
                            payload,
                            publisher: Principal::new("sim").expect("principal"),
                            event_id,
                            id_from_publisher: false,
                            idempotency: None,
                        },
                    )
                    .collect(),
            ),
            Op::PushOutcome { sub, due, response } => d(DeliveryOp::PushOutcome {
                id: sub,
                due,
                response,
                lease: None,
            }),
            Op::Lease { sub, max, lease_ms } => d(DeliveryOp::Lease {
                id: sub,
                max,
                lease_ms,
            }),
            // The model settles whichever lease is current: its crashes lose no lease, so the
            // lease an ack names is the one granted (epochs are tested in `volatile_tests`).
            Op::Settle { sub, refs, action } => d(DeliveryOp::Settle {
                id: sub,
                refs: refs
                    .into_iter()
                    .map(|(offset, attempt)| crate::storage::LeaseRef {
                        offset,
                        attempt,
                        epoch: None,
                    })
                    .collect(),
                action,
            }),
            Op::SetStatus { sub, to } => d(DeliveryOp::SetStatus {
                id: sub,
                to,
                reason: None,
                from: status_from(to),
            }),
            Op::SeekClear { sub, below, limit } => d(DeliveryOp::SeekClear {
                id: sub,
                below,
                limit,
            }),
            Op::SeekEnqueue {
                sub,
                from,
                to,
                limit,
            } => d(DeliveryOp::SeekEnqueue {
                id: sub,
                from,
                to,
                limit,
            }),
            Op::SeekDone { sub } => d(DeliveryOp::SeekDone { id: sub }),
            Op::Redrive {
                sub,
                offsets,
                limit,
            } => d(DeliveryOp::Redrive {
                id: sub,
                offsets,
                limit,
            }),
            Op::Stop { event } => d(DeliveryOp::StopEvent { event }),
            Op::Sweep { delete_max } => WriteOp::Sweep { delete_max },
        }
    }
}

/// What a commit did.
pub(super) struct Applied {
    pub results: Vec<Result<WriteOutput>>,
    pub touched: BTreeSet<SubscriptionId>,
}

/// The engine as the simulation sees it.
pub(super) struct Engine {
    store: Arc<dyn Storage>,
    faults: Arc<StorageFaults>,
}

impl Engine {
    pub(super) fn new(opened: Opened) -> Engine {
        Engine {
            store: opened.store,
            faults: opened.faults,
        }
    }

    pub(super) fn faults(&self) -> &StorageFaults {
        &self.faults
    }

    /// Applies `ops` in one commit: each op's result, and the subscriptions whose dispatchers
    /// and pullers the writer would wake. The outer error means nothing was committed.
    pub(super) fn apply(&self, now: Timestamp, ops: Vec<Op>) -> Result<Applied> {
        let ops = ops.into_iter().map(Op::into_write).collect();
        let applied = self.store.apply(now, ops)?;
        Ok(Applied {
            results: applied.results,
            touched: applied.touched.into_iter().collect(),
        })
    }

    pub(super) fn publish_target(
        &self,
        room: &RoomName,
        ty: &EventTypeName,
    ) -> Result<PublishTarget> {
        self.store.publish_target(room, ty)
    }

    pub(super) fn event(&self, id: EventId) -> Result<Option<Event>> {
        self.store.event(id)
    }

    pub(super) fn event_offset(&self, id: EventId) -> Result<Option<u64>> {
        self.store.event_offset(id)
    }

    pub(super) fn event_deliveries(
        &self,
        id: EventId,
        now: Timestamp,
    ) -> Result<Vec<EventDelivery>> {
        self.store.event_deliveries(id, now)
    }

    /// A subscription's undelivered copy of an event: its attempt count and whether it is
    /// leased now; `None` when it is not queued.
    pub(super) fn queued(
        &self,
        id: SubscriptionId,
        pos: u64,
        event: EventId,
        now: Timestamp,
    ) -> Result<Option<(u32, bool)>> {
        self.store.queued(id, pos, event, now)
    }

    pub(super) fn subscription(&self, id: SubscriptionId) -> Result<Subscription> {
        self.store.subscription(id)
    }

    pub(super) fn queue_health(
        &self,
        id: SubscriptionId,
        now: Timestamp,
    ) -> Result<crate::storage::QueueHealth> {
        self.store.queue_health(id, now, SCAN_MAX)
    }

    pub(super) fn deliveries_total(&self) -> Result<u64> {
        self.store.deliveries_total()
    }

    pub(super) fn seek_offsets(
        &self,
        room: &RoomName,
        at: Option<Timestamp>,
    ) -> Result<(u64, u64)> {
        self.store.seek_offsets(room, at)
    }

    /// What a push dispatcher would start: due deliveries not in `busy`, at most `limit`, and
    /// the earliest later due time seen.
    pub(super) fn due(
        &self,
        id: SubscriptionId,
        now: Timestamp,
        busy: &crate::storage::Busy,
        limit: usize,
    ) -> Result<(Vec<DueDelivery>, Option<Timestamp>)> {
        self.store.due(id, now, busy, limit)
    }

    /// Every dead letter of a subscription, by log position, read page by page.
    pub(super) fn dead_letters(&self, id: SubscriptionId) -> Result<Vec<(u64, DeadLetter)>> {
        let mut out: Vec<(u64, DeadLetter)> = Vec::new();
        loop {
            let after = out.last().map(|(o, _)| *o);
            let (page, more) = self.store.dead_letters(id, after, PAGE)?;
            let empty = page.is_empty();
            out.extend(page);
            if !more || empty {
                return Ok(out);
            }
        }
    }

    /// A subscription's whole attempt log, read page by page.
    pub(super) fn attempts(&self, id: SubscriptionId) -> Result<Vec<((u64, u32), Attempt)>> {
        let mut out: Vec<((u64, u32), Attempt)> = Vec::new();
        loop {
            let after = out.last().map(|(k, _)| *k);
            let (page, more) = self.store.attempts(id, after, PAGE)?;
            let empty = page.is_empty();
            out.extend(page);
            if !more || empty {
                return Ok(out);
            }
        }
    }
}
