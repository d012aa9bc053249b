//! The state checks: the engine against the reference model after every step ([`reconcile`]).
//! (The checks on each hand-out as it happens are in `allowed.rs`.) Each returns the first
//! violation as text; `mod.rs` lists the invariants they enforce.

use std::collections::BTreeMap;

use crate::clock::Timestamp;
use crate::subscription::{
    Attempt, AttemptOutcome, DeadLetter, DeliveryState, EventDelivery, Subscription,
};

use super::engine::Engine;
use super::model::{DState, Ev, Fate, LeaseRow, MDel, Model, Row, Sub};

fn err<T>(e: impl std::fmt::Display) -> Result<T, String> {
    Err(format!("engine read failed: {e}"))
}

/// `e7(k2#3)`: event 7, key k2, sequence 3.
pub(super) fn ev_name(model: &Model, ev: Ev) -> String {
    let e = &model.events[ev];
    format!("e{ev}(k{}#{})", e.key, e.seq)
}

/// What the engine says of one event's delivery to one subscription.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Queued { attempts: u32, leased: bool },
    Dead { attempts: u32 },
    Delivered { attempts: u32 },
    Absent,
}

impl Seen {
    fn of(d: Option<&EventDelivery>) -> Seen {
        match d {
            None => Seen::Absent,
            Some(d) => match d.state {
                DeliveryState::Pending | DeliveryState::InFlight => Seen::Queued {
                    attempts: d.attempts,
                    leased: d.state == DeliveryState::InFlight,
                },
                DeliveryState::DeadLettered => Seen::Dead {
                    attempts: d.attempts,
                },
                DeliveryState::Delivered => Seen::Delivered {
                    attempts: d.attempts,
                },
            },
        }
    }
}

/// Compares the engine with the model: (1) every acknowledged event readable as published;
/// (2) per subscription and event, the same state (owed, leased, delivered, dead with the same
/// reason, or nothing) and attempt count; (4) the attempt log holding exactly the attempts the
/// model knows, each with what it came to; (5) the stored counters equal to a recount. Leases
/// the engine shows it noticed running out are resolved in the model first.
///
/// Every step reads each owed delivery where it is queued, the dead letters and the attempt
/// log; an engine queue entry the model does not expect shows in the counters (the stored
/// backlog against the model, `deliveries_total` against the stored backlogs). With `full`, each
/// event's state per subscription is read besides through `event_deliveries`.
pub(super) fn reconcile(
    engine: &Engine,
    model: &mut Model,
    now: Timestamp,
    high: Timestamp,
    full: bool,
) -> Result<(), String> {
    for (ev, e) in model.events.iter().enumerate() {
        if e.gone {
            if engine.event(e.id).or_else(err)?.is_some() {
                return Err(format!("e{ev}, removed by retention, is back"));
            }
            continue;
        }
        let Some(got) = engine.event(e.id).or_else(err)? else {
            return Err(format!("acknowledged event {} is lost", ev_name(model, ev)));
        };
        let same = got.room.as_str() == super::room_name(e.room)
            && got.event_type.as_str() == super::type_name(e.ty)
            && got.key.as_str() == super::key_name(e.key)
            && got.sequence.0 == e.seq
            && got.received_at == e.at
            && got.payload == super::payload(e.id);
        if !same {
            return Err(format!(
                "acknowledged event {} reads back changed: {got:?}",
                ev_name(model, ev)
            ));
        }
    }
    let mut states: Vec<BTreeMap<Ev, EventDelivery>> = vec![BTreeMap::new(); model.subs.len()];
    if full {
        for (ev, e) in model.events.iter().enumerate().filter(|(_, e)| !e.gone) {
            for d in engine.event_deliveries(e.id, now).or_else(err)? {
                match model.subs.iter().position(|s| s.id == d.subscription) {
                    Some(s) => {
                        states[s].insert(ev, d);
                    }
                    None => return Err(format!("unknown subscription {}", d.subscription)),
                }
            }
        }
    }
    let mut backlog_total = 0;
    for (s, states) in states.iter().enumerate() {
        let id = model.subs[s].id;
        let room = model.subs[s].room;
        let pos_to_ev: BTreeMap<u64, Ev> =
            model.room_events(room).map(|(ev, e)| (e.pos, ev)).collect();
        let mut dead: BTreeMap<Ev, DeadLetter> = BTreeMap::new();
        for (pos, d) in engine.dead_letters(id).or_else(err)? {
            let Some(&ev) = pos_to_ev.get(&pos) else {
                return Err(format!("s{s} has a dead letter at unknown position {pos}"));
            };
            dead.insert(ev, d);
        }
        let evs: Vec<Ev> = model.room_events(room).map(|(ev, _)| ev).collect();
        let mut queued = 0u64;
        for &ev in &evs {
            let owed = model.subs[s]
                .dels
                .get(&ev)
                .is_some_and(|d| d.owed().is_some());
            let seen = if full {
                Seen::of(states.get(&ev))
            } else if owed {
                let e = &model.events[ev];
                match engine.queued(id, e.pos, e.id, now).or_else(err)? {
                    Some((attempts, leased)) => Seen::Queued { attempts, leased },
                    None => match dead.get(&ev) {
                        Some(d) => Seen::Dead {
                            attempts: d.attempts,
                        },
                        None => Seen::Absent,
                    },
                }
            } else {
                // Not read: the dead letters, the attempt log and the counters stand for it.
                expected(model, s, ev, now)
            };
            queued += u64::from(matches!(seen, Seen::Queued { .. }));
            resolve(model, s, ev, seen, now, high)?;
            compare(model, s, ev, seen, dead.get(&ev), now)?;
        }
        let sub = engine.subscription(id).or_else(err)?;
        counters(model, s, &sub, queued, dead.len() as u64)?;
        if full {
            let health = engine.queue_health(id, now).or_else(err)?;
            let leased = model
                .owed(s)
                .filter(|(_, o)| o.lease.is_some_and(|l| l.until > now))
                .count() as u64;
            if health.in_flight != leased || !health.complete {
                return Err(format!(
                    "s{s} queue health {health:?}, but {leased} deliveries are leased"
                ));
            }
        }
        backlog_total += sub.backlog;
        attempt_log(engine, model, s, &pos_to_ev)?;
    }
    let total = engine.deliveries_total().or_else(err)?;
    if total != backlog_total {
        return Err(format!(
            "deliveries_total is {total}, the subscriptions' backlogs sum to {backlog_total}"
        ));
    }
    Ok(())
}

