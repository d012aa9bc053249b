//! Hand-outs as they happen: a push dispatcher's turn (what `dispatch.rs` does each time it
//! looks for due deliveries), a lease's grants and a settle's answers, each checked on the spot
//! against the model as it stood before (`allowed.rs`, and the settle rule) before the model
//! and the world follow.

use std::collections::BTreeSet;

use crate::error::{Error, Result};
use crate::storage::{AckAction, WriteOutput};
use crate::subscription::SubscriptionStatus;

use super::acts::{ok, positions, unexpected};
use super::allowed;
use super::check::ev_name;
use super::model::{Ev, Sub};
use super::run::Sim;
use super::world::{HeldLease, Push};

impl Sim {
    /// A push dispatcher's turn, as `dispatch.rs` takes it: nothing unless the stored
    /// subscription is active and no outcome of it waits to be recorded; then as many due
    /// deliveries as it has free slots, skipping those being pushed.
    pub(super) fn push_due(&mut self, s: Sub) -> Result<(), String> {
        let (now, high) = (self.world.now, self.world.high);
        let id = self.model.subs[s].id;
        let sub = self.engine().subscription(id).map_err(|e| e.to_string())?;
        if sub.status != SubscriptionStatus::Active || self.world.holding_back(s) {
            return Ok(());
        }
        let busy = self.world.busy(s);
        let pushing = self.world.pushing(s);
        let free = (sub.in_flight_max as usize).saturating_sub(busy.len());
        if free == 0 {
            return Ok(());
        }
        let (due, next) = self
            .engine()
            .due(id, now, &busy, free)
            .map_err(|e| e.to_string())?;
        let pos = positions(&self.model, self.model.subs[s].room);
        let busy_evs: BTreeSet<usize> = pushing.iter().copied().collect();
        let eligible = self.model.push_eligible(s, now, &busy_evs);
        let mut got = Vec::new();
        for d in &due {
            let Some(&ev) = pos.get(&d.offset) else {
                return Err(format!("s{s} due at unknown position {}", d.offset));
            };
            if d.event_id != self.model.events[ev].id {
                return Err(format!(
                    "s{s} due {d:?} is not {}",
                    ev_name(&self.model, ev)
                ));
            }
            allowed::handout(&self.model, s, ev, d.attempt, &pushing, now, high)?;
            got.push(ev);
        }
        allowed::handout_set(&self.model, s, &got, &eligible, free)?;
        if got.len() < free {
            let mut after = busy_evs.clone();
            after.extend(got.iter().copied());
            let m = &self.model;
            let earliest = m.earliest(s, now, |t| !m.push_eligible(s, t, &after).is_empty());
            allowed::next_due(s, next, earliest, now)?;
        }
        let mut names = Vec::new();
        for (d, ev) in due.iter().zip(got) {
            let del = self.model.subs[s].dels.get_mut(&ev);
            let gen = del.map_or(0, |del| {
                del.handed = d.attempt;
                del.gen
            });
            let epoch = self.model.subs[s].epoch;
            self.world.add_push(Push {
                sub: s,
                ev,
                pos: d.offset,
                attempt: d.attempt,
                gen,
                epoch,
                due: d.clone(),
                answer: None,
                refused: false,
            });
            names.push(format!(
                "p{}:{}#{}",
                self.world.next_push - 1,
                ev_name(&self.model, ev),
                d.attempt
            ));
        }
        self.note(format!("    pushing [{}] next {next:?}", names.join(" ")));
        Ok(())
    }

    /// A committed lease: what it handed out must be allowed and complete.
    pub(super) fn leased(
        &mut self,
        sub: Sub,
        max: usize,
        lease_ms: u64,
        result: Result<WriteOutput>,
    ) -> std::result::Result<(), String> {
        let now = self.world.now;
        let out = ok(result, "lease")?;
        let WriteOutput::Leased { grants, next_due } = out else {
            return unexpected("lease", out);
        };
        let (high, pos) = (
            self.world.high,
            positions(&self.model, self.model.subs[sub].room),
        );
        let eligible = self.model.lease_eligible(sub, now);
        let mut got = Vec::new();
        for g in &grants {
            let Some(&ev) = pos.get(&g.offset) else {
                return Err(format!("s{sub} leased unknown position {}", g.offset));
            };
            if g.event_id != self.model.events[ev].id || g.lease_until != now.plus_ms(lease_ms) {
                return Err(format!(
                    "s{sub} lease grant {g:?} does not match {}",
                    ev_name(&self.model, ev)
                ));
            }
            allowed::handout(&self.model, sub, ev, g.attempt, &[], now, high)?;
            got.push(ev);
        }
        allowed::handout_set(&self.model, sub, &got, &eligible, max)?;
        if grants.is_empty() {
            let m = &self.model;
            let earliest = m.earliest(sub, now, |t| !m.lease_eligible(sub, t).is_empty());
            allowed::next_due(sub, next_due, earliest, now)?;
        }
        let mut names = Vec::new();
        for (g, ev) in grants.iter().zip(got) {
            self.model.lease_granted(sub, ev, g.attempt, g.lease_until);
            let epoch = self.model.subs[sub].epoch;
            self.world.add_lease(HeldLease {
                sub,
                ev,
                pos: g.offset,
                attempt: g.attempt,
                epoch,
            });
            names.push(format!("{}#{}", ev_name(&self.model, ev), g.attempt));
        }
        self.note(format!(
            "    leased [{}] next_due {next_due:?}",
            names.join(" ")
        ));
        Ok(())
    }

    /// A committed settle: each ack id is accepted exactly when it names the current lease,
    /// before it runs out.
    pub(super) fn settled(
        &mut self,
        sub: Sub,
        refs: Vec<(Ev, u32)>,
        action: AckAction,
        result: Result<WriteOutput>,
    ) -> std::result::Result<(), String> {
        let now = self.world.now;
        let out = ok(result, "settle")?;
        let WriteOutput::Settled(results) = out else {
            return unexpected("settle", out);
        };
        if results.len() != refs.len() {
            return Err(format!(
                "settle answered {} results for {} ack ids",
                results.len(),
                refs.len()
            ));
        }
        for ((ev, attempt), r) in refs.into_iter().zip(results) {
            let held = self.model.lease_held(sub, ev, attempt, now);
            match (held, r) {
                (true, Ok(())) => {
                    if matches!(action, AckAction::Ack) {
                        let epoch = self.world.lease_epoch(sub, ev, attempt).unwrap_or(0);
                        self.world.success(&self.model, sub, ev, epoch)?;
                    }
                    self.model.settle(sub, ev, action, now);
                    self.count("settles accepted", 1);
                }
                (false, Err(Error::LeaseNotHeld { .. })) => {
                    self.count("settles of a lease not held", 1);
                }
                (held, r) => {
                    return Err(format!(
                        "s{sub} {action:?} of {} attempt {attempt}: the engine answered {r:?}, but the lease is {}held",
                        ev_name(&self.model, ev),
                        if held { "" } else { "not " }
                    ))
                }
            }
        }
        Ok(())
    }
}
