//! The `postroom` subcommands that talk to a running server over its HTTP API (everything but
//! `serve`). They exist so that an operator can manage Rooms, event types and subscriptions,
//! publish, pull and watch events from a shell without writing HTTP requests by hand. Each
//! subcommand is one or a few API calls; the server stays the only place with behaviour.

pub mod admin;
pub mod client;
pub mod messages;
pub mod output;
pub mod pack;
pub mod signing_keys;
pub mod tail;
pub mod token;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};

use client::{Auth, CliError, Client, Credentials};
use messages::{dead_letters, publish, pull, settle};
pub use messages::{DeadLettersCommand, NackArgs, PublishArgs, PullArgs, SettleArgs};
use output::{at, cell, items, out, print_json, print_object, Table};

/// The options every client subcommand shares. They can be given before or after the
/// subcommand, and from the environment.
#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// The server's base URL (client subcommands only).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "POSTROOM_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// A token sent as `Authorization: Bearer TOKEN` (client subcommands only). It wins over
    /// `--client-id` and `--client-secret`.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "POSTROOM_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// The API client id to log in with: tokens are fetched from the server's `/oauth/token`
    /// and cached until they expire (client subcommands only).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "POSTROOM_CLIENT_ID"
    )]
    pub client_id: Option<String>,
    /// The API client's secret; prefer the environment variable, since command lines are
    /// visible to other users of the machine (client subcommands only).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "POSTROOM_CLIENT_SECRET",
        hide_env_values = true
    )]
    pub client_secret: Option<String>,
    /// The folder of the token cache (default `$XDG_CACHE_HOME/postroom` or
    /// `$HOME/.cache/postroom`).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "POSTROOM_CACHE_DIR"
    )]
    pub cache_dir: Option<PathBuf>,
    /// Print the server's JSON answers instead of tables (client subcommands only).
    #[arg(long, global = true, help_heading = "Global options")]
    pub json: bool,
}

/// The client subcommands.
#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Manage Rooms.
    #[command(subcommand)]
    Rooms(RoomsCommand),
    /// Manage a Room's event types and their JSON Schemas.
    #[command(subcommand)]
    Types(TypesCommand),
    /// Manage subscriptions.
    #[command(subcommand)]
    Subs(SubsCommand),
    /// Publish one event; the JSON payload comes from a file or standard input.
    Publish(PublishArgs),
    /// Pull messages from a pull subscription.
    Pull(PullArgs),
    /// Acknowledge pulled messages: they are done.
    Ack(SettleArgs),
    /// Give pulled messages back for redelivery (a failed attempt).
    Nack(NackArgs),
    /// Send pulled messages straight to the dead letters.
    Term(SettleArgs),
    /// Follow a Room's events live.
    Tail(TailArgs),
    /// Inspect, redrive or purge a subscription's dead letters.
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
    /// Get a token with --client-id and --client-secret, cache it, and show when it expires.
    Login(LoginArgs),
    /// Members, applications, API clients, rights and the audit log (administrators only).
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// Domain packs: Rooms and event types declared in a file.
    #[command(subcommand)]
    Pack(pack::PackCommand),
}

/// `postroom login ...`
#[derive(Args, Debug)]
pub struct LoginArgs {
    /// Print only the token, for use with other tools (`curl -H "Authorization: Bearer ..."`).
    #[arg(long)]
    pub print_token: bool,
}

impl GlobalArgs {
    /// How the client authenticates: `--token` when given, else the client credentials, else
    /// not at all. Empty values count as absent, so that `POSTROOM_TOKEN=` unsets a token.
    pub fn auth(&self) -> Result<Auth, CliError> {
        let given = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
        if let Some(t) = given(&self.token) {
            return Ok(Auth::Token(t));
        }
        match (given(&self.client_id), given(&self.client_secret)) {
            (Some(client_id), client_secret) => Ok(Auth::Credentials(Credentials {
                client_id,
                client_secret,
                cache_dir: token::cache_dir(self.cache_dir.as_deref()),
            })),
            (None, Some(_)) => Err(CliError::Usage(
                "--client-secret needs --client-id (or POSTROOM_CLIENT_ID)".to_string(),
            )),
            (None, None) => Ok(Auth::Anonymous),
        }
    }
}

/// `postroom rooms ...`
#[derive(Subcommand, Debug)]
pub enum RoomsCommand {
    /// List all Rooms.
    List,
    /// Show one Room.
    Get {
        /// The Room.
        name: String,
    },
    /// Create a Room.
    Create {
        /// The Room's name.
        name: String,
        /// Free text for people.
        #[arg(long)]
        description: Option<String>,
        /// Subscriptions get no per-key FIFO delivery unless they ask for it.
        #[arg(long)]
        unordered: bool,
    },
    /// Delete a Room with its events and subscriptions.
    Delete {
        /// The Room.
        name: String,
    },
    /// Approve a Room that a member requested.
    Approve {
        /// The Room.
        name: String,
    },
}

