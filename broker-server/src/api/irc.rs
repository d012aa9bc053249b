//! IRC ingress: the two endpoints of the IRC Capacity Management ICD (release 1.2.0),
//! `POST /irc_entry/{centre}/event` and `POST /irc_entry/{centre}/heartbeat`, so that the
//! centres' existing clients can send to Postroom unchanged.
//!
//! This is a translation, not a feature of the core: each request becomes one ordinary publish
//! into the `irc` Room, whose event types (one per ICD operation, plus `heartbeat`) come from the
//! `irc` domain pack (`schemas/irc/pack.toml`). The body is stored byte for byte. What is
//! specific to the ICD lives here: the event type is taken from `operation`, the path's centre
//! must equal the body's (422), a schema violation is 400 naming the field, and a repeated event
//! (same centre, person, operation and timestamp) is acknowledged without a second event.

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use broker_core::{EventId, EventTypeName, PublishRequest, RoomName, Timestamp, Violation};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use super::{AppState, RawBody};
use crate::auth::Identity;
use crate::error::ApiError;

/// The Room the IRC endpoints publish into (the `irc` pack's Room).
pub const IRC_ROOM: &str = "irc";

/// The event type of heartbeats.
pub const HEARTBEAT_TYPE: &str = "heartbeat";

/// The ICD's operations, each with the event type that carries it.
pub const OPERATIONS: [(&str, &str); 7] = [
    ("check in", "check_in"),
    ("update individual", "update_individual"),
    ("check out", "check_out"),
    ("reinstatement", "reinstatement"),
    ("inter site transfer", "inter_site_transfer"),
    ("out commission", "out_commission"),
    ("in commission", "in_commission"),
];

/// The routes, at the root like the ICD's (outside `/v1` and the OpenAPI document, like the
/// GovStack routes: their contract is the ICD).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/irc_entry/{centre}/event", post(event))
        .route("/irc_entry/{centre}/heartbeat", post(heartbeat))
}

/// The ICD's integer fields in events.
pub const EVENT_INTEGER_FIELDS: [&str; 3] = ["person_id", "cid_id", "single_occupancy_person_id"];

/// The ICD's integer fields in heartbeats. Other properties are allowed in a heartbeat, with any
/// value, so only these count.
pub const HEARTBEAT_INTEGER_FIELDS: [&str; 6] = [
    "male_occupied",
    "female_occupied",
    "male_outofcommission",
    "female_outofcommission",
    "male_total_configured",
    "female_total_configured",
];

/// The first of `fields` whose number is written with a fraction or an exponent (`1.0`,
/// `1e3`). The ICD's draft-04 schemas refuse those ("an integer is a JSON number without a
/// fraction or exponent part"); JSON Schema 2020-12 counts any whole number as an integer and
/// has no keyword to tell `1.0` from `1`, so our schemas accept them and this rule, applied by
/// the ingress before publishing, restores the ICD's verdict exactly.
pub fn integer_written_as_float(doc: &Value, fields: &[&str]) -> Option<String> {
    fields
        .iter()
        .find(|f| doc.get(**f).is_some_and(Value::is_f64))
        .map(|f| f.to_string())
}

/// `^[a-z]{3,30}$`, the ICD's centre name.
pub fn valid_centre(s: &str) -> bool {
    (3..=30).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase())
}

/// The event type for an ICD `operation`, if it is one.
pub fn event_type_for(operation: &str) -> Option<&'static str> {
    OPERATIONS
        .iter()
        .find(|(op, _)| *op == operation)
        .map(|(_, ty)| *ty)
}

