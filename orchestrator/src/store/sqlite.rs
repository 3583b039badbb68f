//! The SQLite store: WAL mode, one writer connection (the group-commit writer
//! owns the write path), a small pool for reads.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};
use switchyard_steps::{Clock, Signal, SystemClock};

use super::{
    ChildState, Claim, Error, Fence, JournalEntry, Result, RunRecord, RunUpdate, Signalled, Store, WaitChange, Write,
};
use crate::journal::{self, Encoded, RunStatus};
use crate::workflow::Bundle;

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/sqlite/0001_init.sql")),
    (2, include_str!("../../migrations/sqlite/0002_indexes.sql")),
    (3, include_str!("../../migrations/sqlite/0003_cancel_actor.sql")),
    (4, include_str!("../../migrations/sqlite/0004_signals.sql")),
];

/// Rows per multi-row INSERT (5 binds each, well under SQLite's limit).
const INSERT_CHUNK: usize = 500;

#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// `sqlite://path.db` or a plain path.
    pub url: String,
    /// `FULL` (default) syncs the WAL on every commit: durable across power
    /// loss. `NORMAL` is durable across process crashes only.
    pub synchronous_full: bool,
}

#[derive(Clone)]
pub struct SqliteStore {
    write: SqlitePool,
    read: SqlitePool,
    /// Changes made through this store, for [`Store::changed`] (SQLite
    /// cannot tell other processes; they see changes at their next poll).
    changes: Arc<tokio::sync::Notify>,
    /// Where lease times come from: this machine's clock, shared by every
    /// process on the file.
    clock: Arc<dyn Clock>,
}

impl SqliteStore {
    pub async fn open(options: &SqliteOptions) -> Result<Self> {
        let url = &options.url;
        let url = if url.starts_with("sqlite:") { url.clone() } else { format!("sqlite://{url}") };
        let connect = SqliteConnectOptions::from_str(&url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if options.synchronous_full { SqliteSynchronous::Full } else { SqliteSynchronous::Normal })
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(connect.clone())
            .await?;
        migrate(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(connect.read_only(true))
            .await?;
        Ok(Self { write, read, changes: Arc::default(), clock: Arc::new(SystemClock) })
    }

    /// The store with another clock for lease times (tests).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    fn lease_until(&self, lease: Duration) -> (i64, i64) {
        let now = self.clock.now_ms();
        (now, now.saturating_add(lease.as_millis().min(i64::MAX as u128) as i64))
    }
}

