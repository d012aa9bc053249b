//! Deterministic simulation of the delivery engine (issue 15, item 4).
//!
//! Why: the delivery rules (ordering, leases, retries, dead letters, seek, redrive) were tested
//! only by examples, and the engine is about to be rewritten as policy over a narrow storage
//! interface. This test drives the engine through many random but replayable sequences of
//! operations and compares it, after every step, with a small reference model.
//!
//! # How it drives the engine
//! Only through the [`crate::storage::Storage`] interface (`engine.rs`), the way the writer, the
//! push dispatcher, the pull API and the seek task use it, but on one thread, with a simulated
//! clock passed into every call, and without tokio, the writer thread or HTTP, so that a seed
//! replays exactly. The store comes from a [`backend::SimBackend`] (the in-memory key-value
//! store for two seeds in four, the same store saying it is shared by several writers for a
//! third, so that sequences come from their rows and every batch is fenced (with one writer no
//! fence fails: conflicts are tested in `engine::shared_tests`), redb on a file in
//! `/dev/shm` for the fourth); a crash drops
//! every handle and opens the same committed data again. Storage faults
//! ([`crate::storage::StorageFaults`]) fail one commit, or every commit while "the disk is
//! full" for a few steps.
//!
//! Each seed sets up one or two Rooms (the first ordered), two event types and two to four
//! subscriptions (push or pull, ordered or not, some filtered by type, some with a tiny queue
//! bound, each with its own retry policy without jitter), then takes a few hundred weighted
//! steps (`gen.rs`): publish batches over a few keys; push dispatch, receivers answering 2xx,
//! 5xx, 400, a timeout, 410 Gone, 429 or 503 with Retry-After (above its cap too), and refused
//! outcome records retried; pull leases, then ack, nack (with and without a delay), extend and
//! terminate, also with stale ack ids and after the lease ran out; the clock moving forward and
//! sometimes back; seeks (to the oldest event, past the end, to a time) run step by step
//! between other operations; redrives (all, or by event); pause and resume; stopping an event;
//! new subscriptions; retention sweeps (a Room may have an age bound); crashes; failed commits;
//! several writes committed together as the writer batches them. Then it drains: faults off,
//! seeks finished, everything resumed, time moved past every delay, every receiver succeeding,
//! until nothing is owed.
//!
//! # What is checked
//! After every step (`check.rs`), against the model (`model.rs`, `rules.rs`):
//! 1. Nothing acknowledged is lost: every acknowledged event reads back with its Room, type,
//!    key, sequence, time and payload; a key's sequences are 1, 2, 3... in publish order without
//!    gaps or repeats, also across failed commits and crashes. Retention may remove an event
//!    only past its Room's age bound and when no subscription owes it (queued or dead-lettered).
//! 2. Each subscription gets each event at least once or dead-letters it with a reason: per
//!    subscription and event the engine's state (pending, leased, delivered, dead-lettered, or
//!    nothing) and attempt count are the model's; a dead letter has the model's reason
//!    (`queue_full`, `attempts_exhausted`, `ttl_expired`, `terminated`, `stopped`) and the
//!    event's key and sequence. At the end of the drain nothing is owed: every event a
//!    subscription was to get (published while it was active or paused, or queued by a seek)
//!    was delivered or dead-lettered, unless a seek deliberately skipped it.
//! 3. Per-key order, for ordered subscriptions. Every hand-out (a push started, a lease granted)
//!    is its key's head (the oldest event of the key the subscription still owes), while no
//!    other event of the key is out (leased, or being pushed); and a receiver's successes (a push
//!    answered 2xx, a lease acknowledged) of one key never go back in sequence among the
//!    hand-outs made since the subscription last queued events again: a seek or a redrive
//!    delivers older events again on purpose, so each one starts a new span, and a hand-out
//!    made before it belongs to the old span. The same event twice in a row is allowed (a push
//!    whose outcome a crash lost is made again: at least once). A push still under way whose
//!    delivery was stopped counts only with `STRICT_KEY_BLOCK_BY_ORPHANED_PUSH` (F3).
//! 4. Attempt numbers: each hand-out of a delivery carries a number above every number logged
//!    or handed out for it before (a push in flight is not logged, so after a crash its number
//!    may come again); the attempt log holds exactly the attempts the model knows, each saying
//!    what it came to (a number reused would show as a row saying something else).
//! 5. Counters: each subscription's stored backlog and dead-letter count equal the model's and
//!    a recount of its queue and of its listed dead letters; `deliveries_total` equals the sum;
//!    the queue health's count of leases held equals the model's (every eighth step).
//!
//! And on every hand-out: nothing while a subscription is paused, disabled or seeking; nothing
//! before it is due (a retry's backoff, a nack's delay, a receiver's Retry-After); a lease is
//! never handed to a second puller while it runs; a settle is accepted exactly when it names
//! the current lease, before it runs out; when fewer than asked are handed out, nothing
//! eligible was left out, and the time given to look again is no later than the first time
//! something falls due (a long-poll relies on it); a seek replays exactly the events received at
//! or after its time. And on every commit: one that makes something deliverable to a
//! subscription names it among those to wake (the dispatchers and long-polls rely on it).
//!
//! # Running it
//! `cargo test --workspace --lib sim::` runs seeds 0, 1, 2... for `POSTROOM_SIM_SECONDS`
//! (default 90) or `POSTROOM_SIM_SEEDS` seeds, from `POSTROOM_SIM_FIRST_SEED` (default 0), and
//! prints seeds per second and counts of what the runs reached (with `-- --nocapture`). A
//! failure names the seed, the step, the last steps and the command that replays it:
//! `POSTROOM_SIM_SEED=<n>` replays one seed with its step trace (shown when it fails, or with
//! `-- --nocapture`); with `POSTROOM_SIM_SHRINK=1`
//! it is shortened first (`shrink.rs`). `POSTROOM_SIM_SURVEY=1` does not stop at a failure but
//! lists the kinds of failure met, each with its first seed and how many seeds met it.
//!
//! Switches below turn off what found a defect (see `SIM-FINDINGS.md`); each names what it
//! leaves out.

