//! The reference model of the simulation: what the simulated world did (which publishes were
//! acknowledged, what each receiver answered, what each puller did) and therefore what every
//! subscription still owes, has delivered or has dead-lettered. It is kept small and written
//! from the documented rules, not from the engine's code: per subscription a map from event to
//! its state, a retry policy without jitter (so that its schedule is one line of arithmetic),
//! and the eligibility rules a dispatcher or a puller may rely on. The checks (`check.rs`)
//! compare the engine with it after every step.
//!
//! The one thing the rules leave open is *when* the engine notices that a lease ran out (the
//! next pull that looks at it does). Its consequence is fixed (the attempt failed at the lease's
//! deadline), so the model keeps an expired lease until the engine shows that it noticed (by
//! handing the message out again, dead-lettering it, or no longer calling it leased) and meanwhile
//! treats it as what it will become.

use std::collections::{BTreeMap, BTreeSet};

use crate::clock::Timestamp;
use crate::ids::{EventId, SubscriptionId};
use crate::subscription::SubscriptionStatus;

use super::backend::RETRY_AFTER_MS_MAX;

/// An event, by its place in commit order (so, within a Room, in log order).
pub(super) type Ev = usize;
/// A subscription, by creation order.
pub(super) type Sub = usize;

/// A Room of the simulation.
#[derive(Clone, Debug)]
pub(super) struct MRoom {
    pub ordered: bool,
    /// Its retention bound on age, if any (events older than this, not owed, may be removed).
    pub age_ms_max: Option<u64>,
    /// Per key, the last sequence acknowledged.
    pub last_seq: BTreeMap<usize, u64>,
}

/// An acknowledged event.
#[derive(Clone, Debug)]
pub(super) struct MEvent {
    pub id: EventId,
    pub room: usize,
    pub ty: usize,
    pub key: usize,
    pub seq: u64,
    /// The engine's position of the event in its Room's log (what seeks and acks name).
    pub pos: u64,
    pub at: Timestamp,
    /// Removed by retention.
    pub gone: bool,
}

/// A retry policy without jitter.
#[derive(Clone, Debug)]
pub(super) struct Policy {
    pub initial_ms: u64,
    pub doubling: bool,
    pub delay_max_ms: u64,
    pub attempts_max: u32,
    pub ttl_ms: u64,
}

/// What becomes of a delivery after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fate {
    Retry(Timestamp),
    Dead(&'static str),
}

impl Policy {
    /// After `n` attempts of the current schedule (started at `start`), the last of which failed
    /// at `at`: retry after the backoff (never sooner than the receiver's Retry-After, itself
    /// capped), unless the attempts are used up or the retry would start after the time to live.
    pub(super) fn fate(
        &self,
        n: u32,
        start: Timestamp,
        at: Timestamp,
        retry_after: Option<u64>,
    ) -> Fate {
        if n >= self.attempts_max {
            return Fate::Dead("attempts_exhausted");
        }
        let factor = if self.doubling {
            1u64 << n.saturating_sub(1).min(40)
        } else {
            1
        };
        let backoff = self
            .initial_ms
            .saturating_mul(factor)
            .min(self.delay_max_ms);
        let asked = retry_after.map_or(0, |r| r.min(RETRY_AFTER_MS_MAX));
        let next = at.plus_ms(backoff.max(asked));
        if next.ms_since(start) > self.ttl_ms {
            Fate::Dead("ttl_expired")
        } else {
            Fate::Retry(next)
        }
    }
}

/// A subscription.
#[derive(Clone, Debug)]
pub(super) struct MSub {
    pub id: SubscriptionId,
    pub room: usize,
    pub push: bool,
    pub ordered: bool,
    /// Event types it takes; `None` for all.
    pub types: Option<BTreeSet<usize>>,
    pub policy: Policy,
    pub in_flight_max: u32,
    pub queue_depth_max: u64,
    pub status: SubscriptionStatus,
    /// Between a seek's first committed step and its last (or a crash).
    pub seeking: bool,
    /// Moves on whenever a seek or a redrive queues events again: per-key order is judged
    /// between two such moments (see the module doc of `sim`).
    pub epoch: u32,
    pub dels: BTreeMap<Ev, MDel>,
}

