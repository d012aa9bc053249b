//! The OpenAPI documents and the `/docs` page, through the router (no socket). Guards against the
//! document and the router drifting apart (a documented operation that is not routed, a required
//! operation that is not documented, a `$ref` to nothing), against the per-Room document
//! describing payloads other than the registered schemas, and against `/docs` needing the
//! internet.
#![forbid(unsafe_code)]

mod common;
use common::local;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use broker_core::{Broker, ManualClock, Timestamp};
use broker_server::{openapi, router};
use serde_json::{json, Value};
use tower::ServiceExt;

struct Answer {
    status: StatusCode,
    content_type: String,
    cache_control: String,
    bytes: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes).unwrap_or(Value::Null)
    }
}

async fn app() -> axum::Router {
    let config = local();
    let broker = Broker::open_in_memory(
        config.broker.clone(),
        Arc::new(ManualClock::new(Timestamp(1_767_225_600_000))),
    )
    .await
    .unwrap();
    router(broker, &config).unwrap()
}

async fn call(app: &axum::Router, method: Method, uri: &str, body: Option<Value>) -> Answer {
    let mut req = Request::builder().method(method).uri(uri);
    let body = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    let resp = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    let (status, content_type, cache_control) = (
        resp.status(),
        header("content-type"),
        header("cache-control"),
    );
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap()
        .to_vec();
    Answer {
        status,
        content_type,
        cache_control,
        bytes,
    }
}

/// The HTTP methods an OpenAPI path item can hold.
const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Every (path, method) of a document.
fn operations(doc: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for m in METHODS {
            if item.get(*m).is_some() {
                out.push((path.clone(), m.to_string()));
            }
        }
    }
    out
}

/// A template with sample values for its path parameters.
fn concrete(path: &str) -> String {
    path.replace("{room}", "moves")
        .replace("{type}", "MoveProposed")
        .replace("{id}", "0190a0b0-1c2d-7e3f-8a4b-5c6d7e8f9a0b")
        .replace("{member}", "UK%2FGOV%2FHO")
        .replace("{application}", "UK%2FGOV%2FHO%2Firc")
        .replace("{client_id}", "irc-centre")
        .replace("{secret_id}", "1")
}

/// True when the answer is the router's own "no route" or "method not allowed" fallback, not an
/// answer from a handler.
fn is_fallback(a: &Answer) -> bool {
    let code = a.json()["code"].as_str().unwrap_or_default().to_string();
    a.status == StatusCode::METHOD_NOT_ALLOWED || code == "no_route" || code == "method_not_allowed"
}

#[tokio::test]
async fn every_documented_operation_is_routed() {
    let app = app().await;
    let doc = serde_json::to_value(openapi()).unwrap();
    let ops = operations(&doc);
    assert!(ops.len() >= 34, "only {} operations documented", ops.len());
    for (path, method) in &ops {
        let uri = concrete(path);
        assert!(!uri.contains('{'), "unfilled parameter in {path}");
        let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let body = matches!(method.as_str(), "post" | "put" | "patch").then(|| json!({}));
        let a = call(&app, m, &uri, body).await;
        assert!(
            !is_fallback(&a),
            "{method} {path} is documented but not routed: {} {}",
            a.status,
            String::from_utf8_lossy(&a.bytes)
        );
    }
    // The check above can fail: an undocumented action is the router's fallback.
    let a = call(
        &app,
        Method::POST,
        &concrete("/v1/subscriptions/{id}/no-such-action"),
        None,
    )
    .await;
    assert!(is_fallback(&a), "{}", a.status);
    assert_eq!(a.json()["code"], "no_route");
}

