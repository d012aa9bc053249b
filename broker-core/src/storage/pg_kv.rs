//! The PostgreSQL backend (issue 16): the key-value seam of `kv.rs` over one table, so that
//! several Postroom processes can keep their Rooms in one database that the team already runs
//! and trusts. It decides nothing: every rule stays in the engine, which sees a store that says
//! it is shared (`KvStore::shared`) and fences each batch.
//!
//! - One table, `postroom_kv (space smallint, key bytea, value bytea)`, primary key
//!   `(space, key)`: bytea compares as unsigned bytes, the order the seam promises.
//! - A snapshot is a `REPEATABLE READ, READ ONLY` transaction on a pooled connection, started
//!   with a first statement so that its view is fixed when the snapshot is taken; dropping it
//!   rolls back and returns the connection.
//! - A commit is one `SERIALIZABLE` transaction on the writer's own connection: the batch's
//!   conditions are read and compared, then the writes go in as one upsert and one delete.
//!   A condition that does not hold, a serialization failure or a unique violation (another
//!   node committed first) is `Error::StorageConflict`; nothing is written.
//! - A volatile batch commits with `synchronous_commit = off`, a durable one with the database's
//!   default (or `on`, when that default is `off`); `sync` bumps a row of `postroom_sync` in a
//!   synchronous commit, which flushes the WAL up to it, volatile commits included.
//! - The connections and their I/O run on a small runtime of the backend's own, so that the
//!   synchronous seam can wait on them from any thread (the writer's, a blocking task, or a
//!   tokio worker under `block_in_place`) without nesting runtimes.
//! - TLS to the database is rustls, trusting `ca_file` or the system's roots, whenever the
//!   URL's `sslmode` asks for it; the certificate is always verified.
//! - Each commit that changed a delivery queue sends its notice (`remote_wake.rs`) with
//!   `pg_notify` in its own transaction, and `pg_listen.rs` hears the other nodes' notices.
//! - The schema is created and upgraded by [`migrate`] at open, under an advisory lock, so that
//!   several nodes starting together migrate once; `postroom migrate --check` lists what
//!   [`pending_migrations`] would apply.

use std::future::Future;
use std::ops::Bound;
use std::sync::Arc;

use deadpool_postgres::{Object, Pool};
use tokio_postgres::error::SqlState;

use super::kv::{Batch, Entry, KvStore, Order, Snapshot, Space};
pub use super::pg_config::PostgresConfig;
use super::pg_config::{pg_config, pool, tls, warn_if_plaintext};
use super::pg_migrate::migrate;
pub use super::pg_migrate::{pending_migrations, PendingMigration};
use crate::error::{Error, Result};

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        let conflict = e.code().is_some_and(|c| {
            *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::UNIQUE_VIOLATION
        });
        if conflict {
            return Error::StorageConflict {
                detail: format!("postgres: another writer committed first ({e})"),
            };
        }
        // The server's own message (a `DbError`) says more than the wrapper's `Display`, and
        // a connection error's cause (refused, a certificate not trusted) is in its source.
        match e.as_db_error() {
            Some(db) => {
                let text = format!("postgres: {}: {}", db.code().code(), db.message());
                // Connection exceptions (08), too many connections or no space (53), the
                // server shutting down or restarting (57P): the database is unavailable, not
                // the request wrong.
                let code = db.code().code();
                if code.starts_with("08") || code.starts_with("53") || code.starts_with("57P") {
                    unavailable(text)
                } else {
                    Error::Storage(text)
                }
            }
            None => {
                let mut text = format!("postgres: {e}");
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    text.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                // No answer from the server: it could not be reached, or the connection broke.
                unavailable(text)
            }
        }
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> Error {
    match e {
        deadpool_postgres::PoolError::Backend(e) => e.into(),
        other => unavailable(format!("postgres: no connection: {other}")),
    }
}

/// How long a caller refused because the database cannot be reached is asked to wait.
const UNAVAILABLE_RETRY_AFTER_MS: u64 = 1_000;

/// The database cannot be reached or is not answering: 503 with `Retry-After`, never 500.
fn unavailable(cause: String) -> Error {
    Error::StorageUnavailable {
        cause,
        retry_after_ms: UNAVAILABLE_RETRY_AFTER_MS,
    }
}

