//! Pull subscriptions over time: seek (by time, after the clock stepped back, with the caller
//! gone), redrive, stopped events, Room deletion, expired leases in the attempt log, a stalled
//! key behind a long queue, and ordering turned on with leases out. Split from `pull.rs`, which
//! tests leasing, settling and long-polls.
#![forbid(unsafe_code)]

use std::time::Duration;

use broker_core::{DeliveryMode, NewSubscription, RetryOverrides};
use postroom_tests::pull::{pull_sub, seqs};
use postroom_tests::{memory_broker, moved, room, setup_room, test_config, who, T0};

#[tokio::test]
async fn seek_to_a_time_requeues_from_there_and_delete_removes_the_subscription() {
    let (broker, clock) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let sub = pull_sub(&broker, RetryOverrides::default()).await;
    let mut receipts = Vec::new();
    for n in 0..4 {
        clock.advance_ms(1000);
        receipts.push(
            broker
                .publish(moved("r", &format!("k{n}"), n))
                .await
                .unwrap(),
        );
    }
    let all = broker.pull(sub, 10, None, 0).await.unwrap();
    let acks: Vec<String> = all.iter().map(|m| m.ack_id.clone()).collect();
    broker.ack(sub, &acks).await.unwrap();
    assert_eq!(broker.subscription(sub).unwrap().backlog, 0);
    let queued = broker
        .seek(sub, broker_core::SeekTarget::Time(receipts[2].received_at))
        .await
        .unwrap();
    assert_eq!(queued, 2);
    let again = broker.pull(sub, 10, None, 0).await.unwrap();
    let ids: Vec<_> = again.iter().map(|m| m.event.id).collect();
    assert_eq!(ids, [receipts[2].id, receipts[3].id]);
    assert!(
        again.iter().all(|m| m.attempt == 2),
        "attempt numbers carry on after a seek"
    );

    broker.delete_subscription(sub).await.unwrap();
    assert_eq!(
        broker.subscription(sub).unwrap_err().code(),
        "subscription_not_found"
    );
    assert_eq!(
        broker.pull(sub, 1, None, 0).await.unwrap_err().code(),
        "subscription_not_found"
    );
    let report = broker.sweep_retention().await.unwrap();
    assert!(
        report.deleted_subscription_records_removed >= 2,
        "{report:?}"
    );
    assert_eq!(broker.backlog_total().unwrap(), 0);
}

