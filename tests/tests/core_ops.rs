//! The core operations that the GovStack API and the HTTP idempotency layer stand on: creating an
//! event type without silently versioning it, deleting one, acknowledging by event id, stopping
//! an event's deliveries, and remembering responses under idempotency keys. Guards against a
//! deleted type reusing a version number, an ack landing on the wrong event, a stopped event
//! still being delivered, and a replayed answer for a different request.
#![forbid(unsafe_code)]

use broker_core::{
    DeliveryMode, DeliveryState, EventTypeSpec, NewSubscription, StoredResponse, SubscriptionId,
};
use postroom_tests::{memory_broker, moved, person_schema, room, setup_room, test_config, ty, who};
use serde_json::json;

fn spec(schema: serde_json::Value) -> EventTypeSpec {
    EventTypeSpec {
        name: ty("moved"),
        description: String::new(),
        schema,
        key_pointer: Some("/person".into()),
    }
}

#[tokio::test]
async fn create_only_refuses_an_existing_type_and_deletion_keeps_version_numbers() {
    let (broker, _) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let err = broker
        .create_event_type(&room("r"), spec(person_schema()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "event_type_exists");
    assert_eq!(
        broker.event_type(&room("r"), &ty("moved")).unwrap().version,
        1
    );

    broker.publish(moved("r", "a", 1)).await.unwrap();
    broker
        .delete_event_type(&room("r"), &ty("moved"))
        .await
        .unwrap();
    assert_eq!(
        broker
            .event_type(&room("r"), &ty("moved"))
            .unwrap_err()
            .code(),
        "event_type_not_found"
    );
    assert_eq!(
        broker.publish(moved("r", "a", 2)).await.unwrap_err().code(),
        "event_type_not_found",
        "nothing can be published to a deleted type"
    );
    assert_eq!(
        broker
            .delete_event_type(&room("r"), &ty("moved"))
            .await
            .unwrap_err()
            .code(),
        "event_type_not_found"
    );

    // Created again with another schema: version 2, so (type, 1) still names the first schema.
    let mut other = person_schema();
    other["properties"]["n"]["maximum"] = json!(5);
    let again = broker
        .create_event_type(&room("r"), spec(other.clone()))
        .await
        .unwrap();
    assert!(again.created);
    assert_eq!(again.event_type.version, 2);
    assert_eq!(
        broker
            .event_type_version(&room("r"), &ty("moved"), 1)
            .unwrap()
            .schema,
        person_schema()
    );
    assert_eq!(
        broker.publish(moved("r", "a", 9)).await.unwrap_err().code(),
        "schema_violation",
        "the new schema applies"
    );
    broker.publish(moved("r", "a", 3)).await.unwrap();
}

async fn pull_sub(broker: &broker_core::Broker) -> SubscriptionId {
    broker
        .create_subscription(
            &room("r"),
            NewSubscription::new(who("sub"), DeliveryMode::Pull),
        )
        .await
        .unwrap()
        .subscription
        .id
}

#[tokio::test]
async fn ack_by_event_id_settles_only_a_current_lease_of_that_subscription() {
    let (broker, _) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let sub = pull_sub(&broker).await;
    let other = pull_sub(&broker).await;
    let a = broker.publish(moved("r", "a", 1)).await.unwrap().id;
    let b = broker.publish(moved("r", "b", 1)).await.unwrap().id;

    // Queued but not pulled: nothing to acknowledge yet.
    assert_eq!(
        broker.ack_event(sub, a).await.unwrap_err().code(),
        "event_not_leased"
    );
    let pulled = broker.pull(sub, 1, None, 0).await.unwrap();
    assert_eq!(pulled[0].event.id, a);
    broker.ack_event(sub, a).await.unwrap();
    // Acknowledged: gone from the queue.
    assert_eq!(
        broker.ack_event(sub, a).await.unwrap_err().code(),
        "event_not_found"
    );
    // The other subscription's copy is untouched, and b is still queued here.
    assert_eq!(
        broker.ack_event(other, a).await.unwrap_err().code(),
        "event_not_leased"
    );
    assert_eq!(broker.pull(sub, 5, None, 0).await.unwrap()[0].event.id, b);
    let unknown = broker_core::EventId::new_v7();
    assert_eq!(
        broker.ack_event(sub, unknown).await.unwrap_err().code(),
        "event_not_found"
    );
    let states: Vec<_> = broker
        .event_deliveries(a)
        .unwrap()
        .into_iter()
        .map(|d| (d.subscription, d.state))
        .collect();
    assert!(states.contains(&(sub, DeliveryState::Delivered)));
    assert!(states.contains(&(other, DeliveryState::Pending)));
}

#[tokio::test]
async fn stopping_an_event_dead_letters_its_undelivered_copies_only() {
    let (broker, _) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let done = pull_sub(&broker).await;
    let leased = pull_sub(&broker).await;
    let queued = pull_sub(&broker).await;
    let e = broker.publish(moved("r", "a", 1)).await.unwrap().id;
    let next = broker.publish(moved("r", "a", 2)).await.unwrap().id;
    broker.pull(done, 1, None, 0).await.unwrap();
    broker.ack_event(done, e).await.unwrap();
    broker.pull(leased, 1, None, 0).await.unwrap();

    assert_eq!(broker.stop_event(e).await.unwrap(), 2);
    for (sub, want) in [
        (done, DeliveryState::Delivered),
        (leased, DeliveryState::DeadLettered),
        (queued, DeliveryState::DeadLettered),
    ] {
        let d = broker
            .event_deliveries(e)
            .unwrap()
            .into_iter()
            .find(|d| d.subscription == sub)
            .unwrap();
        assert_eq!(d.state, want);
    }
    let dead = broker.dead_letters(queued, None, None).unwrap();
    assert_eq!(dead.items[0].reason, "stopped");
    // The stopped head no longer holds back its key.
    assert_eq!(
        broker.pull(queued, 5, None, 0).await.unwrap()[0].event.id,
        next
    );
    // The holder of the old lease cannot acknowledge it any more.
    assert_eq!(
        broker.ack_event(leased, e).await.unwrap_err().code(),
        "event_not_found"
    );
    // Stopping again changes nothing; an unknown event is not found.
    assert_eq!(broker.stop_event(e).await.unwrap(), 0);
    assert_eq!(
        broker
            .stop_event(broker_core::EventId::new_v7())
            .await
            .unwrap_err()
            .code(),
        "event_not_found"
    );
}

#[tokio::test]
async fn remembered_responses_replay_within_the_window_and_conflict_for_another_request() {
    let config = test_config();
    let window = config.idempotency_window_ms;
    let (broker, clock) = memory_broker(config).await;
    let alice = who("alice");
    let first = StoredResponse {
        status: 201,
        body: br#"{"id":1}"#.to_vec(),
    };
    assert_eq!(
        broker.replay_response(&alice, "k1", b"POST /x {}").unwrap(),
        None
    );
    broker
        .remember_response(&alice, "k1", b"POST /x {}", first.clone())
        .await
        .unwrap();
    assert_eq!(
        broker.replay_response(&alice, "k1", b"POST /x {}").unwrap(),
        Some(first.clone())
    );
    assert_eq!(
        broker
            .replay_response(&alice, "k1", b"POST /x {\"a\":1}")
            .unwrap_err()
            .code(),
        "idempotency_conflict"
    );
    // Keys are per caller.
    assert_eq!(
        broker.replay_response(&who("bob"), "k1", b"other").unwrap(),
        None
    );
    // The first answer wins over a later remember.
    broker
        .remember_response(
            &alice,
            "k1",
            b"POST /x {}",
            StoredResponse {
                status: 200,
                body: b"{}".to_vec(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        broker.replay_response(&alice, "k1", b"POST /x {}").unwrap(),
        Some(first)
    );
    assert_eq!(
        broker.replay_response(&alice, "", b"x").unwrap_err().code(),
        "invalid_input"
    );

    // After the window the key is free again, and the sweep removes the record.
    clock.advance_ms(window + 1);
    assert_eq!(
        broker.replay_response(&alice, "k1", b"other").unwrap(),
        None
    );
    let report = broker.sweep_retention().await.unwrap();
    assert!(report.idempotency_removed >= 1);
}
