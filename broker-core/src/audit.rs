//! The audit log of administrative changes: who changed what, when, and whether it worked.
//! Entries are appended through the writer like every other change and read in pages; the
//! retention sweep trims the oldest by age and by count ([`crate::RetentionConfig`]), so that
//! the log cannot grow without bound. Each entry is small by construction: its texts are cut to
//! a bound whatever the caller sends.

use serde::{Deserialize, Serialize};

use crate::broker::Broker;
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::identity::{from_bytes, to_bytes, LIST_MAX};
use crate::ids::Principal;
use crate::model::Page;

/// Longest action, target or error code kept in an audit entry, in bytes; longer ones are cut
/// (at a character boundary) and end with `…`.
pub const AUDIT_TEXT_BYTES_MAX: usize = 512;
/// Largest detail kept in an audit entry, as JSON text in bytes.
pub const AUDIT_DETAIL_BYTES_MAX: usize = 8192;
/// Entries looked at per step of trimming.
const TRIM_STEP: usize = 256;

/// `text` cut to at most `max` bytes, at a character boundary, marked with `…` when cut.
fn bounded(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// One administrative change, as the audit log keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Its position in the log, from 1.
    pub seq: u64,
    /// When it happened.
    pub at: Timestamp,
    /// Who did it.
    pub actor: Principal,
    /// What was done, e.g. `POST /v1/rooms`.
    pub action: String,
    /// What it was done to, e.g. `/v1/rooms/irc`.
    pub target: String,
    /// `success` or `failure`.
    pub outcome: String,
    /// For a failure, the error code.
    pub error: Option<String>,
    /// What was changed, when the action records it (e.g. a configuration patch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// What to record in the audit log (the broker adds the sequence number and time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewAuditEntry {
    /// Who did it.
    pub actor: Principal,
    /// What was done.
    pub action: String,
    /// What it was done to.
    pub target: String,
    /// `None` for success, else the error code.
    pub error: Option<String>,
    /// What was changed, when the action records it.
    pub detail: Option<serde_json::Value>,
}

/// Which audit entries to list. Every filter is optional.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only this actor.
    pub actor: Option<Principal>,
    /// Only actions starting with this.
    pub action: Option<String>,
    /// Only targets starting with this.
    pub target: Option<String>,
    /// Only `success` or `failure`.
    pub outcome: Option<String>,
    /// Only entries at or after this time.
    pub since: Option<Timestamp>,
    /// Only entries before this time.
    pub until: Option<Timestamp>,
    /// Page size (default 100, at most 1000).
    pub limit: Option<usize>,
    /// A cursor from a previous page.
    pub cursor: Option<String>,
}

impl Broker {
    /// Appends an entry to the audit log.
    /// The action and target are cut to [`AUDIT_TEXT_BYTES_MAX`] bytes and a detail larger than
    /// [`AUDIT_DETAIL_BYTES_MAX`] is replaced by a note, so that no caller can make one entry
    /// large.
    pub async fn record_audit(&self, entry: NewAuditEntry) -> Result<AuditEntry> {
        let entry = NewAuditEntry {
            action: bounded(entry.action, AUDIT_TEXT_BYTES_MAX),
            target: bounded(entry.target, AUDIT_TEXT_BYTES_MAX),
            error: entry.error.map(|e| bounded(e, AUDIT_TEXT_BYTES_MAX)),
            detail: entry.detail.map(|d| {
                if d.to_string().len() > AUDIT_DETAIL_BYTES_MAX {
                    serde_json::json!({"truncated": true})
                } else {
                    d
                }
            }),
            actor: entry.actor,
        };
        let out = self
            .record_op_quiet(move |tx, now| {
                let mut e = AuditEntry {
                    seq: 0,
                    at: now,
                    actor: entry.actor,
                    action: entry.action,
                    target: entry.target,
                    outcome: if entry.error.is_some() {
                        "failure".into()
                    } else {
                        "success".into()
                    },
                    error: entry.error,
                    detail: entry.detail,
                };
                // The sequence number is the key; storing it inside too keeps entries whole.
                let bytes = to_bytes(&e)?;
                e.seq = tx.append_audit(&bytes)?;
                to_bytes(&e)
            })
            .await?;
        from_bytes(&out)
    }

