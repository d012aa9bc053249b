//! Storage layout 1 to 2, in place: data files written by the previous release open without
//! losing anything. Part of the redb backend (it names redb); nothing else of the crate sees it.
//!
//! Layout 1 (releases up to commit a231ed5) kept each kind of record in a typed redb table
//! (`meta`, `rooms`, ..., `audit`), keyed with redb's own encoding. Layout 2 keeps each key space
//! in a byte table `kv.<space>` whose keys use the order-preserving encoding of `txn.rs`. The
//! records themselves (postcard) did not change, so a migration re-encodes each key field by
//! field, turns fixed-width integer values into their big-endian bytes (the engine's `Value`
//! encodings), copies every other value as it is, and sets `layout_version` to
//! [`LAYOUT_VERSION`].
//!
//! It is one durable write transaction: copy every table, write the new layout version, delete
//! the old tables, commit. A crash before the commit leaves layout 1 exactly as it was (the next
//! open migrates again); after it, nothing of layout 1 is left. A file with tables of both
//! layouts, or layout-1 tables with a `layout_version` other than 1, is refused: guessing which
//! tables are current could hide data.

use std::path::Path;
use std::time::Instant;

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableHandle,
    WriteTransaction,
};

use super::kv::{Space, LAYOUT_VERSION};
use super::redb_kv::{err, table};
use super::txn::{key_bytes, KeyArg, ValueArg};
use crate::error::{Error, Result};

/// redb's borrowed key and value types of layout 1.
type Str = &'static str;
type Bytes = &'static [u8];

/// The layout-1 tables: name, space, (old key, old value) types as layout 1 declared them, and
/// the (key, value) types of the engine's `Def` of that space, which give the new encoding.
/// Layout 2's key and value types are frozen with it: changing one needs a layout 3 and a
/// migration like this one.
macro_rules! layout1_tables {
    ($($name:literal => $space:ident: ($k:ty, $v:ty) as ($nk:ty, $nv:ty);)*) => {
        /// Every table name of layout 1.
        const LAYOUT1_TABLES: &[&str] = &[$($name),*];

        /// Copies each layout-1 table in `present` into its space; returns the entries copied
        /// per table.
        fn copy_tables(
            txn: &WriteTransaction,
            present: &[String],
        ) -> Result<Vec<(&'static str, u64)>> {
            let mut counts = Vec::new();
            $(
                if present.iter().any(|n| n == $name) {
                    let n = copy::<$k, $v, $nk, $nv>(txn, $name, Space::$space)?;
                    counts.push(($name, n));
                }
            )*
            Ok(counts)
        }

        /// Deletes every layout-1 table.
        fn delete_tables(txn: &WriteTransaction) -> Result<()> {
            $(txn.delete_table(TableDefinition::<$k, $v>::new($name)).map_err(err)?;)*
            Ok(())
        }

        /// The entries of each layout-1 table in the file (absent tables left out).
        #[cfg(test)]
        fn layout1_counts(db: &Database) -> Vec<(&'static str, Space, u64)> {
            use redb::ReadableTableMetadata;
            let txn = db.begin_read().unwrap();
            let mut out = Vec::new();
            $(
                if let Ok(t) = txn.open_table(TableDefinition::<$k, $v>::new($name)) {
                    out.push(($name, Space::$space, t.len().unwrap()));
                }
            )*
            out
        }

        /// Whether an entry of `space` decodes with the engine's types.
        #[cfg(test)]
        fn decodes(space: Space, key: &[u8], value: &[u8]) -> bool {
            use super::txn::{key_from, Value};
            $(
                if space == Space::$space {
                    return key_from::<$nk>(key).is_ok()
                        && <$nv as Value>::from_bytes(value.to_vec()).is_ok();
                }
            )*
            false
        }
    };
}

