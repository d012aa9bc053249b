//! What operators watch: `/metrics` in the Prometheus text format, `/readyz` and
//! `/v1/admin/system`. The metrics recorder is global to the process and the tests of this file
//! run in parallel, so each test uses its own Room and compares counters it shares with others
//! before and after, never as absolute values.
#![forbid(unsafe_code)]

mod common;
use common::local;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use broker_core::{Broker, ManualClock, Timestamp};
use broker_server::{router, ServerConfig};
use serde_json::{json, Value};
use tower::ServiceExt;

async fn broker(config: &ServerConfig) -> Broker {
    Broker::open_in_memory(
        config.broker.clone(),
        Arc::new(ManualClock::new(Timestamp(1_767_225_600_000))),
    )
    .await
    .unwrap()
}

struct Answer {
    status: StatusCode,
    content_type: String,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
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
    let status = resp.status();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    Answer {
        status,
        content_type,
        text: String::from_utf8(bytes.to_vec()).unwrap(),
    }
}

/// One sample of the text format: its name and labels.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Series {
    name: String,
    labels: BTreeMap<String, String>,
}

/// A tiny parser of the Prometheus text format: `name{label="value",...} value` lines; comments
/// and blank lines are skipped. Label values may hold `{`, `}` and `,` (route templates do) and
/// the escapes `\\`, `\"` and `\n`.
fn parse(text: &str) -> BTreeMap<Series, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).expect("a sample line");
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices();
            let mut key = String::new();
            let end = loop {
                let (i, c) = chars.next().expect("labels end with }");
                match c {
                    '}' => break i,
                    ',' | ' ' => {}
                    '=' => {
                        assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line}");
                        let mut value = String::new();
                        loop {
                            match chars.next().expect("a closing quote") {
                                (_, '"') => break,
                                (_, '\\') => match chars.next().expect("an escape").1 {
                                    'n' => value.push('\n'),
                                    other => value.push(other),
                                },
                                (_, c) => value.push(c),
                            }
                        }
                        labels.insert(std::mem::take(&mut key), value);
                    }
                    c => key.push(c),
                }
            };
            rest = &inner[end + 1..];
        }
        let value: f64 = rest.trim().parse().unwrap_or_else(|_| panic!("{line}"));
        out.insert(Series { name, labels }, value);
    }
    out
}

struct Metrics(BTreeMap<Series, f64>);

impl Metrics {
    async fn scrape(app: &axum::Router) -> Metrics {
        let a = call(app, Method::GET, "/metrics", None).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        assert!(
            a.content_type.starts_with("text/plain"),
            "{}",
            a.content_type
        );
        Metrics(parse(&a.text))
    }

    /// The value of the series with exactly these labels; 0 when absent (a counter not yet
    /// incremented is not rendered).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let key = Series {
            name: name.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        self.0.get(&key).copied().unwrap_or(0.0)
    }

    fn has(&self, name: &str) -> bool {
        self.0.keys().any(|s| s.name == name)
    }
}

