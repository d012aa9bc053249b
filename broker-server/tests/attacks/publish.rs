//! Attacks through publishing: a payload built to make the schema check answer with megabytes
//! (item 6), a centre's client posting for another centre of the IRC ingress (item 7), and
//! publisher-chosen event ids reused to overwrite, suppress or probe other publishers' events
//! (item 8).

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::harness::{config, Actor, Answer, World};

/// The most bytes an error answer about a hostile payload may take.
const ANSWER_BYTES_MAX: usize = 64 * 1024;

/// A payload of about 1 MB whose `items` array holds 500,000 numbers where the schema of `big`
/// wants strings: one violation per item.
fn many_wrong_items() -> Value {
    json!({"items": vec![0u8; 500_000]})
}

/// The administrator registers `big` in `room`: an object whose `items` are strings.
async fn big_type(w: &World, room: &str) {
    let schema = json!({
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"type": "string"}}}
    });
    let a = w
        .call(
            Method::PUT,
            &format!("/v1/rooms/{room}/event-types/big"),
            Some(&w.admin),
            Some(json!({"schema": schema})),
        )
        .await;
    assert!(a.status.is_success(), "{}", a.body);
}

/// A schema-violation answer that stayed small: exactly the cap of violations listed, a
/// marker saying more were found, and how many.
fn assert_capped(a: &Answer, status: StatusCode) {
    assert_eq!(a.status, status, "{}", a.body);
    assert!(
        a.len < ANSWER_BYTES_MAX,
        "the answer to a 1 MB payload took {} bytes",
        a.len
    );
    assert_eq!(a.body["code"], "schema_violation", "{}", a.body);
    let listed = a.body["violations"].as_array().expect("violations listed");
    assert_eq!(listed.len(), 100, "the default cap");
    assert_eq!(a.body["violations_truncated"], true, "{}", a.body["detail"]);
    assert_eq!(a.body["violations_total"], 500_000, "{}", a.body["detail"]);
}

/// Issue 14, item 6. Mallory, a publisher, sends a 1 MB array of 500,000 wrong items to the
/// native publish route and to the GovStack one, hoping for a 48 MB answer and hundreds of
/// megabytes of memory per request. Both answers list 100 violations, say there were more and
/// how many, and stay under 64 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_with_half_a_million_violations_gets_a_short_answer() {
    let w = World::start().await;
    w.room("transfers").await;
    big_type(&w, "transfers").await;
    let mallory = w.home_office("mallory").await;
    w.grant(&mallory, "publisher", "transfers", None).await;

    let native = w
        .post(
            "/v1/rooms/transfers/events/big",
            &mallory.token,
            many_wrong_items(),
        )
        .await;
    assert_capped(&native, StatusCode::UNPROCESSABLE_ENTITY);

    let gov = w
        .gov(
            Method::POST,
            &mallory,
            "transfers",
            "pub/v1/big",
            Some(json!({"eventType": "big", "event": many_wrong_items()})),
        )
        .await;
    assert_capped(&gov, StatusCode::BAD_REQUEST);
}

/// Issue 14, item 6, through the IRC ingress. A centre's client sends a `check in` with 60,000
/// properties the ICD does not know: one violation whose message names every one of them, sent
/// back twice (in `detail` and in `violations`). Each text in the answer is cut to a bounded
/// length, so the answer stays small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_irc_body_with_a_huge_violation_message_gets_a_short_answer() {
    let w = World::start().await;
    w.irc_pack().await;
    let centre = w.home_office("brookhouse").await;
    bind_centre(&w, &centre, "brookhouse").await;

    let mut body = check_in("brookhouse", 1, "2024-01-01T10:00:00Z");
    for i in 0..60_000 {
        body[format!("p{i:05}")] = json!(0);
    }
    let a = w
        .post("/irc_entry/brookhouse/event", &centre.token, body)
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body["detail"]);
    assert_eq!(a.body["code"], "schema_violation");
    assert!(a.len < ANSWER_BYTES_MAX, "the answer took {} bytes", a.len);

    // The ingress lists violations under the same cap, and says when it cut the list.
    let mut c = config();
    c.broker.limits.schema_violations_max = 1;
    let w = World::start_with(c).await;
    w.irc_pack().await;
    let centre = w.home_office("brookhouse").await;
    bind_centre(&w, &centre, "brookhouse").await;
    let mut body = check_in("brookhouse", 1, "2024-01-01T10:00:00Z");
    body["gender"] = json!("x");
    body["nationality"] = json!("far too long");
    let a = w
        .post("/irc_entry/brookhouse/event", &centre.token, body)
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert_eq!(a.body["violations"].as_array().map(Vec::len), Some(1));
    assert_eq!(a.body["violations_total"], 2, "{}", a.body);
    assert_eq!(a.body["violations_truncated"], true, "{}", a.body);
}

