//! Publishing: the part of [`Broker`] that takes events in. Every check that needs no write
//! (size, JSON, Room status, schema, ordering key, the publisher's key limits, the idempotency
//! fingerprint) runs here on the caller's task; the writer only numbers and stores what passed
//! (`writer.rs`), so that one writer thread can commit for many publishers at once.

use std::sync::Arc;
use std::time::Duration;

use crate::broker::{request_hash, unexpected, Broker};
use crate::error::{Error, Result};
use crate::ids::{EventId, EventTypeName, Principal, RoomName};
use crate::model::{PublishRequest, Receipt};
use crate::schema;
use crate::storage::{IdempotencyClaim, PreparedEvent, WriteOp, WriteOutput};

impl Broker {
    /// Validates and stores one event; returns once it is durable on disk.
    pub async fn publish(&self, req: PublishRequest) -> Result<Receipt> {
        let started = std::time::Instant::now();
        let names = (
            req.room.clone(),
            req.event_type.clone(),
            req.publisher.clone(),
        );
        let result = self.publish_one(req).await;
        self.count_publish(&names, result.as_ref(), started.elapsed());
        result
    }

    /// Counts one publish in the metrics and the statistics, and logs it at debug level under
    /// the `postroom::messages` target (metadata only, never the payload), so that an operator
    /// can turn on a trail of every event with `log_level` at run time.
    fn count_publish(
        &self,
        (room, event_type, publisher): &(RoomName, EventTypeName, Principal),
        result: std::result::Result<&Receipt, &Error>,
        took: Duration,
    ) {
        match result {
            Ok(r) => tracing::debug!(
                target: "postroom::messages",
                event_id = %r.id, room = %r.room, event_type = %r.event_type,
                version = r.version, publisher = %publisher, key = %r.key.as_str(),
                sequence = r.sequence.0, duplicate = r.duplicate, "event received"
            ),
            Err(e) => tracing::debug!(
                target: "postroom::messages",
                room = %room, event_type = %event_type, publisher = %publisher,
                code = e.code(), "event refused"
            ),
        }
        let outcome = result.map(|r| r.duplicate);
        let label = crate::telemetry::publish(room, event_type, outcome, took);
        // Refusals for Rooms or types that do not exist are not kept per Room: their names come
        // from callers, and a series per made-up name would let anyone fill the bound.
        if !matches!(
            outcome,
            Err(Error::RoomNotFound { .. } | Error::EventTypeNotFound { .. })
        ) {
            self.inner().stats.publish(
                self.now(),
                room,
                event_type,
                publisher,
                label,
                took.as_micros().min(u128::from(u64::MAX)) as u64,
            );
        }
    }

    async fn publish_one(&self, req: PublishRequest) -> Result<Receipt> {
        let prepared = self.prepare(req).await?;
        match self.write_op(WriteOp::Publish(vec![prepared])).await? {
            WriteOutput::Receipts(mut r) if r.len() == 1 => {
                r.pop().unwrap_or(Err(Error::ShuttingDown))
            }
            other => Err(unexpected(other)),
        }
    }

