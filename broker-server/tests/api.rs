//! The native HTTP API through the router (no socket), one real socket, and the `postroom`
//! binary: statuses, problem+json errors, and the publish/subscribe/pull flow. Guards against
//! the server mapping an error to the wrong status, or a bad request to a 500.
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

struct Api {
    app: axum::Router,
}

struct Answer {
    status: StatusCode,
    content_type: String,
    body: Value,
}

impl Api {
    async fn new(config: ServerConfig) -> Api {
        let broker = Broker::open_in_memory(
            config.broker.clone(),
            Arc::new(ManualClock::new(Timestamp(1_767_225_600_000))),
        )
        .await
        .unwrap();
        Api {
            app: router(broker, &config).unwrap(),
        }
    }

    async fn call(
        &self,
        method: Method,
        uri: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .app
            .clone()
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let content_type = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Answer {
            status,
            content_type,
            body,
        }
    }

    async fn json(&self, method: Method, uri: &str, body: Value) -> Answer {
        self.call(
            method,
            uri,
            Some("application/json"),
            body.to_string().into_bytes(),
            &[],
        )
        .await
    }

    async fn get(&self, uri: &str) -> Answer {
        self.call(Method::GET, uri, None, vec![], &[]).await
    }

    async fn setup(&self) {
        assert_eq!(
            self.json(Method::POST, "/v1/rooms", json!({"name": "moves"}))
                .await
                .status,
            StatusCode::CREATED
        );
        let schema = json!({"type": "object", "required": ["move_id"], "properties": {"move_id": {"type": "string"}, "n": {"type": "integer"}}});
        let a = self
            .json(
                Method::PUT,
                "/v1/rooms/moves/event-types/MoveProposed",
                json!({"schema": schema, "key_pointer": "/move_id"}),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
    }
}

/// Asserts a problem+json answer with this status and code.
fn problem(a: &Answer, status: StatusCode, code: &str) {
    assert_eq!(a.status, status, "{:?}", a.body);
    assert_eq!(a.content_type, "application/problem+json");
    assert_eq!(a.body["code"], code, "{:?}", a.body);
    assert_eq!(a.body["status"], status.as_u16());
    assert!(
        a.body["title"].is_string() && a.body["detail"].is_string() && a.body["type"].is_string()
    );
}

#[tokio::test]
async fn rooms_and_event_types() {
    let api = Api::new(local()).await;
    api.setup().await;
    let room = api.get("/v1/rooms/moves").await;
    assert_eq!(room.status, StatusCode::OK);
    assert_eq!(
        (room.body["name"].as_str(), room.body["status"].as_str()),
        (Some("moves"), Some("active"))
    );
    assert_eq!(
        room.body["created_at"], "2026-01-01T00:00:00.000Z",
        "times are RFC 3339"
    );
    let list = api.get("/v1/rooms").await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1);
    // A changed schema is a new version: 200, not 201.
    let v2 = api
        .json(
            Method::PUT,
            "/v1/rooms/moves/event-types/MoveProposed",
            json!({"schema": {"type": "object"}, "key_pointer": "/move_id"}),
        )
        .await;
    assert_eq!(
        (v2.status, v2.body["event_type"]["version"].as_u64()),
        (StatusCode::OK, Some(2))
    );
    assert_eq!(
        api.get("/v1/rooms/moves/event-types").await.body["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let patched = api
        .json(
            Method::PATCH,
            "/v1/rooms/moves",
            json!({"description": "BaSM"}),
        )
        .await;
    assert_eq!(patched.body["description"], "BaSM");
    problem(
        &api.json(Method::POST, "/v1/rooms", json!({"name": "moves"}))
            .await,
        StatusCode::CONFLICT,
        "room_exists",
    );
    problem(
        &api.json(Method::POST, "/v1/rooms", json!({"name": "Bad Name"}))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
    );
    problem(
        &api.get("/v1/rooms/nope").await,
        StatusCode::NOT_FOUND,
        "room_not_found",
    );
    problem(
        &api.json(
            Method::PUT,
            "/v1/rooms/moves/event-types/T",
            json!({"schema": {"type": "banana"}}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_schema",
    );
    assert_eq!(
        api.call(Method::DELETE, "/v1/rooms/moves", None, vec![], &[])
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    problem(
        &api.get("/v1/rooms/moves").await,
        StatusCode::NOT_FOUND,
        "room_not_found",
    );
}

#[tokio::test]
async fn publishing_and_every_error_status() {
    let mut config = local();
    config.http.body_bytes_max = 4096;
    let api = Api::new(config).await;
    api.setup().await;
    let body = br#"{"move_id":"M1","n":1}"#.to_vec();
    let a = api
        .call(
            Method::POST,
            "/v1/rooms/moves/events/MoveProposed",
            Some("application/json"),
            body.clone(),
            &[],
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
    for field in ["id", "room", "event_type", "key", "sequence", "received_at"] {
        assert!(!a.body[field].is_null(), "missing {field}");
    }
    assert_eq!(
        (a.body["key"].as_str(), a.body["sequence"].as_u64()),
        (Some("M1"), Some(1))
    );
    // Idempotency-Key: same request replays, different request conflicts.
    let idem = [("idempotency-key", "4f9c0a86-6b1e-4b44-9a43-7d5c1f0d0e11")];
    let first = api
        .call(
            Method::POST,
            "/v1/rooms/moves/events/MoveProposed",
            Some("application/json"),
            body.clone(),
            &idem,
        )
        .await;
    let again = api
        .call(
            Method::POST,
            "/v1/rooms/moves/events/MoveProposed",
            Some("application/json"),
            body.clone(),
            &idem,
        )
        .await;
    assert_eq!(
        (first.status, again.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert_eq!(first.body["id"], again.body["id"]);
    let other = api
        .call(
            Method::POST,
            "/v1/rooms/moves/events/MoveProposed",
            Some("application/json"),
            br#"{"move_id":"M2"}"#.to_vec(),
            &idem,
        )
        .await;
    problem(&other, StatusCode::CONFLICT, "idempotency_conflict");
    // The event reads back with its state.
    let read = api
        .get(&format!("/v1/events/{}", a.body["id"].as_str().unwrap()))
        .await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.body["payload"]["move_id"], "M1");
    assert_eq!(read.body["summary"], "delivered to 0 of 0 subscriptions");
    // Two events carry key M1: the first publish and the first one with the idempotency key.
    let listed = api.get("/v1/rooms/moves/events?key=M1&limit=10").await;
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 2);

    // Every error status, once.
    let post = |ct: Option<&'static str>, body: &'static [u8]| {
        let api = &api;
        async move {
            api.call(
                Method::POST,
                "/v1/rooms/moves/events/MoveProposed",
                ct,
                body.to_vec(),
                &[],
            )
            .await
        }
    };
    problem(
        &post(Some("application/json"), b"{not json").await,
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );
    let violation = post(Some("application/json"), br#"{"n":"x"}"#).await;
    problem(
        &violation,
        StatusCode::UNPROCESSABLE_ENTITY,
        "schema_violation",
    );
    let paths: Vec<&str> = violation.body["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["instance_path"].as_str().unwrap())
        .collect();
    assert!(paths.contains(&"") && paths.contains(&"/n"), "{paths:?}");
    problem(
        &post(Some("text/plain"), br#"{"move_id":"M1"}"#).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    problem(
        &post(None, br#"{"move_id":"M1"}"#).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let big = format!(r#"{{"move_id":"{}"}}"#, "x".repeat(5000));
    let too_big = api
        .call(
            Method::POST,
            "/v1/rooms/moves/events/MoveProposed",
            Some("application/json"),
            big.into_bytes(),
            &[],
        )
        .await;
    problem(&too_big, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    problem(
        &api.call(
            Method::POST,
            "/v1/rooms/nope/events/MoveProposed",
            Some("application/json"),
            b"{}".to_vec(),
            &[],
        )
        .await,
        StatusCode::NOT_FOUND,
        "room_not_found",
    );
    problem(
        &api.get("/v1/events/not-a-uuid").await,
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
    );
    problem(
        &api.get("/v1/events/0191d2f6-7c55-7000-8000-000000000009")
            .await,
        StatusCode::NOT_FOUND,
        "event_not_found",
    );
    problem(
        &api.get("/v1/rooms/moves/events?since=yesterday").await,
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
    );
    problem(
        &api.get("/v1/nothing-here").await,
        StatusCode::NOT_FOUND,
        "no_route",
    );
    problem(
        &api.call(Method::PUT, "/v1/rooms", None, vec![], &[]).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    problem(
        &api.call(
            Method::POST,
            "/v1/rooms/moves/events/MoveProposed",
            Some("application/json"),
            br#"{"move_id":"M1"}"#.to_vec(),
            &[("postroom-event-id", "nope")],
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
    );
}

#[tokio::test]
async fn overload_is_a_429_with_retry_after() {
    let mut config = local();
    config.broker.writer.queue_ops_max = 1;
    // The background sweep would compete for the one queue slot during setup.
    config.broker.retention.interval_ms = 0;
    config.broker.writer.queue_bytes_max = 1;
    let api = Arc::new(Api::new(config).await);
    api.setup().await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            let body = format!(r#"{{"move_id":"M{i}"}}"#).into_bytes();
            let a = api
                .call(
                    Method::POST,
                    "/v1/rooms/moves/events/MoveProposed",
                    Some("application/json"),
                    body,
                    &[],
                )
                .await;
            (a.status, a.body)
        }));
    }
    let mut overloaded = 0;
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            StatusCode::CREATED => {}
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(body["code"], "overloaded");
                overloaded += 1;
            }
            other => panic!("unexpected {other}: {body:?}"),
        }
    }
    assert!(overloaded > 0);
}

#[tokio::test]
async fn subscriptions_pull_ack_and_dead_letters() {
    let mut config = local();
    // The push subscription below names a loopback URL, which the push target guard refuses by
    // default.
    config.broker.delivery.push_allow.loopback = true;
    let api = Api::new(config).await;
    api.setup().await;
    let created = api
        .json(
            Method::POST,
            "/v1/rooms/moves/subscriptions",
            json!({"mode": "pull"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert!(created.body["secret"].is_null());
    let id = created.body["subscription"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let push = api
        .json(
            Method::POST,
            "/v1/rooms/moves/subscriptions",
            json!({"mode": "push", "push": {"url": "http://127.0.0.1:9/hook", "basic_auth": {"username": "u", "password": "p"}}}),
        )
        .await;
    assert!(
        push.body["secret"].as_str().unwrap().starts_with("whsec_"),
        "the secret is shown once"
    );
    assert!(
        push.body["subscription"]["mode"]["basic_auth"]
            .get("password")
            .is_none(),
        "passwords are never shown"
    );
    assert_eq!(
        api.get("/v1/rooms/moves/subscriptions").await.body["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    for n in 0..2 {
        let body = format!(r#"{{"move_id":"M1","n":{n}}}"#).into_bytes();
        api.call(
            Method::POST,
            "/v1/rooms/moves/events/MoveProposed",
            Some("application/json"),
            body,
            &[],
        )
        .await;
    }
    let pulled = api
        .json(
            Method::POST,
            &format!("/v1/subscriptions/{id}/pull"),
            json!({"max_messages": 10}),
        )
        .await;
    let msgs = pulled.body["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 1, "per-key FIFO: one message of key M1");
    assert_eq!(msgs[0]["payload"]["n"], 0);
    let ack_id = msgs[0]["ack_id"].as_str().unwrap();
    let acked = api
        .json(
            Method::POST,
            &format!("/v1/subscriptions/{id}/ack"),
            json!({"ack_ids": [ack_id]}),
        )
        .await;
    assert_eq!(acked.body["results"][0]["ok"], true);
    let again = api
        .json(
            Method::POST,
            &format!("/v1/subscriptions/{id}/ack"),
            json!({"ack_ids": [ack_id]}),
        )
        .await;
    assert_eq!(again.body["results"][0]["code"], "lease_not_held");
    let next = api
        .json(
            Method::POST,
            &format!("/v1/subscriptions/{id}/pull"),
            json!({"max_messages": 10}),
        )
        .await;
    let ack2 = next.body["messages"][0]["ack_id"]
        .as_str()
        .unwrap()
        .to_string();
    let term = api
        .json(
            Method::POST,
            &format!("/v1/subscriptions/{id}/term"),
            json!({"ack_ids": [ack2]}),
        )
        .await;
    assert_eq!(term.body["results"][0]["ok"], true);
    let dead = api
        .get(&format!("/v1/subscriptions/{id}/dead-letters"))
        .await;
    assert_eq!(dead.body["items"][0]["reason"], "terminated");
    let redriven = api
        .call(
            Method::POST,
            &format!("/v1/subscriptions/{id}/dead-letters/redrive"),
            None,
            vec![],
            &[],
        )
        .await;
    assert_eq!(redriven.body["redriven"], 1);
    // One record per attempt, updated as it settles: the acked one and the terminated one.
    assert_eq!(
        api.get(&format!("/v1/subscriptions/{id}/attempts"))
            .await
            .body["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        api.get(&format!("/v1/subscriptions/{id}/blocked-keys"))
            .await
            .status,
        StatusCode::OK
    );
    let paused = api
        .call(
            Method::POST,
            &format!("/v1/subscriptions/{id}/pause"),
            None,
            vec![],
            &[],
        )
        .await;
    assert_eq!(paused.body["status"], "paused");
    // Pausing again is a no-op; approving a subscription that is not pending is a conflict.
    let again = api
        .call(
            Method::POST,
            &format!("/v1/subscriptions/{id}/pause"),
            None,
            vec![],
            &[],
        )
        .await;
    assert_eq!(again.status, StatusCode::OK);
    let approve = api
        .call(
            Method::POST,
            &format!("/v1/subscriptions/{id}/approve"),
            None,
            vec![],
            &[],
        )
        .await;
    problem(&approve, StatusCode::CONFLICT, "subscription_state");
    problem(
        &api.json(
            Method::POST,
            &format!("/v1/subscriptions/{id}/ack"),
            json!({}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
    );
    problem(
        &api.json(
            Method::POST,
            &format!("/v1/subscriptions/{id}/pull"),
            json!({"max_messages": 0}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_input",
    );
    problem(
        &api.json(
            Method::POST,
            "/v1/rooms/moves/subscriptions",
            json!({"mode": "push"}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
    );
    problem(
        &api.json(
            Method::POST,
            "/v1/rooms/moves/subscriptions",
            json!({"mode": "carrier-pigeon"}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );
    problem(
        &api.get("/v1/subscriptions/0191d2f6-7c55-7000-8000-000000000009")
            .await,
        StatusCode::NOT_FOUND,
        "subscription_not_found",
    );
    assert_eq!(
        api.call(
            Method::DELETE,
            &format!("/v1/subscriptions/{id}"),
            None,
            vec![],
            &[]
        )
        .await
        .status,
        StatusCode::NO_CONTENT
    );
}

/// The server on a real socket, stopped by its shutdown future.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_a_real_socket_and_shuts_down_cleanly() {
    let served = common::Served::start(local()).await;
    let addr = served.addr;
    let client = reqwest::Client::new();
    let base = format!("http://{addr}");
    assert_eq!(
        client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = client
        .post(format!("{base}/v1/rooms"))
        .json(&json!({"name": "irc"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let dir = served.stop().await;
    assert!(dir.path().join("data").join("postroom.redb").exists());
}

/// `postroom serve` as a user runs it: it answers, and SIGTERM stops it with exit status 0.
#[test]
fn the_binary_serves_and_exits_zero_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = bare_postroom()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        // Created by the server, private; the temporary folder itself is 0755.
        .arg(dir.path().join("data"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("address line")
        .to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        reqwest::get(format!("{url}/healthz"))
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 200);
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "exit status {exit:?}");
}

/// With `POSTROOM_LOG_FORMAT=json` every log line is a JSON object, and a request's line names
/// its request id; no token appears in the log.
#[test]
fn json_logs_carry_the_request_id_and_no_secrets() {
    use std::io::{BufRead, BufReader, Read};
    let dir = tempfile::tempdir().unwrap();
    let mut child = bare_postroom()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        // Created by the server, private; the temporary folder itself is 0755.
        .arg(dir.path().join("data"))
        .env("POSTROOM_LOG_FORMAT", "json")
        .env("POSTROOM_ADMIN_CLIENT_ID", "ops")
        .env("POSTROOM_ADMIN_CLIENT_SECRET", "a-long-chosen-secret")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("address line")
        .to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        reqwest::Client::new()
            .get(format!("{url}/v1/rooms"))
            .header("x-request-id", "rid-json-1")
            .bearer_auth("not-a-real-token-but-secret-looking")
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 401);
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert!(child.wait().unwrap().success());
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let lines: Vec<Value> = err
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["span"]["request_id"] == "rid-json-1" && l["span"]["path"] == "/v1/rooms"),
        "{err}"
    );
    assert!(!err.contains("secret-looking") && !err.contains("a-long-chosen-secret"));
}

/// The binary with none of the caller's `POSTROOM_*` settings (a test run's own, such as
/// `POSTROOM_SIM_SECONDS`, are not server settings, and the server refuses unknown ones).
fn bare_postroom() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_postroom"));
    for (k, _) in std::env::vars() {
        if k.starts_with("POSTROOM_") {
            c.env_remove(k);
        }
    }
    c
}
