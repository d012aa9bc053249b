//! `postroom admin ...`: the administrators' API (`/v1/admin`) from a shell: members,
//! applications, API clients and their secrets, rights, the audit log, and the token signing
//! keys (in `signing_keys.rs`). It exists so that an operator can set up who may do what
//! without writing HTTP requests by hand; like the other subcommands each command is one API
//! call (the audit log follows its pages), and the server decides what is allowed.
//!
//! Member and application ids contain `/`; the client percent-encodes every path segment on its
//! own, so that an id stays one segment (`UK%2FGOV%2FHO`) as the API expects.

use clap::{Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::{json, Value};

use super::client::{CliError, Client};
use super::output::{at, cell, items, out, print_json, Table};

/// `postroom admin ...`
#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Member organisations.
    #[command(subcommand)]
    Members(MembersCommand),
    /// Applications of members: the identities that hold rights.
    #[command(subcommand)]
    Apps(AppsCommand),
    /// API clients (credentials of an application) and their secrets.
    #[command(subcommand)]
    Clients(ClientsCommand),
    /// Rights (grants) of applications.
    #[command(subcommand)]
    Grants(GrantsCommand),
    /// The audit log of administrative changes, oldest first.
    Audit(AuditArgs),
    /// The token signing keys in use (never the keys themselves).
    SigningKeys,
    /// Rotate the token signing key: a new key signs from now on, and the previous one
    /// verifies the tokens it signed until they expire (auth.token_ttl_secs).
    RotateSigningKey {
        /// Stop accepting the previous keys at once (for a key that was stolen): every token
        /// issued before is refused, and every client must get a new one.
        #[arg(long)]
        drop_previous: bool,
    },
}

/// `postroom admin members ...`
#[derive(Subcommand, Debug)]
pub enum MembersCommand {
    /// List the members.
    List,
    /// Register a member.
    Create {
        /// The member's id, `INSTANCE/CLASS/CODE` (e.g. `UK/GOV/HO`).
        id: String,
        /// A name for people.
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove a member that has no applications.
    Delete {
        /// The member's id.
        id: String,
    },
}

/// `postroom admin apps ...`
#[derive(Subcommand, Debug)]
pub enum AppsCommand {
    /// List applications.
    List {
        /// Only this member's.
        #[arg(long)]
        member: Option<String>,
    },
    /// Register an application of a member; its id becomes `MEMBER/CODE`.
    Create {
        /// The member, `INSTANCE/CLASS/CODE`.
        member: String,
        /// The application's code.
        code: String,
        /// A name for people.
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove an application with its clients and rights.
    Delete {
        /// The application, `INSTANCE/CLASS/CODE/APPLICATION`.
        app_id: String,
    },
}

/// `postroom admin clients ...`
#[derive(Subcommand, Debug)]
pub enum ClientsCommand {
    /// List API clients (never their secrets).
    List {
        /// Only this application's.
        #[arg(long)]
        application: Option<String>,
    },
    /// Create an API client; its secret is printed once.
    Create {
        /// The application it acts for, `INSTANCE/CLASS/CODE/APPLICATION`.
        app_id: String,
        /// Its id (generated when absent). Not `--client-id`: that global option names the
        /// client the command itself logs in with.
        #[arg(long = "id", value_name = "CLIENT_ID")]
        new_client_id: Option<String>,
        /// Its secret, at least 16 bytes (generated when absent, which is better).
        #[arg(long)]
        secret: Option<String>,
    },
    /// Remove an API client: its tokens stop working at once.
    Delete {
        /// The client id.
        id: String,
    },
    /// Add a second secret to a client, for rotation; it is printed once.
    AddSecret {
        /// The client id.
        id: String,
        /// The new secret, at least 16 bytes (generated when absent).
        #[arg(long)]
        secret: Option<String>,
    },
    /// Revoke one secret of a client (not its last).
    RevokeSecret {
        /// The client id.
        id: String,
        /// The secret's number, as `clients list` shows it.
        secret_no: u32,
    },
}

/// A role an application can be given.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoleArg {
    /// Everything, everywhere.
    #[value(name = "admin")]
    Admin,
    /// Manages one Room: its event types and subscriptions.
    #[value(name = "room_manager", alias = "room-manager")]
    RoomManager,
    /// Publishes to one Room.
    #[value(name = "publisher")]
    Publisher,
    /// Subscribes to one Room.
    #[value(name = "subscriber")]
    Subscriber,
}

impl RoleArg {
    /// The role's name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            RoleArg::Admin => "admin",
            RoleArg::RoomManager => "room_manager",
            RoleArg::Publisher => "publisher",
            RoleArg::Subscriber => "subscriber",
        }
    }
}

