//! A push dispatcher's side of push leases, when several brokers share one store: before each
//! pass it makes sure this node holds the subscription's lease (claiming it, renewing it, or
//! learning who holds it and until when), and each push it starts carries the lease it started
//! under, so that its outcome is recorded only while that lease is current, and is cut short
//! when the lease stops covering it (its end less the clock-skew margin, unless renewed), so
//! that no push of this node is still in flight when another node takes the subscription over
//! and pushes the key's next events. The rules are in `ownership.rs`; on a store this broker
//! alone writes, every pass may push and nothing here reads or writes anything.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::broker::Broker;
use crate::clock::Timestamp;
use crate::error::Error;
use crate::ids::SubscriptionId;
use crate::ownership::{self, Claim, DispatchLease};
use crate::storage::{DeliveryOp, WriteOp, WriteOutput};

/// What the pushes under way see of the lease they started under: its epoch and the instant
/// (on the monotonic clock) it stops covering pushes; `None` once this node no longer holds it.
pub(crate) type Cover = watch::Receiver<Option<(u64, Instant)>>;

/// What a dispatcher knows of its subscription's push lease.
pub(crate) struct Holder {
    /// The lease this node holds, as last granted.
    held: Option<DispatchLease>,
    /// When the lease another node holds ends, as last seen.
    other_until: Option<Timestamp>,
    /// What the pushes under way are told of `held` (see [`Cover`]).
    cover: watch::Sender<Option<(u64, Instant)>>,
    /// The lease (epoch, end) `cover` was last computed from.
    told: Option<(u64, Timestamp)>,
}

impl Default for Holder {
    fn default() -> Holder {
        Holder {
            held: None,
            other_until: None,
            cover: watch::Sender::new(None),
            told: None,
        }
    }
}

/// What the dispatcher may do now.
pub(crate) enum Turn {
    /// Push, under this lease (`None` on a store this broker alone writes).
    Push(Option<(u128, u64)>),
    /// Not now: another node holds the lease, or it cannot be claimed; look again after this.
    Wait(Duration),
    /// The subscription is gone: the dispatcher ends.
    Gone,
}

impl Holder {
    /// Whether this node held the lease at the last look, or needs none (wake-ups of a
    /// dispatcher that does not hold it need no pass: the lease's end, or the tick, brings the
    /// next one).
    pub(crate) fn holding(&self, broker: &Broker) -> bool {
        !broker.inner().store.shared() || self.held.is_some()
    }

    /// For a dispatcher that does not hold the lease: whether a wake-up should look at it now
    /// (the lease this node last saw has ended, or was released, or was never seen).
    pub(crate) fn may_claim(&self, broker: &Broker) -> bool {
        self.other_until.is_none_or(|u| broker.now() >= u)
    }

    /// Another node released the lease (or notices may have been missed): the next wake-up
    /// looks at it rather than waiting for the end this node last saw.
    pub(crate) fn lease_may_be_free(&mut self) {
        self.other_until = None;
    }

    /// The longest a dispatcher holding the lease may wait before its next pass, so that the
    /// pass renews it in time whatever the tick.
    pub(crate) fn renew_within(&self, broker: &Broker) -> Option<Duration> {
        let lease_ms = ownership::lease_ms(broker.config().delivery.dispatch_lease_ms);
        self.held.map(|_| Duration::from_millis(lease_ms / 3))
    }

    /// An outcome was refused because another node took the lease over: stop pushing now
    /// rather than at the next renewal, and cut the pushes still under way.
    pub(crate) fn lost(&mut self) {
        self.held = None;
        self.told = None;
        self.cover.send_replace(None);
    }

    /// What the pushes a pass starts watch, on a shared store (`None`: a store this broker
    /// alone writes, where nothing cuts a push short).
    pub(crate) fn cover(&self, broker: &Broker) -> Option<Cover> {
        broker
            .inner()
            .store
            .shared()
            .then(|| self.cover.subscribe())
    }

