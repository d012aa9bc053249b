//! Which due deliveries a push dispatcher starts, and in what order: the fairness policy of a
//! push subscription's `in_flight_max` slots (issue 15, item 6). Plain code over plain data: the
//! dispatcher feeds it what storage says is due, when pushes start and how they end, and it
//! answers which deliveries to start now.
//!
//! - **Slow deliveries hold a capped share of the slots.** A delivery is *slow* when its last
//!   attempt failed without an HTTP answer (a timeout, a failed connection) or with one that
//!   took at least `delivery.slow_push_ms`; a push under way also counts as slow once it has
//!   run that long (on the broker's clock). Slow deliveries start only while fewer than
//!   `delivery.slow_slots_max_percent` of `in_flight_max` slots (at least one) are held by slow
//!   pushes, so a receiver that hangs on some keys leaves the other slots to the healthy keys of
//!   the same subscription. A slow delivery that waits for that reason is counted once per wait
//!   in `postroom_push_held_back_total`. A delivery not known to be slow is never held back, so
//!   a delivery that starts hanging holds one slot for up to `push_timeout_ms` before it is
//!   known.
//! - **Slow deliveries take turns.** A slow delivery is ready since it last failed, any other
//!   since it was published; due deliveries start oldest ready first (ties in log order). So a
//!   slow key that just timed out goes behind the keys that were waiting, the slow keys get the
//!   slow share least recently tried first, and none waits while others are tried again and
//!   again (a retry delay shorter than the push timeout made the oldest hanging keys due again
//!   every time a slot freed, ahead of every other key). Storage answers in log order, so the
//!   dispatcher asks it for one more due delivery per slow delivery remembered, which is enough
//!   to see every delivery that should start before the others.
//!
//! What this remembers is per delivery (per offset), in memory, for the slow deliveries only
//! (a delivery that is delivered, or fails quickly, is forgotten), and for at most
//! `delivery.scan_records_max` of them per subscription (the least recently failed are
//! forgotten first, and a forgotten delivery is treated as not slow). With ordering, a key has
//! one delivery under way at a time, so a mark on its head is a mark on the key; after a slow
//! head is dead-lettered, the key's next event starts as not slow.

use std::collections::HashMap;

use crate::clock::Timestamp;
use crate::config::DeliveryConfig;
use crate::storage::{Busy, DueDelivery};
use crate::webhook::PushResponse;

/// Deliveries that may be busy (pushing, or answered and waiting for their outcome's record),
/// per `in_flight_max` slot. A request slot frees when its answer comes, not when the answer
/// is recorded: the record shares the writer's next commit with others while other keys are
/// pushed (with ordering, the delivery's key stays held until the record). Bounded, so that a
/// writer slower than the receiver holds the dispatcher back instead of queueing without end.
pub(crate) const RECORDS_PER_SLOT: usize = 4;

/// The bounds one scheduling pass works within, from the subscription and the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SlotBounds {
    /// The subscription's `in_flight_max`.
    pub in_flight_max: usize,
    /// Most slots slow pushes may hold before no further slow delivery starts.
    pub slow_max: usize,
    /// How long a push runs (or ran, for a failed one) before it counts as slow, in ms.
    pub slow_push_ms: u64,
    /// Most slow deliveries remembered.
    pub marks_max: usize,
}

impl SlotBounds {
    /// The bounds of a subscription with `in_flight_max` slots under `config`.
    pub(crate) fn new(in_flight_max: u32, config: &DeliveryConfig) -> SlotBounds {
        let n = in_flight_max as usize;
        let percent = config.slow_slots_max_percent.min(100) as usize;
        SlotBounds {
            in_flight_max: n,
            slow_max: (n.saturating_mul(percent) / 100).max(1),
            slow_push_ms: config.slow_push_ms,
            marks_max: config.scan_records_max.max(1),
        }
    }
}

/// How a push ended, as far as scheduling cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PushEnd {
    /// A 2xx answer: the delivery is done.
    Delivered,
    /// Any other end; `slow` when no answer came (a timeout, a failed connection, a push not
    /// sent) or the answer took at least `slow_push_ms`.
    Failed {
        /// Whether the delivery now counts as slow.
        slow: bool,
    },
}