/// One event's delivery to one subscription, over its whole life.
#[derive(Clone, Debug)]
pub(super) struct MDel {
    pub state: DState,
    /// The highest attempt number in the attempt log.
    pub last_no: u32,
    /// The highest attempt number handed out since the engine was last opened (a push in flight
    /// is not logged, so after a crash its number may be handed out again).
    pub handed: u32,
    /// Moves on each time the delivery is queued again (seek, redrive): an attempt belongs to
    /// the generation it was handed out in.
    pub gen: u32,
    /// The attempt log as it must be: attempt number to what that attempt came to.
    pub rows: BTreeMap<u32, Row>,
}

/// Where a delivery stands.
#[derive(Clone, Debug)]
pub(super) enum DState {
    Owed(Owed),
    Delivered,
    Dead(&'static str),
    /// Dropped from the queue by a seek past it: no longer owed.
    Skipped,
}

/// A delivery still owed.
#[derive(Clone, Debug)]
pub(super) struct Owed {
    /// When its current schedule started (publish, seek or redrive).
    pub start: Timestamp,
    /// Attempts made in the current schedule.
    pub in_sched: u32,
    /// Not to be attempted before this (ignored while a lease is out).
    pub next_due: Timestamp,
    pub lease: Option<Lease>,
}

/// The last lease handed out on a delivery, until it is settled or known to have run out.
#[derive(Clone, Copy, Debug)]
pub(super) struct Lease {
    pub attempt: u32,
    pub until: Timestamp,
}

/// What one logged attempt must say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Row {
    Pushed { status: Option<u16> },
    Leased(LeaseRow),
    Stopped,
}

/// What became of a lease, as its attempt row must show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LeaseRow {
    /// Still out, or ran out without the engine having noticed yet (or ever, when the delivery
    /// was stopped or seeked past meanwhile).
    Open,
    Expired,
    Acked,
    Nacked,
    Terminated,
}

/// Whether a delivery can be handed out at a given time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Avail {
    Held,
    Due,
    NotDue(Timestamp),
    /// Its lease ran out and the failure dead-letters it once noticed.
    Doomed,
}

impl Owed {
    pub(super) fn fresh(now: Timestamp) -> Owed {
        Owed {
            start: now,
            in_sched: 0,
            next_due: now,
            lease: None,
        }
    }

    /// The fate of its lease, failed at its deadline.
    pub(super) fn lease_fate(&self, policy: &Policy) -> Option<Fate> {
        self.lease
            .map(|l| policy.fate(self.in_sched, self.start, l.until, None))
    }

    pub(super) fn avail(&self, policy: &Policy, t: Timestamp) -> Avail {
        match self.lease {
            Some(l) if l.until > t => Avail::Held,
            Some(_) => match self.lease_fate(policy) {
                Some(Fate::Retry(at)) if at <= t => Avail::Due,
                Some(Fate::Retry(at)) => Avail::NotDue(at),
                _ => Avail::Doomed,
            },
            None if self.next_due <= t => Avail::Due,
            None => Avail::NotDue(self.next_due),
        }
    }
}

impl MDel {
    pub(super) fn new() -> MDel {
        MDel {
            state: DState::Skipped,
            last_no: 0,
            handed: 0,
            gen: 0,
            rows: BTreeMap::new(),
        }
    }

    pub(super) fn owed(&self) -> Option<&Owed> {
        match &self.state {
            DState::Owed(o) => Some(o),
            _ => None,
        }
    }

    pub(super) fn owed_mut(&mut self) -> Option<&mut Owed> {
        match &mut self.state {
            DState::Owed(o) => Some(o),
            _ => None,
        }
    }

    /// Queued again with a fresh schedule (seek, redrive); attempt numbers carry on.
    pub(super) fn requeue(&mut self, now: Timestamp) {
        self.gen += 1;
        self.state = DState::Owed(Owed::fresh(now));
    }

