//! Attacks that outlive a right: a subscriber whose right was revoked, an application that was
//! deleted, a publisher that lost its publish right, each still using what it set up while it
//! had the right.

use axum::http::StatusCode;
use serde_json::json;

use crate::harness::{Answer, Receiver, World};

/// `POST /v1/subscriptions/{id}/{action}` with `token`.
async fn on(w: &World, id: &str, action: &str, token: &str, body: serde_json::Value) -> Answer {
    w.post(&format!("/v1/subscriptions/{id}/{action}"), token, body)
        .await
}

/// Issue 14, item 2. Eve (Ministry of Justice) subscribes by pull to Room `transfers` while
/// she may, pulls an event, and then has her subscriber right revoked. Before the fix she
/// went on pulling, seeking and acknowledging on her existing subscription. Now every use is
/// refused, the subscription is paused with reason `subscriber_revoked` for operators to see,
/// and she may still read and delete it.
#[tokio::test]
async fn a_revoked_subscriber_can_no_longer_use_its_subscription() {
    let w = World::start().await;
    w.room("transfers").await;
    let eve = w.justice("eve").await;
    w.grant(&eve, "subscriber", "transfers", None).await;
    let sub = w
        .post(
            "/v1/rooms/transfers/subscriptions",
            &eve.token,
            json!({"mode": "pull"}),
        )
        .await;
    assert_eq!(sub.status, StatusCode::CREATED, "{}", sub.body);
    let id = sub.body["subscription"]["id"].as_str().unwrap().to_string();
    for n in 0..3 {
        let p = w
            .publish("transfers", &w.admin, json!({"id": format!("p{n}")}))
            .await;
        assert_eq!(p.status, StatusCode::CREATED, "{}", p.body);
    }
    let pulled = on(&w, &id, "pull", &eve.token, json!({"max_messages": 1})).await;
    assert_eq!(pulled.status, StatusCode::OK, "{}", pulled.body);
    let ack_id = pulled.body["messages"][0]["ack_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{}", pulled.body))
        .to_string();

    w.revoke(&eve, "subscriber", "transfers").await;

    // The subscription is paused, and says why, before the revocation's answer.
    let seen = w.get(&format!("/v1/subscriptions/{id}"), &w.admin).await;
    assert_eq!(seen.body["status"], "paused", "{}", seen.body);
    assert_eq!(seen.body["status_reason"], "subscriber_revoked");

    // Every use by Eve is refused.
    for (action, body) in [
        ("pull", json!({"max_messages": 10})),
        ("ack", json!({"ack_ids": [ack_id]})),
        ("nack", json!({"ack_ids": [ack_id]})),
        ("seek", json!({"to": "oldest"})),
        ("resume", json!({})),
    ] {
        let a = on(&w, &id, action, &eve.token, body).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{action}: {}", a.body);
    }
    let dead = w
        .get(&format!("/v1/subscriptions/{id}/dead-letters"), &eve.token)
        .await;
    assert_eq!(dead.status, StatusCode::FORBIDDEN, "{}", dead.body);

    // Even the administrator cannot make it deliver to a subscriber without the right.
    let resumed = on(&w, &id, "resume", &w.admin, json!({})).await;
    assert_eq!(resumed.status, StatusCode::CONFLICT, "{}", resumed.body);
    assert_eq!(resumed.body["code"], "subscriber_revoked");
    let pulled = on(&w, &id, "pull", &w.admin, json!({"max_messages": 10})).await;
    assert_eq!(pulled.status, StatusCode::CONFLICT, "{}", pulled.body);

    // She may still see why, and clean up.
    let own = w.get(&format!("/v1/subscriptions/{id}"), &eve.token).await;
    assert_eq!(own.status, StatusCode::OK, "{}", own.body);
    assert_eq!(own.body["status_reason"], "subscriber_revoked");

    // Given the right back, an operator resumes it and it delivers again.
    w.grant(&eve, "subscriber", "transfers", None).await;
    let resumed = on(&w, &id, "resume", &w.admin, json!({})).await;
    assert_eq!(resumed.status, StatusCode::OK, "{}", resumed.body);
    let pulled = on(&w, &id, "pull", &eve.token, json!({"max_messages": 10})).await;
    assert_eq!(pulled.status, StatusCode::OK, "{}", pulled.body);
    let deleted = w
        .delete(&format!("/v1/subscriptions/{id}"), &eve.token)
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.body);
}

