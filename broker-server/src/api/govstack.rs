//! The GovStack Information Mediator Pub/Sub API v2.0.0, served as its yaml writes it, over the
//! same core as the native API. Every path starts `/r1/{instanceId}/{memberClass}/{memberCode}/
//! {applicationCode}`; `applicationCode` names the Room and the `X-GovStack-Client` header names
//! the caller. The yaml's status codes are kept exactly (200 for a created event type or
//! subscription, 201 for a changed subscription, 204 where it says "not defined"), which is why
//! these handlers answer errors through [`ApiError::govstack_status`] rather than the native
//! mapping.
//!
//! Where the yaml is silent, Postroom decides, and README documents it: the Room is created on
//! the first event type registered in it; a push subscription names its URL in the extension
//! field `pushUrl`; a pull hands the next event out under a lease (`delivery.lease_ms_default`)
//! and offers it again if it is not confirmed in time.

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use broker_core::{
    DeliveryMode, DeliveryState, Event, EventId, EventTypeName, EventTypeSpec, NewRoom,
    NewSubscription, Principal, PublishRequest, PushEndpoint, RetryOverrides, Role, RoomName,
    Subscription, SubscriptionPatch,
};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{parse, require_json, AppState, RawBody};
use crate::error::ApiError;

mod subs;

/// The header that names the calling member application.
pub const CLIENT_HEADER: &str = "x-govstack-client";

/// The GovStack routes.
pub(super) fn routes() -> Router<AppState> {
    const BASE: &str = "/r1/{instanceId}/{memberClass}/{memberCode}/{applicationCode}";
    Router::new()
        .route(
            &format!("{BASE}/api/v1/eventType"),
            post(create_type).get(list_types),
        )
        .route(
            &format!("{BASE}/api/v1/eventType/{{eventType}}"),
            get(read_type).delete(delete_type),
        )
        .route(&format!("{BASE}/pub/v1/{{eventType}}"), post(publish))
        .route(
            &format!("{BASE}/pub/v1/{{eventType}}/{{eventId}}"),
            get(status).delete(stop),
        )
        .route(&format!("{BASE}/api/v1/subs"), get(subs::list_subs))
        .route(
            &format!("{BASE}/api/v1/subs/{{eventType}}"),
            post(subs::add_sub)
                .get(subs::read_sub)
                .patch(subs::patch_sub)
                .delete(subs::delete_sub),
        )
        .route(&format!("{BASE}/pull/v1/{{eventType}}"), get(subs::pull))
        .route(
            &format!("{BASE}/pull/v1/{{eventType}}/{{eventId}}"),
            axum::routing::delete(subs::confirm),
        )
}

/// An error answered with the GovStack status mapping.
pub struct GovError(ApiError);

impl<E: Into<ApiError>> From<E> for GovError {
    fn from(e: E) -> Self {
        GovError(e.into())
    }
}

impl IntoResponse for GovError {
    fn into_response(self) -> Response {
        let status = self.0.govstack_status();
        self.0.into_response_with(status)
    }
}

type GovResult = Result<Response, GovError>;

/// The calling member application, from `X-GovStack-Client: INSTANCE/CLASS/MEMBER/APPLICATION`
/// (each part percent-encoded). The raw header is the caller's principal; the decoded parts are
/// shown back as `subscriberId` / `publisherId`.
pub struct Caller {
    principal: Principal,
    rights: broker_core::Rights,
}

