//! Chooses the next step of a simulation from its seeded generator and the current state
//! (never from anything unordered or timed, so that a seed replays exactly): weighted among the
//! steps that make sense now, with parameters that reach the interesting edges (Retry-After
//! above its cap, leases that run out, stale ack ids, tiny queue bounds and seek steps).

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::Rng;

use crate::clock::Timestamp;
use crate::storage::AckAction;
use crate::subscription::SubscriptionStatus;
use crate::webhook::PushResponse;

use super::model::{DState, Ev, Model, Policy, Sub};
use super::world::World;
use super::{KEYS, SEEK_WITH_PUSH_IN_FLIGHT, SUBS_MAX, TYPES};

/// A new subscription's settings.
#[derive(Clone, Debug)]
pub(super) struct SubSpec {
    pub room: usize,
    pub push: bool,
    /// `None` takes the Room's default.
    pub ordered: Option<bool>,
    pub ty: Option<usize>,
    pub policy: Policy,
    pub in_flight_max: u32,
    pub queue_depth_max: u64,
}

/// One step of a simulation.
#[derive(Clone, Debug)]
pub(super) enum Step {
    Publish {
        room: usize,
        /// (type, key) per event.
        items: Vec<(usize, usize)>,
    },
    /// A push dispatcher looks for due deliveries and starts them.
    PushDue {
        sub: Sub,
    },
    /// A receiver answers a push; its outcome is recorded.
    Answer {
        push: u64,
        response: PushResponse,
    },
    /// A refused outcome record is tried again.
    Record {
        push: u64,
    },
    Lease {
        sub: Sub,
        max: usize,
        lease_ms: u64,
    },
    /// (event, log position, attempt) per ack id.
    Settle {
        sub: Sub,
        refs: Vec<(Ev, u64, u32)>,
        action: AckAction,
    },
    Advance(u64),
    Back(u64),
    /// `None`: to the oldest event; else to a time.
    SeekStart {
        sub: Sub,
        target: Option<Timestamp>,
    },
    SeekNext {
        sub: Sub,
        limit: usize,
    },
    Redrive {
        sub: Sub,
        evs: Option<Vec<Ev>>,
        limit: usize,
    },
    Status {
        sub: Sub,
        to: SubscriptionStatus,
    },
    Stop {
        ev: Ev,
    },
    Crash,
    FailOne,
    DiskFull(u32),
    CreateSub(SubSpec),
    /// A retention sweep of at most this many records.
    Sweep(usize),
    /// Writes committed together, as the writer batches them.
    Group(Vec<Step>),
}

impl Step {
    /// The step's kind, for the statistics.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Step::Publish { .. } => "publish",
            Step::PushDue { .. } => "push due",
            Step::Answer { .. } => "answer",
            Step::Record { .. } => "record again",
            Step::Lease { .. } => "lease",
            Step::Settle { .. } => "settle",
            Step::Advance(_) => "advance",
            Step::Back(_) => "step back",
            Step::SeekStart { .. } => "seek start",
            Step::SeekNext { .. } => "seek step",
            Step::Redrive { .. } => "redrive",
            Step::Status { .. } => "pause or resume",
            Step::Stop { .. } => "stop",
            Step::Crash => "crash",
            Step::FailOne => "fail one commit",
            Step::DiskFull(_) => "disk full",
            Step::CreateSub(_) => "new subscription",
            Step::Sweep(_) => "retention sweep",
            Step::Group(_) => "group",
        }
    }
}

