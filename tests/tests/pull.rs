//! Pull delivery with leases, on a manual clock: per-key FIFO, ack, nack with and without a
//! delay, lease expiry and extension, terminate, long-poll, and recovery after a reopen. Guards
//! against messages handed out twice at once, out of order, or lost when a lease lapses.
#![forbid(unsafe_code)]

use std::time::Duration;

use broker_core::{Broker, DeliveryMode, NewSubscription, RetryOverrides, SubscriptionId};
use postroom_tests::pull::{pull_sub, seqs};
use postroom_tests::{memory_broker, moved, room, setup_room, test_config, who, T0};

/// Room `r` with one event of key `a`, pulled once and nacked for `delay_ms` (no jitter):
/// its second attempt falls due `delay_ms` from now.
async fn nacked_for(broker: &Broker, delay_ms: u64) -> SubscriptionId {
    setup_room(broker, "r").await;
    let retry = RetryOverrides {
        jitter_percent: Some(0),
        ..Default::default()
    };
    let sub = pull_sub(broker, retry).await;
    broker.publish(moved("r", "a", 0)).await.unwrap();
    let m = broker.pull(sub, 1, None, 0).await.unwrap();
    broker
        .nack(sub, &[m[0].ack_id.clone()], Some(delay_ms))
        .await
        .unwrap()[0]
        .as_ref()
        .unwrap();
    sub
}

#[tokio::test]
async fn ordered_pull_hands_out_one_message_per_key_until_acked() {
    let (broker, _) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let sub = pull_sub(&broker, RetryOverrides::default()).await;
    for n in 0..3 {
        broker.publish(moved("r", "a", n)).await.unwrap();
        broker.publish(moved("r", "b", n)).await.unwrap();
    }
    let first = broker.pull(sub, 10, None, 0).await.unwrap();
    assert_eq!(
        seqs(&first),
        [("a".into(), 1), ("b".into(), 1)],
        "only each key's head"
    );
    assert!(first.iter().all(|m| m.attempt == 1));
    assert!(
        broker.pull(sub, 10, None, 0).await.unwrap().is_empty(),
        "heads are leased: nothing else may go"
    );
    let acks = broker.ack(sub, &[first[0].ack_id.clone()]).await.unwrap();
    assert!(acks[0].is_ok());
    let next = broker.pull(sub, 10, None, 0).await.unwrap();
    assert_eq!(seqs(&next), [("a".into(), 2)]);
    // Acking twice, or with a stale id, says the lease is not held.
    let again = broker.ack(sub, &[first[0].ack_id.clone()]).await.unwrap();
    assert_eq!(again[0].as_ref().unwrap_err().code(), "lease_not_held");
    assert_eq!(
        broker
            .ack(sub, &["garbage".into()])
            .await
            .unwrap_err()
            .code(),
        "invalid_input"
    );
    assert_eq!(broker.subscription(sub).unwrap().backlog, 5);
}

#[tokio::test]
async fn unordered_pull_hands_out_everything_due() {
    let (broker, _) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let mut new = NewSubscription::new(who("d"), DeliveryMode::Pull);
    new.ordered = Some(false);
    let sub = broker
        .create_subscription(&room("r"), new)
        .await
        .unwrap()
        .subscription
        .id;
    for n in 0..5 {
        broker.publish(moved("r", "a", n)).await.unwrap();
    }
    assert_eq!(broker.pull(sub, 3, None, 0).await.unwrap().len(), 3);
    assert_eq!(broker.pull(sub, 10, None, 0).await.unwrap().len(), 2);
}

