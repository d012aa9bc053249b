//! One simulation run: set up Rooms, event types and subscriptions, then take generated steps,
//! checking after each one, then drain (faults off, every receiver succeeding, time moved past
//! every delay) and check that every obligation was met. Steps that do not write (moving the
//! clock, a dispatcher looking for due deliveries, a seek finding its position, a crash, arming
//! a fault) are executed here; writing steps go through `acts.rs`.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::SeedableRng;
use uuid::Uuid;

use crate::clock::Timestamp;
use crate::ids::{EventId, EventTypeName, RoomName, SubscriptionId};
use crate::storage::PublishTarget;

use super::acts::Act;
use super::backend::SimBackend;
use super::check::{self, ev_name};
use super::engine::{Engine, Op};
use super::gen::{self, Step, SubSpec};
use super::model::{Ev, MRoom, Model};
use super::world::World;
use super::{room_name, type_name, ROOMS_MAX, TYPES};

/// Every how many steps each event's state is also read through `event_deliveries`.
const FULL_CHECK_EVERY: usize = 8;

/// Where every simulation's clock starts: 2026-01-01.
const START: Timestamp = Timestamp(1_767_225_600_000);

/// A simulation in progress.
pub(super) struct Sim {
    backend: Box<dyn SimBackend>,
    engine: Option<Engine>,
    pub(super) model: Model,
    pub(super) world: World,
    pub(super) rng: StdRng,
    /// One line per step (and per notable result).
    pub(super) trace: Vec<String>,
    /// Steps executed so far (setup and drain included).
    pub(super) step: usize,
    pub(super) verbose: bool,
    rooms: usize,
    targets: BTreeMap<(usize, usize), PublishTarget>,
    next_id: u128,
    /// What happened, counted, to show what the generator reaches.
    pub(super) stats: BTreeMap<&'static str, u64>,
    /// The steps the generator chose, in order (for shrinking a failure).
    pub(super) generated: Vec<Step>,
}

impl Sim {
    /// Opens the backend and sets up one or two Rooms (the first ordered, the second not), their
    /// event types and a few subscriptions.
    pub(super) fn new(
        seed: u64,
        backend: Box<dyn SimBackend>,
        verbose: bool,
    ) -> Result<Sim, String> {
        Sim::build(seed, backend, verbose, None)
    }

    /// A simulation with the given subscriptions (for the checks' own tests).
    pub(super) fn with_subscriptions(seed: u64, specs: Vec<SubSpec>) -> Result<Sim, String> {
        let backend = super::backend::RedbFile::new().map_err(|e| e.to_string())?;
        Sim::build(seed, Box::new(backend), false, Some(specs))
    }

    fn build(
        seed: u64,
        mut backend: Box<dyn SimBackend>,
        verbose: bool,
        specs: Option<Vec<SubSpec>>,
    ) -> Result<Sim, String> {
        let engine = Engine::new(backend.open().map_err(|e| format!("open: {e}"))?);
        let mut rng = StdRng::seed_from_u64(seed);
        let rooms = 1 + usize::from(rand::Rng::random_bool(&mut rng, 0.5)).min(ROOMS_MAX - 1);
        let mut sim = Sim {
            backend,
            engine: Some(engine),
            model: Model::default(),
            world: World::new(START),
            rng,
            trace: Vec::new(),
            step: 0,
            verbose,
            rooms,
            targets: BTreeMap::new(),
            next_id: 0,
            stats: BTreeMap::new(),
            generated: Vec::new(),
        };
        let mut ops = Vec::new();
        for r in 0..rooms {
            let room = RoomName::new(room_name(r)).map_err(|e| e.to_string())?;
            let age_ms_max = rand::Rng::random_bool(&mut sim.rng, 0.5)
                .then(|| rand::Rng::random_range(&mut sim.rng, 20_000..200_000));
            ops.push(Op::CreateRoom {
                room: room.clone(),
                ordered: r == 0,
                age_ms_max,
            });
            for t in 0..TYPES {
                let name = EventTypeName::new(type_name(t)).map_err(|e| e.to_string())?;
                ops.push(Op::PutType {
                    room: room.clone(),
                    name,
                });
            }
            sim.model.rooms.push(MRoom {
                ordered: r == 0,
                age_ms_max,
                last_seq: BTreeMap::new(),
            });
        }
        let applied = sim
            .engine()
            .apply(START, ops)
            .map_err(|e| format!("setup: {e}"))?;
        if let Some(Err(e)) = applied.results.into_iter().find(|r| r.is_err()) {
            return Err(format!("setup: {e}"));
        }
        for r in 0..rooms {
            for t in 0..TYPES {
                let target = sim
                    .engine()
                    .publish_target(
                        &RoomName::new(room_name(r)).map_err(|e| e.to_string())?,
                        &EventTypeName::new(type_name(t)).map_err(|e| e.to_string())?,
                    )
                    .map_err(|e| format!("setup: {e}"))?;
                sim.targets.insert((r, t), target);
            }
        }
        let specs: Vec<Step> = match specs {
            Some(specs) => specs.into_iter().map(Step::CreateSub).collect(),
            None => {
                let subs = rand::Rng::random_range(&mut sim.rng, 2..=4);
                (0..subs)
                    .map(|_| Step::CreateSub(gen::sub_spec(&mut sim.rng, rooms)))
                    .collect()
            }
        };
        sim.exec(Step::Group(specs))
            .map_err(|e| format!("setup: {e}"))?;
        Ok(sim)
    }

