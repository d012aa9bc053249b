//! Statistics an operator reads as JSON (`GET /v1/admin/stats`): counts since the broker
//! started, and rates and latencies over the last minute, per Room and per subscription.
//!
//! Prometheus gets the same events as counters and histograms, but a scrape-based system only
//! answers "how fast right now" after a second scrape and a query language. Operators of a small
//! deployment, and the GovStack "statistical reports", want the answer from the broker itself, so
//! the broker keeps a small sliding window. It runs on the broker's clock (tests move time).
//!
//! Memory is bounded: each series (one per Room, event type and publisher, and one per
//! subscription) holds six ten-second slots of a fixed-size log histogram, and the number of
//! series is capped by [`crate::Limits::stats_series_max`]; samples for series beyond the cap are
//! counted as dropped, never stored.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Serialize;

use crate::clock::Timestamp;
use crate::ids::{EventTypeName, Principal, RoomName};
use crate::subscription::AttemptOutcome;

/// Width of one slot of the sliding window.
const SLOT_MS: u64 = 10_000;
/// Slots in the window: six ten-second slots make the last minute.
const SLOTS: usize = 6;
/// Histogram buckets: four per power of two of microseconds, up to 2^28 µs (about 4.5 minutes);
/// slower samples land in the last bucket.
const BUCKETS: usize = 4 * 28;

/// A log-scale latency histogram: a bucket's width is about 19% of its value, which is the
/// precision of the reported percentiles.
#[derive(Clone)]
struct Histogram {
    counts: [u32; BUCKETS],
    total: u64,
    sum_us: u64,
    max_us: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: [0; BUCKETS],
            total: 0,
            sum_us: 0,
            max_us: 0,
        }
    }
}

fn bucket_of(us: u64) -> usize {
    // log2(us + 1) in quarters: the integer part from the leading bit, the fraction from the two
    // bits below it.
    let v = us + 1;
    let log = 63 - v.leading_zeros() as usize;
    let frac = if log >= 2 {
        ((v >> (log - 2)) & 0b11) as usize
    } else {
        ((v << (2 - log)) & 0b11) as usize
    };
    (log * 4 + frac).min(BUCKETS - 1)
}

/// The value in the middle of a bucket, in microseconds.
fn bucket_value_us(b: usize) -> f64 {
    let lo = 2f64.powf(b as f64 / 4.0);
    let hi = 2f64.powf((b + 1) as f64 / 4.0);
    ((lo * hi).sqrt() - 1.0).max(0.0)
}

impl Histogram {
    fn record(&mut self, us: u64) {
        self.counts[bucket_of(us)] = self.counts[bucket_of(us)].saturating_add(1);
        self.total += 1;
        self.sum_us = self.sum_us.saturating_add(us);
        self.max_us = self.max_us.max(us);
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a = a.saturating_add(*b);
        }
        self.total += other.total;
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
        self.max_us = self.max_us.max(other.max_us);
    }

    fn quantile_us(&self, q: f64) -> f64 {
        let rank = ((self.total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (b, c) in self.counts.iter().enumerate() {
            seen += u64::from(*c);
            if seen >= rank {
                // Never report more than the slowest sample seen.
                return bucket_value_us(b).min(self.max_us as f64);
            }
        }
        self.max_us as f64
    }

    fn figures(&self) -> Option<Latency> {
        (self.total > 0).then(|| Latency {
            avg_ms: self.sum_us as f64 / self.total as f64 / 1000.0,
            p50_ms: self.quantile_us(0.5) / 1000.0,
            p99_ms: self.quantile_us(0.99) / 1000.0,
            max_ms: self.max_us as f64 / 1000.0,
        })
    }
}

/// One ten-second slot.
#[derive(Clone, Default)]
struct Slot {
    /// `now / SLOT_MS` when the slot was last used; a slot from an older round is stale.
    index: u64,
    ok: u64,
    failed: u64,
    latency: Histogram,
}

/// One series: counts since start and the sliding window.
#[derive(Clone, Default)]
struct Series {
    totals: HashMap<&'static str, u64>,
    slots: Vec<Slot>,
}

impl Series {
    fn slot(&mut self, now: Timestamp) -> &mut Slot {
        if self.slots.is_empty() {
            self.slots = vec![Slot::default(); SLOTS];
        }
        let index = now.as_ms() / SLOT_MS;
        let slot = &mut self.slots[(index % SLOTS as u64) as usize];
        if slot.index != index {
            *slot = Slot {
                index,
                ..Slot::default()
            };
        }
        slot
    }

    fn record(&mut self, now: Timestamp, outcome: &'static str, ok: Option<u64>, failed: bool) {
        *self.totals.entry(outcome).or_default() += 1;
        let slot = self.slot(now);
        if let Some(us) = ok {
            slot.ok += 1;
            slot.latency.record(us);
        }
        if failed {
            slot.failed += 1;
        }
    }

    /// Adds this series' live slots (those of the last minute) to `w`.
    fn add_window(&self, now: Timestamp, w: &mut WindowSum) {
        let current = now.as_ms() / SLOT_MS;
        for s in &self.slots {
            if s.index + (SLOTS as u64) > current && s.index <= current {
                w.ok += s.ok;
                w.failed += s.failed;
                w.latency.merge(&s.latency);
            }
        }
    }
}

/// Window figures being summed over series.
#[derive(Default)]
struct WindowSum {
    ok: u64,
    failed: u64,
    latency: Histogram,
}

impl WindowSum {
    fn figures(&self, now: Timestamp) -> Window {
        // The window is the five whole slots before the current one plus the part of the
        // current slot that has passed, so a rate does not halve at the start of each slot.
        let elapsed_ms = (SLOTS as u64 - 1) * SLOT_MS + now.as_ms() % SLOT_MS;
        let secs = (elapsed_ms as f64 / 1000.0).max(1.0);
        Window {
            seconds: secs,
            ok: self.ok,
            failed: self.failed,
            ok_per_sec: self.ok as f64 / secs,
            failed_per_sec: self.failed as f64 / secs,
            latency: self.latency.figures(),
        }
    }
}

/// Latency figures of a window, in milliseconds. Percentiles are read from a log histogram and
/// are exact to about 19%.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Latency {
    /// The mean.
    pub avg_ms: f64,
    /// The median.
    pub p50_ms: f64,
    /// The 99th percentile.
    pub p99_ms: f64,
    /// The slowest.
    pub max_ms: f64,
}

