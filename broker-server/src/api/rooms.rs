//! Rooms and event types.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post, put};
use axum::Router;
use broker_core::{
    EventTypeName, EventTypeSpec, NewRoom, Retention, RetryOverrides, RoomName, RoomPatch,
};
use serde::Deserialize;

use super::{parse, reply, ApiJson, AppState};
use crate::error::ApiError;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/rooms", post(create).get(list))
        .route("/rooms/{room}", get(read).patch(update).delete(remove))
        .route("/rooms/{room}/approve", post(approve))
        .route("/rooms/{room}/event-types", get(list_types))
        .route(
            "/rooms/{room}/event-types/{type}",
            put(put_type).get(read_type),
        )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRoom {
    name: String,
    #[serde(default)]
    description: String,
    ordered: Option<bool>,
    #[serde(default)]
    retention: Retention,
    #[serde(default)]
    retry: RetryOverrides,
}

fn room_name(raw: &str) -> Result<RoomName, ApiError> {
    parse("room", raw, RoomName::new)
}

async fn create(
    State(s): State<AppState>,
    ApiJson(body): ApiJson<CreateRoom>,
) -> Result<Response, ApiError> {
    let mut new = NewRoom::new(room_name(&body.name)?, s.principal.clone());
    new.description = body.description;
    new.ordered = body.ordered.unwrap_or(true);
    new.retention = body.retention;
    new.retry = body.retry;
    // The local administrator's Rooms need no approval.
    new.approved = true;
    Ok(reply(
        StatusCode::CREATED,
        &s.broker.create_room(new).await?,
    ))
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn list(
    State(s): State<AppState>,
    q: axum::extract::Query<ListQuery>,
) -> Result<Response, ApiError> {
    let after = q.cursor.as_deref().map(room_name).transpose()?;
    Ok(reply(
        StatusCode::OK,
        &s.broker.rooms(after.as_ref(), q.limit)?,
    ))
}

async fn read(State(s): State<AppState>, Path(room): Path<String>) -> Result<Response, ApiError> {
    Ok(reply(StatusCode::OK, &s.broker.room(&room_name(&room)?)?))
}

async fn update(
    State(s): State<AppState>,
    Path(room): Path<String>,
    ApiJson(patch): ApiJson<RoomPatch>,
) -> Result<Response, ApiError> {
    Ok(reply(
        StatusCode::OK,
        &s.broker.update_room(&room_name(&room)?, patch).await?,
    ))
}

async fn remove(
    State(s): State<AppState>,
    Path(room): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.broker.delete_room(&room_name(&room)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn approve(
    State(s): State<AppState>,
    Path(room): Path<String>,
) -> Result<Response, ApiError> {
    Ok(reply(
        StatusCode::OK,
        &s.broker.approve_room(&room_name(&room)?).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutType {
    schema: serde_json::Value,
    key_pointer: Option<String>,
    #[serde(default)]
    description: String,
}

async fn put_type(
    State(s): State<AppState>,
    Path((room, ty)): Path<(String, String)>,
    ApiJson(body): ApiJson<PutType>,
) -> Result<Response, ApiError> {
    let spec = EventTypeSpec {
        name: parse("type", &ty, EventTypeName::new)?,
        description: body.description,
        schema: body.schema,
        key_pointer: body.key_pointer,
    };
    let out = s.broker.put_event_type(&room_name(&room)?, spec).await?;
    let status = if out.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(reply(status, &out))
}

async fn read_type(
    State(s): State<AppState>,
    Path((room, ty)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let ty = parse("type", &ty, EventTypeName::new)?;
    Ok(reply(
        StatusCode::OK,
        &s.broker.event_type(&room_name(&room)?, &ty)?,
    ))
}

async fn list_types(
    State(s): State<AppState>,
    Path(room): Path<String>,
) -> Result<Response, ApiError> {
    Ok(reply(
        StatusCode::OK,
        &serde_json::json!({"items": s.broker.event_types(&room_name(&room)?)?}),
    ))
}
