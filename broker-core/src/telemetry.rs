//! Operational metrics through the `metrics` facade. The core only records; whoever embeds it
//! decides whether and how to export (the server renders them for Prometheus at `/metrics`).
//! Without an installed recorder every call here is a cheap no-op.
//!
//! Labels are bounded on purpose: Room, event type, subscription id and fixed outcome codes, never
//! event ids or raw input, so that the number of series stays proportional to the configuration.

use std::time::Duration;

use crate::clock::Timestamp;
use crate::error::Error;
use crate::ids::{EventTypeName, RoomName, SubscriptionId};
use crate::subscription::AttemptOutcome;

/// Events published, by Room, event type and outcome (`accepted`, `duplicate` or an error code).
pub const PUBLISH_TOTAL: &str = "postroom_publish_total";
/// Time from a publish call to its durable receipt (or refusal).
pub const PUBLISH_DURATION: &str = "postroom_publish_duration_seconds";
/// Operations applied per write transaction.
pub const COMMIT_BATCH_EVENTS: &str = "postroom_commit_batch_events";
/// Write transactions committed (or attempted).
pub const COMMITS_TOTAL: &str = "postroom_commits_total";
/// Delivery attempts by subscription and outcome, as logged in the attempt log.
pub const DELIVERY_ATTEMPTS_TOTAL: &str = "postroom_delivery_attempts_total";
/// Time from publish to a delivery's success (push delivered or pull acknowledged).
pub const DELIVERY_LATENCY: &str = "postroom_delivery_latency_seconds";
/// Deliveries moved to the dead letters, by subscription and reason.
pub const DEAD_LETTERED_TOTAL: &str = "postroom_dead_lettered_total";
/// Due push deliveries of slow keys that waited for a slot because slow pushes held their share
/// (`delivery.slow_slots_max_percent`), by subscription; each wait counted once.
pub const PUSH_HELD_BACK_TOTAL: &str = "postroom_push_held_back_total";

/// Registers help texts and units for the core's metrics with the installed recorder; call it
/// once after installing one.
pub fn describe() {
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_counter!(
        PUBLISH_TOTAL,
        "Events published, by room, event type and outcome (accepted, duplicate or error code)."
    );
    describe_histogram!(
        PUBLISH_DURATION,
        Unit::Seconds,
        "Time from a publish call to its durable receipt."
    );
    describe_histogram!(
        COMMIT_BATCH_EVENTS,
        Unit::Count,
        "Operations applied in one write transaction (group commit size)."
    );
    describe_counter!(COMMITS_TOTAL, "Write transactions committed.");
    describe_counter!(
        DELIVERY_ATTEMPTS_TOTAL,
        "Delivery attempts by subscription and outcome, as logged in the attempt log."
    );
    describe_histogram!(
        DELIVERY_LATENCY,
        Unit::Seconds,
        "Time from publish to delivery (push delivered, or pull acknowledged)."
    );
    describe_counter!(
        DEAD_LETTERED_TOTAL,
        "Deliveries moved to the dead letters, by subscription and reason."
    );
    describe_counter!(
        PUSH_HELD_BACK_TOTAL,
        "Due push deliveries of slow keys that waited for a slot because slow pushes held their share, by subscription."
    );
}

/// Records one publish and returns its outcome label. Unknown Rooms and event types are
/// labelled `-`, because their names come from callers and would otherwise let anyone create
/// series.
pub(crate) fn publish(
    room: &RoomName,
    event_type: &EventTypeName,
    outcome: std::result::Result<bool, &Error>,
    took: Duration,
) -> &'static str {
    let (outcome, known) = match outcome {
        Ok(false) => ("accepted", true),
        Ok(true) => ("duplicate", true),
        Err(e @ (Error::RoomNotFound { .. } | Error::EventTypeNotFound { .. })) => {
            (e.code(), false)
        }
        Err(e) => (e.code(), true),
    };
    let (room, event_type) = if known {
        (room.to_string(), event_type.to_string())
    } else {
        ("-".to_string(), "-".to_string())
    };
    metrics::counter!(PUBLISH_TOTAL, "room" => room, "event_type" => event_type, "outcome" => outcome)
        .increment(1);
    metrics::histogram!(PUBLISH_DURATION).record(took.as_secs_f64());
    outcome
}

/// Records one write transaction of `ops` operations.
pub(crate) fn commit(ops: usize) {
    metrics::counter!(COMMITS_TOTAL).increment(1);
    metrics::histogram!(COMMIT_BATCH_EVENTS).record(ops as f64);
}

/// The label value of an attempt outcome, as in the attempt log's JSON.
pub(crate) fn outcome_label(o: AttemptOutcome) -> &'static str {
    match o {
        AttemptOutcome::Delivered => "delivered",
        AttemptOutcome::Failed => "failed",
        AttemptOutcome::Leased => "leased",
        AttemptOutcome::Acked => "acked",
        AttemptOutcome::Nacked => "nacked",
        AttemptOutcome::LeaseExpired => "lease_expired",
        AttemptOutcome::Terminated => "terminated",
        AttemptOutcome::DeadLettered => "dead_lettered",
    }
}

/// Records one logged attempt; for a success, also the time since the event was published.
pub(crate) fn attempt(sub: u128, outcome: AttemptOutcome, published_at: Timestamp, at: Timestamp) {
    let sub = SubscriptionId(uuid::Uuid::from_u128(sub)).to_string();
    if matches!(outcome, AttemptOutcome::Delivered | AttemptOutcome::Acked) {
        let ms = at.as_ms().saturating_sub(published_at.as_ms());
        metrics::histogram!(DELIVERY_LATENCY).record(ms as f64 / 1000.0);
    }
    metrics::counter!(DELIVERY_ATTEMPTS_TOTAL, "subscription" => sub, "outcome" => outcome_label(outcome))
        .increment(1);
}

/// Records one delivery moved to the dead letters. `reason` is one of the core's fixed reasons.
pub(crate) fn dead_lettered(sub: u128, reason: &str) {
    let sub = SubscriptionId(uuid::Uuid::from_u128(sub)).to_string();
    metrics::counter!(DEAD_LETTERED_TOTAL, "subscription" => sub, "reason" => reason.to_string())
        .increment(1);
}

/// Records `n` slow push deliveries that began waiting for a slot of `sub`.
pub(crate) fn push_held_back(sub: SubscriptionId, n: usize) {
    metrics::counter!(PUSH_HELD_BACK_TOTAL, "subscription" => sub.to_string()).increment(n as u64);
}