/// What happened over the last minute.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Window {
    /// How long the window covers, in seconds (just under a minute).
    pub seconds: f64,
    /// Successes: events accepted (for a Room) or deliveries that reached the subscriber.
    pub ok: u64,
    /// Failures: publishes refused, or failed attempts, expired leases and dead letters.
    pub failed: u64,
    /// `ok` per second.
    pub ok_per_sec: f64,
    /// `failed` per second.
    pub failed_per_sec: f64,
    /// Latency of the successes: publish to durable receipt for a Room, publish to delivery
    /// (or acknowledgement) for a subscription. `None` without successes.
    pub latency: Option<Latency>,
}

/// One Room's publishing, as far as the filter allows.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoomStats {
    /// The Room.
    pub room: RoomName,
    /// Events stored in the Room now.
    pub events_stored: u64,
    /// Publishes since the broker started, by outcome: `accepted`, `duplicate`, or the error code
    /// of a refusal.
    pub publishes_total: HashMap<String, u64>,
    /// The last minute.
    pub last_minute: Window,
}

/// One subscription's delivery, with its queue as stored now.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SubscriptionStats {
    /// The subscription.
    pub id: crate::ids::SubscriptionId,
    /// Its Room.
    pub room: RoomName,
    /// The application that receives.
    pub subscriber: Principal,
    /// `push` or `pull`.
    pub mode: &'static str,
    /// Its status.
    pub status: crate::subscription::SubscriptionStatus,
    /// Events waiting for delivery.
    pub backlog: u64,
    /// Events in the dead letters.
    pub dead_letters: u64,
    /// Events leased to pullers now (push deliveries in progress are not stored, so 0 for push).
    pub in_flight: u64,
    /// Keys whose head event has failed and holds later events back.
    pub blocked_keys: u64,
    /// Age of the oldest undelivered event, in milliseconds; `None` when nothing waits.
    pub oldest_undelivered_age_ms: Option<u64>,
    /// Whether `in_flight` and `blocked_keys` counted the whole queue, or stopped at the scan
    /// bound (`delivery.scan_records_max`) and are lower bounds.
    pub queue_scan_complete: bool,
    /// Attempts since the broker started, by outcome (`delivered`, `failed`, `leased`, `acked`,
    /// `nacked`, `lease_expired`, `terminated`, `dead_lettered`).
    pub attempts_total: HashMap<String, u64>,
    /// The last minute.
    pub last_minute: Window,
}

/// Counts over every Room and subscription the filter kept.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatsTotals {
    /// Events accepted in the last minute, per second.
    pub publish_per_sec: f64,
    /// Deliveries that reached their subscriber in the last minute, per second.
    pub delivered_per_sec: f64,
    /// Events waiting for delivery.
    pub backlog: u64,
    /// Events in the dead letters.
    pub dead_letters: u64,
}

