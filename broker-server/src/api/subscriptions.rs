//! Subscriptions, pull with leases, dead letters, the attempt log and blocked keys. Every action
//! on a subscription (`pause`, `pull`, `ack`, ...) has its own handler, so that each has its own
//! operation, request body and answer in the OpenAPI document.

use std::collections::BTreeMap;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::http::{HeaderMap, Method};
use axum::response::Response;
use broker_core::{
    BasicAuth, DeliveryMode, EventId, EventTypeName, NewSubscription, PushEndpoint, RetryOverrides,
    RoomName, SeekTarget, SubscriptionId, SubscriptionPatch, Timestamp,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::schemas::{
    BadRequest, Conflict, CoreObject, NotFound, RetryOverridesSchema, Unprocessable,
    UnsupportedMediaType,
};
use super::{optional_json, parse, reply, ApiJson, AppState, RawBody};
use crate::auth::Identity;
use crate::error::ApiError;

/// A subscription the caller may act on: as its subscriber, as a manager of its Room, or as an
/// administrator.
pub(super) struct Owned {
    id: SubscriptionId,
    sub: broker_core::Subscription,
    who: Identity,
}

impl FromRequestParts<AppState> for Owned {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let who = Identity::from_request_parts(parts, state).await?;
        let Path(params) =
            Path::<std::collections::HashMap<String, String>>::from_request_parts(parts, state)
                .await
                .map_err(|e| ApiError::param("path", e.body_text()))?;
        let raw = params
            .get("id")
            .ok_or_else(|| ApiError::param("id", "missing"))?;
        let id = sub_id(raw)?;
        let sub = state.broker.subscription(id)?;
        who.require(
            sub.subscriber == who.principal || who.rights.manages(&sub.room),
            "act on this subscription",
        )?;
        // Rights are checked on every use: a subscriber whose right to receive was taken away
        // may still read its subscription (its status says why it is paused) and delete it,
        // and nothing else.
        let bare = parts
            .uri
            .path()
            .trim_end_matches('/')
            .ends_with(raw.as_str());
        let reading_or_deleting =
            bare && matches!(parts.method, Method::GET | Method::HEAD | Method::DELETE);
        if !who.rights.manages(&sub.room) && !reading_or_deleting {
            who.require(
                who.rights
                    .can_subscribe(&sub.room, sub.event_types.as_deref()),
                "use this subscription: its right to receive was taken away",
            )?;
        }
        Ok(Owned { id, sub, who })
    }
}

/// The routes, relative to `/v1`. Each action is its own path, as
/// `/subscriptions/{id}/{action}` was before the actions were split; an unknown action still
/// falls through to the router's no-route answer.
pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(read, update, remove))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(approve))
        .routes(routes!(rotate_secret))
        .routes(routes!(seek))
        .routes(routes!(pull))
        .routes(routes!(ack))
        .routes(routes!(nack))
        .routes(routes!(extend))
        .routes(routes!(term))
        .routes(routes!(dead_letters, purge))
        .routes(routes!(redrive))
        .routes(routes!(attempts))
        .routes(routes!(blocked_keys))
}

/// Where a push subscription delivers.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PushBody {
    /// The webhook URL, without credentials (`user:password@` is refused: use `basic_auth`).
    url: String,
    /// Extra headers sent with every delivery. Their values are write-only: answers show
    /// each header's name with the value `***`.
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// HTTP Basic credentials for the endpoint; the password is never shown again.
    basic_auth: Option<BasicAuthBody>,
}

/// HTTP Basic credentials.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct BasicAuthBody {
    /// The user name.
    username: String,
    /// The password.
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

/// How a subscription receives events.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum Mode {
    /// The broker posts each event to a webhook.
    Push,
    /// The subscriber pulls events with leases.
    Pull,
}

