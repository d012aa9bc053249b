//! The writes of a simulation: how each writing step becomes one engine operation, and, once
//! its commit succeeded, what its result must be and what it does to the model and the world.
//! A failed commit reaches only [`Sim::refused`]: nothing happened, and the world tries again
//! later the way the broker does (a push outcome is recorded again, never pushed again).

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::ids::{EventId, EventTypeName, OrderingKey, RoomName, SubscriptionId};
use crate::storage::{AckAction, WriteOutput};
use crate::subscription::{
    DeliveryMode, NewSubscription, PushEndpoint, RetryOverrides, SubscriptionStatus,
};

use super::check::ev_name;
use super::engine::Op;
use super::gen::{Step, SubSpec};
use super::model::{DState, Ev, MEvent, MSub, Model, Sub};
use super::run::Sim;
use super::world::SeekPhase;
use super::{key_name, payload, room_name, type_name, STRICT_KEY_BLOCK_BY_ORPHANED_PUSH};

/// A planned write, with what its result is checked against.
#[derive(Debug)]
pub(super) enum Act {
    Publish {
        room: usize,
        items: Vec<(usize, usize)>,
        ids: Vec<EventId>,
    },
    Outcome {
        push: u64,
    },
    Lease {
        sub: Sub,
        max: usize,
        lease_ms: u64,
    },
    Settle {
        sub: Sub,
        refs: Vec<(Ev, u32)>,
        action: AckAction,
    },
    Seek {
        sub: Sub,
        phase: SeekPhase,
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
    CreateSub {
        spec: SubSpec,
        id: SubscriptionId,
    },
    Sweep,
}

pub(super) fn ok(r: Result<WriteOutput>, what: &str) -> std::result::Result<WriteOutput, String> {
    r.map_err(|e| format!("{what} refused: {e}"))
}

pub(super) fn unexpected<T>(what: &str, out: WriteOutput) -> std::result::Result<T, String> {
    Err(format!("{what} answered {out:?}"))
}

/// Log positions of a Room's events.
pub(super) fn positions(model: &Model, room: usize) -> BTreeMap<u64, Ev> {
    model.room_events(room).map(|(ev, e)| (e.pos, ev)).collect()
}

impl Sim {
    /// The operation of a writing step, or `None` for a step that does not write.
    pub(super) fn plan(&mut self, step: &Step) -> std::result::Result<Option<(Op, Act)>, String> {
        let id = |s: Sub| self.model.subs[s].id;
        Ok(Some(match step {
            Step::Publish { room, items } => {
                let mut events = Vec::new();
                let mut ids = Vec::new();
                for (ty, key) in items {
                    let id = self.new_event_id();
                    let target = self.target(*room, *ty)?;
                    let key = OrderingKey::new(key_name(*key), 256).map_err(|e| e.to_string())?;
                    let ty = EventTypeName::new(type_name(*ty)).map_err(|e| e.to_string())?;
                    events.push((ty, target, key, id, payload(id)));
                    ids.push(id);
                }
                let room_name = RoomName::new(room_name(*room)).map_err(|e| e.to_string())?;
                (
                    Op::Publish {
                        room: room_name,
                        events,
                    },
                    Act::Publish {
                        room: *room,
                        items: items.clone(),
                        ids,
                    },
                )
            }
            Step::Answer { push, response } => {
                let Some(p) = self.world.pushes.get_mut(push) else {
                    return Err(format!("no push {push} under way"));
                };
                p.answer = Some(response.clone());
                let p = p.clone();
                if response.status.is_some_and(|s| (200..300).contains(&s)) {
                    let d = self.model.subs[p.sub].dels.get(&p.ev);
                    let current = d.is_some_and(|d| d.gen == p.gen && d.owed().is_some());
                    if current || STRICT_KEY_BLOCK_BY_ORPHANED_PUSH {
                        self.world.success(&self.model, p.sub, p.ev, p.epoch)?;
                    }
                }
                let op = Op::PushOutcome {
                    sub: id(p.sub),
                    due: p.due.clone(),
                    response: response.clone(),
                };
                (op, Act::Outcome { push: *push })
            }
            Step::Record { push } => {
                let Some(p) = self.world.pushes.get(push) else {
                    return Err(format!("no push {push} under way"));
                };
                let Some(response) = p.answer.clone() else {
                    return Err(format!("push {push} has no answer to record"));
                };
                let op = Op::PushOutcome {
                    sub: id(p.sub),
                    due: p.due.clone(),
                    response,
                };
                (op, Act::Outcome { push: *push })
            }
            Step::Lease { sub, max, lease_ms } => (
                Op::Lease {
                    sub: id(*sub),
                    max: *max,
                    lease_ms: *lease_ms,
                },
                Act::Lease {
                    sub: *sub,
                    max: *max,
                    lease_ms: *lease_ms,
                },
            ),
            Step::Settle { sub, refs, action } => (
                Op::Settle {
                    sub: id(*sub),
                    refs: refs.iter().map(|(_, pos, a)| (*pos, *a)).collect(),
                    action: *action,
                },
                Act::Settle {
                    sub: *sub,
                    refs: refs.iter().map(|(ev, _, a)| (*ev, *a)).collect(),
                    action: *action,
                },
            ),
            Step::SeekNext { sub, limit } => {
                let Some(proc_) = self.world.seeks.get(sub).copied() else {
                    return Ok(None);
                };
                let op = match proc_.phase {
                    SeekPhase::Clear => Op::SeekClear {
                        sub: id(*sub),
                        below: proc_.end,
                        limit: *limit,
                    },
                    SeekPhase::Enqueue(from) => Op::SeekEnqueue {
                        sub: id(*sub),
                        from,
                        to: proc_.end,
                        limit: *limit,
                    },
                    SeekPhase::Done => Op::SeekDone { sub: id(*sub) },
                };
                let act = Act::Seek {
                    sub: *sub,
                    phase: proc_.phase,
                    limit: *limit,
                };
                (op, act)
            }
            Step::Redrive { sub, evs, limit } => {
                let offsets = evs
                    .as_ref()
                    .map(|evs| evs.iter().map(|e| self.model.events[*e].pos).collect());
                (
                    Op::Redrive {
                        sub: id(*sub),
                        offsets,
                        limit: *limit,
                    },
                    Act::Redrive {
                        sub: *sub,
                        evs: evs.clone(),
                        limit: *limit,
                    },
                )
            }
            Step::Status { sub, to } => (
                Op::SetStatus {
                    sub: id(*sub),
                    to: *to,
                },
                Act::Status { sub: *sub, to: *to },
            ),
            Step::Stop { ev } => (
                Op::Stop {
                    event: self.model.events[*ev].id,
                },
                Act::Stop { ev: *ev },
            ),
            Step::CreateSub(spec) => {
                let id = self.new_sub_id();
                (
                    Op::CreateSub {
                        room: RoomName::new(room_name(spec.room)).map_err(|e| e.to_string())?,
                        id,
                        new: Box::new(new_subscription(spec, id)),
                    },
                    Act::CreateSub {
                        spec: spec.clone(),
                        id,
                    },
                )
            }
            Step::Sweep(delete_max) => (
                Op::Sweep {
                    delete_max: *delete_max,
                },
                Act::Sweep,
            ),
            _ => return Ok(None),
        }))
    }

