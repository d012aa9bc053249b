//! Rules that hold across routes: `Idempotency-Key` on creating POSTs (replay, conflict,
//! errors not remembered, keys per caller, surviving a restart) and the header limits. Guards
//! against a retried request creating a second subscription, and against unbounded headers.
#![forbid(unsafe_code)]

mod common;
use common::local;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use broker_core::{Broker, ManualClock, Timestamp};
use broker_server::{router, ServerConfig};
use serde_json::{json, Value};
use tower::ServiceExt;

struct Answer {
    status: StatusCode,
    replayed: bool,
    body: Value,
}

async fn call(
    app: &axum::Router,
    method: Method,
    uri: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> Answer {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let resp = app
        .clone()
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let replayed = resp.headers().contains_key("idempotent-replayed");
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        replayed,
        body,
    }
}

async fn memory_app(config: &ServerConfig) -> axum::Router {
    let broker = Broker::open_in_memory(
        config.broker.clone(),
        Arc::new(ManualClock::new(Timestamp(1_767_225_600_000))),
    )
    .await
    .unwrap();
    router(broker, config).unwrap()
}

#[tokio::test]
async fn creating_posts_replay_the_first_answer_for_the_same_key_and_request() {
    let config = local();
    let app = memory_app(&config).await;
    let k = [("idempotency-key", "8e4a0a34-6a3b-4c55-9d38-5f0b9f2b3a11")];

    let first = call(
        &app,
        Method::POST,
        "/v1/rooms",
        json!({"name": "moves"}),
        &k,
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed);
    let again = call(
        &app,
        Method::POST,
        "/v1/rooms",
        json!({"name": "moves"}),
        &k,
    )
    .await;
    assert_eq!(
        again.status,
        StatusCode::CREATED,
        "the original status, not 409"
    );
    assert!(again.replayed);
    assert_eq!(again.body, first.body, "the original body");
    // Without the key, the same request is a new one: the Room exists.
    let plain = call(
        &app,
        Method::POST,
        "/v1/rooms",
        json!({"name": "moves"}),
        &[],
    )
    .await;
    assert_eq!(plain.status, StatusCode::CONFLICT);
    // The same key with a different request.
    let other = call(
        &app,
        Method::POST,
        "/v1/rooms",
        json!({"name": "other"}),
        &k,
    )
    .await;
    assert_eq!(other.status, StatusCode::CONFLICT);
    assert_eq!(other.body["code"], "idempotency_conflict");

    // Errors are not remembered: once the cause is fixed, a retry with the same key runs.
    let k2 = [("idempotency-key", "second")];
    let bad = call(
        &app,
        Method::POST,
        "/v1/rooms/nowhere/subscriptions",
        json!({"mode": "pull"}),
        &k2,
    )
    .await;
    assert_eq!(bad.status, StatusCode::NOT_FOUND);
    let created = call(
        &app,
        Method::POST,
        "/v1/rooms",
        json!({"name": "nowhere"}),
        &[],
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let sub = call(
        &app,
        Method::POST,
        "/v1/rooms/nowhere/subscriptions",
        json!({"mode": "pull"}),
        &k2,
    )
    .await;
    assert_eq!(sub.status, StatusCode::CREATED, "{}", sub.body);
    assert!(!sub.replayed);
    let sub_again = call(
        &app,
        Method::POST,
        "/v1/rooms/nowhere/subscriptions",
        json!({"mode": "pull"}),
        &k2,
    )
    .await;
    assert!(sub_again.replayed);
    assert_eq!(
        sub_again.body["subscription"]["id"],
        sub.body["subscription"]["id"]
    );
    let subs = call(
        &app,
        Method::GET,
        "/v1/rooms/nowhere/subscriptions",
        Value::Null,
        &[],
    )
    .await;
    assert_eq!(
        subs.body["items"].as_array().unwrap().len(),
        1,
        "one subscription, not two"
    );

    // GovStack keys belong to the calling member: another member's same key is its own.
    let police = [
        ("idempotency-key", "k"),
        ("x-govstack-client", "i/GOV/m/police"),
    ];
    let births = [
        ("idempotency-key", "k"),
        ("x-govstack-client", "i/GOV/m/births"),
    ];
    let t = json!({"eventType": "newBirth", "schema": {"type": "object"}});
    let a = call(
        &app,
        Method::POST,
        "/r1/i/GOV/m/reg/api/v1/eventType",
        t.clone(),
        &police,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let b = call(
        &app,
        Method::POST,
        "/r1/i/GOV/m/reg/api/v1/eventType",
        t.clone(),
        &police,
    )
    .await;
    assert_eq!((b.status, b.replayed), (StatusCode::OK, true));
    let c = call(
        &app,
        Method::POST,
        "/r1/i/GOV/m/reg/api/v1/eventType",
        t,
        &births,
    )
    .await;
    assert_eq!(
        c.status,
        StatusCode::CONFLICT,
        "births' own key: a real create, and it exists"
    );
    assert_eq!(c.body["code"], "event_type_exists");
}

#[tokio::test]
async fn remembered_answers_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        ..local()
    };
    let k = [("idempotency-key", "restart")];
    let first = {
        let broker = Broker::open(config.database_path(), config.broker.clone())
            .await
            .unwrap();
        let app = router(broker.clone(), &config).unwrap();
        let a = call(
            &app,
            Method::POST,
            "/v1/rooms",
            json!({"name": "moves"}),
            &k,
        )
        .await;
        broker.close().await;
        a
    };
    let broker = Broker::open(config.database_path(), config.broker.clone())
        .await
        .unwrap();
    let app = router(broker.clone(), &config).unwrap();
    let again = call(
        &app,
        Method::POST,
        "/v1/rooms",
        json!({"name": "moves"}),
        &k,
    )
    .await;
    assert_eq!((again.status, again.replayed), (StatusCode::CREATED, true));
    assert_eq!(again.body, first.body);
    broker.close().await;
}

