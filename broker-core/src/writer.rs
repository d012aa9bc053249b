//! The single writer with group commit. redb allows one write transaction at a time and each
//! durable commit costs an fsync (about 0.4 ms on the development machine), so one commit per
//! event would cap the broker near 2,000 events/s. Instead every mutation goes through one bounded
//! queue to one thread, which takes whatever is waiting (up to a batch limit), applies it all in
//! one transaction, commits once, and only then answers each caller.
//!
//! The queue is bounded in operations and in payload bytes; when either is full a caller gets
//! `Overloaded` at once rather than memory growing without bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::clock::Clock;
use crate::config::WriterConfig;
use crate::error::{Error, Result};
use crate::ids::SubscriptionId;
use crate::storage::{Storage, WriteOp, WriteOutput};

/// Called on the writer thread after each commit with the subscriptions whose queues changed
/// and what the batch did that operators count.
/// Called on the writer thread after each successful commit, before any caller hears back:
/// the subscriptions whose queues changed, what operators count, and whether the batch may
/// have changed who may do what.
pub(crate) type OnCommit =
    Arc<dyn Fn(&[SubscriptionId], &[crate::storage::Observation], bool) + Send + Sync>;

struct Job {
    op: WriteOp,
    bytes: usize,
    reply: oneshot::Sender<Result<WriteOutput>>,
}

/// Counters the writer keeps about itself, for tests and benchmarks; [`crate::telemetry`]
/// exports the same points as metrics.
#[derive(Default, Debug)]
pub(crate) struct WriterStats {
    pub commits: std::sync::atomic::AtomicU64,
    pub ops: std::sync::atomic::AtomicU64,
    /// Whether and since when commits fail; `None` while they succeed.
    pub failing: Mutex<Option<Failing>>,
    /// `failing.is_some()`, read without the lock on every successful commit.
    failing_now: std::sync::atomic::AtomicBool,
}

/// Commits failing in a row: since when, how many, and why (the last error).
#[derive(Clone, Debug)]
pub(crate) struct Failing {
    pub since: crate::clock::Timestamp,
    pub commits: u64,
    pub last_error: String,
    /// When the last log line about it was written, and the count then.
    logged_at: Instant,
    logged_commits: u64,
}

pub(crate) struct Writer {
    tx: Mutex<Option<SyncSender<Job>>>,
    queued_bytes: Arc<AtomicUsize>,
    config: WriterConfig,
    thread: Mutex<Option<JoinHandle<()>>>,
    pub(crate) stats: Arc<WriterStats>,
}

impl Writer {
    pub(crate) fn start(
        store: Arc<dyn Storage>,
        clock: Arc<dyn Clock>,
        config: WriterConfig,
        on_commit: OnCommit,
    ) -> Result<Writer> {
        let (tx, rx) = mpsc::sync_channel(config.queue_ops_max.max(1));
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(WriterStats::default());
        let thread = {
            let queued_bytes = queued_bytes.clone();
            let stats = stats.clone();
            let config = config.clone();
            std::thread::Builder::new()
                .name("postroom-writer".into())
                .spawn(move || run(rx, store, clock, config, queued_bytes, stats, on_commit))
                .map_err(|e| Error::Storage(format!("cannot start writer thread: {e}")))?
        };
        Ok(Writer {
            tx: Mutex::new(Some(tx)),
            queued_bytes,
            config,
            thread: Mutex::new(Some(thread)),
            stats,
        })
    }

    /// Queues `op` and waits for its durable result.
    pub(crate) async fn submit(&self, op: WriteOp) -> Result<WriteOutput> {
        let bytes = op.bytes();
        let overloaded = Error::Overloaded {
            retry_after_ms: self.config.overload_retry_after_ms,
        };
        // Reserve the bytes first so that the byte bound holds even under a race of submitters.
        let before = self.queued_bytes.fetch_add(bytes, Ordering::SeqCst);
        if before > 0 && before + bytes > self.config.queue_bytes_max {
            self.queued_bytes.fetch_sub(bytes, Ordering::SeqCst);
            return Err(overloaded);
        }
        let (reply, rx) = oneshot::channel();
        let sent = {
            let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
            match guard.as_ref() {
                None => Err(Error::ShuttingDown),
                Some(tx) => match tx.try_send(Job { op, bytes, reply }) {
                    Ok(()) => Ok(()),
                    Err(TrySendError::Full(_)) => Err(overloaded),
                    Err(TrySendError::Disconnected(_)) => Err(Error::ShuttingDown),
                },
            }
        };
        if let Err(e) = sent {
            self.queued_bytes.fetch_sub(bytes, Ordering::SeqCst);
            return Err(e);
        }
        // The writer drops the reply only if it died; the caller learns the outcome is unknown
        // as "shutting down", never as success.
        rx.await.unwrap_or(Err(Error::ShuttingDown))
    }

    /// Whether the writer takes operations: not closed, and its thread has not ended (it ends
    /// only when closed, or if it panicked).
    pub(crate) fn is_running(&self) -> bool {
        let open = self.tx.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        let alive = self
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|h| !h.is_finished());
        open && alive
    }

    /// Stops taking new operations, lets the writer finish what is queued, and waits for it.
    pub(crate) fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// How often, at most, a failing writer asks the backend to recover.
