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
use crate::storage::{DueDelivery, LeaseRef, WriteOutput};
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
    /// Which queueing of the delivery this is: 0 from the fan-out, a new number from every seek
    /// that queues it again. A push hands it out and its outcome names it, so that the outcome
    /// of a push started before a seek is not taken for the replay's (simulation finding F2).
    pub(super) queueing: u64,
    /// The engine boot that granted the current lease (0 before epochs were counted); see
    /// [`LeaseRef::epoch`].
    pub(super) lease_epoch: u64,
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

/// The fields added after the first layout, stored after it, each after the one before: a
/// record ends after any of them (the ones missing take their defaults).
#[derive(Clone, Copy)]
struct DeliveryExt {
    schedule_from: Timestamp,
    queueing: u64,
    lease_epoch: u64,
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
            queueing: ext.map_or(0, |e| e.queueing),
            lease_epoch: ext.map_or(0, |e| e.lease_epoch),
        }
    }

    fn ext(&self) -> Result<Vec<u8>> {
        let mut tail = postcard::to_allocvec(&self.schedule_from)
            .map_err(|e| Error::Storage(format!("encode: {e}")))?;
        // Added after `schedule_from`, and only when not 0 (or when `lease_epoch` follows: the
        // fields are read by position), so that a record of the fan-out is stored as before.
        if self.queueing != 0 || self.lease_epoch != 0 {
            tail = postcard::to_extend(&self.queueing, tail)
                .map_err(|e| Error::Storage(format!("encode: {e}")))?;
        }
        // Then `lease_epoch`, only when not 0.
        if self.lease_epoch != 0 {
            tail = postcard::to_extend(&self.lease_epoch, tail)
                .map_err(|e| Error::Storage(format!("encode: {e}")))?;
        }
        Ok(tail)
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
    let bad = |e: postcard::Error| Error::Storage(format!("decode: {e}"));
    let (schedule_from, rest): (Timestamp, &[u8]) = postcard::take_from_bytes(tail).map_err(bad)?;
    let (queueing, rest) = if rest.is_empty() {
        (0, rest)
    } else {
        postcard::take_from_bytes::<u64>(rest).map_err(bad)?
    };
    let lease_epoch = if rest.is_empty() {
        0
    } else {
        postcard::take_from_bytes::<u64>(rest).map_err(bad)?.0
    };
    Ok(Some(DeliveryExt {
        schedule_from,
        queueing,
        lease_epoch,
    }))
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
pub(crate) fn ack_id(offset: u64, attempt: u32, epoch: u64) -> String {
    // Epoch 0 is a lease granted before epochs were counted: its id has the old form.
    if epoch == 0 {
        format!("{offset}-{attempt}")
    } else {
        format!("{offset}-{attempt}-{epoch}")
    }
}

/// Parses an ack id (`offset-attempt-epoch`, or `offset-attempt` from before epochs, which
/// names epoch 0); a malformed one is bad input.
pub(crate) fn parse_ack_id(s: &str) -> Result<LeaseRef> {
    let mut parts = s.split('-');
    let parsed = (|| {
        let offset = parts.next()?.parse().ok()?;
        let attempt = parts.next()?.parse().ok()?;
        let epoch = match parts.next() {
            None => 0,
            Some(e) => e.parse().ok()?,
        };
        parts.next().is_none().then_some(LeaseRef {
            offset,
            attempt,
            epoch: Some(epoch),
        })
    })();
    parsed.ok_or_else(|| {
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
                .first_rev((sub, offset, 0)..=(sub, offset, u32::MAX))?
            {
                Some(item) => item.0 .2,
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
        self.bump_sub_stats(sub, -1, 1)?;
        self.touched.insert(sub);
        Ok(())
    }

    pub(super) fn complete(&mut self, sub: u128, offset: u64) -> Result<()> {
        self.remove_delivery(sub, offset)?;
        self.bump_sub_stats(sub, -1, 0)?;
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

    /// Records what a push's receiver answered. It counts for the delivery only if it answers
    /// the current attempt of the current queueing; an answer to a push started before the
    /// delivery was stopped, or seeked past and queued again, changes nothing but the attempt
    /// log (see [`Tables::stale_outcome`]).
    pub(super) fn push_outcome(
        &mut self,
        now: Timestamp,
        sub_id: u128,
        due: &DueDelivery,
        resp: PushResponse,
    ) -> Result<()> {
        // The subscription may be gone (deleted): nothing to do.
        let Ok(sub) = self.sub_record(sub_id) else {
            return Ok(());
        };
        let (offset, attempt) = (due.offset, due.attempt);
        let ok = resp.status.is_some_and(|s| (200..300).contains(&s));
        let row = AttemptRecord {
            event_id: due.event_id.0.as_u128(),
            outcome: if ok {
                AttemptOutcome::Delivered
            } else {
                AttemptOutcome::Failed
            },
            status: resp.status,
            error: resp.error.clone(),
            latency_ms: resp.latency_ms,
            at: now,
        };
        let rec = match self.deliveries.get((sub_id, offset))? {
            Some(g) => Some(DeliveryRecord::decode(&g)?),
            None => None,
        };
        let mut rec = match rec {
            Some(rec) if rec.queueing == due.queueing && rec.attempts + 1 == attempt => rec,
            other => return self.stale_outcome(sub_id, due, other, &row),
        };
        rec.attempts = attempt;
        self.log_attempt(sub_id, offset, attempt, &row, rec.published_at)?;
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

    /// An answer to a push that is no longer current: the delivery was stopped, seeked past, or
    /// queued again by a seek (a new queueing) while the push was under way. It does not count
    /// for the delivery, but the push did happen: it is logged under its number when that
    /// number is above every number logged or counted for the delivery, and the delivery's count
    /// moves up to it (its schedule's count unchanged), so that no attempt number is used twice.
    /// An answer whose number is already taken (a stop logs its own), or for an event retention
    /// has removed, is dropped.
    fn stale_outcome(
        &mut self,
        sub_id: u128,
        due: &DueDelivery,
        rec: Option<DeliveryRecord>,
        row: &AttemptRecord,
    ) -> Result<()> {
        let counted = rec.as_ref().map_or(0, |r| r.attempts);
        if due.attempt <= self.last_attempt_no(sub_id, due.offset)?.max(counted) {
            return Ok(());
        }
        // An event that retention removed meanwhile (nobody owed it) keeps no log.
        if rec.is_none() && self.events.get(due.event_id.0.as_u128())?.is_none() {
            return Ok(());
        }
        self.log_attempt(sub_id, due.offset, due.attempt, row, due.published_at)?;
        if let Some(mut rec) = rec {
            rec.attempts_base += due.attempt - rec.attempts;
            rec.attempts = due.attempt;
            self.put_delivery(sub_id, due.offset, &rec)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The stored layouts of a delivery: each version's record decodes, and a record written
    //! now reads back as it was.

    use super::*;

    fn record(queueing: u64) -> DeliveryRecord {
        DeliveryRecord {
            event_id: 7,
            event_type: EventTypeName::new("t").unwrap(),
            key: OrderingKey::new("k", 64).unwrap(),
            sequence: 3,
            published_at: Timestamp(1_000),
            schedule_from: Timestamp(2_000),
            attempts: 4,
            attempts_base: 2,
            next_attempt_at: Timestamp(3_000),
            lease_until: Some(Timestamp(4_000)),
            last_error: Some("HTTP 503".into()),
            queueing,
            lease_epoch: 0,
        }
    }

    fn same(a: &DeliveryRecord, b: &DeliveryRecord) -> bool {
        a.encode().unwrap() == b.encode().unwrap()
            && (a.schedule_from, a.queueing, a.attempts, a.lease_epoch)
                == (b.schedule_from, b.queueing, b.attempts, b.lease_epoch)
    }

    /// An ack id names offset, attempt and epoch; the form from before epochs names epoch 0;
    /// anything else is bad input.
    #[test]
    fn ack_ids_round_trip_and_the_old_form_names_epoch_0() {
        for (offset, attempt, epoch) in [(0, 1, 0), (7, 3, 1), (u64::MAX, u32::MAX, u64::MAX)] {
            let id = ack_id(offset, attempt, epoch);
            let back = parse_ack_id(&id).unwrap();
            assert_eq!(
                (back.offset, back.attempt, back.epoch),
                (offset, attempt, Some(epoch))
            );
        }
        assert_eq!(ack_id(4, 2, 0), "4-2");
        assert_eq!(parse_ack_id("4-2").unwrap().epoch, Some(0));
        for bad in [
            "", "4", "4-", "4-2-", "4-2-1-0", "a-2", "4-b", "4-2-c", "-4-2",
        ] {
            assert!(parse_ack_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_layout_of_a_delivery_decodes() {
        for (queueing, lease_epoch) in [(0, 0), (1, 0), (u64::MAX, 0), (0, 3), (9, u64::MAX)] {
            let rec = DeliveryRecord {
                lease_epoch,
                ..record(queueing)
            };
            let back = DeliveryRecord::decode(&rec.encode().unwrap()).unwrap();
            assert!(
                same(&rec, &back),
                "queueing {queueing}, epoch {lease_epoch}"
            );
            let dead = DeadRecord {
                delivery: rec.clone(),
                reason: "stopped".into(),
                dead_at: Timestamp(5_000),
            };
            let back = DeadRecord::decode(&dead.encode().unwrap()).unwrap();
            assert!(same(&rec, &back.delivery));
        }
        // The first layout (no tail): its schedule started when it was published.
        let v1 = encode_with_tail(&record(0).v1(), &[]).unwrap();
        let back = DeliveryRecord::decode(&v1).unwrap();
        assert_eq!(back.schedule_from, Timestamp(1_000));
        assert_eq!(back.queueing, 0);
        // The second (schedule_from only) is what a fan-out record is still written as.
        let v2 = encode_with_tail(
            &record(0).v1(),
            &postcard::to_allocvec(&Timestamp(2_000)).unwrap(),
        )
        .unwrap();
        assert_eq!(v2, record(0).encode().unwrap());
        // The third (and queueing) is what a record without a lease epoch is still written as.
        let v3 = encode_with_tail(
            &record(5).v1(),
            &postcard::to_extend(&5u64, postcard::to_allocvec(&Timestamp(2_000)).unwrap()).unwrap(),
        )
        .unwrap();
        assert_eq!(v3, record(5).encode().unwrap());
        // A tail that does not decode is an error, not a default.
        let bad = encode_with_tail(&record(0).v1(), &[0xff; 12]).unwrap();
        assert!(DeliveryRecord::decode(&bad).is_err());
    }
}
