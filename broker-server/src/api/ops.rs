//! The operators' API: statistics, the message log, and the running configuration. Every route
//! needs the admin role. These answer "where is event X?" and "why is subscriber Y behind?" in
//! one call each, and let an administrator change retry defaults, limits and log levels without
//! a restart.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use broker_core::{
    ConfigPatch, DeliveryPatch, LimitsPatch, MessageFilter, MessageStatus, StatsFilter,
    SubscriptionId, SubscriptionStatus, Timestamp,
};
use serde::Deserialize;
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::admin::admin;
use super::schemas::{BadRequest, CoreObject, NotFound, Unprocessable};
use super::{parse, reply, ApiJson, AppState};
use crate::auth::Identity;
use crate::error::ApiError;
use crate::middleware::AuditDetail;

/// The routes, relative to `/v1`.
pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(stats))
        .routes(routes!(messages))
        .routes(routes!(read_config, patch_config))
}

fn time(name: &str, raw: Option<&str>) -> Result<Option<Timestamp>, ApiError> {
    raw.map(|t| super::events::time(name, t)).transpose()
}

/// Filters of the statistics report; they combine with "and".
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct StatsQuery {
    /// Only publishers and subscribers of this member (`INSTANCE/CLASS/CODE`).
    member: Option<String>,
    /// Only this application, as publisher (Rooms) or subscriber (subscriptions).
    application: Option<String>,
    /// Only this Room.
    room: Option<String>,
    /// Only this subscription.
    subscription: Option<String>,
    /// Only subscriptions with this status: `pending`, `active`, `paused` or `disabled`.
    status: Option<String>,
}

/// Statistics: per Room, publishes since start and the last minute's rate and publish latency
/// (avg, p50, p99); per subscription, its queue now (backlog, dead letters, in flight, blocked
/// keys, oldest undelivered age) and the last minute's deliveries, failures and publish-to-
/// delivery latency. Counts since start reset when the server restarts; queue figures are read
/// from storage.
#[utoipa::path(get, path = "/admin/stats", operation_id = "getStats", tag = "admin",
    params(StatsQuery),
    responses((status = 200, description = "The report.", body = CoreObject),
        (status = 400, response = BadRequest), (status = 404, response = NotFound)))]
async fn stats(
    State(s): State<AppState>,
    id: Identity,
    Query(q): Query<StatsQuery>,
) -> Result<Response, ApiError> {
    admin(&id)?;
    let status = q
        .status
        .as_deref()
        .map(|raw| match raw {
            "pending" => Ok(SubscriptionStatus::Pending),
            "active" => Ok(SubscriptionStatus::Active),
            "paused" => Ok(SubscriptionStatus::Paused),
            "disabled" => Ok(SubscriptionStatus::Disabled),
            _ => Err(ApiError::param(
                "status",
                "must be pending, active, paused or disabled",
            )),
        })
        .transpose()?;
    let filter = StatsFilter {
        member: q.member,
        application: q
            .application
            .as_deref()
            .map(|a| parse("application", a, broker_core::Principal::new))
            .transpose()?,
        room: q
            .room
            .as_deref()
            .map(|r| parse("room", r, broker_core::RoomName::new))
            .transpose()?,
        subscription: q
            .subscription
            .as_deref()
            .map(|r| parse("subscription", r, SubscriptionId::parse))
            .transpose()?,
        status,
    };
    let broker = s.broker.clone();
    // The report reads every listed subscription's queue head: keep it off the async workers.
    let report = tokio::task::spawn_blocking(move || broker.stats(&filter))
        .await
        .map_err(|e| {
            ApiError::Core(broker_core::Error::Storage(format!(
                "the statistics task failed: {e}"
            )))
        })??;
    Ok(reply(StatusCode::OK, &report))
}

