//! Subscriptions, pull with leases, dead letters, the attempt log and blocked keys.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use broker_core::{
    BasicAuth, DeliveryMode, EventId, EventTypeName, NewSubscription, PushEndpoint, RetryOverrides,
    RoomName, SeekTarget, SubscriptionId, SubscriptionPatch, Timestamp,
};
use serde::Deserialize;
use serde_json::{json, Value};

use axum::http::HeaderMap;

use super::{optional_json, parse, reply, ApiJson, AppState, RawBody};
use crate::error::ApiError;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/rooms/{room}/subscriptions", post(create).get(list))
        .route(
            "/subscriptions/{id}",
            get(read).patch(update).delete(remove),
        )
        .route("/subscriptions/{id}/{action}", post(action))
        .route(
            "/subscriptions/{id}/dead-letters",
            get(dead_letters).delete(purge),
        )
        .route("/subscriptions/{id}/dead-letters/redrive", post(redrive))
        .route("/subscriptions/{id}/attempts", get(attempts))
        .route("/subscriptions/{id}/blocked-keys", get(blocked_keys))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushBody {
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    basic_auth: Option<BasicAuthBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BasicAuthBody {
    username: String,
    password: String,
}

impl From<PushBody> for PushEndpoint {
    fn from(p: PushBody) -> Self {
        PushEndpoint {
            url: p.url,
            headers: p.headers.into_iter().collect(),
            basic_auth: p.basic_auth.map(|b| BasicAuth {
                username: b.username,
                password: b.password,
            }),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Push,
    Pull,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    mode: Mode,
    push: Option<PushBody>,
    event_types: Option<Vec<String>>,
    ordered: Option<bool>,
    #[serde(default)]
    retry: RetryOverrides,
    in_flight_max: Option<u32>,
    queue_depth_max: Option<u64>,
}

fn sub_id(raw: &str) -> Result<SubscriptionId, ApiError> {
    parse("subscription id", raw, SubscriptionId::parse)
}

fn type_list(types: Vec<String>) -> Result<Vec<EventTypeName>, ApiError> {
    types
        .iter()
        .map(|t| parse("event_types", t, EventTypeName::new))
        .collect()
}

/// The subscription as JSON, without the push endpoint's password.
fn view(sub: &broker_core::Subscription) -> Value {
    let mut v = serde_json::to_value(sub).unwrap_or(Value::Null);
    if let Some(auth) = v
        .pointer_mut("/mode/basic_auth")
        .and_then(Value::as_object_mut)
    {
        auth.remove("password");
    }
    v
}

async fn create(
    State(s): State<AppState>,
    Path(room): Path<String>,
    ApiJson(b): ApiJson<CreateBody>,
) -> Result<Response, ApiError> {
    let room = parse("room", &room, RoomName::new)?;
    let mode = match (b.mode, b.push) {
        (Mode::Push, Some(p)) => DeliveryMode::Push(p.into()),
        (Mode::Push, None) => {
            return Err(ApiError::param(
                "push",
                "a push subscription needs `push.url`",
            ))
        }
        (Mode::Pull, None) => DeliveryMode::Pull,
        (Mode::Pull, Some(_)) => {
            return Err(ApiError::param(
                "push",
                "a pull subscription takes no push endpoint",
            ))
        }
    };
    let mut new = NewSubscription::new(s.principal.clone(), mode);
    new.event_types = b.event_types.map(type_list).transpose()?;
    new.ordered = b.ordered;
    new.retry = b.retry;
    new.in_flight_max = b.in_flight_max;
    new.queue_depth_max = b.queue_depth_max;
    let created = s.broker.create_subscription(&room, new).await?;
    Ok(reply(
        StatusCode::CREATED,
        &json!({"subscription": view(&created.subscription), "secret": created.secret}),
    ))
}

async fn list(State(s): State<AppState>, Path(room): Path<String>) -> Result<Response, ApiError> {
    let subs = s
        .broker
        .subscriptions(&parse("room", &room, RoomName::new)?)?;
    Ok(reply(
        StatusCode::OK,
        &json!({"items": subs.iter().map(view).collect::<Vec<_>>()}),
    ))
}

async fn read(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    Ok(reply(
        StatusCode::OK,
        &view(&s.broker.subscription(sub_id(&id)?)?),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    /// Absent: unchanged; `null`: all types; a list: those types.
    #[serde(default)]
    event_types: Option<Value>,
    push: Option<PushBody>,
    ordered: Option<bool>,
    retry: Option<RetryOverrides>,
    in_flight_max: Option<u32>,
    queue_depth_max: Option<u64>,
}

async fn update(
    State(s): State<AppState>,
    Path(id): Path<String>,
    ApiJson(b): ApiJson<PatchBody>,
) -> Result<Response, ApiError> {
    let event_types = match b.event_types {
        None => None,
        Some(Value::Null) => Some(None),
        Some(v) => {
            let list: Vec<String> = serde_json::from_value(v)
                .map_err(|e| ApiError::BadJson(format!("event_types: {e}")))?;
            Some(Some(type_list(list)?))
        }
    };
    let patch = SubscriptionPatch {
        event_types,
        push: b.push.map(Into::into),
        ordered: b.ordered,
        retry: b.retry,
        in_flight_max: b.in_flight_max,
        queue_depth_max: b.queue_depth_max,
    };
    Ok(reply(
        StatusCode::OK,
        &view(&s.broker.update_subscription(sub_id(&id)?, patch).await?),
    ))
}

async fn remove(State(s): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    s.broker.delete_subscription(sub_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    // pull
    max_messages: Option<usize>,
    lease_ms: Option<u64>,
    wait_ms: Option<u64>,
    // ack, nack, extend, term
    ack_ids: Option<Vec<String>>,
    delay_ms: Option<u64>,
    // seek: "oldest" or an RFC 3339 time
    to: Option<String>,
}

async fn action(
    State(s): State<AppState>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let id = sub_id(&id)?;
    let b: ActionBody = optional_json(&headers, &body)?;
    let ack_ids = || {
        b.ack_ids
            .clone()
            .ok_or_else(|| ApiError::param("ack_ids", "required"))
    };
    let results = |r: Vec<broker_core::Result<()>>, ids: Vec<String>| {
        let items: Vec<Value> = ids
            .iter()
            .zip(r)
            .map(|(a, r)| match r {
                Ok(()) => json!({"ack_id": a, "ok": true}),
                Err(e) => {
                    json!({"ack_id": a, "ok": false, "code": e.code(), "detail": e.to_string()})
                }
            })
            .collect();
        reply(StatusCode::OK, &json!({"results": items}))
    };
    match action.as_str() {
        "pause" => Ok(reply(
            StatusCode::OK,
            &view(&s.broker.pause_subscription(id).await?),
        )),
        "resume" => Ok(reply(
            StatusCode::OK,
            &view(&s.broker.resume_subscription(id).await?),
        )),
        "approve" => Ok(reply(
            StatusCode::OK,
            &view(&s.broker.approve_subscription(id).await?),
        )),
        "rotate-secret" => Ok(reply(
            StatusCode::OK,
            &json!({"secret": s.broker.rotate_secret(id).await?}),
        )),
        "seek" => {
            let target = match b.to.as_deref() {
                None | Some("oldest") => SeekTarget::Oldest,
                Some(t) => SeekTarget::Time(
                    Timestamp::parse_rfc3339(t)
                        .ok_or_else(|| ApiError::param("to", "`oldest` or an RFC 3339 time"))?,
                ),
            };
            Ok(reply(
                StatusCode::OK,
                &json!({"queued": s.broker.seek(id, target).await?}),
            ))
        }
        "pull" => {
            let msgs = s
                .broker
                .pull(
                    id,
                    b.max_messages.unwrap_or(1),
                    b.lease_ms,
                    b.wait_ms.unwrap_or(0),
                )
                .await?;
            let items: Vec<Value> = msgs
                .iter()
                .map(|m| {
                    json!({
                        "ack_id": m.ack_id, "attempt": m.attempt, "lease_until": m.lease_until,
                        "event": m.event, "payload": m.event.payload_json().unwrap_or(Value::Null),
                    })
                })
                .collect();
            Ok(reply(StatusCode::OK, &json!({"messages": items})))
        }
        "ack" => {
            let ids = ack_ids()?;
            Ok(results(s.broker.ack(id, &ids).await?, ids))
        }
        "nack" => {
            let ids = ack_ids()?;
            Ok(results(s.broker.nack(id, &ids, b.delay_ms).await?, ids))
        }
        "extend" => {
            let ids = ack_ids()?;
            let lease = b
                .lease_ms
                .ok_or_else(|| ApiError::param("lease_ms", "required"))?;
            Ok(results(s.broker.extend(id, &ids, lease).await?, ids))
        }
        "term" => {
            let ids = ack_ids()?;
            Ok(results(s.broker.terminate(id, &ids).await?, ids))
        }
        _ => Err(ApiError::NoRoute),
    }
}

#[derive(Deserialize)]
struct PageQuery {
    cursor: Option<String>,
    limit: Option<usize>,
}

async fn dead_letters(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> Result<Response, ApiError> {
    Ok(reply(
        StatusCode::OK,
        &s.broker
            .dead_letters(sub_id(&id)?, q.cursor.as_deref(), q.limit)?,
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RedriveBody {
    event_ids: Option<Vec<String>>,
}

async fn redrive(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let b: RedriveBody = optional_json(&headers, &body)?;
    let events = b
        .event_ids
        .map(|ids| {
            ids.iter()
                .map(|e| parse("event_ids", e, EventId::parse))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    Ok(reply(
        StatusCode::OK,
        &json!({"redriven": s.broker.redrive(sub_id(&id)?, events).await?}),
    ))
}

async fn purge(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    Ok(reply(
        StatusCode::OK,
        &json!({"purged": s.broker.purge_dead_letters(sub_id(&id)?).await?}),
    ))
}

async fn attempts(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> Result<Response, ApiError> {
    Ok(reply(
        StatusCode::OK,
        &s.broker
            .attempts(sub_id(&id)?, q.cursor.as_deref(), q.limit)?,
    ))
}

async fn blocked_keys(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> Result<Response, ApiError> {
    Ok(reply(
        StatusCode::OK,
        &json!({"items": s.broker.blocked_keys(sub_id(&id)?, q.limit)?}),
    ))
}
