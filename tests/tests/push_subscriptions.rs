//! Which push subscriptions may be made: bad ones are refused with their reason, push targets
//! on non-public addresses only when allowed, and event-type filters and pending subscriptions
//! deliver what they should. Split from `push.rs`, which tests delivery itself.
#![forbid(unsafe_code)]

use broker_core::{DeliveryMode, NewSubscription, PushEndpoint, SubscriptionStatus};
use postroom_tests::push::{push_to, WAIT};
use postroom_tests::receiver::Receiver;
use postroom_tests::{memory_broker, moved, room, setup_room, test_config, who};

#[tokio::test]
async fn bad_subscriptions_are_refused() {
    let (broker, _) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let check = |new: NewSubscription, code: &'static str| {
        let broker = broker.clone();
        async move {
            let err = broker
                .create_subscription(&room("r"), new)
                .await
                .unwrap_err();
            assert_eq!(err.code(), code, "{err}");
        }
    };
    check(push_to("ftp://x/y".into()), "invalid_input").await;
    check(push_to("not a url".into()), "invalid_input").await;
    let mut reserved = push_to("http://127.0.0.1:1/x".into());
    if let DeliveryMode::Push(p) = &mut reserved.mode {
        p.headers
            .push(("webhook-signature".into(), "forged".into()));
    }
    check(reserved, "invalid_input").await;
    let mut zero = push_to("http://127.0.0.1:1/x".into());
    zero.in_flight_max = Some(0);
    check(zero, "invalid_input").await;
    let mut huge = push_to("http://127.0.0.1:1/x".into());
    huge.in_flight_max = Some(1_000_000);
    check(huge, "limit_exceeded").await;
    let mut bad_retry = push_to("http://127.0.0.1:1/x".into());
    bad_retry.retry.multiplier = Some(0.5);
    check(bad_retry, "invalid_input").await;
    let mut unknown_type = push_to("http://127.0.0.1:1/x".into());
    unknown_type.event_types = Some(vec![postroom_tests::ty("nope")]);
    check(unknown_type, "event_type_not_found").await;
    let err = broker
        .create_subscription(&room("zz"), push_to("http://127.0.0.1:1/x".into()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "room_not_found");
    let unknown = broker_core::SubscriptionId::new_v7();
    assert_eq!(
        broker.subscription(unknown).unwrap_err().code(),
        "subscription_not_found"
    );
    assert_eq!(
        broker.pause_subscription(unknown).await.unwrap_err().code(),
        "subscription_not_found"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_type_filters_and_pending_subscriptions() {
    let mut rx = Receiver::start().await;
    let (broker, _) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    broker
        .put_event_type(
            &room("r"),
            broker_core::EventTypeSpec {
                name: postroom_tests::ty("other"),
                description: String::new(),
                schema: serde_json::json!({"type": "object"}),
                key_pointer: None,
            },
        )
        .await
        .unwrap();
    let mut only_other = push_to(rx.url("other"));
    only_other.event_types = Some(vec![postroom_tests::ty("other")]);
    broker
        .create_subscription(&room("r"), only_other)
        .await
        .unwrap();
    let mut pending = push_to(rx.url("pending"));
    pending.approved = false;
    let pending = broker
        .create_subscription(&room("r"), pending)
        .await
        .unwrap()
        .subscription;
    assert_eq!(pending.status, SubscriptionStatus::Pending);
    broker.publish(moved("r", "p", 1)).await.unwrap();
    broker
        .publish(broker_core::PublishRequest::new(
            room("r"),
            postroom_tests::ty("other"),
            who("p"),
            b"{}".to_vec(),
        ))
        .await
        .unwrap();
    let got = rx.next(WAIT).await.unwrap();
    assert_eq!(
        (got.path.as_str(), got.header("postroom-event-type")),
        ("other", "other")
    );
    assert_eq!(
        broker.subscription(pending.id).unwrap().backlog,
        0,
        "pending subscriptions queue nothing"
    );
    broker.approve_subscription(pending.id).await.unwrap();
    broker.publish(moved("r", "p", 2)).await.unwrap();
    let got = rx.next(WAIT).await.unwrap();
    assert_eq!(
        (got.path.as_str(), got.header("postroom-sequence")),
        ("pending", "2")
    );
}

/// The `push.url` refusal of a subscription call, or a panic naming what came back instead.
fn refusal(outcome: Result<impl std::fmt::Debug, broker_core::Error>) -> String {
    match outcome {
        Err(broker_core::Error::InvalidInput { field, message }) if field == "push.url" => message,
        other => panic!("expected invalid push.url, got {other:?}"),
    }
}

/// The push target guard: with the default configuration, endpoints on loopback, private,
/// link-local or metadata addresses are refused when the subscription is made or changed, in
/// every spelling (a name, a mapped IPv6 literal), and a name that does not resolve is refused
/// too. Allowing loopback opens loopback only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_public_push_targets_are_refused_unless_allowed() {
    let rx = Receiver::start().await;
    let port = rx
        .base
        .rsplit(':')
        .next()
        .expect("the receiver's base URL has a port")
        .to_string();
    let loopback_urls = [
        (format!("http://127.0.0.1:{port}/x"), "127.0.0.1"),
        (format!("http://localhost:{port}/x"), "localhost"),
        (
            format!("http://[::ffff:127.0.0.1]:{port}/x"),
            "::ffff:127.0.0.1",
        ),
    ];

    let mut config = test_config();
    config.delivery.push_allow = broker_core::PushAllow::default();
    let (broker, _) = memory_broker(config).await;
    setup_room(&broker, "r").await;
    for (url, host) in &loopback_urls {
        let message = refusal(
            broker
                .create_subscription(&room("r"), push_to(url.clone()))
                .await,
        );
        // A literal is judged as written, so its class is named; a name's refusal names no
        // address and no class (the broker's DNS answers are not the subscriber's to read).
        let says = if *host == "localhost" {
            "is not an allowed push target"
        } else {
            "a loopback address"
        };
        assert!(
            message.contains(host)
                && message.contains(says)
                && message.contains("delivery.push_allow"),
            "{url}: {message}"
        );
    }
    let message = refusal(
        broker
            .create_subscription(&room("r"), push_to("http://localhost:1/x".into()))
            .await,
    );
    assert!(
        message.starts_with("`localhost` is not an allowed push target:")
            && !message.contains("127.0.0.1"),
        "{message}"
    );
    for (url, says) in [
        ("http://10.1.2.3/x", "10.1.2.3 is a private address"),
        ("http://169.254.169.254/latest", "a cloud metadata address"),
        ("http://[fe80::1]/x", "a link-local address"),
        ("http://0.0.0.0:8080/x", "an unspecified address"),
        ("http://no-such-host.invalid/x", "no-such-host.invalid"),
    ] {
        let message = refusal(
            broker
                .create_subscription(&room("r"), push_to(url.into()))
                .await,
        );
        assert!(message.contains(says), "{url}: {message}");
    }
    // Changing an endpoint is checked like making one. (A public literal needs no DNS, and
    // nothing is published, so nothing is sent to it.)
    let public = broker
        .create_subscription(&room("r"), push_to("http://93.184.215.14/x".into()))
        .await
        .expect("a public target is allowed");
    let patch = broker_core::SubscriptionPatch {
        push: Some(PushEndpoint {
            url: loopback_urls[0].0.clone(),
            headers: vec![],
            basic_auth: None,
        }),
        ..Default::default()
    };
    let message = refusal(
        broker
            .update_subscription(public.subscription.id, patch)
            .await,
    );
    assert!(message.contains("a loopback address"), "{message}");
    let kept = broker.subscription(public.subscription.id).unwrap();
    assert!(
        matches!(&kept.mode, DeliveryMode::Push(p) if p.url == "http://93.184.215.14/x"),
        "the refused change was not applied: {:?}",
        kept.mode
    );
    assert_eq!(broker.subscriptions(&room("r")).unwrap().len(), 1);

    // test_config allows loopback, and nothing else.
    let (broker, _) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    for (url, _) in &loopback_urls {
        broker
            .create_subscription(&room("r"), push_to(url.clone()))
            .await
            .unwrap_or_else(|e| panic!("{url} is allowed with loopback: {e}"));
    }
    let message = refusal(
        broker
            .create_subscription(&room("r"), push_to("http://10.1.2.3/x".into()))
            .await,
    );
    assert!(message.contains("a private address"), "{message}");
}

/// A malformed range in `push_allow.cidrs` stops the broker from opening, naming the setting.
#[tokio::test]
async fn a_bad_push_allow_range_is_a_configuration_error() {
    let mut config = test_config();
    config.delivery.push_allow.cidrs = vec!["10.0.0.0/8".into(), "10.0.0.1/8".into()];
    let err =
        broker_core::Broker::open_in_memory(config, std::sync::Arc::new(broker_core::SystemClock))
            .await
            .expect_err("a range with host bits set is refused");
    let text = err.to_string();
    assert!(
        text.contains("delivery.push_allow.cidrs") && text.contains("10.0.0.1/8"),
        "{text}"
    );
}