#[tokio::test]
async fn expired_leases_are_redelivered_with_the_next_attempt_number() {
    let (broker, clock) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let retry = RetryOverrides {
        initial_delay_ms: Some(1000),
        jitter_percent: Some(0),
        ..Default::default()
    };
    let sub = pull_sub(&broker, retry).await;
    broker.publish(moved("r", "a", 0)).await.unwrap();
    let m = broker.pull(sub, 1, Some(5000), 0).await.unwrap();
    assert_eq!(m[0].lease_until, broker.now().plus_ms(5000));
    // Extending keeps it leased past the first deadline.
    clock.advance_ms(4000);
    assert!(broker
        .extend(sub, &[m[0].ack_id.clone()], 5000)
        .await
        .unwrap()[0]
        .is_ok());
    clock.advance_ms(4000);
    assert!(
        broker.pull(sub, 1, None, 0).await.unwrap().is_empty(),
        "still leased after the extension"
    );
    // Lease lapses: the expiry counts as a failed attempt and the retry policy applies.
    clock.advance_ms(1001);
    assert!(
        broker.pull(sub, 1, None, 0).await.unwrap().is_empty(),
        "retry not yet due"
    );
    clock.advance_ms(1000);
    let again = broker.pull(sub, 1, None, 0).await.unwrap();
    assert_eq!(again[0].attempt, 2);
    assert_ne!(again[0].ack_id, m[0].ack_id);
    assert_eq!(
        broker.ack(sub, &[m[0].ack_id.clone()]).await.unwrap()[0]
            .as_ref()
            .unwrap_err()
            .code(),
        "lease_not_held"
    );
    let outcomes: Vec<_> = broker
        .attempts(sub, None, None)
        .unwrap()
        .items
        .iter()
        .map(|a| a.outcome)
        .collect();
    use broker_core::AttemptOutcome::*;
    assert_eq!(outcomes, [LeaseExpired, Leased]);
}

#[tokio::test]
async fn nack_follows_the_policy_or_an_explicit_delay_and_terminate_dead_letters() {
    let (broker, clock) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let retry = RetryOverrides {
        initial_delay_ms: Some(10_000),
        attempts_max: Some(3),
        jitter_percent: Some(0),
        ..Default::default()
    };
    let sub = pull_sub(&broker, retry).await;
    let e = broker.publish(moved("r", "a", 0)).await.unwrap();
    let m = broker.pull(sub, 1, None, 0).await.unwrap();
    broker
        .nack(sub, &[m[0].ack_id.clone()], None)
        .await
        .unwrap()[0]
        .as_ref()
        .unwrap();
    clock.advance_ms(9_999);
    assert!(
        broker.pull(sub, 1, None, 0).await.unwrap().is_empty(),
        "the backoff holds"
    );
    clock.advance_ms(1);
    let m = broker.pull(sub, 1, None, 0).await.unwrap();
    assert_eq!(m[0].attempt, 2);
    broker
        .nack(sub, &[m[0].ack_id.clone()], Some(500))
        .await
        .unwrap()[0]
        .as_ref()
        .unwrap();
    clock.advance_ms(500);
    let m = broker.pull(sub, 1, None, 0).await.unwrap();
    assert_eq!(m[0].attempt, 3);
    // The third failure exhausts the policy.
    broker
        .nack(sub, &[m[0].ack_id.clone()], None)
        .await
        .unwrap()[0]
        .as_ref()
        .unwrap();
    let dead = broker.dead_letters(sub, None, None).unwrap();
    assert_eq!(
        (dead.items[0].event_id, dead.items[0].reason.as_str()),
        (e.id, "attempts_exhausted")
    );
    // Terminate goes straight there.
    let e2 = broker.publish(moved("r", "b", 0)).await.unwrap();
    let m = broker.pull(sub, 1, None, 0).await.unwrap();
    broker.terminate(sub, &[m[0].ack_id.clone()]).await.unwrap()[0]
        .as_ref()
        .unwrap();
    let dead = broker.dead_letters(sub, None, None).unwrap();
    assert_eq!(
        (dead.items[1].event_id, dead.items[1].reason.as_str()),
        (e2.id, "terminated")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_returns_as_soon_as_an_event_arrives() {
    let (broker, _) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let sub = pull_sub(&broker, RetryOverrides::default()).await;
    let puller = {
        let broker = broker.clone();
        tokio::spawn(async move { broker.pull(sub, 1, None, 20_000).await })
    };
    // Publish once the puller is waiting; it must wake without waiting out its 20 s.
    tokio::task::yield_now().await;
    let started = std::time::Instant::now();
    broker.publish(moved("r", "a", 0)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(15), puller)
        .await
        .expect("long poll woke")
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), 1);
    assert!(started.elapsed() < Duration::from_secs(15));
    // An empty wait returns empty, bounded by its wait.
    assert!(broker.pull(sub, 1, None, 50).await.unwrap().is_empty());
}