#[tokio::test]
async fn every_required_operation_is_documented() {
    let doc = serde_json::to_value(openapi()).unwrap();
    let ops = operations(&doc);
    let sub = "/v1/subscriptions/{id}";
    let mut required: Vec<(String, &str)> = vec![
        ("/v1/rooms".into(), "post"),
        ("/v1/rooms".into(), "get"),
        ("/v1/rooms/{room}".into(), "get"),
        ("/v1/rooms/{room}".into(), "patch"),
        ("/v1/rooms/{room}".into(), "delete"),
        ("/v1/rooms/{room}/approve".into(), "post"),
        ("/v1/rooms/{room}/event-types/{type}".into(), "put"),
        ("/v1/rooms/{room}/event-types/{type}".into(), "get"),
        ("/v1/rooms/{room}/event-types".into(), "get"),
        ("/v1/rooms/{room}/events/{type}".into(), "post"),
        ("/v1/events/{id}".into(), "get"),
        ("/v1/rooms/{room}/events".into(), "get"),
        ("/v1/rooms/{room}/subscriptions".into(), "post"),
        ("/v1/rooms/{room}/subscriptions".into(), "get"),
        (sub.into(), "get"),
        (sub.into(), "patch"),
        (sub.into(), "delete"),
        (format!("{sub}/dead-letters"), "get"),
        (format!("{sub}/dead-letters"), "delete"),
        (format!("{sub}/dead-letters/redrive"), "post"),
        (format!("{sub}/attempts"), "get"),
        (format!("{sub}/blocked-keys"), "get"),
        ("/v1/rooms/{room}/openapi.json".into(), "get"),
        ("/healthz".into(), "get"),
    ];
    for action in [
        "pause",
        "resume",
        "approve",
        "seek",
        "rotate-secret",
        "pull",
        "ack",
        "nack",
        "extend",
        "term",
    ] {
        required.push((format!("{sub}/{action}"), "post"));
    }
    for (path, method) in required {
        assert!(
            ops.contains(&(path.clone(), method.to_string())),
            "{method} {path} is not in the document"
        );
    }
}

/// Every `$ref` in `doc` that does not point to an existing part of `doc`.
fn dangling_refs(doc: &Value) -> Vec<String> {
    fn walk(v: &Value, root: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    let found = r
                        .strip_prefix('#')
                        .and_then(|pointer| root.pointer(pointer))
                        .is_some();
                    if !found {
                        out.push(r.clone());
                    }
                }
                map.values().for_each(|v| walk(v, root, out));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, root, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(doc, doc, &mut out);
    out
}

