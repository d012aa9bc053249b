//! Request-level rules that hold for every route and so live outside the handlers: header size
//! limits, and `Idempotency-Key` on the POSTs that create something (Book a Secure Move
//! semantics: the same key and the same request within the window get the first answer again,
//! a different request with the key gets 409, and errors are not remembered, so a failed request
//! can be retried with its key).
//!
//! Publishing is not handled here: the core keeps publish idempotency itself, in the same
//! transaction as the event, which is stronger than remembering an HTTP answer.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use broker_core::{Broker, Principal, StoredResponse};

use crate::api::govstack::CLIENT_HEADER;
use crate::error::ApiError;

/// Whether a request is an administrative change that the audit log records: every method
/// but GET and HEAD, except the data plane (publishing, pulling and settling messages) and the
/// token endpoint.
fn is_administrative(method: &Method, path: &str) -> bool {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
        || crate::auth::is_icd_token_path(path)
    {
        return false;
    }
    let s: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    !matches!(
        s.as_slice(),
        ["oauth", "token"]
            | ["v1", "rooms", _, "events", _]
            | [
                "v1",
                "subscriptions",
                _,
                "pull" | "ack" | "nack" | "extend" | "term"
            ]
            | ["r1", _, _, _, _, "pub", "v1", _]
            | ["r1", _, _, _, _, "pull", "v1", ..]
            | ["irc_entry", _, "event" | "heartbeat"]
    )
}

/// Longest path segment kept in an audit entry's action or target, in bytes: names and ids
/// are far shorter, so only a hostile path is cut.
const AUDIT_SEGMENT_BYTES_MAX: usize = 96;
/// Most path segments kept in an audit entry's action or target.
const AUDIT_SEGMENTS_MAX: usize = 10;

/// A path segment as the audit log keeps it: cut to [`AUDIT_SEGMENT_BYTES_MAX`] bytes.
fn audit_segment(seg: &str) -> std::borrow::Cow<'_, str> {
    if seg.len() <= AUDIT_SEGMENT_BYTES_MAX {
        return seg.into();
    }
    let mut end = AUDIT_SEGMENT_BYTES_MAX;
    while !seg.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &seg[..end]).into()
}

/// The path as the audit log keeps it: at most [`AUDIT_SEGMENTS_MAX`] segments of at most
/// [`AUDIT_SEGMENT_BYTES_MAX`] bytes, so that an entry stays a few hundred bytes whatever the
/// caller sent (the core cuts every text again at `AUDIT_TEXT_BYTES_MAX`).
fn audit_target(path: &str) -> String {
    let mut segs: Vec<std::borrow::Cow<'_, str>> = path
        .split('/')
        .take(AUDIT_SEGMENTS_MAX + 1)
        .map(audit_segment)
        .collect();
    if path.split('/').count() > AUDIT_SEGMENTS_MAX + 1 {
        segs.push("…".into());
    }
    segs.join("/")
}

/// The action as logged: the method and the bounded path with ids (UUIDs) generalised, so
/// that entries can be filtered by kind of action.
fn action_of(method: &Method, path: &str) -> String {
    let generic: Vec<&str> = path
        .split('/')
        .map(|seg| {
            if uuid::Uuid::parse_str(seg).is_ok() {
                "{id}"
            } else {
                seg
            }
        })
        .collect();
    format!("{method} {}", audit_target(&generic.join("/")))
}

/// Seconds since the epoch of the last "refused before authentication" log line, and how
/// many refusals were not logged since.
static UNAUTH_LOGGED_AT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static UNAUTH_UNLOGGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// At most one log line about unauthenticated refusals per this many seconds.
const UNAUTH_LOG_EVERY_SECS: u64 = 10;