/// Brings the schema up to date. Reading the version takes no write lock,
/// so a database already at the latest schema opens while another process
/// holds the write lock (a `run` in the middle of a commit); only a real
/// migration takes it.
async fn migrate(pool: &SqlitePool) -> Result<()> {
    let latest = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    let mut conn = pool.acquire().await?;
    if check_version(schema_version(&mut conn).await?, latest)? == latest {
        return Ok(());
    }
    let mut tx = sqlx::Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE").await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )
    .execute(&mut *tx)
    .await?;
    // Another process may have migrated meanwhile.
    let current = check_version(schema_version(&mut tx).await?, latest)?;
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        sqlx::raw_sql(*sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES (?, CAST(unixepoch('subsec') * 1000 AS INTEGER))")
            .bind(version)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn schema_version(conn: &mut sqlx::SqliteConnection) -> Result<i64> {
    let table: Option<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'")
            .fetch_optional(&mut *conn)
            .await?;
    if table.is_none() {
        return Ok(0);
    }
    let current: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM schema_migrations").fetch_one(&mut *conn).await?;
    Ok(current.unwrap_or(0))
}

fn check_version(current: i64, latest: i64) -> Result<i64> {
    if current > latest {
        return Err(Error::Schema(format!(
            "the database is at schema version {current}, newer than this binary knows ({latest}); upgrade switchyard"
        )));
    }
    Ok(current)
}

fn json_text(v: &Value) -> String {
    serde_json::to_string(v).expect("JSON values serialize")
}

fn parse_json(text: Option<String>, what: &str) -> Result<Option<Value>> {
    text.map(|t| serde_json::from_str(&t).map_err(|e| Error::Corrupt(format!("{what}: {e}")))).transpose()
}

fn record(row: &SqliteRow) -> Result<RunRecord> {
    let status: String = row.try_get("status")?;
    let error: Option<String> = row.try_get("error")?;
    Ok(RunRecord {
        id: row.try_get("id")?,
        root_id: row.try_get("root_id")?,
        parent_id: row.try_get("parent_id")?,
        workflow: row.try_get("workflow")?,
        version: row.try_get::<i64, _>("version")? as u32,
        definition: row.try_get("definition")?,
        status: RunStatus::parse(&status).ok_or_else(|| Error::Corrupt(format!("run status {status:?}")))?,
        input: parse_json(Some(row.try_get("input")?), "run input")?.unwrap_or(Value::Null),
        output: parse_json(row.try_get("output")?, "run output")?,
        error: error
            .map(|e| serde_json::from_str(&e).map_err(|e| Error::Corrupt(format!("run error: {e}"))))
            .transpose()?,
        owner: row.try_get("owner")?,
        epoch: row.try_get("epoch")?,
        lease_until: row.try_get("lease_until")?,
        wake_at: row.try_get("wake_at")?,
        cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

/// `SELECT <every run column> FROM runs <rest>`, as one literal.
macro_rules! select_runs {
    ($rest:literal) => {
        concat!(
            "SELECT id, root_id, parent_id, workflow, version, definition, status, input, output, error, ",
            "owner, epoch, lease_until, wake_at, cancel_requested, created_at, updated_at, finished_at FROM runs ",
            $rest
        )
    };
}

/// `WHERE ... ORDER BY ... LIMIT` of the runs a worker should pick up (bind
/// `?1` = now for wake-ups, `?2` = limit, `?3` = the store's now for
/// leases): parked runs that are due, unfinished runs nobody holds, runs
/// whose owner's lease expired; most overdue first.
macro_rules! due_runs {
    () => {
        "WHERE parent_id IS NULL AND ( \
           (status = 'waiting' AND owner IS NULL AND wake_at <= ?1) \
           OR (status IN ('queued', 'running') AND owner IS NULL) \
           OR (status IN ('queued', 'running', 'waiting') AND owner IS NOT NULL AND lease_until < ?3)) \
         ORDER BY CASE WHEN owner IS NULL AND status = 'waiting' THEN wake_at \
                  WHEN owner IS NULL THEN updated_at ELSE lease_until END, id LIMIT ?2"
    };
}

async fn insert_events(tx: &mut sqlx::SqliteConnection, rows: &[(&str, i64, &Encoded)]) -> Result<()> {
    for chunk in rows.chunks(INSERT_CHUNK) {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new("INSERT INTO journal (run_id, seq, at, kind, event) ");
        qb.push_values(chunk, |mut b, (run, seq, e)| {
            b.push_bind(run.to_string()).push_bind(*seq).push_bind(e.at).push_bind(e.kind).push_bind(e.payload.clone());
        });
        qb.build().execute(&mut *tx).await?;
    }
    Ok(())
}

/// The ids of run `run`'s descendants sort in `[run/, run0)`: a child's id
/// is its parent's, `/`, and more (`'0'` is the byte after `'/'`).
fn subtree(run: &str) -> (String, String) {
    (format!("{run}/"), format!("{run}0"))
}

async fn apply_update(tx: &mut sqlx::SqliteConnection, run: &str, root: &str, now: i64, u: &RunUpdate) -> Result<()> {
    let finished = u.status.is_some_and(RunStatus::is_finished);
    // A run that parks while a signal for it (or for a run below it) is
    // already committed is due at once: the signal's own wake-up may have
    // come while the run was still running, before it parked.
    let (lo, hi) = subtree(run);
    sqlx::query(
        "UPDATE runs SET status = COALESCE(?1, status), output = COALESCE(?2, output), error = ?3, \
         wake_at = CASE WHEN ?1 = 'waiting' AND EXISTS (SELECT 1 FROM waits WHERE root_id = ?9 \
             AND signalled_at IS NOT NULL AND done_at IS NULL AND (run_id = ?8 OR (run_id >= ?10 AND run_id < ?11))) \
           THEN ?7 ELSE ?4 END, \
         owner = CASE WHEN ?5 THEN NULL ELSE owner END, lease_until = CASE WHEN ?5 THEN NULL ELSE lease_until END, \
         finished_at = CASE WHEN ?6 THEN ?7 ELSE NULL END, cancel_requested = CASE WHEN ?6 THEN 0 ELSE cancel_requested END, \
         updated_at = ?7 WHERE id = ?8",
    )
    .bind(u.status.map(RunStatus::as_str))
    .bind(u.output.as_ref().map(json_text))
    .bind(u.error.as_ref().map(|e| serde_json::to_string(e).expect("errors serialize")))
    .bind(u.wake_at)
    .bind(u.release)
    .bind(finished)
    .bind(now)
    .bind(run)
    .bind(root)
    .bind(lo)
    .bind(hi)
    .execute(&mut *tx)
    .await?;
    for change in &u.waits {
        match change {
            WaitChange::Wait { name, step, deadline } => {
                sqlx::query(
                    "INSERT INTO waits (run_id, name, root_id, step, deadline, waiting_since) VALUES (?, ?, ?, ?, ?, ?) \
                     ON CONFLICT (run_id, name) DO UPDATE SET step = excluded.step, deadline = excluded.deadline, \
                     waiting_since = COALESCE(waits.waiting_since, excluded.waiting_since)",
                )
                .bind(run)
                .bind(name)
                .bind(root)
                .bind(step)
                .bind(deadline)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            WaitChange::Done { name } => {
                sqlx::query("UPDATE waits SET done_at = ? WHERE run_id = ? AND name = ? AND done_at IS NULL")
                    .bind(now)
                    .bind(run)
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
            }
        }
    }
    if finished {
        sqlx::query("UPDATE waits SET done_at = ? WHERE run_id = ? AND done_at IS NULL")
            .bind(now)
            .bind(run)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn put_definition(&self, hash: &str, name: &str, version: u32, bundle: &Bundle, now: i64) -> Result<()> {
        let text = serde_json::to_string(bundle).expect("bundles serialize");
        sqlx::query(
            "INSERT INTO definitions (hash, name, version, bundle, created_at) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (hash) DO NOTHING",
        )
        .bind(hash)
        .bind(name)
        .bind(version as i64)
        .bind(text)
        .bind(now)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn definition(&self, hash: &str) -> Result<Bundle> {
        let text: Option<String> = sqlx::query_scalar("SELECT bundle FROM definitions WHERE hash = ?")
            .bind(hash)
            .fetch_optional(&self.read)
            .await?;
        let text = text.ok_or_else(|| Error::NotFound(format!("definition {hash}")))?;
        serde_json::from_str(&text).map_err(|e| Error::Corrupt(format!("definition {hash}: {e}")))
    }

    async fn commit(&self, node: &str, now: i64, writes: &[Write]) -> Result<Vec<Result<()>>> {
        let appends_only =
            writes.iter().all(|w| matches!(w, Write::Append { update: None, events, .. } if !events.is_empty()));
        if appends_only {
            self.append_fenced(node, writes).await
        } else {
            self.commit_transaction(node, now, writes).await
        }
    }

    async fn run(&self, id: &str) -> Result<Option<RunRecord>> {
        let row = sqlx::query(select_runs!("WHERE id = ?")).bind(id).fetch_optional(&self.read).await?;
        row.as_ref().map(record).transpose()
    }

    async fn run_by_key(&self, key: &str) -> Result<Option<RunRecord>> {
        let row = sqlx::query(select_runs!("WHERE idempotency_key = ?")).bind(key).fetch_optional(&self.read).await?;
        row.as_ref().map(record).transpose()
    }

    async fn runs(&self, status: Option<RunStatus>, include_children: bool, limit: i64) -> Result<Vec<RunRecord>> {
        let rows = sqlx::query(select_runs!(
            "WHERE (? IS NULL OR status = ?) AND (? OR parent_id IS NULL) ORDER BY created_at DESC, id DESC LIMIT ?"
        ))
        .bind(status.map(RunStatus::as_str))
        .bind(status.map(RunStatus::as_str))
        .bind(include_children)
        .bind(limit)
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(record).collect()
    }

    async fn children(&self, parent: &str) -> Result<Vec<RunRecord>> {
        let rows =
            sqlx::query(select_runs!("WHERE parent_id = ? ORDER BY id")).bind(parent).fetch_all(&self.read).await?;
        rows.iter().map(record).collect()
    }

    async fn journal(&self, id: &str) -> Result<Vec<JournalEntry>> {
        let rows: Vec<(i64, i64, String)> =
            sqlx::query_as("SELECT seq, at, event FROM journal WHERE run_id = ? ORDER BY seq")
                .bind(id)
                .fetch_all(&self.read)
                .await?;
        rows.into_iter()
            .map(|(seq, at, text)| {
                let event =
                    journal::decode(&text).map_err(|e| Error::Corrupt(format!("journal of {id} at {seq}: {e}")))?;
                Ok(JournalEntry { seq, at, event })
            })
            .collect()
    }

    async fn next_seq(&self, id: &str) -> Result<i64> {
        let next: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq) + 1, 0) FROM journal WHERE run_id = ?")
            .bind(id)
            .fetch_one(&self.read)
            .await?;
        Ok(next)
    }

    async fn claim(
        &self,
        id: &str,
        node: &str,
        seen_epoch: i64,
        lease: Duration,
        allow_finished: bool,
    ) -> Result<Option<Claim>> {
        let (now, lease_until) = self.lease_until(lease);
        let row: Option<(i64, i64, Option<String>)> = sqlx::query_as(
            "UPDATE runs SET owner = ?, epoch = epoch + 1, lease_until = ?, updated_at = ? \
             WHERE id = ? AND parent_id IS NULL AND epoch = ? AND (owner IS NULL OR owner = ? OR lease_until < ?) \
             AND (? OR status NOT IN ('succeeded', 'failed', 'cancelled')) RETURNING epoch, cancel_requested, cancel_actor",
        )
        .bind(node)
        .bind(lease_until)
        .bind(now)
        .bind(id)
        .bind(seen_epoch)
        .bind(node)
        .bind(now)
        .bind(allow_finished)
        .fetch_optional(&self.write)
        .await?;
        Ok(row.map(|(epoch, cancel, actor)| Claim { epoch, cancel_requested: cancel != 0, cancel_actor: actor }))
    }

    async fn claimable(&self, now: i64, limit: i64) -> Result<Vec<RunRecord>> {
        let rows = sqlx::query(concat!(select_runs!(""), due_runs!()))
            .bind(now)
            .bind(limit)
            .bind(self.clock.now_ms())
            .fetch_all(&self.read)
            .await?;
        rows.iter().map(record).collect()
    }

    async fn claim_due(&self, node: &str, now: i64, lease: Duration, limit: i64) -> Result<Vec<(RunRecord, Claim)>> {
        let (store_now, lease_until) = self.lease_until(lease);
        let rows = sqlx::query(concat!(
            "UPDATE runs SET owner = ?4, epoch = epoch + 1, lease_until = ?5, updated_at = ?3 \
             WHERE id IN (SELECT id FROM runs ",
            due_runs!(),
            ") RETURNING id, root_id, parent_id, workflow, version, definition, status, input, output, error, \
             owner, epoch, lease_until, wake_at, cancel_requested, created_at, updated_at, finished_at, cancel_actor"
        ))
        .bind(now)
        .bind(limit)
        .bind(store_now)
        .bind(node)
        .bind(lease_until)
        .fetch_all(&self.write)
        .await?;
        let mut claimed = rows
            .iter()
            .map(|row| {
                let run = record(row)?;
                let claim = Claim {
                    epoch: run.epoch,
                    cancel_requested: run.cancel_requested,
                    cancel_actor: row.try_get("cancel_actor")?,
                };
                Ok((run, claim))
            })
            .collect::<Result<Vec<_>>>()?;
        // RETURNING has no order of its own.
        claimed.sort_by_key(|(run, _)| (run.wake_at.unwrap_or(run.created_at), run.id.clone()));
        Ok(claimed)
    }

    async fn changed(&self, within: Duration) {
        let _ = tokio::time::timeout(within, self.changes.notified()).await;
    }

    async fn signal(
        &self,
        run: &str,
        name: &str,
        payload: &Value,
        actor: Option<&str>,
        now: i64,
        require_waiting: bool,
    ) -> Result<Signalled> {
        let mut conn = self.write.acquire().await?;
        let mut tx = sqlx::Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE").await?;
        let found: Option<(String, String)> =
            sqlx::query_as("SELECT status, root_id FROM runs WHERE id = ?").bind(run).fetch_optional(&mut *tx).await?;
        let Some((status, root)) = found else { return Err(Error::NotFound(run.to_owned())) };
        let status = RunStatus::parse(&status).ok_or_else(|| Error::Corrupt(format!("run status {status:?}")))?;
        if status.is_finished() {
            return Ok(Signalled::Finished(status));
        }
        let wait: Option<(Option<i64>, Option<i64>, Option<i64>)> =
            sqlx::query_as("SELECT waiting_since, signalled_at, done_at FROM waits WHERE run_id = ? AND name = ?")
                .bind(run)
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        let waiting = match wait {
            Some((_, Some(_), _)) => return Ok(Signalled::Duplicate),
            Some((_, None, Some(_))) => return Ok(Signalled::NotWaiting),
            Some((since, None, None)) => since.is_some(),
            None => false,
        };
        if require_waiting && !waiting {
            return Ok(Signalled::NotWaiting);
        }
        sqlx::query(
            "INSERT INTO waits (run_id, name, root_id, payload, actor, signalled_at) VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (run_id, name) DO UPDATE SET payload = excluded.payload, actor = excluded.actor, \
             signalled_at = excluded.signalled_at",
        )
        .bind(run)
        .bind(name)
        .bind(&root)
        .bind(json_text(payload))
        .bind(actor)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        // The run and every parked run above it are due now (one primary
        // key lookup per level: a recursive CTE here scans the table).
        let mut level = Some(run.to_owned());
        while let Some(id) = level {
            let parent: Option<Option<String>> = sqlx::query_scalar(
                "UPDATE runs SET wake_at = CASE WHEN status = 'waiting' AND (wake_at IS NULL OR wake_at > ?1) \
                 THEN ?1 ELSE wake_at END WHERE id = ?2 RETURNING parent_id",
            )
            .bind(now)
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await?;
            level = parent.flatten();
        }
        tx.commit().await?;
        self.changes.notify_waiters();
        Ok(Signalled::Delivered { root, waiting })
    }

    async fn signals(&self, run: &str) -> Result<Vec<Signal>> {
        let rows: Vec<(String, Option<String>, Option<String>, i64)> = sqlx::query_as(
            "SELECT name, payload, actor, signalled_at FROM waits \
             WHERE run_id = ? AND signalled_at IS NOT NULL AND done_at IS NULL ORDER BY signalled_at, name",
        )
        .bind(run)
        .fetch_all(&self.read)
        .await?;
        rows.into_iter()
            .map(|(name, payload, actor, at)| {
                let payload = parse_json(payload, "signal payload")?.unwrap_or(Value::Null);
                Ok(Signal { name, payload, actor, at })
            })
            .collect()
    }

    async fn signalled(&self, root: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT run_id FROM waits WHERE root_id = ? AND signalled_at IS NOT NULL AND done_at IS NULL",
        )
        .bind(root)
        .fetch_all(&self.read)
        .await?)
    }

    async fn signalled_roots(&self) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT root_id FROM waits WHERE signalled_at IS NOT NULL AND done_at IS NULL LIMIT 10000",
        )
        .fetch_all(&self.read)
        .await?)
    }

    async fn child_states(&self, parent: &str) -> Result<Vec<ChildState>> {
        let rows: Vec<(String, String, Option<i64>)> =
            sqlx::query_as("SELECT id, status, wake_at FROM runs WHERE parent_id = ?")
                .bind(parent)
                .fetch_all(&self.read)
                .await?;
        rows.into_iter()
            .map(|(id, status, wake_at)| {
                let status =
                    RunStatus::parse(&status).ok_or_else(|| Error::Corrupt(format!("run status {status:?}")))?;
                Ok(ChildState { id, status, wake_at })
            })
            .collect()
    }

    async fn next_wakes(&self, now: i64, limit: i64) -> Result<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT id, wake_at FROM runs WHERE parent_id IS NULL AND status = 'waiting' AND owner IS NULL \
             AND wake_at > ? ORDER BY wake_at, id LIMIT ?",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&self.read)
        .await?)
    }

    async fn parked_count(&self) -> Result<u64> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM runs WHERE status = 'waiting' AND owner IS NULL")
            .fetch_one(&self.read)
            .await?;
        Ok(n.max(0) as u64)
    }

    async fn renew(&self, node: &str, ids: &[String], lease: Duration) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let (_, lease_until) = self.lease_until(lease);
        let ids = serde_json::to_string(ids).expect("strings serialize");
        let done =
            sqlx::query("UPDATE runs SET lease_until = ? WHERE owner = ? AND id IN (SELECT value FROM json_each(?))")
                .bind(lease_until)
                .bind(node)
                .bind(ids)
                .execute(&self.write)
                .await?;
        Ok(done.rows_affected())
    }

    async fn release(&self, node: &str, fence: &Fence) -> Result<()> {
        sqlx::query("UPDATE runs SET owner = NULL, lease_until = NULL WHERE id = ? AND owner = ? AND epoch = ?")
            .bind(&fence.root)
            .bind(node)
            .bind(fence.epoch)
            .execute(&self.write)
            .await?;
        self.changes.notify_waiters();
        Ok(())
    }

    async fn release_all(&self, node: &str) -> Result<()> {
        sqlx::query("UPDATE runs SET owner = NULL, lease_until = NULL WHERE owner = ?")
            .bind(node)
            .execute(&self.write)
            .await?;
        self.changes.notify_waiters();
        Ok(())
    }

    async fn cancel_requests(&self, node: &str) -> Result<Vec<(String, Option<String>)>> {
        Ok(sqlx::query_as("SELECT id, cancel_actor FROM runs WHERE owner = ? AND cancel_requested = 1")
            .bind(node)
            .fetch_all(&self.read)
            .await?)
    }

    async fn request_cancel(&self, id: &str, actor: Option<&str>, now: i64) -> Result<()> {
        let done = sqlx::query(
            "UPDATE runs SET cancel_requested = 1, cancel_actor = COALESCE(cancel_actor, ?), updated_at = ? WHERE id = ?",
        )
        .bind(actor)
        .bind(now)
            .bind(id)
            .execute(&self.write)
            .await?;
        if done.rows_affected() == 0 {
            return Err(Error::NotFound(id.to_owned()));
        }
        self.changes.notify_waiters();
        Ok(())
    }
}