/// A new subscription.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    /// Push or pull.
    mode: Mode,
    /// The webhook; required for push, refused for pull.
    push: Option<PushBody>,
    /// Only these event types (default: all of the Room's).
    event_types: Option<Vec<String>>,
    /// Per-key FIFO delivery (default: the Room's setting).
    ordered: Option<bool>,
    /// Retry overrides for this subscription.
    #[serde(default)]
    #[schema(value_type = RetryOverridesSchema)]
    retry: RetryOverrides,
    /// Most events in flight at once.
    in_flight_max: Option<u32>,
    /// Most events queued; beyond it new events go to the dead letters (`queue_full`).
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

/// The subscription as JSON, as anyone who may read it may see it: the push endpoint's header
/// values shown as `***`, no credentials in its URL and no Basic password (all write-only).
fn view(sub: &broker_core::Subscription) -> Value {
    let mut v = serde_json::to_value(sub.redacted()).unwrap_or(Value::Null);
    if let Some(auth) = v
        .pointer_mut("/mode/basic_auth")
        .and_then(Value::as_object_mut)
    {
        auth.remove("password");
    }
    v
}

/// What creating a subscription answers.
#[derive(Serialize, ToSchema)]
struct CreatedResponse {
    /// The subscription (a push endpoint's header values and password are never shown).
    #[schema(value_type = Object)]
    subscription: Value,
    /// `whsec_...`, the push signing secret, shown only here; `null` for pull.
    secret: Option<String>,
}

/// Creates a subscription on a Room.
#[utoipa::path(
    post,
    path = "/rooms/{room}/subscriptions",
    operation_id = "createSubscription",
    tag = "subscriptions",
    params(("room" = String, Path, description = "The Room's name.")),
    request_body = CreateBody,
    responses(
        (status = 201, description = "The subscription and its signing secret.", body = CreatedResponse),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
    )
)]
async fn create(
    State(s): State<AppState>,
    who: Identity,
    Path(room): Path<String>,
    ApiJson(b): ApiJson<CreateBody>,
) -> Result<Response, ApiError> {
    let room = parse("room", &room, RoomName::new)?;
    let types = b.event_types.clone().map(type_list).transpose()?;
    who.require(
        who.rights.can_subscribe(&room, types.as_deref()),
        "subscribe to these event types",
    )?;
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
    let mut new = NewSubscription::new(who.principal.clone(), mode);
    // In a Room that asks for it, a subscription waits for a manager's approval.
    new.approved = who.rights.manages(&room) || !s.broker.room(&room)?.subscription_approval;
    new.event_types = types;
    new.ordered = b.ordered;
    new.retry = b.retry;
    new.in_flight_max = b.in_flight_max;
    new.queue_depth_max = b.queue_depth_max;
    let created = s.broker.create_subscription(&room, new).await?;
    Ok(reply(
        StatusCode::CREATED,
        &CreatedResponse {
            subscription: view(&created.subscription),
            secret: created.secret,
        },
    ))
}

