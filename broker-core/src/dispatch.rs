//! Push delivery: one dispatcher task per push subscription. It asks storage for due deliveries
//! (heads of their keys when ordered), runs at most `in_flight_max` HTTP calls at once on their
//! own tasks, and sends each outcome to the writer, which records it with the next batch. A
//! request's slot frees when its answer comes: while the outcome waits for the writer's next
//! commit, other deliveries are pushed (at most [`crate::push_slots::RECORDS_PER_SLOT`] ×
//! `in_flight_max` deliveries busy, pushing or waiting for their record), and the delivery
//! itself (with ordering, its key) stays busy until the record. A slow
//! or dead endpoint therefore holds only its own subscription's slots, and no network call ever
//! happens inside a write transaction.
//!
//! Within a subscription, [`crate::push_slots`] chooses what starts: deliveries whose last
//! attempt timed out, could not connect or was slow (and pushes that have been running
//! `delivery.slow_push_ms`) hold at most `delivery.slow_slots_max_percent` of the slots, so
//! keys whose receiver hangs leave the rest to the healthy keys; and slow deliveries take turns,
//! least recently tried first, so that every key is tried. To choose, the dispatcher asks
//! storage for more due deliveries than it has free slots (one more per slow delivery it
//! remembers) and starts the oldest ready ones.
//!
//! Dispatchers wake when the writer reports that their queue changed, when a push is answered
//! or its outcome recorded, when the earliest retry falls due, and at least every
//! `scheduler_tick_ms`. A wake-up makes a pass (reads the subscription and the due
//! deliveries) only when enough slots are free for it ([`PushSlots::worth_a_pass`]); the retry
//! time and the tick always do.
//!
//! An outcome is recorded before the next attempt of its delivery is made. If the writer
//! refuses the record (a failed commit, a full disk, a full queue), the push's task keeps the
//! delivery's offset busy and retries the record, not the push, with a backoff bounded by
//! `delivery.outcome_retry_ms_max`; meanwhile its dispatcher starts no new push, since that
//! push's outcome could not be recorded either. Each subscription holds back on its own, and at
//! most `RECORDS_PER_SLOT` × `in_flight_max` deliveries are busy per subscription (pushing or
//! waiting for their record).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use crate::broker::{Broker, Inner};
use crate::clock::Timestamp;
use crate::dispatch_owner::{within_cover, Cover, Holder, Turn};
use crate::error::Error;
use crate::ids::SubscriptionId;
use crate::push_slots::{PushEnd, PushSlots, SlotBounds};
use crate::storage::{DeliveryOp, DueDelivery, WriteOp};
use crate::subscription::{DeliveryMode, Subscription, SubscriptionStatus};
use crate::webhook::{secret_key, sign, PushRequest, PushResponse};

/// Wake-up signals of one subscription.
#[derive(Default)]
pub(crate) struct SubSignals {
    /// Wakes its dispatcher (a stored permit, so a wake between checks is not lost).
    pub dispatch: Notify,
    /// Wakes long-polling pullers (all of them).
    pub pull: Notify,
    /// Held by a seek while it runs, so that two seeks of one subscription never interleave
    /// their steps (which could queue an older event behind a newer one of its key).
    pub seek: tokio::sync::Mutex<()>,
    /// Set when another node released the subscription's push lease (or notices may have been
    /// missed): the dispatcher looks at the lease at its next wake-up rather than when the
    /// lease it last saw would have ended.
    pub lease_released: std::sync::atomic::AtomicBool,
}

/// The signals of every subscription that has a dispatcher or a waiting puller.
#[derive(Default)]
pub(crate) struct Signals {
    map: Mutex<HashMap<SubscriptionId, Arc<SubSignals>>>,
}