#[tokio::test]
async fn served_document_is_the_generated_one_and_complete() {
    let app = app().await;
    let a = call(&app, Method::GET, "/openapi.json", None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.content_type.starts_with("application/json"));
    let served = a.json();
    assert_eq!(served, serde_json::to_value(openapi()).unwrap());
    assert_eq!(served["openapi"], "3.1.0");
    assert_eq!(served["info"]["title"], "Postroom");
    assert_eq!(served["info"]["version"], env!("CARGO_PKG_VERSION"));
    let tags: Vec<&str> = served["tags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    for tag in [
        "rooms",
        "event-types",
        "events",
        "subscriptions",
        "pull",
        "dead-letters",
    ] {
        assert!(tags.contains(&tag), "tag {tag} missing from {tags:?}");
    }
    let refs = served.to_string().matches("\"$ref\"").count();
    assert!(
        refs > 50,
        "only {refs} references: are the errors documented?"
    );
    assert_eq!(dangling_refs(&served), Vec::<String>::new());

    // Operation ids are unique, so that code generators give each operation its own name.
    let mut ids: Vec<String> = operations(&served)
        .iter()
        .map(|(p, m)| {
            served["paths"][p][m]["operationId"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let total = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), total, "duplicate operation ids");

    // Errors are problem+json with the Problem schema, whose fields are what the server sends.
    let not_found = &served["components"]["responses"]["NotFound"]["content"];
    assert_eq!(
        not_found["application/problem+json"]["schema"]["$ref"],
        "#/components/schemas/Problem"
    );
    let problem = &served["components"]["schemas"]["Problem"]["properties"];
    for field in ["type", "title", "status", "detail", "code", "violations"] {
        assert!(problem.get(field).is_some(), "Problem lacks {field}");
    }
    let violation = &served["components"]["schemas"]["Violation"]["properties"];
    for field in ["instance_path", "schema_path", "message"] {
        assert!(violation.get(field).is_some(), "Violation lacks {field}");
    }
    let receipt = &served["components"]["schemas"]["PublishReceipt"]["properties"];
    for field in [
        "id",
        "room",
        "event_type",
        "key",
        "sequence",
        "received_at",
        "schema_version",
    ] {
        assert!(receipt.get(field).is_some(), "PublishReceipt lacks {field}");
    }
}

#[tokio::test]
async fn room_document_describes_each_event_type_with_its_schema() {
    let app = app().await;
    let created = call(
        &app,
        Method::POST,
        "/v1/rooms",
        Some(json!({"name": "moves"})),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let proposed = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["move_id"],
        "properties": {"move_id": {"type": "string"}, "created_at": {"type": "string"}},
    });
    let accepted = json!({"type": "object", "properties": {"move_id": {"type": "string"}}});
    for (name, schema, description) in [
        ("MoveProposed", &proposed, "A move was proposed."),
        ("MoveAccepted", &accepted, ""),
    ] {
        let a = call(
            &app,
            Method::PUT,
            &format!("/v1/rooms/moves/event-types/{name}"),
            Some(json!({"schema": schema, "description": description})),
        )
        .await;
        assert_eq!(a.status, StatusCode::CREATED);
    }

    let a = call(&app, Method::GET, "/v1/rooms/moves/openapi.json", None).await;
    assert_eq!(a.status, StatusCode::OK);
    let doc = a.json();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(operations(&doc).len(), 2);
    for (name, schema) in [("MoveProposed", &proposed), ("MoveAccepted", &accepted)] {
        let op = &doc["paths"][format!("/v1/rooms/moves/events/{name}")]["post"];
        assert!(op.is_object(), "no operation for {name}");
        // The schema is embedded exactly as registered, `$schema` and `created_at` included.
        assert_eq!(
            &op["requestBody"]["content"]["application/json"]["schema"],
            schema
        );
        let headers: Vec<&str> = op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["in"] == "header")
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert_eq!(
            headers,
            [
                "Idempotency-Key",
                "Postroom-Event-Id",
                "Postroom-Ordering-Key"
            ]
        );
        for status in [
            "201", "400", "404", "409", "413", "415", "422", "429", "503",
        ] {
            assert!(op["responses"].get(status).is_some(), "{name}: no {status}");
        }
    }
    assert_eq!(
        doc["paths"]["/v1/rooms/moves/events/MoveProposed"]["post"]["description"],
        "A move was proposed."
    );
    assert_eq!(dangling_refs(&doc), Vec::<String>::new());

    let a = call(&app, Method::GET, "/v1/rooms/nowhere/openapi.json", None).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.content_type, "application/problem+json");
    assert_eq!(a.json()["code"], "room_not_found");
}

#[tokio::test]
async fn docs_page_works_offline() {
    let app = app().await;
    let page = call(&app, Method::GET, "/docs", None).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.content_type.starts_with("text/html"));
    let html = String::from_utf8(page.bytes.clone()).unwrap();
    for needle in [
        "/docs/swagger-ui-bundle.js",
        "/docs/swagger-ui.css",
        "/openapi.json",
    ] {
        assert!(
            html.contains(needle),
            "the page does not reference {needle}"
        );
    }
    // Nothing is loaded from elsewhere.
    assert!(!html.contains("http://") && !html.contains("https://"));

    for (uri, content_type, min_len) in [
        ("/docs/swagger-ui-bundle.js", "text/javascript", 500_000),
        ("/docs/swagger-ui.css", "text/css", 50_000),
    ] {
        let a = call(&app, Method::GET, uri, None).await;
        assert_eq!(a.status, StatusCode::OK, "{uri}");
        assert!(
            a.content_type.starts_with(content_type),
            "{uri}: {}",
            a.content_type
        );
        assert!(a.bytes.len() > min_len, "{uri}: {} bytes", a.bytes.len());
        assert!(
            a.cache_control.contains("max-age="),
            "{uri}: {}",
            a.cache_control
        );
    }
}

#[test]
fn the_document_declares_the_bearer_token_on_every_operation_but_health() {
    let doc = serde_json::to_value(openapi()).unwrap();
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    for (path, method) in operations(&doc) {
        let op = &doc["paths"][&path][&method];
        if path == "/healthz" {
            assert!(op.get("security").is_none());
            continue;
        }
        assert_eq!(op["security"][0]["bearer"], json!([]), "{method} {path}");
        for code in ["401", "403"] {
            assert!(
                op["responses"].get(code).is_some(),
                "{method} {path} {code}"
            );
        }
    }
}