async fn event(
    State(s): State<AppState>,
    who: Identity,
    Path(centre): Path<String>,
    RawBody(body): RawBody,
) -> Response {
    ingest(&s, &who, &centre, &body, true)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn heartbeat(
    State(s): State<AppState>,
    who: Identity,
    Path(centre): Path<String>,
    RawBody(body): RawBody,
) -> Response {
    ingest(&s, &who, &centre, &body, false)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// One request to one publish. The content type is not checked: the ICD does not name one, and
/// its clients must work unchanged.
async fn ingest(
    s: &AppState,
    who: &Identity,
    centre: &str,
    body: &[u8],
    is_event: bool,
) -> Result<Response, ApiError> {
    if !valid_centre(centre) {
        return Err(ApiError::param("centre", "must match ^[a-z]{3,30}$"));
    }
    let doc: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadJson(format!("invalid request body: {e}")))?;
    let ty = if is_event {
        let op = doc.get("operation").and_then(Value::as_str).unwrap_or("");
        event_type_for(op).ok_or_else(|| ApiError::FieldInvalid {
            field: "operation".into(),
            message: format!(
                "must be one of {}",
                OPERATIONS
                    .iter()
                    .map(|(op, _)| format!("`{op}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            violations: Vec::new(),
            violations_total: 0,
        })?
    } else {
        HEARTBEAT_TYPE
    };
    // Rights before the body's details: a caller that may not publish here learns nothing
    // about what the Room would accept.
    let room = RoomName::new(IRC_ROOM)?;
    let ty = EventTypeName::new(ty)?;
    who.require(who.rights.can_publish(&room, &ty), "publish IRC events")?;
    // A centre's client posts for its own centre only: its publisher right is limited to the
    // centre's ordering key (the pack keys every type by `/centre`). Checked on the path's
    // centre before the body, and again by the core on the key it takes from the body.
    // The ingress is what centres' clients use, so a publisher right here must be bound to
    // centres: an unbound one (a system that speaks for every centre) publishes through the
    // native route. Managers and administrators may post for any centre.
    who.require(
        who.rights.manages(&room) || who.rights.publish_keys(&room, &ty).is_some(),
        "post to the IRC ingress with a publisher right not bound to centres (give it with \
         `keys`, one per centre)",
    )?;
    who.require(
        who.rights.can_publish_key(&room, &ty, centre),
        &format!("publish for centre `{centre}`"),
    )?;
    let keys_allowed = who.rights.publish_keys(&room, &ty);
    // A well-formed centre that differs from the path is the ICD's 422; a missing or malformed
    // one is left to the schema (400).
    if let Some(body_centre) = doc.get("centre").and_then(Value::as_str) {
        if valid_centre(body_centre) && body_centre != centre {
            return Err(ApiError::CentreMismatch {
                path: centre.to_string(),
                body: body_centre.to_string(),
            });
        }
    }
    let integers: &[&str] = if is_event {
        &EVENT_INTEGER_FIELDS
    } else {
        &HEARTBEAT_INTEGER_FIELDS
    };
    if let Some(field) = integer_written_as_float(&doc, integers) {
        return Err(ApiError::FieldInvalid {
            field,
            // serde_json reads an integer beyond u64 as a float too, so the message names both.
            message: "must be an integer written without a fraction or exponent, \
                      at most 18446744073709551615"
                .into(),
            violations: Vec::new(),
            violations_total: 0,
        });
    }
    let mut req = PublishRequest::new(room, ty.clone(), who.principal.clone(), body.to_vec());
    req.keys_allowed = keys_allowed;
    let id_key = s.broker.host_key(EVENT_ID_KEY).await?;
    let id = is_event
        .then(|| duplicate_id(&id_key, centre, &doc))
        .flatten();
    req.event_id = id;
    let receipt = match s.broker.publish(req).await {
        Ok(r) => Answer {
            id: r.id,
            key: r.key,
            sequence: r.sequence.0,
            duplicate: r.duplicate,
        },
        Err(e @ broker_core::Error::EventIdConflict { .. }) => {
            match id.map(|id| icd_repeat(s, who, &ty, id)).transpose()? {
                Some(Some(first)) => first,
                _ => return Err(e.into()),
            }
        }
        Err(broker_core::Error::SchemaViolation {
            violations, total, ..
        }) => {
            let (field, message) = first_field(&violations);
            return Err(ApiError::FieldInvalid {
                field,
                message,
                violations,
                violations_total: total,
            });
        }
        Err(e) => return Err(e.into()),
    };
    let mut resp = (
        StatusCode::CREATED,
        axum::Json(json!({
            "id": receipt.id,
            "event_type": ty,
            "key": receipt.key,
            "sequence": receipt.sequence,
            "duplicate": receipt.duplicate,
        })),
    )
        .into_response();
    if receipt.duplicate {
        resp.headers_mut()
            .insert("postroom-duplicate", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// What the ingress answers about an accepted event.
struct Answer {
    id: EventId,
    key: broker_core::OrderingKey,
    sequence: u64,
    duplicate: bool,
}

/// The first receipt for an ICD repeat whose body differs from the first one's (the instant
/// written another way, a field corrected): the core refuses a known id with other bytes, but
/// for the ICD the event is the one its (centre, person, operation, timestamp) names, and the
/// original consumer acknowledged such a repeat without storing it. Only the same client's
/// event of the same type counts; `None` otherwise, and the caller answers the core's conflict
/// unchanged.
fn icd_repeat(
    s: &AppState,
    who: &Identity,
    ty: &EventTypeName,
    id: EventId,
) -> Result<Option<Answer>, ApiError> {
    match s.broker.event(id) {
        Ok(e)
            if e.publisher == who.principal
                && e.room.as_str() == IRC_ROOM
                && &e.event_type == ty =>
        {
            Ok(Some(Answer {
                id: e.id,
                key: e.key,
                sequence: e.sequence.0,
                duplicate: true,
            }))
        }
        Ok(_) | Err(broker_core::Error::EventNotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The event id of an ICD event, derived from what makes two events the same one for the ICD:
/// centre, person (the bed for bed events, which name no person), operation and timestamp.
/// The timestamp counts as the instant it names, to the millisecond, as the original consumer
/// compared it (a date column, not the text): `10:00:00Z`, `10:00:00.000Z` and `11:00:00+01:00`
/// are one time. The same client posting the same event again gets the first receipt and
/// nothing is stored, for as long as the first event is retained, which outlasts the centres'
/// retry queues (unlike a 10-minute idempotency key). `None` when a part is missing: the schema
/// refuses such a payload anyway.
///
/// The id is an HMAC of that tuple under `key`, a random key the broker keeps
/// ([`EVENT_ID_KEY`]), not a plain hash: event ids are unique across the broker, and a
/// publisher in any Room who could compute the id of a centre's next event could take it first
/// (the genuine event would then be refused as a conflict) or probe with it whether a person had
/// that movement.
pub fn duplicate_id(key: &[u8], centre: &str, doc: &Value) -> Option<EventId> {
    let operation = doc.get("operation")?.as_str()?;
    let written = doc.get("timestamp")?.as_str()?;
    // A time the parser cannot place (before 1970, or not RFC 3339, which the schema then
    // refuses) is compared as written.
    let timestamp = match Timestamp::parse_rfc3339(written) {
        Some(t) => format!("ms:{}", t.as_ms()),
        None => format!("text:{written}"),
    };
    let timestamp = timestamp.as_str();
    let who = match (doc.get("person_id"), doc.get("bed_ref")) {
        (Some(p), _) => format!("person:{p}"),
        (None, Some(Value::String(b))) => format!("bed:{b}"),
        _ => return None,
    };
    let mut h = <Hmac<Sha256> as Mac>::new_from_slice(key).ok()?;
    for part in ["irc-event", centre, &who, operation, timestamp] {
        h.update(part.as_bytes());
        // A separator that cannot occur in the parts, so that no two tuples hash alike.
        h.update(&[0u8]);
    }
    let digest = h.finalize().into_bytes();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    // Version 8 ("custom"): a name-based id, never mistaken for a broker-assigned v7.
    Some(EventId(uuid::Builder::from_custom_bytes(bytes).into_uuid()))
}

/// The name of the key behind [`duplicate_id`] in the broker's key store.
pub const EVENT_ID_KEY: &str = "irc-event-id-hmac";

/// The field a schema violation is about, and its message: the instance path when the fault is
/// inside a property, else the property a `required` or `additionalProperties` message names.
fn first_field(violations: &[Violation]) -> (String, String) {
    let Some(v) = violations.first() else {
        return ("body".into(), "does not match the schema".into());
    };
    let field = if !v.instance_path.is_empty() {
        v.instance_path.trim_start_matches('/').to_string()
    } else if v.schema_path.ends_with("/required") {
        quoted(&v.message, '"').unwrap_or("body").to_string()
    } else if v.schema_path.ends_with("/additionalProperties") {
        quoted(&v.message, '\'').unwrap_or("body").to_string()
    } else if v.schema_path.ends_with("/not") {
        // `{"required":["x"]} is not allowed for ...`: a property that must be absent.
        v.message
            .split_once("[\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map_or("body", |(name, _)| name)
            .to_string()
    } else {
        "body".to_string()
    };
    (field, v.message.clone())
}

fn quoted(s: &str, q: char) -> Option<&str> {
    let start = s.find(q)? + 1;
    let len = s[start..].find(q)?;
    Some(&s[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_ids_depend_on_the_icd_tuple_only() {
        let a = json!({"operation": "check out", "timestamp": "2024-01-01T00:00:00Z", "person_id": 7, "centre": "brookhouse"});
        let b = json!({"timestamp": "2024-01-01T00:00:00Z", "person_id": 7, "operation": "check out", "extra": 1});
        assert_eq!(
            duplicate_id(b"k", "brookhouse", &a),
            duplicate_id(b"k", "brookhouse", &b)
        );
        assert_ne!(
            duplicate_id(b"k", "brookhouse", &a),
            duplicate_id(b"k", "yarlswood", &a)
        );
        // One instant written three ways is one event; another millisecond is another.
        let at = |ts: &str| {
            duplicate_id(
                b"k",
                "brookhouse",
                &json!({"operation": "check out", "timestamp": ts, "person_id": 7}),
            )
        };
        assert_eq!(at("2024-01-01T00:00:00Z"), at("2024-01-01T00:00:00.000Z"));
        assert_eq!(at("2024-01-01T00:00:00Z"), at("2024-01-01T01:00:00+01:00"));
        assert_ne!(at("2024-01-01T00:00:00Z"), at("2024-01-01T00:00:00.001Z"));
        assert_eq!(at("1969-12-31T23:59:59Z"), at("1969-12-31T23:59:59Z"));
        assert_ne!(at("1969-12-31T23:59:59Z"), at("1969-12-31T23:59:59.000Z"));
        let bed = json!({"operation": "in commission", "timestamp": "2024-01-01T00:00:00Z", "bed_ref": "A 1"});
        assert!(duplicate_id(b"k", "brookhouse", &bed).is_some());
        assert_eq!(
            duplicate_id(b"k", "brookhouse", &json!({"operation": "x"})),
            None
        );
        // Without the key, nobody can compute a centre's event id.
        assert_ne!(
            duplicate_id(b"k", "brookhouse", &bed),
            duplicate_id(b"another key", "brookhouse", &bed)
        );
    }

    #[test]
    fn centre_names() {
        for (s, ok) in [
            ("abc", true),
            ("ab", false),
            ("Abc", false),
            ("a-bc", false),
        ] {
            assert_eq!(valid_centre(s), ok, "{s}");
        }
        assert!(valid_centre(&"a".repeat(30)));
        assert!(!valid_centre(&"a".repeat(31)));
    }
}