impl Signals {
    pub(crate) fn get(&self, id: SubscriptionId) -> Arc<SubSignals> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(id).or_default().clone()
    }

    /// Called by the writer after a commit.
    pub(crate) fn wake(&self, ids: &[SubscriptionId]) {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            if let Some(s) = map.get(id) {
                s.dispatch.notify_one();
                s.pull.notify_waiters();
            }
        }
    }

    pub(crate) fn wake_all(&self) {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for s in map.values() {
            s.dispatch.notify_one();
            s.pull.notify_waiters();
        }
    }

    /// What another node's commit asks (`remote_wake.rs`): wakes the subscriptions whose queues
    /// it changed, and has the dispatchers of those whose push lease it released look at the
    /// lease now.
    pub(crate) fn wake_remote(&self, wake: &crate::remote_wake::RemoteWake) {
        if wake.all_released {
            let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            for s in map.values() {
                s.lease_released.store(true, Ordering::SeqCst);
            }
        }
        if wake.all {
            self.wake_all();
        } else {
            self.wake(&wake.queues);
        }
        if wake.all_released {
            return;
        }
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for id in &wake.released {
            if let Some(s) = map.get(id) {
                s.lease_released.store(true, Ordering::SeqCst);
                s.dispatch.notify_one();
            }
        }
    }

    pub(crate) fn forget(&self, id: SubscriptionId) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Whether `id` has signals (for tests of what deleting forgets).
    #[cfg(test)]
    pub(crate) fn has(&self, id: SubscriptionId) -> bool {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&id)
    }
}

/// Starts the dispatcher of a push subscription unless one is running.
pub(crate) fn ensure_dispatcher(broker: &Broker, id: SubscriptionId) {
    let inner = broker.inner();
    {
        let mut running = inner.dispatchers.lock().unwrap_or_else(|p| p.into_inner());
        if !running.insert(id) {
            return;
        }
    }
    let signals = inner.signals.get(id);
    let weak = Arc::downgrade(inner);
    tokio::spawn(async move {
        run(weak.clone(), id, signals).await;
        if let Some(inner) = weak.upgrade() {
            inner
                .dispatchers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        }
    });
}

async fn run(weak: Weak<Inner>, id: SubscriptionId, signals: Arc<SubSignals>) {
    let mut slots = PushSlots::default();
    // Outcomes of this subscription whose record the writer refused and that are being
    // retried; while there are any, no push starts.
    let refused = Arc::new(AtomicUsize::new(0));
    // Pushes report their offset when answered (how they ended and when), and again once
    // their outcome is recorded. Bounded by the busy offsets: two messages each at most.
    let (settled_tx, mut settled_rx) = mpsc::unbounded_channel::<Settled>();
    // The bounds of this pass, also applied to the settlements it waits for.
    let mut bounds = SlotBounds::new(0, &Default::default());
    // When the last pass ends its wait (a retry falling due, or the tick).
    let mut until = tokio::time::Instant::now();
    // Set when a wake-up finds too few free slots for a pass: the next turn only waits again,
    // without reading the subscription (each push wakes its dispatcher twice, answered and
    // recorded, and each commit that touched the queue once more).
    let mut skip_pass = false;
    // This node's push lease, when several brokers share the store (`dispatch_owner.rs`).
    let mut holder = Holder::default();
    loop {
        if !std::mem::take(&mut skip_pass) {
            let wait = {
                let Some(inner) = weak.upgrade() else { return };
                let broker = Broker::from_inner(inner);
                // Closing now, or found closing by a claim that was out when it began.
                let turn = if broker.is_closing() {
                    Turn::Gone
                } else {
                    holder.turn(&broker, id).await
                };
                match turn {
                    Turn::Gone if broker.is_closing() => {
                        wind_down(
                            &broker,
                            id,
                            &mut holder,
                            &mut slots,
                            &bounds,
                            &mut settled_rx,
                        )
                        .await;
                        return;
                    }
                    Turn::Gone => return,
                    Turn::Wait(wait) => wait,
                    Turn::HandOver => {
                        settle_then_release(
                            &broker,
                            id,
                            &mut holder,
                            &mut slots,
                            &bounds,
                            &mut settled_rx,
                        )
                        .await;
                        holder.handed_over(&broker);
                        tick_of(&broker)
                    }
                    Turn::Push(lease) => {
                        let Some(wait) = pass(
                            &broker,
                            id,
                            lease.map(|l| (l, holder.cover(&broker))),
                            &mut bounds,
                            &mut slots,
                            &refused,
                            &settled_tx,
                        ) else {
                            return;
                        };
                        match holder.renew_within(&broker) {
                            Some(renew) => wait.min(renew),
                            None => wait,
                        }
                    }
                }
            };
            until = tokio::time::Instant::now() + wait;
        }
        tokio::select! {
            _ = signals.dispatch.notified() => {
                if signals.lease_released.swap(false, Ordering::SeqCst) {
                    holder.lease_may_be_free();
                }
                skip_pass = !worth_a_pass(&weak, &holder, &slots, &bounds);
            }
            Some(s) = settled_rx.recv() => {
                let mut lost = s.apply(&mut slots, &bounds);
                while let Ok(s) = settled_rx.try_recv() {
                    lost |= s.apply(&mut slots, &bounds);
                }
                if lost {
                    holder.lost();
                }
                skip_pass = !worth_a_pass(&weak, &holder, &slots, &bounds);
            }
            // The tick (or the next retry, or the end of another node's lease) always makes a
            // pass.
            _ = tokio::time::sleep_until(until) => {}
        }
    }
}

