//! The queue side of a subscription: pull with leases, ack, nack, extend and term, dead letters
//! (list, redrive, purge), the attempt log and blocked keys. Split from `subscriptions.rs`, which
//! keeps the subscription itself (and the routes of both).

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::Response;
use broker_core::{EventId, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};

use super::schemas::{
    BadRequest, Conflict, CoreObject, NotFound, Unprocessable, UnsupportedMediaType,
};
use super::subscriptions::{action_body, ActionBody, Owned};
use super::{optional_json, parse, reply, AppState, RawBody};
use crate::error::ApiError;

/// What `pull` reads from the body (the body may be empty).
#[derive(ToSchema)]
struct PullRequest {
    /// Most messages to hand out (default 1).
    max_messages: Option<usize>,
    /// How long the lease lasts, in milliseconds (default: the broker's).
    lease_ms: Option<u64>,
    /// How long to wait for a message when none is ready, in milliseconds (default 0).
    wait_ms: Option<u64>,
}

impl From<ActionBody> for PullRequest {
    fn from(b: ActionBody) -> Self {
        PullRequest {
            max_messages: b.max_messages,
            lease_ms: b.lease_ms,
            wait_ms: b.wait_ms,
        }
    }
}

/// What `ack` and `term` read from the body.
#[derive(ToSchema)]
struct AckRequest {
    /// The ack ids of pulled messages.
    ack_ids: Vec<String>,
}

impl TryFrom<ActionBody> for AckRequest {
    type Error = ApiError;

    fn try_from(b: ActionBody) -> Result<Self, ApiError> {
        Ok(AckRequest {
            ack_ids: b
                .ack_ids
                .ok_or_else(|| ApiError::param("ack_ids", "required"))?,
        })
    }
}

/// What `nack` reads from the body.
#[derive(ToSchema)]
struct NackRequest {
    /// The ack ids of pulled messages.
    ack_ids: Vec<String>,
    /// How long until the messages may be pulled again, in milliseconds (default: the retry
    /// policy's next delay).
    delay_ms: Option<u64>,
}

impl TryFrom<ActionBody> for NackRequest {
    type Error = ApiError;

    fn try_from(b: ActionBody) -> Result<Self, ApiError> {
        Ok(NackRequest {
            ack_ids: b
                .ack_ids
                .ok_or_else(|| ApiError::param("ack_ids", "required"))?,
            delay_ms: b.delay_ms,
        })
    }
}

/// What `extend` reads from the body.
#[derive(ToSchema)]
struct ExtendRequest {
    /// The ack ids of pulled messages.
    ack_ids: Vec<String>,
    /// The new lease, in milliseconds from now.
    lease_ms: u64,
}

impl TryFrom<ActionBody> for ExtendRequest {
    type Error = ApiError;

    fn try_from(b: ActionBody) -> Result<Self, ApiError> {
        Ok(ExtendRequest {
            ack_ids: b
                .ack_ids
                .ok_or_else(|| ApiError::param("ack_ids", "required"))?,
            lease_ms: b
                .lease_ms
                .ok_or_else(|| ApiError::param("lease_ms", "required"))?,
        })
    }
}

/// One message handed out by a pull.
#[derive(Serialize, ToSchema)]
struct PulledMessage {
    /// Pass back to ack, nack, extend or term.
    ack_id: String,
    /// The attempt number this lease is, from 1.
    attempt: u32,
    /// When the lease ends (RFC 3339, UTC).
    #[schema(value_type = String, format = DateTime)]
    lease_until: Timestamp,
    /// The event's metadata.
    #[schema(value_type = Object)]
    event: broker_core::Event,
    /// The event's payload.
    payload: Value,
}

/// What a pull answers.
#[derive(Serialize, ToSchema)]
struct PullResponse {
    /// The messages, possibly none.
    messages: Vec<PulledMessage>,
}

