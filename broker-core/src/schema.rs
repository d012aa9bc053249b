//! JSON Schema handling: checking a schema when it is registered, compiling it once, and
//! validating payloads against the compiled form with every violation reported. Also the
//! extraction of the ordering key from a payload, which is defined by the event type.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use jsonschema::Validator;
use serde_json::Value;

use crate::error::{Error, Result, Violation};
use crate::ids::OrderingKey;

/// Checks `schema` against its draft's meta-schema and compiles it. Remote `$ref`s are refused
/// (the crate is built without network or file retrieval), so a schema can never make the broker
/// fetch anything.
pub(crate) fn compile(schema: &Value, validate_formats: bool) -> Result<Validator> {
    if !schema.is_object() && !schema.is_boolean() {
        return Err(Error::InvalidSchema {
            message: "a JSON Schema must be an object or a boolean".into(),
        });
    }
    if let Err(e) = jsonschema::meta::validate(schema) {
        return Err(Error::InvalidSchema {
            message: format!("{e} (at schema path `{}`)", e.instance_path()),
        });
    }
    jsonschema::options()
        .should_validate_formats(validate_formats)
        .build(schema)
        .map_err(|e| Error::InvalidSchema {
            message: e.to_string(),
        })
}

/// What a payload's schema check found: the first violations, in the validator's order, and
/// how many there are in all.
#[derive(Debug)]
pub(crate) struct Found {
    /// At most the cap asked for.
    pub listed: Vec<Violation>,
    /// Every violation found, listed or not.
    pub total: usize,
}

/// The violations of `payload` against `validator`: at most `max` of them listed, each text (the
/// two paths and the message) cut to `text_bytes_max` bytes, with the count of all.
///
/// Why both bounds: a 1 MB array of 500,000 wrong items has 500,000 violations, and a single
/// violation's message quotes the offending value, which can be the whole payload; listing
/// everything made a 48 MB answer. Only the first `max` are turned into strings. The validator
/// (jsonschema 0.61, the latest release) finds every error before its iterator yields the
/// first and has no error budget, so its own transient list (about 340 bytes per violation,
/// some 170 MB for that array) is not bounded by `max`; since it exists anyway, counting the
/// rest costs nothing more. Callers check `is_valid` first (allocation-free) and list only
/// for a payload that fails, a few at a time off the async workers (see `Broker::prepare`).
pub(crate) fn violations(
    validator: &Validator,
    payload: &Value,
    max: usize,
    text_bytes_max: usize,
) -> Found {
    let mut listed = Vec::new();
    let mut total = 0;
    for e in validator.iter_errors(payload) {
        total += 1;
        if listed.len() < max {
            listed.push(Violation {
                instance_path: cut(e.instance_path().as_str().to_string(), text_bytes_max),
                schema_path: cut(e.schema_path().as_str().to_string(), text_bytes_max),
                message: cut(e.to_string(), text_bytes_max),
            });
        }
    }
    Found { listed, total }
}

/// `text` cut to at most `max` bytes on a character boundary, ending in `…` when cut.
fn cut(mut text: String, max: usize) -> String {
    const ELLIPSIS: &str = "\u{2026}";
    if text.len() <= max {
        return text;
    }
    let mut end = max.saturating_sub(ELLIPSIS.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(ELLIPSIS);
    text
}

/// Checks the syntax of a JSON Pointer (RFC 6901): empty, or `/`-separated tokens where `~` is
/// only followed by `0` or `1`.
pub(crate) fn check_pointer(p: &str) -> Result<()> {
    if p.is_empty() {
        return Err(Error::invalid(
            "key_pointer",
            "must point inside the payload, e.g. `/person_id`",
        ));
    }
    if !p.starts_with('/') {
        return Err(Error::invalid(
            "key_pointer",
            format!("`{p}` is not a JSON Pointer: it must start with `/`"),
        ));
    }
    let bytes = p.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'~' && !matches!(bytes.get(i + 1), Some(b'0') | Some(b'1')) {
            return Err(Error::invalid(
                "key_pointer",
                format!("`{p}`: `~` must be followed by 0 or 1"),
            ));
        }
    }
    Ok(())
}

/// The ordering key for a payload. The publisher's explicit key and the type's pointer are both
/// honoured; when both are present they must agree, because a disagreement means one of them is
/// a bug and ordering would silently follow the wrong one. Without either, the key is the event
/// type's name, so a type's events keep their publish order.
pub(crate) fn ordering_key(
    payload: &Value,
    pointer: Option<&str>,
    explicit: Option<&str>,
    default: &str,
    bytes_max: usize,
) -> Result<OrderingKey> {
    let from_payload = match pointer {
        None => None,
        Some(p) => match payload.pointer(p) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => Some(v.to_string()),
            Some(_) => {
                return Err(Error::invalid(
                    "ordering key",
                    format!("the value at `{p}` must be a string, number or boolean"),
                ))
            }
        },
    };
    let key = match (from_payload, explicit) {
        (Some(a), Some(b)) if a != b => {
            return Err(Error::invalid(
                "ordering key",
                format!(
                    "the given key `{b}` differs from the payload's `{a}` at `{}`",
                    pointer.unwrap_or("")
                ),
            ))
        }
        (Some(a), _) => a,
        (None, Some(b)) => b.to_string(),
        (None, None) => match pointer {
            Some(p) => {
                return Err(Error::invalid(
                    "ordering key",
                    format!("the payload has no value at `{p}` and no key was given"),
                ))
            }
            None => default.to_string(),
        },
    };
    OrderingKey::new(key, bytes_max)
}