    /// A page of the audit log, oldest first.
    pub fn audit(&self, filter: AuditFilter) -> Result<Page<AuditEntry>> {
        let limit = filter.limit.unwrap_or(100).clamp(1, LIST_MAX);
        let mut after = match &filter.cursor {
            None => 0,
            Some(c) => c
                .parse::<u64>()
                .map_err(|_| Error::invalid("cursor", "not a cursor this listing returned"))?,
        };
        let scan_max = self.config().delivery.scan_records_max;
        let mut items = Vec::new();
        let mut scanned = 0;
        loop {
            let batch = self.inner().store.audit(after, 256)?;
            if batch.is_empty() {
                return Ok(Page {
                    items,
                    next_cursor: None,
                });
            }
            for (seq, bytes) in batch {
                if items.len() >= limit || scanned >= scan_max {
                    return Ok(Page {
                        items,
                        next_cursor: Some(after.to_string()),
                    });
                }
                scanned += 1;
                after = seq;
                let mut e: AuditEntry = from_bytes(&bytes)?;
                e.seq = seq;
                let keep = filter.actor.as_ref().is_none_or(|a| *a == e.actor)
                    && filter
                        .action
                        .as_deref()
                        .is_none_or(|a| e.action.starts_with(a))
                    && filter
                        .target
                        .as_deref()
                        .is_none_or(|t| e.target.starts_with(t))
                    && filter.outcome.as_deref().is_none_or(|o| e.outcome == o)
                    && filter.since.is_none_or(|s| e.at >= s)
                    && filter.until.is_none_or(|u| e.at < u);
                if keep {
                    items.push(e);
                }
            }
        }
    }

    /// Removes the oldest audit entries beyond the retention ([`crate::RetentionConfig`]'s
    /// `audit_retention_ms` and `audit_entries_max`), at most `delete_max` in one step; the
    /// newest entry is always kept, so that sequence numbers never repeat. Returns how many it
    /// removed and whether more are due.
    pub(crate) async fn trim_audit(&self, delete_max: usize) -> Result<(u64, bool)> {
        let r = &self.config().retention;
        let (age_max, count_max) = (r.audit_retention_ms, r.audit_entries_max as u64);
        let now = self.now();
        let out = self
            .record_op_quiet(move |tx, _| {
                let Some(last) = tx.audit_last()? else {
                    return to_bytes(&(0u64, false));
                };
                let mut removed = 0u64;
                let mut after = 0u64;
                'trim: loop {
                    let batch = tx.audit_after(after, TRIM_STEP)?;
                    if batch.is_empty() {
                        break;
                    }
                    for (seq, bytes) in batch {
                        if seq == last {
                            break 'trim;
                        }
                        if removed as usize >= delete_max {
                            return to_bytes(&(removed, true));
                        }
                        let count = last - seq + 1;
                        let e: AuditEntry = from_bytes(&bytes)?;
                        let old = now.as_ms().saturating_sub(e.at.as_ms()) > age_max;
                        if count <= count_max && !old {
                            break 'trim;
                        }
                        tx.delete_audit(seq)?;
                        removed += 1;
                        after = seq;
                    }
                }
                to_bytes(&(removed, false))
            })
            .await?;
        from_bytes(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_texts_are_cut_at_a_character_boundary() {
        assert_eq!(bounded("short".into(), 10), "short");
        let cut = bounded("é".repeat(100), 11);
        assert!(cut.len() <= 11, "{cut}");
        assert!(cut.ends_with('…'));
        assert!(cut.starts_with("éééé"));
    }
}