/// (5) A subscription's stored counters and settings against the model and a recount: `queued`
/// deliveries found in its queue, `listed` dead letters.
pub(super) fn counters(
    model: &Model,
    s: Sub,
    sub: &Subscription,
    queued: u64,
    listed: u64,
) -> Result<(), String> {
    let owed = model.owed_count(s);
    if sub.backlog != owed || queued != owed {
        return Err(format!(
            "s{s} backlog: stored {}, queue recount {queued}, model {owed}",
            sub.backlog
        ));
    }
    let dead_n = model.dead_count(s);
    if sub.dead_letters != dead_n || listed != dead_n {
        return Err(format!(
            "s{s} dead letters: stored {}, listed {listed}, model {dead_n}",
            sub.dead_letters
        ));
    }
    let m = &model.subs[s];
    if (sub.ordered, sub.in_flight_max, sub.queue_depth_max)
        != (m.ordered, m.in_flight_max, m.queue_depth_max)
    {
        return Err(format!("s{s} settings changed: {sub:?}"));
    }
    if sub.status != m.status {
        return Err(format!(
            "s{s} is {:?}, the model says {:?}",
            sub.status, m.status
        ));
    }
    Ok(())
}

/// Learns from the engine that it noticed a lease run out: a lease the model still holds
/// running is no longer in flight there (allowed only when the deadline has passed at some
/// point, since the clock may have stepped back), or a lease whose failure dead-letters is in
/// the dead letters.
fn resolve(
    model: &mut Model,
    s: Sub,
    ev: Ev,
    seen: Seen,
    now: Timestamp,
    high: Timestamp,
) -> Result<(), String> {
    let policy = &model.subs[s].policy;
    let Some(o) = model.subs[s].dels.get(&ev).and_then(MDel::owed) else {
        return Ok(());
    };
    let (Some(lease), Some(fate)) = (o.lease, o.lease_fate(policy)) else {
        return Ok(());
    };
    let leased = matches!(seen, Seen::Queued { leased: true, .. });
    if lease.until > now && !leased {
        if lease.until > high {
            return Err(format!(
                "s{s}: the lease of {} (attempt {}) runs until {:?} but the engine shows {seen:?}",
                ev_name(model, ev),
                lease.attempt,
                lease.until
            ));
        }
        model.lease_noticed(s, ev);
    } else if lease.until <= now
        && matches!(fate, Fate::Dead(_))
        && matches!(seen, Seen::Dead { .. })
    {
        model.lease_noticed(s, ev);
    }
    Ok(())
}

/// Whether the model's last attempt row of a delivery is a success.
fn last_row_delivered(d: &MDel) -> bool {
    matches!(
        d.rows.values().next_back(),
        Some(Row::Pushed {
            status: Some(200..=299)
        }) | Some(Row::Leased(LeaseRow::Acked))
    )
}

