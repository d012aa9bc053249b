//! The end of every run: faults off, seeks finished, outcomes recorded, every subscription
//! resumed, then rounds of moving time past every delay and delivering whatever is due with
//! every receiver and puller succeeding, until nothing is owed. The checks keep running on every
//! drain step; what the drain itself adds is liveness (check 2): it must come to an end with
//! every obligation met.

use crate::clock::Timestamp;
use crate::storage::AckAction;
use crate::subscription::SubscriptionStatus;
use crate::webhook::PushResponse;

use super::check::ev_name;
use super::gen::Step;
use super::model::{Fate, Sub};
use super::run::Sim;

impl Sim {
    /// The end of a run: faults off, seeks finished, outcomes recorded, every subscription
    /// resumed, then rounds of moving time past every delay and delivering everything due with
    /// every receiver succeeding, until nothing is owed. Then (2): every event each subscription
    /// was to get was delivered or dead-lettered with a reason (or seeked past).
    pub(super) fn drain(&mut self) -> Result<(), String> {
        self.note("---- drain");
        self.world.disk_full = 0;
        self.world.fail_one = false;
        self.engine().faults().clear();
        let ok = PushResponse {
            status: Some(200),
            retry_after_ms: None,
            error: None,
            latency_ms: 1,
        };
        for _ in 0..1000 {
            let Some(&sub) = self.world.seeks.keys().next() else {
                break;
            };
            self.exec(Step::SeekNext { sub, limit: 1000 })?;
        }
        let pushes: Vec<(u64, bool)> = self
            .world
            .pushes
            .iter()
            .map(|(k, p)| (*k, p.answer.is_some()))
            .collect();
        for (push, answered) in pushes {
            self.exec(if answered {
                Step::Record { push }
            } else {
                Step::Answer {
                    push,
                    response: ok.clone(),
                }
            })?;
        }
        for sub in 0..self.model.subs.len() {
            if self.model.subs[sub].status != SubscriptionStatus::Active {
                self.exec(Step::Status {
                    sub,
                    to: SubscriptionStatus::Active,
                })?;
            }
        }
        let rounds = 10 + self.model.events.len() * self.model.subs.len();
        for _ in 0..rounds {
            if self.all_settled() && self.world.pushes.is_empty() {
                return Ok(());
            }
            let horizon = self.horizon();
            if horizon >= self.world.now {
                self.exec(Step::Advance(horizon.ms_since(self.world.now) + 1))?;
            }
            for sub in 0..self.model.subs.len() {
                while self.deliver_all(sub, &ok)? {}
            }
        }
        let owed: Vec<String> = (0..self.model.subs.len())
            .flat_map(|s| {
                self.model
                    .owed(s)
                    .map(move |(ev, o)| (s, ev, o.clone()))
                    .collect::<Vec<_>>()
            })
            .map(|(s, ev, o)| format!("s{s} {} {o:?}", ev_name(&self.model, ev)))
            .collect();
        Err(format!("the drain did not finish; still owed: {owed:?}"))
    }

    /// One round of delivering to `sub` with every receiver succeeding; whether anything went
    /// out.
    fn deliver_all(&mut self, sub: Sub, ok: &PushResponse) -> Result<bool, String> {
        if self.model.subs[sub].push {
            self.exec(Step::PushDue { sub })?;
            let mine: Vec<u64> = self
                .world
                .pushes
                .iter()
                .filter(|(_, p)| p.sub == sub)
                .map(|(k, _)| *k)
                .collect();
            let answers: Vec<Step> = mine
                .iter()
                .map(|&push| Step::Answer {
                    push,
                    response: ok.clone(),
                })
                .collect();
            if !answers.is_empty() {
                self.exec(Step::Group(answers))?;
            }
            return Ok(!mine.is_empty());
        }
        self.exec(Step::Lease {
            sub,
            max: 50,
            lease_ms: 60_000,
        })?;
        let now = self.world.now;
        let refs: Vec<_> = self
            .model
            .owed(sub)
            .filter_map(|(ev, o)| {
                o.lease
                    .filter(|l| l.until > now)
                    .map(|l| (ev, self.model.events[ev].pos, l.attempt))
            })
            .collect();
        if refs.is_empty() {
            return Ok(false);
        }
        self.exec(Step::Settle {
            sub,
            refs,
            action: AckAction::Ack,
        })?;
        Ok(true)
    }

    /// A time after which everything owed is due, absent new failures.
    fn horizon(&self) -> Timestamp {
        let mut t = self.world.now;
        for sub in &self.model.subs {
            for d in sub.dels.values() {
                let Some(o) = d.owed() else { continue };
                t = t.max(o.next_due);
                if let Some(l) = o.lease {
                    t = t.max(l.until);
                }
                if let Some(Fate::Retry(at)) = o.lease_fate(&sub.policy) {
                    t = t.max(at);
                }
            }
        }
        t
    }
}