    /// Records a failed attempt's consequence.
    pub(super) fn apply_fate(&mut self, fate: Fate) {
        match fate {
            Fate::Retry(at) => {
                if let Some(o) = self.owed_mut() {
                    o.lease = None;
                    o.next_due = at;
                }
            }
            Fate::Dead(reason) => self.state = DState::Dead(reason),
        }
    }
}

/// The whole model.
#[derive(Clone, Debug, Default)]
pub(super) struct Model {
    pub rooms: Vec<MRoom>,
    pub events: Vec<MEvent>,
    pub subs: Vec<MSub>,
    /// Leases the engine was seen to notice running out (for the statistics).
    pub expired: u64,
}

impl Model {
    /// The events a Room still holds, in log order.
    pub(super) fn room_events(&self, room: usize) -> impl Iterator<Item = (Ev, &MEvent)> {
        self.events
            .iter()
            .enumerate()
            .filter(move |(_, e)| e.room == room && !e.gone)
    }

    /// Retention removed an event: allowed only past its Room's age bound and when no
    /// subscription owes it (pending, in flight or dead-lettered). Its deliveries' records go
    /// with it.
    pub(super) fn retire(&mut self, ev: Ev, now: Timestamp) -> Result<(), String> {
        let e = &self.events[ev];
        let old = self.rooms[e.room]
            .age_ms_max
            .is_some_and(|a| now.ms_since(e.at) > a);
        if !old {
            return Err(format!(
                "retention removed e{ev}, received {} ms ago, within its Room's bound {:?}",
                now.ms_since(e.at),
                self.rooms[e.room].age_ms_max
            ));
        }
        for (s, sub) in self.subs.iter().enumerate() {
            if let Some(d) = sub.dels.get(&ev) {
                if matches!(d.state, DState::Owed(_) | DState::Dead(_)) {
                    return Err(format!(
                        "retention removed e{ev}, which s{s} still owes: {:?}",
                        d.state
                    ));
                }
            }
        }
        self.events[ev].gone = true;
        for sub in &mut self.subs {
            sub.dels.remove(&ev);
        }
        Ok(())
    }

    pub(super) fn takes(&self, s: Sub, ev: Ev) -> bool {
        let sub = &self.subs[s];
        let e = &self.events[ev];
        e.room == sub.room && sub.types.as_ref().is_none_or(|t| t.contains(&e.ty))
    }

    pub(super) fn owed_count(&self, s: Sub) -> u64 {
        self.subs[s]
            .dels
            .values()
            .filter(|d| d.owed().is_some())
            .count() as u64
    }

    pub(super) fn dead_count(&self, s: Sub) -> u64 {
        self.subs[s]
            .dels
            .values()
            .filter(|d| matches!(d.state, DState::Dead(_)))
            .count() as u64
    }

    /// An acknowledged event: numbered after the last of its key, then fanned out to every
    /// active or paused subscription that takes it (to its dead letters, `queue_full`, when its
    /// backlog is at its bound).
    pub(super) fn publish(&mut self, e: MEvent, now: Timestamp) -> Result<(), String> {
        let last = self.rooms[e.room].last_seq.entry(e.key).or_insert(0);
        if e.seq != *last + 1 {
            return Err(format!(
                "event {} of key k{} got sequence {}, but the key's last acknowledged sequence is {}",
                e.id, e.key, e.seq, last
            ));
        }
        *last = e.seq;
        let ev = self.events.len();
        self.events.push(e);
        for s in 0..self.subs.len() {
            let sub = &self.subs[s];
            if !self.takes(s, ev)
                || !matches!(
                    sub.status,
                    SubscriptionStatus::Active | SubscriptionStatus::Paused
                )
            {
                continue;
            }
            let full = self.owed_count(s) >= sub.queue_depth_max;
            let mut d = MDel::new();
            d.state = if full {
                DState::Dead("queue_full")
            } else {
                DState::Owed(Owed::fresh(now))
            };
            self.subs[s].dels.insert(ev, d);
        }
        Ok(())
    }

