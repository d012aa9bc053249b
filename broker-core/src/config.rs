//! Every limit and tuning knob of the core in one place, with its unit in its name, so that
//! nothing in the broker is unbounded by accident and an operator can see every bound.

use serde::{Deserialize, Serialize};

use crate::subscription::RetryPolicy;

/// Size and count limits on what callers may send. Each is checked before any work is done, and
/// a breach is a [`crate::Error::LimitExceeded`] naming the limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest event payload accepted (default 1 MiB).
    pub payload_bytes_max: usize,
    /// Largest JSON Schema accepted for an event type (default 256 KiB).
    pub schema_bytes_max: usize,
    /// Longest ordering key (default 256 bytes).
    pub key_bytes_max: usize,
    /// Longest idempotency key (default 256 bytes).
    pub idempotency_key_bytes_max: usize,
    /// Longest description of a Room or event type (default 4 KiB).
    pub description_bytes_max: usize,
    /// Most events in one [`crate::Broker::publish_batch`] call (default 1,000).
    pub batch_events_max: usize,
    /// Most active Rooms on one broker (default 10,000). Pending requests do not count: they
    /// have their own bounds below, so that members' requests never use up the capacity
    /// administrators create Rooms in. Approving a request needs room under this bound.
    pub rooms_max: usize,
    /// Most pending Room requests on one broker, from all applications together (default 100).
    pub pending_rooms_max: usize,
    /// Most pending Room requests of one application (default 3).
    pub pending_rooms_per_application_max: usize,
    /// Most event types in one Room (default 1,000).
    pub event_types_per_room_max: usize,
    /// Most schema versions kept per event type (default 1,000).
    pub schema_versions_max: u32,
    /// Most items one list call returns (default 1,000).
    pub list_items_max: usize,
    /// Most records one list call may scan while filtering before it returns a partial page with a
    /// cursor (default 100,000), so that a selective filter cannot hold a reader for long.
    pub list_scan_max: usize,
    /// Series the live statistics keep (one per Room, event type and publisher, and one per
    /// subscription; default 4,096); samples for more are counted as dropped.
    pub stats_series_max: usize,
    /// Most client secret checks (Argon2id, about 19 MiB of memory and tens of milliseconds of
    /// one core each) running at once; zero, the default, means one per available core. A
    /// check that finds none free waits up to `secret_check_wait_ms`, then gets
    /// [`crate::Error::AuthenticationBusy`]. Fixed when the broker starts.
    pub secret_checks_max: usize,
    /// How long a client secret check may wait for one of the `secret_checks_max` slots, in
    /// milliseconds (default 200: enough for a burst of clients starting together to be served
    /// one after another, short enough that a flood is refused rather than queued). Zero
    /// refuses at once when every slot is taken.
    pub secret_check_wait_ms: u64,
    /// Most schema violations a refused payload's error lists (default 100). The error still
    /// says how many there were in all, so that a payload built to break every rule of its
    /// schema cannot make an answer many times its own size.
    pub schema_violations_max: usize,
    /// Longest text of a listed schema violation (its instance path, schema path and message,
    /// each), in bytes (default 512). A longer one is cut and ends in `…`: a message quotes
    /// the offending value, which may be most of the payload.
    pub violation_text_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            payload_bytes_max: 1024 * 1024,
            schema_bytes_max: 256 * 1024,
            key_bytes_max: 256,
            idempotency_key_bytes_max: 256,
            description_bytes_max: 4096,
            batch_events_max: 1000,
            rooms_max: 10_000,
            pending_rooms_max: 100,
            pending_rooms_per_application_max: 3,
            event_types_per_room_max: 1000,
            schema_versions_max: 1000,
            list_items_max: 1000,
            list_scan_max: 100_000,
            stats_series_max: 4096,
            secret_checks_max: 0,
            secret_check_wait_ms: 200,
            schema_violations_max: 100,
            violation_text_bytes_max: 512,
        }
    }
}

