//! The delivery half of the [`Broker`] API: subscriptions (create, change, pause, resume,
//! approve, delete, rotate the secret); pulling, settling, dead letters, the attempt log and
//! blocked keys are in `queue_api.rs`, replay in `seek.rs`. Input is checked here, on the
//! caller's task; every change goes through the writer like a publish does.

use std::time::Duration;

use crate::broker::{unexpected, Broker};
use crate::dispatch::ensure_dispatcher;
use crate::error::{Error, Result};
use crate::ids::{RoomName, SubscriptionId};
use crate::net_guard::{literal_ip, lookup};
use crate::storage::{DeliveryOp, WriteOp, WriteOutput};
use crate::subscription::{
    CreatedSubscription, DeliveryMode, NewSubscription, PushEndpoint, RetryOverrides, Subscription,
    SubscriptionPatch, SubscriptionStatus,
};
use crate::webhook::new_secret;

/// Headers a subscription may not set: they carry the broker's own meaning.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "host",
    "authorization",
    "transfer-encoding",
    "connection",
];
/// Records moved per writer operation when redriving, purging or seeking, so that one request
/// never holds the writer for long.
pub(crate) const BULK_STEP_MAX: usize = 1000;

impl Broker {
    pub(crate) async fn delivery(&self, op: DeliveryOp) -> Result<WriteOutput> {
        self.write_op(WriteOp::Delivery(op)).await
    }

    async fn subscription_op(&self, op: DeliveryOp) -> Result<Subscription> {
        match self.delivery(op).await? {
            WriteOutput::Subscription(s, _) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    pub(crate) fn check_retry(&self, r: &RetryOverrides) -> Result<()> {
        if r.multiplier
            .is_some_and(|m| !m.is_finite() || !(1.0..=100.0).contains(&m))
        {
            return Err(Error::invalid(
                "retry.multiplier",
                "must be between 1 and 100",
            ));
        }
        if r.jitter_percent.is_some_and(|j| j > 100) {
            return Err(Error::invalid(
                "retry.jitter_percent",
                "must be between 0 and 100",
            ));
        }
        if r.attempts_max == Some(0) {
            return Err(Error::invalid("retry.attempts_max", "must be at least 1"));
        }
        if let (Some(i), Some(m)) = (r.initial_delay_ms, r.delay_ms_max) {
            if i > m {
                return Err(Error::invalid(
                    "retry.initial_delay_ms",
                    "must not exceed delay_ms_max",
                ));
            }
        }
        Ok(())
    }

    fn check_push(&self, p: &PushEndpoint) -> Result<()> {
        // The URL is not echoed: it may carry a password.
        let url = reqwest::Url::parse(&p.url)
            .map_err(|e| Error::invalid("push.url", format!("not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(Error::invalid(
                "push.url",
                "must be an http or https URL with a host",
            ));
        }
        // Credentials in the URL would be shown back with it to everyone who may read the
        // subscription; `basic_auth` keeps its password write-only.
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Error::invalid(
                "push.url",
                "must not carry credentials (`user:password@`): give them as `basic_auth`, \
                 whose password is never shown back",
            ));
        }
        let max = self.config().delivery.push_headers_max;
        if p.headers.len() > max {
            return Err(Error::limit(
                "push_headers_max",
                max as u64,
                p.headers.len() as u64,
            ));
        }
        for (name, value) in &p.headers {
            let lower = name.to_ascii_lowercase();
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err()
                || reqwest::header::HeaderValue::from_str(value).is_err()
            {
                return Err(Error::invalid(
                    "push.headers",
                    format!("`{name}` is not a valid header"),
                ));
            }
            if RESERVED_HEADERS.contains(&lower.as_str())
                || lower.starts_with("webhook-")
                || lower.starts_with("postroom-")
            {
                return Err(Error::invalid(
                    "push.headers",
                    format!("`{name}` is set by the broker"),
                ));
            }
        }
        Ok(())
    }

