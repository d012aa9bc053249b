//! Settings an administrator changes while the broker runs: default retry and backoff, queue and
//! lease defaults, and request limits. Incidents do not wait for a restart window: a flood of
//! retries or an oversized publisher is answered by changing a number now.
//!
//! Only settings read at the moment they apply are here. Those fixed when the broker starts
//! (the writer's queue and batch bounds, the cache, the push address guard and timeout, the
//! retention interval) are refused by name, so that nobody believes a change took effect when
//! it did not. On a store this broker alone writes, changes live in memory until the broker
//! stops; the configuration file is what a restart reads. On a store several nodes share
//! (PostgreSQL), a change is kept in the store as the whole set of changeable values with a
//! version, and every node adopts it (at start, and on its discovery round every half push
//! lease), so that a change made through one node holds on all of them.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::broker::{delivery_defaults, Broker};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::storage::RecordKind;
use crate::subscription::RetryOverrides;

/// A change to the running configuration: fields left out stay as they are.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigPatch {
    /// Request limits.
    #[serde(default)]
    pub limits: Option<LimitsPatch>,
    /// Delivery defaults.
    #[serde(default)]
    pub delivery: Option<DeliveryPatch>,
    /// See [`Config::idempotency_window_ms`].
    #[serde(default)]
    pub idempotency_window_ms: Option<u64>,
}

/// Request limits that change at run time; see [`crate::Limits`] for each.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsPatch {
    /// See [`crate::Limits::payload_bytes_max`]. The HTTP server's body limit is fixed at
    /// start, so raising this above it has no effect over HTTP.
    pub payload_bytes_max: Option<usize>,
    /// See [`crate::Limits::key_bytes_max`].
    pub key_bytes_max: Option<usize>,
    /// See [`crate::Limits::batch_events_max`].
    pub batch_events_max: Option<usize>,
    /// See [`crate::Limits::list_items_max`].
    pub list_items_max: Option<usize>,
    /// See [`crate::Limits::list_scan_max`].
    pub list_scan_max: Option<usize>,
}

/// Delivery defaults that change at run time; see [`crate::DeliveryConfig`] for each. They
/// apply to subscriptions that do not set their own value, from their next decision on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryPatch {
    /// The default retry and backoff policy: only the fields given change.
    pub retry: Option<RetryOverrides>,
    /// See [`crate::DeliveryConfig::retry_after_ms_max`].
    pub retry_after_ms_max: Option<u64>,
    /// See [`crate::DeliveryConfig::in_flight_max_default`].
    pub in_flight_max_default: Option<u32>,
    /// See [`crate::DeliveryConfig::queue_depth_max_default`].
    pub queue_depth_max_default: Option<u64>,
    /// See [`crate::DeliveryConfig::lease_ms_default`].
    pub lease_ms_default: Option<u64>,
    /// See [`crate::DeliveryConfig::pull_messages_max`].
    pub pull_messages_max: Option<usize>,
    /// See [`crate::DeliveryConfig::pull_wait_ms_max`].
    pub pull_wait_ms_max: Option<u64>,
    /// See [`crate::DeliveryConfig::dead_letter_retention_ms`].
    pub dead_letter_retention_ms: Option<u64>,
}

fn at_least_1<T: PartialOrd + From<u8> + Copy>(field: &str, v: Option<T>) -> Result<()> {
    match v {
        Some(n) if n < T::from(1u8) => Err(Error::invalid(field, "must be at least 1")),
        _ => Ok(()),
    }
}

fn set<T>(slot: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *slot = v;
    }
}

