//! Pieces of the OpenAPI document shared by several handlers: the problem+json error responses
//! and schemas for the core types that appear in request bodies. broker-core knows nothing of
//! HTTP or OpenAPI, so its types cannot describe themselves; the descriptions live here, next to
//! the server that speaks them.

use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema, ToResponse, ToSchema};

use crate::error::Problem;

/// The media type of every error answer.
pub(crate) const PROBLEM_JSON: &str = "application/problem+json";

/// One reusable error response, `application/problem+json` with the [`Problem`] schema.
fn problem_response(description: &str) -> RefOr<Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            PROBLEM_JSON,
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name(Problem::name())))
                .build(),
        )
        .into()
}

/// Declares a unit type standing for one reusable error response, so that handlers name the
/// response (`response = NotFound`) instead of repeating its media type and schema.
macro_rules! problem_responses {
    ($($name:ident => $description:literal;)*) => {
        $(
            #[doc = $description]
            // Some are named only by the document's post-processing, not by a handler.
            #[allow(dead_code)]
            pub(crate) struct $name;

            impl<'r> ToResponse<'r> for $name {
                fn response() -> (&'r str, RefOr<Response>) {
                    (stringify!($name), problem_response($description))
                }
            }
        )*

        /// Every reusable error response, for the document's components.
        pub(crate) fn error_responses() -> Vec<(String, RefOr<Response>)> {
            vec![$((stringify!($name).to_string(), problem_response($description)),)*]
        }
    };
}

problem_responses! {
    BadRequest => "The request is malformed: invalid JSON, or a malformed path, query or header value.";
    NotFound => "The named Room, event type, event or subscription does not exist.";
    Conflict => "The request conflicts with the current state (it exists already, or its state forbids this).";
    TooLarge => "The body is larger than the server or the Room accepts.";
    UnsupportedMediaType => "The body is not declared as `application/json`.";
    Unprocessable => "The request is well-formed but invalid: a schema violation, an invalid value or an exceeded limit.";
    Overloaded => "The broker's write queue is full; retry after the `Retry-After` seconds.";
    Unavailable => "The server is busy or shutting down; retry after the `Retry-After` seconds.";
    Unauthorized => "No valid bearer token: get one from `POST /oauth/token` (client credentials).";
    Forbidden => "The token is valid but its application has no right to do this.";
}

/// One way in which a payload fails its event type's JSON Schema.
#[derive(ToSchema)]
#[schema(as = Violation)]
#[allow(dead_code)] // Describes broker_core::Violation for the document; never built.
pub(crate) struct ViolationSchema {
    /// JSON Pointer into the payload where the violation is, `""` for the root.
    instance_path: String,
    /// JSON Pointer into the schema to the keyword that failed.
    schema_path: String,
    /// A human-readable description of what is wrong.
    message: String,
}

/// How long a Room keeps its events. Each bound is optional; an event still owed to a
/// subscriber is kept whatever the bounds say.
#[derive(ToSchema)]
#[schema(as = Retention)]
#[allow(dead_code)] // Describes broker_core::Retention for the document; never built.
pub(crate) struct RetentionSchema {
    /// Events older than this many milliseconds are removed.
    age_ms_max: Option<u64>,
    /// The oldest events are removed while the Room's stored payload bytes exceed this.
    bytes_max: Option<u64>,
}

/// Overrides of the retry policy; an absent field keeps the value from the level below (broker
/// default, then the Room's, then the subscription's).
#[derive(ToSchema)]
#[schema(as = RetryOverrides)]
#[allow(dead_code)] // Describes broker_core::RetryOverrides for the document; never built.
pub(crate) struct RetryOverridesSchema {
    /// Delay before the first retry, in milliseconds.
    initial_delay_ms: Option<u64>,
    /// Factor by which the delay grows after each failed attempt.
    multiplier: Option<f64>,
    /// Longest delay between two attempts, in milliseconds.
    delay_ms_max: Option<u64>,
    /// Attempts after which an event is dead-lettered.
    attempts_max: Option<u32>,
    /// Age after which an undelivered event is dead-lettered, in milliseconds.
    ttl_ms: Option<u64>,
    /// Random spread applied to each delay, in percent.
    jitter_percent: Option<u8>,
}

/// Whether a Room accepts events.
#[derive(ToSchema)]
#[schema(as = RoomStatus)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)] // Describes broker_core::RoomStatus for the document; never built.
pub(crate) enum RoomStatusSchema {
    /// Waiting for an administrator's approval; nothing can be published.
    Pending,
    /// Open for publishing.
    Active,
    /// Closed; nothing can be published, everything stays readable.
    Disabled,
}

/// Changes to a Room; an absent field is left as it is.
#[derive(ToSchema)]
#[schema(as = RoomPatch)]
#[allow(dead_code)] // Describes broker_core::RoomPatch for the document; never built.
pub(crate) struct RoomPatchSchema {
    /// New description.
    description: Option<String>,
    /// New status: `active` or `disabled` (a pending Room becomes active only by approval).
    status: Option<RoomStatusSchema>,
    /// New ordering default.
    ordered: Option<bool>,
    /// New retention bounds (replacing both).
    retention: Option<RetentionSchema>,
    /// New retry defaults (replacing the old ones).
    retry: Option<RetryOverridesSchema>,
    /// Whether new subscriptions wait for a manager's approval.
    subscription_approval: Option<bool>,
}

/// A free-form JSON object, for answers whose shape is a broker-core type (a Room, an event
/// type, a subscription): the core's types carry no schema, and a hand-written copy here could
/// drift from them unnoticed.
pub(crate) struct CoreObject;

impl PartialSchema for CoreObject {
    fn schema() -> RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::Object)
            .into()
    }
}

impl ToSchema for CoreObject {}