mod acts;
mod allowed;
mod backend;
mod check;
mod drain;
mod engine;
mod gen;
mod handouts;
mod model;
mod rules;
mod run;
mod seek;
mod selftest;
mod shrink;
mod world;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use crate::ids::EventId;

/// Steps per seed, before the drain.
const STEPS: usize = 200;
/// Rooms per seed at most.
const ROOMS_MAX: usize = 2;
/// Event types per Room.
const TYPES: usize = 2;
/// Ordering keys per Room.
const KEYS: usize = 3;
/// Subscriptions per seed at most.
const SUBS_MAX: usize = 5;
/// How many trace lines a failure shows.
const TRACE_SHOWN: usize = 20;

// Switches for what the simulation found (`SIM-FINDINGS.md`). Each stays `false` while its
// defect stands and says what that leaves out; set it to `true` to reproduce the finding.

/// F3 (fixed: the dispatcher tells `due` the keys of its pushes under way, so a push holds its
/// key whatever became of its delivery: stopped, seeked past, removed). `true`: check 3
/// (per-key order) also counts a push still under way whose delivery was stopped meanwhile: it
/// still blocks its key, and its receiver's success is judged for order. `false` leaves such a
/// push out of both.
const STRICT_KEY_BLOCK_BY_ORPHANED_PUSH: bool = true;
/// F2 (fixed: an outcome names the queueing of the delivery it was handed out from, and one of
/// an earlier queueing only logs its attempt). `true`: a seek is also started while a push of
/// its subscription is under way, and a push may start between a seek's start and its first
/// step. `false` generates neither.
const SEEK_WITH_PUSH_IN_FLIGHT: bool = true;
/// F1 (fixed: acceptance times never go back within a Room). `true`: the events a seek by time
/// replays are checked also in a Room whose receive times went back (the clock stepped back
/// between publishes). `false` checks them only where receive times rise with the log.
const CHECK_SEEK_BY_TIME_AFTER_STEP_BACK: bool = true;

