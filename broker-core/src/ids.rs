//! Newtype identifiers. Each one checks its syntax in its constructor, so a value of the type is
//! valid by construction and the rest of the core never re-checks a bare string.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};

fn check_name(
    field: &str,
    s: &str,
    first: fn(u8) -> bool,
    rest: fn(u8) -> bool,
    syntax: &str,
) -> Result<()> {
    let bytes = s.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 64
        && first(bytes[0])
        && bytes[1..].iter().all(|&b| rest(b));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("`{s}` does not match {syntax}"),
        ))
    }
}

/// A Room's name: `^[a-z][a-z0-9_.-]{0,63}$`. Lower case only, so that names are
/// case-insensitive in practice and safe in URLs, file names and metric labels.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RoomName(String);

impl RoomName {
    /// The documented syntax, for error messages and API documentation.
    pub const SYNTAX: &'static str = "^[a-z][a-z0-9_.-]{0,63}$";

    /// Checks `s` against [`RoomName::SYNTAX`].
    pub fn new(s: impl Into<String>) -> Result<Self> {
        let s = s.into();
        check_name(
            "room name",
            &s,
            |b| b.is_ascii_lowercase(),
            |b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'),
            Self::SYNTAX,
        )?;
        Ok(RoomName(s))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An event type's name: `^[A-Za-z][A-Za-z0-9_.-]{0,63}$`. Mixed case is allowed because the
/// justice APIs name events `MoveProposed`, `JourneyStart` and so on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EventTypeName(String);

impl EventTypeName {
    /// The documented syntax.
    pub const SYNTAX: &'static str = "^[A-Za-z][A-Za-z0-9_.-]{0,63}$";

    /// Checks `s` against [`EventTypeName::SYNTAX`].
    pub fn new(s: impl Into<String>) -> Result<Self> {
        let s = s.into();
        check_name(
            "event type name",
            &s,
            |b| b.is_ascii_alphabetic(),
            |b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'),
            Self::SYNTAX,
        )?;
        Ok(EventTypeName(s))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An ordering key: events with the same key in a Room are numbered 1, 2, 3... and delivered in
/// that order. Any non-empty UTF-8 string without control characters, up to
/// [`crate::Limits::key_bytes_max`] bytes (checked by the broker, which knows the limit).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderingKey(String);

impl OrderingKey {
    /// Checks that `s` is non-empty, at most `bytes_max` bytes and free of control characters.
    pub fn new(s: impl Into<String>, bytes_max: usize) -> Result<Self> {
        let s = s.into();
        if s.is_empty() {
            return Err(Error::invalid("ordering key", "must not be empty"));
        }
        if s.len() > bytes_max {
            return Err(Error::limit(
                "key_bytes_max",
                bytes_max as u64,
                s.len() as u64,
            ));
        }
        if s.chars().any(char::is_control) {
            return Err(Error::invalid(
                "ordering key",
                "must not contain control characters",
            ));
        }
        Ok(OrderingKey(s))
    }

    /// The key as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A position in one key's sequence, starting at 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sequence(pub u64);

/// An event's id: a UUID, version 7 when the broker assigns it (time-ordered), any version when the
/// publisher brings its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(pub Uuid);

impl EventId {
    /// A fresh time-ordered UUIDv7.
    pub fn new_v7() -> Self {
        EventId(Uuid::now_v7())
    }

    /// Parses a publisher-given id; any UUID in its usual text forms.
    pub fn parse(s: &str) -> Result<Self> {
        Uuid::parse_str(s)
            .map(EventId)
            .map_err(|e| Error::invalid("event id", format!("`{s}` is not a UUID: {e}")))
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// A subscription's id: a UUIDv7 assigned at creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SubscriptionId(pub Uuid);

impl SubscriptionId {
    /// A fresh time-ordered id.
    pub fn new_v7() -> Self {
        SubscriptionId(Uuid::now_v7())
    }

    /// Parses an id in its usual text forms.
    pub fn parse(s: &str) -> Result<Self> {
        Uuid::parse_str(s)
            .map(SubscriptionId)
            .map_err(|e| Error::invalid("subscription id", format!("`{s}` is not a UUID: {e}")))
    }
}

impl fmt::Display for SubscriptionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// Who acts: a member, application or client identity as the caller's authentication layer
/// names it (e.g. `EE/GOV/70000001/bedreporter`). The core stores and compares it, nothing more.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Principal(String);

impl Principal {
    /// The longest principal accepted, in bytes.
    pub const BYTES_MAX: usize = 256;

    /// Checks that `s` is non-empty, at most [`Principal::BYTES_MAX`] bytes and has no control
    /// characters.
    pub fn new(s: impl Into<String>) -> Result<Self> {
        let s = s.into();
        if s.is_empty() || s.len() > Self::BYTES_MAX || s.chars().any(char::is_control) {
            return Err(Error::invalid(
                "principal",
                format!(
                    "must be 1 to {} bytes without control characters",
                    Self::BYTES_MAX
                ),
            ));
        }
        Ok(Principal(s))
    }

    /// The identity as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_newtype_impls {
    ($($t:ident),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.0
            }
        }
    )*};
}
string_newtype_impls!(RoomName, EventTypeName, OrderingKey, Principal);

impl TryFrom<String> for RoomName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        RoomName::new(s)
    }
}

impl TryFrom<String> for EventTypeName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        EventTypeName::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names() {
        let check = |s: &str, ok: bool| assert_eq!(RoomName::new(s).is_ok(), ok, "{s:?}");
        check("irc", true);
        check("moves.v1", true);
        check("a", true);
        check(&format!("a{}", "b".repeat(63)), true);
        check(&format!("a{}", "b".repeat(64)), false);
        check("", false);
        check("Irc", false);
        check("1irc", false);
        check("irc room", false);
        check("irc/x", false);
    }

    #[test]
    fn event_type_names() {
        let check = |s: &str, ok: bool| assert_eq!(EventTypeName::new(s).is_ok(), ok, "{s:?}");
        check("MoveProposed", true);
        check("check_in", true);
        check("check in", false);
        check("_x", false);
    }

    #[test]
    fn ordering_keys() {
        assert!(OrderingKey::new("person-1", 8).is_ok());
        assert_eq!(OrderingKey::new("", 8).unwrap_err().code(), "invalid_input");
        assert_eq!(
            OrderingKey::new("123456789", 8).unwrap_err().code(),
            "limit_exceeded"
        );
        assert_eq!(
            OrderingKey::new("a\nb", 8).unwrap_err().code(),
            "invalid_input"
        );
    }
}
