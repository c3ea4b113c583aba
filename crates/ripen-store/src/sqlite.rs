//! The SQLite backend: one database file in WAL mode, one writer thread that
//! group-commits, and a small pool of read-only connections.
//!
//! Every write (create, claim, complete, recover, cancel, retry) is a command
//! sent to the writer thread over a bounded channel. The thread takes the
//! first queued command, drains whatever else is queued (up to
//! [`SqliteOptions::batch_max`]) and runs the whole batch in one
//! `BEGIN IMMEDIATE ... COMMIT` transaction, each command inside its own
//! savepoint so that a failing command rolls back only itself. Callers are
//! answered only after `COMMIT` returned, so one fsync acknowledges many
//! requests and none is acknowledged before it is durable
//! (`synchronous=FULL`).
//!
//! Reads run on read-only connections through `spawn_blocking`; WAL lets them
//! proceed while the writer commits, and each read that spans several
//! statements runs in one read transaction so it sees one snapshot.
//!
//! Architecture invariant: only the writer thread writes, and every command
//! that changes an entity writes its state, its history events and its
//! outbox rows in the same transaction.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ripen_core::{
    apply, Catalog, Ctx, EntityState, EntityStatus, Event, Executor, Input, LostReason, Pipeline,
    Refusal, StepState, StepStatus, UnixMicros,
};
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection, ErrorCode, OpenFlags, OptionalExtension};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::history::{self, HistoryEvent};
use crate::{
    Attempt, ClaimBatch, CommandOutcome, CompleteBatch, Completion, CompletionResult, EntityData,
    EntityId, EntityRecord, IntakeOutcome, ListQuery, NewEntity, Outcome, Result, StepRecord,
    Store, StoreError,
};