fn room_name(i: usize) -> String {
    format!("r{i}")
}

fn type_name(i: usize) -> String {
    format!("t{i}")
}

fn key_name(i: usize) -> String {
    format!("k{i}")
}

/// The payload published with an event id.
fn payload(id: EventId) -> Vec<u8> {
    format!("{{\"id\":\"{id}\"}}").into_bytes()
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not `{v}`"))
    })
}

/// Runs one seed; on a violation (or a panic) why, and the report to show. Adds what happened
/// to `stats`.
fn run_seed(
    seed: u64,
    verbose: bool,
    stats: &mut std::collections::BTreeMap<&'static str, u64>,
) -> Result<usize, (String, String)> {
    // One seed in four runs on redb on a file, one on the in-memory store saying it is shared
    // by several writers, the others on the in-memory store; every seed on PostgreSQL when
    // `POSTROOM_SIM_BACKEND=postgres`.
    let backend: Box<dyn backend::SimBackend> = match seed % 4 {
        _ if on_postgres() => Box::new(backend::Postgres::new()),
        0 => Box::new(
            backend::RedbFile::new().map_err(|e| (e.to_string(), format!("seed {seed}: {e}")))?,
        ),
        2 => Box::new(backend::Memory::shared()),
        _ => Box::<backend::Memory>::default(),
    };
    let mut sim =
        run::Sim::new(seed, backend, verbose).map_err(|e| (e.clone(), report(seed, 0, &e, &[])))?;
    let outcome = catch_unwind(AssertUnwindSafe(|| sim.run(STEPS)));
    for (k, v) in &sim.stats {
        *stats.entry(k).or_insert(0) += v;
    }
    let (step, why) = match outcome {
        Ok(Ok(())) => return Ok(sim.step),
        Ok(Err(e)) => e,
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            (sim.step, format!("panicked: {text}"))
        }
    };
    let report = report(seed, step, &why, &sim.trace);
    Err((why, report))
}

fn report(seed: u64, step: usize, why: &str, trace: &[String]) -> String {
    let shown = &trace[trace.len().saturating_sub(TRACE_SHOWN)..];
    let backend = if on_postgres() {
        "POSTROOM_SIM_BACKEND=postgres "
    } else {
        ""
    };
    format!(
        "simulation failed: seed {seed}, step {step}: {why}\nlast steps:\n{}\nreplay with: \
         {backend}POSTROOM_SIM_SEED={seed} cargo test --workspace --lib sim::",
        shown.join("\n")
    )
}

/// Whether every seed runs on PostgreSQL: `POSTROOM_SIM_BACKEND=postgres`, or within
/// [`simulation_runs_seeds_on_postgres`].
fn on_postgres() -> bool {
    ON_POSTGRES.with(|p| p.get())
        || std::env::var("POSTROOM_SIM_BACKEND").is_ok_and(|b| b.eq_ignore_ascii_case("postgres"))
}

