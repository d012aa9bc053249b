//! The redb side of the administrative records (identities, rights) and the audit log: two
//! tables and the [`RecordTxn`] view over a write transaction. Kept apart from the event and
//! delivery tables because nothing on the publish or delivery path reads them.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::redb_store::{RedbStorage, Tables};
use super::{RecordKind, RecordTxn};
use crate::error::{Error, Result};
use crate::ids::RoomName;

/// (kind, id) -> the record as the core encoded it.
pub(super) const RECORDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("records");
/// Sequence number -> audit entry, append only.
pub(super) const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

/// The smallest string greater than every string starting with `prefix` that is not itself
/// such a string: the exclusive end of a prefix range.
fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.to_string();
    end.push(char::MAX);
    end
}

impl RecordTxn for Tables<'_> {
    fn get(&self, kind: RecordKind, id: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .records
            .get((kind.as_str(), id))?
            .map(|g| g.value().to_vec()))
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
            .map(|r| r.map(|(k, _)| k.value().1.to_string()).map_err(Into::into))
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
        Ok(self.audit.last()?.map(|(k, _)| k.value()))
    }

    fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        self.audit
            .range(after.saturating_add(1)..)?
            .take(limit)
            .map(|r| {
                r.map(|(k, v)| (k.value(), v.value().to_vec()))
                    .map_err(Into::into)
            })
            .collect()
    }

    fn delete_audit(&mut self, seq: u64) -> Result<()> {
        self.audit.remove(seq)?;
        Ok(())
    }

    fn append_audit(&mut self, entry: &[u8]) -> Result<u64> {
        let next = match self.audit.last()? {
            Some((k, _)) => k.value() + 1,
            None => 1,
        };
        self.audit.insert(next, entry)?;
        Ok(next)
    }
}

impl RedbStorage {
    pub(super) fn record_read(&self, kind: RecordKind, id: &str) -> Result<Option<Vec<u8>>> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(RECORDS)?;
        Ok(t.get((kind.as_str(), id))?.map(|g| g.value().to_vec()))
    }

    pub(super) fn records_read(
        &self,
        kind: RecordKind,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(RECORDS)?;
        let end = prefix_end(prefix);
        let start = match after {
            Some(a) if a >= prefix => a,
            _ => prefix,
        };
        let mut out = Vec::new();
        for item in t.range((kind.as_str(), start)..(kind.as_str(), end.as_str()))? {
            let (k, v) = item?;
            let id = k.value().1;
            if after == Some(id) {
                continue;
            }
            out.push((id.to_string(), v.value().to_vec()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    pub(super) fn audit_read(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(AUDIT)?;
        t.range(after.saturating_add(1)..)?
            .take(limit)
            .map(|r| {
                r.map(|(k, v)| (k.value(), v.value().to_vec()))
                    .map_err(Into::into)
            })
            .collect()
    }
}
