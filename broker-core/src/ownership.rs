//! Who pushes a subscription when several brokers share one store (PostgreSQL, issue 16 item 3):
//! one live node at a time, through a lease stored beside the subscription. This file is the
//! policy alone, pure functions of the stored lease, the node asking and the time, so that the
//! rules are tested without a clock, a store or a second process; the engine applies
//! [`claim`] inside a write transaction (so two nodes claiming together are fenced like any
//! other write), and the dispatcher asks [`renew_due`] and [`may_push`] before each pass.
//!
//! - A lease names its node and an **epoch** that grows each time the lease changes hands.
//!   A push outcome is recorded only with the epoch of the current lease (the engine checks it
//!   in the outcome's own transaction), so a node that lost its lease, however late its
//!   answers come, cannot record anything: the new owner pushes those deliveries again (at
//!   least once, never lost).
//! - The owner renews when less than two thirds of the lease is left, so one slow commit does
//!   not lose it; it starts pushes only until an eighth of the lease before its end, and cuts
//!   short any push still unanswered then ([`covered_until`]) unless it renewed meanwhile.
//! - Another node takes the lease only an eighth of the lease after its end, or at once when
//!   its owner released it at shutdown. The two eighths are the clock skew the nodes may have
//!   between them (each compares the stored end with its own clock) without two of them
//!   pushing at once: 1 s at the default 8 s lease. So a subscription whose node died moves
//!   within 9/8 of `dispatch_lease_ms` (plus a look at the lease and a commit): 9 s by
//!   default.
//! - `dispatch_lease_ms` is kept within [`LEASE_MS_MIN`]..=[`LEASE_MS_MAX`].

use crate::clock::Timestamp;

/// The shortest push lease honoured, in milliseconds: a shorter one would have every node
/// commit renewals many times a second.
pub(crate) const LEASE_MS_MIN: u64 = 1_000;
/// The longest push lease honoured (ten minutes): a subscription whose node died waits this
/// long at most.
pub(crate) const LEASE_MS_MAX: u64 = 600_000;

/// `dispatch_lease_ms` as honoured.
pub(crate) fn lease_ms(configured: u64) -> u64 {
    configured.clamp(LEASE_MS_MIN, LEASE_MS_MAX)
}

/// The clock skew between nodes a lease tolerates: an eighth of it.
pub(crate) fn margin(lease_ms: u64) -> u64 {
    lease_ms / 8
}

/// A subscription's push lease as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DispatchLease {
    /// The node that holds it (a random id each broker draws when it opens).
    pub node: u128,
    /// Grows by one each time the lease passes to another node (or is taken again after its
    /// owner released it); outcomes are recorded only under the current epoch.
    pub epoch: u64,
    /// When it ends, unless renewed.
    pub until: Timestamp,
}

/// What a claim decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Claim {
    /// The node holds the lease until `until` (a renewal keeps the epoch).
    Granted(DispatchLease),
    /// Another node holds it: look again when it ends.
    HeldBy(DispatchLease),
}

/// The decision when `node` asks for the lease at `now`, given what is stored.
pub(crate) fn claim(
    current: Option<DispatchLease>,
    node: u128,
    now: Timestamp,
    lease_ms: u64,
) -> Claim {
    let lease_ms = self::lease_ms(lease_ms);
    let until = now.plus_ms(lease_ms);
    match current {
        None => Claim::Granted(DispatchLease {
            node,
            epoch: 1,
            until,
        }),
        // Still ours, even if it ran out: nobody took it meanwhile, so no outcome under
        // another epoch was recorded.
        Some(l) if l.node == node && l.until.as_ms() > 0 => {
            Claim::Granted(DispatchLease { until, ..l })
        }
        // Another node's: taken only a margin after its end (their clocks may differ), or at
        // once when released.
        Some(l) if l.until.as_ms() > 0 && l.until.plus_ms(margin(lease_ms)) > now => {
            Claim::HeldBy(l)
        }
        // Expired or released: it changes hands (or comes back after a release).
        Some(l) => Claim::Granted(DispatchLease {
            node,
            epoch: l.epoch.saturating_add(1),
            until,
        }),
    }
}