/// The outcome for one ack id.
#[derive(Serialize, ToSchema)]
struct AckResult {
    /// The ack id.
    ack_id: String,
    /// Whether it was settled.
    ok: bool,
    /// Why not: the error's code (e.g. `lease_expired`).
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<String>,
    /// Why not, for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

/// What ack, nack, extend and term answer: one result per ack id, in request order.
#[derive(Serialize, ToSchema)]
struct AckResults {
    /// The results.
    results: Vec<AckResult>,
}

fn results(r: Vec<broker_core::Result<()>>, ids: Vec<String>) -> Response {
    let results = ids
        .into_iter()
        .zip(r)
        .map(|(ack_id, r)| match r {
            Ok(()) => AckResult {
                ack_id,
                ok: true,
                code: None,
                detail: None,
            },
            Err(e) => AckResult {
                ack_id,
                ok: false,
                code: Some(e.code().to_string()),
                detail: Some(e.to_string()),
            },
        })
        .collect();
    reply(StatusCode::OK, &AckResults { results })
}

/// Hands out ready messages of a pull subscription, each under a lease.
#[utoipa::path(
    post,
    path = "/subscriptions/{id}/pull",
    operation_id = "pull",
    tag = "pull",
    params(("id" = String, Path, format = Uuid, description = "The subscription id.")),
    request_body(content = PullRequest, description = "May be empty: one message, the default lease, no wait."),
    responses(
        (status = 200, description = "The messages, possibly none.", body = PullResponse),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
    )
)]
pub(super) async fn pull(
    State(s): State<AppState>,
    Owned { id, .. }: Owned,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let b = PullRequest::from(action_body(&headers, &body)?);
    let msgs = s
        .broker
        .pull(
            id,
            b.max_messages.unwrap_or(1),
            b.lease_ms,
            b.wait_ms.unwrap_or(0),
        )
        .await?;
    let messages = msgs
        .into_iter()
        .map(|m| PulledMessage {
            payload: m.event.payload_json().unwrap_or(Value::Null),
            ack_id: m.ack_id,
            attempt: m.attempt,
            lease_until: m.lease_until,
            event: m.event,
        })
        .collect();
    Ok(reply(StatusCode::OK, &PullResponse { messages }))
}

/// Acknowledges pulled messages: they are delivered.
#[utoipa::path(
    post,
    path = "/subscriptions/{id}/ack",
    operation_id = "ack",
    tag = "pull",
    params(("id" = String, Path, format = Uuid, description = "The subscription id.")),
    request_body = AckRequest,
    responses(
        (status = 200, description = "One result per ack id.", body = AckResults),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 415, response = UnsupportedMediaType),
    )
)]
pub(super) async fn ack(
    State(s): State<AppState>,
    Owned { id, .. }: Owned,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let b = AckRequest::try_from(action_body(&headers, &body)?)?;
    Ok(results(s.broker.ack(id, &b.ack_ids).await?, b.ack_ids))
}

/// Gives pulled messages back: they are retried after a delay, or dead-lettered when the retry
/// policy is spent.
#[utoipa::path(
    post,
    path = "/subscriptions/{id}/nack",
    operation_id = "nack",
    tag = "pull",
    params(("id" = String, Path, format = Uuid, description = "The subscription id.")),
    request_body = NackRequest,
    responses(
        (status = 200, description = "One result per ack id.", body = AckResults),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 415, response = UnsupportedMediaType),
    )
)]
pub(super) async fn nack(
    State(s): State<AppState>,
    Owned { id, .. }: Owned,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let b = NackRequest::try_from(action_body(&headers, &body)?)?;
    Ok(results(
        s.broker.nack(id, &b.ack_ids, b.delay_ms).await?,
        b.ack_ids,
    ))
}

/// Extends the leases of pulled messages.
#[utoipa::path(
    post,
    path = "/subscriptions/{id}/extend",
    operation_id = "extendLeases",
    tag = "pull",
    params(("id" = String, Path, format = Uuid, description = "The subscription id.")),
    request_body = ExtendRequest,
    responses(
        (status = 200, description = "One result per ack id.", body = AckResults),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 415, response = UnsupportedMediaType),
    )
)]
pub(super) async fn extend(
    State(s): State<AppState>,
    Owned { id, .. }: Owned,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let b = ExtendRequest::try_from(action_body(&headers, &body)?)?;
    Ok(results(
        s.broker.extend(id, &b.ack_ids, b.lease_ms).await?,
        b.ack_ids,
    ))
}

/// Terminates pulled messages: they go to the dead letters at once, without further retries.
#[utoipa::path(
    post,
    path = "/subscriptions/{id}/term",
    operation_id = "term",
    tag = "pull",
    params(("id" = String, Path, format = Uuid, description = "The subscription id.")),
    request_body = AckRequest,
    responses(
        (status = 200, description = "One result per ack id.", body = AckResults),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 415, response = UnsupportedMediaType),
    )
)]
pub(super) async fn term(
    State(s): State<AppState>,
    Owned { id, .. }: Owned,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let b = AckRequest::try_from(action_body(&headers, &body)?)?;
    Ok(results(
        s.broker.terminate(id, &b.ack_ids).await?,
        b.ack_ids,
    ))
}