impl PushEnd {
    /// How `response` ended, with `slow_push_ms` as the bound of a slow answer.
    pub(crate) fn of(response: &PushResponse, slow_push_ms: u64) -> PushEnd {
        match response.status {
            Some(s) if (200..300).contains(&s) => PushEnd::Delivered,
            Some(_) => PushEnd::Failed {
                slow: response.latency_ms >= slow_push_ms,
            },
            None => PushEnd::Failed { slow: true },
        }
    }
}

/// A push under way.
#[derive(Clone, Copy, Debug)]
struct Running {
    started_at: Timestamp,
    /// Started as a slow delivery.
    slow: bool,
}

/// A slow delivery: its last attempt here failed slowly.
#[derive(Clone, Copy, Debug)]
struct Mark {
    failed_at: Timestamp,
    /// Slow failures counted by this dispatcher when it failed: orders failures at the same
    /// time.
    nth: u64,
    /// Held back by the cap since its last start (so that a wait is counted once).
    held: bool,
}

/// What one scheduling pass decided.
#[derive(Debug, Default)]
pub(crate) struct Pass {
    /// The deliveries to push now, now counted as under way.
    pub start: Vec<DueDelivery>,
    /// Slow deliveries that began waiting for a slot in this pass because slow pushes hold
    /// their share.
    pub held_back: usize,
}

/// One push subscription's slots: the pushes under way and the slow deliveries.
#[derive(Debug, Default)]
pub(crate) struct PushSlots {
    /// Offsets under way (pushing, or recording their outcome), with their keys; the keys of
    /// `running`.
    busy: Busy,
    running: HashMap<u64, Running>,
    marks: HashMap<u64, Mark>,
    failures: u64,
}

impl PushSlots {
    /// The offsets under way, which storage must skip (and, with ordering, their keys).
    pub(crate) fn busy(&self) -> &Busy {
        &self.busy
    }

    /// Slots free now: fewer than `in_flight_max` requests are out, and fewer than
    /// [`RECORDS_PER_SLOT`] × `in_flight_max` deliveries are busy (pushing, or answered and
    /// waiting for their record: each push under way will wait for one).
    pub(crate) fn free(&self, bounds: &SlotBounds) -> usize {
        let requests = bounds.in_flight_max.saturating_sub(self.running.len());
        let records = bounds
            .in_flight_max
            .saturating_mul(RECORDS_PER_SLOT)
            .saturating_sub(self.busy.len());
        requests.min(records)
    }

    /// Whether a scheduling pass is worth its read of storage at `now`: when nothing is
    /// pushing, when at least an eighth of the slots are free, or when a slot is free and a
    /// push under way counts as slow (so that pushes hanging on some keys do not keep the last
    /// free slots from the healthy keys). Each pass reads the due deliveries from the front
    /// and skips the busy ones, so a pass per freed slot under load cost more than the pushes
    /// (a sixth of the CPU with 64 slots); starting them eight at a time keeps the receiver
    /// busy and the reads few.
    pub(crate) fn worth_a_pass(&self, bounds: &SlotBounds, now: Timestamp) -> bool {
        let free = self.free(bounds);
        free > 0
            && (self.running.is_empty()
                || free >= (bounds.in_flight_max / 8).max(1)
                || self.slow_running(now, bounds) > 0)
    }

    /// How many due deliveries to ask storage for: the free slots, and one more for each slow
    /// delivery remembered, since those may come before others in log order yet start after
    /// them (or be held back).
    pub(crate) fn wanted(&self, bounds: &SlotBounds) -> usize {
        self.free(bounds).saturating_add(self.marks.len())
    }

    /// Pushes under way that count as slow at `now`.
    pub(crate) fn slow_running(&self, now: Timestamp, bounds: &SlotBounds) -> usize {
        self.running
            .values()
            .filter(|r| r.slow || now.ms_since(r.started_at) >= bounds.slow_push_ms)
            .count()
    }