const RECOVER_INTERVAL: Duration = Duration::from_millis(250);

/// After failed commits the backend may need to reopen its file (redb refuses every write after
/// an I/O error until then, and a reopen drops what was volatile): gives it the chance, at most
/// once per [`RECOVER_INTERVAL`], so that writes resume by themselves once the cause (a full
/// disk) is gone. Nothing to do while commits succeed.
fn recover_if_failing(
    store: &dyn Storage,
    stats: &WriterStats,
    last_recover: &mut Option<Instant>,
) -> Result<()> {
    if !stats.failing_now.load(Ordering::Acquire)
        || last_recover.is_some_and(|t: Instant| t.elapsed() < RECOVER_INTERVAL)
    {
        return Ok(());
    }
    *last_recover = Some(Instant::now());
    store.recover().inspect_err(|e| {
        tracing::debug!(error = %e, "the storage backend could not recover yet");
    })
}

/// The next job, or `None` when every sender is gone and the queue is drained. While a commit
/// is volatile (leases, pullers' settles), the writer makes it durable by `sync_at` whatever
/// arrives meanwhile (jobs that write nothing, such as empty pulls, included), so that a crash
/// undoes at most `volatile_sync_ms` of such writes; their messages are then offered again.
fn next_job(
    rx: &Receiver<Job>,
    store: &dyn Storage,
    clock: &dyn Clock,
    config: &WriterConfig,
    stats: &WriterStats,
    sync_at: &mut Option<Instant>,
    last_recover: &mut Option<Instant>,
) -> Option<Job> {
    while let Some(at) = *sync_at {
        let now = Instant::now();
        if now < at {
            match rx.recv_timeout(at - now) {
                Ok(job) => return Some(job),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // Closing: a clean close keeps volatile commits too, but say so explicitly.
                    let _ = store.sync();
                    return None;
                }
            }
        }
        match recover_if_failing(store, stats, last_recover).and_then(|()| store.sync()) {
            Ok(()) => {
                note_success(stats);
                *sync_at = None;
            }
            // Counted like a failed commit (writes are likely refused too); tried again after
            // the recovery interval.
            Err(e) => {
                note_failure(stats, config, clock.now(), &e.to_string(), 0);
                *sync_at = Some(Instant::now() + RECOVER_INTERVAL);
            }
        }
    }
    rx.recv().ok()
}

fn run(
    rx: Receiver<Job>,
    store: Arc<dyn Storage>,
    clock: Arc<dyn Clock>,
    config: WriterConfig,
    queued_bytes: Arc<AtomicUsize>,
    stats: Arc<WriterStats>,
    on_commit: OnCommit,
) {
    let ops_max = config.commit_ops_max.max(1);
    let linger_max = Duration::from_micros(config.commit_wait_us);
    // Lingering ends when no operation arrives for this long.
    let linger_gap = linger_max / 4;
    let mut last_batch_len = 0usize;
    let mut last_recover: Option<Instant> = None;
    // When the volatile commits not yet durable must be made so; `None` while none is.
    let mut sync_at: Option<Instant> = None;
    // Returns when every sender is gone and the queue is drained.
    while let Some(first) = next_job(
        &rx,
        &*store,
        &*clock,
        &config,
        &stats,
        &mut sync_at,
        &mut last_recover,
    ) {
        let mut batch_bytes = first.bytes;
        let mut batch = vec![first];
        // Linger only under load (the previous batch had company): the publishers just answered
        // are about to send their next operation, and one fsync for all of them is cheaper than
        // one each. A lone publisher never waits.
        let linger = last_batch_len > 1 && !linger_max.is_zero();
        let deadline = Instant::now() + linger_max;
        while batch.len() < ops_max && batch_bytes < config.commit_bytes_max {
            let next = match rx.try_recv() {
                Ok(job) => Some(job),
                Err(_) if !linger => None,
                Err(_) => {
                    let left = deadline
                        .saturating_duration_since(Instant::now())
                        .min(linger_gap);
                    // A timeout or a closed queue both end the batch.
                    rx.recv_timeout(left).ok()
                }
            };
            match next {
                Some(job) => {
                    batch_bytes += job.bytes;
                    batch.push(job);
                }
                None => break,
            }
        }
        last_batch_len = batch.len();
        queued_bytes.fetch_sub(batch_bytes, Ordering::SeqCst);
        // On a store other brokers write too, publishes lose races to the other nodes'
        // publishes (they number the same Rooms), and a lost race fails the whole commit:
        // everything else (push outcomes, acks, lease renewals) then commits apart from them,
        // so that it does not fail with them.
        // Sweeps, which other nodes' sweeps race, commit apart too.
        let groups = if store.shared() {
            let (publishes, rest): (Vec<Job>, Vec<Job>) = batch
                .into_iter()
                .partition(|j| matches!(j.op, WriteOp::Publish(_)));
            let (sweeps, rest): (Vec<Job>, Vec<Job>) = rest
                .into_iter()
                .partition(|j| matches!(j.op, WriteOp::Sweep { .. }));
            vec![rest, sweeps, publishes]
        } else {
            vec![batch]
        };
        for group in groups.into_iter().filter(|g| !g.is_empty()) {
            let ctx = Commit {
                store: &*store,
                clock: &*clock,
                config: &config,
                stats: &stats,
                on_commit: &on_commit,
            };
            ctx.commit(group, &mut last_recover, &mut sync_at);
        }
    }
}