impl ConfigPatch {
    /// Every changeable value of `config`, as a patch that sets them all.
    fn every_value_of(config: &Config) -> ConfigPatch {
        let l = &config.limits;
        let d = &config.delivery;
        let r = &d.retry;
        ConfigPatch {
            limits: Some(LimitsPatch {
                payload_bytes_max: Some(l.payload_bytes_max),
                key_bytes_max: Some(l.key_bytes_max),
                batch_events_max: Some(l.batch_events_max),
                list_items_max: Some(l.list_items_max),
                list_scan_max: Some(l.list_scan_max),
            }),
            delivery: Some(DeliveryPatch {
                retry: Some(RetryOverrides {
                    initial_delay_ms: Some(r.initial_delay_ms),
                    multiplier: Some(r.multiplier),
                    delay_ms_max: Some(r.delay_ms_max),
                    attempts_max: Some(r.attempts_max),
                    ttl_ms: Some(r.ttl_ms),
                    jitter_percent: Some(r.jitter_percent),
                }),
                retry_after_ms_max: Some(d.retry_after_ms_max),
                in_flight_max_default: Some(d.in_flight_max_default),
                queue_depth_max_default: Some(d.queue_depth_max_default),
                lease_ms_default: Some(d.lease_ms_default),
                pull_messages_max: Some(d.pull_messages_max),
                pull_wait_ms_max: Some(d.pull_wait_ms_max),
                dead_letter_retention_ms: Some(d.dead_letter_retention_ms),
            }),
            idempotency_window_ms: Some(config.idempotency_window_ms),
        }
    }

    /// `config` with this patch applied, or the first field that is out of range.
    fn applied_to(&self, config: &Config) -> Result<Config> {
        let mut c = config.clone();
        if let Some(l) = &self.limits {
            at_least_1("limits.payload_bytes_max", l.payload_bytes_max)?;
            at_least_1("limits.key_bytes_max", l.key_bytes_max)?;
            at_least_1("limits.batch_events_max", l.batch_events_max)?;
            at_least_1("limits.list_items_max", l.list_items_max)?;
            at_least_1("limits.list_scan_max", l.list_scan_max)?;
            set(&mut c.limits.payload_bytes_max, l.payload_bytes_max);
            set(&mut c.limits.key_bytes_max, l.key_bytes_max);
            set(&mut c.limits.batch_events_max, l.batch_events_max);
            set(&mut c.limits.list_items_max, l.list_items_max);
            set(&mut c.limits.list_scan_max, l.list_scan_max);
        }
        if let Some(d) = &self.delivery {
            if let Some(r) = &d.retry {
                c.delivery.retry = r.apply(&c.delivery.retry);
            }
            at_least_1("delivery.retry_after_ms_max", d.retry_after_ms_max)?;
            at_least_1("delivery.in_flight_max_default", d.in_flight_max_default)?;
            at_least_1(
                "delivery.queue_depth_max_default",
                d.queue_depth_max_default,
            )?;
            at_least_1("delivery.lease_ms_default", d.lease_ms_default)?;
            at_least_1("delivery.pull_messages_max", d.pull_messages_max)?;
            at_least_1("delivery.pull_wait_ms_max", d.pull_wait_ms_max)?;
            at_least_1(
                "delivery.dead_letter_retention_ms",
                d.dead_letter_retention_ms,
            )?;
            let dc = &mut c.delivery;
            set(&mut dc.retry_after_ms_max, d.retry_after_ms_max);
            set(&mut dc.in_flight_max_default, d.in_flight_max_default);
            set(&mut dc.queue_depth_max_default, d.queue_depth_max_default);
            set(&mut dc.lease_ms_default, d.lease_ms_default);
            set(&mut dc.pull_messages_max, d.pull_messages_max);
            set(&mut dc.pull_wait_ms_max, d.pull_wait_ms_max);
            set(&mut dc.dead_letter_retention_ms, d.dead_letter_retention_ms);
            if dc.in_flight_max_default > dc.in_flight_max_max {
                return Err(Error::invalid(
                    "delivery.in_flight_max_default",
                    format!(
                        "must not exceed in_flight_max_max ({})",
                        dc.in_flight_max_max
                    ),
                ));
            }
            if dc.lease_ms_default > dc.lease_ms_max {
                return Err(Error::invalid(
                    "delivery.lease_ms_default",
                    format!("must not exceed lease_ms_max ({})", dc.lease_ms_max),
                ));
            }
        }
        at_least_1("idempotency_window_ms", self.idempotency_window_ms)?;
        set(&mut c.idempotency_window_ms, self.idempotency_window_ms);
        Ok(c)
    }
}

