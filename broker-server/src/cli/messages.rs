//! The `postroom` subcommands that move messages: publish, pull, ack, nack, term and the dead
//! letters (list, redrive, purge). Split from `mod.rs`, which keeps the command line's shape
//! and the management commands.

use std::io::Read as _;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::Method;
use serde_json::{json, Value};

use super::client::{CliError, Client};
use super::output::{at, out, print_json, Table};
use super::{all_pages, read_file};

/// `postroom publish ...`
#[derive(Args, Debug)]
pub struct PublishArgs {
    /// The Room.
    pub room: String,
    /// The event type.
    pub event_type: String,
    /// The file holding the JSON payload; `-` or absent for standard input.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// The ordering key; when the event type has a key pointer, it must agree with the payload.
    #[arg(long)]
    pub key: Option<String>,
    /// Publishing again with the same key and payload returns the first receipt.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// The event's id (a UUID) chosen by the publisher.
    #[arg(long)]
    pub event_id: Option<String>,
}

/// `postroom pull ...`
#[derive(Args, Debug)]
pub struct PullArgs {
    /// The subscription id.
    pub sub: String,
    /// At most this many messages.
    #[arg(long, default_value_t = 10)]
    pub max: usize,
    /// How long the messages are leased to this caller (the server's default when absent).
    #[arg(long)]
    pub lease_ms: Option<u64>,
    /// Wait up to this long for a message when none is ready.
    #[arg(long, default_value_t = 0)]
    pub wait_ms: u64,
    /// Acknowledge the printed messages.
    #[arg(long)]
    pub ack: bool,
}

/// `postroom ack|term SUB ACK_ID...`
#[derive(Args, Debug)]
pub struct SettleArgs {
    /// The subscription id.
    pub sub: String,
    /// The ack ids from a pull.
    #[arg(required = true)]
    pub ack_ids: Vec<String>,
}

/// `postroom nack SUB ACK_ID...`
#[derive(Args, Debug)]
pub struct NackArgs {
    /// The subscription id.
    pub sub: String,
    /// The ack ids from a pull.
    #[arg(required = true)]
    pub ack_ids: Vec<String>,
    /// Redeliver no sooner than this (the retry policy's delay when absent).
    #[arg(long)]
    pub delay_ms: Option<u64>,
}

/// `postroom dead-letters ...`
#[derive(Subcommand, Debug)]
pub enum DeadLettersCommand {
    /// List a subscription's dead letters.
    List {
        /// The subscription id.
        sub: String,
    },
    /// Queue dead letters for delivery again: all, or the given events.
    Redrive {
        /// The subscription id.
        sub: String,
        /// Only this event (repeatable).
        #[arg(long = "event", value_name = "EVENT_ID")]
        events: Vec<String>,
    },
    /// Delete all of a subscription's dead letters.
    Purge {
        /// The subscription id.
        sub: String,
    },
}

pub(super) fn header(
    headers: &mut HeaderMap,
    name: &'static str,
    value: Option<String>,
) -> Result<(), CliError> {
    if let Some(v) = value {
        let v = HeaderValue::from_str(&v)
            .map_err(|_| CliError::Usage(format!("{name} must be visible ASCII characters")))?;
        headers.insert(HeaderName::from_static(name), v);
    }
    Ok(())
}

pub(super) async fn publish(client: &Client, json: bool, a: PublishArgs) -> Result<(), CliError> {
    let payload = match a.file.as_deref() {
        Some(path) if path != std::path::Path::new("-") => read_file(path)?,
        _ => {
            // Without a file the payload is read to the end of standard input; at a terminal
            // that looks like a hang, so say what is expected.
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprintln!("reading the JSON payload from standard input; end it with Ctrl-D");
            }
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| CliError::Local(format!("cannot read standard input: {e}")))?;
            buf
        }
    };
    let mut headers = HeaderMap::new();
    header(&mut headers, "postroom-ordering-key", a.key)?;
    header(&mut headers, "idempotency-key", a.idempotency_key)?;
    header(&mut headers, "postroom-event-id", a.event_id)?;
    let answer = client
        .post_raw(
            &["v1", "rooms", &a.room, "events", &a.event_type],
            headers,
            payload,
        )
        .await?;
    if json {
        print_json(&answer.body);
    } else {
        let r = &answer.body;
        out!(
            "published {} to {}/{} (key {}, sequence {}){}",
            at(r, "/id"),
            at(r, "/room"),
            at(r, "/event_type"),
            at(r, "/key"),
            at(r, "/sequence"),
            if answer.duplicate {
                ", a duplicate of an earlier publish"
            } else {
                ""
            }
        );
    }
    Ok(())
}