    /// Refuses a push endpoint whose host is, or resolves to, an address the push target guard
    /// refuses. A name must resolve, and every address it resolves to must be allowed: a name
    /// that resolves to one public and one internal address would otherwise let the broker reach
    /// the internal one. Called on the caller's task before anything goes to the writer, because
    /// resolving is a network call. The transport checks again at connect time.
    ///
    /// A refused name gets one answer, whether it does not resolve, resolves too slowly or
    /// resolves to a refused address, and the answer names no address: the broker's DNS answers
    /// are its network's, and a subscriber must not map that network through refusals. The
    /// detail goes to the operators' log (`postroom::push_guard`, at info). An IP literal is
    /// judged as written, so its class is said: the caller wrote it.
    async fn check_push_target(&self, p: &PushEndpoint) -> Result<()> {
        let url = reqwest::Url::parse(&p.url)
            .map_err(|e| Error::invalid("push.url", format!("not a URL: {e}")))?;
        let guard = &self.inner().push_guard;
        let advice = "push targets must be public unless delivery.push_allow allows it";
        if let Some(ip) = literal_ip(&url) {
            return guard
                .check(ip)
                .map_err(|refused| Error::invalid("push.url", format!("{refused}; {advice}")));
        }
        let host = url.host_str().unwrap_or_default();
        let timeout = Duration::from_millis(self.config().delivery.push_resolve_timeout_ms);
        let why = match lookup(host, timeout).await {
            Err(e) => e,
            Ok(ips) => match ips.into_iter().find_map(|ip| guard.check(ip).err()) {
                None => return Ok(()),
                Some(refused) => format!("`{host}` resolves to {}", refused.apposition()),
            },
        };
        tracing::info!(target: "postroom::push_guard", host, reason = %why, "push target refused");
        Err(Error::invalid(
            "push.url",
            format!(
                "`{host}` is not an allowed push target: its name must resolve, and only to \
                 public addresses unless delivery.push_allow allows others"
            ),
        ))
    }

    fn check_bounds(&self, in_flight_max: Option<u32>, queue_depth_max: Option<u64>) -> Result<()> {
        let max = self.config().delivery.in_flight_max_max;
        match in_flight_max {
            Some(0) => return Err(Error::invalid("in_flight_max", "must be at least 1")),
            Some(n) if n > max => {
                return Err(Error::limit("in_flight_max_max", max.into(), n.into()))
            }
            _ => {}
        }
        if queue_depth_max == Some(0) {
            return Err(Error::invalid("queue_depth_max", "must be at least 1"));
        }
        Ok(())
    }

    /// Subscribes to a Room. A push subscription gets a fresh Standard Webhooks signing secret,
    /// returned here only. Its endpoint's host is resolved here, and refused unless every address
    /// is public or allowed by [`crate::PushAllow`].
    pub async fn create_subscription(
        &self,
        room: &RoomName,
        new: NewSubscription,
    ) -> Result<CreatedSubscription> {
        self.check_retry(&new.retry)?;
        self.check_bounds(new.in_flight_max, new.queue_depth_max)?;
        if let DeliveryMode::Push(p) = &new.mode {
            self.check_push(p)?;
        }
        if let Some(types) = &new.event_types {
            for t in types {
                self.event_type(room, t)?;
            }
        }
        if let DeliveryMode::Push(p) = &new.mode {
            self.check_push_target(p).await?;
        }
        let push = matches!(new.mode, DeliveryMode::Push(_));
        let secret = push.then(new_secret);
        let op = DeliveryOp::Create {
            room: room.clone(),
            id: SubscriptionId::new_v7(),
            new,
            secret,
        };
        let (subscription, secret) = match self.delivery(op).await? {
            WriteOutput::Subscription(s, secret) => (s, secret),
            other => return Err(unexpected(other)),
        };
        if push {
            ensure_dispatcher(self, subscription.id);
        }
        Ok(CreatedSubscription {
            subscription,
            secret,
        })
    }

    /// One subscription.
    pub fn subscription(&self, id: SubscriptionId) -> Result<Subscription> {
        self.inner().store.subscription(id)
    }

