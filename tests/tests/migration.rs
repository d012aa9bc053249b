//! Data files of the previous release (storage layout 1: typed redb tables) are migrated in place
//! when they are opened, and nothing in them is lost. The fixture is a real file written by that
//! release's server (`tests/fixtures/layout1/make-fixture.sh`), with `expected.json`, what that
//! server answered to every read just before it stopped. The broker here opens a copy, is served
//! over HTTP with authentication on, and must answer every one of those reads identically; then
//! the stored state must still work: sequences continue without a repeat, idempotency keys and
//! remembered answers still deduplicate, the API clients still log in with their rights, leases
//! and nack delays run out when they should, and deleted Rooms and subscriptions are purged.
#![forbid(unsafe_code)]

use std::sync::Arc;

use broker_core::{Broker, ManualClock, Timestamp};
use broker_server::ServerConfig;
use postroom_tests::test_config;
use reqwest::{Client, Method};
use serde_json::{json, Value};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/layout1");

struct Server {
    http: Client,
    base: String,
}

impl Server {
    async fn token(&self, id: &str, secret: &str) -> String {
        let resp = self
            .http
            .post(format!("{}/oauth/token", self.base))
            .basic_auth(id, Some(secret))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials")
            .send()
            .await
            .expect("token request");
        assert_eq!(resp.status().as_u16(), 200, "`{id}` logs in");
        let v: Value = resp.json().await.expect("token JSON");
        v["access_token"].as_str().expect("a token").to_string()
    }

    /// Sends a request; returns the status, the `postroom-duplicate` header and the JSON body.
    async fn call(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (u16, bool, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let duplicate = resp.headers().get("postroom-duplicate").is_some();
        let text = resp.text().await.expect("body");
        let json = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
        };
        (status, duplicate, json)
    }