    /// A write whose commit failed: nothing of it happened.
    pub(super) fn refused(&mut self, act: &Act) {
        if let Act::Outcome { push } = act {
            if let Some(p) = self.world.pushes.get_mut(push) {
                p.refused = true;
            }
        }
    }

    /// A committed write's result, checked against the model, which then follows it.
    pub(super) fn after(
        &mut self,
        act: Act,
        result: Result<WriteOutput>,
    ) -> std::result::Result<(), String> {
        let now = self.world.now;
        match act {
            Act::Publish { room, items, ids } => {
                let out = ok(result, "publish")?;
                let WriteOutput::Receipts(receipts) = out else {
                    return unexpected("publish", out);
                };
                let first = self.model.events.len();
                for (i, r) in receipts.into_iter().enumerate() {
                    let r = r.map_err(|e| format!("publish refused: {e}"))?;
                    let (ty, key) = items[i];
                    // Acceptance times never go back within a Room (issue 15, defect 10): at
                    // least now and every event of the Room still stored, at most the latest
                    // of now and any event the Room ever had.
                    let room_times = || {
                        self.model
                            .events
                            .iter()
                            .filter(|e| e.room == room)
                            .map(|e| (e.at, e.gone))
                    };
                    let floor = room_times()
                        .filter(|(_, gone)| !gone)
                        .map(|(at, _)| at)
                        .fold(now, crate::clock::Timestamp::max);
                    let ceiling = room_times()
                        .map(|(at, _)| at)
                        .fold(now, crate::clock::Timestamp::max);
                    if r.id != ids[i]
                        || r.key.as_str() != key_name(key)
                        || r.received_at < floor
                        || r.received_at > ceiling
                    {
                        return Err(format!(
                            "publish receipt {r:?} does not match (acceptance time between \
                             {floor:?} and {ceiling:?})"
                        ));
                    }
                    let pos = self
                        .engine()
                        .event_offset(r.id)
                        .map_err(|e| e.to_string())?
                        .ok_or_else(|| format!("acknowledged event {} has no position", r.id))?;
                    let e = MEvent {
                        id: r.id,
                        room,
                        ty,
                        key,
                        seq: r.sequence.0,
                        pos,
                        at: r.received_at,
                        gone: false,
                    };
                    self.model.publish(e, now)?;
                }
                let last = self.model.events.len();
                let names: Vec<String> = (first..last).map(|e| ev_name(&self.model, e)).collect();
                self.note(format!("    acknowledged {}", names.join(" ")));
            }
            Act::Outcome { push } => {
                ok(result, "push outcome")?;
                let Some(p) = self.world.pushes.remove(&push) else {
                    return Err(format!("push {push} vanished"));
                };
                let r = p.answer.clone().unwrap_or_else(|| unreachable!());
                let counted = self.model.push_outcome(
                    p.sub,
                    p.ev,
                    p.gen,
                    p.attempt,
                    r.status,
                    r.retry_after_ms,
                    now,
                );
                if !counted {
                    self.note("    (the outcome answers an attempt that is no longer current)");
                    self.count("outcomes no longer current", 1);
                }
                self.count(
                    match r.status {
                        Some(200..=299) => "outcome 2xx",
                        Some(410) => "outcome 410",
                        Some(429 | 503) if r.retry_after_ms.is_some() => "outcome with Retry-After",
                        Some(_) => "outcome other failure",
                        None => "outcome no response",
                    },
                    1,
                );
            }
            Act::Lease { sub, max, lease_ms } => self.leased(sub, max, lease_ms, result)?,
            Act::Settle { sub, refs, action } => self.settled(sub, refs, action, result)?,
            Act::Seek { sub, phase, limit } => self.seek_result(sub, phase, limit, result)?,
            Act::Redrive { sub, evs, limit } => {
                let out = ok(result, "redrive")?;
                let WriteOutput::Count { n, more } = out else {
                    return unexpected("redrive", out);
                };
                let want = self.model.redrive(sub, evs.as_deref(), limit, now);
                self.count("redriven", n);
                if (n, more) != want {
                    return Err(format!(
                        "s{sub} redrive: engine (n, more) {:?}, model {want:?}",
                        (n, more)
                    ));
                }
            }
            Act::Status { sub, to } => {
                let from = match to {
                    SubscriptionStatus::Paused => &[SubscriptionStatus::Active][..],
                    _ => &[SubscriptionStatus::Paused, SubscriptionStatus::Disabled][..],
                };
                let allowed = self.model.set_status(sub, to, from);
                match (allowed, result) {
                    (true, Ok(WriteOutput::Subscription(s, _))) if s.status == to => {}
                    (false, Err(Error::SubscriptionState { .. })) => {}
                    (allowed, r) => {
                        return Err(format!(
                            "s{sub} to {to:?}: engine {r:?}, model allows it: {allowed}"
                        ))
                    }
                }
            }
            Act::Stop { ev } => {
                let out = ok(result, "stop")?;
                let want = self.model.stop(ev);
                self.count("stopped", want);
                if !matches!(out, WriteOutput::Count { n, .. } if n == want) {
                    return Err(format!(
                        "stop {}: engine {out:?}, model stops {want}",
                        ev_name(&self.model, ev)
                    ));
                }
            }
            Act::Sweep => {
                let out = ok(result, "retention sweep")?;
                let WriteOutput::Swept(report) = out else {
                    return unexpected("retention sweep", out);
                };
                let mut removed = 0;
                for ev in 0..self.model.events.len() {
                    let e = &self.model.events[ev];
                    if e.gone {
                        continue;
                    }
                    if self
                        .engine()
                        .event(e.id)
                        .map_err(|e| e.to_string())?
                        .is_none()
                    {
                        self.model.retire(ev, now)?;
                        removed += 1;
                    }
                }
                if removed != report.events_removed {
                    return Err(format!(
                        "the sweep reports {report:?}, but {removed} events went"
                    ));
                }
                self.count("events removed by retention", removed);
            }
            Act::CreateSub { spec, id } => {
                let out = ok(result, "create subscription")?;
                let WriteOutput::Subscription(s, _) = out else {
                    return unexpected("create subscription", out);
                };
                let ordered = spec.ordered.unwrap_or(self.model.rooms[spec.room].ordered);
                if s.id != id || s.ordered != ordered || s.status != SubscriptionStatus::Active {
                    return Err(format!(
                        "created subscription {s:?} does not match {spec:?}"
                    ));
                }
                self.model.subs.push(MSub {
                    id,
                    room: spec.room,
                    push: spec.push,
                    ordered,
                    types: spec.ty.map(|t| [t].into_iter().collect()),
                    policy: spec.policy,
                    in_flight_max: spec.in_flight_max,
                    queue_depth_max: spec.queue_depth_max,
                    status: SubscriptionStatus::Active,
                    seeking: false,
                    epoch: 0,
                    dels: BTreeMap::new(),
                });
            }
        }
        Ok(())
    }

