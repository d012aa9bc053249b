//! The GovStack IM Pub/Sub API v2.0.0 flow end to end, on a real socket, as a client written
//! from the yaml would drive it: event type admin, publish, status and stop, PULL and PUSH
//! subscriptions, pull of the next event and its confirmation. Every status code asserted here
//! is the one the yaml lists for that case, so a change that drifts from the yaml fails.
#![forbid(unsafe_code)]

use std::time::Duration;

use broker_server::ServerConfig;
use postroom_tests::receiver::Receiver;
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};

/// The server's default configuration with authentication off (every caller the local
/// administrator): these tests are about the API's behaviour, not access control.
fn local() -> ServerConfig {
    let mut c = ServerConfig::default();
    c.auth.insecure_no_auth = true;
    c
}

const BASE: &str = "/r1/neverland/GOV/capitalCity/registry";
/// The caller's member application; `%2F` shows that parts are percent-decoded.
const POLICE: &str = "neverland/GOV/capitalCity/police";
const HOSPITAL: &str = "neverland/GOV/city%2Dhospital/births";

struct Gov {
    client: Client,
    base: String,
}

impl Gov {
    async fn call(
        &self,
        method: Method,
        path: &str,
        caller: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .client
            .request(method, format!("{}{BASE}{path}", self.base));
        if !caller.is_empty() {
            req = req.header("X-GovStack-Client", caller);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let bytes = resp.bytes().await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON body")
        };
        (status, body)
    }
}

fn birth_schema() -> Value {
    json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": {
            "dateTime": {"type": "string", "format": "date-time"},
            "gender": {"type": "string", "enum": ["M", "F"]},
            "mother": {"type": "string"},
            "place": {"type": "string"},
            "id": {"type": "integer"}
        },
        "required": ["dateTime", "gender", "mother", "place"]
    })
}

