//! The operators' API: `GET /v1/admin/stats`, the message log `GET /v1/admin/messages`, and the
//! running configuration `GET|PATCH /v1/admin/config`, plus the queue gauges of `/metrics`.
//! Guards against figures that do not move when the broker works: each test publishes, fails,
//! leases and dead-letters deliveries, then checks that the numbers say exactly that.
#![forbid(unsafe_code)]

mod common;
use common::local;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use broker_core::{Broker, ManualClock, Timestamp};
use broker_server::{router, ServerConfig};
use serde_json::{json, Value};
use tower::ServiceExt;

const START: Timestamp = Timestamp(1_767_225_600_000);

struct Ops {
    app: axum::Router,
    clock: Arc<ManualClock>,
}

struct Answer {
    status: StatusCode,
    body: Value,
    text: String,
}

impl Ops {
    async fn new(config: ServerConfig) -> Ops {
        let clock = Arc::new(ManualClock::new(START));
        let broker = Broker::open_in_memory(config.broker.clone(), clock.clone())
            .await
            .unwrap();
        Ops {
            app: router(broker, &config).unwrap(),
            clock,
        }
    }

    async fn call(&self, method: Method, uri: &str, body: Option<Value>) -> Answer {
        let mut req = Request::builder().method(method).uri(uri);
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let resp = self
            .app
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        Answer {
            status,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
            text,
        }
    }

    async fn ok(&self, method: Method, uri: &str, body: Option<Value>) -> Value {
        let a = self.call(method.clone(), uri, body).await;
        assert!(
            a.status.is_success(),
            "{method} {uri}: {} {}",
            a.status,
            a.text
        );
        a.body
    }

    /// A Room `room` with event type `Moved` keyed by `/move_id`.
    async fn room(&self, room: &str) {
        self.ok(Method::POST, "/v1/rooms", Some(json!({"name": room})))
            .await;
        let schema = json!({"type": "object", "required": ["move_id"],
            "properties": {"move_id": {"type": "string"}}});
        self.ok(
            Method::PUT,
            &format!("/v1/rooms/{room}/event-types/Moved"),
            Some(json!({"schema": schema, "key_pointer": "/move_id"})),
        )
        .await;
    }

    async fn subscribe(&self, room: &str, body: Value) -> String {
        let created = self
            .ok(
                Method::POST,
                &format!("/v1/rooms/{room}/subscriptions"),
                Some(body),
            )
            .await;
        created["subscription"]["id"].as_str().unwrap().to_string()
    }

    async fn publish(&self, room: &str, move_id: &str) -> Answer {
        self.call(
            Method::POST,
            &format!("/v1/rooms/{room}/events/Moved"),
            Some(json!({"move_id": move_id})),
        )
        .await
    }

    /// Polls `uri` until `done` holds of its body. Push attempts run on the broker's own tasks,
    /// which tell nobody outside when they finish; a scan every few milliseconds costs nothing
    /// next to the deadline.
    async fn until(&self, uri: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let body = self.ok(Method::GET, uri, None).await;
            if done(&body) {
                return body;
            }
            assert!(Instant::now() < deadline, "{uri} never got there: {body}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn sub_stats<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("subscription {id} not in {report}"))
}

/// One metric's value in the text format, by name and one label; 0 when absent.
fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse().unwrap())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_and_metrics_follow_publishes_failures_leases_and_dead_letters() {
    let mut config = local();
    config.broker.delivery.push_allow.loopback = true;
    let ops = Ops::new(config).await;
    let room = "opsstats";
    ops.room(room).await;
    // Nothing listens on port 9 (discard): every push fails, and with one attempt allowed each
    // failure is a dead letter.
    let push = ops
        .subscribe(
            room,
            json!({"mode": "push", "push": {"url": "http://127.0.0.1:9/hook"},
                   "retry": {"attempts_max": 1}}),
        )
        .await;
    let pull = ops.subscribe(room, json!({"mode": "pull"})).await;

    for m in ["a", "b", "c", "a", "e"] {
        assert!(ops.publish(room, m).await.status.is_success());
    }
    let refused = ops
        .call(
            Method::POST,
            &format!("/v1/rooms/{room}/events/Moved"),
            Some(json!({"n": 1})),
        )
        .await;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);

