//! Tests of the push dispatcher's sending side that need a broker but no receiver.

use super::*;
use crate::clock::{ManualClock, Timestamp};
use crate::config::Config;
use crate::subscription::{NewSubscription, PushEndpoint};

/// Issue 15, item 10: the dispatcher sent a webhook unsigned (an empty `webhook-signature`)
/// when reading its signing secrets failed. Now such a push is not sent at all: it is an
/// ordinary failed attempt whose error says why. A push is made here for a subscription
/// that storage does not know (so the secrets read fails) and for one without a secret;
/// the target is a listening socket nobody accepts from, so any connection is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_whose_signing_secrets_cannot_be_read_is_not_sent() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    listener.set_nonblocking(true).expect("nonblocking");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let mut config = Config::default();
    config.retention.interval_ms = 0;
    config.delivery.push_allow.loopback = true;
    config.delivery.push_timeout_ms = 500;
    let clock = Arc::new(ManualClock::new(Timestamp(1_767_225_600_000)));
    let broker = Broker::open_in_memory(config, clock).await.expect("broker");
    let r = crate::testkit::TestRoom::create(&broker).await;
    // A pull subscription has no signing secret, and no dispatcher pushes its events.
    let pull = broker
        .create_subscription(
            &r.room,
            NewSubscription::new(r.admin.clone(), DeliveryMode::Pull),
        )
        .await
        .expect("subscription")
        .subscription;
    let receipt = broker.publish(r.event()).await.expect("publish");
    let due = DueDelivery {
        offset: 0,
        event_id: receipt.id,
        key: crate::ids::OrderingKey::new("k", 64).unwrap(),
        attempt: 1,
        published_at: receipt.received_at,
        queueing: 0,
    };
    let endpoint = DeliveryMode::Push(PushEndpoint {
        url,
        headers: vec![],
        basic_auth: None,
    });
    let mut unknown = pull.clone();
    unknown.id = SubscriptionId::new_v7();
    unknown.mode = endpoint.clone();
    let mut secretless = pull;
    secretless.mode = endpoint;
    for (sub, why) in [
        (unknown, "cannot read the signing secrets"),
        (secretless, "no valid signing secret"),
    ] {
        let response = push_one(&broker, &sub, &due).await.expect("an attempt");
        match listener.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("a push was sent unsigned ({why}): {other:?}, {response:?}"),
        }
        let error = response.error.unwrap_or_default();
        assert_eq!(response.status, None);
        assert!(
            error.starts_with("not sent") && error.contains(why),
            "{error}"
        );
    }
}

/// A push that would start once the broker began closing is not sent and is no attempt: it
/// records nothing (before, it was recorded as a failed attempt, so a closing node pushed the
/// delivery's attempt count and retry delay on to the node taking it over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_not_sent_because_the_broker_closes_is_no_attempt() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    listener.set_nonblocking(true).expect("nonblocking");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let mut config = Config::default();
    config.retention.interval_ms = 0;
    config.delivery.push_allow.loopback = true;
    let clock = Arc::new(ManualClock::new(Timestamp(1_767_225_600_000)));
    let broker = Broker::open_in_memory(config, clock).await.expect("broker");
    let r = crate::testkit::TestRoom::create(&broker).await;
    let sub = broker
        .create_subscription(
            &r.room,
            NewSubscription::new(
                r.admin.clone(),
                DeliveryMode::Push(PushEndpoint {
                    url,
                    headers: vec![],
                    basic_auth: None,
                }),
            ),
        )
        .await
        .expect("subscription")
        .subscription;
    let receipt = broker.publish(r.event()).await.expect("publish");
    let due = DueDelivery {
        offset: 0,
        event_id: receipt.id,
        key: crate::ids::OrderingKey::new("k", 64).unwrap(),
        attempt: 1,
        published_at: receipt.received_at,
        queueing: 0,
    };
    broker.begin_close();
    assert!(
        push_one(&broker, &sub, &due).await.is_none(),
        "not an attempt"
    );
    broker.close().await;
}
