//! The operators' read views: the statistics report and the message log. They exist so that an
//! operator answers "where is event X?" and "why is subscriber Y behind?" in one call each,
//! without joining the event log, the queues and the attempt log by hand.

use std::collections::HashMap;

use serde::Serialize;

use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::ids::{EventTypeName, OrderingKey, Principal, RoomName, SubscriptionId};
use crate::model::{Event, EventFilter, Page};
use crate::stats::{StatsFilter, StatsReport, StatsTotals, SubscriptionStats};
use crate::subscription::{DeliveryMode, DeliveryState, EventDelivery, Subscription};
use crate::Timestamp;

/// Which events the message log lists. Every filter is optional; they combine with "and".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageFilter {
    /// Only this Room; all Rooms (in name order) when `None`.
    pub room: Option<RoomName>,
    /// Only this event type.
    pub event_type: Option<EventTypeName>,
    /// Only this publisher.
    pub publisher: Option<Principal>,
    /// Only events owed to this subscriber application.
    pub subscriber: Option<Principal>,
    /// Only events owed to this subscription.
    pub subscription: Option<SubscriptionId>,
    /// Only this ordering key.
    pub key: Option<OrderingKey>,
    /// Only events received at or after this time.
    pub since: Option<Timestamp>,
    /// Only events received before this time.
    pub until: Option<Timestamp>,
    /// Only events with at least one delivery (among the subscriptions the filters keep) in
    /// this state.
    pub status: Option<MessageStatus>,
    /// Include each event's payload. The caller decides whether payloads may be shown.
    pub payloads: bool,
    /// Page size; capped by [`crate::Limits::list_items_max`], 100 when `None`.
    pub limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A delivery state to search the message log by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageStatus {
    /// Waiting for its turn or its next attempt.
    Pending,
    /// Leased to a puller.
    InFlight,
    /// Pending or in flight.
    Undelivered,
    /// Delivered or acknowledged.
    Delivered,
    /// In the dead letters.
    DeadLettered,
}

impl MessageStatus {
    /// Parses the API name (`pending`, `in_flight`, `undelivered`, `delivered`,
    /// `dead_lettered`).
    pub fn parse(s: &str) -> Result<MessageStatus> {
        Ok(match s {
            "pending" => MessageStatus::Pending,
            "in_flight" => MessageStatus::InFlight,
            "undelivered" => MessageStatus::Undelivered,
            "delivered" => MessageStatus::Delivered,
            "dead_lettered" => MessageStatus::DeadLettered,
            _ => {
                return Err(Error::invalid(
                    "status",
                    "must be pending, in_flight, undelivered, delivered or dead_lettered",
                ))
            }
        })
    }

    fn matches(self, state: DeliveryState) -> bool {
        match self {
            MessageStatus::Pending => state == DeliveryState::Pending,
            MessageStatus::InFlight => state == DeliveryState::InFlight,
            MessageStatus::Undelivered => {
                matches!(state, DeliveryState::Pending | DeliveryState::InFlight)
            }
            MessageStatus::Delivered => state == DeliveryState::Delivered,
            MessageStatus::DeadLettered => state == DeliveryState::DeadLettered,
        }
    }
}

/// How an event's deliveries stand, counted over the subscriptions that owe or owed it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DeliverySummary {
    /// Subscriptions that owe or owed the event.
    pub subscriptions: u64,
    /// Delivered or acknowledged.
    pub delivered: u64,
    /// Waiting.
    pub pending: u64,
    /// Leased now.
    pub in_flight: u64,
    /// In the dead letters.
    pub dead_lettered: u64,
    /// The same in words, e.g. "delivered to 7 of 7 subscriptions".
    pub text: String,
}

impl DeliverySummary {
    fn of(deliveries: &[EventDelivery]) -> DeliverySummary {
        let mut s = DeliverySummary {
            subscriptions: deliveries.len() as u64,
            ..Default::default()
        };
        for d in deliveries {
            match d.state {
                DeliveryState::Delivered => s.delivered += 1,
                DeliveryState::Pending => s.pending += 1,
                DeliveryState::InFlight => s.in_flight += 1,
                DeliveryState::DeadLettered => s.dead_lettered += 1,
            }
        }
        let plural = if s.subscriptions == 1 { "" } else { "s" };
        s.text = format!(
            "delivered to {} of {} subscription{plural}",
            s.delivered, s.subscriptions
        );
        for (n, what) in [
            (s.pending, "pending"),
            (s.in_flight, "in flight"),
            (s.dead_lettered, "dead-lettered"),
        ] {
            if n > 0 {
                s.text.push_str(&format!(", {n} {what}"));
            }
        }
        s
    }
}