/// `postroom admin grants ...`
#[derive(Subcommand, Debug)]
pub enum GrantsCommand {
    /// List rights.
    List {
        /// Only this application's.
        #[arg(long)]
        application: Option<String>,
    },
    /// Give a right (giving one that exists replaces it).
    Add {
        /// The application, `INSTANCE/CLASS/CODE/APPLICATION`.
        principal: String,
        /// The role.
        role: RoleArg,
        /// The Room (every role but admin).
        #[arg(long)]
        room: Option<String>,
        /// Publisher and subscriber only: just this event type (repeatable; all when absent).
        #[arg(long = "type", value_name = "TYPE")]
        types: Vec<String>,
        /// Publisher only: just events with this ordering key (repeatable; any key when
        /// absent). On the `irc` Room the key is the centre: `--key brookhouse` binds the
        /// application to Brook House.
        #[arg(long = "key", value_name = "KEY")]
        keys: Vec<String>,
    },
    /// Take a right away.
    Revoke {
        /// The application.
        principal: String,
        /// The role.
        role: RoleArg,
        /// The Room (every role but admin).
        #[arg(long)]
        room: Option<String>,
    },
}

/// Whether an audited action succeeded.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutcomeArg {
    /// It was done.
    Success,
    /// It was refused or failed.
    Failure,
}

/// `postroom admin audit ...`
#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    /// Only this actor (an application id).
    #[arg(long)]
    pub actor: Option<String>,
    /// Only actions starting with this (e.g. `DELETE` or `POST /v1/rooms`).
    #[arg(long)]
    pub action: Option<String>,
    /// Only successes or only failures.
    #[arg(long, value_enum)]
    pub outcome: Option<OutcomeArg>,
    /// At most this many entries (all when absent).
    #[arg(long)]
    pub limit: Option<usize>,
}

/// A time field (milliseconds since the epoch in the API's identity objects) as RFC 3339.
fn time(v: &Value, pointer: &str) -> String {
    match v.pointer(pointer) {
        Some(Value::Number(n)) => match n.as_u64() {
            Some(ms) => broker_core::Timestamp(ms).to_rfc3339(),
            None => n.to_string(),
        },
        Some(other) => cell(other),
        None => String::new(),
    }
}

/// Prints a `deleted ...` line, or with `--json` an object naming what was deleted (the API
/// answers 204 with no body).
fn deleted(json: bool, what: &str, id: &str) {
    if json {
        print_json(&json!({ "deleted": id }));
    } else {
        out!("deleted {what} {id}");
    }
}

/// Prints a client secret that the server shows only once, labelled so that nobody mistakes it
/// for something that can be looked up again.
fn print_secret(answer: &Value) {
    if let Some(secret) = answer.get("client_secret").and_then(Value::as_str) {
        out!("client secret (shown only this once; store it now): {secret}");
    }
}

/// Runs `postroom admin ...`.
pub async fn admin(client: &Client, json: bool, command: AdminCommand) -> Result<(), CliError> {
    match command {
        AdminCommand::Members(c) => members(client, json, c).await,
        AdminCommand::Apps(c) => apps(client, json, c).await,
        AdminCommand::Clients(c) => clients(client, json, c).await,
        AdminCommand::Grants(c) => grants(client, json, c).await,
        AdminCommand::Audit(a) => audit(client, json, a).await,
        AdminCommand::SigningKeys => super::signing_keys::list(client, json).await,
        AdminCommand::RotateSigningKey { drop_previous } => {
            super::signing_keys::rotate(client, json, drop_previous).await
        }
    }
}

async fn members(client: &Client, json: bool, command: MembersCommand) -> Result<(), CliError> {
    match command {
        MembersCommand::List => {
            let answer = client.get(&["v1", "admin", "members"], &[]).await?;
            if json {
                print_json(&answer);
                return Ok(());
            }
            let mut t = Table::new(&["ID", "CREATED", "NAME"]);
            for m in items(&answer) {
                t.row(vec![at(m, "/id"), time(m, "/created_at"), at(m, "/name")]);
            }
            t.print();
        }
        MembersCommand::Create { id, name } => {
            let body = json!({ "id": id, "name": name.unwrap_or_default() });
            let answer = client
                .call(Method::POST, &["v1", "admin", "members"], Some(&body))
                .await?
                .body;
            if json {
                print_json(&answer);
            } else {
                out!("created member {}", at(&answer, "/id"));
            }
        }
        MembersCommand::Delete { id } => {
            client
                .call(Method::DELETE, &["v1", "admin", "members", &id], None)
                .await?;
            deleted(json, "member", &id);
        }
    }
    Ok(())
}