/// The record id, among `RecordKind::Setting` records, of the values changed at run time on a
/// shared store.
const RUNTIME_RECORD: &str = "runtime";

/// What a shared store keeps of the values changed at run time: every changeable value, and
/// a version that grows by one with each change.
#[derive(Serialize, Deserialize)]
struct StoredRuntime {
    version: u64,
    values: ConfigPatch,
}

fn stored_runtime(bytes: &[u8]) -> std::result::Result<StoredRuntime, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("it cannot be read: {e}"))
}

/// The version of a stored configuration this release cannot read whole, if it has one.
fn version_of(bytes: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()?
        .get("version")?
        .as_u64()
}

impl Broker {
    /// Changes the running configuration and returns it as it now stands. Nothing changes when
    /// any field is out of range. In force for every decision taken after this returns, until
    /// the broker stops; on a store several nodes share, stored and adopted by every node
    /// (see the module's comment), each within half a push lease.
    pub async fn reconfigure(&self, patch: &ConfigPatch) -> Result<Arc<Config>> {
        let inner = self.inner();
        let _one_at_a_time = inner.reconfiguring.lock().await;
        let shared = inner.store.shared();
        if shared {
            // Another node's change first, so that this patch changes the values all nodes
            // share rather than undoing that change.
            self.adopt_locked()?;
        }
        let current = inner.config_now();
        let next = patch.applied_to(&current)?;
        let retry = &next.delivery.retry;
        // The merged policy passes the same checks as a subscription's own overrides.
        self.check_retry(&RetryOverrides {
            initial_delay_ms: Some(retry.initial_delay_ms),
            multiplier: Some(retry.multiplier),
            delay_ms_max: Some(retry.delay_ms_max),
            attempts_max: Some(retry.attempts_max),
            ttl_ms: Some(retry.ttl_ms),
            jitter_percent: Some(retry.jitter_percent),
        })?;
        if shared {
            let seen = inner
                .runtime_version
                .load(std::sync::atomic::Ordering::SeqCst);
            let stored = serde_json::to_vec(&StoredRuntime {
                version: seen + 1,
                values: ConfigPatch::every_value_of(&next),
            })
            .map_err(|e| Error::Storage(e.to_string()))?;
            // Stored only over the version this node adopted: a change another node stored
            // meanwhile makes this one a lost race (503, tried again by the client).
            self.record_op_quiet(move |tx, _| {
                let now = tx.get(RecordKind::Setting, RUNTIME_RECORD)?;
                if now.map_or(Some(0), |b| version_of(&b)) != Some(seen) {
                    return Err(Error::StorageConflict {
                        detail: "another node changed the configuration at the same time".into(),
                    });
                }
                tx.put(RecordKind::Setting, RUNTIME_RECORD, &stored)?;
                Ok(Vec::new())
            })
            .await?;
            inner
                .runtime_version
                .store(seen + 1, std::sync::atomic::Ordering::SeqCst);
        }
        self.install(next)
    }

    /// On a shared store: adopts the values another node changed at run time, if it stored
    /// a version this node has not adopted yet. True when something was adopted.
    pub(crate) async fn adopt_runtime_config(&self) -> Result<bool> {
        let _one_at_a_time = self.inner().reconfiguring.lock().await;
        self.adopt_locked()
    }

