//! The delivery half of the [`Broker`] API: subscriptions, pull with leases, dead letters, the
//! attempt log, blocked keys and replay. Input is checked here, on the caller's task; every
//! change goes through the writer like a publish does.

use std::time::Duration;

use crate::broker::{unexpected, Broker};
use crate::dispatch::ensure_dispatcher;
use crate::error::{Error, Result};
use crate::ids::{EventId, RoomName, SubscriptionId};
use crate::model::Page;
use crate::net_guard::{literal_ip, lookup};
use crate::storage::{ack_id, parse_ack_id, AckAction, DeliveryOp, LeaseRef, WriteOp, WriteOutput};
use crate::subscription::{
    Attempt, BlockedKey, CreatedSubscription, DeadLetter, DeliveryMode, EventDelivery,
    NewSubscription, PulledMessage, PushEndpoint, RetryOverrides, Subscription, SubscriptionPatch,
    SubscriptionStatus,
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

    /// Leases up to `max_messages` messages for `lease_ms` (default from config), waiting up to
    /// `wait_ms` for one to arrive when none is ready. With ordering, a key's next event is only
    /// handed out once the previous one is acknowledged or dead-lettered.
    ///
    /// A waiting pull looks again when the queue changes and when a message it saw falls due by
    /// time (a retry delay or a lease runs out, on the broker's clock). Once the broker is
    /// closing (see [`Broker::begin_close`]), a waiting pull is answered at once with no
    /// messages, and a new pull is refused with [`Error::ShuttingDown`].
    pub async fn pull(
        &self,
        id: SubscriptionId,
        max_messages: usize,
        lease_ms: Option<u64>,
        wait_ms: u64,
    ) -> Result<Vec<PulledMessage>> {
        let d = &self.config().delivery;
        if max_messages == 0 {
            return Err(Error::invalid("max_messages", "must be at least 1"));
        }
        if max_messages > d.pull_messages_max {
            return Err(Error::limit(
                "pull_messages_max",
                d.pull_messages_max as u64,
                max_messages as u64,
            ));
        }
        let lease_ms = lease_ms.unwrap_or(d.lease_ms_default);
        if lease_ms == 0 || lease_ms > d.lease_ms_max {
            return Err(Error::limit("lease_ms_max", d.lease_ms_max, lease_ms));
        }
        if wait_ms > d.pull_wait_ms_max {
            return Err(Error::limit(
                "pull_wait_ms_max",
                d.pull_wait_ms_max,
                wait_ms,
            ));
        }
        self.check_subscriber_of(id).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
        let signals = self.inner().signals.get(id);
        let clock = self.inner().clock.clone();
        let mut waited = false;
        loop {
            // Register for a wake-up before looking, so that an event arriving (or the broker
            // starting to close) in between is seen.
            let notified = signals.pull.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_closing() {
                // A poll that was waiting is answered, empty; a new one is refused.
                return if waited {
                    Ok(Vec::new())
                } else {
                    Err(Error::ShuttingDown)
                };
            }
            let op = DeliveryOp::Lease {
                id,
                max: max_messages,
                lease_ms,
            };
            let (grants, next_due) = match self.delivery(op).await? {
                WriteOutput::Leased { grants, next_due } => (grants, next_due),
                other => return Err(unexpected(other)),
            };
            if !grants.is_empty() {
                let mut out = Vec::with_capacity(grants.len());
                for g in grants {
                    // An event removed meanwhile (its Room deleted) cannot be handed out; its
                    // lease lapses and the delivery is purged with the subscription.
                    let event = match self.event(g.event_id) {
                        Ok(e) => e,
                        Err(Error::EventNotFound { .. }) => continue,
                        Err(e) => return Err(e),
                    };
                    out.push(PulledMessage {
                        ack_id: ack_id(g.offset, g.attempt, g.epoch),
                        attempt: g.attempt,
                        lease_until: g.lease_until,
                        event,
                    });
                }
                return Ok(out);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Vec::new());
            }
            // Wait for a write that changes the queue, for the next message to fall due by
            // time (on the broker's clock, so that a manual clock's move wakes it too), or for
            // the poll's end, whichever comes first; then look again.
            let falls_due = async {
                match next_due {
                    Some(at) => clock.sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = notified => {}
                _ = falls_due => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
            }
            waited = true;
        }
    }

    async fn settle(
        &self,
        id: SubscriptionId,
        ack_ids: &[String],
        action: AckAction,
    ) -> Result<Vec<Result<()>>> {
        let max = self.config().delivery.pull_messages_max;
        if ack_ids.len() > max {
            return Err(Error::limit(
                "pull_messages_max",
                max as u64,
                ack_ids.len() as u64,
            ));
        }
        let refs = ack_ids
            .iter()
            .map(|a| parse_ack_id(a))
            .collect::<Result<Vec<_>>>()?;
        self.settle_refs(id, refs, action).await
    }

    /// Settles the leases `refs` name, after checking the caller still may receive.
    async fn settle_refs(
        &self,
        id: SubscriptionId,
        refs: Vec<LeaseRef>,
        action: AckAction,
    ) -> Result<Vec<Result<()>>> {
        self.check_subscriber_of(id).await?;
        match self
            .delivery(DeliveryOp::Settle { id, refs, action })
            .await?
        {
            WriteOutput::Settled(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Acknowledges leased messages; each result says whether that lease was still held.
    pub async fn ack(&self, id: SubscriptionId, ack_ids: &[String]) -> Result<Vec<Result<()>>> {
        self.settle(id, ack_ids, AckAction::Ack).await
    }

    /// Gives leased messages back: retried per the policy, or after `delay_ms` when given.
    pub async fn nack(
        &self,
        id: SubscriptionId,
        ack_ids: &[String],
        delay_ms: Option<u64>,
    ) -> Result<Vec<Result<()>>> {
        if let Some(d) = delay_ms {
            let max = self.config().delivery.retry_after_ms_max;
            if d > max {
                return Err(Error::limit("retry_after_ms_max", max, d));
            }
        }
        self.settle(id, ack_ids, AckAction::Nack { delay_ms }).await
    }

    /// Extends leases to `lease_ms` from now.
    pub async fn extend(
        &self,
        id: SubscriptionId,
        ack_ids: &[String],
        lease_ms: u64,
    ) -> Result<Vec<Result<()>>> {
        let max = self.config().delivery.lease_ms_max;
        if lease_ms == 0 || lease_ms > max {
            return Err(Error::limit("lease_ms_max", max, lease_ms));
        }
        self.settle(id, ack_ids, AckAction::Extend { lease_ms })
            .await
    }

    /// Acknowledges a leased event by its id rather than by ack id, for protocols that
    /// confirm events by id (the GovStack pull API). Whichever lease is current is settled.
    /// [`Error::EventNotFound`] when the event is not in this subscription's queue (unknown,
    /// already acknowledged, or never owed); [`Error::EventNotLeased`] when it is queued but not
    /// leased.
    pub async fn ack_event(&self, id: SubscriptionId, event: EventId) -> Result<()> {
        let not_found = || Error::EventNotFound {
            id: event.to_string(),
        };
        // The subscription must exist, and the event must belong to its Room.
        let sub = self.subscription(id)?;
        let ev = self.event(event)?;
        if ev.room != sub.room {
            return Err(not_found());
        }
        let offset = self
            .inner()
            .store
            .event_offset(event)?
            .ok_or_else(not_found)?;
        match self.inner().store.queued(id, offset, event, self.now())? {
            None => Err(not_found()),
            Some((_, false)) => Err(Error::EventNotLeased {
                id: event.to_string(),
            }),
            Some((attempt, true)) => {
                let current = LeaseRef {
                    offset,
                    attempt,
                    epoch: None,
                };
                let mut results = self.settle_refs(id, vec![current], AckAction::Ack).await?;
                // A lease that ran out or changed between the look and the ack.
                match results.pop() {
                    Some(Err(Error::LeaseNotHeld { .. })) => Err(Error::EventNotLeased {
                        id: event.to_string(),
                    }),
                    Some(r) => r,
                    None => Err(not_found()),
                }
            }
        }
    }

    /// Stops delivering an event: every subscription's undelivered copy goes to its dead
    /// letters with reason `stopped` (an operator can still redrive it); copies already
    /// delivered are not affected. Returns how many copies were stopped.
    pub async fn stop_event(&self, event: EventId) -> Result<u64> {
        let (n, _) = count(self.delivery(DeliveryOp::StopEvent { event }).await?)?;
        Ok(n)
    }

    /// Sends leased messages straight to the dead letters.
    pub async fn terminate(
        &self,
        id: SubscriptionId,
        ack_ids: &[String],
    ) -> Result<Vec<Result<()>>> {
        self.settle(id, ack_ids, AckAction::Term).await
    }

    /// A page of a subscription's dead letters, oldest first.
    pub fn dead_letters(
        &self,
        id: SubscriptionId,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Page<DeadLetter>> {
        let after = cursor
            .map(|c| {
                c.parse::<u64>()
                    .map_err(|_| Error::invalid("cursor", "not a cursor this listing returned"))
            })
            .transpose()?;
        let limit = limit
            .unwrap_or(100)
            .clamp(1, self.config().limits.list_items_max);
        let (items, more) = self.inner().store.dead_letters(id, after, limit)?;
        let next_cursor = if more {
            items.last().map(|(o, _)| o.to_string())
        } else {
            None
        };
        Ok(Page {
            items: items.into_iter().map(|(_, d)| d).collect(),
            next_cursor,
        })
    }

    /// Puts dead letters back in the queue with a fresh schedule: the chosen events, or all.
    /// Returns how many were redriven.
    pub async fn redrive(&self, id: SubscriptionId, events: Option<Vec<EventId>>) -> Result<u64> {
        let mut total = 0;
        match events {
            Some(ids) => {
                let room = self.subscription(id)?.room;
                let mut offsets = Vec::with_capacity(ids.len());
                for e in ids {
                    // Offsets are per Room: an event of another Room must not match by accident.
                    if self.event(e)?.room != room {
                        return Err(Error::invalid(
                            "events",
                            format!("event {e} is not in room {room}"),
                        ));
                    }
                    offsets.push(
                        self.inner()
                            .store
                            .event_offset(e)?
                            .ok_or(Error::EventNotFound { id: e.to_string() })?,
                    );
                }
                for chunk in offsets.chunks(BULK_STEP_MAX) {
                    let op = DeliveryOp::Redrive {
                        id,
                        offsets: Some(chunk.to_vec()),
                        limit: BULK_STEP_MAX,
                    };
                    total += count(self.delivery(op).await?)?.0;
                }
            }
            None => loop {
                let (n, more) = count(
                    self.delivery(DeliveryOp::Redrive {
                        id,
                        offsets: None,
                        limit: BULK_STEP_MAX,
                    })
                    .await?,
                )?;
                total += n;
                if !more {
                    break;
                }
            },
        }
        Ok(total)
    }

    /// Deletes every dead letter of a subscription; returns how many.
    pub async fn purge_dead_letters(&self, id: SubscriptionId) -> Result<u64> {
        let mut total = 0;
        loop {
            let (n, more) = count(
                self.delivery(DeliveryOp::PurgeDead {
                    id,
                    limit: BULK_STEP_MAX,
                })
                .await?,
            )?;
            total += n;
            if !more {
                return Ok(total);
            }
        }
    }

    /// A page of a subscription's attempt log (by event, then attempt).
    pub fn attempts(
        &self,
        id: SubscriptionId,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Page<Attempt>> {
        let after = cursor
            .map(|c| {
                c.split_once('.')
                    .and_then(|(o, a)| Some((o.parse().ok()?, a.parse().ok()?)))
                    .ok_or_else(|| Error::invalid("cursor", "not a cursor this listing returned"))
            })
            .transpose()?;
        let limit = limit
            .unwrap_or(100)
            .clamp(1, self.config().limits.list_items_max);
        let (items, more) = self.inner().store.attempts(id, after, limit)?;
        let next_cursor = if more {
            items.last().map(|((o, a), _)| format!("{o}.{a}"))
        } else {
            None
        };
        Ok(Page {
            items: items.into_iter().map(|(_, a)| a).collect(),
            next_cursor,
        })
    }

    /// Keys whose head event has failed and holds the key's later events back.
    pub fn blocked_keys(
        &self,
        id: SubscriptionId,
        limit: Option<usize>,
    ) -> Result<Vec<BlockedKey>> {
        let limit = limit
            .unwrap_or(100)
            .clamp(1, self.config().limits.list_items_max);
        self.inner().store.blocked_keys(
            id,
            self.now(),
            limit,
            self.config().delivery.scan_records_max,
        )
    }

    /// An event's state for each subscription of its Room (subscriptions that never owed it are
    /// not listed).
    pub fn event_deliveries(&self, id: EventId) -> Result<Vec<EventDelivery>> {
        self.inner().store.event_deliveries(id, self.now())
    }
}

pub(crate) fn count(out: WriteOutput) -> Result<(u64, bool)> {
    match out {
        WriteOutput::Count { n, more } => Ok((n, more)),
        other => Err(unexpected(other)),
    }
}