/// How long the long-polls of the issue 15 tests wait: far longer than they may take to answer.
const LONG_WAIT: Duration = Duration::from_secs(10);

/// Starts a pull of one message that waits up to [`LONG_WAIT`], and returns once its first look
/// at the queue has been applied by the writer (nothing else writes meanwhile), so that what
/// the test does next happens during the pull's wait. Returns the pull and when it started.
async fn waiting_pull(
    broker: &Broker,
    sub: SubscriptionId,
) -> (
    tokio::task::JoinHandle<broker_core::Result<Vec<broker_core::PulledMessage>>>,
    std::time::Instant,
) {
    let ops = broker.writer_counters().ops;
    let started = std::time::Instant::now();
    let puller = {
        let broker = broker.clone();
        let wait_ms = LONG_WAIT.as_millis() as u64;
        tokio::spawn(async move { broker.pull(sub, 1, None, wait_ms).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while broker.writer_counters().ops == ops {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pull never looked at its queue"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (puller, started)
}

/// Issue 15, defect 4: a long-poll wakes when a message falls due by time during its wait (here
/// a nack's retry delay runs out), not only when something is written. On the manual clock the
/// delay runs out when the clock is moved: the waiting pull must then hand the message out at
/// once, not answer empty at the end of its wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_wakes_when_a_retry_delay_runs_out_during_its_wait() {
    let (broker, clock) = memory_broker(test_config()).await;
    let sub = nacked_for(&broker, 1000).await;
    let (puller, started) = waiting_pull(&broker, sub).await;
    clock.advance_ms(1000);
    let got = puller.await.unwrap().unwrap();
    assert_eq!(
        seqs(&got),
        [("a".into(), 1)],
        "the retry fell due during the wait"
    );
    assert_eq!(got[0].attempt, 2);
    assert!(
        started.elapsed() < LONG_WAIT,
        "answered before its wait ended"
    );
}

/// Issue 15, defect 4, on the system clock: the retry delay runs out in real time during the
/// wait, and the waiting pull hands the message out then, not at the end of its wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_on_the_system_clock_wakes_when_a_retry_delay_runs_out() {
    let broker = postroom_tests::system_broker(test_config()).await;
    let sub = nacked_for(&broker, 300).await;
    let started = std::time::Instant::now();
    let got = broker
        .pull(sub, 1, None, LONG_WAIT.as_millis() as u64)
        .await
        .unwrap();
    assert_eq!(
        seqs(&got),
        [("a".into(), 1)],
        "the retry fell due during the wait"
    );
    assert!(
        started.elapsed() < LONG_WAIT,
        "answered before its wait ended"
    );
}

/// Issue 15, defect 4: a long-poll wakes when a lease runs out during its wait. The waiting pull
/// itself records the expiry when the clock passes the lease's end (no other caller looks), then
/// hands the message out when the backoff the expiry earned has passed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_wakes_when_a_lease_runs_out_during_its_wait() {
    let (broker, clock) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let retry = RetryOverrides {
        initial_delay_ms: Some(1000),
        jitter_percent: Some(0),
        ..Default::default()
    };
    let sub = pull_sub(&broker, retry).await;
    broker.publish(moved("r", "a", 0)).await.unwrap();
    let m = broker.pull(sub, 1, Some(2000), 0).await.unwrap();
    let (puller, started) = waiting_pull(&broker, sub).await;
    clock.advance_ms(2000);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = broker.attempts(sub, None, None).unwrap().items;
        if log[0].outcome == broker_core::AttemptOutcome::LeaseExpired {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the waiting pull did not wake when the lease ran out"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(!puller.is_finished(), "the retry is not due yet");
    clock.advance_ms(1000);
    let got = puller.await.unwrap().unwrap();
    assert_eq!(seqs(&got), [("a".into(), 1)]);
    assert_eq!(got[0].attempt, 2);
    assert_ne!(got[0].ack_id, m[0].ack_id);
    assert!(
        started.elapsed() < LONG_WAIT,
        "answered before its wait ended"
    );
}

/// Issue 15, defect 4 (and item 5): closing the broker answers a long-poll in flight at once,
/// empty, rather than at the end of its wait; a pull that starts once closing has begun is
/// refused with `shutting_down`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_answers_a_long_poll_at_once_and_refuses_new_pulls() {
    let (broker, _) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let sub = pull_sub(&broker, RetryOverrides::default()).await;
    let (puller, _) = waiting_pull(&broker, sub).await;
    broker.close().await;
    let got = tokio::time::timeout(Duration::from_secs(5), puller)
        .await
        .expect("the long-poll was answered when the broker closed")
        .unwrap();
    assert!(got.unwrap().is_empty());
    assert_eq!(
        broker.pull(sub, 1, None, 1000).await.unwrap_err().code(),
        "shutting_down"
    );
}

#[tokio::test]
async fn pull_limits_are_enforced() {
    let (broker, _) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let sub = pull_sub(&broker, RetryOverrides::default()).await;
    let check = |r: broker_core::Result<Vec<broker_core::PulledMessage>>, code: &str| {
        assert_eq!(r.unwrap_err().code(), code)
    };
    check(broker.pull(sub, 0, None, 0).await, "invalid_input");
    check(broker.pull(sub, 1_000_000, None, 0).await, "limit_exceeded");
    check(broker.pull(sub, 1, Some(0), 0).await, "limit_exceeded");
    check(
        broker.pull(sub, 1, None, 10_000_000).await,
        "limit_exceeded",
    );
    assert_eq!(
        broker
            .extend(sub, &[], 100_000_000)
            .await
            .unwrap_err()
            .code(),
        "limit_exceeded"
    );
}

/// Leases and attempt counts are durable: after a reopen, a lease that was out is honoured until
/// its deadline and then redelivered with the next attempt number.
#[tokio::test]
async fn leases_and_queues_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.redb");
    let clock = broker_core::ManualClock::new(T0);
    let open = || Broker::open_with_clock(&path, test_config(), std::sync::Arc::new(clock.clone()));
    let sub;
    {
        let broker = open().await.unwrap();
        setup_room(&broker, "r").await;
        sub = pull_sub(
            &broker,
            RetryOverrides {
                initial_delay_ms: Some(1),
                jitter_percent: Some(0),
                ..Default::default()
            },
        )
        .await;
        broker.publish(moved("r", "a", 0)).await.unwrap();
        broker.publish(moved("r", "b", 0)).await.unwrap();
        let m = broker.pull(sub, 1, Some(10_000), 0).await.unwrap();
        assert_eq!(m[0].event.key.as_str(), "a");
        broker.close().await;
    }
    let broker = open().await.unwrap();
    let m = broker.pull(sub, 10, None, 0).await.unwrap();
    assert_eq!(seqs(&m), [("b".into(), 1)], "a's lease is still out");
    // Past the deadline plus the 1 ms backoff that a lapsed lease earns.
    clock.advance_ms(10_002);
    let m2 = broker.pull(sub, 10, None, 0).await.unwrap();
    assert_eq!(seqs(&m2), [("a".into(), 1)]);
    assert_eq!(m2[0].attempt, 2);
}

#[tokio::test]
async fn retry_policy_layers_broker_then_room_then_subscription() {
    let mut config = test_config();
    config.delivery.retry.attempts_max = 7;
    config.delivery.retry.initial_delay_ms = 111;
    let (broker, _) = memory_broker(config).await;
    setup_room(&broker, "r").await;
    let room_retry = RetryOverrides {
        attempts_max: Some(5),
        delay_ms_max: Some(9_000),
        ..Default::default()
    };
    broker
        .update_room(
            &room("r"),
            broker_core::RoomPatch {
                retry: Some(room_retry),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let sub = pull_sub(
        &broker,
        RetryOverrides {
            attempts_max: Some(2),
            ..Default::default()
        },
    )
    .await;
    let eff = broker.subscription(sub).unwrap().retry_effective;
    assert_eq!(
        (eff.attempts_max, eff.delay_ms_max, eff.initial_delay_ms),
        (2, 9_000, 111)
    );
}