/// An ICD `check in` for `centre`.
fn check_in(centre: &str, person: u64, ts: &str) -> Value {
    json!({"operation": "check in", "timestamp": ts, "centre": centre, "person_id": person,
           "cid_id": 9, "gender": "f", "nationality": "xxx"})
}

/// The administrator binds `who` to `centre`: a publisher right on `irc` limited to the
/// ordering key `centre` (the `irc` pack keys every event type by `/centre`).
async fn bind_centre(w: &World, who: &Actor, centre: &str) {
    let a = w
        .post(
            "/v1/admin/grants",
            &w.admin,
            json!({"principal": who.principal, "role": "publisher", "room": "irc",
                   "keys": [centre]}),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
}

/// Issue 14, item 7. Mallory runs Brook House's client, bound to centre `brookhouse`. She posts
/// a `check in` for Harmondsworth, whose event id derives from (centre, person, operation,
/// timestamp), to forge Harmondsworth's record and have its genuine event suppressed as a
/// repeat: through the ICD ingress, through the native publish route with the derived id, and
/// through the GovStack route. Each is refused with 403, and Harmondsworth's own client then
/// posts the genuine event, which is accepted as a new event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_centre_cannot_post_for_another_centre() {
    let w = World::start().await;
    w.irc_pack().await;
    let mallory = w.home_office("brookhouse").await;
    let genuine = w.home_office("harmondsworth").await;
    bind_centre(&w, &mallory, "brookhouse").await;
    bind_centre(&w, &genuine, "harmondsworth").await;

    let forged = check_in("harmondsworth", 7, "2024-03-01T09:00:00Z");
    let ingress = w
        .post(
            "/irc_entry/harmondsworth/event",
            &mallory.token,
            forged.clone(),
        )
        .await;
    assert_eq!(ingress.status, StatusCode::FORBIDDEN, "{}", ingress.body);
    assert_eq!(ingress.body["code"], "forbidden");

    // The ids are keyed by a secret of the broker's; the test reads it, an attacker cannot.
    let key = w
        .broker
        .host_key(broker_server::api::irc::EVENT_ID_KEY)
        .await
        .unwrap();
    let id = broker_server::api::irc::duplicate_id(&key, "harmondsworth", &forged)
        .unwrap()
        .to_string();
    let native = w
        .call_with(
            Method::POST,
            "/v1/rooms/irc/events/check_in",
            &mallory.token,
            &[("postroom-event-id", id.as_str())],
            Some(forged.clone()),
        )
        .await;
    assert_eq!(native.status, StatusCode::FORBIDDEN, "{}", native.body);

    let gov = w
        .gov(
            Method::POST,
            &mallory,
            "irc",
            "pub/v1/check_in",
            Some(json!({"eventType": "check_in", "event": forged.clone(), "id": id})),
        )
        .await;
    assert_eq!(gov.status, StatusCode::FORBIDDEN, "{}", gov.body);

    // Her own centre still works.
    let own = w
        .post(
            "/irc_entry/brookhouse/event",
            &mallory.token,
            check_in("brookhouse", 7, "2024-03-01T09:00:00Z"),
        )
        .await;
    assert_eq!(own.status, StatusCode::CREATED, "{}", own.body);

    // The genuine event is a new event, not a repeat of a forgery.
    let real = w
        .post("/irc_entry/harmondsworth/event", &genuine.token, forged)
        .await;
    assert_eq!(real.status, StatusCode::CREATED, "{}", real.body);
    assert_eq!(real.body["duplicate"], false, "{}", real.body);
    assert_eq!(real.body["id"], json!(id));
    assert!(real.headers.get("postroom-duplicate").is_none());
}

/// Publishes `payload` as `t` to `transfers` with the publisher's own event id `id`.
async fn publish_with_id(w: &World, who: &Actor, id: &str, payload: Value) -> Answer {
    w.call_with(
        Method::POST,
        "/v1/rooms/transfers/events/t",
        &who.token,
        &[("postroom-event-id", id)],
        Some(payload),
    )
    .await
}

/// The same refusal, whoever's event the id belongs to: status, code and detail text.
fn refusal(a: &Answer) -> (StatusCode, Value, Value) {
    (a.status, a.body["code"].clone(), a.body["detail"].clone())
}

