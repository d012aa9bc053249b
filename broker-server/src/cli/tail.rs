//! `postroom tail`: follows a Room's events live by polling the event listing. It exists as its
//! own module because following a listing that was designed for paging needs care to print every
//! new event exactly once.
//!
//! The listing's cursor is the Room log offset of the next entry to read, and a page that reaches
//! the end of the log carries no `next_cursor`. Tail therefore keeps the last cursor it was given
//! and re-reads from it on each poll, remembering the ids it already printed since that cursor;
//! as soon as a page is full the server hands out a new cursor and the memory is cleared, so it
//! never holds more than one page of ids. To start at the end of the log, tail searches for the
//! first offset at which the listing is empty (an exponential then binary search, about
//! 2·log2(events) small requests); this relies on the cursor being the decimal log offset, which
//! is the server's own format (see broker-core's `events` listing).

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;

use super::client::{CliError, Client};
use super::output::{event_line, items, out};

/// Page size of each poll; also bounds the ids remembered between polls.
const PAGE: usize = 100;

/// What to follow and how.
#[derive(Debug, Clone)]
pub struct TailOptions {
    /// The Room.
    pub room: String,
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only this ordering key.
    pub key: Option<String>,
    /// Start at the Room's oldest event instead of the end.
    pub from_start: bool,
    /// Stop after printing this many events.
    pub count: Option<u64>,
    /// Pause between polls once the end is reached.
    pub interval: Duration,
    /// One JSON object per line instead of readable lines.
    pub json: bool,
}

/// Follows the Room until `count` events were printed; without a count it runs until the task
/// is dropped (the caller stops it on Ctrl-C).
pub async fn tail(client: &Client, opts: &TailOptions) -> Result<(), CliError> {
    if opts.count == Some(0) {
        return Ok(());
    }
    let mut cursor = if opts.from_start {
        None
    } else {
        Some(end_offset(client, &opts.room).await?.to_string())
    };
    // On stderr, so that it never mixes with the events; tests and scripts wait for it to know
    // that events published from now on will be shown.
    eprintln!(
        "tailing room {} from {} (Ctrl-C to stop)",
        opts.room,
        if opts.from_start {
            "the start"
        } else {
            "the end"
        }
    );
    let mut seen: HashSet<String> = HashSet::new();
    let mut printed = 0u64;
    loop {
        let mut query = vec![("limit", PAGE.to_string())];
        if let Some(c) = &cursor {
            query.push(("cursor", c.clone()));
        }
        if let Some(t) = &opts.event_type {
            query.push(("type", t.clone()));
        }
        if let Some(k) = &opts.key {
            query.push(("key", k.clone()));
        }
        let page = match client
            .get(&["v1", "rooms", &opts.room, "events"], &query)
            .await
        {
            Ok(page) => page,
            // A busy server asks to be asked again later; a follower that runs for hours should
            // ride that out instead of ending.
            Err(CliError::Api {
                status: 429 | 503, ..
            }) => {
                tokio::time::sleep(opts.interval).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        for item in items(&page) {
            let id = item
                .pointer("/event/id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if !seen.insert(id) {
                continue;
            }
            if opts.json {
                out!("{item}");
            } else {
                out!("{}", event_line(item));
            }
            printed += 1;
            if opts.count.is_some_and(|n| printed >= n) {
                return Ok(());
            }
        }
        match page.get("next_cursor").and_then(Value::as_str) {
            Some(next) => {
                // Everything before the new cursor has been read: the ids seen so far can go.
                cursor = Some(next.to_string());
                seen.clear();
            }
            None => tokio::time::sleep(opts.interval).await,
        }
    }
}

/// The first log offset of the Room at which nothing is stored yet: events published from now
/// on are at or after it.
async fn end_offset(client: &Client, room: &str) -> Result<u64, CliError> {
    let anything_from = |offset: u64| async move {
        let page = client
            .get(
                &["v1", "rooms", room, "events"],
                &[("limit", "1".to_string()), ("cursor", offset.to_string())],
            )
            .await?;
        Ok::<bool, CliError>(
            !items(&page).is_empty() || page.get("next_cursor").is_some_and(|c| !c.is_null()),
        )
    };
    if !anything_from(0).await? {
        return Ok(0);
    }
    // `low` always has something at or after it, `high` has nothing.
    let mut low = 0u64;
    let mut high = 1u64;
    while anything_from(high).await? {
        low = high;
        if high == u64::MAX {
            return Ok(u64::MAX);
        }
        high = high.saturating_mul(2);
    }
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if anything_from(mid).await? {
            low = mid;
        } else {
            high = mid;
        }
    }
    Ok(high)
}