    /// Decides this pass: on a shared store, renews the lease when due (or claims it when it
    /// ran out or was released), and says how long to wait when another node holds it. The
    /// pushes under way learn the outcome: covered for longer after a renewal, cut short once
    /// the lease is no longer this node's.
    pub(crate) async fn turn(&mut self, broker: &Broker, id: SubscriptionId) -> Turn {
        if !broker.inner().store.shared() {
            return Turn::Push(None);
        }
        let turn = self.decide(broker, id).await;
        // Told only when the lease changed (renewed, lost, another epoch), not at every pass,
        // or when the cover ran out on the monotonic clock while the broker's clock (which
        // lease arithmetic follows) says the lease still runs: it fell behind, or stepped
        // back. Recomputed from the broker's clock then, so that a pass that may push never
        // starts pushes that are cut at once (and started again, in a loop).
        let lease = self.held.map(|h| (h.epoch, h.until));
        let ran_out = matches!(*self.cover.borrow(), Some((_, until)) if until <= Instant::now());
        if lease != self.told || (lease.is_some() && ran_out) {
            self.told = lease;
            let lease_ms = ownership::lease_ms(broker.config().delivery.dispatch_lease_ms);
            let now = broker.now();
            let cover = self.held.map(|h| {
                let left = ownership::covered_until(&h, lease_ms).ms_since(now);
                (h.epoch, Instant::now() + Duration::from_millis(left))
            });
            self.cover.send_replace(cover);
        }
        turn
    }

    async fn decide(&mut self, broker: &Broker, id: SubscriptionId) -> Turn {
        let config = broker.config();
        let lease_ms = ownership::lease_ms(config.delivery.dispatch_lease_ms);
        let tick = Duration::from_millis(config.delivery.scheduler_tick_ms.max(1));
        let node = broker.inner().node;
        let now = broker.now();
        match self.held {
            Some(h) if !ownership::renew_due(&h, now, lease_ms) => {
                return self.push_under(h, now, lease_ms)
            }
            Some(_) => {}
            None => {
                // A cheap read first: while another node's lease runs, no write is needed.
                match broker.inner().store.dispatch_lease(id) {
                    Ok(Some(l)) if l.node != node && ownership::free_at(&l, lease_ms) > now => {
                        let free = ownership::free_at(&l, lease_ms);
                        self.other_until = Some(free);
                        return Turn::Wait(wait_until(free, now, tick));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(subscription = %id, error = %e, "cannot read the push lease");
                        return Turn::Wait(tick);
                    }
                }
            }
        }
        // A race lost to another node's commit (the claim rides in this node's group commit,
        // which may lose as a whole) is tried again at once, a few times, so that a busy
        // database does not let a held lease run out.
        let mut claimed = Err(Error::ShuttingDown);
        for _ in 0..CLAIM_RACES_RETRIED {
            let op = WriteOp::Delivery(DeliveryOp::ClaimDispatch { id, node, lease_ms });
            claimed = broker.write_op(op).await;
            if !matches!(claimed, Err(Error::StorageConflict { .. })) || broker.is_closing() {
                break;
            }
        }
        if broker.is_closing() {
            // The broker began closing while the claim was out: whatever it got is handed
            // back, after it (a release applied before the claim would otherwise be undone).
            if let Ok(WriteOutput::Dispatch(Claim::Granted(l))) = claimed {
                self.held = Some(l);
            }
            return Turn::Gone;
        }
        let now = broker.now();
        match claimed {
            Ok(WriteOutput::Dispatch(Claim::Granted(l))) => {
                if self.held.is_none_or(|h| h.epoch != l.epoch) {
                    tracing::info!(subscription = %id, node = %format_node(node), epoch = l.epoch, "this node now pushes the subscription");
                }
                self.held = Some(l);
                self.other_until = None;
                self.push_under(l, now, lease_ms)
            }
            Ok(WriteOutput::Dispatch(Claim::HeldBy(l))) => {
                if self.held.take().is_some() {
                    tracing::warn!(subscription = %id, holder = %format_node(l.node), epoch = l.epoch, "another node took over the subscription's pushes");
                }
                let free = ownership::free_at(&l, lease_ms);
                self.other_until = Some(free);
                Turn::Wait(wait_until(free, now, tick))
            }
            Ok(_) => Turn::Wait(tick),
            Err(e) => {
                // A lost race, a storage failure: keep pushing while the lease still runs
                // (outcomes are checked against it anyway), else wait for the next look.
                tracing::debug!(subscription = %id, error = %e, "cannot claim the push lease");
                match self.held {
                    Some(h) if ownership::may_push(&h, now, lease_ms) => {
                        Turn::Push(Some((h.node, h.epoch)))
                    }
                    _ if matches!(e, Error::SubscriptionNotFound { .. }) => Turn::Gone,
                    _ => {
                        self.held = None;
                        Turn::Wait(tick)
                    }
                }
            }
        }
    }