    /// [`Broker::adopt_runtime_config`] with `reconfiguring` held (or before the broker runs).
    /// A stored version this node cannot take (unreadable, say written by a newer release, or
    /// out of this node's own bounds, its `in_flight_max_max` or `lease_ms_max`) is not
    /// adopted: it is refused with the reason, logged once per version, and this node's
    /// `PATCH` is refused until it can take it, so that it never stores its own values over
    /// a change it did not adopt.
    pub(crate) fn adopt_locked(&self) -> Result<bool> {
        let inner = self.inner();
        let seen = inner
            .runtime_version
            .load(std::sync::atomic::Ordering::SeqCst);
        let Some(bytes) = inner.store.record(RecordKind::Setting, RUNTIME_RECORD)? else {
            if seen > 0 {
                // Gone (a database restored from before any change): the next change is
                // stored as the first again, rather than refused as a lost race forever.
                inner
                    .runtime_version
                    .store(0, std::sync::atomic::Ordering::SeqCst);
                tracing::warn!(
                    adopted = seen,
                    "the stored run-time configuration is gone (a restored database?); this \
                     node keeps the values it has until the next change"
                );
            }
            return Ok(false);
        };
        let stored = match stored_runtime(&bytes) {
            Ok(stored) => stored,
            Err(why) => return Err(self.refused(version_of(&bytes), &why)),
        };
        // Any other version, a lower one too: a database restored from a backup brings its
        // configuration back with it.
        if stored.version == seen {
            return Ok(false);
        }
        let next = match stored.values.applied_to(&inner.config_now()) {
            Ok(next) => next,
            Err(e) => return Err(self.refused(Some(stored.version), &e.to_string())),
        };
        inner
            .runtime_version
            .store(stored.version, std::sync::atomic::Ordering::SeqCst);
        inner
            .runtime_refused
            .store(0, std::sync::atomic::Ordering::SeqCst);
        self.install(next)?;
        tracing::info!(
            version = stored.version,
            "adopted the configuration another node changed at run time"
        );
        Ok(true)
    }

    /// The refusal of a stored version this node cannot take, logged once per version.
    fn refused(&self, version: Option<u64>, why: &str) -> Error {
        let v = version.unwrap_or(u64::MAX);
        if self
            .inner()
            .runtime_refused
            .swap(v, std::sync::atomic::Ordering::SeqCst)
            != v
        {
            tracing::warn!(version = v, reason = %why, "cannot adopt the configuration another node changed at run time; this node keeps its own values and refuses configuration changes until it can");
        }
        Error::invalid(
            "configuration",
            format!(
                "this node cannot adopt the configuration another node stored (version {v}): \
                 {why}; change it through a node that can, or align this node's bounds"
            ),
        )
    }

    /// Puts `next` in force for every decision from now on.
    fn install(&self, next: Config) -> Result<Arc<Config>> {
        let inner = self.inner();
        inner.store.set_delivery_defaults(delivery_defaults(&next));
        let next = Arc::new(next);
        *inner.config.write().unwrap_or_else(|p| p.into_inner()) = next.clone();
        // Dispatchers pick up new retry defaults at their next decision; wake them so that one
        // waiting out a long backoff looks again.
        self.wake_deliveries();
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(patch: serde_json::Value) -> Result<Config> {
        let p: ConfigPatch =
            serde_json::from_value(patch).map_err(|e| Error::invalid("body", e.to_string()))?;
        p.applied_to(&Config::default())
    }

    #[test]
    fn a_patch_changes_only_what_it_names() {
        let c = check(serde_json::json!({
            "limits": {"payload_bytes_max": 2048},
            "delivery": {"retry": {"attempts_max": 3}, "lease_ms_default": 5000}
        }))
        .expect("valid");
        let d = Config::default();
        assert_eq!(c.limits.payload_bytes_max, 2048);
        assert_eq!(c.delivery.retry.attempts_max, 3);
        assert_eq!(
            c.delivery.retry.initial_delay_ms,
            d.delivery.retry.initial_delay_ms
        );
        assert_eq!(c.delivery.lease_ms_default, 5000);
        assert_eq!(c.limits.batch_events_max, d.limits.batch_events_max);
    }

    #[test]
    fn out_of_range_and_start_time_settings_are_refused_by_name() {
        let e = check(serde_json::json!({"limits": {"payload_bytes_max": 0}})).unwrap_err();
        assert!(e.to_string().contains("payload_bytes_max"), "{e}");
        let e =
            check(serde_json::json!({"delivery": {"lease_ms_default": 999_999_999}})).unwrap_err();
        assert!(e.to_string().contains("lease_ms_max"), "{e}");
        // The writer's bounds are fixed at start: naming one is an error, not a silent no-op.
        let e = check(serde_json::json!({"writer": {"commit_ops_max": 1}})).unwrap_err();
        assert!(e.to_string().contains("writer"), "{e}");
    }
}