/// One event in the message log.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MessageLogEntry {
    /// The event's metadata (id, Room, type, version, key, sequence, publisher, time).
    #[serde(flatten)]
    pub event: Event,
    /// The payload's size in bytes.
    pub payload_bytes: usize,
    /// The payload, when asked for and allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
    /// Its state for each subscription that owes or owed it.
    pub deliveries: Vec<EventDelivery>,
    /// Those states counted.
    pub summary: DeliverySummary,
}

impl Broker {
    /// Searches the event log with each event's deliveries. Without a Room it walks every Room
    /// in name order. Each page scans a bounded number of events
    /// ([`crate::Limits::list_scan_max`] in all), so a selective search may return a short (even
    /// empty) page with a cursor: keep following `next_cursor` until it is `None`.
    pub async fn message_log(&self, filter: MessageFilter) -> Result<Page<MessageLogEntry>> {
        let limit = filter
            .limit
            .unwrap_or(100)
            .clamp(1, self.config().limits.list_items_max);
        let mut scan_left = self.config().limits.list_scan_max;
        // The cursor is `OFFSET.ROOM`: the next log position to read, in that Room.
        let (mut room, mut offset) = match filter.cursor.as_deref() {
            Some(c) => {
                let bad = || Error::invalid("cursor", "not a cursor this listing returned");
                let (o, r) = c.split_once('.').ok_or_else(bad)?;
                let room = RoomName::new(r).map_err(|_| bad())?;
                if filter.room.as_ref().is_some_and(|f| *f != room) {
                    return Err(bad());
                }
                (Some(room), o.parse::<u64>().map_err(|_| bad())?)
            }
            None => (filter.room.clone(), 0),
        };
        if room.is_none() {
            room = self.next_room(None)?;
        }
        let mut items = Vec::new();
        while let Some(r) = room.clone() {
            let subs: HashMap<SubscriptionId, Subscription> = self
                .subscriptions(&r)?
                .into_iter()
                .map(|s| (s.id, s))
                .collect();
            let (only_sub, only_subscriber, status) = (
                filter.subscription,
                filter.subscriber.clone(),
                filter.status,
            );
            let narrowed = only_sub.is_some() || only_subscriber.is_some();
            let keep = move |_: &Event, deliveries: &[EventDelivery]| {
                let mut kept = deliveries
                    .iter()
                    .filter(|d| {
                        only_sub.is_none_or(|id| id == d.subscription)
                            && only_subscriber.as_ref().is_none_or(|p| {
                                subs.get(&d.subscription)
                                    .is_some_and(|s| s.subscriber == *p)
                            })
                    })
                    .peekable();
                match status {
                    Some(st) => kept.any(|d| st.matches(d.state)),
                    None => !narrowed || kept.peek().is_some(),
                }
            };
            let events = EventFilter {
                event_type: filter.event_type.clone(),
                key: filter.key.clone(),
                publisher: filter.publisher.clone(),
                since: filter.since,
                until: filter.until,
                limit: None,
                cursor: Some(offset.to_string()),
            };
            let store = self.inner().store.clone();
            let now = self.now();
            let want = limit - items.len();
            let scan = scan_left;
            let room_name = r.clone();
            // The scan reads the database: keep it off the async workers.
            let page = tokio::task::spawn_blocking(move || {
                store.event_log(&room_name, &events, &keep, want, scan, now)
            })
            .await
            .map_err(|e| Error::Storage(format!("log task failed: {e}")))?;
            let page = match page {
                Ok(p) => p,
                // The Room went away between listing and reading it: nothing to show from it.
                Err(Error::RoomNotFound { .. }) if filter.room.is_none() => Page {
                    items: Vec::new(),
                    next_cursor: None,
                },
                Err(e) => return Err(e),
            };
            let scanned_to = page
                .next_cursor
                .as_deref()
                .and_then(|c| c.parse::<u64>().ok());
            // What the page scanned, to keep the whole call within its bound.
            let used = match scanned_to {
                Some(to) => to.saturating_sub(offset) as usize,
                None => page.items.len(),
            };
            scan_left = scan_left.saturating_sub(used.max(1));
            for (event, deliveries) in page.items {
                let payload = if filter.payloads {
                    Some(event.payload_json().map_err(|e| {
                        Error::Storage(format!("stored payload of {} is not JSON: {e}", event.id))
                    })?)
                } else {
                    None
                };
                let summary = DeliverySummary::of(&deliveries);
                items.push(MessageLogEntry {
                    payload_bytes: event.payload_bytes(),
                    payload,
                    deliveries,
                    summary,
                    event,
                });
            }
            match scanned_to {
                Some(to) => {
                    return Ok(Page {
                        items,
                        next_cursor: Some(format!("{to}.{r}")),
                    })
                }
                None if filter.room.is_some() => break,
                None => {
                    room = self.next_room(Some(&r))?;
                    offset = 0;
                    if let Some(next) = &room {
                        if items.len() >= limit || scan_left == 0 {
                            return Ok(Page {
                                items,
                                next_cursor: Some(format!("0.{next}")),
                            });
                        }
                    }
                }
            }
        }
        Ok(Page {
            items,
            next_cursor: None,
        })
    }