pub(super) fn sub_spec(rng: &mut StdRng, rooms: usize) -> SubSpec {
    let initial_ms = *[0u64, 100, 1000, 5000].choose(rng).unwrap_or(&100);
    let delay_max_ms = if initial_ms == 0 {
        *[0u64, 2000].choose(rng).unwrap_or(&0)
    } else {
        initial_ms * [1u64, 4, 16].choose(rng).unwrap_or(&1)
    };
    SubSpec {
        room: rng.random_range(0..rooms),
        push: rng.random_bool(0.5),
        ordered: [None, Some(true), Some(false)]
            .choose(rng)
            .copied()
            .flatten(),
        ty: rng.random_bool(0.25).then(|| rng.random_range(0..TYPES)),
        policy: Policy {
            initial_ms,
            doubling: rng.random_bool(0.5),
            delay_max_ms,
            attempts_max: rng.random_range(1..=5),
            ttl_ms: if rng.random_bool(0.4) {
                rng.random_range(5_000..120_000)
            } else {
                10_000_000_000
            },
        },
        in_flight_max: rng.random_range(1..=3),
        queue_depth_max: if rng.random_bool(0.15) {
            rng.random_range(2..8)
        } else {
            1000
        },
    }
}

fn response(rng: &mut StdRng) -> PushResponse {
    let (status, retry_after_ms, error) = match rng.random_range(0..1000) {
        0..=399 => (Some(200), None, None),
        400..=599 => (Some(204), None, None),
        600..=719 => (Some(500), None, None),
        720..=799 => (None, None, Some("timed out".to_string())),
        800..=869 => (Some(429), Some(rng.random_range(0..60_000)), None),
        870..=919 => (
            Some(503),
            rng.random_bool(0.5).then(|| rng.random_range(0..10_000)),
            None,
        ),
        920..=974 => (Some(400), Some(5_000), None),
        _ => (Some(410), None, None),
    };
    PushResponse {
        status,
        retry_after_ms,
        error,
        latency_ms: rng.random_range(1..300),
    }
}

/// The step kinds with their weights.
const KINDS: &[(u32, u32)] = &[
    (0, 8),  // publish
    (1, 14), // push due
    (2, 18), // answer
    (3, 6),  // record again
    (4, 12), // lease
    (5, 12), // settle
    (6, 12), // advance
    (7, 2),  // step back
    (8, 2),  // seek start
    (9, 10), // seek step
    (10, 3), // redrive
    (11, 2), // pause or resume
    (12, 1), // stop an event
    (13, 1), // crash
    (14, 3), // one commit fails
    (15, 1), // disk full
    (16, 1), // new subscription
    (17, 4), // group
    (18, 2), // retention sweep
];