/// Counts an administrative request refused before authentication: a metric, and at most one
/// warning every [`UNAUTH_LOG_EVERY_SECS`] saying how many there were. Not in the audit log:
/// anyone can send these, and writing each durably let anonymous callers fill the disk.
fn note_unauthenticated(method: &Method, path: &str, status: StatusCode) {
    use std::sync::atomic::Ordering::Relaxed;
    metrics::counter!(crate::observe::UNAUTHENTICATED_REFUSALS).increment(1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let last = UNAUTH_LOGGED_AT.load(Relaxed);
    if now.saturating_sub(last) >= UNAUTH_LOG_EVERY_SECS
        && UNAUTH_LOGGED_AT
            .compare_exchange(last, now, Relaxed, Relaxed)
            .is_ok()
    {
        let unlogged = UNAUTH_UNLOGGED.swap(0, Relaxed);
        tracing::warn!(
            action = %action_of(method, path),
            status = status.as_u16(),
            not_logged_since_last = unlogged,
            "administrative request refused before authentication (counted in {}, not audited)",
            crate::observe::UNAUTHENTICATED_REFUSALS
        );
    } else {
        UNAUTH_UNLOGGED.fetch_add(1, Relaxed);
    }
}

/// What a handler wants the audit entry of its request to say about the change, beyond the
/// action and target (e.g. the configuration patch it applied). Put in the response's
/// extensions.
#[derive(Clone, Debug)]
pub(crate) struct AuditDetail(pub serde_json::Value);

/// Records every administrative change by an authenticated caller, successful or not, with
/// who made it; `next` is the rest of the chain. Requests refused before authentication are
/// counted instead (see [`note_unauthenticated`]).
pub(crate) async fn audit<F, Fut>(broker: &Broker, req: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    if !is_administrative(req.method(), req.uri().path()) {
        return next(req).await;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    // A request for no route changes nothing; the HTTP metrics count it (route `unmatched`).
    // Not auditing it keeps an authenticated caller from flooding the log with junk paths.
    let routed = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .is_some();
    let response = next(req).await;
    let Some(actor) = response
        .extensions()
        .get::<crate::auth::Identity>()
        .map(|i| i.principal.clone())
    else {
        note_unauthenticated(&method, &path, response.status());
        return response;
    };
    if !routed {
        return response;
    }
    let detail = response
        .extensions()
        .get::<AuditDetail>()
        .map(|d| d.0.clone());
    let (parts, body) = response.into_parts();
    let (error, body) = if parts.status.is_success() {
        (None, body)
    } else {
        // The problem's stable code says why it failed; its body is small.
        let bytes = axum::body::to_bytes(body, 64 * 1024)
            .await
            .unwrap_or_default();
        let code = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("code").and_then(|c| c.as_str()).map(String::from))
            .unwrap_or_else(|| format!("http_{}", parts.status.as_u16()));
        (Some(code), Body::from(bytes))
    };
    let entry = broker_core::NewAuditEntry {
        actor,
        action: action_of(&method, &path),
        target: audit_target(&path),
        error,
        detail,
    };
    if let Err(e) = broker.record_audit(entry).await {
        tracing::error!(error = %e, "could not write the audit log");
    }
    Response::from_parts(parts, body)
}

/// The two middleware layers of every route. Each `Router::layer` wraps every route in one
/// more boxed service that axum clones and boxes again on every request; in the profile of the
/// publish route (BENCHMARKS.md, issue 8, step 5) that machinery for ten layers was ~9% of the
/// samples, so the server's own steps run in two layers, in the order they had:
///
/// - [`front`], outside the body limit and the load-shedding limits: request metrics, then
///   the header limits;
/// - [`gate`], inside them: the audit log, authentication, then idempotency.
pub(crate) async fn front(
    State(limits): State<HeaderLimits>,
    req: Request,
    next: Next,
) -> Response {
    crate::observe::track(req, move |req| async move {
        match check_header_limits(limits, req.headers()) {
            Ok(()) => next.run(req).await,
            Err(e) => e.into_response(),
        }
    })
    .await
}

/// What [`gate`] needs: the broker for the audit log, the authenticator, and the idempotency
/// layer's state.
#[derive(Clone)]
pub(crate) struct Gate {
    pub broker: Broker,
    pub auth: Arc<crate::auth::Auth>,
    pub idempotency: Idempotency,
}

/// The audit log, authentication and idempotency around the handler (see [`front`]).
pub(crate) async fn gate(State(g): State<Gate>, req: Request, next: Next) -> Response {
    let g = &g;
    audit(&g.broker, req, move |req| async move {
        crate::auth::authenticate(&g.auth, req, move |req| {
            idempotency(&g.idempotency, req, move |req| next.run(req))
        })
        .await
    })
    .await
}

/// Header limits, checked before anything else reads the request.
#[derive(Clone, Copy)]
pub(crate) struct HeaderLimits {
    pub bytes_max: usize,
    pub count_max: usize,
}

/// Refuses (431) a request whose headers are too many or too large.
fn check_header_limits(limits: HeaderLimits, headers: &HeaderMap) -> Result<(), ApiError> {
    if headers.len() > limits.count_max {
        return Err(ApiError::HeadersTooLarge(format!(
            "{} headers, at most {} allowed (http.headers_max)",
            headers.len(),
            limits.count_max
        )));
    }
    // Each header as it appears on the wire: `name: value\r\n`.
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if bytes > limits.bytes_max {
        return Err(ApiError::HeadersTooLarge(format!(
            "{bytes} bytes of headers, at most {} allowed (http.header_bytes_max)",
            limits.bytes_max
        )));
    }
    Ok(())
}

/// What the idempotency layer needs.
#[derive(Clone)]
pub(crate) struct Idempotency {
    pub broker: Broker,
    pub body_bytes_max: usize,
    /// (principal, key) of requests running now: a second request with the same key while the
    /// first runs is refused rather than run twice.
    pub running: Arc<Mutex<HashSet<(String, String)>>>,
}

/// Whether a request creates something that the idempotency layer covers: native Room and
/// subscription creation, and GovStack event type and subscription creation.
fn creates(method: &Method, path: &str) -> bool {
    if method != Method::POST {
        return false;
    }
    let s: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    matches!(
        s.as_slice(),
        ["v1", "rooms"]
            | ["v1", "rooms", _, "subscriptions"]
            | ["r1", _, _, _, _, "api", "v1", "eventType"]
            | ["r1", _, _, _, _, "api", "v1", "subs", _]
    )
}

/// Removes a running key when the request ends, however it ends.
struct Running {
    set: Arc<Mutex<HashSet<(String, String)>>>,
    entry: (String, String),
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.entry);
        }
    }
}