    /// Chooses among `due` (in log order, none of them busy) what to start at `now`, and counts
    /// the chosen as under way.
    pub(crate) fn choose(
        &mut self,
        due: Vec<DueDelivery>,
        now: Timestamp,
        bounds: &SlotBounds,
    ) -> Pass {
        let mut pass = Pass::default();
        let free = self.free(bounds);
        if free == 0 || due.is_empty() {
            return pass;
        }
        let mut slow_room = bounds
            .slow_max
            .saturating_sub(self.slow_running(now, bounds));
        let mut ready: Vec<((Timestamp, u64), DueDelivery)> = due
            .into_iter()
            .filter(|d| !self.busy.contains(d.offset))
            .map(|d| {
                let since = match self.marks.get(&d.offset) {
                    Some(m) => (m.failed_at, m.nth),
                    None => (d.published_at, 0),
                };
                (since, d)
            })
            .collect();
        // Stable: equal times keep log order.
        ready.sort_by_key(|(since, _)| *since);
        for (_, d) in ready {
            if pass.start.len() == free {
                break;
            }
            let mark = self.marks.get_mut(&d.offset);
            let slow = mark.is_some();
            if let Some(m) = mark {
                if slow_room == 0 {
                    if !m.held {
                        m.held = true;
                        pass.held_back += 1;
                    }
                    continue;
                }
                slow_room -= 1;
                m.held = false;
            }
            self.busy.insert(d.offset, d.key.clone());
            self.running.insert(
                d.offset,
                Running {
                    started_at: now,
                    slow,
                },
            );
            pass.start.push(d);
        }
        pass
    }

    /// A push of `offset` ended `end` at `at` and its outcome is recorded (or given up): its
    /// slot is free, the delivery may be attempted again, and it is remembered as slow, or
    /// forgotten. The same as [`PushSlots::answered`] then [`PushSlots::recorded`].
    #[cfg(test)]
    pub(crate) fn settled(
        &mut self,
        offset: u64,
        end: PushEnd,
        at: Timestamp,
        bounds: &SlotBounds,
    ) {
        self.answered(offset, end, at, bounds);
        self.recorded(offset);
    }

    /// The outcome of `offset` is recorded (or given up at shutdown): the delivery is no
    /// longer under way, and (with ordering) its key may be pushed again.
    pub(crate) fn recorded(&mut self, offset: u64) {
        self.running.remove(&offset);
        self.busy.remove(offset);
    }

    /// The push of `offset` ended `end` at `at` (its request is no longer out), while its
    /// outcome is being recorded: its request slot is free, the delivery stays busy until
    /// [`PushSlots::recorded`], and it is remembered as slow, or forgotten.
    pub(crate) fn answered(
        &mut self,
        offset: u64,
        end: PushEnd,
        at: Timestamp,
        bounds: &SlotBounds,
    ) {
        self.running.remove(&offset);
        match end {
            PushEnd::Delivered | PushEnd::Failed { slow: false } => {
                self.marks.remove(&offset);
            }
            PushEnd::Failed { slow: true } => {
                self.failures += 1;
                self.marks.insert(
                    offset,
                    Mark {
                        failed_at: at,
                        nth: self.failures,
                        held: false,
                    },
                );
                if self.marks.len() > bounds.marks_max {
                    self.forget_oldest(bounds.marks_max - bounds.marks_max / 4);
                }
            }
        }
    }