/// Lists a Room's subscriptions.
#[utoipa::path(
    get,
    path = "/rooms/{room}/subscriptions",
    operation_id = "listSubscriptions",
    tag = "subscriptions",
    params(("room" = String, Path, description = "The Room's name.")),
    responses(
        (status = 200, description = "`{items: [subscription]}`.", body = CoreObject),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn list(
    State(s): State<AppState>,
    who: Identity,
    Path(room): Path<String>,
) -> Result<Response, ApiError> {
    let room = parse("room", &room, RoomName::new)?;
    who.require(who.rights.any_on(&room), "read this Room")?;
    let mut subs = s.broker.subscriptions(&room)?;
    // A manager sees every subscription of the Room; anyone else only their own.
    if !who.rights.manages(&room) {
        subs.retain(|sub| sub.subscriber == who.principal);
    }
    Ok(reply(
        StatusCode::OK,
        &json!({"items": subs.iter().map(view).collect::<Vec<_>>()}),
    ))
}

/// Reads a subscription.
#[utoipa::path(
    get,
    path = "/subscriptions/{id}",
    operation_id = "getSubscription",
    tag = "subscriptions",
    params(("id" = String, Path, format = Uuid, description = "The subscription id.")),
    responses(
        (status = 200, description = "The subscription.", body = CoreObject),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn read(State(s): State<AppState>, Owned { id, .. }: Owned) -> Result<Response, ApiError> {
    Ok(reply(StatusCode::OK, &view(&s.broker.subscription(id)?)))
}

/// Changes to a subscription; an absent field is left as it is.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    /// Absent: unchanged; `null`: all types; a list: those types.
    #[serde(default)]
    #[schema(value_type = Option<Vec<String>>)]
    event_types: Option<Value>,
    /// A new webhook (push subscriptions only), replacing the old one whole: header values and
    /// the Basic password are write-only, so send them again.
    push: Option<PushBody>,
    /// Per-key FIFO delivery.
    ordered: Option<bool>,
    /// New retry overrides (replacing the old ones).
    #[schema(value_type = Option<RetryOverridesSchema>)]
    retry: Option<RetryOverrides>,
    /// Most events in flight at once.
    in_flight_max: Option<u32>,
    /// Most events queued.
    queue_depth_max: Option<u64>,
}

/// Changes a subscription's filter, webhook, ordering, retries or limits.
#[utoipa::path(
    patch,
    path = "/subscriptions/{id}",
    operation_id = "updateSubscription",
    tag = "subscriptions",
    params(("id" = String, Path, format = Uuid, description = "The subscription id.")),
    request_body = PatchBody,
    responses(
        (status = 200, description = "The subscription after the change.", body = CoreObject),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
    )
)]
async fn update(
    State(s): State<AppState>,
    Owned { id, sub, who }: Owned,
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
    if let Some(types) = &event_types {
        // Widening a subscription needs the same right as subscribing.
        who.require(
            who.rights.can_subscribe(&sub.room, types.as_deref()),
            "subscribe to these event types",
        )?;
    }
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
        &view(&s.broker.update_subscription(id, patch).await?),
    ))
}

/// Deletes a subscription with its queue, dead letters and log.
#[utoipa::path(
    delete,
    path = "/subscriptions/{id}",
    operation_id = "deleteSubscription",
    tag = "subscriptions",
    params(("id" = String, Path, format = Uuid, description = "The subscription id.")),
    responses(
        (status = 204, description = "The subscription is gone."),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn remove(
    State(s): State<AppState>,
    Owned { id, .. }: Owned,
) -> Result<StatusCode, ApiError> {
    s.broker.delete_subscription(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The body of every `POST /v1/subscriptions/{id}/{action}`: the union of all actions' fields.
/// Each action reads its own fields and ignores the others, as the single action endpoint this
/// API began with did; an unknown field is still an error, so that a typo is not silently lost.
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

/// The action body; an empty body means every field is absent.
fn action_body(headers: &HeaderMap, body: &[u8]) -> Result<ActionBody, ApiError> {
    optional_json(headers, body)
}

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

/// What `seek` reads from the body (the body may be empty).
#[derive(ToSchema)]
struct SeekRequest {
    /// `oldest` (the default) or an RFC 3339 time: events received from then on are queued
    /// again.
    to: Option<String>,
}

impl From<ActionBody> for SeekRequest {
    fn from(b: ActionBody) -> Self {
        SeekRequest { to: b.to }
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

/// Pauses delivery; events still queue.
#[utoipa::path(
    post,
    path = "/subscriptions/{id}/pause",
    operation_id = "pauseSubscription",
    tag = "subscriptions",
    params(("id" = String, Path, format = Uuid, description = "The subscription id.")),
    responses(
        (status = 200, description = "The subscription after the change.", body = CoreObject),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 415, response = UnsupportedMediaType),
    )
)]
async fn pause(
    State(s): State<AppState>,
    Owned { id, .. }: Owned,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    action_body(&headers, &body)?;
    Ok(reply(
        StatusCode::OK,
        &view(&s.broker.pause_subscription(id).await?),
    ))
}

/// Resumes delivery.
#[utoipa::path(
    post,
    path = "/subscriptions/{id}/resume",
    operation_id = "resumeSubscription",
    tag = "subscriptions",
    params(("id" = String, Path, format = Uuid, description = "The subscription id.")),
    responses(
        (status = 200, description = "The subscription after the change.", body = CoreObject),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 415, response = UnsupportedMediaType),
    )
)]
async fn resume(
    State(s): State<AppState>,
    Owned { id, .. }: Owned,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    action_body(&headers, &body)?;
    Ok(reply(
        StatusCode::OK,
        &view(&s.broker.resume_subscription(id).await?),
    ))
}