/// The parts the backend's tasks share.
struct Shared {
    /// `SET LOCAL synchronous_commit` of a durable commit: `on` when the database's default is
    /// `off` (a durable commit must wait for the WAL flush), else the default (which may ask
    /// more, `remote_apply` with a synchronous replica).
    durable_commit: &'static str,
    /// Connections for snapshots.
    reads: Pool,
    /// The one connection commits and syncs use, so that a commit never waits for readers to
    /// give a connection back (the writer's snapshot still comes from `reads`).
    write: Pool,
    /// The channel of this installation's notices (`remote_wake::channel`).
    channel: String,
}

/// The PostgreSQL backend.
pub(crate) struct PgKv {
    shared: Arc<Shared>,
    /// Runs the connections' I/O; taken out and shut down in the background when the backend is
    /// dropped (a runtime may not be dropped where blocking is not allowed).
    runtime: Option<tokio::runtime::Runtime>,
    /// The other nodes' notices, until the broker takes them.
    notices: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<String>>>,
}

impl PgKv {
    /// Connects, creates or upgrades the schema (under the migration lock), and checks that the
    /// database holds no schema newer than this build knows.
    pub(crate) fn open(config: &PostgresConfig) -> Result<PgKv> {
        let pg = pg_config(config)?;
        let tls = tls(config)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("postroom-pg")
            .enable_all()
            .build()
            .map_err(|e| Error::Storage(format!("postgres: cannot start its runtime: {e}")))?;
        let (reads, write) = {
            let _entered = runtime.enter();
            (
                pool(&pg, &tls, config.pool_size.max(1), config)?,
                pool(&pg, &tls, 1, config)?,
            )
        };
        warn_if_plaintext(&pg);
        let probe = {
            let write = write.clone();
            run_on(runtime.handle(), async move {
                let mut conn = write.get().await.map_err(pool_error)?;
                migrate(&mut conn).await?;
                let row = conn
                    .query_one(
                        "SELECT current_setting('synchronous_commit'), current_schema()",
                        &[],
                    )
                    .await?;
                let default: String = row.get(0);
                let schema: Option<String> = row.get(1);
                Ok((default, schema.unwrap_or_default()))
            })?
        };
        let (probe, schema) = probe;
        let channel = crate::remote_wake::channel(&schema);
        let durable_commit = if probe == "off" {
            tracing::warn!("the database's synchronous_commit is off: Postroom sets it on for every commit it acknowledges");
            "SET LOCAL synchronous_commit TO on"
        } else {
            ""
        };
        let (tx, rx) = tokio::sync::mpsc::channel(super::pg_listen::NOTICES_QUEUED_MAX);
        runtime.spawn(super::pg_listen::listen(
            pg.clone(),
            tls.clone(),
            tx,
            channel.clone(),
        ));
        Ok(PgKv {
            shared: Arc::new(Shared {
                durable_commit,
                reads,
                write,
                channel,
            }),
            runtime: Some(runtime),
            notices: std::sync::Mutex::new(Some(rx)),
        })
    }

    /// Runs `work` on the backend's runtime and waits for it from this thread.
    fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| Error::Storage("postgres: the backend is closed".into()))?;
        run_on(runtime.handle(), work)
    }
}

/// Runs `work` on `handle`'s runtime and waits for it on this thread (which may belong to
/// another runtime: the wait is a plain channel, never a nested `block_on`).
fn run_on<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    work: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(work.await);
    });
    rx.recv()
        .map_err(|_| Error::Storage("postgres: the backend stopped during a call".into()))?
}

impl Drop for PgKv {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Opens the database described by `config` and applies every pending migration step
/// (`postroom migrate`); returns the steps applied.
pub fn apply_migrations(config: &PostgresConfig) -> Result<Vec<PendingMigration>> {
    let pending = pending_migrations(config)?;
    let kv = PgKv::open(config)?;
    drop(kv);
    Ok(pending)
}

/// What a snapshot has read of single keys. A snapshot never changes, so a key read once is
/// answered from here after: the engine reads the same records many times in one batch (a
/// Room's record for each of its publishes), and each read here is a round trip.
type Gets = std::sync::Mutex<std::collections::HashMap<(Space, Vec<u8>), Option<Vec<u8>>>>;

/// A snapshot: a read-only repeatable-read transaction on a pooled connection.
struct PgSnapshot {
    conn: Option<Arc<Object>>,
    handle: tokio::runtime::Handle,
    gets: Gets,
}

impl PgSnapshot {
    /// For each key, what was read of it before (`Some`), or `None` when it was not read.
    fn cached(&self, keys: &[(Space, Vec<u8>)]) -> Vec<Option<Option<Vec<u8>>>> {
        let gets = self.gets.lock().unwrap_or_else(|p| p.into_inner());
        keys.iter().map(|k| gets.get(k).cloned()).collect()
    }

