//! The embeddable broker: the one handle a host program holds. It does every check that needs
//! no storage on the caller's task (sizes, JSON, schema, ordering key) so that the single writer
//! does storage work only, then hands the mutation to the writer and waits for it to be durable.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::dispatch::{ensure_dispatcher, Signals};
use crate::error::{Error, Result};
use crate::ids::SubscriptionId;
use crate::ids::{EventId, EventTypeName, Principal};
use crate::model::{StoredResponse, SweepReport};
use crate::net_guard::PushGuard;
use crate::schema::ValidatorCache;
use crate::stats::Stats;
use crate::storage::StorageFaults;
use crate::storage::{DeliveryDefaults, Observation, PostgresConfig};
use crate::storage::{Engine, Storage, WriteOp, WriteOutput};
use crate::webhook::{HttpTransport, Transport};
use crate::writer::Writer;
use std::collections::HashSet;
use std::sync::Mutex;

/// The state every clone of a [`Broker`] shares.
pub(crate) struct Inner {
    pub(crate) store: Arc<dyn Storage>,
    /// This broker's node id, drawn at open: whose push leases are whose when several brokers
    /// share one store (see `ownership.rs`).
    pub(crate) node: u128,
    writer: Writer,
    pub(crate) clock: Arc<dyn Clock>,
    /// Swapped whole by [`Broker::reconfigure`]; readers take a snapshot.
    pub(crate) config: std::sync::RwLock<Arc<Config>>,
    /// Serialises reconfigurations, so that two concurrent patches do not lose one another.
    pub(crate) reconfiguring: tokio::sync::Mutex<()>,
    /// On a shared store, the version of the run-time configuration this node adopted last
    /// (`runtime.rs`); 0 before any.
    pub(crate) runtime_version: std::sync::atomic::AtomicU64,
    /// The stored version this node last refused to adopt (so that it is logged once).
    pub(crate) runtime_refused: std::sync::atomic::AtomicU64,
    /// How push subscriptions are shared out among the nodes (`dispatch_owner::balance`).
    pub(crate) balance: crate::dispatch_owner::Balance,
    pub(crate) validators: ValidatorCache,
    /// Clients and rights read by authentication, kept between writes.
    pub(crate) identities: Arc<crate::identity::IdentityCache>,
    /// Whether subscribers' rights are checked on every delivery (see
    /// [`Broker::enforce_subscriber_rights`]).
    pub(crate) enforce_rights: std::sync::atomic::AtomicBool,
    /// Slots for listing a refused payload's schema violations (one per core): each listing
    /// holds memory in proportion to its payload, so only this many run at once.
    pub(crate) violation_checks: Arc<tokio::sync::Semaphore>,
    /// Rings of signing keys, kept up to date by the writes that change them.
    pub(crate) key_rings: crate::keyring::KeyRingCache,
    /// Wake-ups for dispatchers and long-polling pullers.
    pub(crate) signals: Arc<Signals>,
    /// The live statistics behind [`Broker::stats`].
    pub(crate) stats: Arc<Stats>,
    /// Push subscriptions whose dispatcher is running.
    pub(crate) dispatchers: Mutex<HashSet<SubscriptionId>>,
    /// Sends push deliveries.
    pub(crate) transport: Arc<dyn Transport>,
    /// Which addresses push targets may have; the transport holds the same guard.
    pub(crate) push_guard: Arc<PushGuard>,
    /// Pushes in flight per receiving host, across subscriptions (see `host_limits.rs`).
    pub(crate) push_hosts: Arc<crate::host_limits::HostLimits>,
    /// Set by [`Broker::begin_close`] (and so by `close`): dispatchers stop starting pushes and
    /// exit, waiting pulls are answered, new pulls are refused.
    pub(crate) closing: std::sync::atomic::AtomicBool,
    /// Held by the retention task while it holds the broker; [`Broker::close`] takes it so that
    /// the task has let go of the database before `close` returns (a host may open the same
    /// file again at once).
    pub(crate) retention_turn: Arc<tokio::sync::Mutex<()>>,
    /// Push requests under way, so that `close` can wait for them.
    pub(crate) pushes_in_flight: std::sync::atomic::AtomicUsize,
    /// Slots for client secret checks (`limits.secret_checks_max`), so that a flood of token
    /// requests runs a bounded number of Argon2 checks rather than one per request.
    pub(crate) secret_checks: Arc<tokio::sync::Semaphore>,
    /// The storage's fault switches, reached only by tests (see [`Broker::storage_faults`]).
    #[cfg_attr(not(any(test, feature = "fault-injection")), allow(dead_code))]
    storage_faults: Arc<StorageFaults>,
}