async fn apps(client: &Client, json: bool, command: AppsCommand) -> Result<(), CliError> {
    match command {
        AppsCommand::List { member } => {
            let query: Vec<(&str, String)> = member.into_iter().map(|m| ("member", m)).collect();
            let answer = client.get(&["v1", "admin", "applications"], &query).await?;
            if json {
                print_json(&answer);
                return Ok(());
            }
            let mut t = Table::new(&["ID", "MEMBER", "CREATED", "NAME"]);
            for a in items(&answer) {
                t.row(vec![
                    at(a, "/id"),
                    at(a, "/member"),
                    time(a, "/created_at"),
                    at(a, "/name"),
                ]);
            }
            t.print();
        }
        AppsCommand::Create { member, code, name } => {
            let body = json!({ "member": member, "code": code, "name": name.unwrap_or_default() });
            let answer = client
                .call(Method::POST, &["v1", "admin", "applications"], Some(&body))
                .await?
                .body;
            if json {
                print_json(&answer);
            } else {
                out!("created application {}", at(&answer, "/id"));
            }
        }
        AppsCommand::Delete { app_id } => {
            client
                .call(
                    Method::DELETE,
                    &["v1", "admin", "applications", &app_id],
                    None,
                )
                .await?;
            deleted(json, "application", &app_id);
        }
    }
    Ok(())
}