/// What committing one group of operations needs from the writer.
struct Commit<'a> {
    store: &'a dyn Storage,
    clock: &'a dyn Clock,
    config: &'a WriterConfig,
    stats: &'a WriterStats,
    on_commit: &'a OnCommit,
}

impl Commit<'_> {
    /// Applies `jobs` in one transaction and answers each.
    fn commit(
        &self,
        jobs: Vec<Job>,
        last_recover: &mut Option<Instant>,
        sync_at: &mut Option<Instant>,
    ) {
        let Commit {
            store,
            clock,
            config,
            stats,
            on_commit,
        } = *self;
        let (ops, replies): (Vec<_>, Vec<_>) = jobs.into_iter().map(|j| (j.op, j.reply)).unzip();
        let n = ops.len();
        let rights_changed = ops.iter().any(WriteOp::may_change_rights);
        let outcome = recover_if_failing(store, stats, last_recover)
            .and_then(|()| store.apply(clock.now(), ops));
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats.ops.fetch_add(n as u64, Ordering::Relaxed);
        // The same points as the counters above, exported for operators.
        crate::telemetry::commit(n);
        match outcome {
            Ok(applied) => {
                note_success(stats);
                *sync_at = match (applied.unsynced, *sync_at) {
                    (false, _) => None,
                    (true, Some(at)) => Some(at),
                    (true, None) => {
                        Some(Instant::now() + Duration::from_millis(config.volatile_sync_ms))
                    }
                };
                // Before the replies: a caller that hears "done" then reads the statistics or
                // pulls must find the batch counted and the dispatchers woken.
                // Here, not in the caller's task: a caller that stops waiting (a timed-out or
                // dropped request) must not leave a revoked right cached.
                if rights_changed || !applied.touched.is_empty() || !applied.observed.is_empty() {
                    on_commit(&applied.touched, &applied.observed, rights_changed);
                }
                for (reply, result) in replies.into_iter().zip(applied.results) {
                    let _ = reply.send(result);
                }
            }
            // Another process sharing the store committed a conflicting batch first (see
            // `KvStore::shared`): nothing of this one was written, the engine has dropped what
            // it kept in memory, and the storage itself is fine, so the callers are told to try
            // again without the writer counting a storage failure.
            Err(Error::StorageConflict { detail }) => {
                tracing::debug!(%detail, ops = n, "a batch lost a race with another writer");
                for reply in replies {
                    let _ = reply.send(Err(Error::StorageConflict {
                        detail: detail.clone(),
                    }));
                }
            }
            Err(e) => {
                let cause = e.to_string();
                note_failure(stats, config, clock.now(), &cause, n);
                for reply in replies {
                    let _ = reply.send(Err(Error::StorageUnavailable {
                        cause: cause.clone(),
                        retry_after_ms: config.storage_retry_after_ms,
                    }));
                }
            }
        }
    }
}

/// Records a failed commit. The first failure of a run is logged at once as an error; while
/// commits keep failing, one warning per `failure_log_interval_ms` says how many were refused,
/// so that a full disk under load does not also fill the log.
fn note_failure(
    stats: &WriterStats,
    config: &WriterConfig,
    now: crate::clock::Timestamp,
    cause: &str,
    ops: usize,
) {
    let mut failing = stats.failing.lock().unwrap_or_else(|p| p.into_inner());
    match failing.as_mut() {
        None => {
            tracing::error!(error = %cause, ops, "a commit failed; writes are refused (503 storage_unavailable) until commits succeed again");
            stats.failing_now.store(true, Ordering::Release);
            *failing = Some(Failing {
                since: now,
                commits: 1,
                last_error: cause.to_string(),
                logged_at: Instant::now(),
                logged_commits: 1,
            });
        }
        Some(f) => {
            f.commits += 1;
            f.last_error = cause.to_string();
            if f.logged_at.elapsed() >= Duration::from_millis(config.failure_log_interval_ms) {
                tracing::warn!(
                    error = %cause,
                    refused_since_last = f.commits - f.logged_commits,
                    refused_in_all = f.commits,
                    since = %f.since.to_rfc3339(),
                    "commits still failing"
                );
                f.logged_at = Instant::now();
                f.logged_commits = f.commits;
            }
        }
    }
}

/// Records a successful commit, ending a run of failures (logged once).
fn note_success(stats: &WriterStats) {
    if !stats.failing_now.load(Ordering::Acquire) {
        return;
    }
    stats.failing_now.store(false, Ordering::Release);
    let mut failing = stats.failing.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(f) = failing.take() {
        tracing::info!(refused = f.commits, since = %f.since.to_rfc3339(), "commits succeed again");
    }
}
