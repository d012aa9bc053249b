//! The delivery queues: what each subscription is still owed (leases to pullers and their
//! settling are in `pull.rs`), the outcomes of pushes, retries or dead-lettering
//! (through `retry.rs`), the attempt log, and stopping one event. Queues are keyed by
//! (subscription, Room log offset), so fan-out at publish time appends at the end of each
//! subscription's range (one page per subscription per commit, not one per event), and a key's
//! deliveries come in sequence order because the writer assigns offset and sequence together.

use serde::{Deserialize, Serialize};

use super::events::decode_event_header;
use super::subs::SubRecord;
use super::Tables;
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::ids::{EventId, EventTypeName, OrderingKey};
use crate::retry::{self, Next};
use crate::storage::codec::{decode_with_tail, encode, encode_with_tail};
use crate::storage::WriteOutput;
use crate::subscription::{AttemptOutcome, SubscriptionStatus};
use crate::webhook::PushResponse;

/// What a subscription still owes of one event. Stored as the first layout's fields (postcard)
/// followed by the fields added since, so that records written before still decode (see
/// [`DeliveryRecord::decode`]); hence no serde derive on it: every write goes through
/// [`DeliveryRecord::encode`].
#[derive(Clone)]
pub(super) struct DeliveryRecord {
    pub(super) event_id: u128,
    pub(super) event_type: EventTypeName,
    pub(super) key: OrderingKey,
    pub(super) sequence: u64,
    /// When the event was accepted: sent as `postroom-published-at` and the start of the
    /// delivery latency. Never changes.
    pub(super) published_at: Timestamp,
    /// When the current schedule started (the fan-out, a redrive, a seek): the retry policy's
    /// time to live counts from here, and a redrive or seek restarts it without changing
    /// `published_at`. Issue 15, defect 8.
    pub(super) schedule_from: Timestamp,
    /// Attempts so far, counted over the delivery's whole life so that every attempt in the log
    /// has its own number.
    pub(super) attempts: u32,
    /// `attempts` when the current schedule started (0, or the count at a redrive or seek): the
    /// policy's `attempts_max` counts from here.
    pub(super) attempts_base: u32,
    pub(super) next_attempt_at: Timestamp,
    /// Set while leased to a puller.
    pub(super) lease_until: Option<Timestamp>,
    pub(super) last_error: Option<String>,
}

/// A dead letter: the delivery as it was, why, and when. Stored like [`DeliveryRecord`]: the
/// first layout, then the fields added since.
pub(super) struct DeadRecord {
    pub(super) delivery: DeliveryRecord,
    pub(super) reason: String,
    pub(super) dead_at: Timestamp,
}

/// The first stored layout of a delivery (postcard, field by field).
#[derive(Serialize, Deserialize)]
struct DeliveryV1 {
    event_id: u128,
    event_type: EventTypeName,
    key: OrderingKey,
    sequence: u64,
    published_at: Timestamp,
    attempts: u32,
    attempts_base: u32,
    next_attempt_at: Timestamp,
    lease_until: Option<Timestamp>,
    last_error: Option<String>,
}

/// The first stored layout of a dead letter.
#[derive(Serialize, Deserialize)]
struct DeadV1 {
    delivery: DeliveryV1,
    reason: String,
    dead_at: Timestamp,
}

/// The fields added after the first layout, stored after it.
#[derive(Serialize, Deserialize)]
struct DeliveryExt {
    schedule_from: Timestamp,
}

impl DeliveryRecord {
    fn v1(&self) -> DeliveryV1 {
        DeliveryV1 {
            event_id: self.event_id,
            event_type: self.event_type.clone(),
            key: self.key.clone(),
            sequence: self.sequence,
            published_at: self.published_at,
            attempts: self.attempts,
            attempts_base: self.attempts_base,
            next_attempt_at: self.next_attempt_at,
            lease_until: self.lease_until,
            last_error: self.last_error.clone(),
        }
    }

