//! Proof that the checks can fail: each test feeds a checker a deliberately broken state or
//! trace (a lost event, an attempt number handed out twice, an out-of-order hand-out or
//! success, a wrong counter, an engine changed behind the model's back, a late wake-up, an
//! eligible delivery left out) and asserts that it is reported; and proof that a seed replays
//! exactly.

use super::allowed;
use super::backend::RedbFile;
use super::check;
use super::engine::Op;
use super::gen::{Step, SubSpec};
use super::model::{MEvent, Policy};
use super::run::Sim;

fn spec(push: bool, ordered: bool) -> SubSpec {
    SubSpec {
        room: 0,
        push,
        ordered: Some(ordered),
        ty: None,
        policy: Policy {
            initial_ms: 1000,
            doubling: false,
            delay_max_ms: 1000,
            attempts_max: 5,
            ttl_ms: 10_000_000_000,
        },
        in_flight_max: 2,
        queue_depth_max: 1000,
    }
}

/// One ordered pull subscription, and events e0, e1 of key k0 and e2 of key k1.
fn pull_sim() -> Sim {
    let mut sim = Sim::with_subscriptions(1, vec![spec(false, true)]).expect("sim");
    sim.exec(Step::Publish {
        room: 0,
        items: vec![(0, 0), (0, 0), (0, 1)],
    })
    .expect("publish");
    sim
}

fn expect_err(r: Result<(), String>, needle: &str) {
    match r {
        Err(e) if e.contains(needle) => {}
        other => panic!("expected a violation mentioning `{needle}`, got {other:?}"),
    }
}

#[test]
fn the_checks_pass_on_the_engine_as_it_is() {
    let mut sim = pull_sim();
    sim.exec(Step::Lease {
        sub: 0,
        max: 3,
        lease_ms: 5000,
    })
    .expect("lease");
    let refs = vec![(0, sim.model.events[0].pos, 1)];
    sim.exec(Step::Settle {
        sub: 0,
        refs,
        action: crate::storage::AckAction::Ack,
    })
    .expect("ack");
    sim.check(true).expect("the engine agrees with the model");
}

#[test]
fn a_lost_event_is_reported() {
    let mut sim = pull_sim();
    let mut ghost: MEvent = sim.model.events[2].clone();
    ghost.id = sim.new_event_id();
    ghost.seq = 2;
    sim.model.events.push(ghost);
    expect_err(sim.check(false), "is lost");
}

#[test]
fn an_attempt_number_handed_out_twice_is_reported() {
    let mut sim = pull_sim();
    sim.exec(Step::Lease {
        sub: 0,
        max: 1,
        lease_ms: 5000,
    })
    .expect("lease");
    let (now, high) = (sim.world.now, sim.world.high);
    // As if the engine handed attempt 1 of e0 out again.
    expect_err(
        allowed::handout(&sim.model, 0, 0, 1, &[], now, high),
        "as attempt 1",
    );
    // As if the engine's log kept an attempt the model does not know of.
    sim.model.subs[0].dels.get_mut(&0).expect("e0").rows.clear();
    expect_err(sim.check(false), "attempt numbers logged [1]");
}

#[test]
fn an_out_of_order_delivery_is_reported() {
    let mut sim = pull_sim();
    let (now, high) = (sim.world.now, sim.world.high);
    // e1 handed out while e0, before it in key k0, is still owed.
    expect_err(
        allowed::handout(&sim.model, 0, 1, 1, &[], now, high),
        "before its key's head",
    );
    // A receiver that processed e1, then e0.
    let model = sim.model.clone();
    sim.world.success(&model, 0, 1, 0).expect("e1 first");
    expect_err(sim.world.success(&model, 0, 0, 0), "after sequence 2");
}

#[test]
fn a_wrong_counter_is_reported() {
    let sim = pull_sim();
    let id = sim.model.subs[0].id;
    let mut sub = sim.engine().subscription(id).expect("subscription");
    check::counters(&sim.model, 0, &sub, 3, 0).expect("the counters agree");
    expect_err(check::counters(&sim.model, 0, &sub, 2, 0), "backlog");
    sub.backlog += 1;
    expect_err(check::counters(&sim.model, 0, &sub, 3, 0), "backlog");
    sub.backlog -= 1;
    sub.dead_letters = 1;
    expect_err(check::counters(&sim.model, 0, &sub, 3, 0), "dead letters");
}

#[test]
fn an_engine_changed_behind_the_model_is_reported() {
    let mut sim = pull_sim();
    let event = sim.model.events[0].id;
    let now = sim.world.now;
    sim.engine()
        .apply(now, vec![Op::Stop { event }])
        .expect("a stop the model does not know of");
    expect_err(sim.check(false), "s0 e0(k0#1): the engine has Dead");
}