    // The push subscription dead-letters all five. The counters are waited for, not the
    // stored dead letters: they are counted just after the commit that stores them.
    let stats_uri = format!("/v1/admin/stats?subscription={push}");
    let report = ops
        .until(&stats_uri, |r| {
            sub_stats(r, &push)["attempts_total"]["dead_lettered"] == 5
        })
        .await;
    assert_eq!(sub_stats(&report, &push)["dead_letters"], 5);
    let s = sub_stats(&report, &push);
    assert_eq!(s["backlog"], 0);
    assert_eq!(s["attempts_total"]["failed"], 5, "{s}");
    assert_eq!(s["attempts_total"]["dead_lettered"], 5, "{s}");
    assert_eq!(
        s["last_minute"]["failed"], 10,
        "five failures and five dead letters: {s}"
    );
    assert_eq!(s["last_minute"]["ok"], 0);
    assert_eq!(s["mode"], "push");

    // The pull subscription: lease two, acknowledge one 20 s after publishing.
    let pulled = ops
        .ok(
            Method::POST,
            &format!("/v1/subscriptions/{pull}/pull"),
            Some(json!({"max_messages": 2})),
        )
        .await;
    let msgs = pulled["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2, "{pulled}");
    ops.clock.advance_ms(20_000);
    ops.ok(
        Method::POST,
        &format!("/v1/subscriptions/{pull}/ack"),
        Some(json!({"ack_ids": [msgs[0]["ack_id"]]})),
    )
    .await;
    let report = ops.ok(Method::GET, "/v1/admin/stats", None).await;
    let s = sub_stats(&report, &pull);
    assert_eq!(s["attempts_total"]["acked"], 1, "{s}");
    assert_eq!(s["last_minute"]["ok"], 1, "{s}");
    // Acknowledged 20 s after publishing (the histogram is exact to about 19%).
    let p50 = s["last_minute"]["latency"]["p50_ms"].as_f64().unwrap();
    assert!((16_000.0..=24_000.0).contains(&p50), "{s}");
    assert_eq!(s["in_flight"], 1, "the second lease runs: {s}");
    let r = report["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["room"] == room)
        .unwrap();
    assert_eq!(r["publishes_total"]["accepted"], 5, "{r}");
    assert_eq!(r["publishes_total"]["schema_violation"], 1, "{r}");
    assert_eq!(r["events_stored"], 5);
    assert_eq!(r["last_minute"]["ok"], 5, "{r}");
    assert_eq!(r["last_minute"]["failed"], 1, "{r}");
    assert!(r["last_minute"]["latency"]["p99_ms"].as_f64().unwrap() > 0.0);

    // 70 s later the second lease (30 s) has run out; the next pull notices, and leases another.
    ops.clock.advance_ms(70_000);
    let again = ops
        .ok(
            Method::POST,
            &format!("/v1/subscriptions/{pull}/pull"),
            Some(json!({"max_messages": 1})),
        )
        .await;
    assert_eq!(again["messages"].as_array().unwrap().len(), 1, "{again}");
    let report = ops.ok(Method::GET, "/v1/admin/stats", None).await;
    let s = sub_stats(&report, &pull);
    assert_eq!(s["backlog"], 4, "{s}");
    assert_eq!(s["attempts_total"]["leased"], 3, "{s}");
    assert_eq!(s["attempts_total"]["lease_expired"], 1, "{s}");
    assert_eq!(s["in_flight"], 1, "{s}");
    // The expired lease is a failure of its key's head: that key is blocked until retried.
    assert_eq!(s["blocked_keys"], 1, "{s}");
    assert_eq!(s["oldest_undelivered_age_ms"], 90_000, "{s}");
    assert_eq!(s["queue_scan_complete"], true);
    let r = report["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["room"] == room)
        .unwrap();
    assert_eq!(r["publishes_total"]["accepted"], 5, "totals stay: {r}");
    assert_eq!(
        r["last_minute"]["ok"], 0,
        "the publishes left the window: {r}"
    );
    assert!(report["totals"]["backlog"].as_u64().unwrap() >= 4);

    // Filters: by status, by application, by member.
    let paused = ops
        .ok(Method::GET, "/v1/admin/stats?status=paused", None)
        .await;
    assert!(
        paused["subscriptions"].as_array().unwrap().is_empty(),
        "{paused}"
    );
    let nobody = ops
        .ok(
            Method::GET,
            "/v1/admin/stats?application=XX/YY/ZZ/nobody",
            None,
        )
        .await;
    assert!(nobody["subscriptions"].as_array().unwrap().is_empty());
    let bad = ops
        .call(Method::GET, "/v1/admin/stats?status=sleepy", None)
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.text);
    let unknown = ops
        .call(Method::GET, "/v1/admin/stats?colour=red", None)
        .await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST, "{}", unknown.text);

    // A failing push makes a blocked key; the gauges show the queue.
    let blocking = ops
        .subscribe(
            room,
            json!({"mode": "push", "push": {"url": "http://127.0.0.1:9/hook"},
                   "retry": {"attempts_max": 5, "initial_delay_ms": 3_600_000, "delay_ms_max": 3_600_000}}),
        )
        .await;
    assert!(ops.publish(room, "d").await.status.is_success());
    assert!(ops.publish(room, "d").await.status.is_success());
    let report = ops
        .until(&format!("/v1/admin/stats?subscription={blocking}"), |r| {
            sub_stats(r, &blocking)["blocked_keys"] == 1
        })
        .await;
    assert_eq!(sub_stats(&report, &blocking)["backlog"], 2);
    ops.clock.advance_ms(5_000);
    let text = ops.call(Method::GET, "/metrics", None).await.text;
    let label = format!("subscription=\"{blocking}\"");
    assert_eq!(
        metric(&text, "postroom_blocked_keys", &label),
        1.0,
        "{text}"
    );
    assert_eq!(metric(&text, "postroom_backlog", &label), 2.0);
    assert_eq!(
        metric(&text, "postroom_oldest_undelivered_age_seconds", &label),
        5.0
    );
    let pull_label = format!("subscription=\"{pull}\"");
    assert_eq!(metric(&text, "postroom_blocked_keys", &pull_label), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_message_log_finds_events_by_subscriber_status_and_key_page_by_page() {
    let mut config = local();
    config.broker.delivery.push_allow.loopback = true;
    let ops = Ops::new(config).await;
    for room in ["opslog1", "opslog2"] {
        ops.room(room).await;
    }
    let pull1 = ops.subscribe("opslog1", json!({"mode": "pull"})).await;
    let pull2 = ops.subscribe("opslog1", json!({"mode": "pull"})).await;
    let dead = ops
        .subscribe(
            "opslog2",
            json!({"mode": "push", "push": {"url": "http://127.0.0.1:9/hook"},
                   "retry": {"attempts_max": 1}}),
        )
        .await;
    let mut ids = Vec::new();
    for m in ["m1", "m2", "m3"] {
        let a = ops.publish("opslog1", m).await;
        ids.push(a.body["id"].as_str().unwrap().to_string());
    }
    assert!(ops.publish("opslog2", "x").await.status.is_success());
    ops.until(&format!("/v1/admin/stats?subscription={dead}"), |r| {
        sub_stats(r, &dead)["dead_letters"] == 1
    })
    .await;
    // pull1 acknowledges m1.
    let pulled = ops
        .ok(
            Method::POST,
            &format!("/v1/subscriptions/{pull1}/pull"),
            Some(json!({"max_messages": 1})),
        )
        .await;
    ops.ok(
        Method::POST,
        &format!("/v1/subscriptions/{pull1}/ack"),
        Some(json!({"ack_ids": [pulled["messages"][0]["ack_id"]]})),
    )
    .await;

    // One event, everything about it.
    let m1 = ops
        .ok(Method::GET, "/v1/admin/messages?room=opslog1&key=m1", None)
        .await;
    let items = m1["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{m1}");
    let e = &items[0];
    assert_eq!(e["id"], ids[0]);
    assert_eq!(e["event_type"], "Moved");
    assert_eq!(e["sequence"], 1);
    assert_eq!(
        e["payload_bytes"],
        json!({"move_id": "m1"}).to_string().len()
    );
    assert!(e.get("payload").is_none(), "payloads are off by default");
    assert_eq!(
        e["summary"]["text"],
        "delivered to 1 of 2 subscriptions, 1 pending"
    );
    assert_eq!(e["deliveries"].as_array().unwrap().len(), 2);

    // Across Rooms: the dead letter is found by status alone.
    let dead_found = ops
        .ok(Method::GET, "/v1/admin/messages?status=dead_lettered", None)
        .await;
    let items = dead_found["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{dead_found}");
    assert_eq!(items[0]["room"], "opslog2");
    assert_eq!(items[0]["summary"]["dead_lettered"], 1);

    // By subscription and status: pull1 still owes m2 and m3; pull2 owes all three.
    let owed = |sub: &str| format!("/v1/admin/messages?subscription={sub}&status=undelivered");
    let p1 = ops.ok(Method::GET, &owed(&pull1), None).await;
    assert_eq!(p1["items"].as_array().unwrap().len(), 2, "{p1}");
    let p2 = ops.ok(Method::GET, &owed(&pull2), None).await;
    assert_eq!(p2["items"].as_array().unwrap().len(), 3, "{p2}");
    let delivered = ops
        .ok(
            Method::GET,
            &format!("/v1/admin/messages?subscription={pull1}&status=delivered"),
            None,
        )
        .await;
    assert_eq!(delivered["items"][0]["id"], ids[0], "{delivered}");

    // Page by page across both Rooms, one event at a time: four events, then the end.
    let mut seen = Vec::new();
    let mut uri = "/v1/admin/messages?limit=1".to_string();
    loop {
        let page = ops.ok(Method::GET, &uri, None).await;
        for item in page["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => uri = format!("/v1/admin/messages?limit=1&cursor={c}"),
            None => break,
        }
        assert!(seen.len() <= 4, "the listing does not end: {seen:?}");
    }
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(&seen[..3], &ids[..]);

    // By time: nothing before the start.
    let early = ops
        .ok(
            Method::GET,
            "/v1/admin/messages?until=2025-01-01T00:00:00Z",
            None,
        )
        .await;
    assert!(early["items"].as_array().unwrap().is_empty());

    // Bad input is named.
    for (q, name) in [
        ("status=lost", "status"),
        ("since=yesterday", "since"),
        ("cursor=zzz", "cursor"),
        ("subscription=nope", "subscription"),
    ] {
        let a = ops
            .call(Method::GET, &format!("/v1/admin/messages?{q}"), None)
            .await;
        assert!(a.status.is_client_error(), "{q}: {}", a.text);
        assert!(a.text.contains(name), "{q}: {}", a.text);
    }
    let payload = ops
        .call(Method::GET, "/v1/admin/messages?payload=true", None)
        .await;
    assert_eq!(payload.status, StatusCode::FORBIDDEN, "{}", payload.text);
}

#[tokio::test]
async fn payloads_show_in_the_message_log_only_when_configured() {
    let mut config = local();
    config.observability.message_log_payloads = true;
    let ops = Ops::new(config).await;
    ops.room("opspayload").await;
    assert!(ops.publish("opspayload", "p1").await.status.is_success());
    let page = ops
        .ok(
            Method::GET,
            "/v1/admin/messages?room=opspayload&payload=true",
            None,
        )
        .await;
    assert_eq!(page["items"][0]["payload"], json!({"move_id": "p1"}));
}

#[tokio::test]
async fn the_running_configuration_changes_without_a_restart_and_is_audited() {
    let config = local();
    let ops = Ops::new(config).await;
    let before = ops.ok(Method::GET, "/v1/admin/config", None).await;
    assert_eq!(before["broker"]["delivery"]["retry"]["attempts_max"], 25);

    let patch = json!({
        "delivery": {"retry": {"attempts_max": 3, "initial_delay_ms": 10}},
        "limits": {"payload_bytes_max": 64}
    });
    let after = ops
        .ok(Method::PATCH, "/v1/admin/config", Some(patch.clone()))
        .await;
    assert_eq!(after["broker"]["delivery"]["retry"]["attempts_max"], 3);
    assert_eq!(after["broker"]["delivery"]["retry"]["initial_delay_ms"], 10);
    assert_eq!(
        after["broker"]["delivery"]["retry"]["multiplier"],
        before["broker"]["delivery"]["retry"]["multiplier"],
        "what the patch does not name stays"
    );

    // In force at once: a new subscription's policy, and the payload limit.
    ops.room("opsconfig").await;
    let created = ops
        .ok(
            Method::POST,
            "/v1/rooms/opsconfig/subscriptions",
            Some(json!({"mode": "pull"})),
        )
        .await;
    assert_eq!(
        created["subscription"]["retry_effective"]["attempts_max"],
        3
    );
    let big = ops.publish("opsconfig", &"x".repeat(100)).await;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", big.text);
    assert!(ops.publish("opsconfig", "ok").await.status.is_success());

    // Refused whole, by name: out of range, unknown, or fixed at start.
    for (bad, name) in [
        (
            json!({"delivery": {"retry": {"multiplier": 0.5}}}),
            "multiplier",
        ),
        (
            json!({"limits": {"batch_events_max": 0}}),
            "batch_events_max",
        ),
        (json!({"writer": {"commit_ops_max": 1}}), "writer"),
        (
            json!({"limits": {"payload_bytes_max": 10}, "delivery": {"lease_ms_default": 0}}),
            "lease_ms_default",
        ),
    ] {
        let a = ops.call(Method::PATCH, "/v1/admin/config", Some(bad)).await;
        assert!(a.status.is_client_error(), "{}", a.text);
        assert!(a.text.contains(name), "{name}: {}", a.text);
    }
    let now = ops.ok(Method::GET, "/v1/admin/config", None).await;
    assert_eq!(
        now["broker"]["limits"]["payload_bytes_max"], 64,
        "a refused patch changes nothing"
    );

    // Audited, with the patch as sent, and the refusals too.
    let audit = ops
        .ok(
            Method::GET,
            "/v1/admin/audit?action=PATCH%20/v1/admin/config",
            None,
        )
        .await;
    let entries = audit["items"].as_array().unwrap();
    assert_eq!(entries.len(), 5, "{audit}");
    assert_eq!(entries[0]["outcome"], "success");
    assert_eq!(entries[0]["detail"], patch);
    assert!(entries[1..].iter().all(|e| e["outcome"] == "failure"));
}

/// Sends one keep-alive request on `conn` and returns the JSON body of the answer.
async fn get_on(conn: &mut tokio::net::TcpStream, path: &str) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // Reads until the head and a body of the announced length are in.
    loop {
        let n = conn.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(head_end) = text.find("\r\n\r\n") {
            let length: usize = text[..head_end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .expect("a content-length");
            if buf.len() >= head_end + 4 + length {
                // `/healthz` answers plain text: Null then.
                return serde_json::from_slice(&buf[head_end + 4..head_end + 4 + length])
                    .unwrap_or(Value::Null);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_are_counted_idle_ones_included() {
    let served = common::Served::start(local()).await;
    let addr = served.addr;
    let mut a = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The idle connection is counted once the server has accepted it; it answers a request on
    // it to be sure of that, then stays idle.
    get_on(&mut idle, "/healthz").await;
    let info = get_on(&mut a, "/v1/admin/system").await;
    assert_eq!(info["connections_open"], 2, "{info}");
    // Other tests of this file make requests too (in flight is per process): this one at least.
    assert!(info["requests_in_flight"].as_i64().unwrap() >= 1, "{info}");
    drop(idle);
    // The server notices a closed connection when it next reads it, at a time of its own: poll.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = get_on(&mut a, "/v1/admin/system").await;
        if info["connections_open"] == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the closed connection stays counted: {info}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(a);
    served.stop().await;
}
