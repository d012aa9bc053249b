//! Subscriptions: create, list, read, change, delete, pause, resume, approve, rotate the secret
//! and seek; pulling with leases, dead letters, the attempt log and blocked keys are in
//! `sub_queue.rs`. Every action on a subscription (`pause`, `pull`, `ack`, ...) has its own
//! handler, so that each has its own operation, request body and answer in the OpenAPI document.

use std::collections::BTreeMap;

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::http::{HeaderMap, Method};
use axum::response::Response;
use broker_core::{
    BasicAuth, DeliveryMode, EventTypeName, NewSubscription, PushEndpoint, RetryOverrides,
    RoomName, SeekTarget, SubscriptionId, SubscriptionPatch, Timestamp,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::sub_queue;

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
    pub(super) id: SubscriptionId,
    pub(super) sub: broker_core::Subscription,
    pub(super) who: Identity,
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
        .routes(routes!(sub_queue::pull))
        .routes(routes!(sub_queue::ack))
        .routes(routes!(sub_queue::nack))
        .routes(routes!(sub_queue::extend))
        .routes(routes!(sub_queue::term))
        .routes(routes!(sub_queue::dead_letters, sub_queue::purge))
        .routes(routes!(sub_queue::redrive))
        .routes(routes!(sub_queue::attempts))
        .routes(routes!(sub_queue::blocked_keys))
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
pub(super) struct ActionBody {
    // pull
    pub(super) max_messages: Option<usize>,
    pub(super) lease_ms: Option<u64>,
    pub(super) wait_ms: Option<u64>,
    // ack, nack, extend, term
    pub(super) ack_ids: Option<Vec<String>>,
    pub(super) delay_ms: Option<u64>,
    // seek: "oldest" or an RFC 3339 time
    pub(super) to: Option<String>,
}

/// The action body; an empty body means every field is absent.
pub(super) fn action_body(headers: &HeaderMap, body: &[u8]) -> Result<ActionBody, ApiError> {
    optional_json(headers, body)
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