/// Compiled validators by (Room incarnation, event type, version). Versions never change once
/// written, so an entry never goes stale; the cache is cleared when it reaches its bound.
#[derive(Default)]
pub(crate) struct ValidatorCache {
    map: RwLock<HashMap<(u64, String, u32), Arc<Validator>>>,
}

impl ValidatorCache {
    /// Most compiled schemas kept at once.
    const ENTRIES_MAX: usize = 10_000;

    pub(crate) fn get(
        &self,
        room_id: u64,
        event_type: &str,
        version: u32,
    ) -> Option<Arc<Validator>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.get(&(room_id, event_type.to_string(), version))
            .cloned()
    }

    pub(crate) fn insert(&self, room_id: u64, event_type: &str, version: u32, v: Arc<Validator>) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if map.len() >= Self::ENTRIES_MAX {
            map.clear();
        }
        map.insert((room_id, event_type.to_string(), version), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_violation_is_reported_with_paths() {
        let schema = json!({
            "type": "object",
            "required": ["a", "b"],
            "properties": {"a": {"type": "integer"}, "c": {"type": "string", "maxLength": 2}}
        });
        let v = compile(&schema, true).unwrap();
        let found = violations(&v, &json!({"a": "x", "c": "long"}), 100, 512).listed;
        let paths: Vec<_> = found
            .iter()
            .map(|v| (v.instance_path.as_str(), v.schema_path.as_str()))
            .collect();
        assert!(paths.contains(&("/a", "/properties/a/type")), "{paths:?}");
        assert!(
            paths.contains(&("/c", "/properties/c/maxLength")),
            "{paths:?}"
        );
        assert!(paths.contains(&("", "/required")), "{paths:?}");
        assert_eq!(found.len(), 3);
    }

    #[test]
    fn violations_are_capped_and_their_texts_cut() {
        let v = compile(&json!({"type": "array", "items": {"type": "string"}}), true).unwrap();
        let found = violations(&v, &json!(vec![0; 1000]), 10, 512);
        assert_eq!((found.listed.len(), found.total), (10, 1000));
        assert_eq!(found.listed[9].instance_path, "/9");
        // A message quoting a long value is cut on a character boundary.
        let v = compile(&json!({"type": "integer"}), true).unwrap();
        let found = violations(&v, &json!("é".repeat(1000)), 10, 64);
        let message = &found.listed[0].message;
        assert!(
            message.len() <= 64 && message.ends_with('\u{2026}'),
            "{message}"
        );
        assert_eq!(cut("short".into(), 64), "short");
    }

    #[test]
    fn invalid_schemas_are_refused() {
        for bad in [
            json!({"type": "banana"}),
            json!({"minLength": -1}),
            json!(42),
            json!({"$ref": "https://example.com/x.json"}),
        ] {
            let err = compile(&bad, true).unwrap_err();
            assert_eq!(err.code(), "invalid_schema", "{bad}");
        }
    }

    #[test]
    fn every_supported_draft_compiles() {
        for draft in [
            "http://json-schema.org/draft-04/schema#",
            "http://json-schema.org/draft-06/schema#",
            "http://json-schema.org/draft-07/schema#",
            "https://json-schema.org/draft/2019-09/schema",
            "https://json-schema.org/draft/2020-12/schema",
        ] {
            let v = compile(
                &json!({"$schema": draft, "type": "object", "required": ["x"]}),
                true,
            )
            .unwrap();
            assert_eq!(violations(&v, &json!({}), 100, 512).total, 1, "{draft}");
        }
    }

    #[test]
    fn formats_are_asserted() {
        let v = compile(&json!({"type": "string", "format": "date-time"}), true).unwrap();
        assert_eq!(
            violations(&v, &json!("2026-11-22T10:00:00Z"), 100, 512).total,
            0
        );
        assert_eq!(violations(&v, &json!("yesterday"), 100, 512).total, 1);
    }

    #[test]
    fn ordering_keys_from_pointer_explicit_or_default() {
        let p = json!({"person_id": 42, "name": "x", "obj": {}});
        let check =
            |ptr: Option<&str>, explicit: Option<&str>, want: std::result::Result<&str, &str>| {
                let got = ordering_key(&p, ptr, explicit, "dflt", 64);
                match (got, want) {
                    (Ok(k), Ok(w)) => assert_eq!(k.as_str(), w),
                    (Err(e), Err(code)) => assert_eq!(e.code(), code),
                    (got, want) => panic!("{ptr:?} {explicit:?}: got {got:?}, want {want:?}"),
                }
            };
        check(Some("/person_id"), None, Ok("42"));
        check(Some("/name"), None, Ok("x"));
        check(Some("/person_id"), Some("42"), Ok("42"));
        check(Some("/person_id"), Some("43"), Err("invalid_input"));
        check(Some("/missing"), Some("k"), Ok("k"));
        check(Some("/missing"), None, Err("invalid_input"));
        check(Some("/obj"), None, Err("invalid_input"));
        check(None, Some("k"), Ok("k"));
        check(None, None, Ok("dflt"));
    }

    #[test]
    fn pointer_syntax() {
        assert!(check_pointer("/a/b~1c").is_ok());
        assert!(check_pointer("a").is_err());
        assert!(check_pointer("").is_err());
        assert!(check_pointer("/a~2").is_err());
    }
}
