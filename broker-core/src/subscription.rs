//! Subscriptions and what the delivery engine reports about them, as plain data. A subscription
//! says who receives which event types of a Room, how (push to a URL, or pull from a leased
//! queue), in what order and with what retry policy.

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::ids::{
    EventId, EventTypeName, OrderingKey, Principal, RoomName, Sequence, SubscriptionId,
};
use crate::model::Event;

/// The retry schedule of a subscription: exponential backoff with jitter, bounded by attempts
/// and by time since publishing. After either bound, the delivery goes to the dead letters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Delay before the second attempt, in milliseconds.
    pub initial_delay_ms: u64,
    /// Factor applied to the delay after each failed attempt (at least 1).
    pub multiplier: f64,
    /// Longest delay between two attempts, in milliseconds.
    pub delay_ms_max: u64,
    /// Most attempts, the first included.
    pub attempts_max: u32,
    /// Time to live from publishing, in milliseconds: no attempt starts after it.
    pub ttl_ms: u64,
    /// Random reduction of each delay, in percent (0 to 100), so that many failed deliveries do
    /// not retry in lockstep.
    pub jitter_percent: u8,
}

impl Default for RetryPolicy {
    /// About 25 attempts over three days, as the Book a Secure Move webhooks do.
    fn default() -> Self {
        RetryPolicy {
            initial_delay_ms: 1000,
            multiplier: 2.0,
            delay_ms_max: 3_600_000,
            attempts_max: 25,
            ttl_ms: 3 * 24 * 3_600_000,
            jitter_percent: 20,
        }
    }
}

/// Overrides of a [`RetryPolicy`]; `None` keeps the value from the level below (broker default,
/// then the Room's, then the subscription's).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryOverrides {
    /// See [`RetryPolicy::initial_delay_ms`].
    pub initial_delay_ms: Option<u64>,
    /// See [`RetryPolicy::multiplier`].
    pub multiplier: Option<f64>,
    /// See [`RetryPolicy::delay_ms_max`].
    pub delay_ms_max: Option<u64>,
    /// See [`RetryPolicy::attempts_max`].
    pub attempts_max: Option<u32>,
    /// See [`RetryPolicy::ttl_ms`].
    pub ttl_ms: Option<u64>,
    /// See [`RetryPolicy::jitter_percent`].
    pub jitter_percent: Option<u8>,
}

impl RetryOverrides {
    /// `base` with these overrides applied.
    pub fn apply(&self, base: &RetryPolicy) -> RetryPolicy {
        RetryPolicy {
            initial_delay_ms: self.initial_delay_ms.unwrap_or(base.initial_delay_ms),
            multiplier: self.multiplier.unwrap_or(base.multiplier),
            delay_ms_max: self.delay_ms_max.unwrap_or(base.delay_ms_max),
            attempts_max: self.attempts_max.unwrap_or(base.attempts_max),
            ttl_ms: self.ttl_ms.unwrap_or(base.ttl_ms),
            jitter_percent: self.jitter_percent.unwrap_or(base.jitter_percent),
        }
    }
}

/// HTTP Basic credentials a push endpoint requires (Book a Secure Move suppliers use them).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BasicAuth {
    /// The user name.
    pub username: String,
    /// The password. Never shown back by the API and never logged.
    pub password: String,
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicAuth")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// What a write-only value is shown as.
pub const REDACTED: &str = "***";

/// Where and how push deliveries are sent.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushEndpoint {
    /// An `http` or `https` URL, without credentials (they go in `basic_auth`).
    pub url: String,
    /// Extra request headers (names are checked; Postroom's own headers cannot be replaced).
    /// The values are write-only: they often carry an API key.
    pub headers: Vec<(String, String)>,
    /// Optional HTTP Basic credentials.
    pub basic_auth: Option<BasicAuth>,
}

impl PushEndpoint {
    /// The endpoint as it may be shown to anyone who may read the subscription (its Room's
    /// managers too): header values replaced by [`REDACTED`], credentials in the URL (refused
    /// since issue 14, but possibly stored before) replaced by it, and the Basic password
    /// emptied. Header names, the URL and the Basic user name stay visible.
    pub fn redacted(&self) -> PushEndpoint {
        PushEndpoint {
            url: redact_url(&self.url),
            headers: self
                .headers
                .iter()
                .map(|(name, _)| (name.clone(), REDACTED.to_string()))
                .collect(),
            basic_auth: self.basic_auth.as_ref().map(|b| BasicAuth {
                username: b.username.clone(),
                password: String::new(),
            }),
        }
    }
}

