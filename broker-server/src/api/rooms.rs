//! Rooms and event types: creating, reading, changing, approving and deleting Rooms, and
//! registering the event types (with their JSON Schemas) that a Room accepts.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use broker_core::{
    EventTypeName, EventTypeSpec, NewRoom, Retention, RetryOverrides, Role, RoomName, RoomPatch,
};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::schemas::{
    BadRequest, Conflict, CoreObject, NotFound, RetentionSchema, RetryOverridesSchema,
    RoomPatchSchema, Unprocessable, UnsupportedMediaType,
};
use super::{parse, reply, ApiJson, AppState};
use crate::auth::Identity;
use crate::error::ApiError;

/// The routes, relative to `/v1`. Handlers that share a path are registered together so that
/// the axum route and the document's path item are the same thing.
pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(read, update, remove))
        .routes(routes!(approve))
        .routes(routes!(list_types))
        .routes(routes!(put_type, read_type))
}

/// A new Room.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateRoom {
    /// The Room's name, unique on the broker.
    #[schema(pattern = "^[a-z][a-z0-9_.-]{0,63}$")]
    name: String,
    /// Free text for people.
    #[serde(default)]
    description: String,
    /// Whether subscriptions get per-key FIFO delivery unless they say otherwise (default true).
    ordered: Option<bool>,
    /// How long events are kept (default: no bound).
    #[serde(default)]
    #[schema(value_type = RetentionSchema)]
    retention: Retention,
    /// Retry defaults for the Room's subscriptions.
    #[serde(default)]
    #[schema(value_type = RetryOverridesSchema)]
    retry: RetryOverrides,
    /// When true, subscriptions by anyone but the Room's managers start `pending` until a
    /// manager approves them (default false: a subscriber right is approval enough).
    #[serde(default)]
    subscription_approval: bool,
}

fn room_name(raw: &str) -> Result<RoomName, ApiError> {
    parse("room", raw, RoomName::new)
}

/// Creates a Room. The local administrator's Rooms are active at once.
#[utoipa::path(
    post,
    path = "/rooms",
    operation_id = "createRoom",
    tag = "rooms",
    request_body = CreateRoom,
    responses(
        (status = 201, description = "The new Room.", body = CoreObject),
        (status = 400, response = BadRequest),
        (status = 409, response = Conflict),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
    )
)]
async fn create(
    State(s): State<AppState>,
    id: Identity,
    ApiJson(body): ApiJson<CreateRoom>,
) -> Result<Response, ApiError> {
    let mut new = NewRoom::new(room_name(&body.name)?, id.principal.clone());
    new.description = body.description;
    new.ordered = body.ordered.unwrap_or(true);
    new.retention = body.retention;
    new.retry = body.retry;
    new.subscription_approval = body.subscription_approval;
    // An administrator's Rooms need no approval; a member's wait for one.
    new.approved = id.rights.is_admin();
    let room = s.broker.create_room(new).await?;
    if !id.rights.is_admin() {
        // Whoever asks for a Room manages it.
        s.broker
            .grant(
                &id.principal,
                Role::RoomManager,
                Some(room.name.clone()),
                None,
            )
            .await?;
    }
    Ok(reply(StatusCode::CREATED, &room))
}

/// Paging through a listing.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Most items in one page.
    limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// Lists the Rooms by name, one page at a time.
#[utoipa::path(
    get,
    path = "/rooms",
    operation_id = "listRooms",
    tag = "rooms",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of Rooms: `{items, next_cursor}`.", body = CoreObject),
        (status = 400, response = BadRequest),
    )
)]
async fn list(
    State(s): State<AppState>,
    id: Identity,
    q: axum::extract::Query<ListQuery>,
) -> Result<Response, ApiError> {
    let after = q.cursor.as_deref().map(room_name).transpose()?;
    let mut page = s.broker.rooms(after.as_ref(), q.limit)?;
    // Only the Rooms the caller has a right on (all of them for an administrator).
    page.items.retain(|r| id.rights.any_on(&r.name));
    Ok(reply(StatusCode::OK, &page))
}

/// Reads a Room.
#[utoipa::path(
    get,
    path = "/rooms/{room}",
    operation_id = "getRoom",
    tag = "rooms",
    params(("room" = String, Path, description = "The Room's name.")),
    responses(
        (status = 200, description = "The Room.", body = CoreObject),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn read(
    State(s): State<AppState>,
    id: Identity,
    Path(room): Path<String>,
) -> Result<Response, ApiError> {
    let room = room_name(&room)?;
    id.require(id.rights.any_on(&room), "read this Room")?;
    Ok(reply(StatusCode::OK, &s.broker.room(&room)?))
}

/// Changes a Room's description, status, ordering default, retention or retry defaults.
#[utoipa::path(
    patch,
    path = "/rooms/{room}",
    operation_id = "updateRoom",
    tag = "rooms",
    params(("room" = String, Path, description = "The Room's name.")),
    request_body = RoomPatchSchema,
    responses(
        (status = 200, description = "The Room after the change.", body = CoreObject),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
    )
)]
async fn update(
    State(s): State<AppState>,
    id: Identity,
    Path(room): Path<String>,
    ApiJson(patch): ApiJson<RoomPatch>,
) -> Result<Response, ApiError> {
    id.require(id.rights.manages(&room_name(&room)?), "change this Room")?;
    Ok(reply(
        StatusCode::OK,
        &s.broker.update_room(&room_name(&room)?, patch).await?,
    ))
}

