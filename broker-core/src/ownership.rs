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
//! - The owner renews when a third of the lease is left of two thirds, so one slow commit
//!   does not lose it; it starts pushes only while its lease runs.
//! - Another node takes the lease only once it has expired, or when its owner released it at
//!   shutdown. So a subscription whose node died moves within `dispatch_lease_ms` (plus one
//!   read of the lease and one commit).

use crate::clock::Timestamp;

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
    let until = now.plus_ms(lease_ms.max(1));
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
        Some(l) if l.until > now => Claim::HeldBy(l),
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
    held.until.as_ms() < now.as_ms().saturating_add(lease_ms.max(1) * 2 / 3)
}

/// Whether the owner may start a push now: its lease has not run out.
pub(crate) fn may_push(held: &DispatchLease, now: Timestamp) -> bool {
    held.until > now
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
    const LEASE: u64 = 9_000;

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
                until: t(9_100)
            })
        );
    }

    #[test]
    fn another_node_waits_until_the_lease_ends_then_takes_it_under_the_next_epoch() {
        let held = DispatchLease {
            node: A,
            epoch: 4,
            until: t(10_000),
        };
        assert_eq!(claim(Some(held), B, t(9_999), LEASE), Claim::HeldBy(held));
        assert_eq!(
            claim(Some(held), B, t(10_000), LEASE),
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

    /// A small property test: many nodes claim, renew and release in a seeded random order
    /// over one stored lease, with time moving forward; at no time do two nodes both believe
    /// they may push, and every change of hands raises the epoch.
    #[test]
    fn at_most_one_node_may_push_at_any_time() {
        for seed in 0..200u64 {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let mut stored: Option<DispatchLease> = None;
            let mut held: [Option<DispatchLease>; 3] = [None; 3];
            let mut now = 0u64;
            for _ in 0..300 {
                now += next() % 4_000;
                let n = (next() % 3) as usize;
                let node = n as u128 + 1;
                if next() % 5 == 0 {
                    if let Some(l) = release(stored, node) {
                        stored = Some(l);
                        held[n] = None;
                    }
                } else {
                    let before = stored;
                    match claim(stored, node, t(now), LEASE) {
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
                // A node's belief is only as good as what it last got; check the beliefs
                // against each other and against the store.
                let pushing: Vec<usize> = (0..3)
                    .filter(|&i| held[i].is_some_and(|l| may_push(&l, t(now))))
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
    fn renewal_falls_due_when_less_than_two_thirds_is_left() {
        let held = DispatchLease {
            node: A,
            epoch: 1,
            until: t(9_000),
        };
        assert!(!renew_due(&held, t(2_999), LEASE));
        assert!(renew_due(&held, t(3_001), LEASE));
        assert!(may_push(&held, t(8_999)));
        assert!(!may_push(&held, t(9_000)));
    }
}