/// `url` with any user name and password replaced by [`REDACTED`]; as it was when it does not
/// parse or has none.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            redact_userinfo(&mut u);
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Replaces a URL's user name and password with [`REDACTED`].
pub(crate) fn redact_userinfo(u: &mut reqwest::Url) {
    if !u.username().is_empty() || u.password().is_some() {
        // Only URLs that cannot have credentials refuse these, and those have none.
        let _ = u.set_password(None);
        let _ = u.set_username(REDACTED);
    }
}

impl std::fmt::Debug for PushEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = self.redacted();
        f.debug_struct("PushEndpoint")
            .field("url", &shown.url)
            .field("headers", &shown.headers)
            .field("basic_auth", &self.basic_auth)
            .finish()
    }
}

/// How a subscription receives its events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum DeliveryMode {
    /// The broker POSTs each event to an endpoint, signed per Standard Webhooks.
    Push(PushEndpoint),
    /// The subscriber pulls events from a leased queue and acknowledges them.
    Pull,
}

/// Whether a subscription receives events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubscriptionStatus {
    /// Waiting for the Room manager's approval: nothing is queued for it.
    Pending,
    /// Events are queued and delivered.
    Active,
    /// Events are queued but not delivered until resumed.
    Paused,
    /// Nothing is queued or delivered (e.g. the endpoint answered 410 Gone); see the reason.
    Disabled,
}

impl SubscriptionStatus {
    /// The lower-case name used in APIs.
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Pending => "pending",
            SubscriptionStatus::Active => "active",
            SubscriptionStatus::Paused => "paused",
            SubscriptionStatus::Disabled => "disabled",
        }
    }
}

/// A request to subscribe to a Room.
#[derive(Clone, Debug, PartialEq)]
pub struct NewSubscription {
    /// Who subscribes.
    pub subscriber: Principal,
    /// Which event types; `None` for all.
    pub event_types: Option<Vec<EventTypeName>>,
    /// Push or pull.
    pub mode: DeliveryMode,
    /// Per-key FIFO; `None` takes the Room's default.
    pub ordered: Option<bool>,
    /// Retry overrides on top of the Room's policy.
    pub retry: RetryOverrides,
    /// Most deliveries in flight at once; `None` takes the broker default.
    pub in_flight_max: Option<u32>,
    /// Most undelivered events kept for it; `None` takes the broker default. Beyond it, new
    /// events go straight to its dead letters (reason `queue_full`), where they can be redriven;
    /// the publisher and other subscriptions are not affected.
    pub queue_depth_max: Option<u64>,
    /// True when the Room needs no approval for this subscriber (or it was given): the
    /// subscription starts active; otherwise pending.
    pub approved: bool,
}

impl NewSubscription {
    /// An approved subscription to every event type with broker defaults.
    pub fn new(subscriber: Principal, mode: DeliveryMode) -> Self {
        NewSubscription {
            subscriber,
            event_types: None,
            mode,
            ordered: None,
            retry: RetryOverrides::default(),
            in_flight_max: None,
            queue_depth_max: None,
            approved: true,
        }
    }
}

/// Changes to a subscription; `None` leaves a field as it is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SubscriptionPatch {
    /// New event-type filter (`Some(None)` for all types).
    pub event_types: Option<Option<Vec<EventTypeName>>>,
    /// New push endpoint (push subscriptions only).
    pub push: Option<PushEndpoint>,
    /// New ordering.
    pub ordered: Option<bool>,
    /// New retry overrides (replacing the old ones).
    pub retry: Option<RetryOverrides>,
    /// New in-flight bound.
    pub in_flight_max: Option<u32>,
    /// New queue bound.
    pub queue_depth_max: Option<u64>,
}

/// A subscription as it stands.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Subscription {
    /// Its id.
    pub id: SubscriptionId,
    /// The Room.
    pub room: RoomName,
    /// Who subscribes.
    pub subscriber: Principal,
    /// Which event types; `None` for all.
    pub event_types: Option<Vec<EventTypeName>>,
    /// Push or pull.
    pub mode: DeliveryMode,
    /// Per-key FIFO.
    pub ordered: bool,
    /// The subscription's own retry overrides.
    pub retry: RetryOverrides,
    /// The policy in force (broker default, Room, subscription).
    pub retry_effective: RetryPolicy,
    /// Most deliveries in flight.
    pub in_flight_max: u32,
    /// Most undelivered events kept.
    pub queue_depth_max: u64,
    /// Status.
    pub status: SubscriptionStatus,
    /// Why it is disabled or paused, when the broker did it.
    pub status_reason: Option<String>,
    /// Undelivered events (pending or in flight).
    pub backlog: u64,
    /// Dead letters kept.
    pub dead_letters: u64,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
}

