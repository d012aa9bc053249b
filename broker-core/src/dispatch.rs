//! Push delivery: one dispatcher task per push subscription. It asks storage for due deliveries
//! (heads of their keys when ordered), runs at most `in_flight_max` HTTP calls at once on their
//! own tasks, and sends each outcome to the writer, which records it with the next batch. A slow
//! or dead endpoint therefore holds only its own subscription's slots, and no network call ever
//! happens inside a write transaction.
//!
//! Dispatchers wake when the writer reports that their queue changed, when an outcome has been
//! recorded, when the earliest retry falls due, and at least every `scheduler_tick_ms`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use crate::broker::{Broker, Inner};
use crate::error::Error;
use crate::ids::SubscriptionId;
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
    let mut busy: HashSet<u64> = HashSet::new();
    // Finished pushes report their offset once their outcome is recorded.
    let (settled_tx, mut settled_rx) = mpsc::unbounded_channel::<u64>();
    loop {
        let wait = {
            let Some(inner) = weak.upgrade() else { return };
            if inner.closing.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let broker = Broker::from_inner(inner);
            let sub = match broker.inner().store.subscription(id) {
                Ok(s) => s,
                Err(Error::SubscriptionNotFound { .. }) => return,
                Err(e) => {
                    tracing::warn!(subscription = %id, error = %e, "dispatcher cannot read its subscription");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let tick = Duration::from_millis(broker.config().delivery.scheduler_tick_ms.max(1));
            if !matches!(sub.mode, DeliveryMode::Push(_)) {
                return;
            }
            if sub.status != SubscriptionStatus::Active {
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
                dispatch_due(&broker, &sub, &mut busy, &settled_tx)
                    .unwrap_or(tick)
                    .min(tick)
            }
        };
        tokio::select! {
            _ = signals.dispatch.notified() => {}
            Some(offset) = settled_rx.recv() => {
                busy.remove(&offset);
                while let Ok(o) = settled_rx.try_recv() {
                    busy.remove(&o);
                }
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Starts every due delivery there is room for; returns how long until the next one falls due.
fn dispatch_due(
    broker: &Broker,
    sub: &Subscription,
    busy: &mut HashSet<u64>,
    settled: &mpsc::UnboundedSender<u64>,
) -> Option<Duration> {
    let free = (sub.in_flight_max as usize).saturating_sub(busy.len());
    if free == 0 {
        return None;
    }
    let now = broker.now();
    let scan_max = broker.config().delivery.scan_records_max;
    let (due, next) = match broker.inner().store.due(sub.id, now, busy, free, scan_max) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(subscription = %sub.id, error = %e, "cannot read due deliveries");
            return None;
        }
    };
    for d in due {
        busy.insert(d.offset);
        broker
            .inner()
            .pushes_in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let broker = broker.clone();
        let sub = sub.clone();
        let settled = settled.clone();
        tokio::spawn(async move {
            let offset = d.offset;
            let response = push_one(&broker, &sub, &d).await;
            let op = WriteOp::Delivery(DeliveryOp::PushOutcome {
                id: sub.id,
                offset,
                attempt: d.attempt,
                response,
            });
            if let Err(e) = broker.write_op(op).await {
                // The outcome is lost, not the delivery: it stays pending and is tried again.
                tracing::warn!(subscription = %sub.id, error = %e, "cannot record a push outcome");
            }
            broker
                .inner()
                .pushes_in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            let _ = settled.send(offset);
        });
    }
    next.map(|at| Duration::from_millis(at.ms_since(now)))
}

/// Builds and sends one signed push.
async fn push_one(broker: &Broker, sub: &Subscription, d: &DueDelivery) -> PushResponse {
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
    let secrets = broker
        .inner()
        .store
        .signing_secrets(sub.id, now)
        .unwrap_or_default();
    let signatures: Vec<String> = secrets
        .iter()
        .rev()
        .filter_map(|s| secret_key(s).ok())
        .map(|k| sign(&k, &msg_id, ts, &event.payload))
        .collect();
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
    broker.inner().transport.send(request).await
}

fn failed(why: &str) -> PushResponse {
    PushResponse {
        status: None,
        retry_after_ms: None,
        error: Some(why.to_string()),
        latency_ms: 0,
    }
}
