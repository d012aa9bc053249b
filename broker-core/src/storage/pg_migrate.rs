//! The PostgreSQL backend's schema: numbered steps, applied at open under an advisory lock so
//! that nodes starting together migrate once, and listed without applying them for
//! `postroom migrate --check`.

use deadpool_postgres::Object;

use super::pg_config::{pg_config, tls, PostgresConfig};
use crate::error::{Error, Result};

/// The table's schema, as numbered steps: each is applied once, in order, in its own
/// transaction, and recorded in `postroom_migrations`. A step is never edited once released;
/// a change is a new step.
pub(super) const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "the key-value table",
        "CREATE TABLE postroom_kv (
             space smallint NOT NULL,
             key bytea NOT NULL,
             value bytea NOT NULL,
             PRIMARY KEY (space, key)
         )",
    ),
    (
        2,
        "the row that syncs write",
        // A transaction that writes nothing commits without flushing the WAL; `sync` bumps
        // this row so that its synchronous commit flushes, volatile commits before included.
        "CREATE TABLE postroom_sync (id smallint PRIMARY KEY, n bigint NOT NULL)",
    ),
];

/// The advisory lock that serializes migrations among nodes starting together (an arbitrary
/// constant: "postroom" in ASCII, folded into 63 bits).
const MIGRATION_LOCK: i64 = 0x706f_7374_726f_6f6d;

/// A migration step this build would apply: its number and what it does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingMigration {
    /// The step's number.
    pub version: i32,
    /// What it does.
    pub name: &'static str,
}

/// Applies the migration steps the database lacks, each in its own transaction, while holding
/// the advisory lock; refuses a database whose schema is newer than this build's.
pub(super) async fn migrate(conn: &mut Object) -> Result<()> {
    // Waiting for another node's migration is not a slow statement.
    conn.batch_execute("SET statement_timeout = 0").await?;
    conn.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = migrate_locked(conn).await;
    let unlocked = conn
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    let reset = conn.batch_execute("RESET statement_timeout").await;
    result?;
    unlocked?;
    reset?;
    Ok(())
}

async fn migrate_locked(conn: &mut Object) -> Result<()> {
    conn.batch_execute(
        "CREATE TABLE IF NOT EXISTS postroom_migrations (
             version integer PRIMARY KEY,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let applied = applied_versions(conn).await?;
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if let Some(newer) = applied.iter().find(|v| **v > known) {
        return Err(Error::Storage(format!(
            "postgres: the database's schema is at step {newer}, newer than this build knows \
             (up to {known}): run a newer Postroom"
        )));
    }
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        let tx = conn.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO postroom_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, name, "postgres schema migrated");
    }
    Ok(())
}

async fn applied_versions(conn: &Object) -> Result<Vec<i32>> {
    let exists: bool = conn
        .query_one("SELECT to_regclass('postroom_migrations') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    Ok(conn
        .query(
            "SELECT version FROM postroom_migrations ORDER BY version",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// The migration steps that opening the database described by `config` would apply, without
/// applying any (`postroom migrate --check`).
pub fn pending_migrations(config: &PostgresConfig) -> Result<Vec<PendingMigration>> {
    let pg = pg_config(config)?;
    let tls = tls(config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Storage(format!("postgres: cannot start its runtime: {e}")))?;
    let work = async move {
        let (client, connection) = pg.connect(tls).await?;
        tokio::spawn(connection);
        let exists: bool = client
            .query_one("SELECT to_regclass('postroom_migrations') IS NOT NULL", &[])
            .await?
            .get(0);
        let applied: Vec<i32> = if exists {
            client
                .query("SELECT version FROM postroom_migrations", &[])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect()
        } else {
            Vec::new()
        };
        let known = MIGRATIONS.last().map_or(0, |m| m.0);
        if let Some(newer) = applied.iter().find(|v| **v > known) {
            return Err(Error::Storage(format!(
                "postgres: the database's schema is at step {newer}, newer than this build \
                 knows (up to {known}): run a newer Postroom"
            )));
        }
        Ok(MIGRATIONS
            .iter()
            .filter(|m| !applied.contains(&m.0))
            .map(|m| PendingMigration {
                version: m.0,
                name: m.1,
            })
            .collect())
    };
    // On a thread of its own, so that it may be called from within another runtime.
    std::thread::spawn(move || runtime.block_on(work))
        .join()
        .map_err(|_| Error::Storage("postgres: the migration check panicked".into()))?
}
