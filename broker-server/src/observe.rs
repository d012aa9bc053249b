//! What operators watch: `GET /metrics` in the Prometheus text format, `GET /readyz`, and the
//! middleware that counts HTTP requests by route template.
//!
//! The Prometheus recorder is installed globally once per process (tests build many routers in
//! one process; the `metrics` facade has one global recorder). Counters and histograms are
//! recorded as things happen; gauges that describe stored state (backlogs, dead letters, the
//! database size) are refreshed from the broker when scraped, so they cost nothing in between.

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use broker_core::Broker;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use serde_json::json;

use crate::api::AppState;
use crate::error::ApiError;

/// HTTP requests by route template, method and status.
pub const HTTP_REQUESTS_TOTAL: &str = "postroom_http_requests_total";
/// HTTP request durations by route template and method.
pub const HTTP_REQUEST_DURATION: &str = "postroom_http_request_duration_seconds";
/// HTTP requests being handled now.
pub const HTTP_REQUESTS_IN_FLIGHT: &str = "postroom_http_requests_in_flight";
/// Events waiting for delivery, per subscription.
pub const BACKLOG: &str = "postroom_backlog";
/// Dead letters kept, per subscription.
pub const DEAD_LETTERS: &str = "postroom_dead_letters";
/// Age of each subscription's oldest undelivered event.
pub const OLDEST_UNDELIVERED_AGE: &str = "postroom_oldest_undelivered_age_seconds";
/// Events leased to pullers now, per subscription.
pub const LEASED: &str = "postroom_in_flight";
/// Keys whose failing head event holds later events back, per subscription.
pub const BLOCKED_KEYS: &str = "postroom_blocked_keys";
/// Size of the database file.
pub const DATABASE_BYTES: &str = "postroom_database_bytes";
/// Administrative requests refused before their caller was authenticated; counted, not
/// written to the audit log (anyone can send them).
pub const UNAUTHENTICATED_REFUSALS: &str = "postroom_unauthenticated_refusals_total";
/// Token requests refused before their secret was checked, by reason (`too_many_failures`,
/// `authentication_busy`).
pub const AUTH_REFUSED_TOTAL: &str = "postroom_auth_refused_total";
/// Failure limits of the token endpoint that tripped (at most once per key and minute), by
/// limit (`client_address`, `address`).
pub const AUTH_LIMIT_TRIPS_TOTAL: &str = "postroom_auth_limit_trips_total";
/// Failed authentications not counted against the failure limits because their tables were
/// full of keys still being limited (`auth.failure_keys_max`).
pub const AUTH_FAILURES_UNCOUNTED_TOTAL: &str = "postroom_auth_failures_uncounted_total";

/// Gauges not refreshed for this long are dropped, so that a deleted subscription's backlog
/// does not linger; any scrape interval shorter than this keeps live ones.
const GAUGE_IDLE: Duration = Duration::from_secs(15 * 60);

/// Requests in flight in this process (all routers), for the gauge and `/v1/admin/system`.
static IN_FLIGHT: AtomicI64 = AtomicI64::new(0);

/// The installed recorder's handle, or `None` when another recorder was installed first (by a
/// program embedding this crate), in which case `/metrics` says so.
static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder on first call; later calls return the same handle.
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    HANDLE.get_or_init(install).as_ref()
}

fn install() -> Option<PrometheusHandle> {
    // Durations get buckets from 1 ms to 60 s (histograms, unlike the default summaries, can
    // be aggregated across servers); commit sizes get powers of two up to a large batch.
    let seconds = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    let sizes = [
        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
    ];
    let builder = PrometheusBuilder::new()
        .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE))
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(broker_core::telemetry::COMMIT_BATCH_EVENTS.into()),
                &sizes,
            )
        });
    let recorder = match builder {
        Ok(b) => b.build_recorder(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot configure the metrics recorder; /metrics is off");
            return None;
        }
    };
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::warn!("another metrics recorder is installed; /metrics is off");
        return None;
    }
    broker_core::telemetry::describe();
    describe();
    // Histogram samples are buffered until folded into buckets; a scrape folds them, but an
    // unscraped server must not grow, so a small thread folds them regularly.
    let upkeep = handle.clone();
    let spawned = std::thread::Builder::new()
        .name("postroom-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(5));
            upkeep.run_upkeep();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread");
    }
    Some(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        HTTP_REQUESTS_TOTAL,
        "HTTP requests by route template, method and status."
    );
    describe_histogram!(
        HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "HTTP request durations by route template and method."
    );
    describe_gauge!(HTTP_REQUESTS_IN_FLIGHT, "HTTP requests being handled now.");
    describe_counter!(
        AUTH_REFUSED_TOTAL,
        "Token requests refused before their secret was checked, by reason."
    );
    describe_counter!(
        AUTH_LIMIT_TRIPS_TOTAL,
        "Failure limits of the token endpoint that tripped, by limit."
    );
    describe_counter!(
        AUTH_FAILURES_UNCOUNTED_TOTAL,
        "Failed authentications not counted because the failure tables were full."
    );
    describe_gauge!(
        crate::connections::CONNECTIONS_OPEN,
        "Client connections open now (idle keep-alive ones included)."
    );
    describe_gauge!(BACKLOG, "Events waiting for delivery, per subscription.");
    describe_gauge!(DEAD_LETTERS, "Dead letters kept, per subscription.");
    describe_gauge!(
        OLDEST_UNDELIVERED_AGE,
        Unit::Seconds,
        "Age of the oldest undelivered event, per subscription (0 when none waits)."
    );
    describe_gauge!(LEASED, "Events leased to pullers now, per subscription.");
    describe_gauge!(
        BLOCKED_KEYS,
        "Keys whose failing head event holds later events back, per subscription."
    );
    describe_counter!(
        UNAUTHENTICATED_REFUSALS,
        "Administrative requests refused before authentication (not kept in the audit log)."
    );
    describe_gauge!(
        DATABASE_BYTES,
        Unit::Bytes,
        "Size of the database file (0 when in memory)."
    );
}