/// Replays or remembers the answer of a creating POST that carries `Idempotency-Key`; `next`
/// is the rest of the chain.
pub(crate) async fn idempotency<F, Fut>(state: &Idempotency, req: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let Some(key) = req.headers().get("idempotency-key") else {
        return next(req).await;
    };
    if !creates(req.method(), req.uri().path()) {
        return next(req).await;
    }
    match remembered(state, key.clone(), req, next).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn remembered<F, Fut>(
    state: &Idempotency,
    key: HeaderValue,
    req: Request,
    next: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let key = key
        .to_str()
        .map_err(|_| ApiError::param("Idempotency-Key", "must be visible ASCII"))?
        .to_string();
    // Keys belong to the caller. With authentication off every caller is the local
    // administrator, so GovStack members are told apart by the header they send.
    let identity = req
        .extensions()
        .get::<crate::auth::Identity>()
        .map(|i| i.principal.clone())
        .ok_or_else(|| ApiError::Unauthenticated("a bearer token is required".into()))?;
    let principal = match req.headers().get(CLIENT_HEADER) {
        Some(v) if req.uri().path().starts_with("/r1/") => v
            .to_str()
            .ok()
            .and_then(|v| Principal::new(format!("{identity} as {}", v.trim())).ok())
            .ok_or_else(|| ApiError::BadClient("X-GovStack-Client is not valid".into()))?,
        _ => identity,
    };
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, state.body_bytes_max)
        .await
        .map_err(|_| ApiError::TooLarge)?;
    // The request as far as its meaning goes: method, path, content type and body.
    let mut fingerprint = Vec::with_capacity(body.len() + 128);
    fingerprint.extend_from_slice(parts.method.as_str().as_bytes());
    fingerprint.push(b' ');
    fingerprint.extend_from_slice(parts.uri.path().as_bytes());
    fingerprint.push(b'\n');
    if let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
        fingerprint.extend_from_slice(ct.as_bytes());
    }
    fingerprint.push(b'\n');
    fingerprint.extend_from_slice(&body);

    if let Some(stored) = state
        .broker
        .replay_response(&principal, &key, &fingerprint)?
    {
        return Ok(replay(stored));
    }
    let entry = (principal.as_str().to_string(), key.clone());
    let _running = {
        let mut set = state.running.lock().map_err(|_| ApiError::Busy)?;
        if !set.insert(entry.clone()) {
            return Err(ApiError::IdempotencyInProgress(key));
        }
        Running {
            set: state.running.clone(),
            entry,
        }
    };
    // Another request with the key may have finished between the look above and the claim.
    if let Some(stored) = state
        .broker
        .replay_response(&principal, &key, &fingerprint)?
    {
        return Ok(replay(stored));
    }
    let response = next(Request::from_parts(parts, Body::from(body))).await;
    if !response.status().is_success() {
        // Errors are not remembered: the caller may fix the cause and retry with the same key.
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, state.body_bytes_max)
        .await
        .map_err(|e| {
            ApiError::Core(broker_core::Error::Storage(format!(
                "cannot read the answer: {e}"
            )))
        })?;
    let stored = StoredResponse {
        status: parts.status.as_u16(),
        body: bytes.to_vec(),
    };
    if let Err(e) = state
        .broker
        .remember_response(&principal, &key, &fingerprint, stored)
        .await
    {
        // The thing was created; only the replay is lost. Say so in the log, answer as usual.
        tracing::warn!(error = %e, key, "could not remember the answer for an idempotency key");
    }
    Ok(Response::from_parts(parts, Body::from(bytes)))
}

fn replay(stored: StoredResponse) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let mut resp = (status, stored.body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // Marks the answer as a replay, for clients and operators who want to tell.
    resp.headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_creating_posts_are_covered() {
        assert!(creates(&Method::POST, "/v1/rooms"));
        assert!(creates(&Method::POST, "/v1/rooms/irc/subscriptions"));
        assert!(creates(&Method::POST, "/r1/i/GOV/m/app/api/v1/eventType"));
        assert!(creates(
            &Method::POST,
            "/r1/i/GOV/m/app/api/v1/subs/newBirth"
        ));
        assert!(!creates(&Method::GET, "/v1/rooms"));
        assert!(!creates(&Method::POST, "/v1/rooms/irc/events/moved"));
        assert!(!creates(&Method::POST, "/v1/subscriptions/x/pull"));
        assert!(!creates(&Method::POST, "/r1/i/GOV/m/app/pub/v1/newBirth"));
    }

    /// The IRC ingress is publishing (data plane), so it stays out of the audit log.
    #[test]
    fn irc_ingress_is_not_administrative() {
        assert!(!is_administrative(
            &Method::POST,
            "/irc_entry/brookhouse/event"
        ));
        assert!(!is_administrative(
            &Method::POST,
            "/irc_entry/brookhouse/heartbeat"
        ));
        assert!(is_administrative(&Method::POST, "/v1/rooms"));
    }
}
