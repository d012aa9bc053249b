//! A push dispatcher's side of push leases, when several brokers share one store: before each
//! pass it makes sure this node holds the subscription's lease (claiming it, renewing it, or
//! learning who holds it and until when), and each push it starts carries the lease it started
//! under, so that its outcome is recorded only while that lease is current, and is cut short
//! when the lease stops covering it (its end less the clock-skew margin, unless renewed), so
//! that no push of this node is still in flight when another node takes the subscription over
//! and pushes the key's next events. The rules are in `ownership.rs`; on a store this broker
//! alone writes, every pass may push and nothing here reads or writes anything.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::broker::Broker;
use crate::clock::Timestamp;
use crate::error::Error;
use crate::ids::SubscriptionId;
use crate::ownership::{self, Claim, DispatchLease};
use crate::storage::{DeliveryOp, RecordKind, WriteOp, WriteOutput};

/// What the pushes under way see of the lease they started under: its epoch and the instant
/// (on the monotonic clock) it stops covering pushes; `None` once this node no longer holds it.
pub(crate) type Cover = watch::Receiver<Option<(u64, Instant)>>;

/// How the push subscriptions are shared out among the live nodes, as this node's discovery
/// round last found it (`balance`): each node aims at its fair share, the push subscriptions
/// divided by the live nodes, rounded up. A node over it hands leases back at their renewal
/// (`shed` of them), and a node at or over it lets the others claim a free lease first.
#[derive(Default)]
pub(crate) struct Balance {
    /// The fair share (0: not known yet, nothing is held back).
    fair: AtomicUsize,
    /// The leases this node held at the last round.
    held: AtomicUsize,
    /// Leases still to hand back before the next round.
    shed: AtomicUsize,
}

impl Balance {
    /// Takes one lease to hand back, if this node is over its share.
    fn take_shed(&self) -> bool {
        self.shed
            .fetch_update(AtomicOrdering::SeqCst, AtomicOrdering::SeqCst, |n| {
                n.checked_sub(1)
            })
            .is_ok()
    }

    /// Whether this node should let the other nodes claim a free lease first.
    fn at_share(&self) -> bool {
        let fair = self.fair.load(AtomicOrdering::SeqCst);
        fair > 0 && self.held.load(AtomicOrdering::SeqCst) >= fair
    }
}

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
    /// When this node, at or over its fair share, first saw the lease free and let the
    /// others claim it first (it claims a margin later if nobody did).
    deferred: Option<Timestamp>,
    /// Until when this node stays off a lease it handed over (see [`Holder::handed_over`]).
    off_until: Option<Timestamp>,
}