/// Paging through a listing.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct PageQuery {
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Most items in one page.
    limit: Option<usize>,
}

/// Lists the events the subscription gave up on, with the reason and last attempt.
#[utoipa::path(
    get,
    path = "/subscriptions/{id}/dead-letters",
    operation_id = "listDeadLetters",
    tag = "dead-letters",
    params(("id" = String, Path, format = Uuid, description = "The subscription id."), PageQuery),
    responses(
        (status = 200, description = "A page of dead letters: `{items, next_cursor}`.", body = CoreObject),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
pub(super) async fn dead_letters(
    State(s): State<AppState>,
    Owned { id, .. }: Owned,
    Query(q): Query<PageQuery>,
) -> Result<Response, ApiError> {
    Ok(reply(
        StatusCode::OK,
        &s.broker.dead_letters(id, q.cursor.as_deref(), q.limit)?,
    ))
}

/// Which dead letters to deliver again.
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
struct RedriveBody {
    /// These events (default: all dead letters).
    event_ids: Option<Vec<String>>,
}

/// How many dead letters were queued again.
#[derive(Serialize, ToSchema)]
struct RedriveResponse {
    /// Events queued again.
    redriven: u64,
}

/// Queues dead letters for delivery again; attempt numbers carry on.
#[utoipa::path(
    post,
    path = "/subscriptions/{id}/dead-letters/redrive",
    operation_id = "redriveDeadLetters",
    tag = "dead-letters",
    params(("id" = String, Path, format = Uuid, description = "The subscription id.")),
    request_body(content = RedriveBody, description = "May be empty: redrives every dead letter."),
    responses(
        (status = 200, description = "How many were queued.", body = RedriveResponse),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 415, response = UnsupportedMediaType),
    )
)]
pub(super) async fn redrive(
    State(s): State<AppState>,
    Owned { id, .. }: Owned,
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
        &RedriveResponse {
            redriven: s.broker.redrive(id, events).await?,
        },
    ))
}

/// How many dead letters were removed.
#[derive(Serialize, ToSchema)]
struct PurgeResponse {
    /// Dead letters removed.
    purged: u64,
}

/// Removes every dead letter of the subscription.
#[utoipa::path(
    delete,
    path = "/subscriptions/{id}/dead-letters",
    operation_id = "purgeDeadLetters",
    tag = "dead-letters",
    params(("id" = String, Path, format = Uuid, description = "The subscription id.")),
    responses(
        (status = 200, description = "How many were removed.", body = PurgeResponse),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
pub(super) async fn purge(
    State(s): State<AppState>,
    Owned { id, .. }: Owned,
) -> Result<Response, ApiError> {
    Ok(reply(
        StatusCode::OK,
        &PurgeResponse {
            purged: s.broker.purge_dead_letters(id).await?,
        },
    ))
}

/// The delivery log: every attempt with its time, outcome, HTTP status or error, and latency.
#[utoipa::path(
    get,
    path = "/subscriptions/{id}/attempts",
    operation_id = "listAttempts",
    tag = "subscriptions",
    params(("id" = String, Path, format = Uuid, description = "The subscription id."), PageQuery),
    responses(
        (status = 200, description = "A page of attempts: `{items, next_cursor}`.", body = CoreObject),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
pub(super) async fn attempts(
    State(s): State<AppState>,
    Owned { id, .. }: Owned,
    Query(q): Query<PageQuery>,
) -> Result<Response, ApiError> {
    Ok(reply(
        StatusCode::OK,
        &s.broker.attempts(id, q.cursor.as_deref(), q.limit)?,
    ))
}

/// The ordering keys whose head event is held back (an ordered subscription delivers one event
/// per key at a time).
#[utoipa::path(
    get,
    path = "/subscriptions/{id}/blocked-keys",
    operation_id = "listBlockedKeys",
    tag = "subscriptions",
    params(("id" = String, Path, format = Uuid, description = "The subscription id."), PageQuery),
    responses(
        (status = 200, description = "`{items: [blocked key]}`.", body = CoreObject),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
pub(super) async fn blocked_keys(
    State(s): State<AppState>,
    Owned { id, .. }: Owned,
    Query(q): Query<PageQuery>,
) -> Result<Response, ApiError> {
    Ok(reply(
        StatusCode::OK,
        &json!({"items": s.broker.blocked_keys(id, q.limit)?}),
    ))
}