/// An answer about event `id` with the id taken out, to compare answers about two ids.
fn without_id(a: &Answer, id: &str) -> (StatusCode, Value, String) {
    (
        a.status,
        a.body["code"].clone(),
        a.body["detail"].as_str().unwrap_or("").replace(id, "ID"),
    )
}

const ALICES_ID: &str = "0190f1e2-0000-7000-8000-00000000a11c";
const UNUSED_ID: &str = "0190f1e2-0000-7000-8000-0000000000ff";

/// Issue 14, item 8, on the native route. Alice publishes with her own event id. Her retry
/// (same id, same payload) gets her first receipt marked as a duplicate; a second event under
/// the same id with another payload is refused with 409 `event_id_conflict` instead of being
/// dropped behind a 201. Mallory, another publisher in the Room, reuses Alice's id: with
/// Alice's payload and with her own, she gets exactly the refusal Alice got for a different
/// payload, never Alice's receipt. She probes the event by id and gets the answer a
/// nonexistent id gets. Alice's event is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_event_id_is_a_conflict_and_reveals_nothing_native() {
    let w = World::start().await;
    w.room("transfers").await;
    let alice = w.justice("alice").await;
    let mallory = w.home_office("mallory").await;
    w.grant(&alice, "publisher", "transfers", None).await;
    w.grant(&mallory, "publisher", "transfers", None).await;
    let original = json!({"id": "prisoner-1", "to": "HMP Brixton"});

    let first = publish_with_id(&w, &alice, ALICES_ID, original.clone()).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    assert!(first.headers.get("postroom-duplicate").is_none());

    let retry = publish_with_id(&w, &alice, ALICES_ID, original.clone()).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{}", retry.body);
    assert_eq!(retry.body, first.body, "the first receipt");
    assert_eq!(retry.headers["postroom-duplicate"], "true");

    let changed = publish_with_id(
        &w,
        &alice,
        ALICES_ID,
        json!({"id": "prisoner-1", "to": "HMP Wandsworth"}),
    )
    .await;
    assert_eq!(changed.status, StatusCode::CONFLICT, "{}", changed.body);
    assert_eq!(changed.body["code"], "event_id_conflict");

    // Mallory reuses Alice's id, with Alice's payload and with another.
    let same = publish_with_id(&w, &mallory, ALICES_ID, original.clone()).await;
    assert_eq!(refusal(&same), refusal(&changed), "{}", same.body);
    let other = publish_with_id(&w, &mallory, ALICES_ID, json!({"id": "prisoner-9"})).await;
    assert_eq!(refusal(&other), refusal(&changed), "{}", other.body);

    // Reading Alice's event is answered as reading an event that does not exist.
    let theirs = w
        .get(&format!("/v1/events/{ALICES_ID}"), &mallory.token)
        .await;
    let nobodys = w
        .get(&format!("/v1/events/{UNUSED_ID}"), &mallory.token)
        .await;
    assert_eq!(nobodys.status, StatusCode::NOT_FOUND, "{}", nobodys.body);
    assert_eq!(
        without_id(&theirs, ALICES_ID),
        without_id(&nobodys, UNUSED_ID),
        "{} / {}",
        theirs.body,
        nobodys.body
    );

    // Alice's event is hers, unchanged, and the Room holds one event.
    let mine = w
        .get(&format!("/v1/events/{ALICES_ID}"), &alice.token)
        .await;
    assert_eq!(mine.status, StatusCode::OK, "{}", mine.body);
    assert_eq!(mine.body["payload"], original);
    let log = w.get("/v1/rooms/transfers/events", &w.admin).await;
    assert_eq!(log.body["items"].as_array().map(Vec::len), Some(1));
}

/// Publishes `event` as `t` to `transfers` through the GovStack route with the id
/// [`ALICES_ID`].
async fn gov_publish(w: &World, who: Actor, event: Value) -> Answer {
    let body = json!({"eventType": "t", "event": event, "id": ALICES_ID});
    w.gov(Method::POST, &who, "transfers", "pub/v1/t", Some(body))
        .await
}