/// Issue 14, item 2. Eve's application has a push subscription; the administrator deletes the
/// application. Before the fix its webhook kept receiving events. Now the subscription is
/// paused (`subscriber_revoked`) before the deletion is answered, and an event published
/// afterwards reaches an authorised subscriber's webhook but never Eve's.
#[tokio::test]
async fn a_deleted_applications_webhook_receives_nothing_more() {
    let mut config = crate::harness::config();
    config.broker.delivery.push_allow.loopback = true;
    let w = World::start_with(config).await;
    w.room("transfers").await;
    let eve = w.justice("eve").await;
    let alice = w.home_office("alice").await;
    w.grant(&eve, "subscriber", "transfers", None).await;
    w.grant(&alice, "subscriber", "transfers", None).await;
    let mut hooks = Receiver::start().await;
    for (who, path) in [(&eve, "eve"), (&alice, "alice")] {
        let s = w
            .post(
                "/v1/rooms/transfers/subscriptions",
                &who.token,
                json!({"mode": "push", "push": {"url": hooks.url(path)}}),
            )
            .await;
        assert_eq!(s.status, StatusCode::CREATED, "{}", s.body);
    }
    let first = w
        .publish("transfers", &w.admin, json!({"id": "first"}))
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let mut got = vec![hooks.next().await, hooks.next().await];
    got.sort();
    assert_eq!(got, vec!["alice".to_string(), "eve".to_string()]);

    let gone = w
        .delete("/v1/admin/applications/UK%2FGOV%2FMOJ%2Feve", &w.admin)
        .await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT, "{}", gone.body);
    let subs = w.get("/v1/rooms/transfers/subscriptions", &w.admin).await;
    let eves: Vec<_> = subs.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["subscriber"] == eve.principal.as_str())
        .collect();
    assert_eq!(eves.len(), 1, "{}", subs.body);
    assert_eq!(eves[0]["status"], "paused");
    assert_eq!(eves[0]["status_reason"], "subscriber_revoked");

    // Alice's webhook receiving the next event is the point by which Eve's would have too.
    let second = w
        .publish("transfers", &w.admin, json!({"id": "second"}))
        .await;
    assert_eq!(second.status, StatusCode::CREATED);
    assert_eq!(hooks.next().await, "alice");
    assert_eq!(
        hooks.received("eve"),
        1,
        "Eve's webhook got an event after her deletion"
    );
}

/// Issue 14, item 2 (publishers). Mallory publishes to `transfers`, then loses her publish
/// right. Before the fix she could still read her events' delivery status and stop them,
/// because the check compared only the publisher's name. Now both need the right.
#[tokio::test]
async fn a_publisher_without_its_right_cannot_read_or_stop_its_events() {
    let w = World::start().await;
    w.room("transfers").await;
    let mallory = w.home_office("mallory").await;
    w.grant(&mallory, "publisher", "transfers", None).await;
    let p = w
        .publish("transfers", &mallory.token, json!({"id": "x"}))
        .await;
    assert_eq!(p.status, StatusCode::CREATED, "{}", p.body);
    let event = p.body["id"].as_str().unwrap().to_string();
    let read = w.get(&format!("/v1/events/{event}"), &mallory.token).await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.body);

    w.revoke(&mallory, "publisher", "transfers").await;
    let read = w.get(&format!("/v1/events/{event}"), &mallory.token).await;
    assert!(
        read.status == StatusCode::FORBIDDEN || read.status == StatusCode::NOT_FOUND,
        "{}: {}",
        read.status,
        read.body
    );
}

/// Issue 14, item 2 (narrowing). Eve subscribes to every event type of `transfers`; the
/// administrator then narrows her right to type `t2` only. Her subscription to all types is
/// paused (`subscriber_revoked`) when the narrowed right is given, as a revocation would.
#[tokio::test]
async fn narrowing_a_subscriber_right_pauses_what_it_no_longer_covers() {
    let w = World::start().await;
    w.room("transfers").await;
    w.event_type("transfers", "t2").await;
    let eve = w.justice("eve").await;
    w.grant(&eve, "subscriber", "transfers", None).await;
    let sub = w
        .post(
            "/v1/rooms/transfers/subscriptions",
            &eve.token,
            json!({"mode": "pull"}),
        )
        .await;
    assert_eq!(sub.status, StatusCode::CREATED, "{}", sub.body);
    let id = sub.body["subscription"]["id"].as_str().unwrap().to_string();
    w.grant(&eve, "subscriber", "transfers", Some(json!(["t2"])))
        .await;
    let seen = w.get(&format!("/v1/subscriptions/{id}"), &w.admin).await;
    assert_eq!(seen.body["status"], "paused", "{}", seen.body);
    assert_eq!(seen.body["status_reason"], "subscriber_revoked");
    let pulled = on(&w, &id, "pull", &eve.token, json!({"max_messages": 1})).await;
    assert_eq!(pulled.status, StatusCode::FORBIDDEN, "{}", pulled.body);
}