    fn from_parts(v: DeliveryV1, ext: Option<DeliveryExt>) -> DeliveryRecord {
        DeliveryRecord {
            // A record of the first layout reset `published_at` at a redrive or seek, so that
            // is when its schedule started.
            schedule_from: ext.map_or(v.published_at, |e| e.schedule_from),
            event_id: v.event_id,
            event_type: v.event_type,
            key: v.key,
            sequence: v.sequence,
            published_at: v.published_at,
            attempts: v.attempts,
            attempts_base: v.attempts_base,
            next_attempt_at: v.next_attempt_at,
            lease_until: v.lease_until,
            last_error: v.last_error,
        }
    }

    fn ext(&self) -> Result<Vec<u8>> {
        postcard::to_allocvec(&DeliveryExt {
            schedule_from: self.schedule_from,
        })
        .map_err(|e| Error::Storage(format!("encode: {e}")))
    }

    /// The stored bytes.
    pub(super) fn encode(&self) -> Result<Vec<u8>> {
        encode_with_tail(&self.v1(), &self.ext()?)
    }

    /// Reads either layout.
    pub(super) fn decode(bytes: &[u8]) -> Result<DeliveryRecord> {
        let (v1, tail): (DeliveryV1, &[u8]) = decode_with_tail(bytes)?;
        Ok(Self::from_parts(v1, decode_ext(tail)?))
    }
}

impl DeadRecord {
    /// The stored bytes.
    pub(super) fn encode(&self) -> Result<Vec<u8>> {
        let v1 = DeadV1 {
            delivery: self.delivery.v1(),
            reason: self.reason.clone(),
            dead_at: self.dead_at,
        };
        encode_with_tail(&v1, &self.delivery.ext()?)
    }

    /// Reads either layout.
    pub(super) fn decode(bytes: &[u8]) -> Result<DeadRecord> {
        let (v1, tail): (DeadV1, &[u8]) = decode_with_tail(bytes)?;
        Ok(DeadRecord {
            delivery: DeliveryRecord::from_parts(v1.delivery, decode_ext(tail)?),
            reason: v1.reason,
            dead_at: v1.dead_at,
        })
    }
}

/// The added fields, when the record has them.
fn decode_ext(tail: &[u8]) -> Result<Option<DeliveryExt>> {
    if tail.is_empty() {
        return Ok(None);
    }
    postcard::from_bytes(tail)
        .map(Some)
        .map_err(|e| Error::Storage(format!("decode: {e}")))
}

#[derive(Serialize, Deserialize)]
pub(super) struct AttemptRecord {
    pub(super) event_id: u128,
    pub(super) outcome: AttemptOutcome,
    pub(super) status: Option<u16>,
    pub(super) error: Option<String>,
    pub(super) latency_ms: u64,
    pub(super) at: Timestamp,
}

/// The ack id handed to pullers: the log offset and the attempt it leases.
pub(crate) fn ack_id(offset: u64, attempt: u32) -> String {
    format!("{offset}-{attempt}")
}

/// Parses an ack id; a malformed one is bad input.
pub(crate) fn parse_ack_id(s: &str) -> Result<(u64, u32)> {
    s.split_once('-')
        .and_then(|(o, a)| Some((o.parse().ok()?, a.parse().ok()?)))
        .ok_or_else(|| {
            Error::invalid(
                "ack_id",
                format!("`{s}` is not an ack id this broker issued"),
            )
        })
}

/// Why an attempt failed, for scheduling the next one.
pub(super) struct Failure {
    /// The receiver's Retry-After, when it sent one with 429 or 503.
    retry_after_ms: Option<u64>,
    error: String,
}

impl Failure {
    pub(super) fn new(retry_after_ms: Option<u64>, error: &str) -> Self {
        Failure {
            retry_after_ms,
            error: error.to_string(),
        }
    }
}