/// The lease as its owner leaves it when it shuts down: ended now (`until` 0) with its epoch
/// kept, so that the next claim, from any node, takes it at once under the next epoch.
/// `None` when `node` does not hold it (nothing to release).
pub(crate) fn release(current: Option<DispatchLease>, node: u128) -> Option<DispatchLease> {
    match current {
        Some(l) if l.node == node => Some(DispatchLease {
            until: Timestamp(0),
            ..l
        }),
        _ => None,
    }
}

/// Whether the owner should renew now: less than two thirds of the lease is left.
pub(crate) fn renew_due(held: &DispatchLease, now: Timestamp, lease_ms: u64) -> bool {
    let lease_ms = self::lease_ms(lease_ms);
    held.until.as_ms() < now.as_ms().saturating_add(lease_ms / 3 * 2)
}

/// Whether the owner may start a push now: more than the margin is left of its lease.
pub(crate) fn may_push(held: &DispatchLease, now: Timestamp, lease_ms: u64) -> bool {
    held.until.as_ms() > now.as_ms().saturating_add(margin(self::lease_ms(lease_ms)))
}

/// Until when a held lease covers pushes under way: its end less the margin. A push not
/// answered by then is cut short (`dispatch_owner.rs`), so that nothing this node sent is still
/// in flight when another node, whose clock may be a margin ahead, takes the lease over (a
/// margin after its end by that node's clock): a key's next event never overtakes it.
pub(crate) fn covered_until(held: &DispatchLease, lease_ms: u64) -> Timestamp {
    Timestamp(
        held.until
            .as_ms()
            .saturating_sub(margin(self::lease_ms(lease_ms))),
    )
}

/// When another node's lease may be claimed, as this node's clock tells: a margin after its
/// end (at once when released).
pub(crate) fn free_at(other: &DispatchLease, lease_ms: u64) -> Timestamp {
    if other.until.as_ms() == 0 {
        return other.until;
    }
    other.until.plus_ms(margin(self::lease_ms(lease_ms)))
}