pub(super) async fn pull(client: &Client, json: bool, a: PullArgs) -> Result<(), CliError> {
    let mut body = json!({ "max_messages": a.max, "wait_ms": a.wait_ms });
    if let Some(l) = a.lease_ms {
        body["lease_ms"] = json!(l);
    }
    let answer = client
        .call(
            Method::POST,
            &["v1", "subscriptions", &a.sub, "pull"],
            Some(&body),
        )
        .await?
        .body;
    let messages = answer
        .get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if json {
        print_json(&answer);
    } else if messages.is_empty() {
        out!("no messages");
    } else {
        let mut t = Table::new(&[
            "ACK_ID", "ATTEMPT", "TYPE", "KEY", "SEQ", "EVENT_ID", "PAYLOAD",
        ]);
        for m in messages {
            t.row(vec![
                at(m, "/ack_id"),
                at(m, "/attempt"),
                at(m, "/event/event_type"),
                at(m, "/event/key"),
                at(m, "/event/sequence"),
                at(m, "/event/id"),
                m.get("payload").map(Value::to_string).unwrap_or_default(),
            ]);
        }
        t.print();
    }
    if a.ack && !messages.is_empty() {
        let ids: Vec<String> = messages.iter().map(|m| at(m, "/ack_id")).collect();
        let answer = client
            .call(
                Method::POST,
                &["v1", "subscriptions", &a.sub, "ack"],
                Some(&json!({ "ack_ids": ids })),
            )
            .await?
            .body;
        let failed = failures(&answer);
        if !json && failed == 0 {
            out!("acknowledged {}", ids.len());
        }
        check_results(failed, ids.len(), "ack")?;
    }
    Ok(())
}

/// Prints each failed result of an ack/nack/term answer on stderr and returns how many failed.
pub(super) fn failures(answer: &Value) -> usize {
    let mut failed = 0;
    for r in answer
        .get("results")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        if r.get("ok").and_then(Value::as_bool) != Some(true) {
            failed += 1;
            eprintln!(
                "{}: {} ({})",
                at(r, "/ack_id"),
                at(r, "/detail"),
                at(r, "/code")
            );
        }
    }
    failed
}

pub(super) fn check_results(failed: usize, total: usize, action: &str) -> Result<(), CliError> {
    if failed == 0 {
        Ok(())
    } else {
        Err(CliError::Local(format!(
            "{action} failed for {failed} of {total} ack ids"
        )))
    }
}

pub(super) async fn settle(
    client: &Client,
    json: bool,
    action: &str,
    sub: &str,
    ack_ids: Vec<String>,
    delay_ms: Option<u64>,
) -> Result<(), CliError> {
    let mut body = json!({ "ack_ids": ack_ids });
    if let Some(d) = delay_ms {
        body["delay_ms"] = json!(d);
    }
    let answer = client
        .call(
            Method::POST,
            &["v1", "subscriptions", sub, action],
            Some(&body),
        )
        .await?
        .body;
    if json {
        print_json(&answer);
    }
    let failed = failures(&answer);
    if !json {
        let done = ack_ids.len().saturating_sub(failed);
        let verb = match action {
            "ack" => "acknowledged",
            "nack" => "nacked",
            _ => "dead-lettered",
        };
        out!("{verb} {done} of {}", ack_ids.len());
    }
    check_results(failed, ack_ids.len(), action)
}

pub(super) async fn dead_letters(
    client: &Client,
    json: bool,
    command: DeadLettersCommand,
) -> Result<(), CliError> {
    match command {
        DeadLettersCommand::List { sub } => {
            let letters = all_pages(client, &["v1", "subscriptions", &sub, "dead-letters"]).await?;
            if json {
                print_json(&json!({ "items": letters }));
                return Ok(());
            }
            let mut t = Table::new(&[
                "EVENT_ID",
                "KEY",
                "SEQ",
                "ATTEMPTS",
                "REASON",
                "DEAD_AT",
                "LAST_ERROR",
            ]);
            for d in &letters {
                t.row(vec![
                    at(d, "/event_id"),
                    at(d, "/key"),
                    at(d, "/sequence"),
                    at(d, "/attempts"),
                    at(d, "/reason"),
                    at(d, "/dead_at"),
                    at(d, "/last_error"),
                ]);
            }
            t.print();
        }
        DeadLettersCommand::Redrive { sub, events } => {
            let body = if events.is_empty() {
                json!({})
            } else {
                json!({ "event_ids": events })
            };
            let answer = client
                .call(
                    Method::POST,
                    &["v1", "subscriptions", &sub, "dead-letters", "redrive"],
                    Some(&body),
                )
                .await?
                .body;
            if json {
                print_json(&answer);
            } else {
                out!("redriven {}", at(&answer, "/redriven"));
            }
        }
        DeadLettersCommand::Purge { sub } => {
            let answer = client
                .call(
                    Method::DELETE,
                    &["v1", "subscriptions", &sub, "dead-letters"],
                    None,
                )
                .await?
                .body;
            if json {
                print_json(&answer);
            } else {
                out!("purged {}", at(&answer, "/purged"));
            }
        }
    }
    Ok(())
}
