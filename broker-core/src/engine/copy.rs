//! Moving in (issue 16, item 5): copies an embedded broker's whole store, every space, key and
//! value, into an empty PostgreSQL schema, so that a team that started on one machine moves to
//! several nodes with its Rooms, event types, events, subscriptions with their positions, dead
//! letters, identities, grants, signing keys and audit log as they were. Both stores hold the
//! same key-value layout, so the copy decides nothing: it makes the embedded store's
//! sequence rows complete first (a redb store keeps the sequences of keys published since its
//! last checkpoint only in memory and its log; a shared store reads them from their rows), then
//! copies each space in key order, in bounded batches, and reads both stores back to compare
//! row counts and a digest of every key and value.

use std::ops::Bound;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::Engine;
use crate::error::{Error, Result};
use crate::storage::kv::{Batch, KvStore, Order, Put, Snapshot, Space};

/// Entries read from the source at a time.
const PAGE: usize = 128;
/// The most value bytes one target commit carries (a page of large events is split).
const COMMIT_BYTES_MAX: usize = 8 << 20;

/// What [`copy_embedded_to_postgres`] copied: per space, its name, rows and bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReport {
    /// (space name, rows, key and value bytes), in the store's order, non-empty spaces only.
    pub spaces: Vec<(String, u64, u64)>,
}

impl CopyReport {
    /// Rows copied in all.
    pub fn rows(&self) -> u64 {
        self.spaces.iter().map(|s| s.1).sum()
    }
}

/// Copies the embedded broker's redb file at `from` into the PostgreSQL schema `to` names
/// (created or upgraded first), which must hold no Postroom data yet; then compares the two.
/// The broker must be stopped: redb refuses a second opener. If the copy fails midway the
/// target holds part of the data: empty it (drop and recreate the schema) and run it again;
/// start no node on it before the copy reports success.
pub fn copy_embedded_to_postgres(
    from: &Path,
    to: &crate::storage::PostgresConfig,
) -> Result<CopyReport> {
    if !from.exists() {
        return Err(Error::Storage(format!(
            "{}: no such file (an embedded broker's data is `postroom.redb` in its data folder)",
            from.display()
        )));
    }
    let defaults = crate::broker::delivery_defaults(&crate::config::Config::default());
    let source = Engine::open(from, 64 << 20, defaults)?;
    source.with_tables(|t| t.checkpoint_seqs())?;
    let target = crate::storage::PgKv::open(to)?;
    copy_store(&*source.kv, &target)
}

/// Copies every space of `source` into `target`, which must be empty, and compares them.
pub(crate) fn copy_store(source: &dyn KvStore, target: &dyn KvStore) -> Result<CopyReport> {
    let existing = target.snapshot()?;
    for space in Space::ALL {
        if !existing
            .range(
                space,
                Bound::Unbounded,
                Bound::Unbounded,
                Order::Ascending,
                1,
            )?
            .is_empty()
        {
            return Err(Error::Storage(format!(
                "the target already holds Postroom data (in `{}`): copy only into an empty schema",
                space.name()
            )));
        }
    }
    drop(existing);
    let snapshot = source.snapshot()?;
    let mut spaces = Vec::new();
    for space in Space::ALL {
        let (mut rows, mut bytes) = (0u64, 0u64);
        for_each_page(&*snapshot, space, |page| {
            let mut batch = Batch::default();
            let mut batch_bytes = 0usize;
            for (key, value) in page {
                let size = key.len() + value.len();
                if batch_bytes + size > COMMIT_BYTES_MAX && !batch.writes.is_empty() {
                    target.commit(std::mem::take(&mut batch))?;
                    batch_bytes = 0;
                }
                rows += 1;
                bytes += size as u64;
                batch_bytes += size;
                batch.writes.push(Put {
                    space,
                    key,
                    value: Some(value),
                });
            }
            if !batch.writes.is_empty() {
                target.commit(batch)?;
            }
            Ok(())
        })?;
        if rows > 0 {
            spaces.push((space.name().to_string(), rows, bytes));
        }
    }
    drop(snapshot);
    // Read both back: the same rows, keys and values, space by space.
    for space in Space::ALL {
        let (a, b) = (digest(source, space)?, digest(target, space)?);
        if a != b {
            return Err(Error::Storage(format!(
                "the copy of `{}` differs from the original ({} rows there, {} here)",
                space.name(),
                a.0,
                b.0
            )));
        }
    }
    Ok(CopyReport { spaces })
}

/// A space's row count and a digest of its keys and values in order.
fn digest(store: &dyn KvStore, space: Space) -> Result<(u64, [u8; 32])> {
    let snapshot = store.snapshot()?;
    let mut hash = Sha256::new();
    let mut rows = 0u64;
    for_each_page(&*snapshot, space, |page| {
        for (key, value) in &page {
            rows += 1;
            hash.update((key.len() as u64).to_be_bytes());
            hash.update(key);
            hash.update((value.len() as u64).to_be_bytes());
            hash.update(value);
        }
        Ok(())
    })?;
    Ok((rows, hash.finalize().into()))
}

/// Hands `f` every entry of `space` in key order, [`PAGE`] entries at a time.
fn for_each_page(
    snapshot: &dyn Snapshot,
    space: Space,
    mut f: impl FnMut(Vec<(Vec<u8>, Vec<u8>)>) -> Result<()>,
) -> Result<()> {
    let mut after: Option<Vec<u8>> = None;
    loop {
        let start = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        let page = snapshot.range(space, start, Bound::Unbounded, Order::Ascending, PAGE)?;
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        after = Some(last.clone());
        let full = page.len() == PAGE;
        f(page)?;
        if !full {
            return Ok(());
        }
    }
}
