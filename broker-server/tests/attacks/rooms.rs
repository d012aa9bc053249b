//! Attacks on Rooms: a manager's right that outlives the Room it was given on, and a member
//! that exhausts the broker's Room quota so that nobody else can create one.

use axum::http::StatusCode;
use serde_json::json;

use crate::harness::World;

/// Issue 14, item 1. Mallory (Home Office) asks for Room `transfers`, which makes her its
/// manager while it is pending, deletes it and waits. The administrator later creates
/// `transfers` for the Ministry of Justice and grants Alice publish. Mallory's old manager
/// right must not apply to the new Room: she can neither read it, subscribe to it, change it
/// nor delete it, and the grant listing no longer shows her right.
#[tokio::test]
async fn a_managers_right_dies_with_its_room() {
    let w = World::start().await;
    let mallory = w.home_office("mallory").await;
    let alice = w.justice("alice").await;

    // Mallory's request makes her the pending Room's manager; she deletes it.
    let asked = w
        .post("/v1/rooms", &mallory.token, json!({"name": "transfers"}))
        .await;
    assert_eq!(asked.status, StatusCode::CREATED, "{}", asked.body);
    let gone = w.delete("/v1/rooms/transfers", &mallory.token).await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT, "{}", gone.body);

    // The administrator creates the Room again, for someone else.
    w.room("transfers").await;
    w.grant(&alice, "publisher", "transfers", None).await;
    let published = w
        .publish("transfers", &alice.token, json!({"id": "prisoner-1"}))
        .await;
    assert_eq!(published.status, StatusCode::CREATED, "{}", published.body);

    // Every use of Mallory's old right is refused.
    let read = w.get("/v1/rooms/transfers/events", &mallory.token).await;
    assert_eq!(read.status, StatusCode::FORBIDDEN, "read: {}", read.body);
    let room = w.get("/v1/rooms/transfers", &mallory.token).await;
    assert_eq!(room.status, StatusCode::FORBIDDEN, "room: {}", room.body);
    let sub = w
        .post(
            "/v1/rooms/transfers/subscriptions",
            &mallory.token,
            json!({"mode": "pull"}),
        )
        .await;
    assert_eq!(sub.status, StatusCode::FORBIDDEN, "subscribe: {}", sub.body);
    let del = w.delete("/v1/rooms/transfers", &mallory.token).await;
    assert_eq!(del.status, StatusCode::FORBIDDEN, "delete: {}", del.body);
    let listed = w.get("/v1/rooms", &mallory.token).await;
    assert_eq!(listed.status, StatusCode::OK);
    assert_eq!(listed.body["items"], json!([]), "{}", listed.body);

    // The stale grant is gone from the administrators' view too.
    let grants = w
        .get(
            "/v1/admin/grants?application=UK/GOV/HO/mallory",
            &w.admin.clone(),
        )
        .await;
    assert_eq!(grants.status, StatusCode::OK, "{}", grants.body);
    assert_eq!(grants.body["items"], json!([]), "{}", grants.body);
}
