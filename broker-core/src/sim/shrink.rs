//! Shrinking a failing seed to a short trace: the seed's generated steps are replayed with
//! chunks left out (delta debugging), keeping every removal after which the run still fails
//! the same way (the same message once numbers are set aside). Run with
//! `POSTROOM_SIM_SHRINK=1 POSTROOM_SIM_SEED=<n> cargo test --workspace --lib sim::`; the
//! shortest failing trace is printed. A step whose references no longer exist after a removal
//! (a push, an event, a seek) is skipped at its turn.

use super::backend::RedbFile;
use super::gen::Step;
use super::run::Sim;
use super::{SEEK_WITH_PUSH_IN_FLIGHT, STEPS};

/// Whether `step` makes sense now (what the generator would have checked).
pub(super) fn valid(sim: &Sim, step: &Step) -> bool {
    let (model, world) = (&sim.model, &sim.world);
    let sub_ok = |s: usize, push: Option<bool>| {
        s < model.subs.len() && push.is_none_or(|p| model.subs[s].push == p)
    };
    let ev_ok = |e: usize| e < model.events.len() && !model.events[e].gone;
    match step {
        Step::Answer { push, .. } => world.pushes.get(push).is_some_and(|p| p.answer.is_none()),
        Step::Record { push } => world.pushes.get(push).is_some_and(|p| p.answer.is_some()),
        Step::PushDue { sub } => {
            sub_ok(*sub, Some(true)) && (SEEK_WITH_PUSH_IN_FLIGHT || !world.seeks.contains_key(sub))
        }
        Step::Lease { sub, .. } => sub_ok(*sub, Some(false)),
        Step::Settle { sub, refs, .. } => {
            sub_ok(*sub, Some(false))
                && refs
                    .iter()
                    .all(|(e, pos, _)| ev_ok(*e) && model.events[*e].pos == *pos)
        }
        Step::SeekStart { sub, .. } => {
            sub_ok(*sub, None)
                && !world.seeks.contains_key(sub)
                && (SEEK_WITH_PUSH_IN_FLIGHT || world.pushing(*sub).is_empty())
        }
        Step::SeekNext { sub, .. } | Step::Status { sub, .. } => sub_ok(*sub, None),
        Step::Redrive { sub, evs, .. } => {
            sub_ok(*sub, None) && evs.iter().flatten().all(|e| ev_ok(*e))
        }
        Step::Stop { ev } => ev_ok(*ev),
        Step::Publish { room, .. } => *room < model.rooms.len(),
        Step::CreateSub(spec) => spec.room < model.rooms.len(),
        Step::FailOne | Step::DiskFull(_) => world.disk_full == 0,
        Step::Group(parts) => parts.iter().all(|p| valid(sim, p)),
        _ => true,
    }
}

fn replay(seed: u64, steps: &[Step], verbose: bool) -> Option<String> {
    let backend = RedbFile::new().ok()?;
    let mut sim = Sim::new(seed, Box::new(backend), verbose).ok()?;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.replay(steps)));
    match outcome {
        Ok(Ok(())) => None,
        Ok(Err((_, why))) => Some(why),
        Err(_) => Some("panicked".into()),
    }
}

/// The shortest list of steps found that fails as seed `seed` does, with its failure; `None`
/// when the seed passes.
pub(super) fn shrink(seed: u64) -> Option<(Vec<Step>, String)> {
    let backend = RedbFile::new().ok()?;
    let mut sim = Sim::new(seed, Box::new(backend), false).ok()?;
    let why = match sim.run(STEPS) {
        Ok(()) => return None,
        Err((_, why)) => why,
    };
    let want = super::kind(&why);
    let mut steps = sim.generated.clone();
    let fails =
        |steps: &[Step]| replay(seed, steps, false).is_some_and(|w| super::kind(&w) == want);
    if !fails(&steps) {
        return Some((steps, why));
    }
    let mut chunk = steps.len().div_ceil(2).max(1);
    loop {
        let mut start = 0;
        while start < steps.len() {
            let mut fewer = steps.clone();
            fewer.drain(start..(start + chunk).min(steps.len()));
            if fails(&fewer) {
                steps = fewer;
            } else {
                start += chunk;
            }
        }
        if chunk == 1 {
            break;
        }
        chunk = chunk.div_ceil(2);
    }
    let why = replay(seed, &steps, true).unwrap_or(why);
    Some((steps, why))
}
