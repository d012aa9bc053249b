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

/// Issue 14, item 11. Mallory, a member application with no rights at all, asks for Rooms
/// until the broker refuses. Before the fix her pending requests counted against `rooms_max`
/// and, once it was reached, nobody (the administrator included) could create a Room. Now she
/// is stopped after a few pending requests, and the administrator's capacity is untouched.
#[tokio::test]
async fn pending_room_requests_cannot_exhaust_the_administrators_capacity() {
    let mut config = crate::harness::config();
    config.broker.limits.rooms_max = 3;
    config.broker.limits.pending_rooms_per_application_max = 2;
    config.broker.limits.pending_rooms_max = 3;
    let w = World::start_with(config).await;
    let mallory = w.home_office("mallory").await;
    let trudy = w.home_office("trudy").await;
    let eve = w.justice("eve").await;

    // Mallory's requests stop at her own bound.
    for i in 0..2 {
        let a = w
            .post(
                "/v1/rooms",
                &mallory.token,
                json!({"name": format!("m{i}")}),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    }
    let refused = w
        .post("/v1/rooms", &mallory.token, json!({"name": "m2"}))
        .await;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(refused.body["code"], "limit_exceeded", "{}", refused.body);
    assert!(
        refused
            .body
            .to_string()
            .contains("pending_rooms_per_application_max"),
        "{}",
        refused.body
    );
    // Her accomplices fill the broker-wide pending bound.
    let a = w
        .post("/v1/rooms", &trudy.token, json!({"name": "t0"}))
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    let full = w.post("/v1/rooms", &eve.token, json!({"name": "e0"})).await;
    assert_eq!(
        full.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        full.body
    );
    assert!(
        full.body.to_string().contains("pending_rooms_max"),
        "{}",
        full.body
    );

    // The administrator still creates every Room `rooms_max` allows.
    for name in ["a0", "a1", "a2"] {
        let a = w.post("/v1/rooms", &w.admin, json!({"name": name})).await;
        assert_eq!(a.status, StatusCode::CREATED, "{name}: {}", a.body);
    }
    // And approving a request needs room under that bound too.
    let approve = w.post("/v1/rooms/m0/approve", &w.admin, json!({})).await;
    assert_eq!(
        approve.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        approve.body
    );
    assert!(approve.body.to_string().contains("rooms_max"));
    let gone = w.delete("/v1/rooms/a2", &w.admin).await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT);
    let approve = w.post("/v1/rooms/m0/approve", &w.admin, json!({})).await;
    assert_eq!(approve.status, StatusCode::OK, "{}", approve.body);
}

/// Found in review of issue 14, items 1 and 11. Mallory asks for Room `x` and, as the pending
/// Room's manager, patches its status to `disabled` and then `active`. Before the fix that made
/// an approved-looking Room without an administrator (and freed her pending quota, so she could
/// repeat it until `rooms_max` was reached). Now a pending Room changes status only by approval.
#[tokio::test]
async fn a_pending_room_cannot_be_activated_by_its_requester() {
    let w = World::start().await;
    let mallory = w.home_office("mallory").await;
    let asked = w
        .post("/v1/rooms", &mallory.token, json!({"name": "x"}))
        .await;
    assert_eq!(asked.status, StatusCode::CREATED, "{}", asked.body);
    for status in ["disabled", "active"] {
        let a = w
            .call(
                axum::http::Method::PATCH,
                "/v1/rooms/x",
                Some(&mallory.token),
                Some(json!({"status": status})),
            )
            .await;
        assert_eq!(
            a.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{status}: {}",
            a.body
        );
    }
    let room = w.get("/v1/rooms/x", &mallory.token).await;
    assert_eq!(room.body["status"], "pending", "{}", room.body);
}

/// Found in review of issue 14, item 1. Before the operator enables the `irc` pack, Mallory asks
/// for Room `irc` and so manages it while it is pending. Before the fix the pack adopted her
/// Room ("updated"), leaving her its manager: every IRC event readable, any centre postable.
/// Now the pack is refused until an administrator approves or deletes the request.
#[tokio::test]
async fn a_pack_does_not_adopt_a_members_pending_room() {
    let w = World::start().await;
    let mallory = w.home_office("mallory").await;
    let asked = w
        .post("/v1/rooms", &mallory.token, json!({"name": "irc"}))
        .await;
    assert_eq!(asked.status, StatusCode::CREATED, "{}", asked.body);
    let refused = w.try_irc_pack().await.unwrap_err();
    assert!(refused.to_string().contains("pending request"), "{refused}");
    // Once the request is deleted, the pack creates the Room for the administrators, and
    // Mallory's right died with her Room.
    let gone = w.delete("/v1/rooms/irc", &w.admin).await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT);
    w.irc_pack().await;
    let read = w.get("/v1/rooms/irc/events", &mallory.token).await;
    assert_eq!(read.status, StatusCode::FORBIDDEN, "{}", read.body);
}