impl Inner {
    /// The configuration in force now.
    pub(crate) fn config_now(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.writer.close();
    }
}

/// Creates the database file's folder (0700) and the file itself (0600) when they do not exist,
/// so that other users of the host cannot read the data: it holds the identity records and the
/// host's keys. Existing folders and files are left as they are (a server checks the folder
/// before it opens the broker). Unix only; elsewhere the platform's defaults apply.
fn create_private(path: &Path) -> Result<()> {
    let fail = |what: &Path, e: std::io::Error| {
        Error::Storage(format!("cannot create {}: {e}", what.display()))
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir).map_err(|e| fail(dir, e))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    // redb makes a new database in an empty file.
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(fail(path, e)),
    }
}

/// Counters about the writer, for tests and benchmarks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriterCounters {
    /// Write transactions committed.
    pub commits: u64,
    /// Operations applied in them.
    pub ops: u64,
}

/// A durable Pub/Sub broker. Cheap to clone; all clones share one database and one writer.
/// Dropping the last clone (or calling [`Broker::close`]) lets the writer finish what is queued.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

impl Broker {
    /// Opens (or creates) the database file at `path` with the system clock.
    /// Must be called inside a tokio runtime (the retention task is spawned on it).
    pub async fn open(path: impl AsRef<Path>, config: Config) -> Result<Broker> {
        Self::open_with_clock(path, config, Arc::new(SystemClock)).await
    }