/// The schema this build writes, kept in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;
/// Write commands waiting for the writer thread; senders wait beyond this.
const WRITE_QUEUE_MAX: usize = 4_096;
/// How long a connection waits for a lock before reporting the store busy.
const BUSY_TIMEOUT_MS: u64 = 5_000;
/// Prepared statements kept per connection.
const STATEMENT_CACHE_MAX: usize = 64;
/// Page cache of the writer connection.
const WRITER_CACHE_KIB: i64 = 32 * 1_024;
/// Page cache of each read connection.
const READER_CACHE_KIB: i64 = 8 * 1_024;
/// The queue of steps run by the HTTP executor, the only one `claim_due` serves.
const HTTP_QUEUE: &str = "http";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS payloads (
    id INTEGER PRIMARY KEY,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS entities (
    id BLOB NOT NULL PRIMARY KEY,
    tenant TEXT NOT NULL,
    type TEXT NOT NULL,
    version INTEGER NOT NULL,
    status TEXT NOT NULL,
    degraded INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    ready_at INTEGER,
    next_seq INTEGER NOT NULL,
    payload_id INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entities_by_tenant ON entities (tenant, id);
CREATE INDEX IF NOT EXISTS entities_by_type ON entities (tenant, type, id);
CREATE INDEX IF NOT EXISTS entities_by_status ON entities (tenant, status, id);
CREATE TABLE IF NOT EXISTS steps (
    entity_id BLOB NOT NULL,
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    critical INTEGER NOT NULL,
    queue TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    due_at INTEGER,
    last_error TEXT,
    output TEXT,
    PRIMARY KEY (entity_id, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS steps_due ON steps (queue, due_at) WHERE due_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS idempotency (
    tenant TEXT NOT NULL,
    type TEXT NOT NULL,
    key TEXT NOT NULL,
    entity_id BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, type, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    entity_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    step TEXT,
    attempt INTEGER,
    detail TEXT NOT NULL,
    PRIMARY KEY (entity_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    entity_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL
);
";

/// How to open a [`SqliteStore`].
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    /// The database file; created if missing.
    pub path: PathBuf,
    /// Read-only connections serving `get`, `list`, `events` and friends.
    pub read_connections: usize,
    /// The most write commands committed by one transaction.
    pub batch_max: usize,
    /// How long a lease outlives the step's timeout.
    pub lease_grace_ms: u64,
}

impl SqliteOptions {
    pub fn new(path: impl Into<PathBuf>) -> SqliteOptions {
        SqliteOptions {
            path: path.into(),
            read_connections: 4,
            batch_max: 1_024,
            lease_grace_ms: 5_000,
        }
    }
}

/// The embedded store: one SQLite file. See the module documentation.
pub struct SqliteStore {
    writer: mpsc::Sender<Box<dyn Job>>,
    readers: Arc<Readers>,
    catalog: Arc<Catalog>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.readers.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (or creates) the database, migrates its schema and starts the
    /// writer thread. Needs no async runtime; the returned store does.
    pub fn open(opts: SqliteOptions, catalog: Arc<Catalog>) -> Result<SqliteStore, StoreError> {
        let conn = open_writer(&opts.path)?;
        let read_connections = opts.read_connections.max(1);
        let mut idle = Vec::with_capacity(read_connections);
        for _ in 0..read_connections {
            idle.push(open_reader(&opts.path)?);
        }
        let readers = Arc::new(Readers {
            idle: Mutex::new(idle),
            permits: Arc::new(Semaphore::new(read_connections)),
            path: opts.path.clone(),
        });
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_MAX);
        let writer = Writer {
            conn,
            catalog: catalog.clone(),
            lease_grace_ms: opts.lease_grace_ms,
        };
        let batch_max = opts.batch_max.max(1);
        std::thread::Builder::new()
            .name("ripen-sqlite-writer".into())
            .spawn(move || writer.run(rx, batch_max))
            .map_err(|e| StoreError::Unavailable(format!("start the sqlite writer thread: {e}")))?;
        Ok(SqliteStore {
            writer: tx,
            readers,
            catalog,
        })
    }

    /// Runs `command` on the writer thread and answers once its transaction
    /// has committed.
    async fn write<T, F>(&self, command: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Writer) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Box::new(Request {
            command: Some(command),
            result: None,
            reply,
        });
        self.writer
            .send(job)
            .await
            .map_err(|_| StoreError::Unavailable("the sqlite writer has stopped".into()))?;
        answer.await.map_err(|_| {
            StoreError::Unavailable("the sqlite writer stopped before answering".into())
        })?
    }

    /// Runs `query` on a read-only connection off the async runtime.
    async fn read<T, F>(&self, query: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let permit = self
            .readers
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("the sqlite readers are closed".into()))?;
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let conn = match readers.take() {
                Some(conn) => conn,
                None => open_reader(&readers.path)?,
            };
            let result = query(&conn);
            // A connection whose query panicked is dropped with the panic and
            // replaced on demand by the branch above.
            readers.put(conn);
            result
        })
        .await
        .map_err(|e| StoreError::Internal(format!("run a sqlite read: {e}")))?
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn create(&self, entity: NewEntity, now_us: UnixMicros) -> Result<IntakeOutcome> {
        let pipeline = self
            .catalog
            .get(&entity.type_name, entity.version)
            .cloned()
            .ok_or_else(|| StoreError::UnknownPipeline {
                type_name: entity.type_name.clone(),
                version: entity.version,
            })?;
        self.write(move |w| w.create(&pipeline, entity, now_us))
            .await
    }

    async fn claim_due(&self, now_us: UnixMicros, limit: usize) -> Result<ClaimBatch> {
        self.write(move |w| w.claim_due(now_us, limit)).await
    }

    async fn complete(
        &self,
        completions: Vec<Completion>,
        now_us: UnixMicros,
    ) -> Result<CompleteBatch> {
        if completions.is_empty() {
            return Ok(CompleteBatch {
                results: Vec::new(),
                claimed: Vec::new(),
            });
        }
        self.write(move |w| w.complete(completions, now_us)).await
    }

    async fn recover(&self, now_us: UnixMicros) -> Result<u64> {
        self.write(move |w| w.recover(now_us)).await
    }

    async fn cancel(
        &self,
        tenant: &str,
        id: EntityId,
        now_us: UnixMicros,
    ) -> Result<CommandOutcome> {
        let tenant = tenant.to_owned();
        self.write(move |w| w.command(&tenant, id, Input::Cancel, now_us))
            .await
    }

    async fn retry(
        &self,
        tenant: &str,
        id: EntityId,
        now_us: UnixMicros,
    ) -> Result<CommandOutcome> {
        let tenant = tenant.to_owned();
        self.write(move |w| w.command(&tenant, id, Input::Retry, now_us))
            .await
    }

    async fn get(&self, tenant: &str, id: EntityId) -> Result<Option<EntityRecord>> {
        let tenant = tenant.to_owned();
        self.read(move |conn| {
            let tx = conn.unchecked_transaction()?;
            let found = read_entity(&tx, id)?.filter(|(record, _)| record.tenant == tenant);
            tx.commit()?;
            Ok(found.map(|(record, _)| record))
        })
        .await
    }

    async fn get_data(&self, tenant: &str, id: EntityId) -> Result<Option<EntityData>> {
        let tenant = tenant.to_owned();
        self.read(move |conn| {
            let tx = conn.unchecked_transaction()?;
            let Some((record, extra)) =
                read_entity(&tx, id)?.filter(|(record, _)| record.tenant == tenant)
            else {
                return Ok(None);
            };
            let payload = read_payload(&tx, extra.payload_id)?;
            let outputs = read_outputs(&tx, id)?;
            tx.commit()?;
            Ok(Some(EntityData {
                record,
                payload,
                outputs,
            }))
        })
        .await
    }

    async fn list(&self, tenant: &str, query: ListQuery) -> Result<Vec<EntityRecord>> {
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let tenant = tenant.to_owned();
        self.read(move |conn| {
            let mut sql = String::from("SELECT id FROM entities WHERE tenant = ?1");
            let mut args: Vec<SqlValue> = vec![SqlValue::Text(tenant)];
            if let Some(type_name) = query.type_name {
                args.push(SqlValue::Text(type_name));
                sql.push_str(&format!(" AND type = ?{}", args.len()));
            }
            if let Some(status) = query.status {
                args.push(SqlValue::Text(status.as_str().to_owned()));
                sql.push_str(&format!(" AND status = ?{}", args.len()));
            }
            if let Some(after) = query.after {
                args.push(SqlValue::Blob(after.as_bytes().to_vec()));
                sql.push_str(&format!(" AND id < ?{}", args.len()));
            }
            args.push(SqlValue::Integer(i64::from(query.limit)));
            sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", args.len()));

            let tx = conn.unchecked_transaction()?;
            let ids = {
                let mut stmt = tx.prepare_cached(&sql)?;
                let mut rows = stmt.query(params_from_iter(args))?;
                let mut ids = Vec::new();
                while let Some(row) = rows.next()? {
                    ids.push(entity_id(&row.get::<_, Vec<u8>>(0)?)?);
                }
                ids
            };
            let mut records = Vec::with_capacity(ids.len());
            for id in ids {
                // The row was seen in this snapshot, so it is still there.
                if let Some((record, _)) = read_entity(&tx, id)? {
                    records.push(record);
                }
            }
            tx.commit()?;
            Ok(records)
        })
        .await
    }

    async fn events(
        &self,
        tenant: &str,
        id: EntityId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Option<Vec<HistoryEvent>>> {
        let tenant = tenant.to_owned();
        self.read(move |conn| {
            let tx = conn.unchecked_transaction()?;
            let owner: Option<String> = tx
                .prepare_cached("SELECT tenant FROM entities WHERE id = ?1")?
                .query_row([id.as_bytes()], |r| r.get(0))
                .optional()?;
            if owner.as_deref() != Some(tenant.as_str()) {
                return Ok(None);
            }
            let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
            let mut events = Vec::new();
            {
                let mut stmt = tx.prepare_cached(
                    "SELECT seq, at, kind, step, attempt, detail FROM events
                     WHERE entity_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                )?;
                let mut rows = stmt.query(params![id.as_bytes(), after, i64::from(limit)])?;
                while let Some(row) = rows.next()? {
                    let detail: String = row.get(5)?;
                    events.push(HistoryEvent {
                        seq: to_u64(row.get(0)?, "events.seq")?,
                        at_us: row.get(1)?,
                        kind: row.get(2)?,
                        step: row.get(3)?,
                        attempt: row
                            .get::<_, Option<i64>>(4)?
                            .map(|a| to_u32(a, "events.attempt"))
                            .transpose()?,
                        detail: serde_json::from_str(&detail).map_err(|e| {
                            StoreError::Internal(format!("parse the detail of event of {id}: {e}"))
                        })?,
                    });
                }
            }
            tx.commit()?;
            Ok(Some(events))
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        if self.writer.is_closed() {
            return Err(StoreError::Unavailable(
                "the sqlite writer has stopped".into(),
            ));
        }
        self.read(|conn| {
            conn.prepare_cached("SELECT 1")?
                .query_row([], |r| r.get::<_, i64>(0))?;
            Ok(())
        })
        .await
    }

    async fn clock_us(&self) -> Result<UnixMicros> {
        Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0))
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        let transient = matches!(
            &e,
            rusqlite::Error::SqliteFailure(f, _) if matches!(
                f.code,
                ErrorCode::DatabaseBusy
                    | ErrorCode::DatabaseLocked
                    | ErrorCode::SystemIoFailure
                    | ErrorCode::DiskFull
                    | ErrorCode::CannotOpen
                    | ErrorCode::FileLockingProtocolFailed
                    | ErrorCode::PermissionDenied
                    | ErrorCode::ReadOnly
                    | ErrorCode::OutOfMemory
            )
        );
        if transient {
            StoreError::Unavailable(format!("sqlite: {e}"))
        } else {
            StoreError::Internal(format!("sqlite: {e}"))
        }
    }
}

fn copy_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::Internal(m) => StoreError::Internal(m.clone()),
        StoreError::UnknownPipeline { type_name, version } => StoreError::UnknownPipeline {
            type_name: type_name.clone(),
            version: *version,
        },
    }
}

