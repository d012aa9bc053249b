//! Retention: age and byte bounds per Room, idempotency expiry, bounded sweeps. Guards against
//! retention deleting too much, too little, or stalling the writer with one huge transaction.
#![forbid(unsafe_code)]

use broker_core::{EventFilter, NewRoom, Retention, RoomPatch};
use postroom_tests::{memory_broker, moved, padded, room, setup_room, test_config, who};

async fn set_retention(broker: &broker_core::Broker, name: &str, retention: Retention) {
    broker
        .update_room(
            &room(name),
            RoomPatch {
                retention: Some(retention),
                ..Default::default()
            },
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn events_older_than_the_age_bound_are_removed() {
    let (broker, clock) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    setup_room(&broker, "keep").await;
    set_retention(
        &broker,
        "r",
        Retention {
            age_ms_max: Some(10_000),
            bytes_max: None,
        },
    )
    .await;
    let mut receipts = Vec::new();
    for i in 0..6 {
        receipts.push(broker.publish(moved("r", "p", i)).await.unwrap());
        broker.publish(moved("keep", "p", i)).await.unwrap();
        clock.advance_ms(3_000);
    }
    // Now = 18 s after the first event; events at 0, 3, 6 s are older than 10 s.
    let report = broker.sweep_retention().await.unwrap();
    assert_eq!(report.events_removed, 3, "{report:?}");
    let left = broker
        .events(&room("r"), EventFilter::default())
        .await
        .unwrap();
    let left_ids: Vec<_> = left.items.iter().map(|e| e.id).collect();
    assert_eq!(
        left_ids,
        receipts[3..].iter().map(|r| r.id).collect::<Vec<_>>()
    );
    assert_eq!(
        broker.event(receipts[0].id).unwrap_err().code(),
        "event_not_found"
    );
    assert_eq!(broker.room(&room("r")).unwrap().events_stored, 3);
    assert_eq!(
        broker.room(&room("keep")).unwrap().events_stored,
        6,
        "rooms without bounds keep everything"
    );
    // Sequences continue after removal: a key never reuses a number.
    assert_eq!(
        broker.publish(moved("r", "p", 9)).await.unwrap().sequence.0,
        7
    );
}

#[tokio::test]
async fn the_oldest_events_go_while_the_room_is_over_its_byte_bound() {
    let (broker, _) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    for i in 0..10 {
        broker.publish(padded("r", "p", i, 1000)).await.unwrap();
    }
    let before = broker.room(&room("r")).unwrap();
    assert_eq!(before.events_stored, 10);
    let per_event = before.bytes_stored / 10;
    set_retention(
        &broker,
        "r",
        Retention {
            age_ms_max: None,
            bytes_max: Some(per_event * 4),
        },
    )
    .await;
    let report = broker.sweep_retention().await.unwrap();
    assert_eq!(report.events_removed, 6);
    let after = broker.room(&room("r")).unwrap();
    assert_eq!(after.events_stored, 4);
    assert!(after.bytes_stored <= per_event * 4);
    let seqs: Vec<u64> = broker
        .events(&room("r"), EventFilter::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|e| e.sequence.0)
        .collect();
    assert_eq!(seqs, [7, 8, 9, 10], "the newest are kept");
}

#[tokio::test]
async fn sweeps_are_bounded_and_report_remaining_work() {
    let mut config = test_config();
    config.retention.delete_batch_max = 4;
    let (broker, clock) = memory_broker(config).await;
    broker
        .create_room(NewRoom::new(room("r"), who("a")).approved())
        .await
        .unwrap();
    setup_room(&broker, "s").await;
    for i in 0..10 {
        broker.publish(moved("s", "p", i)).await.unwrap();
    }
    set_retention(
        &broker,
        "s",
        Retention {
            age_ms_max: Some(1),
            bytes_max: None,
        },
    )
    .await;
    clock.advance_ms(10);
    let mut removed = Vec::new();
    loop {
        let r = broker.sweep_retention().await.unwrap();
        assert!(r.events_removed <= 4);
        removed.push(r.events_removed);
        if !r.more {
            break;
        }
    }
    assert_eq!(removed.iter().sum::<u64>(), 10);
    assert!(removed.len() >= 3, "{removed:?}");
    assert_eq!(broker.room(&room("s")).unwrap().events_stored, 0);
}

#[tokio::test]
async fn expired_idempotency_records_are_swept() {
    let mut config = test_config();
    config.idempotency_window_ms = 1000;
    let (broker, clock) = memory_broker(config).await;
    setup_room(&broker, "r").await;
    for i in 0..3 {
        let mut req = moved("r", "p", i);
        req.idempotency_key = Some(format!("k{i}"));
        broker.publish(req).await.unwrap();
    }
    assert_eq!(
        broker.sweep_retention().await.unwrap().idempotency_removed,
        0
    );
    clock.advance_ms(1001);
    assert_eq!(
        broker.sweep_retention().await.unwrap().idempotency_removed,
        3
    );
    assert_eq!(
        broker.sweep_retention().await.unwrap().idempotency_removed,
        0
    );
}

/// Sequence counters are checkpointed lazily and recovered from the log at open. Retention may
/// delete every event of a key; the key's next sequence must still continue, across a reopen too.
#[tokio::test]
async fn sequences_never_repeat_after_retention_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.redb");
    let clock = broker_core::ManualClock::new(postroom_tests::T0);
    let open = || {
        broker_core::Broker::open_with_clock(
            &path,
            test_config(),
            std::sync::Arc::new(clock.clone()),
        )
    };
    {
        let broker = open().await.unwrap();
        setup_room(&broker, "r").await;
        for i in 0..5 {
            broker.publish(moved("r", "p", i)).await.unwrap();
        }
        set_retention(
            &broker,
            "r",
            Retention {
                age_ms_max: Some(10),
                bytes_max: None,
            },
        )
        .await;
        clock.advance_ms(100);
        assert_eq!(broker.sweep_retention().await.unwrap().events_removed, 5);
        // Published after the checkpoint the sweep made: recovered from the log at open.
        broker.publish(moved("r", "q", 0)).await.unwrap();
        broker.close().await;
    }
    let broker = open().await.unwrap();
    assert_eq!(broker.room(&room("r")).unwrap().events_stored, 1);
    assert_eq!(
        broker.publish(moved("r", "p", 5)).await.unwrap().sequence.0,
        6
    );
    assert_eq!(
        broker.publish(moved("r", "q", 1)).await.unwrap().sequence.0,
        2
    );
}

/// Retention never removes an event a subscriber is still owed; once delivered, it can go.
#[tokio::test]
async fn events_owed_to_a_subscriber_outlive_their_retention() {
    let (broker, clock) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let sub = broker
        .create_subscription(
            &room("r"),
            broker_core::NewSubscription::new(who("d"), broker_core::DeliveryMode::Pull),
        )
        .await
        .unwrap()
        .subscription
        .id;
    for i in 0..3 {
        broker
            .publish(moved("r", &format!("k{i}"), i))
            .await
            .unwrap();
    }
    set_retention(
        &broker,
        "r",
        Retention {
            age_ms_max: Some(10),
            bytes_max: None,
        },
    )
    .await;
    clock.advance_ms(100);
    let report = broker.sweep_retention().await.unwrap();
    assert_eq!(
        (report.events_removed, report.events_kept_owed),
        (0, 3),
        "{report:?}"
    );
    let msgs = broker.pull(sub, 2, None, 0).await.unwrap();
    let acks: Vec<String> = msgs.iter().map(|m| m.ack_id.clone()).collect();
    assert!(broker
        .ack(sub, &acks)
        .await
        .unwrap()
        .iter()
        .all(|r| r.is_ok()));
    let report = broker.sweep_retention().await.unwrap();
    assert_eq!(
        (report.events_removed, report.events_kept_owed),
        (2, 1),
        "{report:?}"
    );
    assert_eq!(broker.room(&room("r")).unwrap().events_stored, 1);
}

/// A pull subscription on Room `r` (unordered), for holding events owed.
async fn puller(broker: &broker_core::Broker) -> broker_core::SubscriptionId {
    broker
        .create_subscription(
            &room("r"),
            broker_core::NewSubscription::new(who("sub"), broker_core::DeliveryMode::Pull),
        )
        .await
        .unwrap()
        .subscription
        .id
}

/// Issue 15, defect 6: each sweep looked only at a window at the front of a Room's log; when
/// that window held events still owed to a subscriber (which stay), the removable events behind
/// them were never reached, and the Room's bounds went unenforced. Now each sweep goes on from
/// where the last one stopped.
#[tokio::test]
async fn events_owed_at_the_front_do_not_hide_removable_ones_from_the_sweep() {
    let mut config = test_config();
    config.retention.delete_batch_max = 2;
    let (broker, clock) = memory_broker(config).await;
    setup_room(&broker, "r").await;
    set_retention(
        &broker,
        "r",
        Retention {
            age_ms_max: Some(10_000),
            bytes_max: None,
        },
    )
    .await;
    let sub = puller(&broker).await;
    for i in 0..12 {
        broker
            .publish(moved("r", &format!("k{i}"), i))
            .await
            .unwrap();
    }
    // The first 8 stay owed (leased, never settled); the last 4 are done.
    let pulled = broker.pull(sub, 12, Some(600_000), 0).await.unwrap();
    assert_eq!(pulled.len(), 12);
    let done: Vec<String> = pulled[8..].iter().map(|m| m.ack_id.clone()).collect();
    broker.ack(sub, &done).await.unwrap();
    clock.advance_ms(60_000);
    let mut removed = 0;
    for _ in 0..6 {
        removed += broker.sweep_retention().await.unwrap().events_removed;
    }
    assert_eq!(
        removed, 4,
        "every event past its age and owed to no one went"
    );
    assert_eq!(broker.room(&room("r")).unwrap().events_stored, 8);
}

/// Issue 15, defect 6: dead-letter expiry looked only at the first dead letters of a
/// subscription (in log order); recent ones there hid expired ones behind them. Now each sweep
/// goes on from where the last one stopped.
#[tokio::test]
async fn recent_dead_letters_at_the_front_do_not_hide_expired_ones() {
    let mut config = test_config();
    config.retention.delete_batch_max = 2;
    config.delivery.dead_letter_retention_ms = 30_000;
    let (broker, clock) = memory_broker(config).await;
    setup_room(&broker, "r").await;
    let sub = puller(&broker).await;
    for i in 0..12 {
        broker
            .publish(moved("r", &format!("k{i}"), i))
            .await
            .unwrap();
    }
    let pulled = broker.pull(sub, 12, Some(600_000), 0).await.unwrap();
    let ids = |ms: &[broker_core::PulledMessage]| -> Vec<String> {
        ms.iter().map(|m| m.ack_id.clone()).collect()
    };
    // The last 4 die first, and expire; the first 8 die later, and do not.
    broker.terminate(sub, &ids(&pulled[8..])).await.unwrap();
    clock.advance_ms(60_000);
    broker.terminate(sub, &ids(&pulled[..8])).await.unwrap();
    let mut expired = 0;
    for _ in 0..8 {
        expired += broker.sweep_retention().await.unwrap().dead_letters_expired;
    }
    assert_eq!(expired, 4, "every expired dead letter went");
    assert_eq!(broker.subscription(sub).unwrap().dead_letters, 8);
}
