//! Shared helpers for Postroom's integration tests, so that each test file states only what it
//! checks: a broker on a temporary file or in memory, a Room with an event type, a payload maker.
#![forbid(unsafe_code)]

pub mod pull;
pub mod push;
pub mod receiver;

use std::sync::Arc;

use broker_core::{
    Broker, Config, EventTypeName, EventTypeSpec, ManualClock, NewRoom, Principal, PublishRequest,
    RoomName, Timestamp,
};
use serde_json::{json, Value};

/// A fixed start time for manual clocks: 2026-01-01T00:00:00Z.
pub const T0: Timestamp = Timestamp(1_767_225_600_000);

/// A config for tests: retention runs only when a test asks for it.
pub fn test_config() -> Config {
    let mut c = Config::default();
    c.retention.interval_ms = 0;
    // The test receivers listen on loopback, which the push target guard refuses by default.
    c.delivery.push_allow.loopback = true;
    c
}

/// A broker in memory on a manual clock.
pub async fn memory_broker(config: Config) -> (Broker, ManualClock) {
    let clock = ManualClock::new(T0);
    let broker = Broker::open_in_memory(config, Arc::new(clock.clone()))
        .await
        .expect("open in-memory broker");
    (broker, clock)
}

/// A broker in memory on the system clock: for tests whose retries must fall due by themselves.
pub async fn system_broker(config: Config) -> Broker {
    Broker::open_in_memory(config, Arc::new(broker_core::SystemClock))
        .await
        .expect("open in-memory broker")
}

/// Shorthand constructors that panic on a bad literal: tests only pass valid literals.
pub fn room(s: &str) -> RoomName {
    RoomName::new(s).expect("valid room literal")
}

/// An event type name literal.
pub fn ty(s: &str) -> EventTypeName {
    EventTypeName::new(s).expect("valid type literal")
}

/// A principal literal.
pub fn who(s: &str) -> Principal {
    Principal::new(s).expect("valid principal literal")
}

/// The schema most tests use: an object with a string `person` (the ordering key) and an integer
/// `n`, plus optional padding.
pub fn person_schema() -> Value {
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["person", "n"],
        "properties": {
            "person": {"type": "string"},
            "n": {"type": "integer", "minimum": 0},
            "pad": {"type": "string"}
        },
        "additionalProperties": false
    })
}

/// Creates an active Room `name` with event type `moved` keyed by `/person`.
pub async fn setup_room(broker: &Broker, name: &str) {
    broker
        .create_room(NewRoom::new(room(name), who("admin")).approved())
        .await
        .expect("create room");
    broker
        .put_event_type(
            &room(name),
            EventTypeSpec {
                name: ty("moved"),
                description: "a person moved".into(),
                schema: person_schema(),
                key_pointer: Some("/person".into()),
            },
        )
        .await
        .expect("register type");
}

/// A publish of `{"person": person, "n": n}` to `moved` in `room_name`.
pub fn moved(room_name: &str, person: &str, n: u64) -> PublishRequest {
    PublishRequest::new(
        room(room_name),
        ty("moved"),
        who("publisher"),
        serde_json::to_vec(&json!({"person": person, "n": n})).expect("serialize"),
    )
}

/// A payload of about `bytes` bytes for `person`.
pub fn padded(room_name: &str, person: &str, n: u64, bytes: usize) -> PublishRequest {
    let pad = "x".repeat(bytes.saturating_sub(40));
    PublishRequest::new(
        room(room_name),
        ty("moved"),
        who("publisher"),
        serde_json::to_vec(&json!({"person": person, "n": n, "pad": pad})).expect("serialize"),
    )
}