// ---------------------------------------------------------------------------
// Connections

fn open_writer(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(|e| StoreError::Unavailable(format!("open {}: {e}", path.display())))?;
    conn.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unavailable(format!(
            "switch {} to WAL mode: sqlite kept journal mode {mode:?}",
            path.display()
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Every acknowledgement must be on disk: refuse to run with anything weaker.
    let synchronous: i64 = conn.pragma_query_value(None, "synchronous", |r| r.get(0))?;
    if synchronous < 2 {
        return Err(StoreError::Internal(format!(
            "sqlite refused synchronous=FULL (got {synchronous})"
        )));
    }
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_MAX);
    migrate(&conn)?;
    Ok(conn)
}

fn migrate(conn: &Connection) -> Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Internal(format!(
            "the database has schema version {version}, newer than the {SCHEMA_VERSION} this build knows"
        )));
    }
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
    ))
    .map_err(|e| {
        let _ = conn.execute_batch("ROLLBACK");
        StoreError::from(e)
    })
}

fn open_reader(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(|e| StoreError::Unavailable(format!("open {} to read: {e}", path.display())))?;
    conn.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))?;
    conn.pragma_update(None, "cache_size", -READER_CACHE_KIB)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_MAX);
    Ok(conn)
}

/// Idle read-only connections; the semaphore bounds how many are in use.
struct Readers {
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
    path: PathBuf,
}

impl Readers {
    fn take(&self) -> Option<Connection> {
        // The vector stays consistent even if a holder panicked.
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn put(&self, conn: Connection) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
    }
}

// ---------------------------------------------------------------------------
// Row decoding, shared by the readers and the writer

fn to_u32(v: i64, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| StoreError::Internal(format!("{what} out of range: {v}")))
}

fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| StoreError::Internal(format!("{what} out of range: {v}")))
}

fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::Internal(format!("{what} out of range: {v}")))
}

fn entity_id(bytes: &[u8]) -> Result<EntityId> {
    EntityId::from_slice(bytes).ok_or_else(|| {
        StoreError::Internal(format!("malformed entity id of {} bytes", bytes.len()))
    })
}

fn entity_status(s: &str) -> Result<EntityStatus> {
    EntityStatus::parse(s)
        .ok_or_else(|| StoreError::Internal(format!("unknown entity status {s:?}")))
}

fn step_status(s: &str) -> Result<StepStatus> {
    StepStatus::parse(s).ok_or_else(|| StoreError::Internal(format!("unknown step status {s:?}")))
}

/// The columns of an entity row that the record does not carry.
#[derive(Clone, Copy, Debug)]
struct RowExtra {
    next_seq: u64,
    payload_id: i64,
}

fn read_entity(conn: &Connection, id: EntityId) -> Result<Option<(EntityRecord, RowExtra)>> {
    let row = conn
        .prepare_cached(
            "SELECT tenant, type, version, status, degraded, created_at, updated_at, ready_at,
                    next_seq, payload_id
             FROM entities WHERE id = ?1",
        )?
        .query_row([id.as_bytes()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, bool>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, Option<i64>>(7)?,
                r.get::<_, i64>(8)?,
                r.get::<_, i64>(9)?,
            ))
        })
        .optional()?;
    let Some((
        tenant,
        type_name,
        version,
        status,
        degraded,
        created,
        updated,
        ready,
        next_seq,
        payload_id,
    )) = row
    else {
        return Ok(None);
    };
    let mut steps = Vec::new();
    {
        let mut stmt = conn.prepare_cached(
            "SELECT idx, name, critical, status, attempts, epoch, due_at, last_error
             FROM steps WHERE entity_id = ?1 ORDER BY idx",
        )?;
        let mut rows = stmt.query([id.as_bytes()])?;
        while let Some(r) = rows.next()? {
            let idx: i64 = r.get(0)?;
            if usize::try_from(idx).ok() != Some(steps.len()) {
                return Err(StoreError::Internal(format!(
                    "entity {id}: step rows are not numbered 0..n (found {idx} at {})",
                    steps.len()
                )));
            }
            steps.push(StepRecord {
                name: r.get(1)?,
                critical: r.get(2)?,
                state: StepState {
                    status: step_status(&r.get::<_, String>(3)?)?,
                    attempts: to_u32(r.get(4)?, "steps.attempts")?,
                    epoch: to_u64(r.get(5)?, "steps.epoch")?,
                    due_at_us: r.get(6)?,
                    last_error: r.get(7)?,
                },
            });
        }
    }
    let record = EntityRecord {
        id,
        tenant,
        type_name,
        version: to_u32(version, "entities.version")?,
        status: entity_status(&status)?,
        degraded,
        created_at_us: created,
        updated_at_us: updated,
        ready_at_us: ready,
        steps,
    };
    let extra = RowExtra {
        next_seq: to_u64(next_seq, "entities.next_seq")?,
        payload_id,
    };
    Ok(Some((record, extra)))
}