/// HTTP requests being handled now, in this process.
pub fn requests_in_flight() -> i64 {
    IN_FLIGHT.load(Ordering::Relaxed)
}

/// One request in flight; leaving is on drop, so that a request whose client went away (its
/// future dropped mid-way) does not stay counted.
struct InFlight;

impl InFlight {
    fn enter() -> InFlight {
        IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(HTTP_REQUESTS_IN_FLIGHT).increment(1.0);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(HTTP_REQUESTS_IN_FLIGHT).decrement(1.0);
    }
}

/// Counts and times every request by its route template (`/v1/rooms/{room}`), never its raw
/// path, so that the number of series is bounded by the routes; requests no route matched are
/// `unmatched`. Run around each route (by `middleware::front`), it sees the `MatchedPath`
/// that routing sets; `next` is the rest of the chain.
pub(crate) async fn track<F, Fut>(req: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().as_str().to_string();
    let started = Instant::now();
    let in_flight = InFlight::enter();
    let resp = next(req).await;
    drop(in_flight);
    let status = resp.status().as_u16().to_string();
    metrics::histogram!(HTTP_REQUEST_DURATION, "route" => route.clone(), "method" => method.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!(HTTP_REQUESTS_TOTAL, "route" => route, "method" => method, "status" => status)
        .increment(1);
    resp
}

/// Sets the gauges that describe stored state: each subscription's backlog, dead letters,
/// leases, blocked keys and oldest undelivered age (from the statistics report, which reads
/// every Room's subscriptions), and the database file's size.
pub fn refresh_gauges(broker: &Broker, database: &Path) -> broker_core::Result<()> {
    let report = broker.stats(&broker_core::StatsFilter::default())?;
    for sub in &report.subscriptions {
        let id = sub.id.to_string();
        metrics::gauge!(BACKLOG, "subscription" => id.clone()).set(sub.backlog as f64);
        metrics::gauge!(DEAD_LETTERS, "subscription" => id.clone()).set(sub.dead_letters as f64);
        metrics::gauge!(LEASED, "subscription" => id.clone()).set(sub.in_flight as f64);
        metrics::gauge!(BLOCKED_KEYS, "subscription" => id.clone()).set(sub.blocked_keys as f64);
        let age = sub.oldest_undelivered_age_ms.unwrap_or(0) as f64 / 1000.0;
        metrics::gauge!(OLDEST_UNDELIVERED_AGE, "subscription" => id).set(age);
    }
    // A broker in memory has no file: its size is 0.
    let bytes = std::fs::metadata(database).map(|m| m.len()).unwrap_or(0);
    metrics::gauge!(DATABASE_BYTES).set(bytes as f64);
    Ok(())
}

/// `GET /metrics`: every metric in the Prometheus text format. Public, like `/healthz`: keep
/// it on the operators' network (it names Rooms, event types and subscription ids).
pub async fn metrics_page(State(s): State<AppState>) -> Response {
    let Some(handle) = prometheus() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics are off: another metrics recorder is installed in this process\n",
        )
            .into_response();
    };
    let broker = s.broker.clone();
    let database = s.database_path.clone();
    // Listing every Room's subscriptions reads the database: keep it off the async workers.
    let refreshed = tokio::task::spawn_blocking(move || refresh_gauges(&broker, &database)).await;
    match refreshed {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot refresh the metrics gauges"),
        Err(e) => tracing::warn!(error = %e, "the metrics gauge refresh failed"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

/// `GET /readyz`: 200 `{"ready": true}` while the broker takes writes; 503 with the reasons
/// otherwise, so that a load balancer stops sending traffic to a server that is stopping.
pub async fn readyz(State(s): State<AppState>) -> Response {
    let reasons = s.broker.unready_reasons();
    if reasons.is_empty() {
        (StatusCode::OK, axum::Json(json!({"ready": true}))).into_response()
    } else {
        ApiError::NotReady(reasons).into_response()
    }
}