/// The tests that publish through the same route template: the Prometheus recorder is global
/// to the process, so one's requests would show in the other's counts.
static PUBLISHING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn metrics_count_publishes_deliveries_and_requests() {
    let _alone = PUBLISHING.lock().await;
    let config = local();
    let app = router(broker(&config).await, &config).unwrap();
    let before = Metrics::scrape(&app).await;
    let publish_route = [
        ("route", "/v1/rooms/{room}/events/{type}"),
        ("method", "POST"),
    ];

    let room = "metricsflow";
    assert_eq!(
        call(&app, Method::POST, "/v1/rooms", Some(json!({"name": room})))
            .await
            .status,
        StatusCode::CREATED
    );
    let schema = json!({"type": "object", "required": ["move_id"], "properties": {"move_id": {"type": "string"}}});
    let ty = call(
        &app,
        Method::PUT,
        &format!("/v1/rooms/{room}/event-types/MoveProposed"),
        Some(json!({"schema": schema, "key_pointer": "/move_id"})),
    )
    .await;
    assert_eq!(ty.status, StatusCode::CREATED, "{}", ty.text);
    let sub = call(
        &app,
        Method::POST,
        &format!("/v1/rooms/{room}/subscriptions"),
        Some(json!({"mode": "pull"})),
    )
    .await;
    assert_eq!(sub.status, StatusCode::CREATED, "{}", sub.text);
    let sub = sub.json()["subscription"]["id"]
        .as_str()
        .unwrap()
        .to_string();

    let publish_uri = format!("/v1/rooms/{room}/events/MoveProposed");
    let mut statuses = Vec::new();
    for payload in [
        json!({"move_id": "A"}),
        json!({"move_id": "B"}),
        json!({"n": 1}),
    ] {
        let a = call(&app, Method::POST, &publish_uri, Some(payload)).await;
        statuses.push(a.status);
    }
    assert_eq!(statuses[2], StatusCode::UNPROCESSABLE_ENTITY);
    assert!(statuses[..2].iter().all(|s| s.is_success()), "{statuses:?}");
    let accepted = statuses[0].as_u16().to_string();

    let pulled = call(
        &app,
        Method::POST,
        &format!("/v1/subscriptions/{sub}/pull"),
        Some(json!({"max_messages": 10})),
    )
    .await;
    let msgs = pulled.json()["messages"].as_array().unwrap().clone();
    assert_eq!(msgs.len(), 2, "{}", pulled.text);
    let ack_ids: Vec<&str> = msgs.iter().map(|m| m["ack_id"].as_str().unwrap()).collect();
    let acked = call(
        &app,
        Method::POST,
        &format!("/v1/subscriptions/{sub}/ack"),
        Some(json!({"ack_ids": [ack_ids[0]]})),
    )
    .await;
    assert_eq!(acked.json()["results"][0]["ok"], true, "{}", acked.text);
    let termed = call(
        &app,
        Method::POST,
        &format!("/v1/subscriptions/{sub}/term"),
        Some(json!({"ack_ids": [ack_ids[1]]})),
    )
    .await;
    assert_eq!(termed.json()["results"][0]["ok"], true, "{}", termed.text);
    assert_eq!(
        call(&app, Method::GET, "/no/such/thing", None).await.status,
        StatusCode::NOT_FOUND
    );

    let after = Metrics::scrape(&app).await;
    let publish = |outcome: &str| {
        after.get(
            "postroom_publish_total",
            &[
                ("room", room),
                ("event_type", "MoveProposed"),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(publish("accepted"), 2.0);
    assert_eq!(publish("schema_violation"), 1.0);
    assert_eq!(publish("duplicate"), 0.0);
    let grew =
        |name: &str, labels: &[(&str, &str)]| after.get(name, labels) - before.get(name, labels);
    assert!(grew("postroom_publish_duration_seconds_count", &[]) >= 3.0);
    assert!(grew("postroom_commits_total", &[]) >= 1.0);
    assert!(grew("postroom_commit_batch_events_count", &[]) >= 1.0);

    let attempts = |outcome: &str| {
        after.get(
            "postroom_delivery_attempts_total",
            &[("subscription", &sub), ("outcome", outcome)],
        )
    };
    assert_eq!(attempts("leased"), 2.0);
    assert_eq!(attempts("acked"), 1.0);
    assert_eq!(attempts("terminated"), 1.0);
    assert_eq!(attempts("nacked"), 0.0);
    assert_eq!(
        after.get(
            "postroom_dead_lettered_total",
            &[("subscription", &sub), ("reason", "terminated")]
        ),
        1.0
    );
    assert!(grew("postroom_delivery_latency_seconds_count", &[]) >= 1.0);

    assert_eq!(
        after.get("postroom_backlog", &[("subscription", &sub)]),
        0.0
    );
    assert!(after.has("postroom_backlog"));
    assert_eq!(
        after.get("postroom_dead_letters", &[("subscription", &sub)]),
        1.0
    );
    // The broker is in memory: no file.
    assert_eq!(after.get("postroom_database_bytes", &[]), 0.0);

    let requests = |status: &str| {
        let labels: Vec<(&str, &str)> = publish_route
            .iter()
            .copied()
            .chain([("status", status)])
            .collect();
        grew("postroom_http_requests_total", &labels)
    };
    assert_eq!(requests(&accepted), 2.0);
    assert_eq!(requests("422"), 1.0);
    assert!(
        grew(
            "postroom_http_request_duration_seconds_count",
            &publish_route
        ) >= 3.0
    );
    assert!(
        grew(
            "postroom_http_requests_total",
            &[("route", "unmatched"), ("method", "GET"), ("status", "404")]
        ) >= 1.0
    );
    // Raw paths never become labels.
    assert!(!after.0.keys().any(|s| s
        .labels
        .values()
        .any(|v| v.contains(&sub) && v.contains('/'))));
}

#[tokio::test]
async fn a_backlog_shows_in_the_gauge_and_unknown_rooms_are_not_labels() {
    let _alone = PUBLISHING.lock().await;
    let config = local();
    let app = router(broker(&config).await, &config).unwrap();
    let room = "metricsbacklog";
    call(&app, Method::POST, "/v1/rooms", Some(json!({"name": room}))).await;
    call(
        &app,
        Method::PUT,
        &format!("/v1/rooms/{room}/event-types/Ping"),
        Some(json!({"schema": {"type": "object"}})),
    )
    .await;
    let sub = call(
        &app,
        Method::POST,
        &format!("/v1/rooms/{room}/subscriptions"),
        Some(json!({"mode": "pull"})),
    )
    .await
    .json()["subscription"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    for _ in 0..3 {
        let a = call(
            &app,
            Method::POST,
            &format!("/v1/rooms/{room}/events/Ping"),
            Some(json!({})),
        )
        .await;
        assert!(a.status.is_success(), "{}", a.text);
    }
    let missing = call(
        &app,
        Method::POST,
        "/v1/rooms/nosuchroomformetrics/events/Ping",
        Some(json!({})),
    )
    .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let m = Metrics::scrape(&app).await;
    assert_eq!(m.get("postroom_backlog", &[("subscription", &sub)]), 3.0);
    assert_eq!(
        m.get("postroom_dead_letters", &[("subscription", &sub)]),
        0.0
    );
    assert!(m.has("postroom_dead_letters"));
    assert!(
        !m.0.keys()
            .any(|s| s.labels.values().any(|v| v == "nosuchroomformetrics")),
        "a caller's unknown Room name must not become a series"
    );
    assert!(
        m.get(
            "postroom_publish_total",
            &[
                ("room", "-"),
                ("event_type", "-"),
                ("outcome", "room_not_found")
            ]
        ) >= 1.0
    );
}

#[tokio::test]
async fn readyz_answers_ready_until_the_broker_closes() {
    let config = local();
    let broker = broker(&config).await;
    let app = router(broker.clone(), &config).unwrap();
    let ready = call(&app, Method::GET, "/readyz", None).await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.json(), json!({"ready": true}));
    broker.close().await;
    let closed = call(&app, Method::GET, "/readyz", None).await;
    assert_eq!(closed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(closed.content_type, "application/problem+json");
    let body = closed.json();
    assert_eq!(body["code"], "not_ready");
    let reasons = body["reasons"].as_array().unwrap();
    assert!(
        reasons.iter().any(|r| r == "the broker is shutting down"),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r == "the storage writer has stopped"),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn system_reports_the_host() {
    let config = local();
    let app = router(broker(&config).await, &config).unwrap();
    let a = call(&app, Method::GET, "/v1/admin/system", None).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let v = a.json();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["uptime_seconds"].as_u64().is_some());
    assert_eq!(v["os"], std::env::consts::OS);
    assert_eq!(v["arch"], std::env::consts::ARCH);
    assert!(v["cpu_count"].as_u64().unwrap() >= 1);
    assert!(
        v["requests_in_flight"].as_i64().unwrap() >= 1,
        "this request"
    );
    assert!(v["disk_free_bytes"].as_u64().is_some(), "{v}");
    if cfg!(target_os = "linux") {
        let load = v["load_average"].as_array().unwrap();
        assert_eq!(load.len(), 3);
        assert!(load.iter().all(|l| l.as_f64().unwrap() >= 0.0));
        let total = v["memory_total_bytes"].as_u64().unwrap();
        let available = v["memory_available_bytes"].as_u64().unwrap();
        assert!(total > 0 && available <= total, "{v}");
        let rss = v["process_resident_bytes"].as_u64().unwrap();
        assert!(rss > 0 && rss < total, "{v}");
    }
}

#[tokio::test]
async fn metrics_and_readyz_are_public_and_system_is_not() {
    // Authentication on: no token at all.
    let config = ServerConfig::default();
    let app = router(broker(&config).await, &config).unwrap();
    assert_eq!(
        call(&app, Method::GET, "/metrics", None).await.status,
        StatusCode::OK
    );
    assert_eq!(
        call(&app, Method::GET, "/readyz", None).await.status,
        StatusCode::OK
    );
    assert_eq!(
        call(&app, Method::GET, "/v1/admin/system", None)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
}
