//! The queue side of the [`Broker`] API: pulling with leases and settling them (ack, nack,
//! extend, term, by ack id or by event id), stopping an event, dead letters (list, redrive,
//! purge), the attempt log, blocked keys and an event's deliveries. Split from
//! `delivery_api.rs`, which keeps the subscriptions themselves.

use std::time::Duration;

use crate::broker::{unexpected, Broker};
use crate::delivery_api::{count, BULK_STEP_MAX};
use crate::error::{Error, Result};
use crate::ids::{EventId, SubscriptionId};
use crate::model::Page;
use crate::storage::{ack_id, parse_ack_id, AckAction, DeliveryOp, LeaseRef, WriteOutput};
use crate::subscription::{Attempt, BlockedKey, DeadLetter, EventDelivery, PulledMessage};

impl Broker {
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
