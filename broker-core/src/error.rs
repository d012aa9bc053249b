//! One error type for the whole core. Every variant has a stable, machine-readable `code` that a
//! server maps to its protocol (HTTP status, problem type) in one place, and that never changes
//! meaning once released: clients branch on it.

use serde::Serialize;

/// One schema violation of a published payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// JSON Pointer into the payload where the violation is, `""` for the root.
    pub instance_path: String,
    /// JSON Pointer into the schema to the keyword that failed.
    pub schema_path: String,
    /// A human-readable description of what is wrong.
    pub message: String,
}

/// The broad class of an error, for callers that map errors to a protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The named thing does not exist.
    NotFound,
    /// The request contradicts the current state (already exists, different body for a key...).
    Conflict,
    /// The caller's credentials are not valid.
    Unauthenticated,
    /// The caller is known but its rights do not cover this request.
    Forbidden,
    /// The request is malformed or violates a rule; retrying it unchanged will fail again.
    InvalidInput,
    /// The request is larger than a configured limit.
    LimitExceeded,
    /// The broker is too busy right now; retrying later may succeed.
    Overloaded,
    /// The broker is shutting down or a background part has stopped.
    Unavailable,
    /// A storage or internal failure; the caller did nothing wrong.
    Internal,
}

/// Every error the core returns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The subscription's subscriber no longer holds the right to receive it (a revoked grant,
    /// a deleted application); it is paused until the right is given back.
    #[error("the subscriber `{subscriber}` of subscription `{id}` no longer has the right to receive it")]
    SubscriberRevoked {
        /// The subscription.
        id: String,
        /// Its subscriber.
        subscriber: String,
    },
    /// No Room with this name.
    #[error("room `{room}` not found")]
    RoomNotFound {
        /// The Room name asked for.
        room: String,
    },
    /// No event type with this name (or this version) in the Room.
    #[error("event type `{event_type}` not found in room `{room}`")]
    EventTypeNotFound {
        /// The Room.
        room: String,
        /// The event type name, with `@version` when a version was asked for.
        event_type: String,
    },
    /// No event with this id.
    #[error("event `{id}` not found")]
    EventNotFound {
        /// The event id asked for.
        id: String,
    },
    /// No subscription with this id.
    #[error("subscription `{id}` not found")]
    SubscriptionNotFound {
        /// The id asked for.
        id: String,
    },
    /// The subscription's status does not allow the change asked for.
    #[error("subscription `{id}` is {status}; it cannot become {wanted}")]
    SubscriptionState {
        /// The subscription.
        id: String,
        /// Its status.
        status: String,
        /// The status asked for.
        wanted: String,
    },
    /// The ack id does not name a lease this puller holds now (it expired, was settled, or the
    /// message was redelivered under a newer ack id).
    #[error("no current lease for ack id `{ack_id}`")]
    LeaseNotHeld {
        /// The ack id.
        ack_id: String,
    },
    /// A push outcome came from a node that no longer holds the subscription's push lease
    /// (another node took it over): it is not recorded, and the new owner pushes the delivery
    /// again. Only on a store several brokers share.
    #[error("this node no longer holds the push lease of subscription `{subscription}`")]
    DispatchLeaseLost {
        /// The subscription.
        subscription: String,
    },
    /// An event type with this name already exists and the caller asked to create it, not to
    /// add a version.
    #[error("event type `{event_type}` already exists in room `{room}`")]
    EventTypeExists {
        /// The Room.
        room: String,
        /// The event type name.
        event_type: String,
    },
    /// The event is in the subscription's queue but not leased to anyone, so there is nothing to
    /// acknowledge yet (pull it first).
    #[error("event `{id}` is not leased on this subscription")]
    EventNotLeased {
        /// The event id.
        id: String,
    },
    /// A member, application, client or right with this id already exists.
    #[error("{kind} `{id}` already exists")]
    IdentityExists {
        /// `member`, `application`, `client` or `grant`.
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// No member, application, client or right with this id.
    #[error("{kind} `{id}` not found")]
    IdentityNotFound {
        /// `member`, `application`, `client` or `grant`.
        kind: &'static str,
        /// The id asked for.
        id: String,
    },
    /// The client id is unknown or the secret is wrong (deliberately not saying which).
    #[error("invalid client credentials")]
    InvalidClient,
    /// A Room with this name already exists.
    #[error("room `{room}` already exists")]
    RoomExists {
        /// The Room name.
        room: String,
    },
    /// The Room exists but is not active, so nothing can be published to it.
    #[error("room `{room}` is {status}, not active")]
    RoomNotActive {
        /// The Room name.
        room: String,
        /// Its current status.
        status: String,
    },
    /// The idempotency key was used before with a different request body.
    #[error("idempotency key `{key}` was already used with a different request")]
    IdempotencyConflict {
        /// The idempotency key.
        key: String,
    },
    /// The publisher's own event id names another event: one with another payload, key, type
    /// or Room, or another publisher's. Deliberately not saying which, so that nobody learns
    /// whose id it is.
    #[error("event id `{id}` is already used by another event; give a new event a new id")]
    EventIdConflict {
        /// The event id.
        id: String,
    },
    /// The publisher's right is limited to some ordering keys and this event's key is not one
    /// of them (see [`crate::Rights::publish_keys`]).
    #[error("the publisher's right does not cover ordering key `{key}`")]
    KeyNotAllowed {
        /// The event's ordering key.
        key: String,
    },
    /// The request is invalid; `field` names the offending input.
    #[error("invalid {field}: {message}")]
    InvalidInput {
        /// The input at fault (e.g. `room name`, `payload`, `key_pointer`).
        field: String,
        /// What is wrong and, where it helps, what is expected.
        message: String,
    },
    /// The payload is not well-formed JSON.
    #[error("payload is not valid JSON: {message}")]
    InvalidJson {
        /// The parser's message, with line and column.
        message: String,
    },
    /// The JSON Schema given for an event type is not a valid schema.
    #[error("invalid JSON Schema: {message}")]
    InvalidSchema {
        /// What the schema compiler or meta-schema check reported.
        message: String,
    },
    /// The payload does not satisfy its event type's schema. The first violations are listed
    /// (at most [`crate::Limits::schema_violations_max`]), with the count of all.
    #[error("payload violates the schema of `{event_type}` version {version}: {total} violation(s){}",
        if *total > violations.len() { format!(", the first {} listed", violations.len()) } else { String::new() })]
    SchemaViolation {
        /// The event type.
        event_type: String,
        /// The schema version that was applied.
        version: u32,
        /// The first violations found, not only the first one; fewer than `total` when the cap
        /// cut the list.
        violations: Vec<Violation>,
        /// How many violations the payload has, listed or not.
        total: usize,
    },
    /// A configured limit was exceeded.
    #[error("{limit} exceeded: {actual} > {max}")]
    LimitExceeded {
        /// The name of the limit, as in [`crate::Limits`] (e.g. `payload_bytes_max`).
        limit: &'static str,
        /// The limit's value.
        max: u64,
        /// The value that was refused.
        actual: u64,
    },
    /// The storage refused to commit (a full disk, an I/O error): nothing of the operation was
    /// stored. The broker keeps trying; retry after the hinted delay.
    #[error("storage unavailable ({cause}); nothing was stored, retry in {retry_after_ms} ms")]
    StorageUnavailable {
        /// What the storage said.
        cause: String,
        /// A suggested delay before retrying.
        retry_after_ms: u64,
    },
    /// The write queue is full; retry after the hinted delay.
    #[error("broker overloaded, retry in {retry_after_ms} ms")]
    Overloaded {
        /// A suggested delay before retrying.
        retry_after_ms: u64,
    },
    /// Every slot for client secret checks (`limits.secret_checks_max`) stayed taken for
    /// `limits.secret_check_wait_ms`; retry after the hinted delay.
    #[error("too many client authentications at once, retry in {retry_after_ms} ms")]
    AuthenticationBusy {
        /// A suggested delay before retrying.
        retry_after_ms: u64,
    },
    /// The broker is closed or closing.
    #[error("broker is shutting down")]
    ShuttingDown,
    /// The storage engine failed; the operation did not take effect.
    #[error("storage failure: {0}")]
    Storage(String),
    /// A write was refused because what it was computed from changed in between (another
    /// writer of a shared backend got there first: see `KvStore::shared`); nothing of the batch
    /// it was in was stored, and trying again is safe (503 with `Retry-After`).
    #[error("storage conflict: {detail}")]
    StorageConflict {
        /// What changed.
        detail: String,
    },
}

