//! The server's one error type and the one place where errors become HTTP: RFC 9457
//! `application/problem+json` with a stable machine-readable `code`. Core errors keep their
//! code; the server adds its own for malformed requests. Internal errors are logged with their
//! cause and answered with a generic body.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use broker_core::ErrorKind;
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::schemas::PROBLEM_JSON;

/// The body of every error answer (RFC 9457). The server builds its answers from this type, so
/// the schema in the OpenAPI document is the shape clients actually get.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem, `https://postroom.dev/problems/{code}`.
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub type_uri: String,
    /// The HTTP status's reason phrase.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong in this request, for people.
    pub detail: String,
    /// A stable machine-readable code, e.g. `room_not_found` or `schema_violation`.
    pub code: String,
    /// Where a payload fails its event type's schema (`schema_violation` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<crate::api::schemas::ViolationSchema>>)]
    pub violations: Option<Vec<broker_core::Violation>>,
    /// How many violations the payload has in all (`schema_violation` only); `violations`
    /// lists at most `broker.limits.schema_violations_max` of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub violations_total: Option<usize>,
    /// True when `violations` does not list them all (`schema_violation` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub violations_truncated: Option<bool>,
    /// The schema version the payload was validated against (`schema_violation` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<u32>,
    /// The limit that was exceeded (`limit_exceeded` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<ProblemLimit>,
    /// The input at fault (`invalid_input` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Why the server is not ready (`not_ready` only, from `GET /readyz`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasons: Option<Vec<String>>,
}

/// An exceeded limit, as reported in a [`Problem`].
#[derive(Debug, Serialize, ToSchema)]
pub struct ProblemLimit {
    /// The limit's name in the configuration, e.g. `payload_bytes_max`.
    pub name: String,
    /// The limit's value.
    pub max: u64,
    /// The value that was refused.
    pub actual: u64,
}

