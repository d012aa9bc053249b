//! The IRC ingress (`POST /irc_entry/{centre}/event|heartbeat`) on a real socket, with the
//! `irc` pack applied and real tokens (the centres' from the ICD's token path), driven through
//! one `check` helper. Guards against the ICD contract drifting: 201 on success, 400 naming the
//! field on a schema violation, 422 when the body's centre is not the path's, 401 without a
//! token, 403 without a publisher right or for a centre the client is not bound to (before any
//! check of the body), and a repeated event (same centre, person, operation, timestamp)
//! acknowledged without a second event; and against events losing their per-centre order.
#![forbid(unsafe_code)]

use broker_core::{Broker, EventFilter, Principal, Role};
use broker_server::ServerConfig;
use postroom_tests::{memory_broker, room, test_config};
use reqwest::Client;
use serde_json::{json, Value};

struct Irc {
    http: Client,
    base: String,
    broker: Broker,
    centre_token: String,
    other_token: String,
}

async fn token(http: &Client, url: &str, id: &str, secret: &str) -> String {
    let v: Value = http
        .post(url)
        .basic_auth(id, Some(secret))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await
        .expect("token request")
        .json()
        .await
        .expect("token JSON");
    v["access_token"].as_str().expect("a token").to_string()
}

async fn start() -> Irc {
    let (broker, _clock) = memory_broker(test_config()).await;
    let config = ServerConfig::default();
    let admin = Principal::new("local/ADMIN/postroom/admin").expect("principal");
    let pack = broker_server::pack::Pack::load(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/irc/pack.toml").as_ref(),
    )
    .expect("pack");
    broker_server::pack::apply(&broker, &pack, &admin)
        .await
        .expect("apply");
    // Applying again (every start does) changes nothing.
    let again = broker_server::pack::apply(&broker, &pack, &admin)
        .await
        .expect("apply again");
    assert!(again.iter().all(|r| r.outcome == "unchanged"
        && r.event_types
            .iter()
            .all(|(_, o)| *o == broker_server::pack::TypeOutcome::Unchanged)));
    broker
        .create_member("UK/GOV/HO", "Home Office")
        .await
        .expect("member");
    for app in ["centres", "other"] {
        let a = broker
            .create_application("UK/GOV/HO", app, app)
            .await
            .expect("application");
        broker
            .create_client(
                &a.id,
                Some(app.to_string()),
                Some(format!("{app}-secret-0123456789abcdef")),
            )
            .await
            .expect("client");
    }
    // Brook House's client, bound to its centre: a publisher right limited to the ordering
    // key `brookhouse` (the pack keys every type by `/centre`).
    let centres = Principal::new("UK/GOV/HO/centres").expect("principal");
    broker
        .grant_limited(
            &centres,
            Role::Publisher,
            Some(room("irc")),
            None,
            Some(vec!["brookhouse".into()]),
        )
        .await
        .expect("grant");
    let app = broker_server::router(broker.clone(), &config).expect("router");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let http = Client::new();
    // The centres get theirs where the ICD says a client builds the URL from its credentials
    // file (`<auth-server-url>/realms/<realm>/protocol/openid-connect/token`, Basic auth).
    let centre_token = token(
        &http,
        &format!("{base}/realms/irc/protocol/openid-connect/token"),
        "centres",
        "centres-secret-0123456789abcdef",
    )
    .await;
    let other_token = token(
        &http,
        &format!("{base}/oauth/token"),
        "other",
        "other-secret-0123456789abcdef",
    )
    .await;
    Irc {
        http,
        base,
        broker,
        centre_token,
        other_token,
    }
}