/// The statistics report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatsReport {
    /// When it was computed.
    pub generated_at: Timestamp,
    /// When the counters started (the broker's start).
    pub started_at: Timestamp,
    /// Sums over what is listed.
    pub totals: StatsTotals,
    /// Per Room.
    pub rooms: Vec<RoomStats>,
    /// Per subscription.
    pub subscriptions: Vec<SubscriptionStats>,
    /// Samples not kept because the number of series reached its bound.
    pub samples_dropped: u64,
}

/// Which statistics to report. Every filter is optional; they combine with "and".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsFilter {
    /// Only publishers and subscribers of this member (`INSTANCE/CLASS/CODE`).
    pub member: Option<String>,
    /// Only this application as publisher (Rooms) or subscriber (subscriptions).
    pub application: Option<Principal>,
    /// Only this Room.
    pub room: Option<RoomName>,
    /// Only this subscription (and its Room).
    pub subscription: Option<crate::ids::SubscriptionId>,
    /// Only subscriptions with this status (Rooms are not filtered by it).
    pub status: Option<crate::subscription::SubscriptionStatus>,
}

impl StatsFilter {
    /// Whether a principal (publisher or subscriber) passes the member and application filters.
    pub(crate) fn keeps_principal(&self, p: &Principal) -> bool {
        self.application.as_ref().is_none_or(|a| a == p)
            && self.member.as_deref().is_none_or(|m| {
                p.as_str()
                    .strip_prefix(m)
                    .is_some_and(|r| r.starts_with('/'))
            })
    }
}

type PublishKey = (RoomName, EventTypeName, Principal);

#[derive(Default)]
struct Tables {
    publish: HashMap<PublishKey, Series>,
    delivery: HashMap<u128, Series>,
    dropped: u64,
}

/// The live statistics of one broker.
pub(crate) struct Stats {
    tables: Mutex<Tables>,
    series_max: usize,
    pub(crate) since: Timestamp,
}

/// What a Room's publish series contribute to its figures.
pub(crate) struct RoomFigures {
    pub totals: HashMap<String, u64>,
    pub window: Window,
}