    /// Pushes under `held` while enough of it is left; otherwise looks again soon (the next
    /// pass renews it).
    fn push_under(&self, held: DispatchLease, now: Timestamp, lease_ms: u64) -> Turn {
        if ownership::may_push(&held, now, lease_ms) {
            Turn::Push(Some((held.node, held.epoch)))
        } else {
            Turn::Wait(Duration::from_millis(10))
        }
    }

    /// Hands this node's lease back as its dispatcher ends (the broker closing), so that
    /// another node takes the subscription at once; the dispatcher calls it once its own
    /// pushes are recorded. Best effort: a lease not released runs out.
    pub(crate) async fn release(&mut self, broker: &Broker, id: SubscriptionId) {
        self.told = None;
        self.cover.send_replace(None);
        if self.held.take().is_none() {
            return;
        }
        let op = WriteOp::Delivery(DeliveryOp::ReleaseDispatch {
            ids: vec![id],
            node: broker.inner().node,
        });
        if let Err(e) = broker.write_op(op).await {
            tracing::debug!(subscription = %id, error = %e, "push lease not released; it runs out instead");
        }
    }
}

/// Runs one push under the lease `epoch` while that lease covers it: `None` when it was cut
/// short, because this node no longer holds the lease or its cover ran out before the answer
/// (the request is dropped, closing its connection). A renewal meanwhile extends the cover.
pub(crate) async fn within_cover<F: Future>(
    mut cover: Cover,
    epoch: u64,
    push: F,
) -> Option<F::Output> {
    tokio::pin!(push);
    loop {
        let until = match *cover.borrow_and_update() {
            Some((e, until)) if e == epoch && until > Instant::now() => until,
            _ => return None,
        };
        tokio::select! {
            out = &mut push => return Some(out),
            // Renewed, lost or released: looked at again.
            changed = cover.changed() => {
                if changed.is_err() {
                    // The dispatcher is gone (the broker closed or was dropped): the push
                    // runs within the cover it had.
                    return tokio::time::timeout_at(until, push).await.ok();
                }
            }
            _ = tokio::time::sleep_until(until) => {}
        }
    }
}

/// How long to wait before looking at another node's lease again: until it may be claimed,
/// but at most one tick, so that a lease released when no notice could tell (a node whose
/// listening connection was down) is taken within a tick (one read of the lease per tick and
/// subscription on each node that does not hold it; nothing is written).
fn wait_until(free: Timestamp, now: Timestamp, tick: Duration) -> Duration {
    Duration::from_millis(free.ms_since(now).max(1)).min(tick)
}

/// A node id as logs show it.
pub(crate) fn format_node(node: u128) -> String {
    uuid::Uuid::from_u128(node).to_string()
}

/// Hands over, at shutdown, the push leases this node holds, so that other nodes take its
/// subscriptions at once rather than when the leases run out. Best effort: a lease not
/// released simply runs out.
pub(crate) async fn release_all(broker: &Broker) {
    if !broker.inner().store.shared() {
        return;
    }
    // Every push subscription, not only those with a dispatcher now: dispatchers end as the
    // broker closes. Releasing touches only the leases this node holds.
    let ids = match broker.inner().store.push_subscriptions() {
        Ok(ids) => ids,
        Err(e) => {
            tracing::warn!(error = %e, "push leases not released at shutdown; they run out instead");
            return;
        }
    };
    let node = broker.inner().node;
    for chunk in ids.chunks(RELEASE_CHUNK) {
        // A lost race with another node is tried again; any other refusal leaves these leases
        // to run out.
        for _ in 0..RELEASE_TRIES {
            let op = WriteOp::Delivery(DeliveryOp::ReleaseDispatch {
                ids: chunk.to_vec(),
                node,
            });
            match broker.write_op(op).await {
                Ok(_) => break,
                Err(Error::StorageConflict { .. }) => continue,
                Err(Error::ShuttingDown) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "push leases not released at shutdown; they run out instead");
                    break;
                }
            }
        }
    }
}

/// Tries of one claim (or renewal) that loses races with other nodes' commits.
const CLAIM_RACES_RETRIED: usize = 8;

/// Tries of one release that loses races with other nodes.
const RELEASE_TRIES: usize = 5;

/// Subscriptions whose leases one release operation ends.
const RELEASE_CHUNK: usize = 256;
