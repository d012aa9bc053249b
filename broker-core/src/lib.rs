//! Postroom's core: a durable Pub/Sub broker to embed in a Rust service.
//!
//! A [`Broker`] hosts Rooms; each Room hosts event types, each a JSON Schema; publishers send
//! JSON events that are validated, numbered per ordering key, and stored durably before the
//! publisher hears "accepted". Everything is on one embedded redb file (or in memory for tests),
//! written by one writer thread that commits concurrent publishes together (group commit).
//!
//! ```no_run
//! # async fn demo() -> Result<(), broker_core::Error> {
//! use broker_core::*;
//! let broker = Broker::open("data/postroom.redb", Config::default()).await?;
//! let room = RoomName::new("irc")?;
//! let admin = Principal::new("admin")?;
//! broker.create_room(NewRoom::new(room.clone(), admin.clone()).approved()).await?;
//! let ty = EventTypeName::new("heartbeat")?;
//! broker
//!     .put_event_type(&room, EventTypeSpec {
//!         name: ty.clone(),
//!         description: String::new(),
//!         schema: serde_json::json!({"type": "object"}),
//!         key_pointer: Some("/centre".into()),
//!     })
//!     .await?;
//! let receipt = broker
//!     .publish(PublishRequest::new(room, ty, admin, br#"{"centre":"yarlswood"}"#.to_vec()))
//!     .await?;
//! assert_eq!(receipt.sequence, Sequence(1));
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod audit;
mod broker;
mod broker_tasks;
mod clock;
mod config;
mod delivery_api;
mod dispatch;
mod dispatch_owner;
mod engine;
mod error;
mod host_limits;
mod identity;
mod ids;
mod keyring;
mod model;
mod net_guard;
mod operations;
mod ownership;
mod publish;
mod push_slots;
mod queue_api;
mod remote_wake;
mod retry;
mod rights;
mod rooms_api;
mod runtime;
mod schema;
mod seek;
#[cfg(test)]
mod sim;
mod stats;
mod storage;
mod subscription;
pub mod telemetry;
#[cfg(test)]
mod testkit;
mod webhook;
mod writer;

pub use audit::{
    AuditEntry, AuditFilter, NewAuditEntry, AUDIT_DETAIL_BYTES_MAX, AUDIT_TEXT_BYTES_MAX,
};
pub use broker::{Broker, WriterCounters};
pub use clock::{Clock, ClockSleep, ManualClock, SystemClock, Timestamp};
pub use config::{Config, DeliveryConfig, Limits, PushAllow, RetentionConfig, WriterConfig};
pub use engine::{copy_embedded_to_postgres, CopyReport};
pub use error::{Error, ErrorKind, Result, Violation};
pub use identity::{ApiClient, Application, Member, SecretInfo, CLIENT_SECRETS_MAX};
pub use ids::{EventId, EventTypeName, OrderingKey, Principal, RoomName, Sequence, SubscriptionId};
pub use keyring::{KeyRing, Rotation, SigningKey, SigningKeyInfo};
pub use model::{
    Event, EventFilter, EventType, EventTypeSpec, EventTypeVersion, NewRoom, Page, PublishRequest,
    PutEventTypeOutcome, Receipt, Retention, Room, RoomPatch, RoomStatus, StoredResponse,
    SweepReport,
};
pub use operations::{DeliverySummary, MessageFilter, MessageLogEntry, MessageStatus};
pub use rights::{Grant, Rights, Role, SUBSCRIBER_REVOKED};
pub use runtime::{ConfigPatch, DeliveryPatch, LimitsPatch};
pub use stats::{
    Latency, RoomStats, StatsFilter, StatsReport, StatsTotals, SubscriptionStats, Window,
};
#[cfg(any(test, feature = "fault-injection"))]
pub use storage::pg_cluster::{test_postgres, TestPostgres};
#[cfg(any(test, feature = "fault-injection"))]
pub use storage::StorageFaults;
pub use storage::{apply_migrations, pending_migrations, PendingMigration, PostgresConfig};
pub use subscription::redact_url;
pub use subscription::{
    Attempt, AttemptOutcome, BasicAuth, BlockedKey, CreatedSubscription, DeadLetter, DeliveryMode,
    DeliveryState, EventDelivery, NewSubscription, PulledMessage, PushEndpoint, RetryOverrides,
    RetryPolicy, SeekTarget, Subscription, SubscriptionPatch, SubscriptionStatus, REDACTED,
};
pub use webhook::{sign as sign_webhook, verify as verify_webhook};