/// The next step.
pub(super) fn next(rng: &mut StdRng, model: &Model, world: &World, rooms: usize) -> Step {
    // Weighted among the kinds that have something to do now, so that a kind often without
    // (no push under way to answer, no seek to step) does not inflate the others.
    let kinds: Vec<(u32, u32)> = KINDS
        .iter()
        .copied()
        .filter(|(k, _)| available(*k, model, world))
        .collect();
    let total: u32 = kinds.iter().map(|(_, w)| w).sum();
    loop {
        let mut pick = rng.random_range(0..total);
        let kind = kinds
            .iter()
            .find(|(_, w)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .map_or(6, |(k, _)| *k);
        let step = if kind == 17 {
            let parts: Vec<Step> = (0..rng.random_range(2..=3))
                .filter_map(|_| {
                    let kind = rng_kind(rng);
                    write_step(rng, model, world, rooms, kind)
                })
                .collect();
            distinct(parts).map(Step::Group)
        } else {
            write_step(rng, model, world, rooms, kind)
                .or_else(|| other_step(rng, model, world, kind))
        };
        if let Some(step) = step {
            return step;
        }
    }
}

/// Whether a kind of step has something to do now (a cheap test; the step's own generation
/// may still find nothing, and then another is drawn).
fn available(kind: u32, model: &Model, world: &World) -> bool {
    let subs = |push: bool| model.subs.iter().any(|s| s.push == push);
    match kind {
        1 => subs(true),
        2 => world.pushes.values().any(|p| p.answer.is_none()),
        3 => world.pushes.values().any(|p| p.refused),
        4 => subs(false),
        5 => !world.leases.is_empty(),
        9 => !world.seeks.is_empty(),
        12 => model.events.iter().any(|e| !e.gone),
        14 | 15 => world.disk_full == 0,
        16 => model.subs.len() < SUBS_MAX,
        18 => model.rooms.iter().any(|r| r.age_ms_max.is_some()),
        _ => true,
    }
}

/// A kind of write, for a group.
fn rng_kind(rng: &mut StdRng) -> u32 {
    *[0u32, 2, 3, 4, 5, 9, 10, 11, 12, 18]
        .choose(rng)
        .unwrap_or(&0)
}

/// A group's writes, when they touch different pushes and seeks (each push is answered once,
/// each seek takes one step at a time), with at most one lease or retention sweep, last: which
/// leases that ran out a pull notices, and which events a sweep removes, the model learns from
/// the engine only after the commit, so nothing in the same commit may depend on it. `None`
/// when fewer than two remain.
fn distinct(parts: Vec<Step>) -> Option<Vec<Step>> {
    let mut seen = std::collections::BTreeSet::new();
    let (leases, mut kept): (Vec<Step>, Vec<Step>) = parts
        .into_iter()
        .filter(|s| match s {
            Step::Answer { push, .. } | Step::Record { push } => seen.insert((0, *push as usize)),
            Step::SeekNext { sub, .. } => seen.insert((1, *sub)),
            _ => true,
        })
        .partition(|s| matches!(s, Step::Lease { .. } | Step::Sweep(_)));
    kept.extend(leases.into_iter().take(1));
    (kept.len() >= 2).then_some(kept)
}

fn pick_sub(rng: &mut StdRng, model: &Model, f: impl Fn(Sub) -> bool) -> Option<Sub> {
    let subs: Vec<Sub> = (0..model.subs.len()).filter(|s| f(*s)).collect();
    subs.choose(rng).copied()
}

/// A step that writes, or `None` when that kind has nothing to do now.
fn write_step(
    rng: &mut StdRng,
    model: &Model,
    world: &World,
    rooms: usize,
    kind: u32,
) -> Option<Step> {
    Some(match kind {
        0 => Step::Publish {
            room: rng.random_range(0..rooms),
            items: (0..rng.random_range(1..=3))
                .map(|_| (rng.random_range(0..TYPES), rng.random_range(0..KEYS)))
                .collect(),
        },
        2 => {
            let open: Vec<u64> = world
                .pushes
                .iter()
                .filter(|(_, p)| p.answer.is_none())
                .map(|(k, _)| *k)
                .collect();
            Step::Answer {
                push: *open.choose(rng)?,
                response: response(rng),
            }
        }
        3 => {
            let refused: Vec<u64> = world
                .pushes
                .iter()
                .filter(|(_, p)| p.refused)
                .map(|(k, _)| *k)
                .collect();
            Step::Record {
                push: *refused.choose(rng)?,
            }
        }
        4 => Step::Lease {
            sub: pick_sub(rng, model, |s| !model.subs[s].push)?,
            max: rng.random_range(1..=4),
            lease_ms: rng.random_range(500..20_000),
        },
        5 => {
            let sub = pick_sub(rng, model, |s| world.leases.iter().any(|l| l.sub == s))?;
            let held: Vec<_> = world.leases.iter().filter(|l| l.sub == sub).collect();
            // Mostly the newest leases, sometimes an older (stale) one.
            let n = held.len();
            let refs = (0..rng.random_range(1..=3))
                .map(|_| {
                    let i = if rng.random_bool(0.8) {
                        n - 1 - rng.random_range(0..n.min(3))
                    } else {
                        rng.random_range(0..n)
                    };
                    (held[i].ev, held[i].pos, held[i].attempt)
                })
                .collect();
            let action = match rng.random_range(0..100) {
                0..=44 => AckAction::Ack,
                45..=59 => AckAction::Nack { delay_ms: None },
                60..=69 => AckAction::Nack {
                    delay_ms: Some(rng.random_range(0..30_000)),
                },
                70..=89 => AckAction::Extend {
                    lease_ms: rng.random_range(500..20_000),
                },
                _ => AckAction::Term,
            };
            Step::Settle { sub, refs, action }
        }
        9 => {
            let subs: Vec<Sub> = world.seeks.keys().copied().collect();
            Step::SeekNext {
                sub: *subs.choose(rng)?,
                limit: rng.random_range(1..=4),
            }
        }
        10 => {
            let sub = pick_sub(rng, model, |_| true)?;
            let dead: Vec<Ev> = model.subs[sub]
                .dels
                .iter()
                .filter(|(_, d)| matches!(d.state, DState::Dead(_)))
                .map(|(e, _)| *e)
                .collect();
            let evs = if rng.random_bool(0.5) && !dead.is_empty() {
                let mut chosen: Vec<Ev> = (0..rng.random_range(1..=3))
                    .filter_map(|_| dead.choose(rng).copied())
                    .collect();
                // Now and then an event that is not a dead letter.
                if rng.random_bool(0.2) && !model.events.is_empty() {
                    chosen.push(rng.random_range(0..model.events.len()));
                }
                chosen.sort_unstable();
                chosen.dedup();
                chosen.retain(|e| {
                    model.events[*e].room == model.subs[sub].room && !model.events[*e].gone
                });
                Some(chosen)
            } else {
                None
            };
            Step::Redrive {
                sub,
                evs,
                limit: rng.random_range(1..=4),
            }
        }
        11 => {
            // Mostly resuming what is stopped, so that stops do not last the whole run.
            let stopped = |s: Sub| model.subs[s].status != SubscriptionStatus::Active;
            let sub = match pick_sub(rng, model, stopped) {
                Some(s) if rng.random_bool(0.7) => s,
                _ => pick_sub(rng, model, |_| true)?,
            };
            let to = if model.subs[sub].status == SubscriptionStatus::Active {
                SubscriptionStatus::Paused
            } else {
                SubscriptionStatus::Active
            };
            Step::Status { sub, to }
        }
        12 => {
            let held: Vec<Ev> = (0..model.events.len())
                .filter(|e| !model.events[*e].gone)
                .collect();
            Step::Stop {
                ev: *held.choose(rng)?,
            }
        }
        16 if model.subs.len() < SUBS_MAX => Step::CreateSub(sub_spec(rng, rooms)),
        18 => Step::Sweep(rng.random_range(1..=6)),
        _ => return None,
    })
}

/// A step that does not write.
fn other_step(rng: &mut StdRng, model: &Model, world: &World, kind: u32) -> Option<Step> {
    Some(match kind {
        1 => Step::PushDue {
            sub: pick_sub(rng, model, |s| {
                model.subs[s].push && (SEEK_WITH_PUSH_IN_FLIGHT || !world.seeks.contains_key(&s))
            })?,
        },
        6 => Step::Advance(match rng.random_range(0..10) {
            0..=5 => rng.random_range(1..500),
            6..=8 => rng.random_range(500..5_000),
            _ => rng.random_range(5_000..60_000),
        }),
        7 => Step::Back(rng.random_range(1..3_000)),
        8 => {
            let sub = pick_sub(rng, model, |s| {
                !world.seeks.contains_key(&s)
                    && (SEEK_WITH_PUSH_IN_FLIGHT || world.pushing(s).is_empty())
            })?;
            let room = model.subs[sub].room;
            let ats: Vec<Timestamp> = model.room_events(room).map(|(_, e)| e.at).collect();
            let target = match rng.random_range(0..10) {
                0..=3 => None,
                4..=5 => Some(world.high.plus_ms(1_000_000)),
                6..=7 => ats.choose(rng).copied().or(Some(world.now)),
                _ => Some(Timestamp(rng.random_range(world.start.0..=world.high.0))),
            };
            Step::SeekStart { sub, target }
        }
        13 => Step::Crash,
        14 if world.disk_full == 0 => Step::FailOne,
        15 if world.disk_full == 0 => Step::DiskFull(rng.random_range(1..=8)),
        _ => return None,
    })
}