    /// The owed deliveries of `s` in log order.
    pub(super) fn owed(&self, s: Sub) -> impl Iterator<Item = (Ev, &Owed)> {
        self.subs[s]
            .dels
            .iter()
            .filter_map(|(ev, d)| d.owed().map(|o| (*ev, o)))
    }

    /// The first owed delivery of each key: the only one an ordered subscription may hand out.
    pub(super) fn heads(&self, s: Sub) -> BTreeSet<Ev> {
        let mut seen = BTreeSet::new();
        self.owed(s)
            .filter(|(ev, _)| seen.insert(self.events[*ev].key))
            .map(|(ev, _)| ev)
            .collect()
    }

    /// What a push dispatcher may start at `t`, with `busy` the events whose push is under way.
    /// Nothing while paused, disabled or seeking. With ordering: only a key's head, and not while
    /// any owed event of the key is being pushed.
    pub(super) fn push_eligible(&self, s: Sub, t: Timestamp, busy: &BTreeSet<Ev>) -> Vec<Ev> {
        let sub = &self.subs[s];
        if sub.status != SubscriptionStatus::Active || sub.seeking {
            return Vec::new();
        }
        // A push under way holds its key until it ends, whatever became of its delivery
        // meanwhile (stopped, dead-lettered, seeked past, its event removed by retention): the
        // dispatcher tells the engine the keys of its pushes.
        let blocked: BTreeSet<usize> = busy.iter().map(|ev| self.events[*ev].key).collect();
        let heads = self.heads(s);
        self.owed(s)
            .filter(|(ev, o)| {
                !busy.contains(ev)
                    && o.avail(&sub.policy, t) == Avail::Due
                    && (!sub.ordered
                        || (heads.contains(ev) && !blocked.contains(&self.events[*ev].key)))
            })
            .map(|(ev, _)| ev)
            .collect()
    }

    /// What a pull may lease at `t`. Nothing while paused, disabled or seeking. With ordering:
    /// only a key's head, and not while any event of the key is leased.
    pub(super) fn lease_eligible(&self, s: Sub, t: Timestamp) -> Vec<Ev> {
        let sub = &self.subs[s];
        if sub.status != SubscriptionStatus::Active || sub.seeking {
            return Vec::new();
        }
        let held: BTreeSet<usize> = self
            .owed(s)
            .filter(|(_, o)| o.avail(&sub.policy, t) == Avail::Held)
            .map(|(ev, _)| self.events[ev].key)
            .collect();
        let heads = self.heads(s);
        self.owed(s)
            .filter(|(ev, o)| {
                o.avail(&sub.policy, t) == Avail::Due
                    && (!sub.ordered
                        || (heads.contains(ev) && !held.contains(&self.events[*ev].key)))
            })
            .map(|(ev, _)| ev)
            .collect()
    }

    /// The earliest time after `now` at which `eligible` finds something, with no write in
    /// between: every candidate instant (a lease running out, a retry falling due) is tried.
    pub(super) fn earliest(
        &self,
        s: Sub,
        now: Timestamp,
        eligible: impl Fn(Timestamp) -> bool,
    ) -> Option<Timestamp> {
        let policy = &self.subs[s].policy;
        let mut times = BTreeSet::new();
        for (_, o) in self.owed(s) {
            times.insert(o.next_due);
            if let Some(l) = o.lease {
                times.insert(l.until);
            }
            if let Some(Fate::Retry(at)) = o.lease_fate(policy) {
                times.insert(at);
            }
        }
        times
            .into_iter()
            .filter(|t| *t > now)
            .find(|t| eligible(*t))
    }

    /// The engine was dropped and opened again: pushes under way are forgotten (their numbers
    /// may be handed out again) and seeks under way end.
    pub(super) fn crash(&mut self) {
        for sub in &mut self.subs {
            sub.seeking = false;
            for d in sub.dels.values_mut() {
                d.handed = d.last_no;
            }
        }
    }
}
