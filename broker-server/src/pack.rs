//! Domain packs: a file that declares Rooms and their event types (JSON Schemas, key pointers,
//! default retry), so that a domain such as IRC capacity events or the Book a Secure Move
//! lifecycle is provisioned as data, never as code in the core.
//!
//! A pack is TOML; each event type names its schema file, relative to the pack file, so that the
//! schemas stay ordinary JSON Schema files that other tools can read:
//!
//! ```toml
//! [[rooms]]
//! name = "irc"
//! description = "IRC bed events and heartbeats"
//! ordered = true                 # default true
//! [rooms.retry]                  # the Room's retry defaults (any RetryOverrides field)
//! attempts_max = 60
//! [[rooms.event_types]]
//! name = "check_in"
//! schema = "check_in.schema.json"
//! key_pointer = "/centre"
//! description = "..."            # default: the schema's own `description`
//! ```
//!
//! Applying a pack is idempotent: a missing Room is created (active), an existing one gets the
//! pack's description, ordering and retry when they differ, and every event type is registered
//! with `put_event_type`, which adds a schema version only when the schema or pointer changed.
//! Nothing the pack does not name is touched or deleted. [`apply`] works on a [`Broker`] (used at
//! startup by `packs = [...]` in the config); `postroom pack apply` does the same over HTTP.

use std::path::{Path, PathBuf};

use broker_core::{
    Broker, EventTypeName, EventTypeSpec, NewRoom, Principal, RetryOverrides, RoomName, RoomPatch,
};
use serde::Deserialize;

/// A pack, loaded and checked: names are valid and every schema file was read and is JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct Pack {
    /// The file it came from.
    pub path: PathBuf,
    /// Its Rooms, in file order.
    pub rooms: Vec<PackRoom>,
}

/// One Room of a pack.
#[derive(Clone, Debug, PartialEq)]
pub struct PackRoom {
    /// The Room's name.
    pub name: RoomName,
    /// Free text for people.
    pub description: String,
    /// Per-key FIFO by default for its subscriptions.
    pub ordered: bool,
    /// The Room's retry defaults.
    pub retry: RetryOverrides,
    /// Its event types, in file order.
    pub event_types: Vec<EventTypeSpec>,
}

/// Why a pack cannot be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PackError {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not a valid pack or schema.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PackFile {
    rooms: Vec<RoomFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomFile {
    name: String,
    #[serde(default)]
    description: String,
    ordered: Option<bool>,
    #[serde(default)]
    retry: RetryOverrides,
    #[serde(default)]
    event_types: Vec<TypeFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TypeFile {
    name: String,
    schema: PathBuf,
    key_pointer: Option<String>,
    description: Option<String>,
}

impl Pack {
    /// Reads a pack file and the schema files it names, and checks everything that can be
    /// checked without a broker (names, duplicates, key pointers, schemas against their
    /// meta-schema), so that a bad pack is refused before a Room is created or changed. Each
    /// error names the pack file and, for an event type, the Room, the type and its schema file.
    pub fn load(path: &Path) -> Result<Pack, PackError> {
        let text = std::fs::read_to_string(path).map_err(|source| PackError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| PackError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let file: PackFile = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if file.rooms.is_empty() {
            return Err(invalid("declares no Room (`[[rooms]]`)".into()));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let mut rooms: Vec<PackRoom> = Vec::with_capacity(file.rooms.len());
        for r in file.rooms {
            let name = RoomName::new(&r.name).map_err(|e| invalid(e.to_string()))?;
            if rooms.iter().any(|seen| seen.name == name) {
                return Err(invalid(format!("Room `{name}` is declared twice")));
            }
            let mut event_types: Vec<EventTypeSpec> = Vec::with_capacity(r.event_types.len());
            for t in r.event_types {
                let ty = EventTypeName::new(&t.name)
                    .map_err(|e| invalid(format!("Room `{name}`: {e}")))?;
                if event_types.iter().any(|seen| seen.name == ty) {
                    return Err(invalid(format!(
                        "event type `{name}/{ty}` is declared twice"
                    )));
                }
                let schema_path = base.join(&t.schema);
                // Every later error is about this type and its schema file: say so.
                let place = format!(
                    "event type `{name}/{ty}` (schema {})",
                    schema_path.display()
                );
                let at = |what: String| invalid(format!("{place}: {what}"));
                let raw = std::fs::read(&schema_path)
                    .map_err(|e| at(format!("cannot read the schema: {e}")))?;
                let schema: serde_json::Value = serde_json::from_slice(&raw)
                    .map_err(|e| at(format!("the schema is not JSON: {e}")))?;
                // The schema's own description is the default, so that it is written once.
                let description = t.description.unwrap_or_else(|| {
                    schema
                        .get("description")
                        .and_then(|d| d.as_str())
                        .unwrap_or_default()
                        .to_string()
                });
                let spec = EventTypeSpec {
                    name: ty,
                    description,
                    schema,
                    key_pointer: t.key_pointer,
                };
                spec.check().map_err(|e| at(e.to_string()))?;
                event_types.push(spec);
            }
            rooms.push(PackRoom {
                name,
                description: r.description,
                ordered: r.ordered.unwrap_or(true),
                retry: r.retry,
                event_types,
            });
        }
        Ok(Pack {
            path: path.to_path_buf(),
            rooms,
        })
    }
}

/// What applying a pack did to one event type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TypeOutcome {
    /// The type did not exist.
    Created,
    /// Its schema or key pointer changed: a new version.
    NewVersion,
    /// Nothing changed.
    Unchanged,
}

impl TypeOutcome {
    /// The word printed by `postroom pack apply`.
    pub fn as_str(self) -> &'static str {
        match self {
            TypeOutcome::Created => "created",
            TypeOutcome::NewVersion => "new version",
            TypeOutcome::Unchanged => "unchanged",
        }
    }
}

/// What applying a pack did to one Room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedRoom {
    /// The Room.
    pub room: RoomName,
    /// `created`, `updated` or `unchanged`.
    pub outcome: &'static str,
    /// Each event type with what happened to it.
    pub event_types: Vec<(EventTypeName, TypeOutcome)>,
}

