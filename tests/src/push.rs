//! Helpers for the push tests: a push subscription to a local receiver, a retry policy that
//! retries at once, and waiting for what the broker does on its own.

use std::time::Duration;

use broker_core::{
    Broker, DeliveryMode, NewSubscription, PushEndpoint, RetryOverrides, SubscriptionId,
};

use crate::{room, who};

/// How long a test waits for something the broker does on its own.
pub const WAIT: Duration = Duration::from_secs(30);

/// Subscribes `supplier` to Room `r` by push to `url`, with `retry`.
pub async fn push_sub(broker: &Broker, url: String, retry: RetryOverrides) -> SubscriptionId {
    let mut new = push_to(url);
    new.retry = retry;
    broker
        .create_subscription(&room("r"), new)
        .await
        .unwrap()
        .subscription
        .id
}

/// A push subscription of `supplier` to `url`, with the defaults.
pub fn push_to(url: String) -> NewSubscription {
    NewSubscription::new(
        who("supplier"),
        DeliveryMode::Push(PushEndpoint {
            url,
            headers: vec![],
            basic_auth: None,
        }),
    )
}

/// A retry policy that tries again at once, up to 1,000 times.
pub fn fast_retry() -> RetryOverrides {
    RetryOverrides {
        initial_delay_ms: Some(1),
        multiplier: Some(1.0),
        delay_ms_max: Some(1),
        attempts_max: Some(1000),
        ttl_ms: None,
        jitter_percent: Some(0),
    }
}

/// Polls `check` until it holds, failing after `WAIT`; for state the broker writes asynchronously.
pub async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