fn read_payload(conn: &Connection, payload_id: i64) -> Result<String> {
    conn.prepare_cached("SELECT body FROM payloads WHERE id = ?1")?
        .query_row([payload_id], |r| r.get(0))
        .optional()?
        .ok_or_else(|| StoreError::Internal(format!("payload {payload_id} is missing")))
}

/// `(step name, raw JSON)` of the succeeded steps that returned an output, in pipeline order.
fn read_outputs(conn: &Connection, id: EntityId) -> Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, output FROM steps
         WHERE entity_id = ?1 AND status = 'succeeded' AND output IS NOT NULL ORDER BY idx",
    )?;
    let rows = stmt.query_map([id.as_bytes()], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

fn queue_of(executor: &Executor) -> String {
    match executor {
        Executor::Http { .. } => HTTP_QUEUE.to_owned(),
        Executor::Worker { queue } => format!("worker:{queue}"),
    }
}

// ---------------------------------------------------------------------------
// The writer thread

/// A write command queued for the writer thread, erased over its result type.
trait Job: Send {
    /// Runs the command inside the open transaction. False when it failed and
    /// its savepoint must be rolled back.
    fn run(&mut self, writer: &mut Writer) -> bool;
    /// Answers the caller once the fate of the transaction is known:
    /// `failure` is set when the batch did not commit.
    fn answer(self: Box<Self>, failure: Option<&StoreError>);
}

struct Request<T, F> {
    command: Option<F>,
    result: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
}

impl<T, F> Job for Request<T, F>
where
    T: Send,
    F: FnOnce(&mut Writer) -> Result<T> + Send,
{
    fn run(&mut self, writer: &mut Writer) -> bool {
        let Some(command) = self.command.take() else {
            return false;
        };
        let result = command(writer);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn answer(self: Box<Self>, failure: Option<&StoreError>) {
        let result = match (failure, self.result) {
            (Some(e), _) => Err(copy_error(e)),
            (None, Some(result)) => result,
            (None, None) => Err(StoreError::Internal(
                "the write command panicked and was rolled back".into(),
            )),
        };
        // The caller may have gone away; the write stands regardless.
        let _ = self.reply.send(result);
    }
}

/// The owner of the only connection that writes.
struct Writer {
    conn: Connection,
    catalog: Arc<Catalog>,
    lease_grace_ms: u64,
}

impl Writer {
    fn run(mut self, mut commands: mpsc::Receiver<Box<dyn Job>>, batch_max: usize) {
        let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(batch_max.min(WRITE_QUEUE_MAX));
        while let Some(first) = commands.blocking_recv() {
            batch.push(first);
            while batch.len() < batch_max {
                match commands.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let failure = self.commit_batch(&mut batch).err();
            if let Some(e) = &failure {
                tracing::warn!(error = %e, commands = batch.len(), "sqlite write batch failed");
            }
            for job in batch.drain(..) {
                job.answer(failure.as_ref());
            }
        }
        tracing::debug!("sqlite writer stopped: every store handle is gone");
    }

    /// Runs every job of the batch in one transaction, each in its own savepoint.
    fn commit_batch(&mut self, batch: &mut [Box<dyn Job>]) -> Result<()> {
        let result = self.try_commit_batch(batch);
        if result.is_err() && !self.conn.is_autocommit() {
            if let Err(e) = self.exec("ROLLBACK") {
                tracing::error!(error = %e, "roll back a failed sqlite write batch");
            }
        }
        result
    }

    fn try_commit_batch(&mut self, batch: &mut [Box<dyn Job>]) -> Result<()> {
        self.exec("BEGIN IMMEDIATE")?;
        for job in batch.iter_mut() {
            self.exec("SAVEPOINT command")?;
            let ok = catch_unwind(AssertUnwindSafe(|| job.run(self))).unwrap_or(false);
            if self.conn.is_autocommit() {
                // Some errors (a full disk, an I/O error) make SQLite roll
                // back the whole transaction, taking earlier commands with it.
                return Err(StoreError::Unavailable(
                    "sqlite rolled back the write transaction".into(),
                ));
            }
            if !ok {
                self.exec("ROLLBACK TO command")?;
            }
            self.exec("RELEASE command")?;
        }
        self.exec("COMMIT")
    }

    fn exec(&self, sql: &str) -> Result<()> {
        self.conn.prepare_cached(sql)?.execute([])?;
        Ok(())
    }

    fn ctx(&self, now_us: UnixMicros) -> Ctx {
        Ctx {
            now_us,
            jitter: fastrand::f64(),
            lease_grace_ms: self.lease_grace_ms,
        }
    }

    fn create(
        &mut self,
        pipeline: &Arc<Pipeline>,
        entity: NewEntity,
        now_us: UnixMicros,
    ) -> Result<IntakeOutcome> {
        if let Some(key) = &entity.idempotency_key {
            let existing: Option<Vec<u8>> = self
                .conn
                .prepare_cached(
                    "SELECT entity_id FROM idempotency WHERE tenant = ?1 AND type = ?2 AND key = ?3",
                )?
                .query_row(params![entity.tenant, entity.type_name, key], |r| r.get(0))
                .optional()?;
            if let Some(bytes) = existing {
                let id = entity_id(&bytes)?;
                let (record, extra) = read_entity(&self.conn, id)?.ok_or_else(|| {
                    StoreError::Internal(format!("idempotency key points at missing entity {id}"))
                })?;
                let payload = read_payload(&self.conn, extra.payload_id)?;
                return Ok(if payload == entity.payload {
                    IntakeOutcome::Replayed(record)
                } else {
                    IntakeOutcome::KeyReused { entity_id: id }
                });
            }
        }

        let state = EntityState::new(pipeline, now_us);
        let id = entity.id;
        self.conn
            .prepare_cached("INSERT INTO payloads (body) VALUES (?1)")?
            .execute([&entity.payload])?;
        let payload_id = self.conn.last_insert_rowid();
        let created = history::created(now_us);
        self.conn
            .prepare_cached(
                "INSERT INTO entities (id, tenant, type, version, status, degraded, created_at,
                                       updated_at, ready_at, next_seq, payload_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                id.as_bytes(),
                entity.tenant,
                entity.type_name,
                entity.version,
                state.status.as_str(),
                state.degraded,
                now_us,
                state.ready_at_us,
                to_i64(created.seq + 1, "next_seq")?,
                payload_id,
            ])?;
        {
            let mut insert = self.conn.prepare_cached(
                "INSERT INTO steps (entity_id, idx, name, critical, queue, status, attempts, epoch,
                                    due_at, last_error, output)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, NULL)",
            )?;
            for (i, (spec, s)) in pipeline.steps().iter().zip(&state.steps).enumerate() {
                insert.execute(params![
                    id.as_bytes(),
                    i as i64,
                    spec.name,
                    spec.critical,
                    queue_of(&spec.executor),
                    s.status.as_str(),
                    s.attempts,
                    to_i64(s.epoch, "epoch")?,
                    s.due_at_us,
                    s.last_error,
                ])?;
            }
        }
        if let Some(key) = &entity.idempotency_key {
            self.conn
                .prepare_cached(
                    "INSERT INTO idempotency (tenant, type, key, entity_id, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    entity.tenant,
                    entity.type_name,
                    key,
                    id.as_bytes(),
                    now_us
                ])?;
        }
        let record = EntityRecord {
            id,
            tenant: entity.tenant,
            type_name: entity.type_name,
            version: entity.version,
            status: state.status,
            degraded: state.degraded,
            created_at_us: now_us,
            updated_at_us: now_us,
            ready_at_us: state.ready_at_us,
            steps: pipeline
                .steps()
                .iter()
                .zip(state.steps)
                .map(|(spec, state)| StepRecord {
                    name: spec.name.clone(),
                    critical: spec.critical,
                    state,
                })
                .collect(),
        };
        self.insert_history(&record, &[created])?;
        Ok(IntakeOutcome::Created(record))
    }

    fn claim_due(&mut self, now_us: UnixMicros, limit: usize) -> Result<ClaimBatch> {
        let due = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT entity_id, idx FROM steps
                 WHERE queue = ?1 AND due_at IS NOT NULL AND due_at <= ?2
                 ORDER BY due_at LIMIT ?3",
            )?;
            let mut rows = stmt.query(params![
                HTTP_QUEUE,
                now_us,
                i64::try_from(limit).unwrap_or(i64::MAX)
            ])?;
            let mut due = Vec::new();
            while let Some(r) = rows.next()? {
                due.push((entity_id(&r.get::<_, Vec<u8>>(0)?)?, r.get::<_, i64>(1)?));
            }
            due
        };
        let mut attempts = Vec::new();
        for (id, steps) in group_by_entity(due) {
            let mut loaded = match self.load(id) {
                Ok(Some(loaded)) => loaded,
                Ok(None) => continue,
                Err(e @ StoreError::UnknownPipeline { .. }) => {
                    tracing::warn!(entity = %id, error = %e, "cannot schedule the steps of an entity");
                    continue;
                }
                Err(e) => return Err(e),
            };
            for step in steps {
                let Some(s) = usize::try_from(step)
                    .ok()
                    .and_then(|i| loaded.state.steps.get(i))
                else {
                    continue;
                };
                let step = step as usize;
                if s.status == StepStatus::Running {
                    let lost = Input::Lost {
                        step,
                        epoch: s.epoch,
                        reason: LostReason::LeaseExpired,
                    };
                    let _ = loaded.apply(lost, self.ctx(now_us));
                }
                // Refusals are expected (the step is waiting out a backoff
                // after losing its lease); the step stays for a later pass.
                if loaded
                    .apply(Input::Claim { step }, self.ctx(now_us))
                    .is_err()
                {
                    let s = &loaded.state.steps[step];
                    if s.due_at_us.is_some_and(|due| due <= now_us) {
                        // Consistent data never gets here; if it does, the
                        // step would hold back the queue, so say so.
                        tracing::warn!(entity = %id, step, status = s.status.as_str(), "a due step cannot be claimed");
                    }
                }
            }
            self.flush(&mut loaded, now_us)?;
            attempts.extend(self.take_attempts(&mut loaded)?);
        }
        let next_due_us = self
            .conn
            .prepare_cached(
                "SELECT due_at FROM steps WHERE queue = ?1 AND due_at IS NOT NULL
                 ORDER BY due_at LIMIT 1",
            )?
            .query_row([HTTP_QUEUE], |r| r.get(0))
            .optional()?;
        Ok(ClaimBatch {
            attempts,
            next_due_us,
        })
    }

    fn complete(
        &mut self,
        completions: Vec<Completion>,
        now_us: UnixMicros,
    ) -> Result<CompleteBatch> {
        let mut loaded: Vec<Loaded> = Vec::new();
        let mut slots: HashMap<EntityId, Option<usize>> = HashMap::new();
        let mut results = Vec::with_capacity(completions.len());
        for c in completions {
            let slot = match slots.get(&c.entity_id) {
                Some(&slot) => slot,
                None => {
                    let slot = match self.load(c.entity_id)? {
                        Some(l) => {
                            loaded.push(l);
                            Some(loaded.len() - 1)
                        }
                        None => None,
                    };
                    slots.insert(c.entity_id, slot);
                    slot
                }
            };
            let Some(slot) = slot else {
                results.push(CompletionResult::Stale);
                continue;
            };
            let ctx = self.ctx(now_us);
            let entity = &mut loaded[slot];
            let (input, output) = match c.outcome {
                Outcome::Succeeded { output } => (
                    Input::Succeeded {
                        step: c.step,
                        epoch: c.epoch,
                    },
                    Some(output),
                ),
                Outcome::Failed {
                    error,
                    retryable,
                    retry_after_ms,
                } => (
                    Input::Failed {
                        step: c.step,
                        epoch: c.epoch,
                        error,
                        retryable,
                        retry_after_ms,
                    },
                    None,
                ),
            };
            match entity.apply(input, ctx) {
                Ok(()) => {
                    if let Some(output) = output {
                        entity.outputs.push((c.step, output));
                    }
                    results.push(CompletionResult::Applied);
                }
                // Stale and NoSuchStep alike: the result does not belong to a live attempt.
                Err(_) => results.push(CompletionResult::Stale),
            }
        }
        let mut claimed = Vec::new();
        for mut entity in loaded {
            if entity.events.is_empty() {
                continue;
            }
            for step in 0..entity.state.steps.len() {
                let runnable = entity.state.steps[step].status == StepStatus::Queued
                    && queue_of(&entity.pipeline.step(step).executor) == HTTP_QUEUE;
                if runnable {
                    let _ = entity.apply(Input::Claim { step }, self.ctx(now_us));
                }
            }
            self.flush(&mut entity, now_us)?;
            claimed.extend(self.take_attempts(&mut entity)?);
        }
        Ok(CompleteBatch { results, claimed })
    }

    fn recover(&mut self, now_us: UnixMicros) -> Result<u64> {
        // Every running step has a lease expiry in due_at, so the partial
        // index holds them all; scanning it avoids reading settled steps.
        let running = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT entity_id, idx FROM steps INDEXED BY steps_due
                 WHERE due_at IS NOT NULL AND status = 'running'",
            )?;
            let mut rows = stmt.query([])?;
            let mut running = Vec::new();
            while let Some(r) = rows.next()? {
                running.push((entity_id(&r.get::<_, Vec<u8>>(0)?)?, r.get::<_, i64>(1)?));
            }
            running
        };
        let mut lost = 0;
        for (id, steps) in group_by_entity(running) {
            let Some(mut loaded) = self.load(id)? else {
                continue;
            };
            for step in steps {
                let Some(s) = usize::try_from(step)
                    .ok()
                    .and_then(|i| loaded.state.steps.get(i))
                else {
                    continue;
                };
                let input = Input::Lost {
                    step: step as usize,
                    epoch: s.epoch,
                    reason: LostReason::NodeRestarted,
                };
                if loaded.apply(input, self.ctx(now_us)).is_ok() {
                    lost += 1;
                }
            }
            self.flush(&mut loaded, now_us)?;
        }
        Ok(lost)
    }

    fn command(
        &mut self,
        tenant: &str,
        id: EntityId,
        input: Input,
        now_us: UnixMicros,
    ) -> Result<CommandOutcome> {
        let Some((record, extra)) = read_entity(&self.conn, id)? else {
            return Ok(CommandOutcome::NotFound);
        };
        if record.tenant != tenant {
            return Ok(CommandOutcome::NotFound);
        }
        let mut loaded = self.loaded(record, extra)?;
        match loaded.apply(input, self.ctx(now_us)) {
            Ok(()) => {
                self.flush(&mut loaded, now_us)?;
                Ok(CommandOutcome::Applied(loaded.record))
            }
            Err(Refusal::WrongStatus(status)) => Ok(CommandOutcome::Conflict(status)),
            Err(refusal) => Err(StoreError::Internal(format!(
                "entity {id}: unexpected refusal of an operator command: {refusal}"
            ))),
        }
    }

    fn load(&self, id: EntityId) -> Result<Option<Loaded>> {
        match read_entity(&self.conn, id)? {
            Some((record, extra)) => self.loaded(record, extra).map(Some),
            None => Ok(None),
        }
    }

    fn loaded(&self, record: EntityRecord, extra: RowExtra) -> Result<Loaded> {
        let pipeline = self
            .catalog
            .get(&record.type_name, record.version)
            .cloned()
            .ok_or_else(|| StoreError::UnknownPipeline {
                type_name: record.type_name.clone(),
                version: record.version,
            })?;
        let matches = pipeline.len() == record.steps.len()
            && pipeline
                .steps()
                .iter()
                .zip(&record.steps)
                .all(|(spec, s)| spec.name == s.name);
        if !matches {
            return Err(StoreError::Internal(format!(
                "entity {}: its step rows do not match pipeline {} version {}",
                record.id, record.type_name, record.version
            )));
        }
        Ok(Loaded {
            state: record.state(),
            record,
            extra,
            pipeline,
            events: Vec::new(),
            outputs: Vec::new(),
            claimed: Vec::new(),
        })
    }

    /// Writes what changed in `loaded` since it was read or last flushed:
    /// the changed step rows, the entity row, the history and the outbox.
    fn flush(&mut self, loaded: &mut Loaded, now_us: UnixMicros) -> Result<()> {
        if loaded.events.is_empty() {
            return Ok(());
        }
        let id = loaded.record.id;
        for (i, (stored, now)) in loaded
            .record
            .steps
            .iter()
            .zip(&loaded.state.steps)
            .enumerate()
        {
            let output = loaded.outputs.iter().find(|(step, _)| *step == i);
            if stored.state == *now && output.is_none() {
                continue;
            }
            // A step succeeds at most once per attempt series and keeps its
            // output afterwards, so the column is written only with a result.
            self.conn
                .prepare_cached(
                    "UPDATE steps SET status = ?3, attempts = ?4, epoch = ?5, due_at = ?6,
                                      last_error = ?7,
                                      output = CASE WHEN ?8 THEN ?9 ELSE output END
                     WHERE entity_id = ?1 AND idx = ?2",
                )?
                .execute(params![
                    id.as_bytes(),
                    i as i64,
                    now.status.as_str(),
                    now.attempts,
                    to_i64(now.epoch, "epoch")?,
                    now.due_at_us,
                    now.last_error,
                    output.is_some(),
                    output.and_then(|(_, o)| o.as_deref()),
                ])?;
        }
        let history = history::from_core(
            &loaded.pipeline,
            &loaded.events,
            now_us,
            loaded.extra.next_seq,
        );
        let next_seq = loaded.extra.next_seq + history.len() as u64;
        self.conn
            .prepare_cached(
                "UPDATE entities SET status = ?2, degraded = ?3, ready_at = ?4, updated_at = ?5,
                                     next_seq = ?6
                 WHERE id = ?1",
            )?
            .execute(params![
                id.as_bytes(),
                loaded.state.status.as_str(),
                loaded.state.degraded,
                loaded.state.ready_at_us,
                now_us,
                to_i64(next_seq, "next_seq")?,
            ])?;

        let record = &mut loaded.record;
        record.status = loaded.state.status;
        record.degraded = loaded.state.degraded;
        record.ready_at_us = loaded.state.ready_at_us;
        record.updated_at_us = now_us;
        for (stored, now) in record.steps.iter_mut().zip(&loaded.state.steps) {
            stored.state.clone_from(now);
        }
        loaded.extra.next_seq = next_seq;
        loaded.events.clear();
        loaded.outputs.clear();
        self.insert_history(&loaded.record, &history)
    }

    fn insert_history(&mut self, record: &EntityRecord, history: &[HistoryEvent]) -> Result<()> {
        let id = record.id;
        let mut insert_event = self.conn.prepare_cached(
            "INSERT INTO events (entity_id, seq, at, kind, step, attempt, detail)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for e in history {
            insert_event.execute(params![
                id.as_bytes(),
                to_i64(e.seq, "seq")?,
                e.at_us,
                e.kind,
                e.step,
                e.attempt,
                e.detail.to_string(),
            ])?;
        }
        let mut insert_outbox = self.conn.prepare_cached(
            "INSERT INTO outbox (entity_id, seq, at, kind, body) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for e in history.iter().filter(|e| e.is_status_change()) {
            let body = json!({
                "entity_id": id.to_string(),
                "tenant": record.tenant,
                "type": record.type_name,
                "version": record.version,
                "seq": e.seq,
                "at_us": e.at_us,
                "kind": e.kind,
                "detail": e.detail,
            });
            insert_outbox.execute(params![
                id.as_bytes(),
                to_i64(e.seq, "seq")?,
                e.at_us,
                e.kind,
                body.to_string(),
            ])?;
        }
        Ok(())
    }

    /// The attempts claimed in `loaded` since the last call; call after `flush`
    /// so that the outputs read back are the committed ones.
    fn take_attempts(&mut self, loaded: &mut Loaded) -> Result<Vec<Attempt>> {
        if loaded.claimed.is_empty() {
            return Ok(Vec::new());
        }
        let id = loaded.record.id;
        let payload = read_payload(&self.conn, loaded.extra.payload_id)?;
        let outputs = read_outputs(&self.conn, id)?;
        let mut attempts = Vec::with_capacity(loaded.claimed.len());
        for step in loaded.claimed.drain(..) {
            let s = &loaded.state.steps[step];
            let lease_expires_at_us = s.due_at_us.ok_or_else(|| {
                StoreError::Internal(format!("entity {id}: a claimed step has no lease expiry"))
            })?;
            attempts.push(Attempt {
                entity_id: id,
                type_name: loaded.record.type_name.clone(),
                version: loaded.record.version,
                step,
                step_name: loaded.record.steps[step].name.clone(),
                attempt: s.attempts,
                epoch: s.epoch,
                lease_expires_at_us,
                payload: payload.clone(),
                outputs: outputs.clone(),
            });
        }
        Ok(attempts)
    }
}

