//! `postroom pack apply FILE`: provisions a domain pack (see [`crate::pack`]) on a running
//! server through its public API, like every other client subcommand: the operator needs only
//! a token with the right to create Rooms and register event types, not access to the data
//! folder, and the changes pass through the audit log. The same pack can instead be applied at
//! startup with `packs = [...]` in the config.

use std::path::PathBuf;

use clap::Subcommand;
use reqwest::Method;
use serde_json::{json, Value};

use super::client::{CliError, Client};
use super::output::{print_json, Table};
use crate::pack::{type_outcome, Pack};

/// `postroom pack ...`
#[derive(Subcommand, Debug)]
pub enum PackCommand {
    /// Create or update the Rooms and event types of a pack file (idempotent).
    Apply {
        /// The pack file (TOML); schema paths in it are relative to it.
        file: PathBuf,
    },
}

/// Runs `postroom pack ...`.
pub async fn pack(client: &Client, json: bool, command: PackCommand) -> Result<(), CliError> {
    let PackCommand::Apply { file } = command;
    let pack = Pack::load(&file).map_err(|e| CliError::Local(e.to_string()))?;
    let mut rows = Vec::new();
    for r in &pack.rooms {
        let name = r.name.as_str();
        let wanted = json!({
            "description": r.description,
            "ordered": r.ordered,
            "retry": r.retry,
        });
        let room_outcome = match client.get(&["v1", "rooms", name], &[]).await {
            Ok(existing) if existing.get("status").and_then(|v| v.as_str()) == Some("pending") => {
                let owner = existing.get("owner").and_then(|v| v.as_str());
                return Err(CliError::Local(
                    crate::pack::pending_room(&r.name, owner.unwrap_or("?")).to_string(),
                ));
            }
            Ok(existing) => {
                let same = ["description", "ordered", "retry"]
                    .iter()
                    .all(|k| same_value(existing.get(*k), wanted.get(*k)));
                if same {
                    "unchanged"
                } else {
                    client
                        .call(Method::PATCH, &["v1", "rooms", name], Some(&wanted))
                        .await?;
                    "updated"
                }
            }
            Err(CliError::Api { status: 404, .. }) => {
                let mut body = wanted.clone();
                body["name"] = json!(name);
                client
                    .call(Method::POST, &["v1", "rooms"], Some(&body))
                    .await?;
                "created"
            }
            Err(e) => return Err(e),
        };
        rows.push(json!({"room": name, "event_type": "", "outcome": room_outcome}));
        for t in &r.event_types {
            let body = json!({
                "schema": t.schema,
                "key_pointer": t.key_pointer,
                "description": t.description,
            });
            let answer = client
                .call(
                    Method::PUT,
                    &["v1", "rooms", name, "event-types", t.name.as_str()],
                    Some(&body),
                )
                .await?;
            let flag = |k: &str| answer.body.get(k).and_then(Value::as_bool).unwrap_or(false);
            let outcome = type_outcome(flag("created"), flag("new_version"));
            rows.push(
                json!({"room": name, "event_type": t.name.as_str(), "outcome": outcome.as_str()}),
            );
        }
    }
    if json {
        print_json(&Value::Array(rows));
    } else {
        let mut table = Table::new(&["ROOM", "EVENT TYPE", "OUTCOME"]);
        for r in &rows {
            let cell = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            table.row(vec![cell("room"), cell("event_type"), cell("outcome")]);
        }
        table.print();
    }
    Ok(())
}

/// Compares a Room field as the server shows it with the pack's: retry overrides the server
/// omits or writes as `null` count as unset, so that an unchanged pack reports `unchanged`.
fn same_value(have: Option<&Value>, want: Option<&Value>) -> bool {
    fn norm(v: Option<&Value>) -> Value {
        match v {
            Some(Value::Object(m)) => Value::Object(
                m.iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), norm(Some(v))))
                    .collect(),
            ),
            // Numbers compare by value, so that 2 and 2.0 (a multiplier) are the same.
            Some(Value::Number(n)) => json!(n.as_f64()),
            Some(v) => v.clone(),
            None => Value::Null,
        }
    }
    norm(have) == norm(want)
}