    fn remember(&self, keys: &[(Space, Vec<u8>)], values: &[Option<Vec<u8>>]) {
        let mut gets = self.gets.lock().unwrap_or_else(|p| p.into_inner());
        for (k, v) in keys.iter().zip(values) {
            gets.insert(k.clone(), v.clone());
        }
    }

    fn conn(&self) -> Result<Arc<Object>> {
        self.conn
            .clone()
            .ok_or_else(|| Error::Storage("postgres: the snapshot is closed".into()))
    }
}

impl Drop for PgSnapshot {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // The connection goes back to the pool only once its transaction has ended.
            self.handle.spawn(async move {
                if conn.batch_execute("ROLLBACK").await.is_err() {
                    // Still inside its transaction, or broken: it leaves the pool, closed.
                    if let Ok(conn) = Arc::try_unwrap(conn) {
                        drop(Object::take(conn));
                    }
                }
            });
        }
    }
}

/// The statement that reads a range with the given bounds and order (one of eighteen shapes,
/// each prepared once per connection).
fn range_sql(start: &Bound<&[u8]>, end: &Bound<&[u8]>, order: Order) -> String {
    let mut sql = String::from("SELECT key, value FROM postroom_kv WHERE space = $1");
    let mut param = 2;
    for (bound, ge, gt) in [(start, ">=", ">"), (end, "<=", "<")] {
        match bound {
            Bound::Included(_) => sql.push_str(&format!(" AND key {ge} ${param}")),
            Bound::Excluded(_) => sql.push_str(&format!(" AND key {gt} ${param}")),
            Bound::Unbounded => continue,
        }
        param += 1;
    }
    sql.push_str(match order {
        Order::Ascending => " ORDER BY key ASC",
        Order::Descending => " ORDER BY key DESC",
    });
    sql.push_str(&format!(" LIMIT ${param}"));
    sql
}

impl Snapshot for PgSnapshot {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let cached = self.cached(&[(space, key.to_vec())]);
        if let Some(value) = cached.into_iter().next().flatten() {
            return Ok(value);
        }
        let conn = self.conn()?;
        let owned = key.to_vec();
        let value = run_on(&self.handle, async move {
            let stmt = conn
                .prepare_cached("SELECT value FROM postroom_kv WHERE space = $1 AND key = $2")
                .await?;
            let row = conn.query_opt(&stmt, &[&(space as i16), &owned]).await?;
            Ok(row.map(|r| r.get::<_, Vec<u8>>(0)))
        })?;
        self.remember(&[(space, key.to_vec())], std::slice::from_ref(&value));
        Ok(value)
    }

    fn get_many(&self, keys: &[(Space, Vec<u8>)]) -> Result<Vec<Option<Vec<u8>>>> {
        let cached = self.cached(keys);
        let missing: Vec<(Space, Vec<u8>)> = keys
            .iter()
            .zip(&cached)
            .filter(|(_, c)| c.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        let mut fetched = Vec::new();
        if !missing.is_empty() {
            let conn = self.conn()?;
            let spaces: Vec<i16> = missing.iter().map(|(s, _)| *s as i16).collect();
            let bytes: Vec<Vec<u8>> = missing.iter().map(|(_, k)| k.clone()).collect();
            fetched = run_on(&self.handle, async move {
                let stmt = conn
                    .prepare_cached(
                        "SELECT t.value FROM unnest($1::int2[], $2::bytea[]) WITH ORDINALITY \
                         AS k(space, key, n) LEFT JOIN postroom_kv t \
                         ON t.space = k.space AND t.key = k.key ORDER BY k.n",
                    )
                    .await?;
                let rows = conn.query(&stmt, &[&spaces, &bytes]).await?;
                Ok(rows
                    .iter()
                    .map(|r| r.get::<_, Option<Vec<u8>>>(0))
                    .collect::<Vec<_>>())
            })?;
            self.remember(&missing, &fetched);
        }
        let mut fetched = fetched.into_iter();
        Ok(cached
            .into_iter()
            .map(|c| c.unwrap_or_else(|| fetched.next().flatten()))
            .collect())
    }

    fn range(
        &self,
        space: Space,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        order: Order,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let conn = self.conn()?;
        let sql = range_sql(&start, &end, order);
        let bounds: Vec<Vec<u8>> = [start, end]
            .into_iter()
            .filter_map(|b| match b {
                Bound::Included(k) | Bound::Excluded(k) => Some(k.to_vec()),
                Bound::Unbounded => None,
            })
            .collect();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        run_on(&self.handle, async move {
            let stmt = conn.prepare_cached(&sql).await?;
            let space = space as i16;
            let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&space];
            for b in &bounds {
                params.push(b);
            }
            params.push(&limit);
            let rows = conn.query(&stmt, &params).await?;
            Ok(rows
                .iter()
                .map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, Vec<u8>>(1)))
                .collect())
        })
    }
}

