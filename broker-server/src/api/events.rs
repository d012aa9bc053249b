//! Publishing and reading events: the publish endpoint, one event with its deliveries, and a
//! Room's event log with filters.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use broker_core::{
    EventFilter, EventId, EventTypeName, OrderingKey, Principal, PublishRequest, RoomName,
    Timestamp,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::schemas::{
    BadRequest, Conflict, CoreObject, NotFound, Overloaded, TooLarge, Unavailable, Unprocessable,
    UnsupportedMediaType,
};
use super::{parse, reply, require_json, AppState, RawBody};
use crate::auth::Identity;
use crate::error::ApiError;

/// The routes, relative to `/v1`.
pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(publish))
        .routes(routes!(list))
        .routes(routes!(read))
}

/// What a publish answers: where the event now is.
#[derive(Serialize, ToSchema)]
pub(super) struct PublishReceipt {
    /// The event id.
    #[schema(value_type = String, format = Uuid)]
    id: EventId,
    /// The Room.
    #[schema(value_type = String)]
    room: RoomName,
    /// The event type.
    #[schema(value_type = String)]
    event_type: EventTypeName,
    /// The ordering key.
    #[schema(value_type = String)]
    key: OrderingKey,
    /// The position in the key's sequence, from 1.
    #[schema(value_type = u64)]
    sequence: broker_core::Sequence,
    /// When the broker accepted the event (RFC 3339, UTC).
    #[schema(value_type = String, format = DateTime)]
    received_at: Timestamp,
    /// The schema version that validated the payload.
    schema_version: u32,
}

pub(super) fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::param(name, "must be visible ASCII"))
        })
        .transpose()
}

/// Publishes one event. The body is the payload, validated against the event type's current
/// schema; `GET /v1/rooms/{room}/openapi.json` describes each type's payload exactly.
#[utoipa::path(
    post,
    path = "/rooms/{room}/events/{type}",
    operation_id = "publish",
    tag = "events",
    params(
        ("room" = String, Path, description = "The Room's name."),
        ("type" = String, Path, description = "The event type's name."),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes a retried publish safe: the same key returns the first receipt."),
        ("Postroom-Event-Id" = Option<String>, Header, format = Uuid, description = "The event's id when the publisher assigns it. Sending it again with the same payload bytes answers the first receipt; any other use of a known id is 409 `event_id_conflict`."),
        ("Postroom-Ordering-Key" = Option<String>, Header, description = "The ordering key; when the event type also has a key pointer, the two must agree."),
    ),
    request_body(content = Object, content_type = "application/json", description = "The event's payload: a JSON value satisfying the event type's schema."),
    responses(
        (status = 201, description = "Accepted and stored. A repeat (same Idempotency-Key, or the same publisher sending the same event id with the same payload bytes) answers the first receipt with `Postroom-Duplicate: true`; an event id already used otherwise is 409 `event_id_conflict`.",
            body = PublishReceipt,
            headers(("Postroom-Duplicate" = String, description = "`true` when this is the receipt of an earlier publish."))),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 413, response = TooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
        (status = 429, response = Overloaded),
        (status = 503, response = Unavailable),
    )
)]
async fn publish(
    State(s): State<AppState>,
    who: Identity,
    Path((room, ty)): Path<(String, String)>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    require_json(&headers)?;
    let room = parse("room", &room, RoomName::new)?;
    let ty = parse("type", &ty, EventTypeName::new)?;
    who.require(
        who.rights.can_publish(&room, &ty),
        "publish this event type",
    )?;
    let keys_allowed = who.rights.publish_keys(&room, &ty);
    let mut req = PublishRequest::new(room, ty, who.principal.clone(), body.to_vec());
    req.keys_allowed = keys_allowed;
    req.idempotency_key = header(&headers, "idempotency-key")?.map(String::from);
    req.event_id = header(&headers, "postroom-event-id")?
        .map(|v| parse("Postroom-Event-Id", v, EventId::parse))
        .transpose()?;
    req.ordering_key = header(&headers, "postroom-ordering-key")?.map(String::from);
    let r = s.broker.publish(req).await?;
    let mut resp = reply(
        StatusCode::CREATED,
        &PublishReceipt {
            id: r.id,
            room: r.room,
            event_type: r.event_type,
            key: r.key,
            sequence: r.sequence,
            received_at: r.received_at,
            schema_version: r.version,
        },
    );
    if r.duplicate {
        // The same answer as the first time, marked so that a curious client can tell.
        resp.headers_mut().insert(
            "postroom-duplicate",
            axum::http::HeaderValue::from_static("true"),
        );
    }
    Ok(resp)
}

