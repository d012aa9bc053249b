//! `GET /v1/rooms/{room}/openapi.json`: an OpenAPI 3.1 document for one Room, with one publish
//! operation per event type whose request body is that type's JSON Schema. A publisher can feed
//! it to a code generator or a validator and get typed payloads, which the generic document
//! (where a payload is "any object") cannot give.
//!
//! The document is built as JSON rather than with utoipa's builders: the event types' schemas
//! are JSON already, and OpenAPI 3.1 schemas are JSON Schema, so they are embedded as they are.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use broker_core::{EventType, Room, RoomName};
use serde_json::{json, Map, Value};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::events::PublishReceipt;
use super::schemas::{error_responses, BadRequest, CoreObject, NotFound};
use super::{parse, AppState};
use crate::error::{ApiError, Problem};

/// The route, relative to `/v1`.
pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(room_openapi))
}

/// An OpenAPI 3.1 document for publishing to this Room: one operation per event type, with the
/// type's current JSON Schema as the request body.
#[utoipa::path(
    get,
    path = "/rooms/{room}/openapi.json",
    operation_id = "getRoomOpenApi",
    tag = "event-types",
    params(("room" = String, Path, description = "The Room's name.")),
    responses(
        (status = 200, description = "The Room's OpenAPI 3.1 document.", body = CoreObject),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn room_openapi(
    State(s): State<AppState>,
    id: crate::auth::Identity,
    Path(room): Path<String>,
) -> Result<Response, ApiError> {
    let name = parse("room", &room, RoomName::new)?;
    id.require(id.rights.any_on(&name), "read this Room")?;
    let room = s.broker.room(&name)?;
    let types = s.broker.event_types(&name)?;
    // Built by hand rather than through `reply`: the embedded schemas are the publishers' own
    // and must come out exactly as registered, `*_at` names included.
    Ok((StatusCode::OK, axum::Json(document(&room, &types))).into_response())
}

/// The problem responses a publish can answer with, by status.
const PUBLISH_ERRORS: &[(&str, &str)] = &[
    ("400", "BadRequest"),
    ("404", "NotFound"),
    ("409", "Conflict"),
    ("413", "TooLarge"),
    ("415", "UnsupportedMediaType"),
    ("422", "Unprocessable"),
    ("429", "Overloaded"),
    ("503", "Unavailable"),
];

/// The Room's document.
pub(crate) fn document(room: &Room, types: &[EventType]) -> Value {
    let mut paths = Map::new();
    for ty in types {
        paths.insert(
            format!("/v1/rooms/{}/events/{}", room.name, ty.name),
            json!({ "post": publish_operation(ty) }),
        );
    }
    let description = if room.description.is_empty() {
        format!("Publishing to the Postroom Room `{}`.", room.name)
    } else {
        room.description.clone()
    };
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": format!("Postroom Room {}", room.name),
            "version": env!("CARGO_PKG_VERSION"),
            "description": description,
        },
        "paths": paths,
        "components": {
            "schemas": component_schemas(),
            "responses": error_responses()
                .into_iter()
                .map(|(name, r)| (name, serde_json::to_value(r).unwrap_or(Value::Null)))
                .collect::<Map<String, Value>>(),
        },
    })
}

/// `POST .../events/{type}` for one event type.
fn publish_operation(ty: &EventType) -> Value {
    let header = |name: &str, description: &str| {
        json!({
            "name": name, "in": "header", "required": false,
            "description": description, "schema": {"type": "string"},
        })
    };
    let mut responses = Map::new();
    responses.insert(
        "201".into(),
        json!({
            "description": "Accepted and stored. Repeating a publish with the same \
                            Idempotency-Key or Postroom-Event-Id returns the first receipt \
                            with `Postroom-Duplicate: true`.",
            "content": {"application/json": {
                "schema": {"$ref": format!("#/components/schemas/{}", PublishReceipt::name())}
            }},
        }),
    );
    for (status, response) in PUBLISH_ERRORS {
        responses.insert(
            (*status).into(),
            json!({"$ref": format!("#/components/responses/{response}")}),
        );
    }
    let summary = format!("Publish a {} event", ty.name);
    json!({
        "operationId": format!("publish{}", ty.name),
        "summary": summary,
        "description": if ty.description.is_empty() { summary.clone() } else { ty.description.clone() },
        "tags": ["events"],
        "parameters": [
            header("Idempotency-Key", "Makes a retried publish safe: the same key returns the first receipt."),
            header("Postroom-Event-Id", "The event's id (a UUID) when the publisher assigns it."),
            header("Postroom-Ordering-Key", "The ordering key; when the event type also has a key pointer, the two must agree."),
        ],
        "requestBody": {
            "required": true,
            "description": format!("A {} payload (schema version {}).", ty.name, ty.version),
            "content": {"application/json": {"schema": ty.schema}},
        },
        "responses": responses,
    })
}

/// The receipt and problem schemas, with everything they refer to.
fn component_schemas() -> Map<String, Value> {
    let mut all: Vec<(String, RefOr<Schema>)> = vec![
        (PublishReceipt::name().into(), PublishReceipt::schema()),
        (Problem::name().into(), Problem::schema()),
    ];
    PublishReceipt::schemas(&mut all);
    Problem::schemas(&mut all);
    all.into_iter()
        .map(|(name, schema)| (name, serde_json::to_value(schema).unwrap_or(Value::Null)))
        .collect()
}