impl<'t> Tables<'t> {
    /// Dead-letters every undelivered copy of one event (reason `stopped`). A copy being pushed
    /// right now is stopped too; its outcome finds no delivery and is ignored like any other
    /// late outcome.
    pub(super) fn stop_event(&mut self, now: Timestamp, event: EventId) -> Result<WriteOutput> {
        let (room_id, offset) = match self.events.get(event.0.as_u128())? {
            Some(g) => {
                let h = decode_event_header(&g)?;
                (h.room_id, h.offset)
            }
            None => {
                return Err(Error::EventNotFound {
                    id: event.to_string(),
                })
            }
        };
        let subs: Vec<u128> = self
            .room_subs
            .range((room_id, 0u128)..=(room_id, u128::MAX))?
            .map(|r| r.map(|(k, _)| k.1))
            .collect::<std::result::Result<_, _>>()?;
        let mut n = 0;
        for sub in subs {
            let mut rec: DeliveryRecord = match self.deliveries.get((sub, offset))? {
                Some(g) => DeliveryRecord::decode(&g)?,
                None => continue,
            };
            let attempt = self.last_attempt_no(sub, offset)?.max(rec.attempts) + 1;
            // The stop is an attempt of its own: a redrive continues after it, rather than
            // logging its next attempt under the same number.
            rec.attempts = attempt;
            self.log_attempt(
                sub,
                offset,
                attempt,
                &AttemptRecord {
                    event_id: rec.event_id,
                    outcome: AttemptOutcome::DeadLettered,
                    status: None,
                    error: Some("stopped by the publisher".into()),
                    latency_ms: 0,
                    at: now,
                },
                rec.published_at,
            )?;
            self.dead_letter(now, sub, offset, rec, "stopped")?;
            n += 1;
        }
        Ok(WriteOutput::Count { n, more: false })
    }

    /// The highest attempt number logged for a delivery, 0 if none.
    pub(super) fn last_attempt_no(&self, sub: u128, offset: u64) -> Result<u32> {
        Ok(
            match self
                .attempts
                .range_rev((sub, offset, 0)..=(sub, offset, u32::MAX))?
                .next()
            {
                Some(item) => item?.0 .2,
                None => 0,
            },
        )
    }

    /// Logs one attempt; `published_at` is the event's, for the delivery latency metric.
    pub(super) fn log_attempt(
        &mut self,
        sub: u128,
        offset: u64,
        attempt: u32,
        rec: &AttemptRecord,
        published_at: Timestamp,
    ) -> Result<()> {
        self.attempts
            .insert((sub, offset, attempt), encode(rec)?.as_slice())?;
        // Observed here because this is the one place every attempt passes; counted after the
        // commit, so that a failed commit counts nothing.
        self.observed.push(crate::storage::Observation::Attempt {
            sub,
            event: rec.event_id,
            outcome: rec.outcome,
            published_at,
            at: rec.at,
        });
        Ok(())
    }

    /// Moves a delivery to the dead letters.
    pub(super) fn dead_letter(
        &mut self,
        now: Timestamp,
        sub: u128,
        offset: u64,
        rec: DeliveryRecord,
        reason: &'static str,
    ) -> Result<()> {
        self.remove_delivery(sub, offset)?;
        let dead = DeadRecord {
            delivery: rec,
            reason: reason.into(),
            dead_at: now,
        };
        self.dead_letters
            .insert((sub, offset), dead.encode()?.as_slice())?;
        self.observed
            .push(crate::storage::Observation::DeadLettered { sub, reason });
        let (backlog, dead_n) = self.sub_stats(sub)?;
        self.sub_stats
            .insert(sub, (backlog.saturating_sub(1), dead_n + 1))?;
        self.touched.insert(sub);
        Ok(())
    }