impl Error {
    /// The stable machine-readable code of this error. Never changes meaning once released.
    pub fn code(&self) -> &'static str {
        match self {
            Error::RoomNotFound { .. } => "room_not_found",
            Error::EventTypeNotFound { .. } => "event_type_not_found",
            Error::EventNotFound { .. } => "event_not_found",
            Error::SubscriptionNotFound { .. } => "subscription_not_found",
            Error::SubscriptionState { .. } => "subscription_state",
            Error::SubscriberRevoked { .. } => "subscriber_revoked",
            Error::LeaseNotHeld { .. } => "lease_not_held",
            Error::DispatchLeaseLost { .. } => "dispatch_lease_lost",
            Error::RoomExists { .. } => "room_exists",
            Error::IdentityExists { .. } => "identity_exists",
            Error::IdentityNotFound { .. } => "identity_not_found",
            Error::InvalidClient => "invalid_client",
            Error::EventTypeExists { .. } => "event_type_exists",
            Error::EventNotLeased { .. } => "event_not_leased",
            Error::RoomNotActive { .. } => "room_not_active",
            Error::IdempotencyConflict { .. } => "idempotency_conflict",
            Error::EventIdConflict { .. } => "event_id_conflict",
            Error::KeyNotAllowed { .. } => "key_not_allowed",
            Error::InvalidInput { .. } => "invalid_input",
            Error::InvalidJson { .. } => "invalid_json",
            Error::InvalidSchema { .. } => "invalid_schema",
            Error::SchemaViolation { .. } => "schema_violation",
            Error::LimitExceeded { .. } => "limit_exceeded",
            Error::Overloaded { .. } => "overloaded",
            Error::StorageUnavailable { .. } => "storage_unavailable",
            Error::AuthenticationBusy { .. } => "authentication_busy",
            Error::ShuttingDown => "shutting_down",
            Error::Storage(_) => "storage",
            Error::StorageConflict { .. } => "storage_conflict",
        }
    }

    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::RoomNotFound { .. }
            | Error::EventTypeNotFound { .. }
            | Error::EventNotFound { .. }
            | Error::SubscriptionNotFound { .. }
            | Error::IdentityNotFound { .. } => ErrorKind::NotFound,
            Error::InvalidClient => ErrorKind::Unauthenticated,
            Error::KeyNotAllowed { .. } => ErrorKind::Forbidden,
            Error::RoomExists { .. }
            | Error::IdentityExists { .. }
            | Error::EventTypeExists { .. }
            | Error::EventNotLeased { .. }
            | Error::RoomNotActive { .. }
            | Error::IdempotencyConflict { .. }
            | Error::EventIdConflict { .. }
            | Error::SubscriptionState { .. }
            | Error::SubscriberRevoked { .. }
            | Error::LeaseNotHeld { .. }
            | Error::DispatchLeaseLost { .. } => ErrorKind::Conflict,
            Error::InvalidInput { .. }
            | Error::InvalidJson { .. }
            | Error::InvalidSchema { .. }
            | Error::SchemaViolation { .. } => ErrorKind::InvalidInput,
            Error::LimitExceeded { .. } => ErrorKind::LimitExceeded,
            Error::Overloaded { .. } | Error::AuthenticationBusy { .. } => ErrorKind::Overloaded,
            Error::ShuttingDown
            | Error::StorageUnavailable { .. }
            | Error::StorageConflict { .. } => ErrorKind::Unavailable,
            Error::Storage(_) => ErrorKind::Internal,
        }
    }

    pub(crate) fn invalid(field: &str, message: impl Into<String>) -> Error {
        Error::InvalidInput {
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub(crate) fn limit(limit: &'static str, max: u64, actual: u64) -> Error {
        Error::LimitExceeded { limit, max, actual }
    }
}

/// The core's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct() {
        let all = [
            Error::RoomNotFound { room: "a".into() },
            Error::EventTypeNotFound {
                room: "a".into(),
                event_type: "b".into(),
            },
            Error::EventNotFound { id: "x".into() },
            Error::SubscriptionNotFound { id: "x".into() },
            Error::SubscriptionState {
                id: "x".into(),
                status: "a".into(),
                wanted: "b".into(),
            },
            Error::LeaseNotHeld {
                ack_id: "1-1".into(),
            },
            Error::DispatchLeaseLost {
                subscription: "s".into(),
            },
            Error::SubscriberRevoked {
                id: "x".into(),
                subscriber: "a/B/c/d".into(),
            },
            Error::RoomExists { room: "a".into() },
            Error::EventTypeExists {
                room: "a".into(),
                event_type: "b".into(),
            },
            Error::EventNotLeased { id: "x".into() },
            Error::IdentityExists {
                kind: "member",
                id: "x".into(),
            },
            Error::IdentityNotFound {
                kind: "member",
                id: "x".into(),
            },
            Error::InvalidClient,
            Error::RoomNotActive {
                room: "a".into(),
                status: "pending".into(),
            },
            Error::IdempotencyConflict { key: "k".into() },
            Error::EventIdConflict { id: "x".into() },
            Error::KeyNotAllowed { key: "k".into() },
            Error::invalid("f", "m"),
            Error::InvalidJson {
                message: "m".into(),
            },
            Error::InvalidSchema {
                message: "m".into(),
            },
            Error::SchemaViolation {
                event_type: "t".into(),
                version: 1,
                violations: vec![],
                total: 0,
            },
            Error::limit("payload_bytes_max", 1, 2),
            Error::Overloaded { retry_after_ms: 1 },
            Error::AuthenticationBusy { retry_after_ms: 1 },
            Error::ShuttingDown,
            Error::Storage("s".into()),
            Error::StorageUnavailable {
                cause: "disk full".into(),
                retry_after_ms: 1000,
            },
        ];
        let mut codes: Vec<_> = all.iter().map(Error::code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
    }
}