    /// A Room's subscriptions.
    pub fn subscriptions(&self, room: &RoomName) -> Result<Vec<Subscription>> {
        self.inner().store.subscriptions(room)
    }

    /// Changes a subscription's filter, endpoint, ordering, retry or bounds. A new push endpoint
    /// is checked against [`crate::PushAllow`] as in [`Broker::create_subscription`].
    pub async fn update_subscription(
        &self,
        id: SubscriptionId,
        patch: SubscriptionPatch,
    ) -> Result<Subscription> {
        if let Some(r) = &patch.retry {
            self.check_retry(r)?;
        }
        self.check_bounds(patch.in_flight_max, patch.queue_depth_max)?;
        if let Some(p) = &patch.push {
            self.check_push(p)?;
        }
        if let Some(Some(types)) = &patch.event_types {
            let room = self.subscription(id)?.room;
            for t in types {
                self.event_type(&room, t)?;
            }
        }
        if let Some(p) = &patch.push {
            self.check_push_target(p).await?;
        }
        self.subscription_op(DeliveryOp::Update { id, patch }).await
    }

    /// Stops delivering (events keep queueing).
    pub async fn pause_subscription(&self, id: SubscriptionId) -> Result<Subscription> {
        let op = DeliveryOp::SetStatus {
            id,
            to: SubscriptionStatus::Paused,
            reason: None,
            from: &[SubscriptionStatus::Active],
        };
        self.subscription_op(op).await
    }

    /// Delivers again, also after the broker disabled it (e.g. on 410 Gone). Refused with
    /// [`Error::SubscriberRevoked`] while its subscriber lacks the right to receive it.
    pub async fn resume_subscription(&self, id: SubscriptionId) -> Result<Subscription> {
        self.check_subscriber_of(id).await?;
        let op = DeliveryOp::SetStatus {
            id,
            to: SubscriptionStatus::Active,
            reason: None,
            from: &[SubscriptionStatus::Paused, SubscriptionStatus::Disabled],
        };
        let s = self.subscription_op(op).await?;
        if matches!(s.mode, DeliveryMode::Push(_)) {
            ensure_dispatcher(self, id);
        }
        Ok(s)
    }

    /// Approves a pending subscription (the Room manager's act). Refused with
    /// [`Error::SubscriberRevoked`] while its subscriber lacks the right to receive it.
    pub async fn approve_subscription(&self, id: SubscriptionId) -> Result<Subscription> {
        self.check_subscriber_of(id).await?;
        let op = DeliveryOp::SetStatus {
            id,
            to: SubscriptionStatus::Active,
            reason: None,
            from: &[SubscriptionStatus::Pending],
        };
        self.subscription_op(op).await
    }

    /// Deletes a subscription; its queue, dead letters and attempt log are purged by the
    /// retention sweep in bounded batches.
    pub async fn delete_subscription(&self, id: SubscriptionId) -> Result<()> {
        match self.delivery(DeliveryOp::Delete { id }).await? {
            WriteOutput::Deleted => {
                self.inner().signals.forget(id);
                self.inner().stats.forget_subscription(id.0.as_u128());
                Ok(())
            }
            other => Err(unexpected(other)),
        }
    }

    /// Issues a new signing secret. The old one stays valid for
    /// [`crate::DeliveryConfig::secret_grace_ms`], and meanwhile pushes carry both signatures.
    pub async fn rotate_secret(&self, id: SubscriptionId) -> Result<String> {
        let secret = new_secret();
        let old_valid_until = self.now().plus_ms(self.config().delivery.secret_grace_ms);
        match self
            .delivery(DeliveryOp::RotateSecret {
                id,
                secret,
                old_valid_until,
            })
            .await?
        {
            WriteOutput::Subscription(_, Some(s)) => Ok(s),
            other => Err(unexpected(other)),
        }
    }
}

pub(crate) fn count(out: WriteOutput) -> Result<(u64, bool)> {
    match out {
        WriteOutput::Count { n, more } => Ok((n, more)),
        other => Err(unexpected(other)),
    }
}