    /// Opens (or creates) the database file at `path` with the given clock.
    pub async fn open_with_clock(
        path: impl AsRef<Path>,
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Broker> {
        let path = path.as_ref().to_path_buf();
        create_private(&path)?;
        let cache = config.cache_bytes;
        let defaults = delivery_defaults(&config);
        let store = tokio::task::spawn_blocking(move || Engine::open(&path, cache, defaults))
            .await
            .map_err(|e| Error::Storage(format!("open task failed: {e}")))??;
        let faults = store.faults();
        Self::start(Arc::new(store), faults, config, clock, None)
    }

    /// Opens the PostgreSQL database `postgres` names (creating or upgrading its schema under
    /// an advisory lock, so that several nodes starting together migrate once) with the
    /// system clock. Several brokers may open one database: each fences its commits, and the
    /// second of two that raced is refused with [`Error::StorageConflict`].
    pub async fn open_postgres(postgres: PostgresConfig, config: Config) -> Result<Broker> {
        Self::open_postgres_with_clock(postgres, config, Arc::new(SystemClock)).await
    }

    /// [`Broker::open_postgres`] with the given clock.
    pub async fn open_postgres_with_clock(
        postgres: PostgresConfig,
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Broker> {
        let defaults = delivery_defaults(&config);
        let store = tokio::task::spawn_blocking(move || Engine::open_postgres(&postgres, defaults))
            .await
            .map_err(|e| Error::Storage(format!("open task failed: {e}")))??;
        let faults = store.faults();
        Self::start(Arc::new(store), faults, config, clock, None)
    }

    /// A broker on a redb file whose writes fail with an I/O error, as on a full disk, while
    /// [`StorageFaults::fill_disk`] is in force: for fault tests only.
    #[cfg(any(test, feature = "fault-injection"))]
    pub async fn open_with_fillable_disk(
        path: impl AsRef<Path>,
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Broker> {
        let path = path.as_ref().to_path_buf();
        let defaults = delivery_defaults(&config);
        let store = tokio::task::spawn_blocking(move || Engine::open_fillable(&path, defaults))
            .await
            .map_err(|e| Error::Storage(format!("open task failed: {e}")))??;
        let faults = store.faults();
        Self::start(Arc::new(store), faults, config, clock, None)
    }

    /// A broker over a given key-value backend (tests that watch what the engine commits).
    #[cfg(test)]
    pub(crate) fn open_over_kv(
        kv: Arc<dyn crate::storage::kv::KvStore>,
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Broker> {
        Self::open_over_kv_with(kv, config, clock, None)
    }

    /// [`Broker::open_over_kv`] with the pushes going to `transport` (when given) instead of
    /// HTTP: tests that watch which broker pushes what.
    #[cfg(test)]
    pub(crate) fn open_over_kv_with(
        kv: Arc<dyn crate::storage::kv::KvStore>,
        config: Config,
        clock: Arc<dyn Clock>,
        transport: Option<Arc<dyn Transport>>,
    ) -> Result<Broker> {
        let store = Engine::over(kv, delivery_defaults(&config))?;
        let faults = store.faults();
        Self::start(Arc::new(store), faults, config, clock, transport)
    }

    /// A broker whose data lives in memory only: for tests and examples.
    pub async fn open_in_memory(config: Config, clock: Arc<dyn Clock>) -> Result<Broker> {
        let store = Engine::in_memory(config.cache_bytes, delivery_defaults(&config))?;
        let faults = store.faults();
        Self::start(Arc::new(store), faults, config, clock, None)
    }

    fn start(
        store: Arc<dyn Storage>,
        storage_faults: Arc<StorageFaults>,
        config: Config,
        clock: Arc<dyn Clock>,
        transport: Option<Arc<dyn Transport>>,
    ) -> Result<Broker> {
        // Built first so that a malformed `push_allow.cidrs` stops the broker before it starts
        // anything.
        let push_guard = Arc::new(PushGuard::new(&config.delivery.push_allow)?);
        let secret_checks = crate::identity::secret_checks(&config.limits);
        let signals = Arc::new(Signals::default());
        let stats = Arc::new(Stats::new(config.limits.stats_series_max, clock.now()));
        // Nothing read from a store other brokers write to is kept in memory where their
        // changes would not reach it: identities, rights and signing keys are read each time.
        let shared = store.shared();
        let identities = Arc::new(if shared {
            crate::identity::IdentityCache::off()
        } else {
            crate::identity::IdentityCache::default()
        });
        let on_commit = {
            let signals = signals.clone();
            let stats = stats.clone();
            let clock = clock.clone();
            let identities = identities.clone();
            Arc::new(
                move |ids: &[SubscriptionId], observed: &[Observation], rights: bool| {
                    if rights {
                        identities.invalidate();
                    }
                    signals.wake(ids);
                    observe(&stats, clock.now(), observed);
                },
            )
        };
        let writer = Writer::start(
            store.clone(),
            clock.clone(),
            config.writer.clone(),
            on_commit,
        )?;
        let transport: Arc<dyn Transport> = match transport {
            Some(t) => t,
            None => Arc::new(HttpTransport::new(
                config.delivery.push_timeout_ms,
                config.delivery.push_redirects_max,
                push_guard.clone(),
            )?),
        };
        let node = store.origin();
        let notices = store.take_notices();
        if shared {
            tracing::info!(node = %crate::dispatch_owner::format_node(node), "this node shares its store with other nodes; push subscriptions are shared out by leases");
        }
        let inner = Arc::new(Inner {
            node,
            store,
            writer,
            clock,
            config: std::sync::RwLock::new(Arc::new(config)),
            reconfiguring: tokio::sync::Mutex::new(()),
            runtime_version: Default::default(),
            runtime_refused: Default::default(),
            balance: Default::default(),
            validators: ValidatorCache::default(),
            identities,
            enforce_rights: Default::default(),
            violation_checks: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
            key_rings: if shared {
                crate::keyring::KeyRingCache::off()
            } else {
                Default::default()
            },
            signals,
            stats,
            dispatchers: Mutex::new(HashSet::new()),
            transport,
            push_guard,
            push_hosts: crate::host_limits::HostLimits::new(
                crate::webhook::IDLE_CONNECTIONS_PER_HOST,
            ),
            closing: std::sync::atomic::AtomicBool::new(false),
            retention_turn: Default::default(),
            pushes_in_flight: std::sync::atomic::AtomicUsize::new(0),
            secret_checks: Arc::new(tokio::sync::Semaphore::new(secret_checks)),
            storage_faults,
        });
        if inner.config_now().retention.interval_ms > 0 {
            crate::broker_tasks::spawn_retention(
                Arc::downgrade(&inner),
                inner.retention_turn.clone(),
                Duration::from_millis(inner.config_now().retention.interval_ms),
            );
        }
        let broker = Broker { inner };
        if shared {
            // What other nodes changed at run time holds here too, from the start (or from
            // the next discovery round, if it cannot be read or does not fit this node's
            // bounds now).
            if let Err(e) = broker.adopt_locked() {
                tracing::debug!(error = %e, "configuration changed on another node not adopted");
            }
        }
        // Every push subscription resumes where its persisted queue stands.
        for id in broker.inner.store.push_subscriptions()? {
            ensure_dispatcher(&broker, id);
        }
        if let Some(notices) = notices {
            crate::broker_tasks::spawn_remote_wakes(Arc::downgrade(&broker.inner), notices);
        }
        if shared {
            // Other nodes create push subscriptions too: each needs a dispatcher here, ready
            // to take its lease over when the node pushing it dies.
            crate::broker_tasks::spawn_discovery(Arc::downgrade(&broker.inner));
        }
        Ok(broker)
    }

    /// The switches that make this broker's storage fail commits, as a full disk or an I/O
    /// error would: for tests and simulations of what the broker does while its writes are
    /// refused. Only with the `fault-injection` feature (never in production builds).
    #[cfg(any(test, feature = "fault-injection"))]
    pub fn storage_faults(&self) -> &StorageFaults {
        &self.inner.storage_faults
    }

    pub(crate) fn from_inner(inner: Arc<Inner>) -> Broker {
        Broker { inner }
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    pub(crate) async fn write_op(&self, op: WriteOp) -> Result<WriteOutput> {
        self.write(op).await
    }

    /// Undelivered deliveries across all subscriptions (pending or in flight).
    pub fn backlog_total(&self) -> Result<u64> {
        self.inner.store.deliveries_total()
    }

    /// Wakes every dispatcher and long-polling puller so that they look at their queues now.
    /// Tests call it after moving a manual clock so that dispatchers look (a long-poll needs
    /// no call: it also wakes when a [`crate::ManualClock`] passes the time it waits for);
    /// production never needs it, as dispatchers also look on their own every
    /// `scheduler_tick_ms`.
    pub fn wake_deliveries(&self) {
        self.inner.signals.wake_all();
    }

    /// The configuration the broker runs with now (see [`Broker::reconfigure`] for what changes
    /// while it runs). A snapshot: hold it for one decision, not for the broker's life.
    pub fn config(&self) -> Arc<Config> {
        self.inner.config_now()
    }

    /// Starts shutting down without stopping the writer, so that requests under way can still
    /// finish: dispatchers stop starting pushes, every long-poll waiting in [`Broker::pull`] is
    /// answered at once (with no messages), new pulls are refused with [`Error::ShuttingDown`],
    /// and [`Broker::unready_reasons`] says the broker is shutting down. A server calls it when
    /// its shutdown signal comes, before it waits for requests in flight, so that no poll holds
    /// the shutdown for its whole wait; [`Broker::close`] calls it first too. Idempotent.
    pub fn begin_close(&self) {
        self.inner
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.signals.wake_all();
    }

    /// Whether [`Broker::begin_close`] (or [`Broker::close`]) has been called.
    pub(crate) fn is_closing(&self) -> bool {
        self.inner.closing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Shuts down: as [`Broker::begin_close`] (dispatchers stop starting pushes, long-polls are
    /// answered), then pushes under way get up to the push timeout to finish (their outcomes
    /// are recorded, or they are simply tried again after the next open), then the writer
    /// commits what is queued and stops. Later calls that write get [`Error::ShuttingDown`].
    /// The database file is released when the last clone is dropped.
    pub async fn close(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.begin_close();
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(self.config().delivery.push_timeout_ms + 1000);
        while self.inner.pushes_in_flight.load(SeqCst) > 0 && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Dispatchers end as the broker closes, each handing its push lease back once its
        // own pushes are recorded; wait for them (bounded), then release whatever lease is
        // left, so that other nodes take this one's push subscriptions over at once.
        while !self
            .inner
            .dispatchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        crate::dispatch_owner::release_all(self).await;
        let inner = self.inner.clone();
        let _ = tokio::task::spawn_blocking(move || inner.writer.close()).await;
        // A sweep running now fails at its next write; wait (bounded) until it let go.
        let _ =
            tokio::time::timeout(Duration::from_secs(5), self.inner.retention_turn.lock()).await;
    }

    /// Why the broker cannot take writes now; empty when it can. Cheap (no I/O), so that a
    /// readiness probe may call it often.
    pub fn unready_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if self.is_closing() {
            reasons.push("the broker is shutting down".to_string());
        }
        if !self.inner.writer.is_running() {
            reasons.push("the storage writer has stopped".to_string());
        }
        let failing = self
            .inner
            .writer
            .stats
            .failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(f) = failing {
            reasons.push(format!(
                "storage writes are failing since {} ({} commits refused; last error: {})",
                f.since.to_rfc3339(),
                f.commits,
                f.last_error
            ));
        }
        reasons
    }

    /// Commits and applied operations so far.
    pub fn writer_counters(&self) -> WriterCounters {
        use std::sync::atomic::Ordering::Relaxed;
        WriterCounters {
            commits: self.inner.writer.stats.commits.load(Relaxed),
            ops: self.inner.writer.stats.ops.load(Relaxed),
        }
    }

    /// Every write goes through here. A write that may change who may do what
    /// ([`WriteOp::may_change_rights`]) moves the identity cache on once it has committed,
    /// on the writer thread before any caller hears back (see `writer.rs`), so that the next
    /// request reads the change even if this caller stopped waiting.
    pub(crate) async fn write(&self, op: WriteOp) -> Result<WriteOutput> {
        self.inner.writer.submit(op).await
    }

    pub(crate) fn check_description(&self, d: &str) -> Result<()> {
        let max = self.config().limits.description_bytes_max;
        if d.len() > max {
            return Err(Error::limit(
                "description_bytes_max",
                max as u64,
                d.len() as u64,
            ));
        }
        Ok(())
    }

    // ----- Retention -----

    /// Runs one bounded retention sweep now: expired idempotency records, the contents of deleted
    /// Rooms, audit entries beyond the audit retention, and events beyond their Room's age or byte bound (never one still owed to a
    /// subscriber). The background task calls this on its interval; hosts and tests may too.
    pub async fn sweep_retention(&self) -> Result<SweepReport> {
        let delete_max = self.config().retention.delete_batch_max;
        let mut report = match self.write(WriteOp::Sweep { delete_max }).await? {
            WriteOutput::Swept(r) => r,
            other => return Err(unexpected(other)),
        };
        let (removed, more) = self.trim_audit(delete_max).await?;
        report.audit_entries_removed = removed;
        report.more |= more;
        Ok(report)
    }

    /// The clock the broker runs on.
    pub fn now(&self) -> crate::clock::Timestamp {
        self.inner.clock.now()
    }
}

impl Broker {
    pub(crate) fn check_idempotency_key(&self, k: &str) -> Result<()> {
        let max = self.config().limits.idempotency_key_bytes_max;
        if k.is_empty() || k.chars().any(char::is_control) {
            return Err(Error::invalid(
                "idempotency key",
                "must be non-empty without control characters",
            ));
        }
        if k.len() > max {
            return Err(Error::limit(
                "idempotency_key_bytes_max",
                max as u64,
                k.len() as u64,
            ));
        }
        Ok(())
    }

    /// The response remembered for `principal`'s idempotency `key`, if one is within the window
    /// (see [`Broker::remember_response`]). `request` is the caller's fingerprint of the request
    /// (method, path and body, for an HTTP server); a remembered response for a different
    /// request is refused with [`Error::IdempotencyConflict`].
    pub fn replay_response(
        &self,
        principal: &Principal,
        key: &str,
        request: &[u8],
    ) -> Result<Option<StoredResponse>> {
        self.check_idempotency_key(key)?;
        match self
            .inner
            .store
            .stored_response(principal, key, self.now())?
        {
            None => Ok(None),
            Some((hash, response)) if hash == sha256(request) => Ok(Some(response)),
            Some(_) => Err(Error::IdempotencyConflict { key: key.into() }),
        }
    }

    /// Remembers a successful response under `principal`'s idempotency `key` for the
    /// configured window (`idempotency_window_ms`), durably, so that a retry after a lost
    /// answer, even across a restart, gets the same answer instead of creating something twice.
    /// Errors are not to be remembered: a failed request may be retried with the same key.
    pub async fn remember_response(
        &self,
        principal: &Principal,
        key: &str,
        request: &[u8],
        response: StoredResponse,
    ) -> Result<()> {
        self.check_idempotency_key(key)?;
        let max = self.config().limits.payload_bytes_max;
        if response.body.len() > max {
            return Err(Error::limit(
                "payload_bytes_max",
                max as u64,
                response.body.len() as u64,
            ));
        }
        let op = WriteOp::RememberResponse {
            principal: principal.clone(),
            key: key.to_string(),
            request_hash: sha256(request),
            response,
            expires_at: self.now().plus_ms(self.config().idempotency_window_ms),
        };
        match self.write(op).await? {
            WriteOutput::Deleted => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The idempotency fingerprint of a publish request: everything that shapes the stored event.
pub(crate) fn request_hash(
    event_type: &EventTypeName,
    id: Option<EventId>,
    key: Option<&str>,
    payload: &[u8],
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(event_type.as_str().as_bytes());
    h.update([0]);
    if let Some(id) = id {
        h.update(id.0.as_bytes());
    }
    h.update([0]);
    if let Some(k) = key {
        h.update(k.as_bytes());
    }
    h.update([0]);
    h.update(payload);
    h.finalize().into()
}

pub(crate) fn delivery_defaults(config: &Config) -> DeliveryDefaults {
    let d = &config.delivery;
    DeliveryDefaults {
        retry: d.retry.clone(),
        retry_after_ms_max: d.retry_after_ms_max,
        in_flight_max: d.in_flight_max_default,
        queue_depth_max: d.queue_depth_max_default,
        dead_letter_retention_ms: d.dead_letter_retention_ms,
        subscriptions_per_room_max: d.subscriptions_per_room_max,
        volatile_commits: config.writer.volatile_sync_ms > 0,
    }
}

pub(crate) fn unexpected(out: WriteOutput) -> Error {
    Error::Storage(format!("writer returned an unexpected output: {out:?}"))
}

/// Counts what a committed batch did, in the metrics and in the statistics.
fn observe(stats: &Stats, now: crate::clock::Timestamp, observed: &[Observation]) {
    for o in observed {
        match *o {
            Observation::Attempt {
                sub,
                event,
                outcome,
                published_at,
                at,
            } => {
                // The delivery trail, for `log_level = "postroom::deliveries=debug"`.
                tracing::debug!(
                    target: "postroom::deliveries",
                    subscription = %uuid::Uuid::from_u128(sub), event_id = %uuid::Uuid::from_u128(event),
                    outcome = crate::telemetry::outcome_label(outcome), "delivery attempt"
                );
                crate::telemetry::attempt(sub, outcome, published_at, at);
                stats.attempt(at, sub, outcome, published_at);
            }
            Observation::DeadLettered { sub, reason } => {
                crate::telemetry::dead_lettered(sub, reason);
                stats.dead_lettered(now, sub);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::ids::RoomName;
    use crate::model::NewRoom;
    use crate::subscription::{DeliveryMode, NewSubscription};

    /// Issue 15, defect 10: deleting a Room deleted its subscriptions but left their
    /// dispatcher signals (and statistics series) in memory, a leak per deleted subscription.
    #[tokio::test]
    async fn deleting_a_room_forgets_its_subscriptions_in_memory() {
        let clock = ManualClock::new(crate::clock::Timestamp(1_767_225_600_000));
        let broker = Broker::open_in_memory(Config::default(), Arc::new(clock))
            .await
            .unwrap();
        let room = RoomName::new("r").unwrap();
        let admin = Principal::new("admin").unwrap();
        broker
            .create_room(NewRoom::new(room.clone(), admin.clone()).approved())
            .await
            .unwrap();
        let created = broker
            .create_subscription(&room, NewSubscription::new(admin, DeliveryMode::Pull))
            .await
            .unwrap();
        let id = created.subscription.id;
        // A long-poll (or a dispatcher) makes the subscription's signals.
        broker.pull(id, 1, None, 0).await.unwrap();
        assert!(broker.inner.signals.has(id));
        broker.delete_room(&room).await.unwrap();
        assert!(!broker.inner.signals.has(id), "signals left behind");
    }
}