/// Deletes a Room with its event types, events and subscriptions.
#[utoipa::path(
    delete,
    path = "/rooms/{room}",
    operation_id = "deleteRoom",
    tag = "rooms",
    params(("room" = String, Path, description = "The Room's name.")),
    responses(
        (status = 204, description = "The Room is gone."),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn remove(
    State(s): State<AppState>,
    id: Identity,
    Path(room): Path<String>,
) -> Result<StatusCode, ApiError> {
    id.require(id.rights.manages(&room_name(&room)?), "delete this Room")?;
    s.broker.delete_room(&room_name(&room)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Approves a pending Room, which opens it for publishing.
#[utoipa::path(
    post,
    path = "/rooms/{room}/approve",
    operation_id = "approveRoom",
    tag = "rooms",
    params(("room" = String, Path, description = "The Room's name.")),
    responses(
        (status = 200, description = "The Room after approval.", body = CoreObject),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
    )
)]
async fn approve(
    State(s): State<AppState>,
    id: Identity,
    Path(room): Path<String>,
) -> Result<Response, ApiError> {
    id.require(id.rights.is_admin(), "approve Rooms")?;
    Ok(reply(
        StatusCode::OK,
        &s.broker.approve_room(&room_name(&room)?).await?,
    ))
}

/// An event type's definition.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PutType {
    /// The JSON Schema that every payload of this type must satisfy.
    #[schema(value_type = Object)]
    schema: serde_json::Value,
    /// JSON Pointer into the payload to the ordering key, e.g. `/move_id`.
    key_pointer: Option<String>,
    /// Free text for people.
    #[serde(default)]
    description: String,
}

/// Registers an event type, or adds a schema version when the schema or key pointer changed.
#[utoipa::path(
    put,
    path = "/rooms/{room}/event-types/{type}",
    operation_id = "putEventType",
    tag = "event-types",
    params(
        ("room" = String, Path, description = "The Room's name."),
        ("type" = String, Path, description = "The event type's name, e.g. `MoveProposed`."),
    ),
    request_body = PutType,
    responses(
        (status = 201, description = "The type is new: `{event_type, created, new_version}`.", body = CoreObject),
        (status = 200, description = "The type existed: `{event_type, created, new_version}`.", body = CoreObject),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
    )
)]
async fn put_type(
    State(s): State<AppState>,
    id: Identity,
    Path((room, ty)): Path<(String, String)>,
    ApiJson(body): ApiJson<PutType>,
) -> Result<Response, ApiError> {
    id.require(
        id.rights.manages(&room_name(&room)?),
        "register event types here",
    )?;
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

/// Reads an event type with its current schema.
#[utoipa::path(
    get,
    path = "/rooms/{room}/event-types/{type}",
    operation_id = "getEventType",
    tag = "event-types",
    params(
        ("room" = String, Path, description = "The Room's name."),
        ("type" = String, Path, description = "The event type's name."),
    ),
    responses(
        (status = 200, description = "The event type.", body = CoreObject),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn read_type(
    State(s): State<AppState>,
    id: Identity,
    Path((room, ty)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    id.require(id.rights.any_on(&room_name(&room)?), "read this Room")?;
    let ty = parse("type", &ty, EventTypeName::new)?;
    Ok(reply(
        StatusCode::OK,
        &s.broker.event_type(&room_name(&room)?, &ty)?,
    ))
}

/// Lists a Room's event types.
#[utoipa::path(
    get,
    path = "/rooms/{room}/event-types",
    operation_id = "listEventTypes",
    tag = "event-types",
    params(("room" = String, Path, description = "The Room's name.")),
    responses(
        (status = 200, description = "`{items: [event type]}`.", body = CoreObject),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn list_types(
    State(s): State<AppState>,
    id: Identity,
    Path(room): Path<String>,
) -> Result<Response, ApiError> {
    id.require(id.rights.any_on(&room_name(&room)?), "read this Room")?;
    Ok(reply(
        StatusCode::OK,
        &serde_json::json!({"items": s.broker.event_types(&room_name(&room)?)?}),
    ))
}