/// Why a pack is not applied to a Room that is a member's pending request: the requester manages
/// it, and a pack adopting it would hand that member a domain Room (and, as its manager, every
/// right on it). An administrator approves the request on purpose, or deletes it, first.
pub fn pending_room(room: &RoomName, owner: &str) -> broker_core::Error {
    broker_core::Error::InvalidInput {
        field: "pack".into(),
        message: format!(
            "Room `{room}` is a pending request by `{owner}`; an administrator approves or deletes \
             it before the pack is applied"
        ),
    }
}

/// Applies a pack directly to a broker: the startup path (`packs = [...]` in the config). New
/// Rooms are created active and owned by `owner`. A Room that is a member's pending request is
/// refused (see [`pending_room`]).
pub async fn apply(
    broker: &Broker,
    pack: &Pack,
    owner: &Principal,
) -> Result<Vec<AppliedRoom>, broker_core::Error> {
    let mut report = Vec::with_capacity(pack.rooms.len());
    for r in &pack.rooms {
        let outcome = match broker.room(&r.name) {
            Ok(existing) if existing.status == broker_core::RoomStatus::Pending => {
                return Err(pending_room(&existing.name, existing.owner.as_str()))
            }
            Ok(existing) => {
                let patch = RoomPatch {
                    description: (existing.description != r.description)
                        .then(|| r.description.clone()),
                    ordered: (existing.ordered != r.ordered).then_some(r.ordered),
                    retry: (existing.retry != r.retry).then(|| r.retry.clone()),
                    ..Default::default()
                };
                if patch == RoomPatch::default() {
                    "unchanged"
                } else {
                    broker.update_room(&r.name, patch).await?;
                    "updated"
                }
            }
            Err(broker_core::Error::RoomNotFound { .. }) => {
                let mut new = NewRoom::new(r.name.clone(), owner.clone()).approved();
                new.description = r.description.clone();
                new.ordered = r.ordered;
                new.retry = r.retry.clone();
                broker.create_room(new).await?;
                "created"
            }
            Err(e) => return Err(e),
        };
        let mut types = Vec::with_capacity(r.event_types.len());
        for spec in &r.event_types {
            let out = broker.put_event_type(&r.name, spec.clone()).await?;
            types.push((
                spec.name.clone(),
                type_outcome(out.created, out.new_version),
            ));
        }
        report.push(AppliedRoom {
            room: r.name.clone(),
            outcome,
            event_types: types,
        });
    }
    Ok(report)
}

/// The outcome from a `put_event_type` answer's two flags.
pub fn type_outcome(created: bool, new_version: bool) -> TypeOutcome {
    match (created, new_version) {
        (true, _) => TypeOutcome::Created,
        (false, true) => TypeOutcome::NewVersion,
        (false, false) => TypeOutcome::Unchanged,
    }
}