impl SqliteStore {
    /// The general path: creates, updates and appends in one transaction.
    async fn commit_transaction(&self, node: &str, now: i64, writes: &[Write]) -> Result<Vec<Result<()>>> {
        let mut conn = self.write.acquire().await?;
        // IMMEDIATE: take the write lock first, so the fence read and the
        // writes see one snapshot even with other processes on the file.
        let mut tx = sqlx::Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE").await?;
        // One query for every fence in the batch: the epochs of the runs this
        // node owns right now.
        let needs_fence =
            writes.iter().any(|w| matches!(w, Write::Append { .. } | Write::Create { fence: Some(_), .. }));
        let owned: HashMap<String, i64> = if needs_fence {
            sqlx::query_as::<_, (String, i64)>("SELECT id, epoch FROM runs WHERE owner = ?")
                .bind(node)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect()
        } else {
            HashMap::new()
        };
        let holds = |f: &Fence| owned.get(&f.root) == Some(&f.epoch);

        let mut results = Vec::with_capacity(writes.len());
        let mut rows: Vec<(&str, i64, &Encoded)> = Vec::new();
        for write in writes {
            match write {
                Write::Create { fence, run, events } => {
                    if let Some(f) = fence
                        && !holds(f)
                    {
                        results.push(Err(Error::Fenced(f.root.clone())));
                        continue;
                    }
                    let created = sqlx::query(
                        "INSERT INTO runs (id, root_id, parent_id, workflow, version, definition, status, input, owner, \
                         epoch, lease_until, idempotency_key, created_at, updated_at) \
                         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    )
                    .bind(&run.id)
                    .bind(&run.root_id)
                    .bind(&run.parent_id)
                    .bind(&run.workflow)
                    .bind(run.version as i64)
                    .bind(&run.definition)
                    .bind(run.status.as_str())
                    .bind(json_text(&run.input))
                    .bind(&run.owner)
                    .bind(run.epoch)
                    .bind(run.lease.map(|l| self.lease_until(l).1))
                    .bind(&run.idempotency_key)
                    .bind(now)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if created == 1 {
                        rows.extend(events.iter().enumerate().map(|(i, e)| (run.id.as_str(), i as i64, e)));
                    }
                    results.push(Ok(()));
                }
                Write::Append { fence, run, first_seq, events, update } => {
                    if !holds(fence) {
                        results.push(Err(Error::Fenced(fence.root.clone())));
                        continue;
                    }
                    rows.extend(events.iter().enumerate().map(|(i, e)| (run.as_str(), first_seq + i as i64, e)));
                    if let Some(update) = update {
                        apply_update(&mut tx, run, &fence.root, now, update).await?;
                    }
                    results.push(Ok(()));
                }
            }
        }
        insert_events(&mut tx, &rows).await?;
        tx.commit().await?;
        Ok(results)
    }

    /// The hot path: a batch of plain appends is one statement, atomic on its
    /// own (no BEGIN/COMMIT round trips). The fence is a join: rows of runs
    /// this node no longer owns at the claimed epoch are not inserted.
    async fn append_fenced(&self, node: &str, writes: &[Write]) -> Result<Vec<Result<()>>> {
        let mut rows: Vec<(&str, i64, &Encoded, &Fence)> = Vec::new();
        for write in writes {
            if let Write::Append { fence, run, first_seq, events, .. } = write {
                rows.extend(events.iter().enumerate().map(|(i, e)| (run.as_str(), first_seq + i as i64, e, fence)));
            }
        }
        if rows.len() > INSERT_CHUNK {
            return self.commit_transaction(node, 0, writes).await;
        }
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO journal (run_id, seq, at, kind, event) \
             SELECT v.column1, v.column2, v.column3, v.column4, v.column5 FROM (",
        );
        qb.push_values(&rows, |mut b, (run, seq, e, fence)| {
            b.push_bind(run.to_string())
                .push_bind(*seq)
                .push_bind(e.at)
                .push_bind(e.kind)
                .push_bind(e.payload.clone())
                .push_bind(fence.root.clone())
                .push_bind(fence.epoch);
        });
        qb.push(") AS v JOIN runs r ON r.id = v.column6 AND r.epoch = v.column7 AND r.owner = ");
        qb.push_bind(node.to_owned());
        let inserted = qb.build().execute(&self.write).await?.rows_affected();
        if inserted == rows.len() as u64 {
            return Ok(writes.iter().map(|_| Ok(())).collect());
        }
        // Some fence failed: find out which (rare).
        let owned: HashMap<String, i64> =
            sqlx::query_as::<_, (String, i64)>("SELECT id, epoch FROM runs WHERE owner = ?")
                .bind(node)
                .fetch_all(&self.write)
                .await?
                .into_iter()
                .collect();
        Ok(writes
            .iter()
            .map(|w| match w {
                Write::Append { fence, .. } if owned.get(&fence.root) != Some(&fence.epoch) => {
                    Err(Error::Fenced(fence.root.clone()))
                }
                _ => Ok(()),
            })
            .collect())
    }
}