async fn clients(client: &Client, json: bool, command: ClientsCommand) -> Result<(), CliError> {
    match command {
        ClientsCommand::List { application } => {
            let query: Vec<(&str, String)> = application
                .into_iter()
                .map(|a| ("application", a))
                .collect();
            let answer = client.get(&["v1", "admin", "clients"], &query).await?;
            if json {
                print_json(&answer);
                return Ok(());
            }
            let mut t = Table::new(&["CLIENT_ID", "APPLICATION", "SECRETS", "CREATED"]);
            for c in items(&answer) {
                let secrets = c
                    .get("secrets")
                    .and_then(Value::as_array)
                    .map(|ss| {
                        ss.iter()
                            .map(|s| at(s, "/id"))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default();
                t.row(vec![
                    at(c, "/client_id"),
                    at(c, "/application"),
                    secrets,
                    time(c, "/created_at"),
                ]);
            }
            t.print();
        }
        ClientsCommand::Create {
            app_id,
            new_client_id,
            secret,
        } => {
            let mut body = json!({ "application": app_id });
            if let Some(id) = new_client_id {
                body["client_id"] = json!(id);
            }
            if let Some(s) = secret {
                body["client_secret"] = json!(s);
            }
            let answer = client
                .call(Method::POST, &["v1", "admin", "clients"], Some(&body))
                .await?
                .body;
            if json {
                print_json(&answer);
            } else {
                out!(
                    "created client {} for application {}",
                    at(&answer, "/client/client_id"),
                    at(&answer, "/client/application")
                );
                print_secret(&answer);
            }
        }
        ClientsCommand::Delete { id } => {
            client
                .call(Method::DELETE, &["v1", "admin", "clients", &id], None)
                .await?;
            deleted(json, "client", &id);
        }
        ClientsCommand::AddSecret { id, secret } => {
            let body = match secret {
                Some(s) => json!({ "client_secret": s }),
                None => json!({}),
            };
            let answer = client
                .call(
                    Method::POST,
                    &["v1", "admin", "clients", &id, "secrets"],
                    Some(&body),
                )
                .await?
                .body;
            if json {
                print_json(&answer);
            } else {
                out!("added secret {} to client {id}", at(&answer, "/secret/id"));
                print_secret(&answer);
            }
        }
        ClientsCommand::RevokeSecret { id, secret_no } => {
            let n = secret_no.to_string();
            let answer = client
                .call(
                    Method::DELETE,
                    &["v1", "admin", "clients", &id, "secrets", &n],
                    None,
                )
                .await?
                .body;
            if json {
                print_json(&answer);
            } else {
                out!("revoked secret {n} of client {id}");
            }
        }
    }
    Ok(())
}

/// Where a grant applies, for messages: `on room R` or `everywhere`.
fn scope(room: Option<&str>) -> String {
    match room {
        Some(r) => format!("on room {r}"),
        None => "everywhere".to_string(),
    }
}

async fn grants(client: &Client, json: bool, command: GrantsCommand) -> Result<(), CliError> {
    match command {
        GrantsCommand::List { application } => {
            let query: Vec<(&str, String)> = application
                .into_iter()
                .map(|a| ("application", a))
                .collect();
            let answer = client.get(&["v1", "admin", "grants"], &query).await?;
            if json {
                print_json(&answer);
                return Ok(());
            }
            let mut t = Table::new(&["PRINCIPAL", "ROLE", "ROOM", "TYPES", "KEYS", "CREATED"]);
            let list = |g: &Value, name: &str| match g.get(name) {
                Some(Value::Array(vs)) => vs.iter().map(cell).collect::<Vec<_>>().join(","),
                _ => "*".to_string(),
            };
            for g in items(&answer) {
                t.row(vec![
                    at(g, "/principal"),
                    at(g, "/role"),
                    at(g, "/room"),
                    list(g, "event_types"),
                    list(g, "keys"),
                    time(g, "/created_at"),
                ]);
            }
            t.print();
        }
        GrantsCommand::Add {
            principal,
            role,
            room,
            types,
            keys,
        } => {
            let mut body = json!({ "principal": principal, "role": role.as_str() });
            if let Some(r) = &room {
                body["room"] = json!(r);
            }
            if !types.is_empty() {
                body["event_types"] = json!(types);
            }
            if !keys.is_empty() {
                body["keys"] = json!(keys);
            }
            let answer = client
                .call(Method::POST, &["v1", "admin", "grants"], Some(&body))
                .await?
                .body;
            if json {
                print_json(&answer);
            } else {
                out!(
                    "granted {} {} to {principal}",
                    role.as_str(),
                    scope(room.as_deref())
                );
            }
        }
        GrantsCommand::Revoke {
            principal,
            role,
            room,
        } => {
            let mut body = json!({ "principal": principal, "role": role.as_str() });
            if let Some(r) = &room {
                body["room"] = json!(r);
            }
            client
                .call(
                    Method::POST,
                    &["v1", "admin", "grants", "revoke"],
                    Some(&body),
                )
                .await?;
            if json {
                print_json(&json!({ "revoked": body }));
            } else {
                out!(
                    "revoked {} {} from {principal}",
                    role.as_str(),
                    scope(room.as_deref())
                );
            }
        }
    }
    Ok(())
}

async fn audit(client: &Client, json: bool, a: AuditArgs) -> Result<(), CliError> {
    let mut filters: Vec<(&str, String)> = Vec::new();
    if let Some(x) = a.actor {
        filters.push(("actor", x));
    }
    if let Some(x) = a.action {
        filters.push(("action", x));
    }
    if let Some(o) = a.outcome {
        let o = match o {
            OutcomeArg::Success => "success",
            OutcomeArg::Failure => "failure",
        };
        filters.push(("outcome", o.to_string()));
    }
    // The server may end a page early (it bounds how much of the log one request scans), so the
    // pages are followed until the limit or the end.
    let mut entries: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut query = filters.clone();
        if let Some(limit) = a.limit {
            query.push(("limit", limit.saturating_sub(entries.len()).to_string()));
        }
        if let Some(c) = &cursor {
            query.push(("cursor", c.clone()));
        }
        let page = client.get(&["v1", "admin", "audit"], &query).await?;
        entries.extend(items(&page).iter().cloned());
        if a.limit.is_some_and(|l| entries.len() >= l) {
            break;
        }
        match page.get("next_cursor").and_then(Value::as_str) {
            // A cursor that does not move would loop for ever; the log is then done.
            Some(next) if cursor.as_deref() != Some(next) => cursor = Some(next.to_string()),
            _ => break,
        }
    }
    if let Some(limit) = a.limit {
        entries.truncate(limit);
    }
    if json {
        print_json(&json!({ "items": entries }));
        return Ok(());
    }
    let mut t = Table::new(&["SEQ", "AT", "ACTOR", "OUTCOME", "ACTION", "TARGET", "ERROR"]);
    for e in &entries {
        t.row(vec![
            at(e, "/seq"),
            time(e, "/at"),
            at(e, "/actor"),
            at(e, "/outcome"),
            at(e, "/action"),
            at(e, "/target"),
            at(e, "/error"),
        ]);
    }
    t.print();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_paths_keep_each_id_in_one_segment() {
        let c = Client::new("http://h:1", None).expect("client");
        assert_eq!(
            c.url(&["v1", "admin", "applications", "UK/GOV/HO/pub"], &[])
                .as_str(),
            "http://h:1/v1/admin/applications/UK%2FGOV%2FHO%2Fpub"
        );
    }

    #[test]
    fn times_are_shown_as_rfc3339() {
        let v = json!({"created_at": 0, "name": "x"});
        assert_eq!(time(&v, "/created_at"), "1970-01-01T00:00:00.000Z");
        assert_eq!(time(&v, "/name"), "x");
        assert_eq!(time(&v, "/missing"), "");
    }
}