/// `postroom types ...`
#[derive(Subcommand, Debug)]
pub enum TypesCommand {
    /// List a Room's event types.
    List {
        /// The Room.
        room: String,
    },
    /// Show one event type with its current schema.
    Get {
        /// The Room.
        room: String,
        /// The event type.
        name: String,
    },
    /// Register an event type, or a new schema version of it.
    Put {
        /// The Room.
        room: String,
        /// The event type.
        name: String,
        /// A file holding the JSON Schema.
        #[arg(long)]
        schema: PathBuf,
        /// A JSON Pointer into the payload whose value is the event's ordering key.
        #[arg(long)]
        key_pointer: Option<String>,
        /// Free text for people.
        #[arg(long)]
        description: Option<String>,
    },
}

/// `postroom subs ...`
#[derive(Subcommand, Debug)]
pub enum SubsCommand {
    /// List a Room's subscriptions.
    List {
        /// The Room.
        room: String,
    },
    /// Show one subscription.
    Get {
        /// The subscription id.
        id: String,
    },
    /// Create a push or pull subscription.
    #[command(group(ArgGroup::new("delivery").required(true).args(["push_url", "pull"])))]
    Create {
        /// The Room.
        room: String,
        /// Push: the endpoint the broker POSTs each event to.
        #[arg(long)]
        push_url: Option<String>,
        /// Pull: the subscriber pulls and acknowledges.
        #[arg(long)]
        pull: bool,
        /// Only this event type (repeatable); all types when absent.
        #[arg(long = "type", value_name = "TYPE")]
        types: Vec<String>,
        /// No per-key FIFO delivery, whatever the Room's default.
        #[arg(long)]
        unordered: bool,
        /// Attempts before an event is dead-lettered (overrides the Room's retry policy).
        #[arg(long)]
        attempts_max: Option<u32>,
    },
    /// Delete a subscription.
    Delete {
        /// The subscription id.
        id: String,
    },
    /// Pause delivery; events keep being queued.
    Pause {
        /// The subscription id.
        id: String,
    },
    /// Resume delivery.
    Resume {
        /// The subscription id.
        id: String,
    },
}

/// `postroom tail ...`
#[derive(Args, Debug)]
pub struct TailArgs {
    /// The Room.
    pub room: String,
    /// Only this event type.
    #[arg(long = "type", value_name = "TYPE")]
    pub event_type: Option<String>,
    /// Only this ordering key.
    #[arg(long)]
    pub key: Option<String>,
    /// Start with the Room's oldest stored event instead of only new ones.
    #[arg(long)]
    pub from_start: bool,
    /// Exit after this many events (otherwise run until Ctrl-C).
    #[arg(long)]
    pub count: Option<u64>,
    /// How often to ask the server for new events.
    #[arg(long, default_value_t = 500)]
    pub interval_ms: u64,
}