/// Every error the server answers with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// An error from the core.
    #[error(transparent)]
    Core(#[from] broker_core::Error),
    /// The body is not the JSON the endpoint expects.
    #[error("{0}")]
    BadJson(String),
    /// A path or query parameter is malformed.
    #[error("invalid {name}: {message}")]
    BadParameter {
        /// The parameter.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The body is larger than the server accepts (`http.body_bytes_max`).
    #[error("request body too large")]
    TooLarge,
    /// The body's content type is not one the endpoint accepts.
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    /// No such route.
    #[error("no such resource")]
    NoRoute,
    /// The method is not allowed on this route.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The server is overloaded or the request took too long.
    #[error("server busy, retry later")]
    Busy,
    /// The token endpoint refuses a caller over a failure limit (`auth.failures_per_*`),
    /// before checking its secret.
    #[error("too many failed authentications; retry in {retry_after_secs} s")]
    TooManyFailures {
        /// When the caller may try again, in seconds (`Retry-After`).
        retry_after_secs: u64,
    },
    /// The token endpoint refuses a client that asked for more tokens than
    /// `auth.tokens_per_client_per_minute`, before checking its secret: a client keeps its
    /// token until it expires, and one looping on the endpoint would hold the secret-check
    /// slots everyone shares.
    #[error("too many tokens asked for by this client; retry in {retry_after_secs} s")]
    TooManyTokens {
        /// When the caller may try again, in seconds (`Retry-After`).
        retry_after_secs: u64,
    },
    /// The request's headers are larger than `http.header_bytes_max` or more numerous than
    /// `http.headers_max`.
    #[error("request headers too large: {0}")]
    HeadersTooLarge(String),
    /// A GovStack call without a valid `X-GovStack-Client` header.
    #[error("{0}")]
    BadClient(String),
    /// The thing to create exists already (a server-level rule, such as one GovStack
    /// subscription per caller and event type).
    #[error("{0}")]
    Exists(String),
    /// The caller has no subscription that allows this (a GovStack pull without a PULL
    /// subscription: the yaml's "invalid request", 409).
    #[error("{0}")]
    NotSubscribed(String),
    /// No valid credentials (401, with `WWW-Authenticate: Bearer`).
    #[error("{0}")]
    Unauthenticated(String),
    /// A token that is well formed and correctly signed, refused for a reason of its own (401,
    /// with the reason's code).
    #[error("{message}")]
    TokenRefused {
        /// Why.
        reason: TokenRefusal,
        /// What is wrong, for people.
        message: String,
    },
    /// Valid credentials without the right to do this (403).
    #[error("{0}")]
    Forbidden(String),
    /// Another request with the same idempotency key is still being processed.
    #[error("a request with idempotency key `{0}` is still in progress; retry later")]
    IdempotencyInProgress(String),
    /// The server cannot take writes now (`GET /readyz`); the reasons say why.
    #[error("not ready: {}", .0.join("; "))]
    NotReady(Vec<String>),
    /// A setting this process does not control (log levels when the logger belongs to the
    /// program embedding the server).
    #[error("{0}")]
    NotManaged(String),
    /// A payload fails its schema, reported with the field at fault (the IRC ingress, whose
    /// ICD answers 400 naming the field).
    #[error("{field}: {message}")]
    FieldInvalid {
        /// The field (`operation`, `gender`, ...), `body` when no one field is at fault.
        field: String,
        /// What is wrong.
        message: String,
        /// The first violations, as in `schema_violation` answers.
        violations: Vec<broker_core::Violation>,
        /// How many violations there are in all (0 for a fault found before the schema).
        violations_total: usize,
    },
    /// An IRC body names another centre than its path (the ICD's 422).
    #[error("the body's centre `{body}` differs from the path's `{path}`")]
    CentreMismatch {
        /// The centre in the path.
        path: String,
        /// The centre in the body.
        body: String,
    },
}

impl ApiError {
    /// The stable code sent in the problem body.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Core(e) => e.code(),
            ApiError::BadJson(_) => "invalid_json",
            ApiError::BadParameter { .. } => "invalid_parameter",
            ApiError::TooLarge => "body_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::NoRoute => "no_route",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Busy => "overloaded",
            ApiError::TooManyFailures { .. } => "too_many_failures",
            ApiError::TooManyTokens { .. } => "too_many_tokens",
            ApiError::HeadersTooLarge(_) => "headers_too_large",
            ApiError::BadClient(_) => "invalid_client_header",
            ApiError::Exists(_) => "already_exists",
            ApiError::NotSubscribed(_) => "not_subscribed",
            ApiError::Unauthenticated(_) => "unauthenticated",
            ApiError::TokenRefused { reason, .. } => reason.code(),
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotManaged(_) => "not_managed",
            ApiError::IdempotencyInProgress(_) => "idempotency_in_progress",
            ApiError::NotReady(_) => "not_ready",
            ApiError::FieldInvalid { .. } => "schema_violation",
            ApiError::CentreMismatch { .. } => "centre_mismatch",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Core(broker_core::Error::SchemaViolation { .. }) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::Core(broker_core::Error::InvalidJson { .. }) => StatusCode::BAD_REQUEST,
            // The server as a whole has no capacity for one more secret check now, as when it
            // sheds load; not this caller sending too much (the writer's queue, 429).
            ApiError::Core(broker_core::Error::AuthenticationBusy { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Core(e) => match e.kind() {
                ErrorKind::NotFound => StatusCode::NOT_FOUND,
                ErrorKind::Conflict => StatusCode::CONFLICT,
                ErrorKind::InvalidInput => StatusCode::UNPROCESSABLE_ENTITY,
                ErrorKind::LimitExceeded => match e {
                    broker_core::Error::LimitExceeded {
                        limit: "payload_bytes_max",
                        ..
                    } => StatusCode::PAYLOAD_TOO_LARGE,
                    _ => StatusCode::UNPROCESSABLE_ENTITY,
                },
                ErrorKind::Overloaded => StatusCode::TOO_MANY_REQUESTS,
                ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
                ErrorKind::Forbidden => StatusCode::FORBIDDEN,
                ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ApiError::BadJson(_) | ApiError::BadParameter { .. } => StatusCode::BAD_REQUEST,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NoRoute => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Busy | ApiError::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooManyFailures { .. } | ApiError::TooManyTokens { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::Unauthenticated(_) | ApiError::TokenRefused { .. } => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotManaged(_) => StatusCode::CONFLICT,
            ApiError::BadClient(_) | ApiError::FieldInvalid { .. } => StatusCode::BAD_REQUEST,
            ApiError::CentreMismatch { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Exists(_)
            | ApiError::NotSubscribed(_)
            | ApiError::IdempotencyInProgress(_) => StatusCode::CONFLICT,
        }
    }

    /// The HTTP status on the GovStack routes, whose yaml names 400 for every invalid request
    /// (where the native API says 415 or 422) and lists no other client-error codes besides
    /// 404 and 409. Limits, overload and internal errors keep their native status: the yaml is
    /// silent on them, and a client needs to tell them apart.
    pub fn govstack_status(&self) -> StatusCode {
        match self.status() {
            StatusCode::UNPROCESSABLE_ENTITY | StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                StatusCode::BAD_REQUEST
            }
            s => s,
        }
    }

    /// The problem+json answer with the given status (see [`ApiError::govstack_status`]).
    pub fn into_response_with(self, status: StatusCode) -> Response {
        problem(self, status)
    }

    pub(crate) fn param(name: &str, message: impl Into<String>) -> Self {
        ApiError::BadParameter {
            name: name.to_string(),
            message: message.into(),
        }
    }
}

/// Why a correctly signed token is refused (see [`ApiError::TokenRefused`]). Each reason has
/// its own code, so that a client can tell "fetch a new token" from "this token was forged".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenRefusal {
    /// Its lifetime (`exp - iat`) is longer than `auth.token_ttl_secs`: no token of ours is.
    LifetimeExceeded,
    /// Its `iat` is later than now plus `auth.token_clock_skew_secs`.
    IssuedInFuture,
    /// The client secret it was issued for has been revoked.
    SecretRevoked,
    /// Its client was deleted, and perhaps created again under the same id.
    ClientReplaced,
    /// A token of the external issuer names a `local/` identity, which only Postroom's own
    /// clients may have.
    ReservedIdentity,
}

impl TokenRefusal {
    /// The stable code sent in the problem body.
    pub fn code(self) -> &'static str {
        match self {
            TokenRefusal::LifetimeExceeded => "token_lifetime_exceeded",
            TokenRefusal::IssuedInFuture => "token_issued_in_future",
            TokenRefusal::SecretRevoked => "token_secret_revoked",
            TokenRefusal::ClientReplaced => "token_client_replaced",
            TokenRefusal::ReservedIdentity => "reserved_identity",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        problem(self, status)
    }
}

/// The one place where an error becomes an HTTP answer.
fn problem(err: ApiError, status: StatusCode) -> Response {
    let code = err.code();
    let detail = if status == StatusCode::INTERNAL_SERVER_ERROR {
        // The cause goes to the log, never to the client.
        tracing::error!(error = %err, code, "internal error");
        "an internal error occurred; it has been logged".to_string()
    } else {
        err.to_string()
    };
    let mut body = Problem {
        type_uri: format!("https://postroom.dev/problems/{code}"),
        title: status.canonical_reason().unwrap_or("Error").to_string(),
        status: status.as_u16(),
        detail,
        code: code.to_string(),
        violations: None,
        violations_total: None,
        violations_truncated: None,
        schema_version: None,
        limit: None,
        field: None,
        reasons: None,
    };
    let mut retry_after = None;
    match &err {
        ApiError::Core(broker_core::Error::SchemaViolation {
            violations,
            version,
            total,
            ..
        }) => {
            body.violations = Some(violations.clone());
            body.violations_total = Some(*total);
            body.violations_truncated = Some(*total > violations.len());
            body.schema_version = Some(*version);
        }
        ApiError::Core(broker_core::Error::LimitExceeded { limit, max, actual }) => {
            body.limit = Some(ProblemLimit {
                name: limit.to_string(),
                max: *max,
                actual: *actual,
            });
        }
        ApiError::Core(broker_core::Error::InvalidInput { field, .. }) => {
            body.field = Some(field.clone());
        }
        ApiError::Core(
            broker_core::Error::Overloaded { retry_after_ms }
            | broker_core::Error::AuthenticationBusy { retry_after_ms },
        ) => {
            retry_after = Some(retry_after_ms.div_ceil(1000).max(1));
        }
        ApiError::Core(broker_core::Error::StorageUnavailable { retry_after_ms, .. }) => {
            retry_after = Some(retry_after_ms.div_ceil(1000).max(1));
        }
        ApiError::TooManyFailures { retry_after_secs }
        | ApiError::TooManyTokens { retry_after_secs } => {
            retry_after = Some((*retry_after_secs).max(1));
        }
        ApiError::Core(
            broker_core::Error::ShuttingDown | broker_core::Error::StorageConflict { .. },
        )
        | ApiError::Busy => retry_after = Some(1),
        ApiError::NotReady(reasons) => body.reasons = Some(reasons.clone()),
        ApiError::FieldInvalid {
            field,
            violations,
            violations_total,
            ..
        } => {
            body.field = Some(field.clone());
            if !violations.is_empty() {
                body.violations = Some(violations.clone());
                body.violations_total = Some(*violations_total);
                body.violations_truncated = Some(*violations_total > violations.len());
            }
        }
        _ => {}
    }
    // Serialising plain strings and numbers cannot fail; the fallback keeps the status.
    let body = serde_json::to_string(&body).unwrap_or_default();
    let mut resp = (status, body).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if status == StatusCode::UNAUTHORIZED {
        // RFC 6750: tell the client which scheme to use.
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"postroom\""),
        );
    }
    resp
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// The broker could not open its data.
    #[error("storage: {0}")]
    Broker(#[from] broker_core::Error),
    /// The data folder can be read or written by other users of the host, and
    /// `allow_open_data_dir` is not set.
    #[error(
        "the data folder {} can be read or written by other users (mode {mode:04o}); it holds \
         the database with the token signing keys and the client records. Run `chmod 700 {}`, \
         or set allow_open_data_dir (--allow-open-data-dir, POSTROOM_ALLOW_OPEN_DATA_DIR=true) \
         if others must read it",
        dir.display(),
        dir.display()
    )]
    OpenDataDir {
        /// The folder.
        dir: std::path::PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The data folder could not be created or inspected.
    #[error("data folder: {0}")]
    DataDir(String),
    /// The listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("server: {0}")]
    Serve(std::io::Error),
}
