//! Fairness of a push subscription's slots (issue 15, defect 5): keys whose receiver hangs
//! cannot take every `in_flight_max` slot, healthy keys of the same subscription still get
//! through, and with every key hanging each key is tried in turn. The hanging receiver holds its
//! answer past the broker's push timeout; retries fall due at once and the manual clock never
//! moves, so what the dispatcher chooses depends on its policy alone, not on timing.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::time::Duration;

use broker_core::{
    Broker, DeliveryMode, DeliveryState, EventId, NewSubscription, PushEndpoint, RetryOverrides,
};
use postroom_tests::receiver::{Behaviour, Receiver};
use postroom_tests::{memory_broker, moved, room, setup_room, test_config, who};

const WAIT: Duration = Duration::from_secs(30);

/// An ordered push subscription of `supplier` to Room `r` with `in_flight_max` slots, whose
/// retries fall due at once (so a key that just failed is due again when its slot frees).
async fn ordered_push(broker: &Broker, url: String, in_flight_max: u32) {
    let mut new = NewSubscription::new(
        who("supplier"),
        DeliveryMode::Push(PushEndpoint {
            url,
            headers: vec![],
            basic_auth: None,
        }),
    );
    new.ordered = Some(true);
    new.in_flight_max = Some(in_flight_max);
    new.retry = RetryOverrides {
        initial_delay_ms: Some(0),
        multiplier: Some(1.0),
        delay_ms_max: Some(0),
        attempts_max: Some(100_000),
        ttl_ms: None,
        jitter_percent: Some(0),
    };
    broker.create_subscription(&room("r"), new).await.unwrap();
}

/// Issue 15, defect 5: keys whose receiver hangs took every `in_flight_max` slot of an ordered
/// push subscription, so that healthy keys waited as long as the hanging ones kept failing. Six
/// hanging keys are published first, then 20 healthy keys with two events each; the
/// subscription has 4 slots, of which slow keys may hold one (25 %). Every healthy event is
/// delivered, in order per key, while the hanging keys still hang (none of their events is
/// delivered). Before the fix the four oldest hanging keys were retried in every slot as it
/// freed and no healthy event was ever pushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_keys_cannot_take_every_slot_from_healthy_keys() {
    const HANGING: usize = 6;
    const HEALTHY: usize = 20;
    const PER_KEY: u64 = 2;
    let mut rx = Receiver::start().await;
    for h in 0..HANGING {
        rx.set_for_key(&format!("h{h}"), Behaviour::Hold);
    }
    let mut config = test_config();
    config.delivery.push_timeout_ms = 500;
    let (broker, _clock) = memory_broker(config).await;
    setup_room(&broker, "r").await;
    ordered_push(&broker, rx.url("a"), 4).await;
    let mut hanging: Vec<EventId> = Vec::new();
    for h in 0..HANGING {
        let receipt = broker.publish(moved("r", &format!("h{h}"), 1)).await;
        hanging.push(receipt.unwrap().id);
    }
    for n in 1..=PER_KEY {
        for g in 0..HEALTHY {
            broker
                .publish(moved("r", &format!("g{g}"), n))
                .await
                .unwrap();
        }
    }
    // Healthy events by key (the highest sequence pushed) and pushes by key, until every
    // healthy event was pushed. A healthy push may be repeated (it can time out on a loaded
    // machine) but never runs ahead of its key.
    let mut delivered: HashMap<String, u64> = HashMap::new();
    let mut pushes: HashMap<String, usize> = HashMap::new();
    let deadline = std::time::Instant::now() + WAIT;
    while !(delivered.len() == HEALTHY && delivered.values().all(|&n| n == PER_KEY)) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Some(r) = rx.next(left).await else {
            panic!(
                "healthy events not all pushed within {WAIT:?}: highest sequence pushed by \
                 healthy key {delivered:?}; pushes by key {pushes:?}"
            );
        };
        let key = r.header("postroom-key").to_string();
        *pushes.entry(key.clone()).or_default() += 1;
        if key.starts_with('g') {
            let seq: u64 = r.header("postroom-sequence").parse().unwrap();
            let last = delivered.get(&key).copied().unwrap_or(0);
            assert!(
                seq <= last + 1,
                "key {key}: {seq} pushed before {}",
                last + 1
            );
            delivered.insert(key, seq.max(last));
        }
    }
    assert!(
        pushes.keys().any(|k| k.starts_with('h')),
        "the hanging keys were tried: {pushes:?}"
    );
    for id in hanging {
        let states = broker.event_deliveries(id).unwrap();
        assert!(
            states.iter().all(|d| d.state != DeliveryState::Delivered),
            "a hanging key's event is still owed: {states:?}"
        );
    }
}

/// Issue 15, defect 5: with every key of an ordered push subscription hanging, the same few keys
/// (the oldest) were retried in every slot as it freed, and the others were never tried. Eight
/// keys hang on a subscription with 4 slots; every key is tried a second time before any is
/// tried a third: keys never tried go first, then slow keys take turns, least recently tried
/// first. Before the fix keys h00 to h03 were tried again and again and the others never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_key_hanging_each_key_is_tried_in_turn() {
    const KEYS: usize = 8;
    let mut rx = Receiver::start().await;
    rx.set(Behaviour::Hold);
    let mut config = test_config();
    config.delivery.push_timeout_ms = 500;
    let (broker, _clock) = memory_broker(config).await;
    setup_room(&broker, "r").await;
    ordered_push(&broker, rx.url("a"), 4).await;
    for k in 0..KEYS {
        broker
            .publish(moved("r", &format!("h{k:02}"), 1))
            .await
            .unwrap();
    }
    // The highest attempt pushed by key, until every key was pushed a second time. A push can
    // time out before the receiver sees it on a loaded machine, so one attempt more than two
    // is allowed; a key tried again and again while others wait is not.
    let mut highest: HashMap<String, u32> = HashMap::new();
    let mut pushes: Vec<(String, u32)> = Vec::new();
    let mut seen = 0;
    rx.collect_until(WAIT, |got| {
        for r in &got[seen..] {
            let key = r.header("postroom-key").to_string();
            let attempt: u32 = r.header("postroom-attempt").parse().unwrap();
            pushes.push((key.clone(), attempt));
            let n = highest.entry(key).or_default();
            *n = attempt.max(*n);
            assert!(
                *n <= 3,
                "a key was tried {n} times before every key was tried twice: {pushes:?}"
            );
        }
        seen = got.len();
        highest.len() == KEYS && highest.values().all(|&n| n >= 2)
    })
    .await;
}