/// Approves a subscription that waits for the Room owner's approval.
#[utoipa::path(
    post,
    path = "/subscriptions/{id}/approve",
    operation_id = "approveSubscription",
    tag = "subscriptions",
    params(("id" = String, Path, format = Uuid, description = "The subscription id.")),
    responses(
        (status = 200, description = "The subscription after approval.", body = CoreObject),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 415, response = UnsupportedMediaType),
    )
)]
async fn approve(
    State(s): State<AppState>,
    Owned { id, sub, who }: Owned,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    who.require(
        who.rights.manages(&sub.room),
        "approve subscriptions of this Room",
    )?;
    action_body(&headers, &body)?;
    Ok(reply(
        StatusCode::OK,
        &view(&s.broker.approve_subscription(id).await?),
    ))
}

/// The new signing secret of a push subscription.
#[derive(Serialize, ToSchema)]
struct SecretResponse {
    /// `whsec_...`: the Standard Webhooks signing secret. The old one stays valid for a grace
    /// period.
    secret: String,
}

/// Replaces a push subscription's signing secret.
#[utoipa::path(
    post,
    path = "/subscriptions/{id}/rotate-secret",
    operation_id = "rotateSubscriptionSecret",
    tag = "subscriptions",
    params(("id" = String, Path, format = Uuid, description = "The subscription id.")),
    responses(
        (status = 200, description = "The new secret, shown once.", body = SecretResponse),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 415, response = UnsupportedMediaType),
    )
)]
async fn rotate_secret(
    State(s): State<AppState>,
    Owned { id, .. }: Owned,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    action_body(&headers, &body)?;
    Ok(reply(
        StatusCode::OK,
        &SecretResponse {
            secret: s.broker.rotate_secret(id).await?,
        },
    ))
}

/// How many events a seek queued.
#[derive(Serialize, ToSchema)]
struct SeekResponse {
    /// Events queued again for delivery.
    queued: u64,
}

/// Replays: queues again every retained event received from a time on, or from the oldest.
#[utoipa::path(
    post,
    path = "/subscriptions/{id}/seek",
    operation_id = "seekSubscription",
    tag = "subscriptions",
    params(("id" = String, Path, format = Uuid, description = "The subscription id.")),
    request_body(content = SeekRequest, description = "May be empty: seeks to the oldest event."),
    responses(
        (status = 200, description = "How many events were queued.", body = SeekResponse),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 415, response = UnsupportedMediaType),
    )
)]
async fn seek(
    State(s): State<AppState>,
    Owned { id, .. }: Owned,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let b = SeekRequest::from(action_body(&headers, &body)?);
    let target = match b.to.as_deref() {
        None | Some("oldest") => SeekTarget::Oldest,
        Some(t) => SeekTarget::Time(
            Timestamp::parse_rfc3339(t)
                .ok_or_else(|| ApiError::param("to", "`oldest` or an RFC 3339 time"))?,
        ),
    };
    Ok(reply(
        StatusCode::OK,
        &SeekResponse {
            queued: s.broker.seek(id, target).await?,
        },
    ))
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
async fn pull(
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
async fn ack(
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
async fn nack(
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
async fn extend(
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
async fn term(
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
struct PageQuery {
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
async fn dead_letters(
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
async fn redrive(
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
async fn purge(State(s): State<AppState>, Owned { id, .. }: Owned) -> Result<Response, ApiError> {
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
async fn attempts(
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
async fn blocked_keys(
    State(s): State<AppState>,
    Owned { id, .. }: Owned,
    Query(q): Query<PageQuery>,
) -> Result<Response, ApiError> {
    Ok(reply(
        StatusCode::OK,
        &json!({"items": s.broker.blocked_keys(id, q.limit)?}),
    ))
}