/// Reads one event: its metadata, payload, state for each subscription and a summary. Its
/// publisher, the Room's managers and administrators may read it; for anyone else it is 404,
/// as an id that does not exist, so that the answer does not tell whether it does.
#[utoipa::path(
    get,
    path = "/events/{id}",
    operation_id = "getEvent",
    tag = "events",
    params(("id" = String, Path, format = Uuid, description = "The event id.")),
    responses(
        (status = 200, description = "`{event, payload, payload_bytes, deliveries, summary}`.", body = CoreObject),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn read(
    State(s): State<AppState>,
    who: Identity,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse("id", &id, EventId::parse)?;
    // Someone else's event is answered as no event at all: a 403 would tell that the id
    // exists, and event ids are chosen by publishers.
    let event = match s.broker.event(id) {
        Ok(e) if who.rights.may_follow_event(&who.principal, &e) => e,
        Ok(_) | Err(broker_core::Error::EventNotFound { .. }) => {
            return Err(broker_core::Error::EventNotFound { id: id.to_string() }.into())
        }
        Err(e) => return Err(e.into()),
    };
    let payload: serde_json::Value = event.payload_json().unwrap_or(serde_json::Value::Null);
    let deliveries = s.broker.event_deliveries(id)?;
    let delivered = deliveries
        .iter()
        .filter(|d| d.state == broker_core::DeliveryState::Delivered)
        .count();
    Ok(reply(
        StatusCode::OK,
        &json!({
            "event": event, "payload": payload, "payload_bytes": event.payload_bytes(),
            "deliveries": deliveries,
            "summary": format!("delivered to {delivered} of {} subscriptions", deliveries.len()),
        }),
    ))
}

/// Filters and paging for a Room's event log.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Only events of this type.
    #[serde(rename = "type")]
    event_type: Option<String>,
    /// Only events with this ordering key.
    key: Option<String>,
    /// Only events from this publisher.
    publisher: Option<String>,
    /// Only events received at or after this time (RFC 3339).
    since: Option<String>,
    /// Only events received before this time (RFC 3339).
    until: Option<String>,
    /// Most events in one page.
    limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

pub(super) fn time(name: &str, raw: &str) -> Result<Timestamp, ApiError> {
    Timestamp::parse_rfc3339(raw)
        .ok_or_else(|| ApiError::param(name, format!("`{raw}` is not an RFC 3339 time")))
}

/// Lists a Room's events, oldest first, with optional filters.
#[utoipa::path(
    get,
    path = "/rooms/{room}/events",
    operation_id = "listEvents",
    tag = "events",
    params(("room" = String, Path, description = "The Room's name."), ListQuery),
    responses(
        (status = 200, description = "`{items: [{event, payload}], next_cursor}`.", body = CoreObject),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn list(
    State(s): State<AppState>,
    who: Identity,
    Path(room): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    who.require(
        who.rights.manages(&parse("room", &room, RoomName::new)?),
        "read this Room's event log",
    )?;
    let key_max = s.broker.config().limits.key_bytes_max;
    let filter = EventFilter {
        event_type: q
            .event_type
            .as_deref()
            .map(|t| parse("type", t, EventTypeName::new))
            .transpose()?,
        key: q
            .key
            .as_deref()
            .map(|k| parse("key", k, |k| OrderingKey::new(k, key_max)))
            .transpose()?,
        publisher: q
            .publisher
            .as_deref()
            .map(|p| parse("publisher", p, Principal::new))
            .transpose()?,
        since: q.since.as_deref().map(|t| time("since", t)).transpose()?,
        until: q.until.as_deref().map(|t| time("until", t)).transpose()?,
        limit: q.limit,
        cursor: q.cursor,
    };
    let page = s
        .broker
        .events(&parse("room", &room, RoomName::new)?, filter)
        .await?;
    let items: Vec<_> = page
        .items
        .iter()
        .map(
            |e| json!({"event": e, "payload": e.payload_json().unwrap_or(serde_json::Value::Null)}),
        )
        .collect();
    Ok(reply(
        StatusCode::OK,
        &json!({"items": items, "next_cursor": page.next_cursor}),
    )
    .into_response())
}