impl Irc {
    /// Posts `body` (a JSON value, or raw text when it is a string starting with `raw:`) to
    /// `path` with `token`, and checks the status and, when given, the problem `code` and
    /// `field`. Returns the answer's body.
    async fn check(
        &self,
        path: &str,
        token: Option<&str>,
        body: Value,
        status: u16,
        code: Option<&str>,
        field: Option<&str>,
    ) -> Value {
        let mut req = self.http.post(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req = match body.as_str().and_then(|s| s.strip_prefix("raw:")) {
            Some(raw) => req.body(raw.to_string()),
            None => req.json(&body),
        };
        let resp = req.send().await.expect("request");
        let got = resp.status().as_u16();
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(got, status, "{path} {body}: {answer}");
        if let Some(c) = code {
            assert_eq!(answer["code"], c, "{path} {body}: {answer}");
        }
        if let Some(f) = field {
            assert_eq!(answer["field"], f, "{path} {body}: {answer}");
        }
        answer
    }
}

fn check_in(centre: &str, person: u64, ts: &str) -> Value {
    json!({"operation": "check in", "timestamp": ts, "centre": centre, "person_id": person,
           "cid_id": 9, "gender": "f", "nationality": "xxx"})
}

fn out_commission(reason: &str, single: Option<u64>, gender: &str) -> Value {
    let mut v = json!({"operation": "out commission", "timestamp": "2024-01-01T09:00:00Z",
        "centre": "brookhouse", "bed_ref": "B-2", "reason": reason, "gender": gender});
    if let Some(p) = single {
        v["single_occupancy_person_id"] = json!(p);
    }
    v
}

fn with(mut v: Value, k: &str, val: Value) -> Value {
    v[k] = val;
    v
}

fn without(mut v: Value, k: &str) -> Value {
    if let Value::Object(m) = &mut v {
        m.remove(k);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_irc_ingress_answers_as_the_icd_consumer_did() {
    let irc = start().await;
    let t = Some(irc.centre_token.as_str());
    let ev = "/irc_entry/brookhouse/event";
    let hb = "/irc_entry/brookhouse/heartbeat";
    let first = check_in("brookhouse", 1, "2024-01-01T10:00:00Z");

    // Access: 401 without a token, 403 with one that may not publish to the Room.
    irc.check(ev, None, first.clone(), 401, Some("unauthenticated"), None)
        .await;
    irc.check(
        ev,
        Some(&irc.other_token),
        first.clone(),
        403,
        Some("forbidden"),
        None,
    )
    .await;

    // A centre's client posts for its own centre only, events and heartbeats alike.
    irc.check(
        "/irc_entry/yarlswood/event",
        t,
        check_in("yarlswood", 1, "2024-01-01T10:00:00Z"),
        403,
        Some("forbidden"),
        None,
    )
    .await;
    irc.check(
        "/irc_entry/yarlswood/heartbeat",
        t,
        json!({"centre": "yarlswood", "male_occupied": 1, "female_occupied": 2,
               "male_outofcommission": 0, "female_outofcommission": 0}),
        403,
        Some("forbidden"),
        None,
    )
    .await;

    // Rights come before the body's details: no 422 (or 400) for a caller that may not publish.
    irc.check(
        ev,
        Some(&irc.other_token),
        with(first.clone(), "centre", json!("yarlswood")),
        403,
        Some("forbidden"),
        None,
    )
    .await;

    // Accepted, then the same event again (even with another body) without a second event.
    let a = irc.check(ev, t, first.clone(), 201, None, None).await;
    assert_eq!(a["event_type"], "check_in");
    assert_eq!(a["key"], "brookhouse");
    assert_eq!(a["duplicate"], false);
    let b = irc.check(ev, t, first.clone(), 201, None, None).await;
    assert_eq!(
        (b["id"].clone(), b["duplicate"].clone()),
        (a["id"].clone(), json!(true))
    );
    let c = irc
        .check(
            ev,
            t,
            with(first.clone(), "nationality", json!("gbr")),
            201,
            None,
            None,
        )
        .await;
    assert_eq!(c["id"], a["id"]);
    // The same instant written another way is the same event, as the original compared dates.
    let e = irc
        .check(
            ev,
            t,
            check_in("brookhouse", 1, "2024-01-01T11:00:00.000+01:00"),
            201,
            None,
            None,
        )
        .await;
    assert_eq!(
        (e["id"].clone(), e["duplicate"].clone()),
        (a["id"].clone(), json!(true))
    );
    // Another timestamp is another event.
    let d = irc
        .check(
            ev,
            t,
            check_in("brookhouse", 1, "2024-01-01T10:00:01Z"),
            201,
            None,
            None,
        )
        .await;
    assert_eq!(d["duplicate"], false);
    assert_eq!(d["sequence"], 2);

    // The ICD's refusals.
    for (path, body, status, code, field) in [
        (
            ev,
            with(first.clone(), "centre", json!("yarlswood")),
            422,
            "centre_mismatch",
            None,
        ),
        (
            "/irc_entry/AB/event",
            first.clone(),
            400,
            "invalid_parameter",
            None,
        ),
        (
            "/irc_entry/ab/event",
            first.clone(),
            400,
            "invalid_parameter",
            None,
        ),
        (
            ev,
            without(first.clone(), "person_id"),
            400,
            "schema_violation",
            Some("person_id"),
        ),
        (
            ev,
            with(first.clone(), "foo", json!(1)),
            400,
            "schema_violation",
            Some("foo"),
        ),
        (
            ev,
            with(first.clone(), "gender", json!("x")),
            400,
            "schema_violation",
            Some("gender"),
        ),
        (
            ev,
            with(first.clone(), "person_id", json!(-1)),
            400,
            "schema_violation",
            Some("person_id"),
        ),
        // An integer written as 1.0: not an integer for the ICD's draft-04 schema.
        (
            ev,
            with(first.clone(), "cid_id", json!(1.0)),
            400,
            "schema_violation",
            Some("cid_id"),
        ),
        (
            ev,
            with(first.clone(), "timestamp", json!("soon")),
            400,
            "schema_violation",
            Some("timestamp"),
        ),
        (
            ev,
            with(first.clone(), "operation", json!("check-in")),
            400,
            "schema_violation",
            Some("operation"),
        ),
        (
            ev,
            without(first.clone(), "operation"),
            400,
            "schema_violation",
            Some("operation"),
        ),
        (
            ev,
            out_commission("Crime Scene", Some(3), "m"),
            400,
            "schema_violation",
            Some("single_occupancy_person_id"),
        ),
        (
            ev,
            out_commission("Single Occupancy", None, "m"),
            400,
            "schema_violation",
            Some("single_occupancy_person_id"),
        ),
        (
            ev,
            out_commission("Flood", None, "m"),
            400,
            "schema_violation",
            Some("reason"),
        ),
        (
            ev,
            out_commission("Other", None, "x"),
            400,
            "schema_violation",
            Some("gender"),
        ),
        (ev, json!("raw:{not json"), 400, "invalid_json", None),
        (
            hb,
            json!({"centre": "yarlswood", "male_occupied": 1, "female_occupied": 2,
                     "male_outofcommission": 0, "female_outofcommission": 0}),
            422,
            "centre_mismatch",
            None,
        ),
        (
            hb,
            json!({"centre": "brookhouse", "male_occupied": 5001, "female_occupied": 2,
                     "male_outofcommission": 0, "female_outofcommission": 0}),
            400,
            "schema_violation",
            Some("male_occupied"),
        ),
    ] {
        irc.check(path, t, body, status, Some(code), field).await;
    }

    // Heartbeats (extra properties allowed, as in the ICD) and the other operations.
    let beat = irc
        .check(
            hb,
            t,
            json!({"centre": "brookhouse", "male_occupied": 1, "female_occupied": 2,
                   "male_outofcommission": 0, "female_outofcommission": 0,
                   "male_total_configured": 10, "female_total_configured": 10, "site": "x"}),
            201,
            None,
            None,
        )
        .await;
    assert_eq!(
        (beat["event_type"].clone(), beat["sequence"].clone()),
        (json!("heartbeat"), json!(3))
    );
    let single = json!({"operation": "out commission", "timestamp": "2024-01-01T11:00:00Z",
        "centre": "brookhouse", "bed_ref": "A-1", "reason": "Single Occupancy",
        "single_occupancy_person_id": 4, "gender": "m"});
    let s = irc.check(ev, t, single.clone(), 201, None, None).await;
    assert_eq!(s["event_type"], "out_commission");
    assert_eq!(
        irc.check(ev, t, single, 201, None, None).await["duplicate"],
        true
    );
    let transfer = json!({"operation": "inter site transfer", "timestamp": "2024-01-01T12:00:00Z",
        "centre": "brookhouse", "centre_to": "yarlswood", "person_id": 1, "reason": "Other"});
    assert_eq!(
        irc.check(ev, t, transfer, 201, None, None).await["event_type"],
        "inter_site_transfer"
    );

    // Exactly the accepted, non-repeated events are stored, byte for byte, in order, keyed by
    // centre.
    let stored = irc
        .broker
        .events(&room("irc"), EventFilter::default())
        .await
        .expect("events");
    let types: Vec<String> = stored
        .items
        .iter()
        .map(|e| e.event_type.to_string())
        .collect();
    assert_eq!(
        types,
        [
            "check_in",
            "check_in",
            "heartbeat",
            "out_commission",
            "inter_site_transfer"
        ]
    );
    assert!(stored.items.iter().all(|e| e.key.as_str() == "brookhouse"));
    let seqs: Vec<u64> = stored.items.iter().map(|e| e.sequence.0).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    assert_eq!(
        stored.items[0].payload,
        serde_json::to_vec(&first).expect("bytes")
    );
}