/// A batch's writes with only the last write to each key kept (a later write wins), split into
/// upserts and deletes.
struct Writes {
    put_spaces: Vec<i16>,
    put_keys: Vec<Vec<u8>>,
    put_values: Vec<Vec<u8>>,
    del_spaces: Vec<i16>,
    del_keys: Vec<Vec<u8>>,
}

impl Writes {
    fn of(batch: Batch) -> Writes {
        let mut last = std::collections::HashMap::new();
        for (i, w) in batch.writes.iter().enumerate() {
            last.insert((w.space, w.key.as_slice()), i);
        }
        let mut keep: Vec<usize> = last.into_values().collect();
        keep.sort_unstable();
        let mut out = Writes {
            put_spaces: Vec::new(),
            put_keys: Vec::new(),
            put_values: Vec::new(),
            del_spaces: Vec::new(),
            del_keys: Vec::new(),
        };
        let mut writes: Vec<Option<super::kv::Put>> = batch.writes.into_iter().map(Some).collect();
        for i in keep {
            let Some(w) = writes[i].take() else { continue };
            match w.value {
                Some(v) => {
                    out.put_spaces.push(w.space as i16);
                    out.put_keys.push(w.key);
                    out.put_values.push(v);
                }
                None => {
                    out.del_spaces.push(w.space as i16);
                    out.del_keys.push(w.key);
                }
            }
        }
        out
    }
}

async fn commit_batch(shared: Arc<Shared>, batch: Batch) -> Result<()> {
    let volatile = batch.volatile;
    let notify = batch.notify.clone();
    let expect = batch.expect.clone();
    // The conditions on keys the batch does not write (see below).
    let written: std::collections::HashSet<(Space, &[u8])> = batch
        .writes
        .iter()
        .map(|w| (w.space, w.key.as_slice()))
        .collect();
    let guards: Vec<(i16, Vec<u8>)> = expect
        .iter()
        .filter(|e| !written.contains(&(e.space, e.key.as_slice())))
        .map(|e| (e.space as i16, e.key.clone()))
        .collect();
    drop(written);
    let writes = Writes::of(batch);
    let mut conn = shared.write.get().await.map_err(pool_error)?;
    let tx = conn
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::Serializable)
        .start()
        .await?;
    if volatile {
        tx.batch_execute("SET LOCAL synchronous_commit TO OFF")
            .await?;
    } else if !shared.durable_commit.is_empty() {
        tx.batch_execute(shared.durable_commit).await?;
    }
    if !guards.is_empty() {
        // Rows this batch only reads (a guard, such as a push lease) are locked until the
        // commit, so that another node's change to one either waits for this commit or, if it
        // committed since this transaction's snapshot, fails this one (40001). A plain read
        // would let both commit: one read-write dependency is not a serialization failure.
        // Rows the batch writes need no lock: a concurrent change to one fails the write.
        let spaces: Vec<i16> = guards.iter().map(|e| e.0).collect();
        let keys: Vec<Vec<u8>> = guards.iter().map(|e| e.1.clone()).collect();
        let stmt = tx
            .prepare_cached(
                "SELECT 1 FROM postroom_kv t JOIN unnest($1::int2[], $2::bytea[]) AS k(space, key) \
                 ON t.space = k.space AND t.key = k.key FOR SHARE OF t",
            )
            .await?;
        tx.query(&stmt, &[&spaces, &keys]).await?;
    }
    if !expect.is_empty() {
        let spaces: Vec<i16> = expect.iter().map(|e| e.space as i16).collect();
        let keys: Vec<Vec<u8>> = expect.iter().map(|e| e.key.clone()).collect();
        let stmt = tx
            .prepare_cached(
                "SELECT k.space, k.key, t.value FROM unnest($1::int2[], $2::bytea[]) AS k(space, key) \
                 LEFT JOIN postroom_kv t ON t.space = k.space AND t.key = k.key",
            )
            .await?;
        let rows = tx.query(&stmt, &[&spaces, &keys]).await?;
        let now: std::collections::HashMap<(i16, Vec<u8>), Option<Vec<u8>>> = rows
            .iter()
            .map(|r| ((r.get(0), r.get(1)), r.get(2)))
            .collect();
        for e in &expect {
            let found = now.get(&(e.space as i16, e.key.clone())).cloned().flatten();
            if found != e.value {
                // Dropping the transaction rolls it back.
                return Err(Error::StorageConflict {
                    detail: format!("{}: a key changed since it was read", e.space.name()),
                });
            }
        }
    }
    if !writes.put_keys.is_empty() {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO postroom_kv (space, key, value) \
                 SELECT * FROM unnest($1::int2[], $2::bytea[], $3::bytea[]) \
                 ON CONFLICT (space, key) DO UPDATE SET value = EXCLUDED.value",
            )
            .await?;
        tx.execute(
            &stmt,
            &[&writes.put_spaces, &writes.put_keys, &writes.put_values],
        )
        .await?;
    }
    if !writes.del_keys.is_empty() {
        let stmt = tx
            .prepare_cached(
                "DELETE FROM postroom_kv t USING unnest($1::int2[], $2::bytea[]) AS d(space, key) \
                 WHERE t.space = d.space AND t.key = d.key",
            )
            .await?;
        tx.execute(&stmt, &[&writes.del_spaces, &writes.del_keys])
            .await?;
    }
    if let Some(notice) = &notify {
        // Delivered to the listeners only when (and if) the transaction commits.
        let stmt = tx.prepare_cached("SELECT pg_notify($1, $2)").await?;
        tx.execute(&stmt, &[&shared.channel, notice]).await?;
    }
    tx.commit().await?;
    Ok(())
}