/// Runs a client subcommand and returns the process exit code. Errors are printed on stderr as
/// `error: <detail> (<code>, HTTP <status>)`.
pub fn run(global: GlobalArgs, command: ClientCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let client = Client::with_auth(&global.server, global.auth()?)?;
        tokio::select! {
            r = dispatch(&client, global.json, command) => r,
            // Ctrl-C is how `tail` is meant to end, so it is a success for every subcommand.
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn dispatch(client: &Client, json: bool, command: ClientCommand) -> Result<(), CliError> {
    match command {
        ClientCommand::Rooms(c) => rooms(client, json, c).await,
        ClientCommand::Types(c) => types(client, json, c).await,
        ClientCommand::Subs(c) => subs(client, json, c).await,
        ClientCommand::Publish(a) => publish(client, json, a).await,
        ClientCommand::Pull(a) => pull(client, json, a).await,
        ClientCommand::Ack(a) => settle(client, json, "ack", &a.sub, a.ack_ids, None).await,
        ClientCommand::Nack(a) => settle(client, json, "nack", &a.sub, a.ack_ids, a.delay_ms).await,
        ClientCommand::Term(a) => settle(client, json, "term", &a.sub, a.ack_ids, None).await,
        ClientCommand::Tail(a) => {
            let opts = tail::TailOptions {
                room: a.room,
                event_type: a.event_type,
                key: a.key,
                from_start: a.from_start,
                count: a.count,
                interval: Duration::from_millis(a.interval_ms.max(1)),
                json,
            };
            tail::tail(client, &opts).await
        }
        ClientCommand::DeadLetters(c) => dead_letters(client, json, c).await,
        ClientCommand::Login(a) => login(client, json, a).await,
        ClientCommand::Admin(c) => admin::admin(client, json, c).await,
        ClientCommand::Pack(c) => pack::pack(client, json, c).await,
    }
}

async fn login(client: &Client, json: bool, a: LoginArgs) -> Result<(), CliError> {
    let (fresh, cached) = client.login().await?;
    let expires_in = fresh.expires_at.saturating_sub(token::now_secs());
    let expires_at = broker_core::Timestamp(fresh.expires_at.saturating_mul(1000)).to_rfc3339();
    if json {
        let mut v = json!({
            "server": client.base().as_str(),
            "client_id": client.client_id(),
            "expires_at": expires_at,
            "expires_in": expires_in,
            "cache_file": cached.as_ref().map(|p| p.display().to_string()),
        });
        if a.print_token {
            v["access_token"] = json!(fresh.access_token);
        }
        print_json(&v);
    } else if a.print_token {
        // Only the token on stdout, so that `$(postroom login --print-token)` is just the token.
        out!("{}", fresh.access_token);
    } else {
        out!("logged in; the token expires at {expires_at} (in {expires_in} s)");
        match cached {
            Some(p) => out!("cached in {}", p.display()),
            None => out!("not cached: set POSTROOM_CACHE_DIR, XDG_CACHE_HOME or HOME"),
        }
    }
    Ok(())
}

/// Every item of a paged listing, following `next_cursor` until the end.
pub(super) async fn all_pages(client: &Client, segments: &[&str]) -> Result<Vec<Value>, CliError> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query: Vec<(&str, String)> = cursor.iter().map(|c| ("cursor", c.clone())).collect();
        let page = client.get(segments, &query).await?;
        out.extend(items(&page).iter().cloned());
        match page.get("next_cursor").and_then(Value::as_str) {
            // A cursor that does not move would loop for ever; the listing is then done.
            Some(next) if cursor.as_deref() != Some(next) => cursor = Some(next.to_string()),
            _ => return Ok(out),
        }
    }
}

pub(super) fn read_file(path: &std::path::Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| CliError::Local(format!("cannot read {}: {e}", path.display())))
}

async fn rooms(client: &Client, json: bool, command: RoomsCommand) -> Result<(), CliError> {
    let room = match command {
        RoomsCommand::List => {
            let rooms = all_pages(client, &["v1", "rooms"]).await?;
            if json {
                print_json(&json!({ "items": rooms }));
            } else {
                let mut t = Table::new(&[
                    "NAME",
                    "STATUS",
                    "ORDERED",
                    "EVENTS",
                    "BYTES",
                    "DESCRIPTION",
                ]);
                for r in &rooms {
                    t.row(vec![
                        at(r, "/name"),
                        at(r, "/status"),
                        at(r, "/ordered"),
                        at(r, "/events_stored"),
                        at(r, "/bytes_stored"),
                        at(r, "/description"),
                    ]);
                }
                t.print();
            }
            return Ok(());
        }
        RoomsCommand::Get { name } => client.get(&["v1", "rooms", &name], &[]).await?,
        RoomsCommand::Create {
            name,
            description,
            unordered,
        } => {
            let mut body = json!({ "name": name, "ordered": !unordered });
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            client
                .call(Method::POST, &["v1", "rooms"], Some(&body))
                .await?
                .body
        }
        RoomsCommand::Delete { name } => {
            client
                .call(Method::DELETE, &["v1", "rooms", &name], None)
                .await?;
            if json {
                print_json(&json!({ "deleted": name }));
            } else {
                out!("deleted room {name}");
            }
            return Ok(());
        }
        RoomsCommand::Approve { name } => {
            client
                .call(Method::POST, &["v1", "rooms", &name, "approve"], None)
                .await?
                .body
        }
    };
    if json {
        print_json(&room);
    } else {
        print_object(&room);
    }
    Ok(())
}