impl Default for Holder {
    fn default() -> Holder {
        Holder {
            held: None,
            other_until: None,
            cover: watch::Sender::new(None),
            told: None,
            deferred: None,
            off_until: None,
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
    /// This node is over its fair share: once the pushes under way (already cut) have
    /// settled, release the lease ([`Holder::release`]) for a node under its share to take.
    HandOver,
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
        let handing_over = matches!(turn, Turn::HandOver);
        if !handing_over && (lease != self.told || (lease.is_some() && ran_out)) {
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
            // Over its fair share: at renewal, hand this lease back to a node under it (at
            // once: the release's notice wakes the others), and let them claim it first.
            Some(_) if broker.inner().balance.take_shed() => {
                tracing::info!(subscription = %id, "this node is over its share of push subscriptions: handing one over");
                // Its pushes under way are cut now; the dispatcher releases the lease once
                // they have settled, then stays off it until the next round (`handed_over`).
                self.told = None;
                self.cover.send_replace(None);
                return Turn::HandOver;
            }
            Some(_) => {}
            None => {
                // A cheap read first: while another node's lease runs, no write is needed.
                match broker.inner().store.dispatch_lease(id) {
                    Ok(Some(l)) if l.node != node && ownership::free_at(&l, lease_ms) > now => {
                        let free = ownership::free_at(&l, lease_ms);
                        self.deferred = None;
                        self.other_until = Some(free);
                        return Turn::Wait(wait_until(free, now, tick));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(subscription = %id, error = %e, "cannot read the push lease");
                        return Turn::Wait(tick);
                    }
                }
                // Free. Handed over by this node: left to the others until the next round.
                if let Some(off) = self.off_until.filter(|off| now < *off) {
                    return Turn::Wait(wait_until(off, now, tick));
                }
                // A node at or over its fair share waits a margin for the others.
                if broker.inner().balance.at_share() {
                    let since = *self.deferred.get_or_insert(now);
                    let margin = ownership::margin(lease_ms);
                    if now.ms_since(since) < margin {
                        self.other_until = Some(since.plus_ms(margin));
                        return Turn::Wait(wait_until(since.plus_ms(margin), now, tick));
                    }
                }
                self.deferred = None;
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
                self.deferred = None;
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

    /// After handing the lease over to a node under its share: stays off it until the next
    /// round of sharing out (half a lease), so that the other node claims it; if none did by
    /// then, this node claims it again.
    pub(crate) fn handed_over(&mut self, broker: &Broker) {
        let lease_ms = ownership::lease_ms(broker.config().delivery.dispatch_lease_ms);
        self.deferred = None;
        self.off_until = Some(broker.now().plus_ms(lease_ms / 2));
    }

    /// Hands this node's lease back, as its dispatcher ends (the broker closing) or to a node
    /// under its fair share, so that another node takes the subscription at once; the
    /// dispatcher calls it once its own pushes are recorded. Best effort: a lease not released
    /// runs out.
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

/// The key under which each node sharing the store says it is alive (`RecordKind::Setting`).
fn alive_key(node: u128) -> String {
    format!("node/{}", format_node(node))
}

/// One round of sharing push subscriptions out, from the discovery task every half lease on a
/// shared store: says this node is alive, counts the live nodes (those that said so within two
/// leases) and the leases this node holds, and sets what [`Balance`] tells the dispatchers.
/// Nodes that have not said so for ten leases are forgotten. Best effort: a failed round
/// leaves the last one's figures.
pub(crate) async fn balance(broker: &Broker, ids: &[SubscriptionId]) {
    let inner = broker.inner();
    let node = inner.node;
    let lease_ms = ownership::lease_ms(broker.config().delivery.dispatch_lease_ms);
    let key = alive_key(node);
    let said = broker
        .record_op_quiet(move |tx, now| {
            tx.put(RecordKind::Setting, &key, &now.as_ms().to_be_bytes())?;
            Ok(Vec::new())
        })
        .await;
    if let Err(e) = said {
        tracing::debug!(error = %e, "cannot say this node is alive");
        return;
    }
    let now = broker.now();
    let store = inner.store.clone();
    let all = ids.to_vec();
    let counted = tokio::task::spawn_blocking(move || -> crate::error::Result<_> {
        let nodes = store.records(RecordKind::Setting, "node/", None, NODES_MAX)?;
        let mut held = 0usize;
        for id in &all {
            if store
                .dispatch_lease(*id)?
                .is_some_and(|l| l.node == node && l.until > now)
            {
                held += 1;
            }
        }
        Ok((nodes, held))
    })
    .await;
    let Ok(Ok((nodes, held))) = counted else {
        return;
    };
    let seen = |v: &[u8]| v.try_into().map(u64::from_be_bytes).unwrap_or(0);
    let live = nodes
        .iter()
        .filter(|(_, v)| now.as_ms().saturating_sub(seen(v)) <= 2 * lease_ms)
        .count()
        .max(1);
    let gone: Vec<String> = nodes
        .iter()
        .filter(|(_, v)| now.as_ms().saturating_sub(seen(v)) > 10 * lease_ms)
        .map(|(k, _)| k.clone())
        .collect();
    if !gone.is_empty() {
        let _ = broker
            .record_op_quiet(move |tx, _| {
                for k in &gone {
                    tx.delete(RecordKind::Setting, k)?;
                }
                Ok(Vec::new())
            })
            .await;
    }
    let fair = ids.len().div_ceil(live);
    let b = &inner.balance;
    b.fair.store(fair, AtomicOrdering::SeqCst);
    b.held.store(held, AtomicOrdering::SeqCst);
    b.shed
        .store(held.saturating_sub(fair), AtomicOrdering::SeqCst);
}

/// The most nodes one round counts.
const NODES_MAX: usize = 1_000;

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
    // No longer counted among the live nodes: the others' fair shares grow at their next
    // round, rather than after two leases.
    let key = alive_key(broker.inner().node);
    if let Err(e) = broker
        .record_op_quiet(move |tx, _| {
            tx.delete(RecordKind::Setting, &key)?;
            Ok(Vec::new())
        })
        .await
    {
        tracing::debug!(error = %e, "cannot say this node is leaving");
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