#[tokio::test]
async fn too_many_or_too_large_headers_are_431() {
    let mut config = local();
    config.http.header_bytes_max = 2048;
    config.http.headers_max = 8;
    let app = memory_app(&config).await;
    let ok = call(&app, Method::GET, "/v1/rooms", Value::Null, &[("x-a", "1")]).await;
    assert_eq!(ok.status, StatusCode::OK);
    let big = "x".repeat(3000);
    let a = call(
        &app,
        Method::GET,
        "/v1/rooms",
        Value::Null,
        &[("x-big", &big)],
    )
    .await;
    assert_eq!(a.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(a.body["code"], "headers_too_large");
    let names: Vec<String> = (0..10).map(|i| format!("x-h{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    let b = call(&app, Method::GET, "/v1/rooms", Value::Null, &many).await;
    assert_eq!(b.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_bound_holds_across_routes() {
    let mut config = local();
    config.http.concurrent_requests_max = 1;
    let app = memory_app(&config).await;
    assert_eq!(
        call(&app, Method::POST, "/v1/rooms", json!({"name": "r"}), &[])
            .await
            .status,
        StatusCode::CREATED
    );
    let sub = call(
        &app,
        Method::POST,
        "/v1/rooms/r/subscriptions",
        json!({"mode": "pull"}),
        &[],
    )
    .await;
    let id = sub.body["subscription"]["id"].as_str().unwrap().to_string();
    // One long poll holds the only slot, so that a request to another route is shed. The poll
    // itself may be shed if it arrives while a probe holds the slot; then it is sent again.
    let hold = |app: axum::Router, id: String| {
        tokio::spawn(async move {
            call(
                &app,
                Method::POST,
                &format!("/v1/subscriptions/{id}/pull"),
                json!({"wait_ms": 20000}),
                &[],
            )
            .await
            .status
        })
    };
    let mut held = hold(app.clone(), id.clone());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let shed = loop {
        if held.is_finished() {
            held = hold(app.clone(), id.clone());
        }
        // Polling with a deadline: the spawned poll needs a moment to take the slot.
        tokio::task::yield_now().await;
        let a = call(&app, Method::GET, "/v1/rooms", Value::Null, &[]).await;
        if a.status == StatusCode::SERVICE_UNAVAILABLE {
            break a;
        }
        assert!(tokio::time::Instant::now() < deadline, "never shed");
    };
    assert_eq!(shed.body["code"], "overloaded");
    held.abort();
}

#[tokio::test]
async fn every_answer_carries_a_request_id() {
    let config = local();
    let app = memory_app(&config).await;
    let fresh = app
        .clone()
        .oneshot(Request::get("/v1/rooms").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let id = fresh.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    let given = app
        .oneshot(
            Request::get("/no/such/route")
                .header("x-request-id", "caller-chosen-1")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        given.headers()["x-request-id"],
        "caller-chosen-1",
        "errors too"
    );
}
