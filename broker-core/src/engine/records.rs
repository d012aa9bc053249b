//! The engine's side of the administrative records (identities, rights) and the audit log: two
//! tables and the [`RecordTxn`] view over a write transaction. Kept apart from the event and
//! delivery tables because nothing on the publish or delivery path reads them.

use super::{Engine, Tables};
use crate::error::{Error, Result};
use crate::ids::RoomName;
use crate::storage::kv::Space;
use crate::storage::txn::Def;
use crate::storage::{RecordKind, RecordTxn};

/// (kind, id) -> the record as the core encoded it.
pub(super) const RECORDS: Def<(String, String), Vec<u8>> = Def::new(Space::Records);
/// Sequence number -> audit entry, append only.
pub(super) const AUDIT: Def<u64, Vec<u8>> = Def::new(Space::Audit);

/// The smallest string greater than every string starting with `prefix` that is not itself
/// such a string: the exclusive end of a prefix range.
fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.to_string();
    end.push(char::MAX);
    end
}

impl RecordTxn for Tables<'_> {
    fn get(&self, kind: RecordKind, id: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.records.get((kind.as_str(), id))?.map(|g| g.to_vec()))
    }

    fn put(&mut self, kind: RecordKind, id: &str, value: &[u8]) -> Result<()> {
        self.records.insert((kind.as_str(), id), value)?;
        Ok(())
    }

    fn delete(&mut self, kind: RecordKind, id: &str) -> Result<bool> {
        Ok(self.records.remove((kind.as_str(), id))?.is_some())
    }

    fn ids(&self, kind: RecordKind, prefix: &str, limit: usize) -> Result<Vec<String>> {
        let end = prefix_end(prefix);
        self.records
            .range((kind.as_str(), prefix)..(kind.as_str(), end.as_str()))?
            .take(limit)
            .map(|r| r.map(|(k, _)| k.1.to_string()))
            .collect()
    }

    fn room_id(&self, room: &RoomName) -> Result<Option<u64>> {
        match self.room_record(room) {
            Ok(r) => Ok(Some(r.id)),
            Err(Error::RoomNotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn audit_last(&self) -> Result<Option<u64>> {
        Ok(self.audit.last()?.map(|(k, _)| k))
    }

    fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        self.audit
            .range(after.saturating_add(1)..)?
            .take(limit)
            .map(|r| r.map(|(k, v)| (k, v.to_vec())))
            .collect()
    }

    fn delete_audit(&mut self, seq: u64) -> Result<()> {
        self.audit.remove(seq)?;
        Ok(())
    }

    fn append_audit(&mut self, entry: &[u8]) -> Result<u64> {
        let next = match self.audit.last()? {
            Some((k, _)) => k + 1,
            None => 1,
        };
        self.audit.insert(next, entry)?;
        Ok(next)
    }
}

impl Engine {
    pub(super) fn record_read(&self, kind: RecordKind, id: &str) -> Result<Option<Vec<u8>>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(RECORDS)?;
        Ok(t.get((kind.as_str(), id))?.map(|g| g.to_vec()))
    }

    pub(super) fn records_read(
        &self,
        kind: RecordKind,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(RECORDS)?;
        let end = prefix_end(prefix);
        let start = match after {
            Some(a) if a >= prefix => a,
            _ => prefix,
        };
        let mut out = Vec::new();
        for item in t.range((kind.as_str(), start)..(kind.as_str(), end.as_str()))? {
            let (k, v) = item?;
            let id = k.1;
            if after == Some(id.as_str()) {
                continue;
            }
            out.push((id.to_string(), v.to_vec()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    pub(super) fn audit_read(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(AUDIT)?;
        t.range(after.saturating_add(1)..)?
            .take(limit)
            .map(|r| r.map(|(k, v)| (k, v.to_vec())))
            .collect()
    }
}