layout1_tables! {
    "meta" => Meta: (Str, u64) as (String, u64);
    "rooms" => Rooms: (Str, Bytes) as (String, Vec<u8>);
    "room_stats" => RoomStats: (u64, (u64, u64, u64)) as (u64, (u64, u64, u64));
    "event_types" => EventTypes: ((u64, Str), Bytes) as ((u64, String), Vec<u8>);
    "schemas" => Schemas: ((u64, Str, u32), Bytes) as ((u64, String, u32), Vec<u8>);
    "events" => Events: (u128, Bytes) as (u128, Vec<u8>);
    "room_log" => RoomLog: ((u64, u64), u128) as ((u64, u64), u128);
    "key_seq" => KeySeq: ((u64, Str), u64) as ((u64, String), u64);
    "seq_checkpoint" => SeqCheckpoint: (u64, u64) as (u64, u64);
    "idempotency" => Idempotency: ((u64, Str, Str), Bytes) as ((u64, String, String), Vec<u8>);
    "idempotency_expiry" => IdemExpiry:
        ((u64, u64, Str, Str), ()) as ((u64, u64, String, String), ());
    "responses" => Responses: ((Str, Str), Bytes) as ((String, String), Vec<u8>);
    "response_expiry" => ResponseExpiry: ((u64, Str, Str), ()) as ((u64, String, String), ());
    "deleted_rooms" => DeletedRooms: (u64, ()) as (u64, ());
    "subscriptions" => Subscriptions: (u128, Bytes) as (u128, Vec<u8>);
    "room_subscriptions" => RoomSubs: ((u64, u128), ()) as ((u64, u128), ());
    "subscription_stats" => SubStats: (u128, (u64, u64)) as (u128, (u64, u64));
    "deliveries" => Deliveries: ((u128, u64), Bytes) as ((u128, u64), Vec<u8>);
    "dead_letters" => DeadLetters: ((u128, u64), Bytes) as ((u128, u64), Vec<u8>);
    "attempts" => Attempts: ((u128, u64, u32), Bytes) as ((u128, u64, u32), Vec<u8>);
    "deleted_subscriptions" => DeletedSubs: (u128, ()) as (u128, ());
    "records" => Records: ((Str, Str), Bytes) as ((String, String), Vec<u8>);
    "audit" => Audit: (u64, Bytes) as (u64, Vec<u8>);
}

/// Copies one layout-1 table into its space, re-encoding each entry; returns the entries copied.
fn copy<K, V, NK, NV>(txn: &WriteTransaction, name: &str, space: Space) -> Result<u64>
where
    K: redb::Key + 'static,
    V: redb::Value + 'static,
    for<'a> K::SelfType<'a>: KeyArg<NK>,
    for<'a> V::SelfType<'a>: ValueArg<NV>,
{
    let old = txn
        .open_table(TableDefinition::<K, V>::new(name))
        .map_err(|e| Error::Storage(format!("layout-1 table `{name}`: {e}")))?;
    let mut new = txn.open_table(table(space)).map_err(err)?;
    let mut n = 0;
    for item in old.iter().map_err(err)? {
        let (k, v) = item.map_err(err)?;
        let key = key_bytes::<NK, _>(&k.value());
        new.insert(key.as_slice(), v.value().to_bytes().as_slice())
            .map_err(err)?;
        n += 1;
    }
    Ok(n)
}

/// Migrates the file when it holds layout 1; refuses a file that holds both layouts. A file
/// with no layout-1 table is left alone.
pub(super) fn migrate_if_needed(db: &Database, path: &Path) -> Result<()> {
    let names = table_names(db)?;
    let old: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| LAYOUT1_TABLES.contains(n))
        .collect();
    if old.is_empty() {
        return Ok(());
    }
    let new: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| n.starts_with("kv."))
        .collect();
    if !new.is_empty() {
        return Err(Error::Storage(format!(
            "{} holds tables of two storage layouts (layout 1: {}; layout {LAYOUT_VERSION}: {}), \
             so which one is current cannot be told; restore the file from a backup",
            path.display(),
            old.join(", "),
            new.join(", ")
        )));
    }
    migrate(db, path, &names)
}