    fn next_room(&self, after: Option<&RoomName>) -> Result<Option<RoomName>> {
        Ok(self
            .rooms(after, Some(1))?
            .items
            .into_iter()
            .next()
            .map(|r| r.name))
    }

    /// The statistics report: live counts and last-minute figures per Room and subscription,
    /// with each subscription's queue as stored now.
    pub fn stats(&self, filter: &StatsFilter) -> Result<StatsReport> {
        let now = self.now();
        let stats = &self.inner().stats;
        let scan_max = self.config().delivery.scan_records_max;
        let mut rooms = Vec::new();
        let mut subscriptions = Vec::new();
        let mut totals = StatsTotals {
            publish_per_sec: 0.0,
            delivered_per_sec: 0.0,
            backlog: 0,
            dead_letters: 0,
        };
        let wanted_room = match filter.subscription {
            Some(id) => {
                let sub = self.subscription(id)?;
                if filter.room.as_ref().is_some_and(|r| *r != sub.room) {
                    None
                } else {
                    Some(sub.room)
                }
            }
            None => filter.room.clone(),
        };
        let room_list: Vec<crate::model::Room> = match (&wanted_room, filter.subscription) {
            (Some(r), _) => vec![self.room(r)?],
            // The subscription's Room does not match the Room asked for: nothing to report.
            (None, Some(_)) => Vec::new(),
            (None, None) => {
                let mut all = Vec::new();
                let mut after = None;
                loop {
                    let page = self.rooms(after.as_ref(), None)?;
                    let last = page.items.last().map(|r| r.name.clone());
                    all.extend(page.items);
                    match (page.next_cursor, last) {
                        (Some(_), Some(l)) => after = Some(l),
                        _ => break,
                    }
                }
                all
            }
        };
        for room in room_list {
            let figures = stats.room(now, &room.name, filter);
            totals.publish_per_sec += figures.window.ok_per_sec;
            rooms.push(crate::stats::RoomStats {
                room: room.name.clone(),
                events_stored: room.events_stored,
                publishes_total: figures.totals,
                last_minute: figures.window,
            });
            for sub in self.subscriptions(&room.name)? {
                let kept = filter.subscription.is_none_or(|id| id == sub.id)
                    && filter.status.is_none_or(|s| s == sub.status)
                    && filter.keeps_principal(&sub.subscriber);
                if !kept {
                    continue;
                }
                let health = self.inner().store.queue_health(sub.id, now, scan_max)?;
                let (attempts_total, last_minute) = stats.subscription(now, sub.id.0.as_u128());
                totals.delivered_per_sec += last_minute.ok_per_sec;
                totals.backlog += sub.backlog;
                totals.dead_letters += sub.dead_letters;
                subscriptions.push(SubscriptionStats {
                    id: sub.id,
                    room: sub.room,
                    subscriber: sub.subscriber,
                    mode: match sub.mode {
                        DeliveryMode::Push(_) => "push",
                        DeliveryMode::Pull => "pull",
                    },
                    status: sub.status,
                    backlog: sub.backlog,
                    dead_letters: sub.dead_letters,
                    in_flight: health.in_flight,
                    blocked_keys: health.blocked_keys,
                    oldest_undelivered_age_ms: health.oldest_published_at.map(|t| now.ms_since(t)),
                    queue_scan_complete: health.complete,
                    attempts_total,
                    last_minute,
                });
            }
        }
        Ok(StatsReport {
            generated_at: now,
            started_at: stats.since,
            totals,
            rooms,
            subscriptions,
            samples_dropped: stats.dropped(),
        })
    }
}