/// How a dispatcher ends when its broker closes: its pushes under way finish and are recorded
/// (bounded by the push timeout), then, on a shared store, it hands its lease back, so that
/// another node takes the subscription at once and after every outcome this node recorded.
async fn wind_down(
    broker: &Broker,
    id: SubscriptionId,
    holder: &mut Holder,
    slots: &mut PushSlots,
    bounds: &SlotBounds,
    settled_rx: &mut mpsc::UnboundedReceiver<Settled>,
) {
    settle_then_release(broker, id, holder, slots, bounds, settled_rx).await;
}

/// Waits (bounded by the push timeout) until this dispatcher's pushes under way have settled,
/// then, on a shared store, releases its lease: at shutdown, or to hand the subscription to a
/// node under its fair share.
async fn settle_then_release(
    broker: &Broker,
    id: SubscriptionId,
    holder: &mut Holder,
    slots: &mut PushSlots,
    bounds: &SlotBounds,
    settled_rx: &mut mpsc::UnboundedReceiver<Settled>,
) {
    let deadline = tokio::time::Instant::now()
        + Duration::from_millis(broker.config().delivery.push_timeout_ms + 1000);
    while slots.busy().len() > 0 {
        match tokio::time::timeout_at(deadline, settled_rx.recv()).await {
            Ok(Some(s)) => {
                s.apply(slots, bounds);
            }
            _ => break,
        }
    }
    holder.release(broker, id).await;
}

/// The dispatcher's tick.
fn tick_of(broker: &Broker) -> Duration {
    Duration::from_millis(broker.config().delivery.scheduler_tick_ms.max(1))
}

/// One pass of a dispatcher that may push (under `lease` on a shared store, with what its
/// pushes watch of it): reads the subscription and starts what is due; how long until the next
/// pass, or `None` when the dispatcher should end (its subscription is gone or no longer
/// pushes).
fn pass(
    broker: &Broker,
    id: SubscriptionId,
    lease: Option<((u128, u64), Option<Cover>)>,
    bounds: &mut SlotBounds,
    slots: &mut PushSlots,
    refused: &Arc<AtomicUsize>,
    settled_tx: &mpsc::UnboundedSender<Settled>,
) -> Option<Duration> {
    let sub = match broker.inner().store.subscription(id) {
        Ok(s) => s,
        Err(Error::SubscriptionNotFound { .. }) => return None,
        Err(e) => {
            tracing::warn!(subscription = %id, error = %e, "dispatcher cannot read its subscription");
            return Some(Duration::from_secs(1));
        }
    };
    let config = broker.config();
    let tick = Duration::from_millis(config.delivery.scheduler_tick_ms.max(1));
    *bounds = SlotBounds::new(sub.in_flight_max, &config.delivery);
    if !matches!(sub.mode, DeliveryMode::Push(_)) {
        return None;
    }
    Some(if sub.status != SubscriptionStatus::Active {
        tick
    } else if !broker.subscriber_may_receive(&sub).unwrap_or(false) {
        // Its subscriber lost the right (or it cannot be read): nothing is pushed, and
        // the subscription is paused so that operators see why.
        let b = broker.clone();
        let s = sub.clone();
        tokio::spawn(async move {
            if let Err(e) = b.check_subscriber(&s).await {
                tracing::info!(subscription = %s.id, error = %e, "push subscription paused");
            }
        });
        tick
    } else {
        let started = Started {
            lease,
            refused,
            settled: settled_tx,
        };
        dispatch_due(broker, &sub, bounds, slots, &started)
            .unwrap_or(tick)
            .min(tick)
    })
}

/// What the pushes a pass starts share: the lease they go out under, and their dispatcher's
/// channels.
struct Started<'a> {
    lease: Option<((u128, u64), Option<Cover>)>,
    refused: &'a Arc<AtomicUsize>,
    settled: &'a mpsc::UnboundedSender<Settled>,
}