/// The single writer and its group commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WriterConfig {
    /// Most operations waiting for the writer; beyond it callers get
    /// [`crate::Error::Overloaded`] at once instead of queueing without bound (default 16,384).
    pub queue_ops_max: usize,
    /// Most payload bytes waiting for the writer, across all queued operations (default 256 MiB).
    pub queue_bytes_max: usize,
    /// Most operations applied in one write transaction (default 1,024). Set to 1 for one commit
    /// per operation (the benchmark's baseline).
    pub commit_ops_max: usize,
    /// Most payload bytes in one write transaction (default 32 MiB).
    pub commit_bytes_max: usize,
    /// Under load (the previous batch had more than one operation), how long the writer may
    /// linger for more operations before committing, in microseconds (default 200). It stops
    /// lingering as soon as operations stop arriving for a quarter of this. A lone publisher never
    /// waits; zero disables lingering.
    pub commit_wait_us: u64,
    /// The delay suggested to callers refused with `Overloaded`, in milliseconds (default 100).
    pub overload_retry_after_ms: u64,
    /// The delay suggested to callers refused with `StorageUnavailable` (a commit failed: a full
    /// disk, an I/O error), in milliseconds (default 1,000).
    pub storage_retry_after_ms: u64,
    /// While commits keep failing, at most one log line about it per this many milliseconds,
    /// with the count of refused commits (default 10,000).
    pub failure_log_interval_ms: u64,
    /// Leases and pullers' acks (nacks, extensions, terminations) are committed without
    /// waiting for the disk; a crash (or a storage failure, after which the database is
    /// reopened) may undo them, and their messages are then offered again (at least once;
    /// per-key order still holds). The writer makes them durable at most this many
    /// milliseconds after the first of them (default 50), and at least every 65th commit.
    /// Zero makes every write durable before its reply, leases included.
    pub volatile_sync_ms: u64,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            queue_ops_max: 16_384,
            queue_bytes_max: 256 * 1024 * 1024,
            commit_ops_max: 1024,
            commit_bytes_max: 32 * 1024 * 1024,
            commit_wait_us: 200,
            overload_retry_after_ms: 100,
            storage_retry_after_ms: 1000,
            failure_log_interval_ms: 10_000,
            volatile_sync_ms: 50,
        }
    }
}

/// The background retention sweep.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Time between sweeps, in milliseconds (default 1,000). Zero disables the background task
    /// (the embedding program may then call [`crate::Broker::sweep_retention`] itself).
    pub interval_ms: u64,
    /// Most records deleted by one sweep step, so that a sweep never holds the writer for long
    /// (default 1,000).
    pub delete_batch_max: usize,
    /// How long audit entries are kept, in milliseconds (default 400 days: a year's audit
    /// with a month to spare).
    pub audit_retention_ms: u64,
    /// Most audit entries kept; the oldest beyond it are removed (default 1,000,000, about
    /// 300 MB at the size entries are bounded to).
    pub audit_entries_max: usize,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            interval_ms: 1000,
            delete_batch_max: 1000,
            audit_retention_ms: 400 * 24 * 3_600_000,
            audit_entries_max: 1_000_000,
        }
    }
}

/// Delivery: push, pull, retries and dead letters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// The broker's retry policy, under each Room's and subscription's overrides.
    pub retry: RetryPolicy,
    /// Timeout of one push request, connect included, in milliseconds (default 5,000).
    pub push_timeout_ms: u64,
    /// Most redirects a push follows (default 3); the final answer must be 2xx.
    pub push_redirects_max: usize,
    /// Longest Retry-After honoured, in milliseconds (default 1 hour).
    pub retry_after_ms_max: u64,
    /// In-flight bound of a subscription that names none (default 16).
    pub in_flight_max_default: u32,
    /// Share of a push subscription's `in_flight_max` slots that slow deliveries may hold, in
    /// percent (default 25; at least one slot, and values above 100 count as 100). A delivery
    /// is slow when its last attempt got no answer (a timeout, a failed connection) or took at
    /// least `slow_push_ms`; a push under way is slow once it has run that long. A slow
    /// delivery does not start while slow pushes hold this share, so keys whose receiver hangs
    /// leave the other slots to the subscription's healthy keys (counted in
    /// `postroom_push_held_back_total`). 100 turns the cap off.
    pub slow_slots_max_percent: u32,
    /// How long a push answer may take before its delivery counts as slow, in milliseconds
    /// (default 2,000); see `slow_slots_max_percent`. An answer's own latency is measured; a
    /// push under way is timed on the broker's clock.
    pub slow_push_ms: u64,
    /// Largest in-flight bound a subscription may ask for (default 1,024).
    pub in_flight_max_max: u32,
    /// Queue bound of a subscription that names none (default 1,000,000 events).
    pub queue_depth_max_default: u64,
    /// Lease of a pull that names none, in milliseconds (default 30 s).
    pub lease_ms_default: u64,
    /// Longest lease or extension, in milliseconds (default 10 minutes).
    pub lease_ms_max: u64,
    /// Most messages one pull returns (default 1,000).
    pub pull_messages_max: usize,
    /// Longest long-poll wait of a pull, in milliseconds (default 30 s).
    pub pull_wait_ms_max: u64,
    /// How long dead letters are kept before the sweep removes them, in milliseconds (default
    /// 14 days).
    pub dead_letter_retention_ms: u64,
    /// How long a rotated-out signing secret stays valid, in milliseconds (default 24 hours).
    pub secret_grace_ms: u64,
    /// Most queue records a report reads (blocked keys, queue health in the statistics, the
    /// audit's queue figures: beyond it they are lower bounds; default 10,000). Also the most
    /// failed deliveries a push dispatcher remembers (to order and cap them) per subscription;
    /// beyond it the oldest are forgotten. Finding due work (push and pull) reads an index and
    /// is bound by no window.
    pub scan_records_max: usize,
    /// Longest a dispatcher sleeps before looking again without being woken, in milliseconds
    /// (default 1,000).
    pub scheduler_tick_ms: u64,
    /// How long a node's push lease on a subscription lasts, in milliseconds (default 8,000),
    /// when several brokers share one store (PostgreSQL): one node at a time pushes each
    /// subscription, renewing its lease each third of this; when the node dies, another takes
    /// the subscription over once the lease ends, so within this time plus a commit. A node
    /// shutting down hands its subscriptions over at once. Unused on an embedded store.
    pub dispatch_lease_ms: u64,
    /// Longest wait between tries to record a push outcome that the writer refused (a failed
    /// commit, a full disk, a full writer queue), in milliseconds (default 5,000). The first wait
    /// is 100 ms and doubles up to this. Until the outcome is recorded the delivery is not
    /// pushed again and its subscription starts no new push: the record is retried, not the
    /// push.
    pub outcome_retry_ms_max: u64,
    /// Most subscriptions on one Room (default 1,000).
    pub subscriptions_per_room_max: usize,
    /// Most extra headers on a push endpoint (default 32).
    pub push_headers_max: usize,
    /// Which non-public addresses push targets may have (default: none). See [`PushAllow`].
    pub push_allow: PushAllow,
    /// Longest wait for a push endpoint's host name to resolve when a subscription's endpoint is
    /// set, in milliseconds (default 2,000).
    pub push_resolve_timeout_ms: u64,
}