impl Subscription {
    /// The subscription as it may be shown: its push endpoint [`PushEndpoint::redacted`].
    /// Every answer that shows a subscription goes through this.
    pub fn redacted(&self) -> Subscription {
        let mut shown = self.clone();
        if let DeliveryMode::Push(p) = &self.mode {
            shown.mode = DeliveryMode::Push(p.redacted());
        }
        shown
    }
}

/// A new subscription and, for push, its signing secret, shown only this once.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CreatedSubscription {
    /// The subscription.
    pub subscription: Subscription,
    /// `whsec_...`, the Standard Webhooks signing secret (push only).
    pub secret: Option<String>,
}

/// Where one event stands for one subscription.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Waiting for its turn or its next attempt.
    Pending,
    /// Leased to a puller.
    InFlight,
    /// Delivered (push answered 2xx) or acknowledged (pull).
    Delivered,
    /// In the dead letters.
    DeadLettered,
}

/// One event's state for one subscription.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EventDelivery {
    /// The subscription.
    pub subscription: SubscriptionId,
    /// The state.
    pub state: DeliveryState,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due (pending only).
    pub next_attempt_at: Option<Timestamp>,
    /// The last error, if any.
    pub last_error: Option<String>,
}

/// What one attempt came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// The endpoint answered 2xx.
    Delivered,
    /// The endpoint failed, timed out or answered non-2xx.
    Failed,
    /// Handed to a puller under a lease.
    Leased,
    /// The puller acknowledged it.
    Acked,
    /// The puller gave it back.
    Nacked,
    /// The lease ran out without an acknowledgement.
    LeaseExpired,
    /// The puller sent it to the dead letters.
    Terminated,
    /// Moved to the dead letters by the broker (attempts, TTL, full queue).
    DeadLettered,
}

/// One logged attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Attempt {
    /// The event.
    pub event_id: EventId,
    /// The attempt number, from 1.
    pub attempt: u32,
    /// When it ended.
    pub at: Timestamp,
    /// What happened.
    pub outcome: AttemptOutcome,
    /// The HTTP status, for push.
    pub status: Option<u16>,
    /// The error text, if any.
    pub error: Option<String>,
    /// How long it took, in milliseconds.
    pub latency_ms: u64,
}

/// An event in a subscription's dead letters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// The event.
    pub event_id: EventId,
    /// Its key.
    pub key: OrderingKey,
    /// Its sequence.
    pub sequence: Sequence,
    /// Attempts made.
    pub attempts: u32,
    /// Why: `attempts_exhausted`, `ttl_expired`, `queue_full`, `terminated`.
    pub reason: String,
    /// The last error.
    pub last_error: Option<String>,
    /// When it was dead-lettered.
    pub dead_at: Timestamp,
}

/// A key whose head event is failing, holding back the key's later events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BlockedKey {
    /// The key.
    pub key: OrderingKey,
    /// The head event.
    pub head_event_id: EventId,
    /// Its sequence.
    pub sequence: Sequence,
    /// Attempts made on it.
    pub attempts: u32,
    /// The last error.
    pub last_error: Option<String>,
    /// When it will be tried again.
    pub next_attempt_at: Timestamp,
}

/// A message handed out by a pull.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PulledMessage {
    /// Pass back to ack, nack, extend or terminate.
    pub ack_id: String,
    /// The attempt number this lease is.
    pub attempt: u32,
    /// When the lease ends.
    pub lease_until: Timestamp,
    /// The event with its payload.
    pub event: Event,
}

/// Where to seek a subscription to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeekTarget {
    /// The oldest event the Room still holds.
    Oldest,
    /// The first event received at or after this time.
    Time(Timestamp),
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn push_secrets_are_redacted_and_kept_out_of_debug() {
        let p = PushEndpoint {
            url: "https://user:pa55@hooks.example.org/x?y=1".into(),
            headers: vec![("X-Api-Key".into(), "k3y".into())],
            basic_auth: Some(BasicAuth {
                username: "u".into(),
                password: "pw".into(),
            }),
        };
        let shown = p.redacted();
        assert_eq!(shown.url, "https://***@hooks.example.org/x?y=1");
        assert_eq!(shown.headers, vec![("X-Api-Key".into(), "***".into())]);
        assert_eq!(
            shown.basic_auth.as_ref().map(|b| b.password.as_str()),
            Some("")
        );
        let debug = format!("{p:?}");
        for secret in ["pa55", "k3y", "pw"] {
            assert!(!debug.contains(secret), "{debug}");
        }
        assert_eq!(redact_url("http://h/p"), "http://h/p");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