/// Whether a wake-up is worth a pass (see [`PushSlots::worth_a_pass`]): never while another
/// node holds the subscription's push lease (the lease's end brings the next pass); always
/// when the broker is gone, so that the pass finds out and the dispatcher ends.
fn worth_a_pass(
    weak: &Weak<Inner>,
    holder: &Holder,
    slots: &PushSlots,
    bounds: &SlotBounds,
) -> bool {
    match weak.upgrade() {
        Some(inner) => {
            let broker = Broker::from_inner(inner);
            if broker.is_closing() {
                // The pass winds the dispatcher down.
                return true;
            }
            if holder.holding(&broker) {
                slots.worth_a_pass(bounds, broker.now())
            } else {
                // Slots do not matter before the lease is held: the pass only claims it.
                holder.may_claim(&broker)
            }
        }
        None => true,
    }
}

/// What a push task tells its dispatcher.
enum Settled {
    /// The push of `offset` was answered (or failed): its request slot is free again.
    Answered {
        offset: u64,
        end: PushEnd,
        /// When the push ended, on the broker's clock.
        at: Timestamp,
    },
    /// The outcome of `offset` is recorded (or given up at shutdown): the delivery may be
    /// attempted again.
    Recorded { offset: u64 },
    /// The outcome of `offset` was refused: another node took the subscription's push lease
    /// over (it pushes the delivery again). Frees the delivery as `Recorded` does.
    Lost { offset: u64 },
}

impl Settled {
    /// Applies the message to the slots; true when it says the push lease was lost.
    fn apply(self, slots: &mut PushSlots, bounds: &SlotBounds) -> bool {
        match self {
            Settled::Answered { offset, end, at } => slots.answered(offset, end, at, bounds),
            Settled::Recorded { offset } => slots.recorded(offset),
            Settled::Lost { offset } => {
                slots.recorded(offset);
                return true;
            }
        }
        false
    }
}

/// Starts the due deliveries there is room for, as [`PushSlots`] chooses them (oldest ready
/// first, slow deliveries within their share of the slots); returns how long until the next one
/// falls due. Starts nothing while an outcome's record is refused (`refused` > 0): the
/// dispatcher looks again when that outcome is recorded, or at its next tick.
fn dispatch_due(
    broker: &Broker,
    sub: &Subscription,
    bounds: &SlotBounds,
    slots: &mut PushSlots,
    started: &Started<'_>,
) -> Option<Duration> {
    if started.refused.load(Ordering::SeqCst) > 0 {
        return None;
    }
    let now = broker.now();
    if !slots.worth_a_pass(bounds, now) {
        return None;
    }
    let wanted = slots.wanted(bounds);
    let (due, next) = match broker.inner().store.due(sub.id, now, slots.busy(), wanted) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(subscription = %sub.id, error = %e, "cannot read due deliveries");
            return None;
        }
    };
    let pass = slots.choose(due, now, bounds);
    if pass.held_back > 0 {
        crate::telemetry::push_held_back(sub.id, pass.held_back);
        tracing::debug!(subscription = %sub.id, held_back = pass.held_back, slow_max = bounds.slow_max, "slow deliveries wait: slow pushes hold their share of the slots");
    }
    for d in pass.start {
        broker
            .inner()
            .pushes_in_flight
            .fetch_add(1, Ordering::SeqCst);
        let broker = broker.clone();
        let sub = sub.clone();
        let settled = started.settled.clone();
        let refused = started.refused.clone();
        let (lease, cover) = match &started.lease {
            Some((l, cover)) => (Some(*l), cover.clone()),
            None => (None, None),
        };
        tokio::spawn(async move {
            let pushed = match (cover, lease) {
                // Cut short when this node's lease stops covering it (dispatch_owner.rs).
                // A push cut short is not an attempt (it may not even have been sent): nothing
                // is recorded, and the delivery goes out again from whichever node holds the
                // lease next, this one included.
                (Some(cover), Some((_, epoch))) => {
                    within_cover(cover, epoch, push_one(&broker, &sub, &d))
                        .await
                        .flatten()
                }
                _ => push_one(&broker, &sub, &d).await,
            };
            let Some(response) = pushed else {
                // Not sent (the broker is closing), or cut short. Nothing is recorded (it was
                // not an attempt): the delivery goes out again from the next owner, or after
                // the next open.
                broker
                    .inner()
                    .pushes_in_flight
                    .fetch_sub(1, Ordering::SeqCst);
                let _ = settled.send(Settled::Recorded { offset: d.offset });
                return;
            };
            let end = PushEnd::of(&response, broker.config().delivery.slow_push_ms);
            let at = broker.now();
            let _ = settled.send(Settled::Answered {
                offset: d.offset,
                end,
                at,
            });
            let lost = record_outcome(broker, sub.id, &d, response, lease, &refused).await;
            // Only now may the delivery be attempted again.
            let _ = settled.send(if lost {
                Settled::Lost { offset: d.offset }
            } else {
                Settled::Recorded { offset: d.offset }
            });
        });
    }
    next.map(|at| Duration::from_millis(at.ms_since(now)))
}