/// Which non-public addresses push targets may have. The broker refuses to push to loopback,
/// private, link-local, cloud metadata and other non-public addresses unless allowed here, so
/// that a subscriber cannot make the broker call services inside its own network (server-side
/// request forgery). It checks when a subscription's endpoint is set (every address a host name
/// resolves to must be allowed, and a name that does not resolve is refused) and again at connect
/// time, where refused addresses are skipped (DNS may have changed since).
///
/// Cloud metadata (169.254.169.254, fd00:ec2::254...), unspecified (0.0.0.0, ::), multicast,
/// broadcast, carrier-grade NAT (100.64.0.0/10), documentation and reserved addresses are refused
/// whatever the flags say; only an explicit range in `cidrs` opens them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushAllow {
    /// Allow loopback targets, 127.0.0.0/8 and ::1 (default false). Tests and single-host
    /// setups turn it on.
    pub loopback: bool,
    /// Allow private targets: 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 and fc00::/7 (default
    /// false).
    pub private: bool,
    /// Allow link-local targets, 169.254.0.0/16 and fe80::/10, except metadata addresses
    /// (default false).
    pub link_local: bool,
    /// Further ranges to allow whatever their class, as `10.20.0.0/16`, `fd12::/16` or a single
    /// address (default none). Checked when the broker opens: a malformed range, or one with host
    /// bits set, is a configuration error.
    pub cidrs: Vec<String>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            retry: RetryPolicy::default(),
            push_timeout_ms: 5000,
            push_redirects_max: 3,
            retry_after_ms_max: 3_600_000,
            in_flight_max_default: 16,
            slow_slots_max_percent: 25,
            slow_push_ms: 2000,
            in_flight_max_max: 1024,
            queue_depth_max_default: 1_000_000,
            lease_ms_default: 30_000,
            lease_ms_max: 600_000,
            pull_messages_max: 1000,
            pull_wait_ms_max: 30_000,
            dead_letter_retention_ms: 14 * 24 * 3_600_000,
            secret_grace_ms: 24 * 3_600_000,
            scan_records_max: 10_000,
            scheduler_tick_ms: 1000,
            dispatch_lease_ms: 8000,
            outcome_retry_ms_max: 5000,
            subscriptions_per_room_max: 1000,
            push_headers_max: 32,
            push_allow: PushAllow::default(),
            push_resolve_timeout_ms: 2000,
        }
    }
}

/// Everything the core can be configured with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Input limits.
    pub limits: Limits,
    /// The writer and group commit.
    pub writer: WriterConfig,
    /// Retention sweeps.
    pub retention: RetentionConfig,
    /// Delivery.
    pub delivery: DeliveryConfig,
    /// How long an idempotency key is remembered, in milliseconds (default 10 minutes, as the
    /// Book a Secure Move API does).
    pub idempotency_window_ms: u64,
    /// Whether JSON Schema `format` keywords (`date-time`, `email`...) are asserted rather than
    /// only annotated (default true: integration partners expect a malformed timestamp refused).
    pub validate_formats: bool,
    /// redb page cache size in bytes (default 64 MiB).
    pub cache_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            limits: Limits::default(),
            writer: WriterConfig::default(),
            retention: RetentionConfig::default(),
            delivery: DeliveryConfig::default(),
            idempotency_window_ms: 10 * 60 * 1000,
            validate_formats: true,
            cache_bytes: 64 * 1024 * 1024,
        }
    }
}