/// Filters of the message log; they combine with "and".
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct MessagesQuery {
    /// Only this Room (all Rooms, in name order, when absent).
    room: Option<String>,
    /// Only this event type.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    event_type: Option<String>,
    /// Only this publisher (application id).
    publisher: Option<String>,
    /// Only events owed to this subscriber (application id).
    subscriber: Option<String>,
    /// Only events owed to this subscription.
    subscription: Option<String>,
    /// Only this ordering key.
    key: Option<String>,
    /// RFC 3339: events received at or after.
    since: Option<String>,
    /// RFC 3339: events received before.
    until: Option<String>,
    /// Only events with a delivery (among the subscriptions kept) in this state: `pending`,
    /// `in_flight`, `undelivered`, `delivered` or `dead_lettered`.
    status: Option<String>,
    /// Include payloads; allowed only when `observability.message_log_payloads` is on.
    payload: Option<bool>,
    /// Page size (default 100).
    limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// The message log: events with their metadata, each one's state for every subscription that
/// owes or owed it, and a summary ("delivered to 7 of 7 subscriptions"). Each page scans a
/// bounded number of events, so a selective search may answer a short page with a cursor:
/// follow `next_cursor` until it is absent.
#[utoipa::path(get, path = "/admin/messages", operation_id = "searchMessages", tag = "admin",
    params(MessagesQuery),
    responses((status = 200, description = "`{items, next_cursor}`.", body = CoreObject),
        (status = 400, response = BadRequest), (status = 404, response = NotFound)))]
async fn messages(
    State(s): State<AppState>,
    id: Identity,
    Query(q): Query<MessagesQuery>,
) -> Result<Response, ApiError> {
    admin(&id)?;
    let payloads = q.payload.unwrap_or(false);
    if payloads && !s.message_log_payloads {
        return Err(ApiError::Forbidden(
            "payloads in the message log are off; set observability.message_log_payloads".into(),
        ));
    }
    let principal = |name: &str, raw: &Option<String>| {
        raw.as_deref()
            .map(|p| parse(name, p, broker_core::Principal::new))
            .transpose()
    };
    let key_max = s.broker.config().limits.key_bytes_max;
    let filter = MessageFilter {
        room: q
            .room
            .as_deref()
            .map(|r| parse("room", r, broker_core::RoomName::new))
            .transpose()?,
        event_type: q
            .event_type
            .as_deref()
            .map(|t| parse("type", t, broker_core::EventTypeName::new))
            .transpose()?,
        publisher: principal("publisher", &q.publisher)?,
        subscriber: principal("subscriber", &q.subscriber)?,
        subscription: q
            .subscription
            .as_deref()
            .map(|r| parse("subscription", r, SubscriptionId::parse))
            .transpose()?,
        key: q
            .key
            .as_deref()
            .map(|k| parse("key", k, |k| broker_core::OrderingKey::new(k, key_max)))
            .transpose()?,
        since: time("since", q.since.as_deref())?,
        until: time("until", q.until.as_deref())?,
        status: q
            .status
            .as_deref()
            .map(|st| parse("status", st, MessageStatus::parse))
            .transpose()?,
        payloads,
        limit: q.limit,
        cursor: q.cursor,
    };
    Ok(reply(StatusCode::OK, &s.broker.message_log(filter).await?))
}

/// What `GET /v1/admin/config` shows.
fn config_view(s: &AppState) -> serde_json::Value {
    json!({
        "broker": &*s.broker.config(),
        "log_level": crate::logging::level(),
        "changeable": {
            "limits": ["payload_bytes_max", "key_bytes_max", "batch_events_max",
                       "list_items_max", "list_scan_max"],
            "delivery": ["retry", "retry_after_ms_max", "in_flight_max_default",
                         "queue_depth_max_default", "lease_ms_default", "pull_messages_max",
                         "pull_wait_ms_max", "dead_letter_retention_ms"],
            "top": ["idempotency_window_ms", "log_level"],
        },
    })
}