    pub(super) fn engine(&self) -> &Engine {
        self.engine
            .as_ref()
            .unwrap_or_else(|| unreachable!("the engine is open between steps"))
    }

    pub(super) fn note(&mut self, line: impl Into<String>) {
        let line = line.into();
        if self.verbose {
            eprintln!("{line}");
        }
        self.trace.push(line);
    }

    pub(super) fn count(&mut self, what: &'static str, n: u64) {
        *self.stats.entry(what).or_insert(0) += n;
    }

    pub(super) fn new_event_id(&mut self) -> EventId {
        self.next_id += 1;
        EventId(Uuid::from_u128(
            0xE000_0000_0000_0000_0000_0000_0000_0000 | self.next_id,
        ))
    }

    pub(super) fn new_sub_id(&mut self) -> SubscriptionId {
        self.next_id += 1;
        SubscriptionId(Uuid::from_u128(
            0x5000_0000_0000_0000_0000_0000_0000_0000 | self.next_id,
        ))
    }

    pub(super) fn target(&self, room: usize, ty: usize) -> Result<PublishTarget, String> {
        self.targets
            .get(&(room, ty))
            .cloned()
            .ok_or_else(|| format!("no event type t{ty} in r{room}"))
    }

    /// Takes `steps` generated steps, then drains. On a violation: the step number and why.
    pub(super) fn run(&mut self, steps: usize) -> Result<(), (usize, String)> {
        for _ in 0..steps {
            let step = gen::next(&mut self.rng, &self.model, &self.world, self.rooms);
            self.generated.push(step.clone());
            self.exec(step).map_err(|e| (self.step, e))?;
        }
        self.finish()
    }

    /// Takes the given steps instead of generated ones, skipping those that make no sense at
    /// their turn (they name a push, an event or a seek that does not exist then), then drains.
    pub(super) fn replay(&mut self, steps: &[Step]) -> Result<(), (usize, String)> {
        for step in steps {
            if super::shrink::valid(self, step) {
                self.exec(step.clone()).map_err(|e| (self.step, e))?;
            }
        }
        self.finish()
    }

    /// The drain and the last full comparison.
    fn finish(&mut self) -> Result<(), (usize, String)> {
        self.drain().map_err(|e| (self.step, e))?;
        self.check(true).map_err(|e| (self.step, e))?;
        let mut ends = Vec::new();
        for sub in &self.model.subs {
            for d in sub.dels.values() {
                ends.push(match d.state {
                    super::model::DState::Dead(r) => r,
                    super::model::DState::Delivered => "delivered",
                    super::model::DState::Skipped => "seeked past",
                    super::model::DState::Owed(_) => "owed",
                });
            }
        }
        for e in ends {
            self.count(e, 1);
        }
        self.count("leases run out", self.model.expired);
        Ok(())
    }

