//! Publishing and reading events.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use broker_core::{
    EventFilter, EventId, EventTypeName, OrderingKey, Principal, PublishRequest, RoomName,
    Timestamp,
};
use serde::Deserialize;
use serde_json::json;

use super::{parse, reply, require_json, AppState, RawBody};
use crate::error::ApiError;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/rooms/{room}/events/{type}", post(publish))
        .route("/rooms/{room}/events", get(list))
        .route("/events/{id}", get(read))
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

async fn publish(
    State(s): State<AppState>,
    Path((room, ty)): Path<(String, String)>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    require_json(&headers)?;
    let mut req = PublishRequest::new(
        parse("room", &room, RoomName::new)?,
        parse("type", &ty, EventTypeName::new)?,
        s.principal.clone(),
        body.to_vec(),
    );
    req.idempotency_key = header(&headers, "idempotency-key")?.map(String::from);
    req.event_id = header(&headers, "postroom-event-id")?
        .map(|v| parse("Postroom-Event-Id", v, EventId::parse))
        .transpose()?;
    req.ordering_key = header(&headers, "postroom-ordering-key")?.map(String::from);
    let r = s.broker.publish(req).await?;
    let mut resp = reply(
        StatusCode::CREATED,
        &json!({
            "id": r.id, "room": r.room, "event_type": r.event_type, "key": r.key,
            "sequence": r.sequence, "received_at": r.received_at, "schema_version": r.version,
        }),
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

async fn read(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = parse("id", &id, EventId::parse)?;
    let event = s.broker.event(id)?;
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

#[derive(Deserialize)]
struct ListQuery {
    #[serde(rename = "type")]
    event_type: Option<String>,
    key: Option<String>,
    publisher: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

fn time(name: &str, raw: &str) -> Result<Timestamp, ApiError> {
    Timestamp::parse_rfc3339(raw)
        .ok_or_else(|| ApiError::param(name, format!("`{raw}` is not an RFC 3339 time")))
}

async fn list(
    State(s): State<AppState>,
    Path(room): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
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
