//! What each committed operation does to the reference model, one function per operation, each
//! a direct reading of the documented behaviour (ARCHITECTURE.md, the `Broker` delivery API):
//! a push outcome or a settle applies only to the attempt it answers; a failure retries per the
//! policy or dead-letters with its reason; a seek drops what is queued below the Room's end and
//! queues again, with a fresh schedule, every event from its point on; a redrive queues dead
//! letters again; stopping an event dead-letters every undelivered copy. Attempt numbers carry on
//! through all of it. Only committed operations reach these functions.

use crate::clock::Timestamp;
use crate::storage::AckAction;
use crate::subscription::SubscriptionStatus;

use super::model::{DState, Ev, Fate, Lease, LeaseRow, MDel, Model, Row, Sub};

impl Model {
    /// A push's outcome was recorded. It counts only for the generation of the delivery it was
    /// handed out for (an outcome arriving after the delivery was stopped, seeked past or queued
    /// again answers an attempt that is no longer current). Returns whether it counted. One that
    /// does not count is still logged under its number when that number is above every number
    /// logged for the delivery (the push happened; its number is not to be used again), unless
    /// retention removed the event meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn push_outcome(
        &mut self,
        s: Sub,
        ev: Ev,
        gen: u32,
        attempt: u32,
        status: Option<u16>,
        retry_after: Option<u64>,
        now: Timestamp,
    ) -> bool {
        let gone = self.events[ev].gone;
        let sub = &mut self.subs[s];
        let Some(d) = sub.dels.get_mut(&ev) else {
            return false;
        };
        if d.gen != gen || d.owed().is_none() {
            if attempt > d.last_no && !gone {
                d.last_no = attempt;
                d.rows.insert(attempt, Row::Pushed { status });
            }
            return false;
        }
        let Some(o) = d.owed_mut() else {
            return false;
        };
        o.in_sched += 1;
        let fate = sub.policy.fate(
            o.in_sched,
            o.start,
            now,
            retry_after.filter(|_| matches!(status, Some(429 | 503))),
        );
        d.last_no = d.last_no.max(attempt);
        d.rows.insert(attempt, Row::Pushed { status });
        match status {
            Some(200..=299) => d.state = DState::Delivered,
            // The receiver unsubscribed: the subscription stops and keeps its backlog; the
            // delivery stays due, to go out again when the subscription is resumed.
            Some(410) => sub.status = SubscriptionStatus::Disabled,
            _ => d.apply_fate(fate),
        }
        true
    }

    /// A lease was handed out (the checks have found it allowed). A lease handed out before on
    /// the same delivery has run out, and the engine now knows it.
    pub(super) fn lease_granted(&mut self, s: Sub, ev: Ev, attempt: u32, until: Timestamp) {
        let sub = &mut self.subs[s];
        let Some(d) = sub.dels.get_mut(&ev) else {
            return;
        };
        if let Some(old) = d.owed().and_then(|o| o.lease) {
            d.rows.insert(old.attempt, Row::Leased(LeaseRow::Expired));
            self.expired += 1;
        }
        if let Some(o) = d.owed_mut() {
            o.lease = Some(Lease { attempt, until });
            o.in_sched += 1;
        }
        d.last_no = attempt;
        d.handed = attempt;
        d.rows.insert(attempt, Row::Leased(LeaseRow::Open));
    }

    /// The engine shows that it noticed a lease run out: the attempt failed at its deadline.
    pub(super) fn lease_noticed(&mut self, s: Sub, ev: Ev) {
        let sub = &mut self.subs[s];
        let Some(d) = sub.dels.get_mut(&ev) else {
            return;
        };
        let Some(o) = d.owed() else {
            return;
        };
        let (Some(lease), Some(fate)) = (o.lease, o.lease_fate(&sub.policy)) else {
            return;
        };
        d.rows.insert(lease.attempt, Row::Leased(LeaseRow::Expired));
        d.apply_fate(fate);
    }

    /// Whether a settle naming `attempt` of `ev` must be accepted at `now`: only the current
    /// lease, while it runs.
    pub(super) fn lease_held(&self, s: Sub, ev: Ev, attempt: u32, now: Timestamp) -> bool {
        self.subs[s]
            .dels
            .get(&ev)
            .and_then(MDel::owed)
            .and_then(|o| o.lease)
            .is_some_and(|l| l.attempt == attempt && l.until > now)
    }

    /// An accepted settle of the current lease of `ev`.
    pub(super) fn settle(&mut self, s: Sub, ev: Ev, action: AckAction, now: Timestamp) {
        let sub = &mut self.subs[s];
        let Some(d) = sub.dels.get_mut(&ev) else {
            return;
        };
        let Some(o) = d.owed_mut() else {
            return;
        };
        let Some(lease) = o.lease else {
            return;
        };
        let row = |r| Row::Leased(r);
        match action {
            AckAction::Ack => {
                d.rows.insert(lease.attempt, row(LeaseRow::Acked));
                d.state = DState::Delivered;
            }
            AckAction::Nack { delay_ms: None } => {
                let fate = sub.policy.fate(o.in_sched, o.start, now, None);
                d.rows.insert(lease.attempt, row(LeaseRow::Nacked));
                d.apply_fate(fate);
            }
            // An explicit delay replaces the backoff; the attempts bound still holds.
            AckAction::Nack { delay_ms: Some(ms) } => {
                let fate = if o.in_sched >= sub.policy.attempts_max {
                    Fate::Dead("attempts_exhausted")
                } else {
                    Fate::Retry(now.plus_ms(ms))
                };
                d.rows.insert(lease.attempt, row(LeaseRow::Nacked));
                d.apply_fate(fate);
            }
            AckAction::Extend { lease_ms } => {
                o.lease = Some(Lease {
                    until: now.plus_ms(lease_ms),
                    ..lease
                });
            }
            AckAction::Term => {
                d.rows.insert(lease.attempt, row(LeaseRow::Terminated));
                d.state = DState::Dead("terminated");
            }
        }
    }

    /// A seek's clearing step: the subscription holds its deliveries from now until the seek
    /// ends; up to `limit` owed deliveries below `below` leave the queue. Returns (how many,
    /// whether there may be more).
    pub(super) fn seek_clear(&mut self, s: Sub, below: u64, limit: usize) -> (u64, bool) {
        let evs: Vec<Ev> = self
            .owed(s)
            .map(|(ev, _)| ev)
            .filter(|ev| self.events[*ev].pos < below)
            .take(limit)
            .collect();
        let sub = &mut self.subs[s];
        sub.seeking = true;
        for ev in &evs {
            if let Some(d) = sub.dels.get_mut(ev) {
                d.state = DState::Skipped;
            }
        }
        (evs.len() as u64, evs.len() == limit)
    }

    /// A seek's queueing step over the Room's log from `from` up to `to`, at most `limit` log
    /// entries: every event the subscription takes that it does not owe now is owed again with
    /// a fresh schedule (a dead letter of it is dropped). Returns (how many, where to go on).
    pub(super) fn seek_enqueue(
        &mut self,
        s: Sub,
        from: u64,
        to: u64,
        limit: usize,
        now: Timestamp,
    ) -> (u64, Option<u64>) {
        let room = self.subs[s].room;
        let entries: Vec<Ev> = self
            .room_events(room)
            .filter(|(_, e)| e.pos >= from && e.pos < to)
            .map(|(ev, _)| ev)
            .take(limit)
            .collect();
        let mut n = 0;
        for &ev in &entries {
            if !self.takes(s, ev) {
                continue;
            }
            let d = self.subs[s].dels.entry(ev).or_insert_with(MDel::new);
            if d.owed().is_none() {
                d.requeue(now);
                n += 1;
            }
        }
        if n > 0 {
            self.subs[s].epoch += 1;
        }
        let next = match entries.last() {
            Some(last) if entries.len() == limit => Some(self.events[*last].pos + 1),
            _ => None,
        };
        (n, next)
    }

    /// The end of a seek: the subscription hands out messages again.
    pub(super) fn seek_done(&mut self, s: Sub) {
        self.subs[s].seeking = false;
    }

    /// Dead letters queued again with a fresh schedule: the chosen events, or the oldest
    /// `limit`. Returns (how many, whether there may be more).
    pub(super) fn redrive(
        &mut self,
        s: Sub,
        which: Option<&[Ev]>,
        limit: usize,
        now: Timestamp,
    ) -> (u64, bool) {
        let sub = &mut self.subs[s];
        let chosen: Vec<Ev> = match which {
            Some(evs) => evs.iter().copied().take(limit).collect(),
            None => sub
                .dels
                .iter()
                .filter(|(_, d)| matches!(d.state, DState::Dead(_)))
                .map(|(ev, _)| *ev)
                .take(limit)
                .collect(),
        };
        let mut n = 0;
        for ev in &chosen {
            if let Some(d) = sub.dels.get_mut(ev) {
                if matches!(d.state, DState::Dead(_)) {
                    d.requeue(now);
                    n += 1;
                }
            }
        }
        if n > 0 {
            sub.epoch += 1;
        }
        (n, chosen.len() == limit)
    }

    /// Stopping an event: every subscription's undelivered copy goes to its dead letters
    /// (`stopped`), the stop logged as an attempt of its own. Returns how many.
    pub(super) fn stop(&mut self, ev: Ev) -> u64 {
        let mut n = 0;
        for sub in &mut self.subs {
            let Some(d) = sub.dels.get_mut(&ev) else {
                continue;
            };
            if d.owed().is_some() {
                d.last_no += 1;
                d.rows.insert(d.last_no, Row::Stopped);
                d.state = DState::Dead("stopped");
                n += 1;
            }
        }
        n
    }

    /// A status change, allowed from the statuses in `from` (or to the status it has).
    pub(super) fn set_status(
        &mut self,
        s: Sub,
        to: SubscriptionStatus,
        from: &[SubscriptionStatus],
    ) -> bool {
        let sub = &mut self.subs[s];
        if sub.status == to || from.contains(&sub.status) {
            sub.status = to;
            true
        } else {
            false
        }
    }
}