#[test]
fn a_late_or_missing_wake_up_time_is_reported() {
    let now = crate::clock::Timestamp(1000);
    let at = |ms| Some(now.plus_ms(ms));
    allowed::next_due(0, at(3), at(5), now).expect("early is fine");
    allowed::next_due(0, at(5), at(5), now).expect("on time is fine");
    expect_err(allowed::next_due(0, at(10), at(5), now), "falls due at");
    expect_err(allowed::next_due(0, None, at(5), now), "nothing said");
    expect_err(allowed::next_due(0, Some(now), None, now), "not after now");
}

#[test]
fn an_eligible_delivery_left_out_is_reported() {
    let sim = pull_sim();
    let eligible = sim.model.lease_eligible(0, sim.world.now);
    assert_eq!(eligible, vec![0, 2], "the heads of k0 and k1");
    allowed::handout_set(&sim.model, 0, &[0, 2], &eligible, 4).expect("all of them");
    allowed::handout_set(&sim.model, 0, &[0], &eligible, 1).expect("as many as asked");
    expect_err(
        allowed::handout_set(&sim.model, 0, &[0], &eligible, 4),
        "leaving out eligible",
    );
    expect_err(
        allowed::handout_set(&sim.model, 0, &[1], &eligible, 4),
        "not eligible",
    );
    expect_err(
        allowed::handout_set(&sim.model, 0, &[0, 0], &eligible, 4),
        "twice at once",
    );
}

#[test]
fn a_seed_replays_exactly() {
    let trace = |seed| {
        let backend = RedbFile::new().expect("backend");
        let mut sim = Sim::new(seed, Box::new(backend), false).expect("sim");
        sim.run(60).expect("the seed passes");
        sim.trace
    };
    let first = trace(3);
    assert!(first.len() > 60);
    assert_eq!(first, trace(3));
}

/// One push subscription, one push at a time, one event e0, pushed (push 0) and then the
/// subscription sought to the oldest event and cleared while that push is under way.
fn seek_during_push(ordered: bool) -> Sim {
    let mut one = spec(true, ordered);
    one.in_flight_max = 1;
    let mut sim = Sim::with_subscriptions(2, vec![one]).expect("sim");
    sim.exec(Step::Publish {
        room: 0,
        items: vec![(0, 0)],
    })
    .expect("publish");
    sim.exec(Step::PushDue { sub: 0 }).expect("push e0");
    sim.exec(Step::SeekStart {
        sub: 0,
        target: None,
    })
    .expect("seek start");
    sim.exec(Step::SeekNext { sub: 0, limit: 10 })
        .expect("seek: clear");
    sim
}

fn answer(push: u64, status: u16) -> Step {
    Step::Answer {
        push,
        response: crate::webhook::PushResponse {
            status: Some(status),
            retry_after_ms: None,
            error: None,
            latency_ms: 5,
        },
    }
}

/// Simulation finding F2 (a): the push under way fails after the seek cleared its delivery and
/// before it queued it again. Its attempt is logged, and the replay's push gets the next
/// number, not the same one (before the fix: "handed out e0 as attempt 1, but ... 1 handed out
/// before").
#[test]
fn a_push_answered_during_a_seek_keeps_its_attempt_number() {
    for ordered in [false, true] {
        let mut sim = seek_during_push(ordered);
        sim.exec(answer(0, 503)).expect("the old push fails");
        sim.exec(Step::SeekNext { sub: 0, limit: 10 })
            .expect("seek: queue again");
        sim.exec(Step::SeekNext { sub: 0, limit: 10 })
            .expect("seek: done");
        sim.exec(Step::PushDue { sub: 0 })
            .expect("the replay goes out as attempt 2");
        sim.exec(answer(1, 200)).expect("the replay is delivered");
        sim.check(true).expect("agrees with the model");
    }
}

/// Simulation finding F2 (b): the push under way succeeds after the seek queued its event
/// again. That answer is not taken for the replay's (before the fix: "the engine has
/// Delivered, the model Queued"): the replay still goes out, under the next number.
#[test]
fn a_push_answered_after_a_seek_does_not_complete_the_replay() {
    for ordered in [false, true] {
        let mut sim = seek_during_push(ordered);
        sim.exec(Step::SeekNext { sub: 0, limit: 10 })
            .expect("seek: queue again");
        sim.exec(Step::SeekNext { sub: 0, limit: 10 })
            .expect("seek: done");
        sim.exec(answer(0, 200)).expect("the old push succeeds");
        sim.exec(Step::PushDue { sub: 0 })
            .expect("the replay goes out as attempt 2");
        sim.exec(answer(1, 200)).expect("the replay is delivered");
        sim.check(true).expect("agrees with the model");
    }
}