/// What the engine must say of a delivery, per the model.
fn expected(model: &Model, s: Sub, ev: Ev, now: Timestamp) -> Seen {
    let Some(d) = model.subs[s].dels.get(&ev) else {
        return Seen::Absent;
    };
    let attempts = d.last_no;
    match &d.state {
        DState::Owed(o) => Seen::Queued {
            attempts,
            leased: o.lease.is_some_and(|l| l.until > now),
        },
        DState::Dead(_) => Seen::Dead { attempts },
        _ if last_row_delivered(d) => Seen::Delivered { attempts },
        _ => Seen::Absent,
    }
}

fn compare(
    model: &Model,
    s: Sub,
    ev: Ev,
    seen: Seen,
    dead: Option<&DeadLetter>,
    now: Timestamp,
) -> Result<(), String> {
    let d = model.subs[s].dels.get(&ev);
    let last_no = d.map_or(0, |d| d.last_no);
    let name = || format!("s{s} {}", ev_name(model, ev));
    let want = expected(model, s, ev, now);
    if seen != want {
        return Err(format!(
            "{}: the engine has {seen:?}, the model {want:?} ({:?})",
            name(),
            d.map(|d| &d.state)
        ));
    }
    let want_dead = match d.map(|d| &d.state) {
        Some(DState::Dead(r)) => Some(*r),
        _ => None,
    };
    match (dead, want_dead) {
        (None, None) => Ok(()),
        (Some(dl), Some(r)) => {
            let e = &model.events[ev];
            if dl.reason != r
                || dl.event_id != e.id
                || dl.key.as_str() != super::key_name(e.key)
                || dl.sequence.0 != e.seq
                || dl.attempts != last_no
            {
                return Err(format!(
                    "{}: dead letter {dl:?}, the model expects reason {r}, {last_no} attempts",
                    name()
                ));
            }
            Ok(())
        }
        (dl, r) => Err(format!(
            "{}: dead letter listed {dl:?}, the model expects {r:?}",
            name()
        )),
    }
}

fn row_matches(row: Row, a: &Attempt) -> bool {
    use AttemptOutcome as O;
    match row {
        Row::Pushed { status } => {
            let ok = matches!(status, Some(200..=299));
            a.status == status && a.outcome == if ok { O::Delivered } else { O::Failed }
        }
        Row::Leased(LeaseRow::Open) => matches!(a.outcome, O::Leased | O::LeaseExpired),
        Row::Leased(LeaseRow::Expired) => a.outcome == O::LeaseExpired,
        Row::Leased(LeaseRow::Acked) => a.outcome == O::Acked,
        Row::Leased(LeaseRow::Nacked) => a.outcome == O::Nacked,
        Row::Leased(LeaseRow::Terminated) => a.outcome == O::Terminated,
        Row::Stopped => a.outcome == O::DeadLettered,
    }
}

/// (4) The attempt log of `s` holds exactly the attempts the model knows, under their numbers,
/// each saying what that attempt came to: a number reused for another attempt shows as a row
/// that says something else, or as a row missing.
fn attempt_log(
    engine: &Engine,
    model: &Model,
    s: Sub,
    pos_to_ev: &BTreeMap<u64, Ev>,
) -> Result<(), String> {
    let mut log: BTreeMap<Ev, BTreeMap<u32, Attempt>> = BTreeMap::new();
    for ((pos, n), a) in engine.attempts(model.subs[s].id).or_else(err)? {
        let Some(&ev) = pos_to_ev.get(&pos) else {
            return Err(format!("s{s} logs an attempt at unknown position {pos}"));
        };
        if a.attempt != n || a.event_id != model.events[ev].id {
            return Err(format!("s{s} attempt row ({pos}, {n}) says {a:?}"));
        }
        log.entry(ev).or_default().insert(n, a);
    }
    let empty = BTreeMap::new();
    for (ev, d) in &model.subs[s].dels {
        let rows = log.remove(ev).unwrap_or_default();
        let got: Vec<u32> = rows.keys().copied().collect();
        let want: Vec<u32> = d.rows.keys().copied().collect();
        if got != want {
            return Err(format!(
                "s{s} {}: attempt numbers logged {got:?}, the model knows {want:?}",
                ev_name(model, *ev)
            ));
        }
        for (n, row) in &d.rows {
            let a = &rows[n];
            if !row_matches(*row, a) {
                return Err(format!(
                    "s{s} {} attempt {n}: logged {:?} (status {:?}), the model expects {row:?}",
                    ev_name(model, *ev),
                    a.outcome,
                    a.status
                ));
            }
        }
    }
    if let Some((ev, rows)) = log.iter().find(|(_, r)| *r != &empty) {
        return Err(format!(
            "s{s} {}: attempts {:?} logged for a delivery the model never saw",
            ev_name(model, *ev),
            rows.keys().collect::<Vec<_>>()
        ));
    }
    Ok(())
}