/// Review findings: seek over a log with holes terminates; seek and redrive never leave one event
/// both queued and dead; a redriven older event never goes out while a newer one of its key is
/// leased; a deleted Room takes its subscriptions along; a huge cursor is just an empty page.
#[tokio::test]
async fn seek_redrive_and_room_deletion_edge_cases() {
    let (broker, clock) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let sub = pull_sub(&broker, RetryOverrides::default()).await;
    let mut ids = Vec::new();
    for n in 0..10 {
        clock.advance_ms(1000);
        ids.push(
            broker
                .publish(moved("r", &format!("k{n}"), n))
                .await
                .unwrap(),
        );
    }
    // Dead-letter the first, acknowledge the rest, let retention remove the acknowledged ones.
    let msgs = broker.pull(sub, 10, None, 0).await.unwrap();
    broker
        .terminate(sub, &[msgs[0].ack_id.clone()])
        .await
        .unwrap();
    let rest: Vec<String> = msgs[1..].iter().map(|m| m.ack_id.clone()).collect();
    broker.ack(sub, &rest).await.unwrap();
    broker
        .update_room(
            &room("r"),
            broker_core::RoomPatch {
                retention: Some(broker_core::Retention {
                    age_ms_max: Some(1),
                    bytes_max: None,
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    clock.advance_ms(100);
    assert_eq!(broker.sweep_retention().await.unwrap().events_removed, 9);
    clock.advance_ms(1000);
    let late = broker.publish(moved("r", "k9", 10)).await.unwrap();
    // The log now has a hole between offset 0 and 10: a seek between them must end.
    let t = ids[5].received_at;
    let queued = tokio::time::timeout(
        Duration::from_secs(10),
        broker.seek(sub, broker_core::SeekTarget::Time(t)),
    )
    .await
    .expect("seek terminates")
    .unwrap();
    assert_eq!(queued, 1, "only the late event is at or after t");
    // Seek to the oldest requeues the dead-lettered event and retires its dead letter.
    broker
        .seek(sub, broker_core::SeekTarget::Oldest)
        .await
        .unwrap();
    let s = broker.subscription(sub).unwrap();
    assert_eq!((s.backlog, s.dead_letters), (2, 0));
    assert_eq!(broker.redrive(sub, None).await.unwrap(), 0);
    let _ = late;

    // A redriven older event waits while a newer event of its key is leased.
    let a1 = broker.publish(moved("r", "solo", 1)).await.unwrap();
    let _a2 = broker.publish(moved("r", "solo", 2)).await.unwrap();
    let drain = broker.pull(sub, 10, None, 0).await.unwrap();
    let first = drain
        .iter()
        .find(|m| m.event.id == a1.id)
        .expect("solo head")
        .ack_id
        .clone();
    broker.terminate(sub, &[first]).await.unwrap();
    let second = broker.pull(sub, 10, None, 0).await.unwrap();
    assert_eq!(
        second
            .iter()
            .filter(|m| m.event.key.as_str() == "solo")
            .count(),
        1
    );
    broker.redrive(sub, Some(vec![a1.id])).await.unwrap();
    let third = broker.pull(sub, 10, None, 0).await.unwrap();
    assert!(
        third.iter().all(|m| m.event.key.as_str() != "solo"),
        "two events of one key must not be out at once"
    );

    let huge = broker
        .dead_letters(sub, Some("18446744073709551615"), None)
        .unwrap();
    assert!(huge.items.is_empty());

    broker.delete_room(&room("r")).await.unwrap();
    assert_eq!(
        broker.subscription(sub).unwrap_err().code(),
        "subscription_not_found"
    );
}

/// Issue 15, defect 9. Stopping an event logged its dead-lettering as attempt n without
/// raising the delivery's attempt count, so after a redrive the next attempt took the same
/// number and overwrote that row of the attempt log. Now the stop is an attempt of its own.
#[tokio::test]
async fn a_stopped_then_redriven_event_keeps_every_attempt_in_its_log() {
    let (broker, _) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let sub = pull_sub(&broker, RetryOverrides::default()).await;
    let event = broker.publish(moved("r", "ann", 1)).await.unwrap().id;
    assert_eq!(broker.stop_event(event).await.unwrap(), 1);
    assert_eq!(broker.redrive(sub, Some(vec![event])).await.unwrap(), 1);
    let pulled = broker.pull(sub, 10, None, 0).await.unwrap();
    assert_eq!(pulled.len(), 1);
    assert_eq!(
        pulled[0].attempt, 2,
        "the redriven delivery reused the stop's number"
    );
    let log = broker.attempts(sub, None, None).unwrap().items;
    let numbers: Vec<u32> = log.iter().map(|a| a.attempt).collect();
    assert_eq!(numbers, vec![1, 2], "{log:?}");
    assert_eq!(log[0].error.as_deref(), Some("stopped by the publisher"));
}

/// Issue 15, defect 9. The attempt log's row for an expired lease always said it took 0 ms;
/// it now says how long the lease was held.
#[tokio::test]
async fn an_expired_lease_is_logged_with_how_long_it_was_held() {
    let (broker, clock) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let sub = pull_sub(&broker, RetryOverrides::default()).await;
    broker.publish(moved("r", "ann", 1)).await.unwrap();
    assert_eq!(broker.pull(sub, 1, Some(1000), 0).await.unwrap().len(), 1);
    clock.advance_ms(60_000);
    // The next pull notices the expiry.
    broker.pull(sub, 1, None, 0).await.unwrap();
    let log = broker.attempts(sub, None, None).unwrap().items;
    let expired = log
        .iter()
        .find(|a| a.outcome == broker_core::AttemptOutcome::LeaseExpired)
        .unwrap_or_else(|| panic!("no expired lease in {log:?}"));
    assert_eq!(expired.latency_ms, 1000, "{expired:?}");
}

/// Issue 15, defect 1. A seek is several writes, and the subscription hands out nothing while
/// one runs. It ran in the caller's task, so a caller that stopped waiting (a request timeout,
/// a dropped connection) after the first write left the subscription holding its deliveries
/// until a restart. Now the seek finishes on its own, and the subscription delivers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seek_whose_caller_gave_up_still_lets_the_subscription_go() {
    let (broker, _) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let sub = pull_sub(&broker, RetryOverrides::default()).await;
    for n in 1..=3 {
        broker.publish(moved("r", "ann", n)).await.unwrap();
    }
    let first = broker.pull(sub, 10, None, 0).await.unwrap();
    assert_eq!(first.len(), 1, "ordered: one of the key at a time");
    // Polled once (its first write handed to the writer), then dropped. A writer on another
    // core may finish a small seek within that one poll, and then nobody gave up: retry.
    let mut gave_up = false;
    for _ in 0..50 {
        use std::future::Future;
        let mut seek = std::pin::pin!(broker.seek(sub, broker_core::SeekTarget::Oldest));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if seek.as_mut().poll(&mut cx).is_pending() {
            gave_up = true;
            break;
        }
    }
    assert!(gave_up, "every seek finished within one poll");
    // The seek completes without its caller: the key's first event is handed out again. A
    // long-poll is woken by the seek's last write (ending it), so no pause is needed between
    // tries; the deadline bounds the wait.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = broker.pull(sub, 10, None, 1_000).await.unwrap();
        if !got.is_empty() {
            assert_eq!(seqs(&got), vec![("ann".to_string(), 1)]);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the subscription stayed held by a seek nobody waited for"
        );
    }
}

/// Issue 15, defect 10: a seek by time binary-searches the Room's log by acceptance time, but
/// acceptance times came from a wall clock that can step back, so the log was not in time order
/// and the search could skip events received after the target (here the one at 20 s). Now an
/// event is never stamped earlier than the one before it in its Room.
#[tokio::test]
async fn a_seek_by_time_finds_every_later_event_after_the_clock_stepped_back() {
    let (broker, clock) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let sub = pull_sub(&broker, RetryOverrides::default()).await;
    let mut receipts = Vec::new();
    for (n, at_s) in [10u64, 20, 15, 25].into_iter().enumerate() {
        clock.set(broker_core::Timestamp(T0.as_ms() + at_s * 1000));
        receipts.push(
            broker
                .publish(moved("r", &format!("k{n}"), n as u64))
                .await
                .unwrap(),
        );
    }
    assert!(
        receipts
            .windows(2)
            .all(|w| w[0].received_at <= w[1].received_at),
        "acceptance times never go back within a Room: {:?}",
        receipts.iter().map(|r| r.received_at).collect::<Vec<_>>()
    );
    let all = broker.pull(sub, 10, None, 0).await.unwrap();
    let acks: Vec<String> = all.iter().map(|m| m.ack_id.clone()).collect();
    broker.ack(sub, &acks).await.unwrap();
    let target = broker_core::Timestamp(T0.as_ms() + 18_000);
    broker
        .seek(sub, broker_core::SeekTarget::Time(target))
        .await
        .unwrap();
    let again = broker.pull(sub, 10, None, 0).await.unwrap();
    let ids: Vec<_> = again.iter().map(|m| m.event.id).collect();
    assert_eq!(
        ids,
        [receipts[1].id, receipts[2].id, receipts[3].id],
        "every event from the one received at 20 s on is replayed"
    );
}

/// Issue 15, defect 6: finding what may go out walked a subscription's queue from the front
/// within `scan_records_max` records, so a key whose head was failing, with that many events
/// behind it, hid every other key of the subscription. Now what may go out comes from an index
/// of ready heads by due time, and a stalled key costs the others nothing.
#[tokio::test]
async fn a_stalled_key_with_a_long_queue_does_not_hide_other_keys() {
    let mut config = test_config();
    config.delivery.scan_records_max = 50;
    let (broker, _clock) = memory_broker(config).await;
    setup_room(&broker, "r").await;
    let sub = pull_sub(&broker, RetryOverrides::default()).await;
    // Key `a`: its head fails and is retried in an hour; 60 more events wait behind it.
    for n in 0..61 {
        broker.publish(moved("r", "a", n)).await.unwrap();
    }
    let head = broker.pull(sub, 1, None, 0).await.unwrap();
    assert_eq!(seqs(&head), [("a".to_string(), 1)]);
    broker
        .nack(sub, &[head[0].ack_id.clone()], Some(3_600_000))
        .await
        .unwrap();
    // Key `b` is published after all of them.
    broker.publish(moved("r", "b", 0)).await.unwrap();
    let got = broker.pull(sub, 10, None, 0).await.unwrap();
    assert_eq!(
        seqs(&got),
        [("b".to_string(), 1)],
        "the other key's event goes out; nothing of the stalled key does"
    );
}

/// Turning ordering on rebuilds the subscription's index of ready work. Events leased while the
/// subscription was unordered are still out: the key stays held until their leases end, so that
/// the older event given back meanwhile does not go out beside them. Before the fix the rebuilt
/// index held nothing, and the older event went out at once while two newer ones were leased.
#[tokio::test]
async fn turning_ordering_on_keeps_a_key_held_by_leases_already_out() {
    let (broker, clock) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let mut new = NewSubscription::new(who("dashboard"), DeliveryMode::Pull);
    new.ordered = Some(false);
    new.retry = RetryOverrides {
        jitter_percent: Some(0),
        ..RetryOverrides::default()
    };
    let sub = broker
        .create_subscription(&room("r"), new)
        .await
        .unwrap()
        .subscription
        .id;
    for n in 0..3 {
        broker.publish(moved("r", "a", n)).await.unwrap();
    }
    let out = broker.pull(sub, 3, Some(10_000), 0).await.unwrap();
    assert_eq!(out.len(), 3, "unordered: all three at once");
    // The oldest is given back, due again at once; the two newer stay leased for 10 s.
    broker
        .nack(sub, &[out[0].ack_id.clone()], Some(0))
        .await
        .unwrap();
    let patch = broker_core::SubscriptionPatch {
        ordered: Some(true),
        ..Default::default()
    };
    broker.update_subscription(sub, patch).await.unwrap();
    assert!(
        broker.pull(sub, 3, None, 0).await.unwrap().is_empty(),
        "the key is held while newer events of it are leased"
    );
    // Once those leases have run out, the key's oldest event goes out first.
    clock.advance_ms(10_001);
    let next = broker.pull(sub, 3, None, 0).await.unwrap();
    assert_eq!(seqs(&next), [("a".to_string(), 1)]);
}