    /// Keeps the `keep` most recent slow failures (marks of deliveries that are gone, such as
    /// dead-lettered ones, are never refreshed and so go first).
    fn forget_oldest(&mut self, keep: usize) {
        let mut nths: Vec<u64> = self.marks.values().map(|m| m.nth).collect();
        if nths.len() <= keep {
            return;
        }
        let cut = nths.len() - keep;
        let (_, &mut first_kept, _) = nths.select_nth_unstable(cut);
        self.marks.retain(|_, m| m.nth >= first_kept);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{EventId, OrderingKey};

    const T: Timestamp = Timestamp(1_000_000);

    /// A slot freed by an answer is free while the outcome is recorded; the delivery stays
    /// busy (storage must skip it) until its record; at most `RECORDS_PER_SLOT` ×
    /// `in_flight_max` deliveries are busy; and a pass is worth making only when nothing
    /// pushes, an eighth of the slots are free, or a push under way is slow.
    #[test]
    fn a_slot_frees_at_the_answer_and_the_delivery_at_its_record() {
        let b = bounds(16, 4);
        let mut slots = PushSlots::default();
        assert!(slots.worth_a_pass(&b, T));
        let pass = slots.choose(due(&(0..16).collect::<Vec<_>>()), T, &b);
        assert_eq!(pass.start.len(), 16);
        assert_eq!(slots.free(&b), 0);
        assert!(!slots.worth_a_pass(&b, T));
        slots.answered(0, PushEnd::Delivered, T, &b);
        assert_eq!(slots.free(&b), 1);
        assert!(
            !slots.worth_a_pass(&b, T),
            "one free slot of 16 is not worth a pass"
        );
        assert!(slots.busy().contains(0), "busy until recorded");
        slots.answered(1, PushEnd::Delivered, T, &b);
        assert!(slots.worth_a_pass(&b, T), "two of 16 are an eighth");
        // Offered again before its record, the delivery does not start.
        let pass = slots.choose(due(&[0, 1, 16]), T, &b);
        assert_eq!(started(&pass), vec![16]);
        slots.recorded(0);
        assert!(!slots.busy().contains(0));
        // Records waiting bound the slots: answer everything, record nothing.
        let mut next = 17;
        while slots.free(&b) > 0 {
            let pass = slots.choose(due(&[next]), T, &b);
            assert_eq!(started(&pass), vec![next]);
            next += 1;
            let running: Vec<u64> = slots.running.keys().copied().collect();
            for o in running {
                slots.answered(o, PushEnd::Delivered, T, &b);
            }
        }
        assert_eq!(slots.busy().len(), 16 * RECORDS_PER_SLOT);
        assert!(slots.running.is_empty());
        assert!(!slots.worth_a_pass(&b, T));
        slots.recorded(1);
        assert!(
            slots.worth_a_pass(&b, T),
            "nothing pushing and a record done"
        );
        // One slot free while the others push: a pass only once a push under way is slow.
        let mut slots = PushSlots::default();
        slots.choose(due(&(0..16).collect::<Vec<_>>()), T, &b);
        slots.answered(0, PushEnd::Delivered, T, &b);
        slots.recorded(0);
        assert!(!slots.worth_a_pass(&b, T));
        assert!(slots.worth_a_pass(&b, T.plus_ms(b.slow_push_ms)));
    }

    fn bounds(in_flight_max: usize, slow_max: usize) -> SlotBounds {
        SlotBounds {
            in_flight_max,
            slow_max,
            slow_push_ms: 1000,
            marks_max: 100,
        }
    }

    fn due(offsets: &[u64]) -> Vec<DueDelivery> {
        offsets
            .iter()
            .map(|&offset| DueDelivery {
                offset,
                event_id: EventId::new_v7(),
                key: OrderingKey::new(format!("k{offset}"), 64).unwrap(),
                attempt: 1,
                published_at: T,
                queueing: 0,
            })
            .collect()
    }

    fn started(pass: &Pass) -> Vec<u64> {
        pass.start.iter().map(|d| d.offset).collect()
    }

    const SLOW: PushEnd = PushEnd::Failed { slow: true };

    #[test]
    fn the_share_of_slow_slots_follows_the_configuration() {
        let mut c = DeliveryConfig::default();
        assert_eq!(c.slow_slots_max_percent, 25);
        assert_eq!(SlotBounds::new(16, &c).slow_max, 4);
        assert_eq!(SlotBounds::new(3, &c).slow_max, 1, "at least one slot");
        c.slow_slots_max_percent = 250;
        assert_eq!(SlotBounds::new(8, &c).slow_max, 8, "at most every slot");
    }

    #[test]
    fn an_answer_without_status_or_a_slow_one_makes_a_delivery_slow() {
        let response = |status, latency_ms| PushResponse {
            status,
            retry_after_ms: None,
            error: None,
            latency_ms,
        };
        assert_eq!(
            PushEnd::of(&response(Some(204), 9000), 1000),
            PushEnd::Delivered
        );
        assert_eq!(PushEnd::of(&response(None, 5), 1000), SLOW);
        assert_eq!(PushEnd::of(&response(Some(500), 1000), 1000), SLOW);
        assert_eq!(
            PushEnd::of(&response(Some(500), 999), 1000),
            PushEnd::Failed { slow: false }
        );
    }

    /// Slow deliveries start only while slow pushes hold fewer than their share; the other
    /// slots go to deliveries not known to be slow, and a wait is counted once.
    #[test]
    fn slow_deliveries_hold_at_most_their_share_of_slots() {
        let b = bounds(4, 1);
        let mut slots = PushSlots::default();
        assert_eq!(
            started(&slots.choose(due(&[0, 1, 2, 3]), T, &b)),
            [0, 1, 2, 3]
        );
        for o in 0..4 {
            slots.settled(o, SLOW, T, &b);
        }
        let pass = slots.choose(due(&[0, 1, 2, 3, 4, 5]), T, &b);
        assert_eq!(started(&pass), [4, 5, 0], "healthy first, then one slow");
        assert_eq!(pass.held_back, 3);
        // The same wait is not counted again; a new one is.
        slots.settled(4, PushEnd::Delivered, T, &b);
        let pass = slots.choose(due(&[1, 2, 3]), T, &b);
        assert!(pass.start.is_empty());
        assert_eq!(pass.held_back, 0);
        slots.settled(0, SLOW, T, &b);
        let pass = slots.choose(due(&[0, 1, 2, 3]), T, &b);
        assert_eq!(started(&pass), [1], "the least recently failed");
        assert_eq!(pass.held_back, 1, "0 starts waiting");
    }

    /// A push under way counts as slow once it has run `slow_push_ms`, so slow deliveries wait
    /// for it even though it started as a healthy one.
    #[test]
    fn a_push_running_too_long_counts_as_slow() {
        let b = bounds(4, 1);
        let mut slots = PushSlots::default();
        slots.choose(due(&[0, 1]), T, &b);
        slots.settled(0, SLOW, T, &b);
        assert_eq!(slots.slow_running(T.plus_ms(999), &b), 0);
        assert_eq!(slots.slow_running(T.plus_ms(1000), &b), 1);
        let pass = slots.choose(due(&[0]), T.plus_ms(1000), &b);
        assert!(pass.start.is_empty());
        assert_eq!(pass.held_back, 1);
        assert_eq!(started(&slots.choose(due(&[0]), T, &b)), [0]);
    }

    /// With every delivery slow, each gets the slow slot in turn, least recently failed first,
    /// whatever its place in the log.
    #[test]
    fn slow_deliveries_take_turns() {
        let b = bounds(4, 1);
        let mut slots = PushSlots::default();
        let all: Vec<u64> = (0..6).collect();
        slots.choose(due(&[0, 1, 2, 3]), T, &b);
        for o in [2, 0, 3, 1] {
            slots.settled(o, SLOW, T, &b);
        }
        assert_eq!(started(&slots.choose(due(&all), T, &b)), [4, 5, 2]);
        for o in [4, 5, 2] {
            slots.settled(o, SLOW, T, &b);
        }
        let mut order = Vec::new();
        for _ in 0..12 {
            let waiting: Vec<u64> = all
                .iter()
                .copied()
                .filter(|o| !slots.busy().contains(*o))
                .collect();
            let pass = slots.choose(due(&waiting), T, &b);
            assert_eq!(pass.start.len(), 1);
            let o = pass.start[0].offset;
            order.push(o);
            slots.settled(o, SLOW, T, &b);
        }
        assert_eq!(order, [0, 3, 1, 4, 5, 2, 0, 3, 1, 4, 5, 2]);
    }

    /// A slow delivery that just failed goes behind those ready before it; one published later
    /// goes behind it. One that failed quickly keeps its place.
    #[test]
    fn deliveries_start_oldest_ready_first() {
        let b = bounds(1, 1);
        let mut slots = PushSlots::default();
        slots.choose(due(&[0]), T, &b);
        slots.settled(0, SLOW, T.plus_ms(10), &b);
        let mut d = due(&[0, 1, 2]);
        d[1].published_at = T.plus_ms(5);
        d[2].published_at = T.plus_ms(20);
        assert_eq!(started(&slots.choose(d.clone(), T.plus_ms(30), &b)), [1]);
        slots.settled(1, PushEnd::Delivered, T.plus_ms(30), &b);
        d.remove(1);
        assert_eq!(started(&slots.choose(d.clone(), T.plus_ms(30), &b)), [0]);
        assert_eq!(slots.wanted(&b), 1, "0 is under way and still remembered");
        slots.settled(0, PushEnd::Failed { slow: false }, T.plus_ms(40), &b);
        assert_eq!(slots.wanted(&b), 1, "a quick failure is forgotten");
        assert_eq!(started(&slots.choose(d, T.plus_ms(40), &b)), [0]);
    }

    #[test]
    fn slow_deliveries_are_remembered_within_a_bound() {
        let b = SlotBounds {
            marks_max: 8,
            ..bounds(1, 1)
        };
        let mut slots = PushSlots::default();
        for o in 0..9 {
            slots.choose(due(&[o]), T, &b);
            slots.settled(o, SLOW, T, &b);
        }
        assert_eq!(slots.marks.len(), 6);
        assert!(
            (3..9).all(|o| slots.marks.contains_key(&o)),
            "the newest kept"
        );
        slots.settled(8, PushEnd::Delivered, T, &b);
        assert_eq!(slots.marks.len(), 5);
        assert_eq!(slots.wanted(&b), 6);
    }
}