/// The first wait before trying again to record a refused outcome; it doubles up to
/// `delivery.outcome_retry_ms_max`.
const OUTCOME_RETRY_FIRST_MS: u64 = 100;

/// Races lost to other nodes' commits that an outcome's record tries again at once, before
/// it is handled like any other refusal (with a backoff).
const RACES_RETRIED_AT_ONCE: u32 = 8;

/// Records the outcome of a push that `dispatch_due` counted in `pushes_in_flight`. While the
/// writer refuses the record, it is retried with a bounded backoff (at least the delay an
/// `Overloaded` answer suggests), never the push; the task holds only a weak reference to the
/// broker while it waits. It gives up only when the broker shuts down or is dropped: the
/// outcome is then lost, not the delivery, which is pushed again after the next open, as after
/// a crash. A push waiting for its record no longer counts as in flight, so that `close` does
/// not wait for a writer that refuses.
async fn record_outcome(
    broker: Broker,
    sub: SubscriptionId,
    d: &DueDelivery,
    response: PushResponse,
    lease: Option<(u128, u64)>,
    refused: &AtomicUsize,
) -> bool {
    let weak = Arc::downgrade(broker.inner());
    let mut current = Some(broker);
    let mut tries = 0u32;
    let mut wait_ms = 0u64;
    let mut holding_back = false;
    let mut races = 0u32;
    let stop_counting = |b: &Broker| {
        b.inner().pushes_in_flight.fetch_sub(1, Ordering::SeqCst);
    };
    loop {
        let Some(broker) = current
            .take()
            .or_else(|| weak.upgrade().map(Broker::from_inner))
        else {
            break;
        };
        tries += 1;
        let op = WriteOp::Delivery(DeliveryOp::PushOutcome {
            id: sub,
            due: d.clone(),
            response: response.clone(),
            lease,
        });
        let error = match broker.write_op(op).await {
            // Another node took the subscription over: it pushes the delivery again, and this
            // outcome is not recorded (ownership.rs).
            Err(Error::DispatchLeaseLost { .. }) => {
                tracing::info!(subscription = %sub, offset = d.offset, "push outcome not recorded: another node now pushes this subscription");
                if !holding_back {
                    stop_counting(&broker);
                } else {
                    refused.fetch_sub(1, Ordering::SeqCst);
                }
                return true;
            }
            Ok(_) => {
                if !holding_back {
                    stop_counting(&broker);
                } else if refused.fetch_sub(1, Ordering::SeqCst) == 1 {
                    tracing::info!(subscription = %sub, tries, "push outcome recorded after the writer refused it; pushes resume");
                }
                return false;
            }
            // A race lost to another node's commit (a publish counting the same backlog): the
            // store is fine, so the record is tried again at once, a few times, rather than
            // after a backoff that would hold the subscription's pushes back.
            Err(Error::StorageConflict { .. }) if races < RACES_RETRIED_AT_ONCE => {
                races += 1;
                current = Some(broker);
                continue;
            }
            Err(e) => e,
        };
        let closing = broker.inner().closing.load(Ordering::SeqCst);
        if closing || matches!(error, Error::ShuttingDown) {
            tracing::warn!(subscription = %sub, offset = d.offset, error = %error, "push outcome not recorded: the broker is shutting down; the delivery is pushed again after the next open");
            if !holding_back {
                stop_counting(&broker);
            }
            break;
        }
        if !holding_back {
            holding_back = true;
            stop_counting(&broker);
            // Said once per subscription and episode; each further refusal is a debug line.
            if refused.fetch_add(1, Ordering::SeqCst) == 0 {
                tracing::warn!(subscription = %sub, error = %error, "cannot record a push outcome; retrying the record, not the push, and holding this subscription's pushes until it is recorded");
            }
        } else {
            tracing::debug!(subscription = %sub, offset = d.offset, tries, error = %error, "push outcome still not recorded");
        }
        let max = broker.config().delivery.outcome_retry_ms_max.max(1);
        let suggested = match error {
            Error::Overloaded { retry_after_ms } => retry_after_ms,
            _ => 0,
        };
        wait_ms = wait_ms
            .saturating_mul(2)
            .max(OUTCOME_RETRY_FIRST_MS)
            .max(suggested)
            .min(max);
        drop(broker);
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    }
    if holding_back {
        refused.fetch_sub(1, Ordering::SeqCst);
    }
    false
}