    /// Publishes up to [`crate::Limits::batch_events_max`] events in one write transaction. Each
    /// succeeds or fails on its own (a schema violation refuses that event only); all that succeed
    /// are durable when this returns. Events of one key are numbered in batch order.
    pub async fn publish_batch(&self, reqs: Vec<PublishRequest>) -> Result<Vec<Result<Receipt>>> {
        let max = self.config().limits.batch_events_max;
        if reqs.len() > max {
            return Err(Error::limit(
                "batch_events_max",
                max as u64,
                reqs.len() as u64,
            ));
        }
        let started = std::time::Instant::now();
        let names: Vec<(RoomName, EventTypeName, Principal)> = reqs
            .iter()
            .map(|r| (r.room.clone(), r.event_type.clone(), r.publisher.clone()))
            .collect();
        let mut results: Vec<Option<Result<Receipt>>> = Vec::with_capacity(reqs.len());
        let mut prepared = Vec::with_capacity(reqs.len());
        for req in reqs {
            match self.prepare(req).await {
                Ok(p) => {
                    prepared.push(p);
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        if !prepared.is_empty() {
            let receipts = match self.write_op(WriteOp::Publish(prepared)).await? {
                WriteOutput::Receipts(r) => r,
                other => return Err(unexpected(other)),
            };
            let mut receipts = receipts.into_iter();
            for slot in results.iter_mut().filter(|s| s.is_none()) {
                *slot = receipts.next();
            }
        }
        let results: Vec<Result<Receipt>> = results
            .into_iter()
            .map(|r| r.unwrap_or(Err(Error::Storage("missing receipt".into()))))
            .collect();
        // Every event of the batch waited for the same commit, so each gets the batch's time.
        let took = started.elapsed();
        for (names, r) in names.iter().zip(&results) {
            self.count_publish(names, r.as_ref(), took);
        }
        Ok(results)
    }

    /// Every check that needs no write: limits, JSON, Room status, schema, ordering key.
    async fn prepare(&self, req: PublishRequest) -> Result<PreparedEvent> {
        let config = self.config();
        let limits = &config.limits;
        if req.payload.len() > limits.payload_bytes_max {
            return Err(Error::limit(
                "payload_bytes_max",
                limits.payload_bytes_max as u64,
                req.payload.len() as u64,
            ));
        }
        if let Some(k) = &req.idempotency_key {
            self.check_idempotency_key(k)?;
        }
        let payload: serde_json::Value =
            serde_json::from_slice(&req.payload).map_err(|e| Error::InvalidJson {
                message: e.to_string(),
            })?;
        let target = self
            .inner()
            .store
            .publish_target(&req.room, &req.event_type)?;
        let validator = match self.inner().validators.get(
            target.room_id,
            req.event_type.as_str(),
            target.version,
        ) {
            Some(v) => v,
            None => {
                let v = self.inner().store.event_type_version(
                    target.room_id,
                    &req.room,
                    &req.event_type,
                    target.version,
                )?;
                let compiled =
                    Arc::new(schema::compile(&v.schema, self.config().validate_formats)?);
                self.inner().validators.insert(
                    target.room_id,
                    req.event_type.as_str(),
                    target.version,
                    compiled.clone(),
                );
                compiled
            }
        };
        if !validator.is_valid(&payload) {
            // Listing what is wrong costs memory in proportion to the payload (the validator
            // builds every error first), so it runs off the async workers, a few at a time.
            let slot = self
                .inner()
                .violation_checks
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| Error::ShuttingDown)?;
            let (max, text_max) = (
                limits.schema_violations_max,
                limits.violation_text_bytes_max,
            );
            let found = tokio::task::spawn_blocking(move || {
                let _slot = slot;
                schema::violations(&validator, &payload, max, text_max)
            })
            .await
            .map_err(|e| Error::Storage(format!("validation task: {e}")))?;
            return Err(Error::SchemaViolation {
                event_type: req.event_type.to_string(),
                version: target.version,
                violations: found.listed,
                total: found.total.max(1),
            });
        }
        let key = schema::ordering_key(
            &payload,
            target.key_pointer.as_deref(),
            req.ordering_key.as_deref(),
            req.event_type.as_str(),
            limits.key_bytes_max,
        )?;
        if let Some(allowed) = &req.keys_allowed {
            if !allowed.iter().any(|k| k == key.as_str()) {
                return Err(Error::KeyNotAllowed {
                    key: key.as_str().to_string(),
                });
            }
        }
        let idempotency = req.idempotency_key.map(|key| IdempotencyClaim {
            request_hash: request_hash(
                &req.event_type,
                req.event_id,
                req.ordering_key.as_deref(),
                &req.payload,
            ),
            key,
            window_ms: self.config().idempotency_window_ms,
        });
        Ok(PreparedEvent {
            room: req.room,
            room_id: target.room_id,
            event_type: req.event_type,
            version: target.version,
            key,
            payload: req.payload,
            publisher: req.publisher,
            id_from_publisher: req.event_id.is_some(),
            event_id: req.event_id.unwrap_or_else(EventId::new_v7),
            idempotency,
        })
    }
}