fn birth(mother: &str) -> Value {
    json!({"eventType": "newBirth", "event": {
        "dateTime": "2023-05-01T11:25:00+02:00", "gender": "M", "mother": mother,
        "place": "City Hospital"
    }})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_govstack_flow_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig {
        // Created by the server, private; the temporary folder itself is 0755.
        data_dir: dir.path().join("data"),
        ..local()
    };
    // The PUSH subscriber below is a receiver on loopback, which the push target guard refuses
    // by default.
    config.broker.delivery.push_allow.loopback = true;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(broker_server::serve(listener, config, async move {
        let _ = stop_rx.await;
    }));
    let gov = Gov {
        client: Client::new(),
        base: format!("http://{addr}"),
    };
    use Method as M;

    // No caller header: an invalid request.
    let (s, body) = gov.call(M::GET, "/api/v1/eventType", "", None).await;
    assert_eq!(s, 400);
    assert_eq!(body["code"], "invalid_client_header");
    let (s, _) = gov
        .call(M::GET, "/api/v1/eventType", "only/three/parts", None)
        .await;
    assert_eq!(s, 400);

    // Event types: none yet (204), create (200), duplicate (409), list, details.
    let (s, _) = gov.call(M::GET, "/api/v1/eventType", HOSPITAL, None).await;
    assert_eq!(s, 204);
    let new_type = json!({"eventType": "newBirth", "schema": birth_schema()});
    let (s, _) = gov
        .call(
            M::POST,
            "/api/v1/eventType",
            HOSPITAL,
            Some(new_type.clone()),
        )
        .await;
    assert_eq!(s, 200);
    let (s, body) = gov
        .call(M::POST, "/api/v1/eventType", HOSPITAL, Some(new_type))
        .await;
    assert_eq!(s, 409);
    assert_eq!(body["code"], "event_type_exists");
    let (s, _) = gov
        .call(
            M::POST,
            "/api/v1/eventType",
            HOSPITAL,
            Some(json!({"eventType": "x"})),
        )
        .await;
    assert_eq!(s, 400, "schema missing");
    let (s, body) = gov.call(M::GET, "/api/v1/eventType", HOSPITAL, None).await;
    assert_eq!((s, body), (StatusCode::OK, json!(["newBirth"])));
    let (s, body) = gov
        .call(M::GET, "/api/v1/eventType/newBirth", HOSPITAL, None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(body["eventType"], "newBirth");
    assert_eq!(body["schema"], birth_schema());
    let (s, _) = gov
        .call(M::GET, "/api/v1/eventType/deathNotice", HOSPITAL, None)
        .await;
    assert_eq!(s, 204, "an undefined event type is 204 in the yaml");

    // Subscriptions: PULL for the police, duplicate 409, details, list, update (201).
    let (s, sub) = gov
        .call(
            M::POST,
            "/api/v1/subs/newBirth",
            POLICE,
            Some(json!({"eventType": "newBirth", "delivery": "PULL", "options": {"FIFO": true, "TTL": 600}})),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(sub["delivery"], "PULL");
    assert_eq!(sub["options"], json!({"TTL": 600, "FIFO": true}));
    assert_eq!(
        sub["subscriberId"],
        json!({"instanceId": "neverland", "memberClass": "GOV", "memberCode": "capitalCity", "applicationCode": "police"})
    );
    let (s, _) = gov
        .call(
            M::POST,
            "/api/v1/subs/newBirth",
            POLICE,
            Some(json!({"eventType": "newBirth", "delivery": "PULL"})),
        )
        .await;
    assert_eq!(s, 409);
    let (s, _) = gov
        .call(
            M::POST,
            "/api/v1/subs/deathNotice",
            POLICE,
            Some(json!({"eventType": "deathNotice", "delivery": "PULL"})),
        )
        .await;
    assert_eq!(s, 400, "no such event type");
    let (s, _) = gov
        .call(
            M::POST,
            "/api/v1/subs/newBirth",
            HOSPITAL,
            Some(json!({"eventType": "newBirth"})),
        )
        .await;
    assert_eq!(s, 400, "PUSH is the default and needs pushUrl");
    let (s, body) = gov
        .call(M::GET, "/api/v1/subs/newBirth", POLICE, None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(body["id"], sub["id"]);
    let (s, _) = gov
        .call(M::GET, "/api/v1/subs/newBirth", HOSPITAL, None)
        .await;
    assert_eq!(s, 404, "subscriptions are per caller");
    let (s, body) = gov.call(M::GET, "/api/v1/subs", POLICE, None).await;
    assert_eq!(s, 200);
    assert_eq!(body.as_array().unwrap().len(), 1);
    let (s, body) = gov
        .call(
            M::PATCH,
            "/api/v1/subs/newBirth",
            POLICE,
            Some(json!({"eventType": "newBirth", "options": {"TTL": 7200}})),
        )
        .await;
    assert_eq!(s, 201);
    assert_eq!(body["options"], json!({"TTL": 7200, "FIFO": true}));
    let (s, _) = gov
        .call(
            M::PATCH,
            "/api/v1/subs/newBirth",
            POLICE,
            Some(json!({"eventType": "newBirth", "delivery": "PUSH"})),
        )
        .await;
    assert_eq!(s, 400, "PULL cannot become PUSH");

    // A PUSH subscriber too, to a local receiver.
    let mut receiver = Receiver::start().await;
    let (s, push_sub) = gov
        .call(
            M::POST,
            "/api/v1/subs/newBirth",
            HOSPITAL,
            Some(json!({"eventType": "newBirth", "delivery": "PUSH", "pushUrl": receiver.url("births")})),
        )
        .await;
    assert_eq!(s, 200);
    assert!(push_sub["secret"].as_str().unwrap().starts_with("whsec_"));

    // Publish: 201 {id}; schema violation 400 naming it; unknown type 404; path/body mismatch 400.
    let (s, first) = gov
        .call(
            M::POST,
            "/pub/v1/newBirth",
            HOSPITAL,
            Some(birth("Jane Doe")),
        )
        .await;
    assert_eq!(s, 201);
    let first_id = first["id"].as_str().unwrap().to_string();
    let (s, body) = gov
        .call(
            M::POST,
            "/pub/v1/newBirth",
            HOSPITAL,
            Some(json!({"eventType": "newBirth", "event": {"gender": "X"}})),
        )
        .await;
    assert_eq!(s, 400);
    assert_eq!(body["code"], "schema_violation");
    assert!(body["violations"].as_array().unwrap().len() >= 4, "{body}");
    let mut unknown = birth("x");
    unknown["eventType"] = json!("deathNotice");
    let (s, _) = gov
        .call(M::POST, "/pub/v1/deathNotice", HOSPITAL, Some(unknown))
        .await;
    assert_eq!(s, 404);
    let mut mismatched = birth("x");
    mismatched["eventType"] = json!("other");
    let (s, _) = gov
        .call(M::POST, "/pub/v1/newBirth", HOSPITAL, Some(mismatched))
        .await;
    assert_eq!(s, 400);

    // The push subscriber receives it, signed.
    let got = receiver
        .next(Duration::from_secs(10))
        .await
        .expect("push delivery");
    assert_eq!(got.header("webhook-id"), first_id);
    assert!(got.header("webhook-signature").starts_with("v1,"));
    let pushed: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(pushed["mother"], "Jane Doe");

    // Status: the event with its sequence and publisher.
    let (s, status) = gov
        .call(
            M::GET,
            &format!("/pub/v1/newBirth/{first_id}"),
            POLICE,
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(status["id"], first_id.as_str());
    assert_eq!(status["sequence"], 1);
    assert_eq!(status["publisherId"]["memberCode"], "city-hospital");
    assert_eq!(status["event"]["mother"], "Jane Doe");
    assert_eq!(status["status"]["subscriptions"], 2);
    let (s, _) = gov
        .call(
            M::GET,
            "/pub/v1/newBirth/00000000-0000-0000-0000-000000000000",
            POLICE,
            None,
        )
        .await;
    assert_eq!(s, 404);

    // Pull: the next unacknowledged event with its sequence; confirm; nothing left is 404.
    let (s, confirm_early) = gov
        .call(
            M::DELETE,
            &format!("/pull/v1/newBirth/{first_id}"),
            POLICE,
            None,
        )
        .await;
    assert_eq!(s, 409, "not pulled yet: {confirm_early}");
    let (s, pulled) = gov.call(M::GET, "/pull/v1/newBirth", POLICE, None).await;
    assert_eq!(s, 200);
    assert_eq!(pulled["id"], first_id.as_str());
    assert_eq!(pulled["sequence"], 1);
    assert_eq!(pulled["eventType"], "newBirth");
    let (s, _) = gov.call(M::GET, "/pull/v1/newBirth", POLICE, None).await;
    assert_eq!(s, 404, "no event available");
    let (s, _) = gov
        .call(
            M::DELETE,
            &format!("/pull/v1/newBirth/{first_id}"),
            POLICE,
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (s, _) = gov
        .call(
            M::DELETE,
            &format!("/pull/v1/newBirth/{first_id}"),
            POLICE,
            None,
        )
        .await;
    assert_eq!(s, 404, "already confirmed");
    let (s, _) = gov.call(M::GET, "/pull/v1/newBirth", HOSPITAL, None).await;
    assert_eq!(s, 409, "a PUSH subscriber cannot pull");

    // Stop: a second event stopped before the police pull it.
    let (_, second) = gov
        .call(
            M::POST,
            "/pub/v1/newBirth",
            HOSPITAL,
            Some(birth("Mary Major")),
        )
        .await;
    let second_id = second["id"].as_str().unwrap().to_string();
    assert_eq!(
        second["sequence"], 2,
        "no key attribute: one key, so sequences run on"
    );
    let (s, _) = gov
        .call(
            M::DELETE,
            &format!("/pub/v1/newBirth/{second_id}"),
            HOSPITAL,
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (_, status) = gov
        .call(
            M::GET,
            &format!("/pub/v1/newBirth/{second_id}"),
            HOSPITAL,
            None,
        )
        .await;
    assert!(status["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["subscription"] == sub["id"] && d["state"] == "dead_lettered"));
    let (s, _) = gov.call(M::GET, "/pull/v1/newBirth", POLICE, None).await;
    assert_eq!(s, 404, "the stopped event is not handed out");
    let (s, _) = gov
        .call(
            M::DELETE,
            "/pub/v1/newBirth/00000000-0000-0000-0000-000000000000",
            HOSPITAL,
            None,
        )
        .await;
    assert_eq!(s, 404);

    // Unsubscribe, then remove the event type.
    let (s, _) = gov
        .call(M::DELETE, "/api/v1/subs/newBirth", POLICE, None)
        .await;
    assert_eq!(s, 204);
    let (s, _) = gov
        .call(M::DELETE, "/api/v1/subs/newBirth", POLICE, None)
        .await;
    assert_eq!(s, 404);
    let (s, _) = gov
        .call(M::DELETE, "/api/v1/eventType/newBirth", HOSPITAL, None)
        .await;
    assert_eq!(s, 204);
    let (s, _) = gov
        .call(M::DELETE, "/api/v1/eventType/newBirth", HOSPITAL, None)
        .await;
    assert_eq!(s, 404);
    let (s, _) = gov.call(M::GET, "/api/v1/eventType", HOSPITAL, None).await;
    assert_eq!(s, 204);

    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}