thread_local! {
    /// Set by the PostgreSQL run for the seeds of its own thread.
    static ON_POSTGRES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A failure's kind: its message without numbers, lists or structures.
fn kind(why: &str) -> String {
    let mut depth = 0usize;
    let mut out = String::new();
    for c in why.chars() {
        match c {
            '[' | '{' => {
                if depth == 0 {
                    out.push_str("..");
                }
                depth += 1;
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            c if depth == 0 && !c.is_ascii_digit() => out.push(c),
            _ => {}
        }
    }
    out
}

/// The same seeds on PostgreSQL (issue 16, item 6), for `POSTROOM_SIM_PG_SECONDS` (default
/// 20; a commit there is a round trip, so a seed takes about a second) or
/// `POSTROOM_SIM_PG_SEEDS` seeds, from `POSTROOM_SIM_PG_FIRST_SEED` (default 0). A failure
/// prints the command that replays its seed on PostgreSQL.
#[test]
fn simulation_runs_seeds_on_postgres() {
    crate::engine::CHECK_READY_INDEX.store(true, std::sync::atomic::Ordering::Relaxed);
    ON_POSTGRES.with(|p| p.set(true));
    let budget = Duration::from_secs(env_u64("POSTROOM_SIM_PG_SECONDS").unwrap_or(20));
    let count = env_u64("POSTROOM_SIM_PG_SEEDS");
    let first = env_u64("POSTROOM_SIM_PG_FIRST_SEED").unwrap_or(0);
    let started = Instant::now();
    let (mut seeds, mut steps) = (0u64, 0usize);
    let mut stats = std::collections::BTreeMap::new();
    // At least one seed, however slow the machine.
    while seeds == 0 || count.map_or(started.elapsed() < budget, |c| seeds < c) {
        match run_seed(first + seeds, false, &mut stats) {
            Ok(n) => steps += n,
            Err((_, report)) => panic!("{report}"),
        }
        seeds += 1;
    }
    eprintln!(
        "simulation on postgres: {seeds} seeds ({first}..{}) and {steps} steps in {:.1} s",
        first + seeds,
        started.elapsed().as_secs_f64()
    );
}

/// Runs seeds 0, 1, 2... within the time budget (see the module doc), or the one seed
/// `POSTROOM_SIM_SEED` names, with its trace.
#[test]
fn simulation_runs_seeds_within_budget() {
    // Every batch also checks the ready index against the queues.
    crate::engine::CHECK_READY_INDEX.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(seed) = env_u64("POSTROOM_SIM_SEED") {
        if env_u64("POSTROOM_SIM_SHRINK").is_some_and(|s| s != 0) {
            match shrink::shrink(seed) {
                None => eprintln!("simulation: seed {seed} passes; nothing to shrink"),
                Some((steps, why)) => panic!(
                    "seed {seed} shrunk to {} steps (the trace above), failing with: {why}",
                    steps.len()
                ),
            }
            return;
        }
        match run_seed(seed, true, &mut Default::default()) {
            Ok(steps) => eprintln!("simulation: seed {seed} passed ({steps} steps)"),
            Err((_, report)) => panic!("{report}"),
        }
        return;
    }
    let budget = Duration::from_secs(env_u64("POSTROOM_SIM_SECONDS").unwrap_or(90));
    let count = env_u64("POSTROOM_SIM_SEEDS");
    let first = env_u64("POSTROOM_SIM_FIRST_SEED").unwrap_or(0);
    let started = Instant::now();
    // With POSTROOM_SIM_SURVEY=1 a failure does not stop the run: the distinct failures are
    // listed at the end (numbers set aside), each with how many seeds and the first one.
    let survey = env_u64("POSTROOM_SIM_SURVEY").is_some_and(|s| s != 0);
    let mut failures: std::collections::BTreeMap<String, (u64, u64, String)> = Default::default();
    let (mut seeds, mut steps) = (0u64, 0usize);
    let mut stats = std::collections::BTreeMap::new();
    while count.map_or(started.elapsed() < budget, |c| seeds < c) {
        let seed = first + seeds;
        match run_seed(seed, false, &mut stats) {
            Ok(n) => steps += n,
            Err((why, _)) if survey => {
                failures.entry(kind(&why)).or_insert((0, seed, why)).0 += 1;
            }
            Err((_, report)) => panic!("{report}"),
        }
        seeds += 1;
    }
    for (n, seed, why) in failures.values() {
        eprintln!("simulation survey: {n} seeds, first seed {seed}: {why}");
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "simulation: {seeds} seeds ({first}..{}) and {steps} steps in {secs:.1} s: {:.1} seeds/s",
        first + seeds,
        seeds as f64 / secs.max(1e-9)
    );
    let counts: Vec<String> = stats.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    eprintln!("simulation counts: {}", counts.join(", "));
}