/// Builds and sends one signed push.
/// `None` when it was not sent because the broker is closing (not an attempt: nothing to
/// record).
async fn push_one(broker: &Broker, sub: &Subscription, d: &DueDelivery) -> Option<PushResponse> {
    let DeliveryMode::Push(endpoint) = &sub.mode else {
        return failed("not a push subscription");
    };
    // Checked again right before sending: the right may have been taken away since this push
    // was scheduled (the dispatcher then pauses the subscription).
    if !broker.subscriber_may_receive(sub).unwrap_or(false) {
        return failed("not sent: the subscriber no longer has the right to receive it");
    }
    let event = match broker.event(d.event_id) {
        Ok(e) => e,
        Err(e) => return failed(&format!("event unavailable: {e}")),
    };
    let now = broker.now();
    let ts = now.as_ms() / 1000;
    let msg_id = event.id.to_string();
    // Never sent unsigned: without a signature the receiver cannot tell the push from a
    // forgery, so a push whose secrets cannot be read (or that has none usable) is an ordinary
    // failed attempt, retried per the policy.
    let secrets = match broker.inner().store.signing_secrets(sub.id, now) {
        Ok(s) => s,
        Err(e) => return failed(&format!("not sent: cannot read the signing secrets: {e}")),
    };
    let signatures: Vec<String> = secrets
        .iter()
        .rev()
        .filter_map(|s| secret_key(s).ok())
        .map(|k| sign(&k, &msg_id, ts, &event.payload))
        .collect();
    if signatures.is_empty() {
        return failed("not sent: the subscription has no valid signing secret");
    }
    let mut headers = vec![
        ("content-type".to_string(), "application/json".to_string()),
        ("webhook-id".to_string(), msg_id.clone()),
        ("webhook-timestamp".to_string(), ts.to_string()),
        ("webhook-signature".to_string(), signatures.join(" ")),
        ("postroom-event-id".to_string(), msg_id),
        ("postroom-room".to_string(), event.room.to_string()),
        (
            "postroom-event-type".to_string(),
            event.event_type.to_string(),
        ),
        ("postroom-key".to_string(), event.key.to_string()),
        (
            "postroom-sequence".to_string(),
            event.sequence.0.to_string(),
        ),
        ("postroom-attempt".to_string(), d.attempt.to_string()),
        (
            "postroom-published-at".to_string(),
            d.published_at.to_rfc3339(),
        ),
        ("postroom-subscription".to_string(), sub.id.to_string()),
    ];
    headers.extend(endpoint.headers.iter().cloned());
    let request = PushRequest {
        url: endpoint.url.clone(),
        headers,
        basic_auth: endpoint.basic_auth.clone(),
        body: event.payload,
    };
    // A place among the pushes in flight to the receiving host, across subscriptions, held
    // until the answer. Waiting for it is bounded by the push timeout; a push that gets no
    // place in time, or gets it while the broker shuts down, is not sent.
    let timeout = Duration::from_millis(broker.config().delivery.push_timeout_ms.max(1));
    let _place = match crate::host_limits::host_of(&endpoint.url) {
        Some(host) => {
            match tokio::time::timeout(timeout, broker.inner().push_hosts.acquire(&host)).await {
                Ok(place) => Some(place),
                Err(_) => {
                    return failed(&format!(
                        "not sent: {} pushes to {host} were in flight for the whole push timeout",
                        crate::webhook::IDLE_CONNECTIONS_PER_HOST
                    ))
                }
            }
        }
        None => None,
    };
    if broker.inner().closing.load(Ordering::SeqCst) {
        return None;
    }
    Some(broker.inner().transport.send(request).await)
}

fn failed(why: &str) -> Option<PushResponse> {
    Some(PushResponse {
        status: None,
        retry_after_ms: None,
        error: Some(why.to_string()),
        latency_ms: 0,
    })
}

#[cfg(test)]
#[path = "dispatch_tests.rs"]
mod tests;