    pub(super) fn complete(&mut self, sub: u128, offset: u64) -> Result<()> {
        self.remove_delivery(sub, offset)?;
        let (backlog, dead) = self.sub_stats(sub)?;
        self.sub_stats
            .insert(sub, (backlog.saturating_sub(1), dead))?;
        self.touched.insert(sub);
        Ok(())
    }

    /// After a failed attempt: schedule the next one or dead-letter.
    pub(super) fn fail(
        &mut self,
        now: Timestamp,
        sub: &SubRecord,
        sub_id: u128,
        offset: u64,
        mut rec: DeliveryRecord,
        failure: Failure,
    ) -> Result<()> {
        let Failure {
            retry_after_ms,
            error,
        } = failure;
        let room_retry = self.room_retry(sub.room_id, &sub.room)?;
        let policy = sub.retry.apply(&room_retry.apply(&self.defaults.retry));
        let seed = (rec.event_id as u64) ^ u64::from(rec.attempts);
        rec.last_error = Some(error);
        rec.lease_until = None;
        let in_schedule = rec.attempts.saturating_sub(rec.attempts_base);
        match retry::next_after_failure(
            &policy,
            in_schedule,
            rec.schedule_from,
            now,
            retry_after_ms,
            self.defaults.retry_after_ms_max,
            seed,
        ) {
            Next::RetryAt(at) => {
                rec.next_attempt_at = at;
                self.put_delivery(sub_id, offset, &rec)?;
                self.touched.insert(sub_id);
                Ok(())
            }
            Next::AttemptsExhausted => {
                self.dead_letter(now, sub_id, offset, rec, "attempts_exhausted")
            }
            Next::TtlExpired => self.dead_letter(now, sub_id, offset, rec, "ttl_expired"),
        }
    }

    pub(super) fn push_outcome(
        &mut self,
        now: Timestamp,
        sub_id: u128,
        offset: u64,
        attempt: u32,
        resp: PushResponse,
    ) -> Result<()> {
        // The subscription or the delivery may be gone (deleted, seeked, redriven): nothing to do.
        let Ok(sub) = self.sub_record(sub_id) else {
            return Ok(());
        };
        let mut rec: DeliveryRecord = match self.deliveries.get((sub_id, offset))? {
            Some(g) => DeliveryRecord::decode(&g)?,
            None => return Ok(()),
        };
        if rec.attempts + 1 != attempt {
            return Ok(());
        }
        rec.attempts = attempt;
        let ok = resp.status.is_some_and(|s| (200..300).contains(&s));
        self.log_attempt(
            sub_id,
            offset,
            attempt,
            &AttemptRecord {
                event_id: rec.event_id,
                outcome: if ok {
                    AttemptOutcome::Delivered
                } else {
                    AttemptOutcome::Failed
                },
                status: resp.status,
                error: resp.error.clone(),
                latency_ms: resp.latency_ms,
                at: now,
            },
            rec.published_at,
        )?;
        if ok {
            return self.complete(sub_id, offset);
        }
        let error = match (resp.status, &resp.error) {
            (Some(s), _) => format!("HTTP {s}"),
            (None, Some(e)) => e.clone(),
            (None, None) => "no response".into(),
        };
        if resp.status == Some(410) {
            // The receiver unsubscribed: stop, keep the backlog, say why.
            let mut sub = sub;
            sub.status = SubscriptionStatus::Disabled;
            sub.status_reason = Some("endpoint answered 410 Gone".into());
            sub.updated_at = now;
            self.store_sub(sub_id, &sub)?;
            rec.last_error = Some(error);
            self.put_delivery(sub_id, offset, &rec)?;
            return Ok(());
        }
        let retry_after = match resp.status {
            Some(429 | 503) => resp.retry_after_ms,
            _ => None,
        };
        self.fail(
            now,
            &sub,
            sub_id,
            offset,
            rec,
            Failure {
                retry_after_ms: retry_after,
                error,
            },
        )
    }
}