impl Caller {
    fn require(&self, allowed: bool, what: &str) -> Result<(), ApiError> {
        if allowed {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "`{}` may not {what}",
                self.principal
            )))
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = GovError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let raw = parts
            .headers
            .get(CLIENT_HEADER)
            .ok_or_else(|| {
                ApiError::BadClient(
                    "the X-GovStack-Client header (INSTANCE/CLASS/MEMBER/APPLICATION) is required"
                        .into(),
                )
            })?
            .to_str()
            .map_err(|_| ApiError::BadClient("X-GovStack-Client must be visible ASCII".into()))?
            .trim();
        if member_parts(raw).is_none() {
            return Err(ApiError::BadClient(format!(
                "X-GovStack-Client `{raw}` is not INSTANCE/CLASS/MEMBER/APPLICATION with four \
                 non-empty, percent-encoded parts"
            ))
            .into());
        }
        let principal = Principal::new(raw)
            .map_err(|e| ApiError::BadClient(format!("X-GovStack-Client: {e}")))?;
        let identity = crate::auth::Identity::from_request_parts(parts, state).await?;
        // The header must name the authenticated application. Only with authentication off
        // (every caller the local administrator) does the header alone say who calls.
        if identity.principal.as_str() != crate::LOCAL_ADMIN && identity.principal != principal {
            return Err(ApiError::Forbidden(format!(
                "X-GovStack-Client `{principal}` does not match the token's application `{}`",
                identity.principal
            ))
            .into());
        }
        Ok(Caller {
            principal,
            rights: identity.rights,
        })
    }
}