impl Stats {
    pub(crate) fn new(series_max: usize, since: Timestamp) -> Stats {
        Stats {
            tables: Mutex::new(Tables::default()),
            series_max,
            since,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        // The tables hold counters only: after a panic elsewhere they are still usable.
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one publish: `outcome` is `accepted`, `duplicate` or an error code.
    pub(crate) fn publish(
        &self,
        now: Timestamp,
        room: &RoomName,
        event_type: &EventTypeName,
        publisher: &Principal,
        outcome: &'static str,
        took_us: u64,
    ) {
        let mut t = self.lock();
        let key = (room.clone(), event_type.clone(), publisher.clone());
        let full = t.publish.len() + t.delivery.len() >= self.series_max;
        let series = match t.publish.get_mut(&key) {
            Some(s) => s,
            None if full => {
                t.dropped += 1;
                return;
            }
            None => t.publish.entry(key).or_default(),
        };
        let ok = (outcome == "accepted").then_some(took_us);
        let failed = outcome != "accepted" && outcome != "duplicate";
        series.record(now, outcome, ok, failed);
    }

    /// Records one logged attempt of a subscription (after its commit).
    pub(crate) fn attempt(
        &self,
        now: Timestamp,
        sub: u128,
        outcome: AttemptOutcome,
        published_at: Timestamp,
    ) {
        // A dead letter is counted once, by `dead_lettered`, whatever path led there.
        if outcome == AttemptOutcome::DeadLettered {
            return;
        }
        let label = crate::telemetry::outcome_label(outcome);
        let success = matches!(outcome, AttemptOutcome::Delivered | AttemptOutcome::Acked);
        let failure = matches!(
            outcome,
            AttemptOutcome::Failed | AttemptOutcome::LeaseExpired | AttemptOutcome::Nacked
        );
        let latency_us = success.then(|| now.as_ms().saturating_sub(published_at.as_ms()) * 1000);
        self.delivery_series(sub, |s| s.record(now, label, latency_us, failure));
    }

    /// Records one delivery moved to the dead letters.
    pub(crate) fn dead_lettered(&self, now: Timestamp, sub: u128) {
        self.delivery_series(sub, |s| s.record(now, "dead_lettered", None, true));
    }

    fn delivery_series(&self, sub: u128, f: impl FnOnce(&mut Series)) {
        let mut t = self.lock();
        let full = t.publish.len() + t.delivery.len() >= self.series_max;
        match t.delivery.get_mut(&sub) {
            Some(s) => f(s),
            None if full => t.dropped += 1,
            None => f(t.delivery.entry(sub).or_default()),
        }
    }

    /// Forgets a deleted subscription's series, so that its slot in the bound is freed.
    pub(crate) fn forget_subscription(&self, sub: u128) {
        self.lock().delivery.remove(&sub);
    }

    /// A Room's publish figures over the publishers the filter keeps.
    pub(crate) fn room(
        &self,
        now: Timestamp,
        room: &RoomName,
        filter: &StatsFilter,
    ) -> RoomFigures {
        let t = self.lock();
        let mut totals: HashMap<String, u64> = HashMap::new();
        let mut w = WindowSum::default();
        for ((r, _, publisher), s) in &t.publish {
            if r != room || !filter.keeps_principal(publisher) {
                continue;
            }
            for (k, v) in &s.totals {
                *totals.entry((*k).to_string()).or_default() += v;
            }
            s.add_window(now, &mut w);
        }
        RoomFigures {
            totals,
            window: w.figures(now),
        }
    }

    /// A subscription's attempt counts and window.
    pub(crate) fn subscription(&self, now: Timestamp, sub: u128) -> (HashMap<String, u64>, Window) {
        let t = self.lock();
        let mut w = WindowSum::default();
        let mut totals = HashMap::new();
        if let Some(s) = t.delivery.get(&sub) {
            totals = s
                .totals
                .iter()
                .map(|(k, v)| ((*k).to_string(), *v))
                .collect();
            s.add_window(now, &mut w);
        }
        (totals, w.figures(now))
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.lock().dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_grow_with_the_value_and_stay_in_range() {
        let mut last = 0;
        for us in [
            0u64,
            1,
            2,
            3,
            10,
            100,
            1_000,
            10_000,
            1_000_000,
            u64::MAX / 2,
        ] {
            let b = bucket_of(us);
            assert!(b >= last, "bucket of {us} went down");
            assert!(b < BUCKETS);
            last = b;
        }
        // A value reads back within the bucket's precision.
        for us in [50u64, 1_000, 250_000] {
            let v = bucket_value_us(bucket_of(us));
            assert!(
                (v - us as f64).abs() / (us as f64) < 0.2,
                "{us} read as {v}"
            );
        }
    }

    #[test]
    fn quantiles_come_from_the_samples() {
        let mut h = Histogram::default();
        for _ in 0..98 {
            h.record(1_000);
        }
        h.record(100_000);
        h.record(100_000);
        let f = h.figures().expect("samples");
        assert!((f.p50_ms - 1.0).abs() < 0.2, "p50 {}", f.p50_ms);
        assert!((f.p99_ms - 100.0).abs() < 20.0, "p99 {}", f.p99_ms);
        assert!((f.avg_ms - 2.98).abs() < 0.01, "avg {}", f.avg_ms);
        assert_eq!(f.max_ms, 100.0);
    }

    #[test]
    fn the_window_forgets_what_is_older_than_a_minute() {
        let stats = Stats::new(16, Timestamp(0));
        let room = RoomName::new("r").expect("name");
        let et = EventTypeName::new("t").expect("name");
        let p = Principal::new("UK/GOV/HO/app").expect("principal");
        let t0 = Timestamp(1_000_000);
        for _ in 0..30 {
            stats.publish(t0, &room, &et, &p, "accepted", 500);
        }
        stats.publish(t0, &room, &et, &p, "invalid_payload", 10);
        let f = StatsFilter::default();
        let now = stats.room(t0.plus_ms(5_000), &room, &f);
        assert_eq!(now.window.ok, 30);
        assert_eq!(now.window.failed, 1);
        assert_eq!(now.totals.get("accepted"), Some(&30));
        let later = stats.room(t0.plus_ms(70_000), &room, &f);
        assert_eq!(later.window.ok, 0, "a minute later the window is empty");
        assert_eq!(later.totals.get("accepted"), Some(&30), "totals stay");
        // Another member's filter sees nothing.
        let other = StatsFilter {
            member: Some("UK/GOV/MOJ".into()),
            ..StatsFilter::default()
        };
        assert!(stats.room(t0, &room, &other).totals.is_empty());
        let mine = StatsFilter {
            member: Some("UK/GOV/HO".into()),
            ..StatsFilter::default()
        };
        assert_eq!(
            stats.room(t0, &room, &mine).totals.get("accepted"),
            Some(&30)
        );
    }

    #[test]
    fn series_beyond_the_bound_are_dropped_not_stored() {
        let stats = Stats::new(1, Timestamp(0));
        let t = Timestamp(0);
        stats.attempt(t, 1, AttemptOutcome::Delivered, t);
        stats.attempt(t, 2, AttemptOutcome::Delivered, t);
        assert_eq!(stats.dropped(), 1);
        assert_eq!(stats.subscription(t, 1).0.get("delivered"), Some(&1));
        assert!(stats.subscription(t, 2).0.is_empty());
    }
}