    async fn get(&self, token: &str, path: &str) -> Value {
        let (status, _, body) = self.call(token, Method::GET, path, None, &[]).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// Publishes a move exactly as the fixture script did (same bytes).
    async fn publish_move(
        &self,
        token: &str,
        key: &str,
        n: u64,
        headers: &[(&str, &str)],
    ) -> (u16, bool, Value) {
        let body =
            format!(r#"{{"move_id":"{key}","n":{n},"from":"brook house","to":"tinsley house"}}"#);
        self.call(
            token,
            Method::POST,
            "/v1/rooms/moves/events/MoveProposed",
            Some(&body),
            headers,
        )
        .await
    }

    async fn pull(&self, token: &str, sub: &str) -> Vec<Value> {
        let (status, _, body) = self
            .call(
                token,
                Method::POST,
                &format!("/v1/subscriptions/{sub}/pull"),
                Some(r#"{"max_messages":10}"#),
                &[],
            )
            .await;
        assert_eq!(status, 200, "pull: {body}");
        body["messages"].as_array().expect("messages").clone()
    }

    async fn ack(&self, token: &str, sub: &str, messages: &[Value]) {
        let ids: Vec<&Value> = messages.iter().map(|m| &m["ack_id"]).collect();
        let (status, _, body) = self
            .call(
                token,
                Method::POST,
                &format!("/v1/subscriptions/{sub}/ack"),
                Some(&json!({ "ack_ids": ids }).to_string()),
                &[],
            )
            .await;
        assert_eq!(status, 200, "ack: {body}");
    }
}

/// `v` with every whole float written as an integer: the fixture's `expected.json` went through
/// jq, which writes `2.0` as `2`, and the two are different `Value`s.
fn whole_numbers(v: Value) -> Value {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 9e15 => json!(f as i64),
            _ => Value::Number(n),
        },
        Value::Array(a) => Value::Array(a.into_iter().map(whole_numbers).collect()),
        Value::Object(o) => {
            Value::Object(o.into_iter().map(|(k, v)| (k, whole_numbers(v))).collect())
        }
        other => other,
    }
}

/// (key, sequence, attempt) of pulled messages, sorted.
fn pulled(messages: &[Value]) -> Vec<(String, u64, u64)> {
    let mut v: Vec<(String, u64, u64)> = messages
        .iter()
        .map(|m| {
            (
                m["event"]["key"].as_str().expect("key").to_string(),
                m["event"]["sequence"].as_u64().expect("sequence"),
                m["attempt"].as_u64().expect("attempt"),
            )
        })
        .collect();
    v.sort();
    v
}

/// The previous release's data file opens with everything in it: each read the old server
/// answered is answered the same, and the migrated state keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_file_of_the_previous_release_is_migrated_and_loses_nothing() {
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{FIXTURE}/expected.json")).expect("expected.json"),
    )
    .expect("expected.json parses");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("postroom.redb");
    std::fs::copy(format!("{FIXTURE}/postroom.redb"), &path).expect("copy the fixture");
    // A minute after the old server stopped: its leases (10 minutes) and nack delay (an hour)
    // still run.
    let stopped = Timestamp(expected["captured_at_ms"].as_u64().expect("captured_at_ms"));
    let clock = ManualClock::new(stopped.plus_ms(60_000));
    let broker = Broker::open_with_clock(&path, test_config(), Arc::new(clock.clone()))
        .await
        .expect("the layout-1 file opens");
    let config = ServerConfig {
        broker: test_config(),
        ..ServerConfig::default()
    };
    let app = broker_server::router(broker.clone(), &config).expect("router");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let s = Server {
        http: Client::new(),
        base,
    };
    // The administrator's client, its Argon2 hash and the token signing keys survived.
    let admin_secret = expected["admin_secret"].as_str().expect("secret");
    let admin = s.token("admin", admin_secret).await;

    // 1. Every read the old server answered, answered the same: Rooms, event types and schemas,
    //    every event with its key, sequence and payload, each event's delivery state per
    //    subscription, subscriptions with their backlog and dead-letter counts, dead letters
    //    with their reasons, attempt logs, blocked keys, identities, rights, signing keys and
    //    the audit log.
    let reads = expected["reads"].as_object().expect("reads");
    assert!(reads.len() > 40, "the fixture's reads");
    for (path, want) in reads {
        let got = whole_numbers(s.get(&admin, path).await);
        assert_eq!(
            got,
            whole_numbers(want.clone()),
            "GET {path} differs from the previous release's answer"
        );
    }

    // What the fixture script made, stated (the reads above hold the details).
    let pull_sub = expected["pull"].as_str().expect("pull id");
    let push_sub = expected["push"].as_str().expect("push id");
    let rooms = s.get(&admin, "/v1/rooms").await;
    let names: Vec<&str> = rooms["items"]
        .as_array()
        .expect("rooms")
        .iter()
        .map(|r| r["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["moves", "notes"]);
    let moves = s.get(&admin, "/v1/rooms/moves").await;
    assert_eq!(
        (moves["ordered"].clone(), moves["events_stored"].clone()),
        (json!(true), json!(20))
    );
    let ty = s
        .get(&admin, "/v1/rooms/moves/event-types/MoveProposed")
        .await;
    assert_eq!(ty["key_pointer"], "/move_id", "{ty}");
    assert_eq!(ty["schema"]["required"], json!(["move_id", "n"]), "{ty}");
    let events = s.get(&admin, "/v1/rooms/moves/events?limit=1000").await;
    let mut last = std::collections::BTreeMap::<String, u64>::new();
    for item in events["items"].as_array().expect("events") {
        let key = item["event"]["key"].as_str().expect("key").to_string();
        let seq = item["event"]["sequence"].as_u64().expect("sequence");
        assert_eq!(item["payload"]["move_id"], key.as_str());
        assert_eq!(
            item["payload"]["n"], seq,
            "n is the sequence in the fixture"
        );
        let prev = last.insert(key.clone(), seq).unwrap_or(0);
        assert_eq!(seq, prev + 1, "{key}: sequences in order without gaps");
    }
    assert_eq!(
        last.into_iter().collect::<Vec<_>>(),
        [("M1".into(), 7), ("M2".into(), 7), ("M3".into(), 6)]
    );
    let sub = s
        .get(&admin, &format!("/v1/subscriptions/{pull_sub}"))
        .await;
    assert_eq!(
        (sub["backlog"].clone(), sub["dead_letters"].clone()),
        (json!(15), json!(1))
    );
    let sub = s
        .get(&admin, &format!("/v1/subscriptions/{push_sub}"))
        .await;
    assert_eq!(
        (
            sub["status"].clone(),
            sub["backlog"].clone(),
            sub["dead_letters"].clone()
        ),
        (json!("paused"), json!(8), json!(12))
    );
    let dead = s
        .get(
            &admin,
            &format!("/v1/subscriptions/{pull_sub}/dead-letters"),
        )
        .await;
    assert_eq!(dead["items"][0]["reason"], "terminated", "{dead}");
    let dead = s
        .get(
            &admin,
            &format!("/v1/subscriptions/{push_sub}/dead-letters?limit=100"),
        )
        .await;
    for d in dead["items"].as_array().expect("dead letters") {
        assert_eq!(d["reason"], "attempts_exhausted", "{d}");
        assert_eq!(d["attempts"], 2, "{d}");
    }
    let attempts = s
        .get(
            &admin,
            &format!("/v1/subscriptions/{push_sub}/attempts?limit=1000"),
        )
        .await;
    assert_eq!(attempts["items"].as_array().expect("attempts").len(), 24);

    // 2. Sequences continue without a repeat: from the checkpointed counters, from the Room log
    //    after the checkpoint, and for `notes`' key whose first events retention removed.
    for (key, next) in [("M1", 8), ("M2", 8), ("M3", 7)] {
        let (status, dup, receipt) = s.publish_move(&admin, key, 100, &[]).await;
        assert_eq!((status, dup), (201, false), "{receipt}");
        assert_eq!(receipt["sequence"], next, "{key}: {receipt}");
    }
    let (status, _, receipt) = s
        .call(
            &admin,
            Method::POST,
            "/v1/rooms/notes/events/note",
            Some(r#"{"text":"after the migration"}"#),
            &[("Postroom-Ordering-Key", "n1")],
        )
        .await;
    assert_eq!(
        (status, receipt["sequence"].clone()),
        (201, json!(6)),
        "{receipt}"
    );

    // 3. The idempotency key of the fifth move still deduplicates (the first receipt, nothing
    //    stored), and still refuses another request under the same key.
    let first = reads["/v1/rooms/moves/events?limit=1000"]["items"]
        .as_array()
        .expect("events")
        .iter()
        .find(|i| i["event"]["idempotency_key"] == "move-m2-2")
        .expect("the event published with an idempotency key")["event"]
        .clone();
    let key = [("Idempotency-Key", "move-m2-2")];
    let (status, dup, receipt) = s.publish_move(&admin, "M2", 2, &key).await;
    assert_eq!((status, dup), (201, true), "{receipt}");
    assert_eq!(
        (receipt["id"].clone(), receipt["sequence"].clone()),
        (first["id"].clone(), json!(2))
    );
    let (status, _, refused) = s.publish_move(&admin, "M2", 3, &key).await;
    assert_eq!(
        (status, refused["code"].clone()),
        (409, json!("idempotency_conflict"))
    );
    // The remembered answer of the pull subscription's creation is replayed, creating nothing.
    let (status, _, replay) = s
        .call(
            &admin,
            Method::POST,
            "/v1/rooms/moves/subscriptions",
            Some(r#"{"mode":"pull"}"#),
            &[("Idempotency-Key", "create-pull-1")],
        )
        .await;
    assert_eq!(
        (status, replay["subscription"]["id"].clone()),
        (201, json!(pull_sub)),
        "{replay}"
    );
    let subs = s.get(&admin, "/v1/rooms/moves/subscriptions").await;
    assert_eq!(
        subs["items"].as_array().expect("subscriptions").len(),
        2,
        "{subs}"
    );

    // 4. The application's API client logs in and keeps its right: key M1 only.
    let billing = s
        .token(
            "billing",
            expected["billing_secret"].as_str().expect("secret"),
        )
        .await;
    let (status, _, receipt) = s.publish_move(&billing, "M1", 200, &[]).await;
    assert_eq!(
        (status, receipt["sequence"].clone()),
        (201, json!(9)),
        "{receipt}"
    );
    let (status, _, refused) = s.publish_move(&billing, "M2", 200, &[]).await;
    assert_eq!(
        (status, refused["code"].clone()),
        (403, json!("key_not_allowed"))
    );

    // 5. The pull subscription's queue: M1 and M3 are leased (3rd events) and M2's head is
    //    nacked for an hour, so nothing is ready yet; the leases run out after ten minutes and
    //    the events come again as attempt 2; the nack delay after the hour.
    assert_eq!(pulled(&s.pull(&admin, pull_sub).await), []);
    clock.advance_ms(10 * 60_000);
    let again = s.pull(&admin, pull_sub).await;
    assert_eq!(pulled(&again), [("M1".into(), 3, 2), ("M3".into(), 3, 2)]);
    s.ack(&admin, pull_sub, &again).await;
    let next = s.pull(&admin, pull_sub).await;
    assert_eq!(pulled(&next), [("M1".into(), 4, 1), ("M3".into(), 4, 1)]);
    s.ack(&admin, pull_sub, &next).await;
    clock.advance_ms(60 * 60_000);
    // Tokens last an hour.
    let admin = s.token("admin", admin_secret).await;
    let m2 = s.pull(&admin, pull_sub).await;
    assert_eq!(
        pulled(&m2),
        [
            ("M1".into(), 5, 1),
            ("M2".into(), 2, 2),
            ("M3".into(), 5, 1)
        ]
    );

    // 6. The deleted Room and subscription of the fixture are purged by the next sweep, and
    //    `notes`' events by their retention, without its key's sequence going back.
    let report = broker.sweep_retention().await.expect("sweep");
    assert!(report.deleted_room_records_removed > 0, "{report:?}");
    assert!(
        report.deleted_subscription_records_removed > 0,
        "{report:?}"
    );
    assert_eq!(s.get(&admin, "/v1/rooms/notes").await["events_stored"], 0);
    let (_, _, receipt) = s
        .call(
            &admin,
            Method::POST,
            "/v1/rooms/notes/events/note",
            Some(r#"{"text":"after the sweep"}"#),
            &[("Postroom-Ordering-Key", "n1")],
        )
        .await;
    assert_eq!(receipt["sequence"], 7, "{receipt}");
    broker.close().await;
}