/// Whether an outcome recorded under (`node`, `epoch`) may be recorded, given what is stored:
/// only the node that holds the current epoch's lease records (however late its answer came).
pub(crate) fn may_record(current: Option<DispatchLease>, node: u128, epoch: u64) -> bool {
    current.is_some_and(|l| l.node == node && l.epoch == epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u128 = 0xA;
    const B: u128 = 0xB;
    /// A lease of 8 s: its margin is 1 s.
    const LEASE: u64 = 8_000;

    fn t(ms: u64) -> Timestamp {
        Timestamp(ms)
    }

    #[test]
    fn the_first_claim_is_granted_under_epoch_one() {
        assert_eq!(
            claim(None, A, t(100), LEASE),
            Claim::Granted(DispatchLease {
                node: A,
                epoch: 1,
                until: t(8_100)
            })
        );
    }

    #[test]
    fn another_node_waits_a_margin_past_the_lease_s_end_then_takes_it_under_the_next_epoch() {
        let held = DispatchLease {
            node: A,
            epoch: 4,
            until: t(10_000),
        };
        assert_eq!(claim(Some(held), B, t(10_999), LEASE), Claim::HeldBy(held));
        assert_eq!(free_at(&held, LEASE), t(11_000));
        assert_eq!(
            claim(Some(held), B, t(11_000), LEASE),
            Claim::Granted(DispatchLease {
                node: B,
                epoch: 5,
                until: t(19_000)
            })
        );
    }

    #[test]
    fn the_owner_renews_under_the_same_epoch_even_after_its_lease_ran_out() {
        let held = DispatchLease {
            node: A,
            epoch: 4,
            until: t(10_000),
        };
        for now in [t(5_000), t(20_000)] {
            assert_eq!(
                claim(Some(held), A, now, LEASE),
                Claim::Granted(DispatchLease {
                    until: now.plus_ms(LEASE),
                    ..held
                })
            );
        }
    }

    #[test]
    fn a_released_lease_is_taken_at_once_under_the_next_epoch_by_any_node_even_its_last_owner() {
        let held = DispatchLease {
            node: A,
            epoch: 4,
            until: t(10_000),
        };
        let released = release(Some(held), A).expect("A holds it");
        assert_eq!(released.until, t(0));
        assert_eq!(free_at(&released, LEASE), t(0));
        assert_eq!(release(Some(held), B), None, "B cannot release A's lease");
        for node in [A, B] {
            match claim(Some(released), node, t(1_000), LEASE) {
                Claim::Granted(l) => assert_eq!((l.node, l.epoch), (node, 5)),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn only_the_current_epoch_s_owner_records() {
        let held = DispatchLease {
            node: A,
            epoch: 4,
            until: t(10_000),
        };
        assert!(may_record(Some(held), A, 4));
        assert!(
            !may_record(Some(held), A, 3),
            "an older epoch of the same node"
        );
        assert!(!may_record(Some(held), B, 4));
        assert!(
            !may_record(None, A, 4),
            "no lease (the subscription's was purged)"
        );
    }

    #[test]
    fn a_lease_outside_the_honoured_range_is_brought_into_it() {
        assert_eq!(lease_ms(0), LEASE_MS_MIN);
        assert_eq!(lease_ms(u64::MAX), LEASE_MS_MAX);
        let held = DispatchLease {
            node: A,
            epoch: 1,
            until: t(u64::MAX - 5),
        };
        // No overflow anywhere near the end of time: 5 ms left is due for renewal and too
        // little to push in.
        assert!(renew_due(&held, t(u64::MAX - 10), u64::MAX));
        assert!(!may_push(&held, t(u64::MAX - 10), u64::MAX));
    }

    /// A small property test: three nodes whose clocks differ by up to the margin claim, renew
    /// and release in a seeded random order over one stored lease, with time moving forward; at
    /// no true time do two nodes both believe, by their own clocks, that they may push, and
    /// every change of hands raises the epoch. The seed is in every message.
    #[test]
    fn at_most_one_node_may_push_at_any_time_with_skewed_clocks() {
        for seed in 0..300u64 {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            // Each node's clock runs this far ahead of true time (up to the margin in all).
            let skew: [u64; 3] = [0, next() % 500, next() % 500 + 500];
            let mut stored: Option<DispatchLease> = None;
            let mut held: [Option<DispatchLease>; 3] = [None; 3];
            let mut now = 1_000_000u64;
            for _ in 0..400 {
                now += next() % 3_000;
                let n = (next() % 3) as usize;
                let node = n as u128 + 1;
                let local = t(now + skew[n]);
                if next() % 6 == 0 {
                    if let Some(l) = release(stored, node) {
                        stored = Some(l);
                        held[n] = None;
                    }
                } else {
                    let before = stored;
                    match claim(stored, node, local, LEASE) {
                        Claim::Granted(l) => {
                            if let Some(b) =
                                before.filter(|b| b.node != node || b.until.as_ms() == 0)
                            {
                                assert_eq!(l.epoch, b.epoch + 1, "seed {seed}");
                            }
                            stored = Some(l);
                            held[n] = Some(l);
                        }
                        Claim::HeldBy(_) => held[n] = None,
                    }
                }
                let pushing: Vec<usize> = (0..3)
                    .filter(|&i| held[i].is_some_and(|l| may_push(&l, t(now + skew[i]), LEASE)))
                    .collect();
                assert!(pushing.len() <= 1, "seed {seed}: {pushing:?} at {now}");
                for i in pushing {
                    let l = held[i].unwrap();
                    assert!(may_record(stored, l.node, l.epoch), "seed {seed}");
                }
            }
        }
    }

    #[test]
    fn renewal_falls_due_when_less_than_two_thirds_is_left_and_pushes_stop_a_margin_early() {
        let held = DispatchLease {
            node: A,
            epoch: 1,
            until: t(8_000),
        };
        assert!(!renew_due(&held, t(2_668), LEASE));
        assert!(renew_due(&held, t(2_669), LEASE));
        assert!(may_push(&held, t(6_999), LEASE));
        assert!(!may_push(&held, t(7_000), LEASE));
    }
}
