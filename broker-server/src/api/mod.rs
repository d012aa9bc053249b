//! The HTTP API: one router built by [`app`], so that tests drive it with
//! `tower::ServiceExt::oneshot` and the binary serves it. Every handler is a thin mapping from
//! HTTP to one core call; behaviour lives in broker-core.

mod admin;
mod docs;
mod events;
pub mod govstack;
pub mod irc;
mod ops;
mod room_openapi;
mod rooms;
pub(crate) mod schemas;
mod signing_keys;
mod sub_queue;
mod subscriptions;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use broker_core::Broker;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The broker.
    pub broker: Broker,
    /// The database file, for its size in `/metrics` and the free space beside it in
    /// `/v1/admin/system` (absent for a broker in memory: size 0).
    pub database_path: std::path::PathBuf,
    /// Whether the message log may show payloads (`observability.message_log_payloads`).
    pub message_log_payloads: bool,
    /// The authenticator, for the routes that manage its signing keys.
    pub auth: std::sync::Arc<crate::auth::Auth>,
}

/// The document's fixed parts: what the API is, its tags, and the components that handlers refer
/// to by name. The paths come from the handlers' `#[utoipa::path]` annotations through
/// [`native_routes`].
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Postroom",
        description = "A durable Pub/Sub broker: Rooms hold event types with JSON Schemas; \
                       publishers post events; subscriptions receive them by push or pull.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    tags(
        (name = "rooms", description = "Rooms: named homes for event types."),
        (name = "event-types", description = "Event types and their JSON Schemas."),
        (name = "events", description = "Publishing and reading events."),
        (name = "subscriptions", description = "Subscriptions, by push (webhooks) or pull."),
        (name = "pull", description = "Pulling events with leases, and settling them."),
        (name = "dead-letters", description = "Events a subscription gave up on."),
        (name = "health", description = "Whether the server is up."),
    ),
    components(schemas(crate::error::Problem, crate::error::ProblemLimit, schemas::ViolationSchema))
)]
struct ApiDoc;

/// The native API as one [`OpenApiRouter`]: the axum routes and the OpenAPI document are built
/// from the same `#[utoipa::path]` annotations, so neither can gain a path the other lacks.
fn native_routes() -> OpenApiRouter<AppState> {
    let mut doc = ApiDoc::openapi();
    // The version is the crate's, so that the document changes with every release.
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    let responses = &mut doc
        .components
        .get_or_insert_with(Default::default)
        .responses;
    responses.extend(schemas::error_responses());
    OpenApiRouter::with_openapi(doc)
        .routes(routes!(healthz))
        .nest(
            "/v1",
            rooms::routes()
                .merge(room_openapi::routes())
                .merge(events::routes())
                .merge(subscriptions::routes())
                .merge(admin::routes())
                .merge(signing_keys::routes())
                .merge(ops::routes()),
        )
}

/// The OpenAPI 3.1 document of the native API, as served at `/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = native_routes().into_openapi();
    secure(&mut doc);
    doc
}

/// Declares the bearer token scheme and, on every operation but the health check, the token
/// requirement and the 401 and 403 answers that every such operation can give.
fn secure(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::security::{
        HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
    };
    use utoipa::openapi::{Ref, RefOr};
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "An access token from `POST /oauth/token` (RFC 6749 client credentials).",
                    ))
                    .build(),
            ),
        );
    for (path, item) in doc.paths.paths.iter_mut() {
        if path == "/healthz" {
            continue;
        }
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            op.security = Some(vec![SecurityRequirement::new(
                "bearer",
                Vec::<String>::new(),
            )]);
            for (code, name) in [("401", "Unauthorized"), ("403", "Forbidden")] {
                op.responses
                    .responses
                    .entry(code.to_string())
                    .or_insert_with(|| RefOr::Ref(Ref::from_response_name(name)));
            }
        }
    }
}

/// The whole router: the native API, its document and the `/docs` page.
pub fn app(state: AppState) -> Router {
    let (native, mut doc) = native_routes().split_for_parts();
    secure(&mut doc);
    native
        .merge(docs::routes(&doc))
        .merge(govstack::routes())
        .merge(irc::routes())
        // Operators' endpoints, outside the OpenAPI document like `/docs`: they are for
        // monitoring systems, not API clients.
        .route("/readyz", axum::routing::get(crate::observe::readyz))
        .route("/metrics", axum::routing::get(crate::observe::metrics_page))
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state)
}

/// Answers `ok` while the server runs.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "health",
    tag = "health",
    responses((status = 200, description = "The server is up.", body = String, content_type = "text/plain"))
)]
async fn healthz() -> &'static str {
    "ok"
}

/// `axum::Json` whose rejections are [`ApiError`]s, so that a malformed body gets the same
/// problem+json as any other error.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::UnsupportedMediaType),
            Err(JsonRejection::BytesRejection(r))
                if r.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Err(ApiError::TooLarge)
            }
            Err(e) => Err(ApiError::BadJson(e.body_text())),
        }
    }
}

/// The raw body bytes, with a too-large body as [`ApiError::TooLarge`].
pub struct RawBody(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => Ok(RawBody(b)),
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::TooLarge),
            Err(e) => Err(ApiError::BadJson(e.body_text())),
        }
    }
}

/// A body that may be empty (then `T::default()`); when present it must be JSON.
pub(crate) fn optional_json<T: Default + DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    require_json(headers)?;
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadJson(format!("invalid request body: {e}")))
}

/// Checks that a raw body is declared as JSON (`application/json`, parameters allowed).
pub(crate) fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let ok = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if ok {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

/// A JSON answer in the API's conventions: every `*_at` / `*_until` field, which the core keeps
/// as milliseconds, is written as RFC 3339 in UTC.
pub(crate) fn reply<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_value(value) {
        Ok(mut v) => {
            rfc3339_times(&mut v);
            (status, axum::Json(v)).into_response()
        }
        Err(e) => ApiError::Core(broker_core::Error::Storage(format!(
            "cannot encode the answer: {e}"
        )))
        .into_response(),
    }
}

fn rfc3339_times(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                let is_time = k.ends_with("_at") || k.ends_with("_until");
                match val {
                    Value::Number(n) if is_time => {
                        if let Some(ms) = n.as_u64() {
                            *val = Value::String(broker_core::Timestamp(ms).to_rfc3339());
                        }
                    }
                    _ => rfc3339_times(val),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(rfc3339_times),
        _ => {}
    }
}

/// Parses a path or query value with the core's validating constructor, as a 400 on failure.
pub(crate) fn parse<'a, T>(
    name: &str,
    raw: &'a str,
    f: impl FnOnce(&'a str) -> broker_core::Result<T>,
) -> Result<T, ApiError> {
    f(raw).map_err(|e| ApiError::param(name, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_become_rfc3339() {
        let mut v = serde_json::json!({"received_at": 0, "n": 5, "inner": [{"lease_until": 1000, "at_large": 3}]});
        rfc3339_times(&mut v);
        assert_eq!(v["received_at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["inner"][0]["lease_until"], "1970-01-01T00:00:01.000Z");
        assert_eq!(v["n"], 5);
        assert_eq!(v["inner"][0]["at_large"], 3);
    }
}