    /// One step, then the comparison of engine and model (the full one every
    /// [`FULL_CHECK_EVERY`] steps and after a crash).
    pub(super) fn exec(&mut self, step: Step) -> Result<(), String> {
        self.step += 1;
        self.count(step.kind(), 1);
        let full = self.step.is_multiple_of(FULL_CHECK_EVERY) || matches!(step, Step::Crash);
        let t = self.world.now.ms_since(self.world.start);
        self.note(format!("{:>4} t+{t}ms {step:?}", self.step));
        match step {
            Step::Advance(ms) => self.world.set_now(self.world.now.plus_ms(ms)),
            Step::Back(ms) => {
                let back = Timestamp(self.world.now.0.saturating_sub(ms).max(self.world.start.0));
                self.world.set_now(back);
            }
            Step::PushDue { sub } => self.push_due(sub)?,
            Step::SeekStart { sub, target } => self.seek_start(sub, target)?,
            Step::Crash => self.crash()?,
            Step::FailOne => {
                self.engine().faults().fail_next_commits(1);
                self.world.fail_one = true;
            }
            Step::DiskFull(steps) => {
                self.engine().faults().fail_commits();
                self.world.disk_full = steps;
                self.world.fail_one = false;
            }
            Step::Group(parts) => {
                let mut planned = Vec::new();
                for p in &parts {
                    if let Some(x) = self.plan(p)? {
                        planned.push(x);
                    }
                }
                self.commit(planned)?;
            }
            step => {
                let planned = self.plan(&step)?.into_iter().collect();
                self.commit(planned)?;
            }
        }
        if self.world.disk_full > 0 {
            self.world.disk_full -= 1;
            if self.world.disk_full == 0 {
                self.engine().faults().clear();
                self.note("    the disk has room again");
            }
        }
        self.check(full)
    }

    /// Compares the engine with the model (see `check::reconcile`).
    pub(super) fn check(&mut self, full: bool) -> Result<(), String> {
        let (now, high) = (self.world.now, self.world.high);
        let engine = self.engine.as_ref().unwrap_or_else(|| unreachable!());
        check::reconcile(engine, &mut self.model, now, high, full)
    }

    /// Applies planned writes in one commit, as the writer does with a batch. A commit that
    /// makes something deliverable must wake its subscription (the writer wakes the
    /// dispatchers and pullers of the subscriptions the commit reports).
    fn commit(&mut self, planned: Vec<(Op, Act)>) -> Result<(), String> {
        if planned.is_empty() {
            return Ok(());
        }
        let injected = self.world.fail_one || self.world.disk_full > 0;
        let (ops, acts): (Vec<Op>, Vec<Act>) = planned.into_iter().unzip();
        let before = self.deliverable();
        let result = self.engine().apply(self.world.now, ops);
        self.world.fail_one = false;
        let applied = match result {
            Err(e) if injected => {
                self.note(format!("    commit failed: {e}"));
                self.count("commits failed", 1);
                acts.iter().for_each(|a| self.refused(a));
                return Ok(());
            }
            Err(e) => return Err(format!("a commit failed with no fault injected: {e}")),
            Ok(_) if injected => return Err("a commit succeeded although it was to fail".into()),
            Ok(applied) => applied,
        };
        if applied.results.len() != acts.len() {
            return Err(format!(
                "{} results for {} operations",
                applied.results.len(),
                acts.len()
            ));
        }
        for (a, r) in acts.into_iter().zip(applied.results) {
            self.after(a, r)?;
        }
        let after = self.deliverable();
        for (s, now) in after.iter().enumerate() {
            let was = before.get(s).cloned().unwrap_or_default();
            let id = self.model.subs[s].id;
            if let Some(ev) = now.difference(&was).next() {
                if !applied.touched.contains(&id) {
                    return Err(format!(
                        "the commit made {} deliverable to s{s} but does not wake s{s}",
                        ev_name(&self.model, *ev)
                    ));
                }
            }
        }
        Ok(())
    }

    /// Per subscription, what could be handed out now, pushes under way aside.
    fn deliverable(&self) -> Vec<BTreeSet<Ev>> {
        let now = self.world.now;
        (0..self.model.subs.len())
            .map(|s| {
                let evs = if self.model.subs[s].push {
                    self.model.push_eligible(s, now, &BTreeSet::new())
                } else {
                    self.model.lease_eligible(s, now)
                };
                evs.into_iter().collect()
            })
            .collect()
    }

    /// Drops the engine and opens it again from what was committed.
    fn crash(&mut self) -> Result<(), String> {
        self.engine = None;
        let opened = self
            .backend
            .open()
            .map_err(|e| format!("reopening after a crash failed: {e}"))?;
        let engine = Engine::new(opened);
        if self.world.disk_full > 0 {
            engine.faults().fail_commits();
        } else if self.world.fail_one {
            engine.faults().fail_next_commits(1);
        }
        self.engine = Some(engine);
        self.world.crash();
        self.model.crash();
        Ok(())
    }
}