/// Issue 14, item 8, on the GovStack route (`id` in the publish body). The same rules: a retry
/// gets the first receipt, another payload is 409 `event_id_conflict`, Mallory's reuse of
/// Alice's id is refused exactly so, and the status routes (`GET` and `DELETE
/// .../pub/v1/{type}/{id}`) answer Mallory about Alice's event as about no event at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_event_id_is_a_conflict_and_reveals_nothing_govstack() {
    let w = World::start().await;
    w.room("transfers").await;
    let alice = w.justice("alice").await;
    let mallory = w.home_office("mallory").await;
    w.grant(&alice, "publisher", "transfers", None).await;
    w.grant(&mallory, "publisher", "transfers", None).await;
    let publish = |who: &Actor, event: Value| gov_publish(&w, who.clone(), event);
    let original = json!({"id": "prisoner-1", "to": "HMP Brixton"});

    let first = publish(&alice, original.clone()).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    // The same event, its members in another order: the same JSON, so the same event.
    let retry = publish(&alice, json!({"to": "HMP Brixton", "id": "prisoner-1"})).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{}", retry.body);
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.headers["postroom-duplicate"], "true");

    let changed = publish(&alice, json!({"id": "prisoner-1", "to": "HMP Wandsworth"})).await;
    assert_eq!(changed.status, StatusCode::CONFLICT, "{}", changed.body);
    assert_eq!(changed.body["code"], "event_id_conflict");

    let same = publish(&mallory, original.clone()).await;
    assert_eq!(refusal(&same), refusal(&changed), "{}", same.body);

    for method in [Method::GET, Method::DELETE] {
        let theirs = w
            .gov(
                method.clone(),
                &mallory,
                "transfers",
                &format!("pub/v1/t/{ALICES_ID}"),
                None,
            )
            .await;
        let nobodys = w
            .gov(
                method.clone(),
                &mallory,
                "transfers",
                &format!("pub/v1/t/{UNUSED_ID}"),
                None,
            )
            .await;
        assert_eq!(nobodys.status, StatusCode::NOT_FOUND, "{}", nobodys.body);
        assert_eq!(
            without_id(&theirs, ALICES_ID),
            without_id(&nobodys, UNUSED_ID),
            "{method}: {} / {}",
            theirs.body,
            nobodys.body
        );
    }
    let mine = w
        .gov(
            Method::GET,
            &alice,
            "transfers",
            &format!("pub/v1/t/{ALICES_ID}"),
            None,
        )
        .await;
    assert_eq!(mine.status, StatusCode::OK, "{}", mine.body);
    assert_eq!(mine.body["event"], original);
}

/// The IRC event id as it was derived before the fix: a plain SHA-256 of the ICD tuple, which
/// anyone who knows the tuple can compute.
fn unkeyed_irc_id(centre: &str, person: u64, operation: &str, ts_ms: u64) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [
        "irc-event",
        centre,
        &format!("person:{person}"),
        operation,
        &format!("ms:{ts_ms}"),
    ] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&h.finalize()[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// Found in review of issue 14, items 7 and 8. Event ids are unique across the broker, and the
/// IRC ingress derived a centre's event id from the ICD tuple alone. Mallory, who may publish
/// only to her own Room, computes the id of a person's next check-in at Harmondsworth and
/// publishes anything under it first. Before the fix the genuine check-in was then refused
/// (409) and lost, and a 201/409 told her whether that movement had happened. Now the ids are
/// keyed by a secret of the broker's, and the genuine event is accepted.
#[tokio::test]
async fn a_centres_event_id_cannot_be_taken_first() {
    let w = World::start().await;
    w.irc_pack().await;
    w.room("transfers").await;
    let mallory = w.home_office("mallory").await;
    w.grant(&mallory, "publisher", "transfers", None).await;
    let genuine = w.home_office("harmondsworth").await;
    bind_centre(&w, &genuine, "harmondsworth").await;

    // 2024-03-01T09:00:00Z
    let id = unkeyed_irc_id("harmondsworth", 7, "check in", 1_709_283_600_000);
    let squat = publish_with_id(&w, &mallory, &id, json!({"id": "squat"})).await;
    assert_eq!(squat.status, StatusCode::CREATED, "{}", squat.body);

    let real = w
        .post(
            "/irc_entry/harmondsworth/event",
            &genuine.token,
            check_in("harmondsworth", 7, "2024-03-01T09:00:00Z"),
        )
        .await;
    assert_eq!(real.status, StatusCode::CREATED, "{}", real.body);
    assert_ne!(real.body["id"], json!(id), "{}", real.body);
}

/// Found in review of issue 14, item 7. A publisher right on `irc` that names no centres is
/// for a system that speaks for every centre, through the native route; the ICD ingress, which
/// the centres' own clients use, refuses it, so that forgetting to bind a centre's client does
/// not let it post for every centre.
#[tokio::test]
async fn an_unbound_publisher_cannot_use_the_irc_ingress() {
    let w = World::start().await;
    w.irc_pack().await;
    let mallory = w.home_office("brookhouse").await;
    w.grant(&mallory, "publisher", "irc", None).await;
    let a = w
        .post(
            "/irc_entry/harmondsworth/event",
            &mallory.token,
            check_in("harmondsworth", 7, "2024-03-01T09:00:00Z"),
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
}