impl KvStore for PgKv {
    fn snapshot(&self) -> Result<Arc<dyn Snapshot>> {
        let shared = self.shared.clone();
        let conn = self.run(async move {
            let conn = shared.reads.get().await.map_err(pool_error)?;
            // The first statement fixes the transaction's view: the snapshot sees exactly what
            // was committed before this call returns.
            if let Err(e) = conn
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SELECT 1")
                .await
            {
                // It may be inside a failed transaction now: it leaves the pool, closed.
                drop(Object::take(conn));
                return Err(e.into());
            }
            Ok(conn)
        })?;
        let handle = self
            .runtime
            .as_ref()
            .ok_or_else(|| Error::Storage("postgres: the backend is closed".into()))?
            .handle()
            .clone();
        Ok(Arc::new(PgSnapshot {
            conn: Some(Arc::new(conn)),
            handle,
            gets: Gets::default(),
        }))
    }

    fn commit(&self, batch: Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let shared = self.shared.clone();
        self.run(commit_batch(shared, batch))
    }

    fn sync(&self) -> Result<()> {
        let shared = self.shared.clone();
        self.run(async move {
            let conn = shared.write.get().await.map_err(pool_error)?;
            // A transaction that writes is committed synchronously: the WAL is flushed up to
            // it, and with it every volatile commit before (one that writes nothing would
            // not flush).
            let sql = format!(
                "BEGIN; {}; INSERT INTO postroom_sync (id, n) VALUES (1, 1) \
                 ON CONFLICT (id) DO UPDATE SET n = postroom_sync.n + 1; COMMIT",
                if shared.durable_commit.is_empty() {
                    "SET LOCAL synchronous_commit TO DEFAULT"
                } else {
                    shared.durable_commit
                }
            );
            if let Err(e) = conn.batch_execute(&sql).await {
                drop(Object::take(conn));
                return Err(e.into());
            }
            Ok(())
        })
    }

    fn recover(&self) -> Result<()> {
        // The pools replace broken connections by themselves; this only tells the writer
        // whether the database answers again.
        let shared = self.shared.clone();
        self.run(async move {
            let conn = shared.write.get().await.map_err(pool_error)?;
            if let Err(e) = conn.batch_execute("SELECT 1").await {
                drop(Object::take(conn));
                return Err(e.into());
            }
            Ok(())
        })
    }

    fn reads_block(&self) -> bool {
        true
    }

    fn take_notices(&self) -> Option<tokio::sync::mpsc::Receiver<String>> {
        self.notices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn shared(&self) -> bool {
        true
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }
}

#[cfg(test)]
#[path = "pg_kv_tests.rs"]
mod tests;
