//! The world around the engine, as one thread plays it: the simulated clock, the pushes under
//! way (what `dispatch.rs` keeps in memory: a push's offset stays busy until its outcome is
//! recorded, and a subscription whose outcome record was refused starts no new push), the
//! leases pullers hold (ack ids, stale ones included), the seeks under way (one per
//! subscription, its steps run one at a time as `seek.rs` runs them), the storage faults in
//! force, and what each ordered subscription's receiver has successfully processed, per key.

use std::collections::BTreeMap;

use crate::clock::Timestamp;
use crate::webhook::PushResponse;

use super::check::ev_name;
use super::model::{Ev, Model, Sub};

/// A push under way: started by a dispatcher, perhaps answered, its outcome not yet recorded.
#[derive(Clone, Debug)]
pub(super) struct Push {
    pub sub: Sub,
    pub ev: Ev,
    pub pos: u64,
    pub attempt: u32,
    /// The delivery's generation when the push started.
    pub gen: u32,
    /// The subscription's order epoch when the push started.
    pub epoch: u32,
    /// What the engine handed out (its outcome names it).
    pub due: crate::storage::DueDelivery,
    /// The receiver's answer, once it has answered.
    pub answer: Option<PushResponse>,
    /// The writer refused to record the outcome at least once: the dispatcher holds back.
    pub refused: bool,
}

/// A lease a puller was given (kept after it ends, to settle with stale ack ids).
#[derive(Clone, Debug)]
pub(super) struct HeldLease {
    pub sub: Sub,
    pub ev: Ev,
    pub pos: u64,
    pub attempt: u32,
    pub epoch: u32,
}

/// The step a seek takes next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SeekPhase {
    /// Clearing the queue below `end`.
    Clear,
    /// Queueing again from this position up to `end`.
    Enqueue(u64),
    /// Letting the subscription go.
    Done,
}

/// A seek under way.
#[derive(Clone, Copy, Debug)]
pub(super) struct SeekProc {
    pub from: u64,
    pub end: u64,
    pub phase: SeekPhase,
}

/// Most stale leases kept for settling.
const LEASES_KEPT: usize = 48;

#[derive(Debug)]
pub(super) struct World {
    pub start: Timestamp,
    pub now: Timestamp,
    /// The latest time the clock has shown (it may step back from there).
    pub high: Timestamp,
    pub pushes: BTreeMap<u64, Push>,
    pub next_push: u64,
    pub leases: Vec<HeldLease>,
    pub seeks: BTreeMap<Sub, SeekProc>,
    /// Steps left of a full disk (every commit fails), 0 when there is room.
    pub disk_full: u32,
    /// The next commit fails.
    pub fail_one: bool,
    /// Per (ordered subscription, key): the order epoch and sequence of the last success.
    last_ok: BTreeMap<(Sub, usize), (u32, u64)>,
}

impl World {
    pub(super) fn new(start: Timestamp) -> World {
        World {
            start,
            now: start,
            high: start,
            pushes: BTreeMap::new(),
            next_push: 0,
            leases: Vec::new(),
            seeks: BTreeMap::new(),
            disk_full: 0,
            fail_one: false,
            last_ok: BTreeMap::new(),
        }
    }

    pub(super) fn set_now(&mut self, t: Timestamp) {
        self.now = t;
        self.high = self.high.max(t);
    }

    /// Events of `s` with a push under way.
    pub(super) fn pushing(&self, s: Sub) -> Vec<Ev> {
        self.pushes
            .values()
            .filter(|p| p.sub == s)
            .map(|p| p.ev)
            .collect()
    }

    /// The pushes of `s` under way (the dispatcher's busy set: positions and keys).
    pub(super) fn busy(&self, s: Sub) -> crate::storage::Busy {
        let mut busy = crate::storage::Busy::default();
        for p in self.pushes.values().filter(|p| p.sub == s) {
            busy.insert(p.pos, p.due.key.clone());
        }
        busy
    }

    /// Whether `s` holds back its pushes: an outcome of it waits to be recorded.
    pub(super) fn holding_back(&self, s: Sub) -> bool {
        self.pushes.values().any(|p| p.sub == s && p.refused)
    }

    pub(super) fn add_push(&mut self, p: Push) {
        self.pushes.insert(self.next_push, p);
        self.next_push += 1;
    }

    pub(super) fn add_lease(&mut self, l: HeldLease) {
        self.leases.push(l);
        if self.leases.len() > LEASES_KEPT {
            self.leases.remove(0);
        }
    }

    /// The order epoch a lease was handed out in.
    pub(super) fn lease_epoch(&self, s: Sub, ev: Ev, attempt: u32) -> Option<u32> {
        self.leases
            .iter()
            .rev()
            .find(|l| l.sub == s && l.ev == ev && l.attempt == attempt)
            .map(|l| l.epoch)
    }

    /// A crash: what lived in memory is gone; leases are durable and pullers keep their ack
    /// ids; a fault in force stays in force.
    pub(super) fn crash(&mut self) {
        self.pushes.clear();
        self.seeks.clear();
    }

    /// (3) Per-key order: a receiver of an ordered subscription processed `ev` successfully
    /// (a push answered 2xx, a lease acknowledged). Among the hand-outs made since the
    /// subscription last queued events again (a seek or a redrive: the order epoch), the
    /// successes of one key never go back in sequence. The same event again is allowed: a push
    /// whose outcome a crash lost is made again.
    pub(super) fn success(
        &mut self,
        model: &Model,
        s: Sub,
        ev: Ev,
        epoch: u32,
    ) -> Result<(), String> {
        let sub = &model.subs[s];
        if !sub.ordered || epoch != sub.epoch {
            return Ok(());
        }
        let e = &model.events[ev];
        let slot = self.last_ok.entry((s, e.key)).or_insert((epoch, 0));
        if slot.0 == epoch && e.seq < slot.1 {
            return Err(format!(
                "s{s} (ordered) processed {} after sequence {} of its key",
                ev_name(model, ev),
                slot.1
            ));
        }
        *slot = (epoch, e.seq);
        Ok(())
    }
}
