//! Room lifecycle: creation and approval, updates, listing, deletion. Guards against publishing
//! into a Room that is not open, and against a deleted Room's events resurfacing.
#![forbid(unsafe_code)]

use broker_core::{NewRoom, Retention, RoomPatch, RoomStatus};
use postroom_tests::{memory_broker, moved, room, setup_room, test_config, who};

#[tokio::test]
async fn a_members_room_waits_for_approval() {
    let (broker, _) = memory_broker(test_config()).await;
    let pending = broker
        .create_room(NewRoom::new(room("beds"), who("GOV/123/app")))
        .await
        .unwrap();
    assert_eq!(pending.status, RoomStatus::Pending);
    assert_eq!(pending.owner, who("GOV/123/app"));
    assert!(pending.ordered, "rooms order per key by default");
    // A pending room cannot be opened by a plain update; approval is explicit.
    let err = broker
        .update_room(
            &room("beds"),
            RoomPatch {
                status: Some(RoomStatus::Active),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid_input");
    let active = broker.approve_room(&room("beds")).await.unwrap();
    assert_eq!(active.status, RoomStatus::Active);
    assert_eq!(
        broker.room(&room("beds")).unwrap().status,
        RoomStatus::Active
    );
}

#[tokio::test]
async fn rooms_are_created_once_listed_in_pages_and_updated() {
    let (broker, clock) = memory_broker(test_config()).await;
    for name in ["c", "a", "b", "d"] {
        broker
            .create_room(NewRoom::new(room(name), who("admin")).approved())
            .await
            .unwrap();
    }
    let dup = broker
        .create_room(NewRoom::new(room("a"), who("x")))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), "room_exists");
    let first = broker.rooms(None, Some(3)).unwrap();
    let names: Vec<_> = first.items.iter().map(|r| r.name.to_string()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    let after = postroom_tests::room(first.next_cursor.as_deref().unwrap());
    let rest = broker.rooms(Some(&after), Some(3)).unwrap();
    assert_eq!(
        rest.items
            .iter()
            .map(|r| r.name.to_string())
            .collect::<Vec<_>>(),
        ["d"]
    );
    assert_eq!(rest.next_cursor, None);

    clock.advance_ms(10);
    let patch = RoomPatch {
        description: Some("bed events".into()),
        ordered: Some(false),
        retention: Some(Retention {
            age_ms_max: Some(1000),
            bytes_max: None,
        }),
        status: Some(RoomStatus::Disabled),
        retry: None,
        subscription_approval: Some(true),
    };
    let updated = broker.update_room(&room("a"), patch).await.unwrap();
    assert_eq!(updated.description, "bed events");
    assert!(!updated.ordered);
    assert_eq!(updated.retention.age_ms_max, Some(1000));
    assert_eq!(updated.status, RoomStatus::Disabled);
    assert!(updated.subscription_approval);
    assert!(
        broker.room(&room("a")).unwrap().subscription_approval,
        "read back"
    );
    assert!(updated.updated_at > updated.created_at);
    let back = broker
        .update_room(
            &room("a"),
            RoomPatch {
                status: Some(RoomStatus::Pending),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(back.code(), "invalid_input");
    assert_eq!(
        broker.approve_room(&room("a")).await.unwrap_err().code(),
        "room_not_active"
    );
    assert_eq!(
        broker.room(&room("zz")).unwrap_err().code(),
        "room_not_found"
    );
}

#[tokio::test]
async fn disabled_rooms_refuse_events_but_stay_readable() {
    let (broker, _) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let r = broker.publish(moved("r", "p", 1)).await.unwrap();
    broker
        .update_room(
            &room("r"),
            RoomPatch {
                status: Some(RoomStatus::Disabled),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        broker.publish(moved("r", "p", 2)).await.unwrap_err().code(),
        "room_not_active"
    );
    assert_eq!(broker.event(r.id).unwrap().id, r.id);
    broker
        .update_room(
            &room("r"),
            RoomPatch {
                status: Some(RoomStatus::Active),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        broker.publish(moved("r", "p", 2)).await.unwrap().sequence.0,
        2
    );
}

#[tokio::test]
async fn deleted_rooms_vanish_and_a_new_room_of_that_name_starts_empty() {
    let (broker, _) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let old = broker.publish(moved("r", "p", 1)).await.unwrap();
    broker.delete_room(&room("r")).await.unwrap();
    assert_eq!(
        broker.room(&room("r")).unwrap_err().code(),
        "room_not_found"
    );
    assert_eq!(broker.event(old.id).unwrap_err().code(), "event_not_found");
    assert_eq!(
        broker.delete_room(&room("r")).await.unwrap_err().code(),
        "room_not_found"
    );
    setup_room(&broker, "r").await;
    let fresh = broker.publish(moved("r", "p", 1)).await.unwrap();
    assert_eq!(fresh.sequence.0, 1, "the new room's keys start again");
    let report = broker.sweep_retention().await.unwrap();
    // One event, one event type and its one schema version.
    assert_eq!(report.deleted_room_records_removed, 3, "{report:?}");
    assert!(!report.more);
    // The purge touched only the deleted incarnation.
    assert_eq!(broker.room(&room("r")).unwrap().events_stored, 1);
    assert_eq!(broker.event(fresh.id).unwrap().id, fresh.id);
}

#[tokio::test]
async fn limits_on_rooms_are_enforced() {
    let mut config = test_config();
    config.limits.rooms_max = 2;
    config.limits.description_bytes_max = 5;
    let (broker, _) = memory_broker(config).await;
    let mut long = NewRoom::new(room("a"), who("x"));
    long.description = "too long".into();
    assert_eq!(
        broker.create_room(long).await.unwrap_err().code(),
        "limit_exceeded"
    );
    // `rooms_max` bounds active Rooms; pending requests have bounds of their own.
    broker
        .create_room(NewRoom::new(room("a"), who("x")).approved())
        .await
        .unwrap();
    broker
        .create_room(NewRoom::new(room("b"), who("x")).approved())
        .await
        .unwrap();
    let err = broker
        .create_room(NewRoom::new(room("c"), who("x")).approved())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            broker_core::Error::LimitExceeded {
                limit: "rooms_max",
                ..
            }
        ),
        "{err:?}"
    );
}