/// The four decoded parts of a member application identifier, or `None` if it is not one.
fn member_parts(raw: &str) -> Option<[String; 4]> {
    let parts: Vec<&str> = raw.split('/').collect();
    if parts.len() != 4 || parts.iter().any(|p| p.is_empty()) {
        return None;
    }
    let decoded: Vec<String> = parts
        .iter()
        .map(|p| percent_decode(p))
        .collect::<Option<_>>()?;
    decoded.try_into().ok()
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `{instanceId, memberClass, memberCode, applicationCode}` for a principal that is a member
/// application, or `null` for anyone else (such as the local administrator).
fn member_id(p: &Principal) -> Value {
    match member_parts(p.as_str()) {
        Some([i, c, m, a]) => json!({
            "instanceId": i, "memberClass": c, "memberCode": m, "applicationCode": a,
        }),
        None => Value::Null,
    }
}

#[derive(Deserialize)]
struct RoomPath {
    #[serde(rename = "applicationCode")]
    app: String,
}

#[derive(Deserialize)]
struct TypePath {
    #[serde(rename = "applicationCode")]
    app: String,
    #[serde(rename = "eventType")]
    event_type: String,
}

#[derive(Deserialize)]
struct EventPath {
    #[serde(rename = "applicationCode")]
    app: String,
    #[serde(rename = "eventType")]
    event_type: String,
    #[serde(rename = "eventId")]
    event_id: String,
}

fn room_name(app: &str) -> Result<RoomName, ApiError> {
    parse("applicationCode", app, RoomName::new)
}

fn type_name(t: &str) -> Result<EventTypeName, ApiError> {
    parse("eventType", t, EventTypeName::new)
}

/// A JSON body (required, `application/json`), parsed as `T`.
fn body<T: serde::de::DeserializeOwned>(headers: &HeaderMap, raw: &[u8]) -> Result<T, ApiError> {
    require_json(headers)?;
    serde_json::from_slice(raw).map_err(|e| ApiError::BadJson(format!("invalid request body: {e}")))
}

fn json_reply(status: StatusCode, v: Value) -> Response {
    (status, axum::Json(v)).into_response()
}

// ----- Event types (admin) -----

#[derive(Deserialize)]
struct EventTypeBody {
    #[serde(rename = "eventType")]
    event_type: String,
    schema: Value,
    /// Extension: a JSON Pointer to the payload field that is the ordering key.
    #[serde(rename = "keyPointer", default)]
    key_pointer: Option<String>,
    /// Extension: a description.
    #[serde(default)]
    description: String,
}

async fn create_type(
    State(s): State<AppState>,
    caller: Caller,
    Path(p): Path<RoomPath>,
    headers: HeaderMap,
    RawBody(raw): RawBody,
) -> GovResult {
    let room = room_name(&p.app)?;
    let b: EventTypeBody = body(&headers, &raw)?;
    let name = type_name(&b.event_type)?;
    if !b.schema.is_object() {
        return Err(ApiError::param("schema", "must be a JSON Schema object").into());
    }
    // The yaml has no Room creation: the Room appears with its first event type.
    // An administrator's Room is active at once; a member's waits for approval, and the member
    // manages it.
    if let Err(broker_core::Error::RoomNotFound { .. }) = s.broker.room(&room) {
        let admin = caller.rights.is_admin();
        let mut new = NewRoom::new(room.clone(), caller.principal.clone());
        new.description = "created through the GovStack API".into();
        new.approved = admin;
        match s.broker.create_room(new).await {
            Ok(_) if !admin => {
                s.broker
                    .grant(
                        &caller.principal,
                        Role::RoomManager,
                        Some(room.clone()),
                        None,
                    )
                    .await?;
                return create_type_in(&s, &room, name, b).await;
            }
            Ok(_) | Err(broker_core::Error::RoomExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    caller.require(
        caller.rights.manages(&room),
        "register event types in this Room",
    )?;
    create_type_in(&s, &room, name, b).await
}

async fn create_type_in(
    s: &AppState,
    room: &RoomName,
    name: EventTypeName,
    b: EventTypeBody,
) -> GovResult {
    let spec = EventTypeSpec {
        name,
        description: b.description,
        schema: b.schema,
        key_pointer: b.key_pointer,
    };
    let out = s.broker.create_event_type(room, spec).await?;
    Ok(json_reply(StatusCode::OK, type_item(&out.event_type)))
}

fn type_item(t: &broker_core::EventType) -> Value {
    json!({
        "eventType": t.name, "schema": t.schema, "keyPointer": t.key_pointer,
        "description": t.description, "version": t.version,
    })
}

async fn list_types(
    State(s): State<AppState>,
    caller: Caller,
    Path(p): Path<RoomPath>,
) -> GovResult {
    let room = room_name(&p.app)?;
    caller.require(caller.rights.any_on(&room), "read this Room")?;
    let types = match s.broker.event_types(&room) {
        Ok(t) => t,
        Err(broker_core::Error::RoomNotFound { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    if types.is_empty() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let names: Vec<&str> = types.iter().map(|t| t.name.as_str()).collect();
    Ok(json_reply(StatusCode::OK, json!(names)))
}

async fn read_type(
    State(s): State<AppState>,
    caller: Caller,
    Path(p): Path<TypePath>,
) -> GovResult {
    let room = room_name(&p.app)?;
    caller.require(caller.rights.any_on(&room), "read this Room")?;
    match s.broker.event_type(&room, &type_name(&p.event_type)?) {
        Ok(t) => Ok(json_reply(StatusCode::OK, type_item(&t))),
        // The yaml answers an undefined event type with 204.
        Err(
            broker_core::Error::RoomNotFound { .. } | broker_core::Error::EventTypeNotFound { .. },
        ) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(e) => Err(e.into()),
    }
}

async fn delete_type(
    State(s): State<AppState>,
    caller: Caller,
    Path(p): Path<TypePath>,
) -> GovResult {
    let room = room_name(&p.app)?;
    caller.require(
        caller.rights.manages(&room),
        "delete event types of this Room",
    )?;
    s.broker
        .delete_event_type(&room, &type_name(&p.event_type)?)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ----- Publishing -----

#[derive(Deserialize)]
struct PublishBody {
    #[serde(rename = "eventType")]
    event_type: String,
    event: Value,
    /// Extension: the publisher's own event id (a UUID); generated when absent.
    #[serde(default)]
    id: Option<String>,
}

async fn publish(
    State(s): State<AppState>,
    caller: Caller,
    Path(p): Path<TypePath>,
    headers: HeaderMap,
    RawBody(raw): RawBody,
) -> GovResult {
    let room = room_name(&p.app)?;
    let ty = type_name(&p.event_type)?;
    caller.require(
        caller.rights.can_publish(&room, &ty),
        "publish this event type",
    )?;
    let b: PublishBody = body(&headers, &raw)?;
    if b.event_type != p.event_type {
        return Err(ApiError::param(
            "eventType",
            format!(
                "the body says `{}` but the path says `{}`",
                b.event_type, p.event_type
            ),
        )
        .into());
    }
    if !b.event.is_object() {
        return Err(ApiError::param("event", "must be a JSON object").into());
    }
    let payload =
        serde_json::to_vec(&b.event).map_err(|e| ApiError::BadJson(format!("event: {e}")))?;
    let keys_allowed = caller.rights.publish_keys(&room, &ty);
    let mut req = PublishRequest::new(room, ty, caller.principal, payload);
    req.keys_allowed = keys_allowed;
    req.event_id =
        b.id.as_deref()
            .map(|id| parse("id", id, EventId::parse))
            .transpose()?;
    req.idempotency_key = super::events::header(&headers, "idempotency-key")?.map(String::from);
    req.ordering_key = super::events::header(&headers, "postroom-ordering-key")?.map(String::from);
    let r = s.broker.publish(req).await?;
    let mut resp = json_reply(
        StatusCode::CREATED,
        json!({"id": r.id, "sequence": r.sequence, "key": r.key}),
    );
    if r.duplicate {
        resp.headers_mut().insert(
            "postroom-duplicate",
            axum::http::HeaderValue::from_static("true"),
        );
    }
    Ok(resp)
}

/// The event of this Room and type that `caller` may see (its publisher or a manager of the
/// Room), or 404: another's event is answered as no event at all, with the same text, so that
/// the answer does not tell whether the id exists.
fn event_in(s: &AppState, p: &EventPath, caller: &Caller) -> Result<Event, ApiError> {
    let not_found = || {
        ApiError::Core(broker_core::Error::EventNotFound {
            id: p.event_id.clone(),
        })
    };
    let id = EventId::parse(&p.event_id).map_err(|_| not_found())?;
    match s.broker.event(id) {
        Ok(e)
            if e.room.as_str() == p.app
                && e.event_type.as_str() == p.event_type
                && caller.rights.may_follow_event(&caller.principal, &e) =>
        {
            Ok(e)
        }
        Ok(_) | Err(broker_core::Error::EventNotFound { .. }) => Err(not_found()),
        Err(e) => Err(e.into()),
    }
}

fn event_item(e: &Event) -> Value {
    json!({
        "id": e.id, "sequence": e.sequence, "publisherId": member_id(&e.publisher),
        "eventType": e.event_type, "event": e.payload_json().unwrap_or(Value::Null),
        "key": e.key, "receivedAt": e.received_at.to_rfc3339(),
    })
}

async fn status(State(s): State<AppState>, caller: Caller, Path(p): Path<EventPath>) -> GovResult {
    let event = event_in(&s, &p, &caller)?;
    let deliveries = s.broker.event_deliveries(event.id)?;
    let mut counts = Map::new();
    for state in ["pending", "in_flight", "delivered", "dead_lettered"] {
        counts.insert(state.into(), json!(0));
    }
    let rows: Vec<Value> = deliveries
        .iter()
        .map(|d| {
            let state = match d.state {
                DeliveryState::Pending => "pending",
                DeliveryState::InFlight => "in_flight",
                DeliveryState::Delivered => "delivered",
                DeliveryState::DeadLettered => "dead_lettered",
            };
            if let Some(n) = counts.get_mut(state) {
                *n = json!(n.as_u64().unwrap_or(0) + 1);
            }
            json!({"subscription": d.subscription, "state": state, "attempts": d.attempts})
        })
        .collect();
    counts.insert("subscriptions".into(), json!(deliveries.len()));
    let mut item = event_item(&event);
    item["status"] = Value::Object(counts);
    item["deliveries"] = json!(rows);
    Ok(json_reply(StatusCode::OK, item))
}

async fn stop(State(s): State<AppState>, caller: Caller, Path(p): Path<EventPath>) -> GovResult {
    let event = event_in(&s, &p, &caller)?;
    s.broker.stop_event(event.id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