/// Groups `(entity, step)` pairs by entity, in the order entities first appear.
fn group_by_entity(pairs: Vec<(EntityId, i64)>) -> Vec<(EntityId, Vec<i64>)> {
    let mut groups: Vec<(EntityId, Vec<i64>)> = Vec::new();
    let mut index: HashMap<EntityId, usize> = HashMap::new();
    for (id, step) in pairs {
        match index.get(&id) {
            Some(&i) => groups[i].1.push(step),
            None => {
                index.insert(id, groups.len());
                groups.push((id, vec![step]));
            }
        }
    }
    groups
}

/// One entity loaded by the writer: the state the core works on, and what is
/// needed to write its changes back.
struct Loaded {
    /// The entity as last written.
    record: EntityRecord,
    extra: RowExtra,
    pipeline: Arc<Pipeline>,
    /// The working state; differs from `record` until `flush`.
    state: EntityState,
    /// Core events not yet written.
    events: Vec<Event>,
    /// Outputs of steps that succeeded since the last flush.
    outputs: Vec<(usize, Option<String>)>,
    /// Steps claimed since the last `take_attempts`.
    claimed: Vec<usize>,
}

impl Loaded {
    fn apply(&mut self, input: Input, ctx: Ctx) -> Result<(), Refusal> {
        let claim = match input {
            Input::Claim { step } => Some(step),
            _ => None,
        };
        let events = apply(&self.pipeline, &mut self.state, input, ctx)?;
        self.events.extend(events);
        if let Some(step) = claim {
            self.claimed.push(step);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::{catalog, T0};

    fn open(dir: &tempfile::TempDir) -> SqliteStore {
        SqliteStore::open(SqliteOptions::new(dir.path().join("ripen.db")), catalog()).expect("open")
    }

    fn entity() -> NewEntity {
        NewEntity {
            id: EntityId::new_v7(),
            tenant: crate::DEFAULT_TENANT.into(),
            type_name: "single".into(),
            version: 1,
            payload: "{}".into(),
            idempotency_key: None,
        }
    }

    fn count(conn: &Connection, table: &str) -> i64 {
        conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .expect("count")
    }

    #[tokio::test]
    async fn a_failing_command_rolls_back_only_itself() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ripen.db");
        let mut writer = Writer {
            conn: open_writer(&path).expect("open"),
            catalog: catalog(),
            lease_grace_ms: 0,
        };
        let pipeline = catalog().get("single", 1).cloned().expect("pipeline");
        let (first, second) = (entity(), entity());
        let (first_id, second_id) = (first.id, second.id);
        let (tx1, rx1) = oneshot::channel();
        let (tx2, rx2) = oneshot::channel();
        let (tx3, rx3) = oneshot::channel();
        let p1 = pipeline.clone();
        let mut batch: Vec<Box<dyn Job>> = vec![
            Box::new(Request {
                command: Some(move |w: &mut Writer| w.create(&p1, first, T0)),
                result: None,
                reply: tx1,
            }),
            Box::new(Request {
                command: Some(|w: &mut Writer| -> Result<()> {
                    w.exec("INSERT INTO payloads (body) VALUES ('doomed')")?;
                    Err(StoreError::Internal(
                        "the command fails after writing".into(),
                    ))
                }),
                result: None,
                reply: tx2,
            }),
            Box::new(Request {
                command: Some(move |w: &mut Writer| w.create(&pipeline, second, T0)),
                result: None,
                reply: tx3,
            }),
        ];
        writer.commit_batch(&mut batch).expect("the batch commits");
        for job in batch {
            job.answer(None);
        }
        assert!(matches!(
            rx1.await.expect("answer"),
            Ok(IntakeOutcome::Created(_))
        ));
        assert!(matches!(
            rx2.await.expect("answer"),
            Err(StoreError::Internal(_))
        ));
        assert!(matches!(
            rx3.await.expect("answer"),
            Ok(IntakeOutcome::Created(_))
        ));
        let conn = open_reader(&path).expect("reader");
        assert_eq!(
            count(&conn, "payloads"),
            2,
            "the failed command left nothing behind"
        );
        for id in [first_id, second_id] {
            assert!(read_entity(&conn, id).expect("read").is_some());
        }
    }

    #[tokio::test]
    async fn a_panicking_command_is_an_error_and_the_writer_lives_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open(&dir);
        let err = store
            .write(|w| -> Result<()> {
                w.exec("INSERT INTO payloads (body) VALUES ('doomed')")?;
                panic!("a bug in a command");
            })
            .await
            .expect_err("the command panicked");
        assert!(matches!(err, StoreError::Internal(_)), "{err:?}");
        let created = store
            .create(entity(), T0)
            .await
            .expect("create after the panic");
        assert!(matches!(created, IntakeOutcome::Created(_)));
        let payloads = store
            .read(|conn| Ok(count(conn, "payloads")))
            .await
            .expect("read");
        assert_eq!(payloads, 1, "the panicking command was rolled back");
    }