    /// Whether nothing is owed anywhere (the end of a drain).
    pub(super) fn all_settled(&self) -> bool {
        self.model
            .subs
            .iter()
            .all(|s| s.dels.values().all(|d| !matches!(d.state, DState::Owed(_))))
    }
}

/// The engine's request for a subscription with these settings.
fn new_subscription(spec: &SubSpec, id: SubscriptionId) -> NewSubscription {
    let p = &spec.policy;
    let mode = if spec.push {
        DeliveryMode::Push(PushEndpoint {
            url: format!("https://receiver.example/{}", id.0),
            headers: Vec::new(),
            basic_auth: None,
        })
    } else {
        DeliveryMode::Pull
    };
    let mut new = NewSubscription::new(crate::ids::Principal::new("sim").expect("principal"), mode);
    new.event_types = spec
        .ty
        .map(|t| vec![EventTypeName::new(type_name(t)).expect("type name")]);
    new.ordered = spec.ordered;
    new.retry = RetryOverrides {
        initial_delay_ms: Some(p.initial_ms),
        multiplier: Some(if p.doubling { 2.0 } else { 1.0 }),
        delay_ms_max: Some(p.delay_max_ms),
        attempts_max: Some(p.attempts_max),
        ttl_ms: Some(p.ttl_ms),
        jitter_percent: Some(0),
    };
    new.in_flight_max = Some(spec.in_flight_max);
    new.queue_depth_max = Some(spec.queue_depth_max);
    new
}