/// The running configuration: the core's settings as they stand now, the log level, and which
/// settings `PATCH` may change.
#[utoipa::path(get, path = "/admin/config", operation_id = "getConfig", tag = "admin",
    responses((status = 200, description = "`{broker, log_level, changeable}`.", body = CoreObject)))]
async fn read_config(State(s): State<AppState>, id: Identity) -> Result<Response, ApiError> {
    admin(&id)?;
    Ok(reply(StatusCode::OK, &config_view(&s)))
}

/// A change to the running configuration; fields left out stay as they are.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ConfigPatchBody {
    /// `payload_bytes_max`, `key_bytes_max`, `batch_events_max`, `list_items_max`,
    /// `list_scan_max`.
    #[schema(value_type = Option<Object>)]
    limits: Option<LimitsPatch>,
    /// `retry` (any of `initial_delay_ms`, `multiplier`, `delay_ms_max`, `attempts_max`,
    /// `ttl_ms`, `jitter_percent`), `retry_after_ms_max`, `in_flight_max_default`,
    /// `queue_depth_max_default`, `lease_ms_default`, `pull_messages_max`, `pull_wait_ms_max`,
    /// `dead_letter_retention_ms`.
    #[schema(value_type = Option<Object>)]
    delivery: Option<DeliveryPatch>,
    /// How long a publish's idempotency key is remembered, in milliseconds.
    idempotency_window_ms: Option<u64>,
    /// Log directives in `RUST_LOG` syntax, e.g. `info,broker_core=debug`.
    log_level: Option<String>,
}

/// Changes retry and backoff defaults, limits and log levels while the server runs, and
/// answers the configuration as it now stands. Nothing changes when any field is refused. The
/// change is audited with the patch; it lasts until the server stops (put it in the
/// configuration file to keep it). On a database several nodes share, every node adopts it
/// within half a push lease, and it stays stored until changed again (the log level stays per
/// node).
#[utoipa::path(patch, path = "/admin/config", operation_id = "patchConfig", tag = "admin",
    request_body = ConfigPatchBody,
    responses((status = 200, description = "`{broker, log_level, changeable}`.", body = CoreObject),
        (status = 400, response = BadRequest), (status = 409, description = "Log levels are not managed by this process.", body = crate::error::Problem),
        (status = 422, response = Unprocessable)))]
async fn patch_config(
    State(s): State<AppState>,
    id: Identity,
    ApiJson(body): ApiJson<serde_json::Value>,
) -> Result<Response, ApiError> {
    admin(&id)?;
    // Parsed from the value so that the audit entry records the patch exactly as sent.
    let patch: ConfigPatchBody =
        serde_json::from_value(body.clone()).map_err(|e| ApiError::param("body", e.to_string()))?;
    // The log level is checked first: a bad one must not leave the rest half-applied.
    if let Some(level) = &patch.log_level {
        if crate::logging::level().is_none() {
            return Err(ApiError::NotManaged(
                "log levels are not managed by this process (its logger was installed by the \
                 program that embeds the server)"
                    .into(),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(level)
            .map_err(|e| ApiError::param("log_level", e.to_string()))?;
    }
    let core = ConfigPatch {
        limits: patch.limits,
        delivery: patch.delivery,
        idempotency_window_ms: patch.idempotency_window_ms,
    };
    s.broker.reconfigure(&core).await?;
    if let Some(level) = &patch.log_level {
        crate::logging::set_level(level).map_err(|e| match e {
            crate::logging::LevelError::Invalid(m) => ApiError::param("log_level", m),
            crate::logging::LevelError::NotManaged => {
                ApiError::NotManaged("log levels are not managed by this process".into())
            }
        })?;
    }
    tracing::info!(patch = %body, "configuration changed");
    let mut resp = reply(StatusCode::OK, &config_view(&s));
    resp.extensions_mut().insert(AuditDetail(body));
    Ok(resp)
}