    #[tokio::test]
    async fn a_stopped_writer_fails_callers_instead_of_hanging() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = open(&dir);
        let (closed, receiver) = mpsc::channel(1);
        drop(receiver);
        store.writer = closed;
        let err = store.create(entity(), T0).await.expect_err("no writer");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(matches!(
            store.ping().await,
            Err(StoreError::Unavailable(_))
        ));

        // A writer that drops a queued command without answering (it died
        // mid-batch) also yields an error rather than a hang.
        let (tx, mut rx) = mpsc::channel::<Box<dyn Job>>(1);
        store.writer = tx;
        let dropper = std::thread::spawn(move || drop(rx.blocking_recv()));
        let err = store.recover(T0).await.expect_err("dropped command");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        dropper.join().expect("join");
    }

    #[tokio::test]
    async fn the_outbox_gets_one_row_per_status_change() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open(&dir);
        let e = entity();
        let id = e.id;
        store.create(e, T0).await.expect("create");
        store.create(entity(), T0).await.expect("create");
        store.claim_due(T0, 10).await.expect("claim");
        store
            .cancel(crate::DEFAULT_TENANT, id, T0 + 1)
            .await
            .expect("cancel");
        let rows = store
            .read(move |conn| {
                let mut stmt =
                    conn.prepare("SELECT entity_id, seq, kind, body FROM outbox ORDER BY id")?;
                let rows = stmt.query_map([], |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                })?;
                Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
            })
            .await
            .expect("read outbox");
        let kinds: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
        assert_eq!(kinds, vec!["created", "created", "status_changed"]);
        let (entity_id, seq, _, body) = &rows[2];
        assert_eq!(entity_id.as_slice(), id.as_bytes());
        let body: serde_json::Value = serde_json::from_str(body).expect("json body");
        assert_eq!(body["entity_id"], id.to_string());
        assert_eq!(body["seq"], *seq);
        assert_eq!(body["type"], "single");
        assert_eq!(
            body["detail"],
            json!({"from": "pending", "to": "cancelled"})
        );
        let history = store
            .events(crate::DEFAULT_TENANT, id, 0, 100)
            .await
            .expect("events")
            .expect("found");
        let change = history
            .iter()
            .find(|e| e.kind == "status_changed")
            .expect("change");
        assert_eq!(
            change.seq as i64, *seq,
            "the outbox row carries the history seq"
        );
    }

    #[tokio::test]
    async fn pragmas_make_every_commit_durable() {
        let dir = tempfile::tempdir().expect("temp dir");
        let conn = open_writer(&dir.path().join("ripen.db")).expect("open");
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .expect("mode");
        let sync: i64 = conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .expect("sync");
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("version");
        assert_eq!((mode.as_str(), sync, version), ("wal", 2, SCHEMA_VERSION));
    }
}
