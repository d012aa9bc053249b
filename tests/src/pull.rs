//! Helpers for the pull tests: a pull subscription and the (key, sequence) of what a pull
//! handed out.

use broker_core::{Broker, DeliveryMode, NewSubscription, RetryOverrides, SubscriptionId};

use crate::{room, who};

/// Subscribes `dashboard` to Room `r` by pull, with `retry`.
pub async fn pull_sub(broker: &Broker, retry: RetryOverrides) -> SubscriptionId {
    let mut new = NewSubscription::new(who("dashboard"), DeliveryMode::Pull);
    new.retry = retry;
    broker
        .create_subscription(&room("r"), new)
        .await
        .unwrap()
        .subscription
        .id
}

/// The (key, sequence) of each message, in order.
pub fn seqs(msgs: &[broker_core::PulledMessage]) -> Vec<(String, u64)> {
    msgs.iter()
        .map(|m| (m.event.key.to_string(), m.event.sequence.0))
        .collect()
}