async fn types(client: &Client, json: bool, command: TypesCommand) -> Result<(), CliError> {
    match command {
        TypesCommand::List { room } => {
            let answer = client
                .get(&["v1", "rooms", &room, "event-types"], &[])
                .await?;
            if json {
                print_json(&answer);
                return Ok(());
            }
            let mut t = Table::new(&["NAME", "VERSION", "KEY_POINTER", "UPDATED", "DESCRIPTION"]);
            for ty in items(&answer) {
                t.row(vec![
                    at(ty, "/name"),
                    at(ty, "/version"),
                    at(ty, "/key_pointer"),
                    at(ty, "/updated_at"),
                    at(ty, "/description"),
                ]);
            }
            t.print();
        }
        TypesCommand::Get { room, name } => {
            let ty = client
                .get(&["v1", "rooms", &room, "event-types", &name], &[])
                .await?;
            if json {
                print_json(&ty);
            } else {
                print_object(&ty);
            }
        }
        TypesCommand::Put {
            room,
            name,
            schema,
            key_pointer,
            description,
        } => {
            let text = read_file(&schema)?;
            let schema_json: Value = serde_json::from_slice(&text)
                .map_err(|e| CliError::Local(format!("{} is not JSON: {e}", schema.display())))?;
            let mut body = json!({ "schema": schema_json });
            if let Some(p) = key_pointer {
                body["key_pointer"] = json!(p);
            }
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            let answer = client
                .call(
                    Method::PUT,
                    &["v1", "rooms", &room, "event-types", &name],
                    Some(&body),
                )
                .await?
                .body;
            if json {
                print_json(&answer);
            } else {
                let version = at(&answer, "/event_type/version");
                let created = answer.get("created").and_then(Value::as_bool) == Some(true);
                let new_version = answer.get("new_version").and_then(Value::as_bool) == Some(true);
                if created {
                    out!("created event type {name} in room {room} (version {version})");
                } else if new_version {
                    out!("registered version {version} of event type {name} in room {room}");
                } else {
                    out!("event type {name} in room {room} unchanged (version {version})");
                }
            }
        }
    }
    Ok(())
}

/// Where a subscription delivers, for tables: the push URL, or `pull`.
fn endpoint(sub: &Value) -> String {
    match sub.pointer("/mode/mode").and_then(Value::as_str) {
        Some("push") => at(sub, "/mode/url"),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

fn print_subscription(sub: &Value) {
    let mut t = Table::new(&["FIELD", "VALUE"]);
    if let Some(map) = sub.as_object() {
        for (k, v) in map {
            let shown = if k == "mode" { endpoint(sub) } else { cell(v) };
            t.row(vec![k.clone(), shown]);
        }
    }
    t.print();
}

async fn subs(client: &Client, json: bool, command: SubsCommand) -> Result<(), CliError> {
    let sub = match command {
        SubsCommand::List { room } => {
            let answer = client
                .get(&["v1", "rooms", &room, "subscriptions"], &[])
                .await?;
            if json {
                print_json(&answer);
                return Ok(());
            }
            let mut t = Table::new(&[
                "ID",
                "STATUS",
                "TYPES",
                "BACKLOG",
                "DEAD_LETTERS",
                "ENDPOINT",
            ]);
            for s in items(&answer) {
                let types = match s.get("event_types") {
                    Some(Value::Array(ts)) => ts.iter().map(cell).collect::<Vec<_>>().join(","),
                    _ => "*".to_string(),
                };
                t.row(vec![
                    at(s, "/id"),
                    at(s, "/status"),
                    types,
                    at(s, "/backlog"),
                    at(s, "/dead_letters"),
                    endpoint(s),
                ]);
            }
            t.print();
            return Ok(());
        }
        SubsCommand::Get { id } => client.get(&["v1", "subscriptions", &id], &[]).await?,
        SubsCommand::Create {
            room,
            push_url,
            pull: _,
            types,
            unordered,
            attempts_max,
        } => {
            // clap's group makes exactly one of `--push-url` and `--pull` present.
            let mut body = match push_url {
                Some(url) => json!({ "mode": "push", "push": { "url": url } }),
                None => json!({ "mode": "pull" }),
            };
            if !types.is_empty() {
                body["event_types"] = json!(types);
            }
            if unordered {
                body["ordered"] = json!(false);
            }
            if let Some(n) = attempts_max {
                body["retry"] = json!({ "attempts_max": n });
            }
            let answer = client
                .call(
                    Method::POST,
                    &["v1", "rooms", &room, "subscriptions"],
                    Some(&body),
                )
                .await?
                .body;
            if json {
                print_json(&answer);
            } else {
                let sub = answer.get("subscription").unwrap_or(&Value::Null);
                out!("created subscription {}", at(sub, "/id"));
                if let Some(secret) = answer.get("secret").and_then(Value::as_str) {
                    out!("signing secret (shown only this once): {secret}");
                }
            }
            return Ok(());
        }
        SubsCommand::Delete { id } => {
            client
                .call(Method::DELETE, &["v1", "subscriptions", &id], None)
                .await?;
            if json {
                print_json(&json!({ "deleted": id }));
            } else {
                out!("deleted subscription {id}");
            }
            return Ok(());
        }
        SubsCommand::Pause { id } => {
            client
                .call(Method::POST, &["v1", "subscriptions", &id, "pause"], None)
                .await?
                .body
        }
        SubsCommand::Resume { id } => {
            client
                .call(Method::POST, &["v1", "subscriptions", &id, "resume"], None)
                .await?
                .body
        }
    };
    if json {
        print_json(&sub);
    } else {
        print_subscription(&sub);
    }
    Ok(())
}