fn migrate(db: &Database, path: &Path, present: &[String]) -> Result<()> {
    tracing::info!(
        path = %path.display(),
        "migrating a data file from storage layout 1 to layout {LAYOUT_VERSION}, in place"
    );
    let started = Instant::now();
    let mut txn = db.begin_write().map_err(err)?;
    txn.set_durability(Durability::Immediate).map_err(err)?;
    let counts = stage(&txn, path, present)?;
    txn.commit().map_err(err)?;
    for (name, entries) in &counts {
        tracing::info!(table = name, entries, "migrated from storage layout 1");
    }
    tracing::info!(
        path = %path.display(),
        entries = counts.iter().map(|(_, n)| n).sum::<u64>(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "data file migrated to storage layout {LAYOUT_VERSION}"
    );
    Ok(())
}

/// Everything the migration writes, within `txn`, which the caller commits (or drops, which
/// leaves the file as it was).
fn stage(
    txn: &WriteTransaction,
    path: &Path,
    present: &[String],
) -> Result<Vec<(&'static str, u64)>> {
    check_version(txn, path, present)?;
    let counts = copy_tables(txn, present)?;
    {
        let mut meta = txn.open_table(table(Space::Meta)).map_err(err)?;
        meta.insert(
            key_bytes::<String, _>(&"layout_version").as_slice(),
            ValueArg::<u64>::to_bytes(&LAYOUT_VERSION).as_slice(),
        )
        .map_err(err)?;
    }
    // Every space exists from now on, as in a new file.
    for space in Space::ALL {
        txn.open_table(table(space)).map_err(err)?;
    }
    delete_tables(txn)?;
    Ok(counts)
}

/// Refuses layout-1 tables whose `meta` does not say layout 1.
fn check_version(txn: &WriteTransaction, path: &Path, present: &[String]) -> Result<()> {
    let version = if present.iter().any(|n| n == "meta") {
        let meta = txn
            .open_table(TableDefinition::<Str, u64>::new("meta"))
            .map_err(err)?;
        let v = meta.get("layout_version").map_err(err)?.map(|g| g.value());
        v
    } else {
        None
    };
    match version {
        Some(1) => Ok(()),
        Some(v) => Err(Error::Storage(format!(
            "{} has storage layout version {v}, which this build can neither read nor migrate \
             (it reads layout {LAYOUT_VERSION} and migrates layout 1)",
            path.display()
        ))),
        None => Err(Error::Storage(format!(
            "{} has tables of storage layout 1 but no layout version in `meta`: refusing to \
             migrate a file that is not what it seems",
            path.display()
        ))),
    }
}

/// The names of the tables in the file.
fn table_names(db: &Database) -> Result<Vec<String>> {
    let txn = db.begin_read().map_err(err)?;
    let names = txn
        .list_tables()
        .map_err(err)?
        .map(|t| t.name().to_string())
        .collect();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::ops::Bound;
    use std::path::PathBuf;

    use super::*;
    use crate::storage::kv::{Entry, KvStore, Order};
    use crate::storage::txn::key_from;
    use crate::storage::RedbKv;

    /// A copy of the layout-1 fixture (a data file the previous release wrote; see
    /// `tests/fixtures/layout1/README.md`) in a temporary folder.
    fn fixture() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("postroom.redb");
        std::fs::copy(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tests/fixtures/layout1/postroom.redb"
            ),
            &path,
        )
        .unwrap();
        (dir, path)
    }

    fn open_db(path: &Path) -> Database {
        Database::create(path).unwrap()
    }

    /// Every entry of every space, as the backend returns them.
    fn dump(kv: &RedbKv) -> BTreeMap<Space, Vec<Entry>> {
        let snap = kv.snapshot().unwrap();
        Space::ALL
            .into_iter()
            .map(|s| {
                let all = snap
                    .range(
                        s,
                        Bound::Unbounded,
                        Bound::Unbounded,
                        Order::Ascending,
                        usize::MAX,
                    )
                    .unwrap();
                (s, all)
            })
            .collect()
    }

    /// Every layout-1 table of the fixture has entries (so that the fixture exercises every
    /// conversion); after the migration each space holds exactly that many entries, each of
    /// which decodes with the engine's types, the layout version is the current one, the other
    /// counters are kept, and no layout-1 table is left.
    #[test]
    fn every_layout1_entry_lands_in_its_space() {
        let (_dir, path) = fixture();
        let before = {
            let db = open_db(&path);
            layout1_counts(&db)
        };
        assert_eq!(
            before.len(),
            LAYOUT1_TABLES.len(),
            "every table is in the fixture"
        );
        for (name, _, n) in &before {
            assert!(*n > 0, "the fixture has entries in `{name}`");
        }
        let kv = RedbKv::open(&path, 1 << 20).unwrap();
        let after = dump(&kv);
        for (name, space, n) in &before {
            let entries = &after[space];
            let expected = if *space == Space::Meta { 2 } else { *n };
            assert_eq!(entries.len() as u64, expected, "`{name}` in {space:?}");
            for (k, v) in entries {
                assert!(
                    decodes(*space, k, v),
                    "`{name}`: an entry that does not decode"
                );
            }
        }
        let meta: BTreeMap<String, u64> = after[&Space::Meta]
            .iter()
            .map(|(k, v)| {
                let mut b = [0u8; 8];
                b.copy_from_slice(v);
                (key_from::<String>(k).unwrap(), u64::from_be_bytes(b))
            })
            .collect();
        assert_eq!(meta["layout_version"], LAYOUT_VERSION);
        // moves, notes and the deleted scratch: the next Room gets id 4.
        assert_eq!(meta["next_room_id"], 4);
        drop(kv);
        let names = table_names(&open_db(&path)).unwrap();
        assert!(
            names.iter().all(|n| n.starts_with("kv.")),
            "layout-1 tables left: {names:?}"
        );
    }

    /// A migrated file opened again is not migrated again: the same tables, the same entries.
    #[test]
    fn a_second_open_changes_nothing() {
        let (_dir, path) = fixture();
        let first = {
            let kv = RedbKv::open(&path, 1 << 20).unwrap();
            dump(&kv)
        };
        let names = table_names(&open_db(&path)).unwrap();
        let kv = RedbKv::open(&path, 1 << 20).unwrap();
        assert_eq!(dump(&kv), first);
        drop(kv);
        assert_eq!(table_names(&open_db(&path)).unwrap(), names);
    }

    /// A file with tables of both layouts is refused, and left as it was.
    #[test]
    fn a_file_with_both_layouts_is_refused() {
        let (_dir, path) = fixture();
        {
            let db = open_db(&path);
            let txn = db.begin_write().unwrap();
            txn.open_table(table(Space::Meta)).unwrap();
            txn.commit().unwrap();
        }
        let names = table_names(&open_db(&path)).unwrap();
        let e = RedbKv::open(&path, 1 << 20).err().expect("refused");
        let text = e.to_string();
        assert!(text.contains("two storage layouts"), "{text}");
        assert!(text.contains("kv.meta") && text.contains("rooms"), "{text}");
        assert_eq!(table_names(&open_db(&path)).unwrap(), names);
    }

    /// Layout-1 tables whose `meta` names another layout version are refused, and left alone.
    #[test]
    fn an_unknown_layout_version_is_refused() {
        let (_dir, path) = fixture();
        {
            let db = open_db(&path);
            let txn = db.begin_write().unwrap();
            txn.open_table(TableDefinition::<Str, u64>::new("meta"))
                .unwrap()
                .insert("layout_version", 7)
                .unwrap();
            txn.commit().unwrap();
        }
        let e = RedbKv::open(&path, 1 << 20).err().expect("refused");
        assert!(e.to_string().contains("layout version 7"), "{e}");
        let names = table_names(&open_db(&path)).unwrap();
        assert!(names.iter().all(|n| !n.starts_with("kv.")), "{names:?}");
        assert!(names.iter().any(|n| n == "events"), "{names:?}");
    }

    /// A migration that does not reach its commit (as in a crash) leaves layout 1 exactly as it
    /// was, and the next open migrates it.
    #[test]
    fn an_interrupted_migration_leaves_layout_1() {
        let (_dir, path) = fixture();
        let db = open_db(&path);
        let names = table_names(&db).unwrap();
        let counts = layout1_counts(&db);
        let txn = db.begin_write().unwrap();
        let staged = stage(&txn, &path, &names).unwrap();
        assert_eq!(staged.len(), LAYOUT1_TABLES.len());
        txn.abort().unwrap();
        assert_eq!(table_names(&db).unwrap(), names);
        assert_eq!(layout1_counts(&db), counts);
        drop(db);
        RedbKv::open(&path, 1 << 20).expect("migrates after all");
    }
}
