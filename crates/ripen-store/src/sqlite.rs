//! The SQLite backend: one database file in WAL mode, one writer thread that
//! group-commits, and a small pool of read-only connections.
//!
//! Every write (create, claim, complete, recover, cancel, retry) is a command
//! sent to the writer thread over a bounded channel. The thread takes the
//! first queued command, drains whatever else is queued (up to
//! [`SqliteOptions::batch_max`]) and runs the whole batch in one
//! `BEGIN IMMEDIATE ... COMMIT` transaction. Callers are answered only after
//! `COMMIT` returned, so one fsync acknowledges many requests and none is
//! acknowledged before it is durable (`synchronous=FULL`).
//!
//! The writer is the one serial stage of the server, so it does as little as
//! it can per command:
//! - the creates of a batch are written together, a few multi-row `INSERT`s
//!   per table, from rows their callers prepared (record, JSON of the
//!   history and outbox rows) before queueing them; the history rows of
//!   claims and completions are gathered the same way;
//! - commands run back to back, without a savepoint each (a savepoint copies
//!   every page a command touches first). When one fails, the batch is rolled
//!   back and run again with a savepoint per command, so that the failing
//!   one rolls back alone;
//! - a checkpointer thread with its own connection copies the log into the
//!   database in the background, so that commits do not wait for
//!   checkpoints; the writer only finishes one now and then so that the log
//!   starts over (see `Writer::after_commit`);
//! - the answers of a batch go to one relay task on the runtime, which wakes
//!   the callers.
//!
//! Reads run on read-only connections through `spawn_blocking`; WAL lets them
//! proceed while the writer commits, and each read that spans several
//! statements runs in one read transaction so it sees one snapshot.
//!
//! Architecture invariant: only the writer thread writes, and every command
//! that changes an entity writes its state, its history events and its
//! outbox rows in the same transaction.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ripen_core::{EntityStatus, Input, Pipeline, StepState, UnixMicros};
use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};
use rusqlite::{params, params_from_iter, Connection, ErrorCode, OpenFlags, OptionalExtension};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::decode::{entity_id, entity_status, step_status, to_i64, to_u32, to_u64};
use crate::history::HistoryEvent;
use crate::metrics::CommitMetrics;
use crate::working::{self, Decider, Jitter, NewRows, Rows, Stored, Working};
use crate::{
    Attempt, ChangeWatcher, ChangeWatchers, Changes, Claim, ClaimBatch, CommandOutcome,
    CompleteBatch, Completion, Counts, Delivery, DeliveryClaim, DeliveryCounts, DeliveryQuery,
    DeliveryResult, EntityData, EntityId, EntityRecord, FanOut, Heartbeat, IntakeOutcome,
    ListQuery, NewEntity, OutboxEntry, RedeliverOutcome, Result, StepRecord, Store, StoreError,
    Subscription, WorkWatcher, WorkWatchers,
};

mod deps;
mod keys;
mod notify;
mod registry;
mod retention;

/// The columns of one history row, in the order batched inserts bind them.
const EVENT_COLUMNS: &[&str] = &[
    "entity_id",
    "seq",
    "at",
    "kind",
    "step",
    "attempt",
    "detail",
];

/// The columns of one outbox row, in the order batched inserts bind them.
const OUTBOX_COLUMNS: &[&str] = &["entity_id", "seq"];

/// The columns of one due row, in the order batched inserts bind them.
const DUE_COLUMNS: &[&str] = &["queue", "due_at", "entity_id"];

/// The columns of a new entity row, in the order batched inserts bind them.
const ENTITY_COLUMNS: &[&str] = &[
    "id",
    "tenant",
    "type",
    "version",
    "status",
    "degraded",
    "created_at",
    "updated_at",
    "ready_at",
    "next_seq",
    "payload_id",
    "steps",
    "deps",
];

/// The schema this build writes, kept in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 7;
/// Write commands waiting for the writer thread; senders wait beyond this.
const WRITE_QUEUE_MAX: usize = 4_096;
/// How long a connection waits for a lock before reporting the store busy.
const BUSY_TIMEOUT_MS: u64 = 5_000;
/// Prepared statements kept per connection; the writer's multi-row inserts
/// use up to seven shapes per table.
const STATEMENT_CACHE_MAX: usize = 128;
/// The most rows one multi-row `INSERT` writes; a power of two.
const INSERT_ROWS_MAX: usize = 64;
/// Page cache of the writer connection.
const WRITER_CACHE_KIB: i64 = 32 * 1_024;
/// Page cache of each read connection.
const READER_CACHE_KIB: i64 = 8 * 1_024;
/// Page cache of the checkpointer's connection, which reads little.
const CHECKPOINTER_CACHE_KIB: i64 = 1_024;
/// The least time between two background checkpoints: short, so that
/// little is left to copy when the writer must finish a checkpoint itself.
const CHECKPOINT_INTERVAL_MS: u64 = 10;
/// Log frames (pages) past which the writer finishes a checkpoint itself so
/// that the log starts over: about 128 MiB with 4 KiB pages, one to a few
/// seconds of writes. Each such checkpoint holds commits back for a
/// millisecond or two, so it must be rare: at 10,000 small commits a second a
/// limit of 4,096 frames stalled the writer every 130 ms, and those stalls
/// were the p99 of intake. When the server is not busy, the checkpointer
/// catches up between commits and the log starts over without it.
const WAL_RESTART_FRAMES: i64 = 32_768;
/// SQLite's own checkpoint on commit, a backstop should the checkpointer
/// stop; above [`WAL_RESTART_FRAMES`], so it never runs otherwise.
const WAL_AUTOCHECKPOINT_FRAMES: i64 = 2 * WAL_RESTART_FRAMES;
/// The log file is cut back to this size when it starts over; above the
/// size it reaches before a restart, so that its blocks are reused rather
/// than freed and allocated again.
const JOURNAL_SIZE_LIMIT_BYTES: i64 = 160 * 1_024 * 1_024;

/// The schema of version 2, the starting point of the upgrade to version 3.
const SCHEMA_V2: &str = "
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
CREATE INDEX IF NOT EXISTS entities_by_type_status ON entities (tenant, type, status, id);
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
CREATE INDEX IF NOT EXISTS steps_due ON steps (queue, due_at, status) WHERE due_at IS NOT NULL;
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
    id INTEGER PRIMARY KEY,
    entity_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL
);
";

/// The schema of version 3. An entity is one row: its steps' states (and
/// their small outputs) live in its `steps` column, in the compact form of
/// `encode_steps`. The scheduler's timers are one `due` row per entity and
/// queue, holding the earliest due time of that entity's steps in that
/// queue. The outbox holds pointers to history events.
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
    payload_id INTEGER NOT NULL,
    steps TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entities_by_type_status ON entities (tenant, type, status, id);
CREATE INDEX IF NOT EXISTS entities_by_status ON entities (tenant, status, id);
CREATE TABLE IF NOT EXISTS due (
    queue TEXT NOT NULL,
    due_at INTEGER NOT NULL,
    entity_id BLOB NOT NULL,
    PRIMARY KEY (queue, due_at, entity_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outputs (
    entity_id BLOB NOT NULL,
    idx INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (entity_id, idx)
) WITHOUT ROWID;
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
    id INTEGER PRIMARY KEY,
    entity_id BLOB NOT NULL,
    seq INTEGER NOT NULL
);
";

/// From version 2 to 3: step rows fold into their entity's `steps` column
/// (outputs go to `outputs`, marked as stored there), the partial index of
/// due steps becomes the `due` table, and outbox rows keep only their
/// pointer to the history event.
const UPGRADE_V2_TO_V3: &str = "
CREATE TABLE IF NOT EXISTS due (
    queue TEXT NOT NULL,
    due_at INTEGER NOT NULL,
    entity_id BLOB NOT NULL,
    PRIMARY KEY (queue, due_at, entity_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outputs (
    entity_id BLOB NOT NULL,
    idx INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (entity_id, idx)
) WITHOUT ROWID;
ALTER TABLE entities ADD COLUMN steps TEXT NOT NULL DEFAULT '[]';
UPDATE entities SET steps = (
    SELECT json_group_array(json_array(name, critical, status, attempts, epoch, due_at,
                                       last_error, CASE WHEN output IS NULL THEN 0 ELSE 2 END,
                                       NULL))
    FROM (SELECT * FROM steps WHERE steps.entity_id = entities.id ORDER BY idx)
);
INSERT INTO outputs (entity_id, idx, body)
    SELECT entity_id, idx, output FROM steps WHERE output IS NOT NULL;
INSERT INTO due (queue, due_at, entity_id)
    SELECT queue, MIN(due_at), entity_id FROM steps WHERE due_at IS NOT NULL
    GROUP BY entity_id, queue;
DROP INDEX IF EXISTS steps_due;
DROP TABLE steps;
ALTER TABLE outbox RENAME TO outbox_v2;
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY,
    entity_id BLOB NOT NULL,
    seq INTEGER NOT NULL
);
INSERT INTO outbox (id, entity_id, seq) SELECT id, entity_id, seq FROM outbox_v2;
DROP TABLE outbox_v2;
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
    /// Where backoff jitter comes from.
    pub jitter: Jitter,
    /// Submissions waiting for the writer (queued or in its batch) from
    /// which `create` answers [`StoreError::Overloaded`] at once.
    pub write_queue_max: usize,
}

impl SqliteOptions {
    pub fn new(path: impl Into<PathBuf>) -> SqliteOptions {
        SqliteOptions {
            path: path.into(),
            read_connections: 4,
            batch_max: 1_024,
            lease_grace_ms: 5_000,
            jitter: Jitter::random(),
            write_queue_max: WRITE_QUEUE_MAX,
        }
    }
}

/// The embedded store: one SQLite file. See the module documentation.
pub struct SqliteStore {
    writer: mpsc::Sender<Box<dyn Job>>,
    readers: Arc<Readers>,
    decider: Arc<Decider>,
    watchers: Arc<WorkWatchers>,
    changes: Arc<ChangeWatchers>,
    commits: CommitMetrics,
    /// Submissions sent to the writer and not answered yet.
    creates_waiting: Arc<std::sync::atomic::AtomicUsize>,
    write_queue_max: usize,
}

/// One submission counted in [`SqliteStore::creates_waiting`] until dropped.
struct Waiting(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl SqliteStore {
    /// Tells the change watchers that keys changed: this store's only node
    /// forgets what it remembers of them at once.
    fn keys_changed(&self) {
        self.changes.tell(&Changes {
            entities: Some(&[]),
            outbox_written: false,
            sequenced: false,
            keys: true,
        });
    }
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
    pub fn open(
        opts: SqliteOptions,
        pipelines: impl Into<crate::Pipelines>,
    ) -> Result<SqliteStore, StoreError> {
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
        let checkpointer = Checkpointer::start(&opts.path)?;
        // Answers go back through one task on the caller's runtime, when
        // there is one: see `Writer::run`.
        let relay = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            let (relay, batches) = mpsc::unbounded_channel();
            runtime.spawn(relay_answers(batches));
            relay
        });
        let decider = Arc::new(Decider::new(pipelines, opts.lease_grace_ms, opts.jitter));
        let watchers = Arc::new(WorkWatchers::default());
        let changes = Arc::new(ChangeWatchers::default());
        let commits = CommitMetrics::default();
        let writer = Writer {
            relay,
            conn,
            decider: decider.clone(),
            checkpointer: Some(checkpointer),
            sql_cache: HashMap::new(),
            woken: Vec::new(),
            watchers: watchers.clone(),
            changed: Vec::new(),
            outbox_written: false,
            changes: changes.clone(),
            commits: Some(commits.clone()),
        };
        let batch_max = opts.batch_max.max(1);
        std::thread::Builder::new()
            .name("ripen-sqlite-writer".into())
            .spawn(move || writer.run(rx, batch_max))
            .map_err(|e| StoreError::Unavailable(format!("start the sqlite writer thread: {e}")))?;
        Ok(SqliteStore {
            writer: tx,
            readers,
            decider,
            watchers,
            changes,
            commits,
            creates_waiting: Arc::default(),
            write_queue_max: opts.write_queue_max.max(1),
        })
    }

    /// Runs `command` on the writer thread and answers once its transaction
    /// has committed.
    async fn write<T, F>(&self, command: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Writer) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Box::new(Request {
            command,
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
        let waiting = self
            .creates_waiting
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _waiting = Waiting(self.creates_waiting.clone());
        if waiting >= self.write_queue_max {
            return Err(StoreError::Overloaded(format!(
                "{waiting} submissions already wait for the sqlite writer, the most it queues"
            )));
        }
        let pipeline = self.decider.pipeline(&entity.type_name, entity.version)?;
        // Everything that does not need the database is prepared here, on
        // the caller's task, so that the one writer thread only binds values.
        let prepared = Prepared::new(&pipeline, &entity, now_us);
        let (reply, answer) = oneshot::channel();
        let job = Box::new(CreateRequest {
            entity,
            prepared,
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

    async fn claim_due(&self, claim: Claim<'_>, now_us: UnixMicros) -> Result<ClaimBatch> {
        let queue = claim.queue.to_owned();
        let holder = claim.holder.map(str::to_owned);
        let (limit, expire_only) = (claim.limit, claim.expire_only);
        self.write(move |w| {
            let claim = Claim {
                queue: &queue,
                limit,
                holder: holder.as_deref(),
                expire_only,
            };
            w.claim_due(&claim, now_us)
        })
        .await
    }

    async fn heartbeat(
        &self,
        beats: Vec<Heartbeat>,
        now_us: UnixMicros,
    ) -> Result<Vec<Option<UnixMicros>>> {
        if beats.is_empty() {
            return Ok(Vec::new());
        }
        self.write(move |w| w.heartbeat(&beats, now_us)).await
    }

    async fn complete(
        &self,
        completions: Vec<Completion>,
        claim_queue: Option<&str>,
        now_us: UnixMicros,
    ) -> Result<CompleteBatch> {
        if completions.is_empty() {
            return Ok(CompleteBatch::default());
        }
        let claim_queue = claim_queue.map(str::to_owned);
        self.write(move |w| w.complete(&completions, claim_queue.as_deref(), now_us))
            .await
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
        self.write(move |w| deps::retry(w, &tenant, id, now_us))
            .await
    }

    async fn get(&self, tenant: &str, id: EntityId) -> Result<Option<EntityRecord>> {
        let tenant = tenant.to_owned();
        self.read(move |conn| {
            let tx = conn.unchecked_transaction()?;
            let found = read_entity(&tx, id)?.filter(|s| s.record.tenant == tenant);
            tx.commit()?;
            Ok(found.map(|s| s.record))
        })
        .await
    }

    async fn get_data(&self, tenant: &str, id: EntityId) -> Result<Option<EntityData>> {
        let tenant = tenant.to_owned();
        self.read(move |conn| {
            let tx = conn.unchecked_transaction()?;
            let Some(stored) = read_entity(&tx, id)?.filter(|s| s.record.tenant == tenant) else {
                return Ok(None);
            };
            let payload = read_payload(&tx, &stored)?;
            tx.commit()?;
            let outputs = stored.succeeded_outputs();
            Ok(Some(EntityData {
                record: stored.record,
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
            let tx = conn.unchecked_transaction()?;
            if let Some(key) = &query.key {
                // A key names at most one entity of its type: one lookup,
                // then the other filters on that entity.
                let Some(type_name) = &query.type_name else {
                    return Ok(Vec::new());
                };
                let id: Option<Vec<u8>> = tx
                    .prepare_cached(
                        "SELECT entity_id FROM idempotency
                         WHERE tenant = ?1 AND type = ?2 AND key = ?3",
                    )?
                    .query_row(params![tenant, type_name, key], |r| r.get(0))
                    .optional()?;
                let found = match id {
                    Some(id) => read_entity(&tx, entity_id(&id)?)?
                        .map(|s| s.record)
                        .filter(|r| r.tenant == tenant && query.matches(r)),
                    None => None,
                };
                tx.commit()?;
                return Ok(found.into_iter().collect());
            }
            // Every query walks index ranges in id order and stops after
            // `limit` rows, however many entities are settled: one range of
            // (tenant, status, id) or (tenant, type, status, id) when the
            // status is given, else the ranges of the four statuses, merged.
            // The creation times bound the ranges (ids are UUIDv7); only
            // `degraded` is checked row by row.
            let statuses: Vec<EntityStatus> = match query.status {
                Some(status) => vec![status],
                None => EntityStatus::ALL.to_vec(),
            };
            let limit = query.limit as usize;
            let (below, from) = (query.id_below(), query.id_from());
            let mut ids = Vec::new();
            for status in statuses {
                let mut sql = String::from("SELECT id FROM entities WHERE tenant = ?1");
                let mut args: Vec<SqlValue> = vec![SqlValue::Text(tenant.clone())];
                if let Some(type_name) = &query.type_name {
                    args.push(SqlValue::Text(type_name.clone()));
                    sql.push_str(&format!(" AND type = ?{}", args.len()));
                }
                args.push(SqlValue::Text(status.as_str().to_owned()));
                sql.push_str(&format!(" AND status = ?{}", args.len()));
                if let Some(below) = below {
                    args.push(SqlValue::Blob(below.as_bytes().to_vec()));
                    sql.push_str(&format!(" AND id < ?{}", args.len()));
                }
                if let Some(from) = from {
                    args.push(SqlValue::Blob(from.as_bytes().to_vec()));
                    sql.push_str(&format!(" AND id >= ?{}", args.len()));
                }
                if let Some(degraded) = query.degraded {
                    args.push(SqlValue::Integer(i64::from(degraded)));
                    sql.push_str(&format!(" AND degraded = ?{}", args.len()));
                }
                args.push(SqlValue::Integer(i64::from(query.limit)));
                sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", args.len()));
                let mut stmt = tx.prepare_cached(&sql)?;
                let mut rows = stmt.query(params_from_iter(args))?;
                while let Some(row) = rows.next()? {
                    ids.push(entity_id(&row.get::<_, Vec<u8>>(0)?)?);
                }
            }
            // Ids sort as their bytes do, as SQLite compares the blobs.
            ids.sort_unstable_by(|a, b| b.cmp(a));
            ids.truncate(limit);
            let mut records = Vec::with_capacity(ids.len());
            for id in ids {
                // The row was seen in this snapshot, so it is still there.
                if let Some(stored) = read_entity(&tx, id)? {
                    records.push(stored.record);
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

    async fn outbox(&self, after_pos: u64, limit: u32) -> Result<Vec<OutboxEntry>> {
        self.read(move |conn| notify::read_outbox(conn, after_pos, limit))
            .await
    }

    async fn outbox_head(&self) -> Result<u64> {
        self.read(notify::outbox_head).await
    }

    async fn resolve_dependencies(&self, now_us: UnixMicros) -> Result<crate::deps::Resolved> {
        if let Some(idle) = self.read(deps::idle).await? {
            return Ok(idle);
        }
        self.write(move |w| deps::resolve(w, now_us)).await
    }

    async fn fan_out(&self, limit: u32, now_us: UnixMicros) -> Result<FanOut> {
        self.write(move |w| notify::fan_out(&w.conn, limit, now_us))
            .await
    }

    async fn prune(&self, prune: crate::Prune, now_us: UnixMicros) -> Result<crate::Pruned> {
        self.write(move |w| retention::prune(&w.conn, &prune, now_us))
            .await
    }

    async fn stats(&self) -> Result<crate::StoreStats> {
        self.read(retention::stats).await
    }

    async fn payloads_kept(&self, ids: Vec<EntityId>) -> Result<Vec<EntityId>> {
        self.read(move |conn| retention::payloads_kept(conn, &ids))
            .await
    }

    async fn prune_outbox(&self, before_us: UnixMicros, limit: u32) -> Result<u64> {
        self.write(move |w| notify::prune(&w.conn, before_us, limit))
            .await
    }

    async fn put_subscription(&self, sub: Subscription) -> Result<Subscription> {
        self.write(move |w| notify::put_subscription(&w.conn, &sub))
            .await
    }

    async fn subscriptions(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<(Subscription, DeliveryCounts)>> {
        let tenant = tenant.map(str::to_owned);
        self.read(move |conn| notify::subscriptions(conn, tenant.as_deref()))
            .await
    }

    async fn subscription_list(&self) -> Result<Vec<Subscription>> {
        self.read(notify::subscription_list).await
    }

    async fn delete_subscription(&self, tenant: &str, id: &str) -> Result<bool> {
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
        self.write(move |w| notify::delete_subscription(&w.conn, &tenant, &id))
            .await
    }

    async fn claim_deliveries(
        &self,
        claim: DeliveryClaim,
        now_us: UnixMicros,
    ) -> Result<Vec<Delivery>> {
        self.write(move |w| notify::claim_deliveries(&w.conn, &claim, now_us))
            .await
    }

    async fn finish_deliveries(
        &self,
        results: Vec<DeliveryResult>,
        now_us: UnixMicros,
    ) -> Result<()> {
        self.write(move |w| notify::finish_deliveries(&w.conn, &results, now_us))
            .await
    }

    async fn deliveries(
        &self,
        subscription_id: &str,
        query: DeliveryQuery,
    ) -> Result<Vec<Delivery>> {
        let id = subscription_id.to_owned();
        self.read(move |conn| notify::deliveries(conn, &id, &query))
            .await
    }

    async fn redeliver(
        &self,
        tenant: &str,
        delivery_id: u64,
        now_us: UnixMicros,
    ) -> Result<RedeliverOutcome> {
        let tenant = tenant.to_owned();
        self.write(move |w| notify::redeliver(&w.conn, &tenant, delivery_id, now_us))
            .await
    }

    async fn register_type(
        &self,
        version: crate::NewTypeVersion,
        now_us: UnixMicros,
    ) -> Result<crate::Registered> {
        self.write(move |w| registry::register(&w.conn, &version, now_us))
            .await
    }

    async fn type_heads(&self) -> Result<Vec<crate::TypeHead>> {
        self.read(registry::type_heads).await
    }

    async fn type_versions(&self, type_name: Option<&str>) -> Result<Vec<crate::TypeVersion>> {
        let type_name = type_name.map(str::to_owned);
        self.read(move |conn| registry::type_versions(conn, type_name.as_deref()))
            .await
    }

    async fn live_entities(&self, tenant: &str, type_name: &str) -> Result<Vec<(u32, u64)>> {
        let (tenant, type_name) = (tenant.to_owned(), type_name.to_owned());
        self.read(move |conn| registry::live_entities(conn, &tenant, &type_name))
            .await
    }

    async fn put_key(&self, key: crate::ApiKey) -> Result<()> {
        self.write(move |w| keys::put(&w.conn, &key)).await?;
        self.keys_changed();
        Ok(())
    }

    async fn reseal(&self, values: Vec<crate::Reseal>) -> Result<u64> {
        self.write(move |w| registry::reseal(&w.conn, &values))
            .await
    }

    async fn key_by_hash(&self, hash: &str) -> Result<Option<crate::ApiKey>> {
        let hash = hash.to_owned();
        self.read(move |conn| keys::by_hash(conn, &hash)).await
    }

    async fn keys(&self, tenant: Option<&str>) -> Result<Vec<crate::ApiKey>> {
        let tenant = tenant.map(str::to_owned);
        self.read(move |conn| keys::list(conn, tenant.as_deref()))
            .await
    }

    async fn revoke_key(
        &self,
        tenant: Option<&str>,
        id: &str,
        now_us: UnixMicros,
    ) -> Result<Option<crate::ApiKey>> {
        let (tenant, id) = (tenant.map(str::to_owned), id.to_owned());
        let key = self
            .write(move |w| keys::revoke(&w.conn, tenant.as_deref(), &id, now_us))
            .await?;
        self.keys_changed();
        Ok(key)
    }

    async fn any_keys(&self) -> Result<bool> {
        self.read(keys::any).await
    }

    async fn fail_unrunnable(
        &self,
        ids: Vec<EntityId>,
        now_us: UnixMicros,
    ) -> Result<Vec<EntityRecord>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.write(move |w| registry::fail_unrunnable(w, &ids, now_us))
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

    fn stale_completions(&self) -> u64 {
        self.decider.stale_completions()
    }

    fn register_metrics(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        self.decider.metrics().register(registry)?;
        self.commits.register(registry)
    }

    async fn counts(&self, now_us: UnixMicros) -> Result<Counts> {
        self.read(move |conn| {
            let mut counts = Counts::default();
            let mut stmt = conn.prepare_cached(
                "SELECT tenant, type, status, COUNT(*) FROM entities GROUP BY tenant, type, status",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let status: String = r.get(2)?;
                let n: i64 = r.get(3)?;
                counts.add_entities(r.get(0)?, r.get(1)?, entity_status(&status)?, n);
            }
            let mut stmt = conn.prepare_cached(
                "SELECT queue, COUNT(*) FROM due WHERE due_at <= ?1 GROUP BY queue",
            )?;
            let mut rows = stmt.query([now_us])?;
            while let Some(r) = rows.next()? {
                counts.due.push((r.get(0)?, to_u64(r.get(1)?, "count")?));
            }
            Ok(counts)
        })
        .await
    }

    fn watch_work(&self, watcher: WorkWatcher) {
        self.watchers.add(watcher);
    }

    fn watch_changes(&self, watcher: ChangeWatcher) {
        self.changes.add(watcher);
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
    // A new database gives the pages the pruner frees back to the file
    // system a pass at a time; on an existing one this changes nothing
    // (it keeps reusing its free pages, see docs/retention.md).
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
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
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_FRAMES)?;
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT_BYTES)?;
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
    // Version 1 numbered the outbox with AUTOINCREMENT, which updates
    // `sqlite_sequence` on every insert. Ids now come from the largest id
    // plus one: they still only grow as long as the newest row is kept, so
    // whatever prunes delivered rows keeps the newest one.
    //
    // Version 1 also listed a type's entities of one status through
    // (tenant, type, id) or (tenant, status, id), either of which walks the
    // entities of every other status or type: with many settled entities, a
    // page of the few pending ones of a type took seconds. Version 2 indexes
    // (tenant, type, status, id) instead, and lists a whole type, or a whole
    // tenant, by merging the ranges of its four statuses; so it needs no
    // (tenant, id) index, one fewer to write per entity. Its `steps_due`
    // index also holds the status, so that recovery finds the running steps
    // in the index alone.
    let upgrade = if version == 1 {
        "ALTER TABLE outbox RENAME TO outbox_v1;
         DROP INDEX IF EXISTS entities_by_tenant;
         DROP INDEX IF EXISTS entities_by_type;
         DROP INDEX IF EXISTS steps_due;"
    } else {
        ""
    };
    let copy = if version == 1 {
        "INSERT INTO outbox (id, entity_id, seq, at, kind, body)
             SELECT id, entity_id, seq, at, kind, body FROM outbox_v1;
         DROP TABLE outbox_v1;"
    } else {
        ""
    };
    // A current schema is left alone: no statement takes a lock.
    // Version 4 adds the notification tables (subscriptions, deliveries,
    // the fan-out's cursor).
    // Version 5 adds entity dependencies (the `deps` column, the
    // `dependencies` index, the resolver's cursor) and the type registry.
    // Version 6 adds API keys.
    // Version 7 adds retention: `payload_pruned_at` and the pruner's indexes.
    let notify = notify::SCHEMA;
    let v5 = format!("{} {}", deps::UPGRADE_TO_V5, registry::SCHEMA);
    let v6 = format!("{} {}", keys::SCHEMA, retention::SCHEMA);
    let steps = match version {
        SCHEMA_VERSION => return Ok(()),
        0 => format!("{SCHEMA} {notify} {v5} {v6}"),
        3 => format!("{notify} {v5} {v6}"),
        4 => format!("{v5} {v6}"),
        5 => v6,
        6 => retention::SCHEMA.to_owned(),
        _ => format!("{upgrade} {SCHEMA_V2} {copy} {UPGRADE_V2_TO_V3} {notify} {v5} {v6}"),
    };
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE; {steps} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
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

/// The background checkpointer, as the writer sees it.
struct Checkpointer {
    /// Frames in the log at the last checkpoint; the writer resets it to zero
    /// after it finished one itself.
    wal_frames: Arc<AtomicI64>,
    /// Wakes the checkpointer thread; it ends once this is dropped.
    wake: std::sync::mpsc::SyncSender<()>,
}

impl Checkpointer {
    /// Starts the checkpointer thread on its own connection.
    fn start(path: &Path) -> Result<Checkpointer> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )
        .map_err(|e| {
            StoreError::Unavailable(format!("open {} to checkpoint: {e}", path.display()))
        })?;
        conn.pragma_update(None, "cache_size", -CHECKPOINTER_CACHE_KIB)?;
        let wal_frames = Arc::new(AtomicI64::new(0));
        let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
        let frames = wal_frames.clone();
        std::thread::Builder::new()
            .name("ripen-sqlite-ckpt".into())
            .spawn(move || {
                // Every wake-up means "there were commits"; one checkpoint
                // serves all that queued up meanwhile.
                while woken.recv().is_ok() {
                    match checkpoint(&conn) {
                        Ok(n) => frames.store(n, AtomicOrdering::Relaxed),
                        Err(e) => tracing::warn!(error = %e, "checkpoint the sqlite log in the background"),
                    }
                    std::thread::sleep(Duration::from_millis(CHECKPOINT_INTERVAL_MS));
                }
            })
            .map_err(|e| StoreError::Unavailable(format!("start the sqlite checkpointer thread: {e}")))?;
        Ok(Checkpointer { wal_frames, wake })
    }

    fn wake(&self) {
        // A full channel means a wake-up is already pending.
        let _ = self.wake.try_send(());
    }
}

/// A passive checkpoint: copies what it can of the log into the database
/// without waiting for anyone, and returns the frames in the log.
fn checkpoint(conn: &Connection) -> Result<i64> {
    let (_busy, log_frames, _copied): (i64, i64, i64) = conn
        .prepare_cached("PRAGMA wal_checkpoint(PASSIVE)")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(log_frames)
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

/// Reads one entity with its steps and their outputs; `extra` is the id of
/// its payload row.
fn read_entity(conn: &Connection, id: EntityId) -> Result<Option<Stored<i64>>> {
    let row = conn
        .prepare_cached(
            "SELECT tenant, type, version, status, degraded, created_at, updated_at, ready_at,
                    next_seq, payload_id, steps, deps, payload_pruned_at
             FROM entities WHERE id = ?1",
        )?
        .query_row([id.as_bytes()], |r| {
            Ok((
                (
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, bool>(4)?,
                ),
                (
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, Option<i64>>(7)?,
                    r.get::<_, i64>(8)?,
                    r.get::<_, i64>(9)?,
                ),
                r.get::<_, String>(10)?,
                r.get::<_, Option<String>>(11)?,
                r.get::<_, Option<i64>>(12)?,
            ))
        })
        .optional()?;
    let Some((
        (tenant, type_name, version, status, degraded),
        (created, updated, ready, next_seq, payload_id),
        steps,
        deps_column,
        payload_pruned_at,
    )) = row
    else {
        return Ok(None);
    };
    let (steps, mut outputs, external) = decode_steps(id, &steps)?;
    if external {
        let mut stmt = conn.prepare_cached("SELECT idx, body FROM outputs WHERE entity_id = ?1")?;
        let mut rows = stmt.query([id.as_bytes()])?;
        while let Some(r) = rows.next()? {
            let idx = usize::try_from(r.get::<_, i64>(0)?).ok();
            if let Some(slot) = idx.and_then(|i| outputs.get_mut(i)) {
                if slot.as_deref() == Some(EXTERNAL_OUTPUT) {
                    *slot = Some(r.get(1)?);
                }
            }
        }
    }
    if let Some(i) = outputs
        .iter()
        .position(|o| o.as_deref() == Some(EXTERNAL_OUTPUT))
    {
        return Err(StoreError::Internal(format!(
            "entity {id}: the output of step {i} is missing"
        )));
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
        payload_pruned_at_us: payload_pruned_at,
        steps,
        deps: crate::deps::decode(id, deps_column.as_deref())?,
    };
    Ok(Some(Stored {
        record,
        next_seq: to_u64(next_seq, "entities.next_seq")?,
        outputs,
        extra: payload_id,
    }))
}

/// Outputs up to this size live in the entity row; larger ones in `outputs`,
/// so that every later update of the row does not rewrite them.
const OUTPUT_INLINE_MAX_BYTES: usize = 1_024;
/// Stands for an output kept in `outputs` while a row is decoded; not JSON,
/// so no real output can look like it.
const EXTERNAL_OUTPUT: &str = "\0external";

/// One step in the `steps` column, an array: name, critical, status,
/// attempts, epoch, due time, last error, where the output is (0 none, 1
/// inline, 2 in `outputs`), the inline output and, only while a named
/// holder runs it, the lease holder.
#[derive(serde::Deserialize)]
struct StepColumns(
    String,
    u8,
    String,
    u32,
    u64,
    Option<i64>,
    Option<String>,
    u8,
    Option<String>,
    #[serde(default)] Option<String>,
);

/// The `steps` column of an entity: a JSON array with one array per step
/// (see [`StepColumns`]). Returns it and the outputs too large to inline.
fn encode_steps<'a>(
    steps: &[StepRecord],
    outputs: &'a [Option<String>],
) -> (String, Vec<(usize, &'a str)>) {
    let mut text = String::with_capacity(16 + steps.len() * 64);
    let mut external = Vec::new();
    text.push('[');
    for (i, (step, output)) in steps.iter().zip(outputs).enumerate() {
        if i > 0 {
            text.push(',');
        }
        let s = &step.state;
        let _ = write!(
            text,
            "[{},{},\"{}\",{},{},",
            json_text(&step.name),
            u8::from(step.critical),
            s.status.as_str(),
            s.attempts,
            s.epoch
        );
        match s.due_at_us {
            Some(at) => {
                let _ = write!(text, "{at},");
            }
            None => text.push_str("null,"),
        }
        match &s.last_error {
            Some(e) => {
                text.push_str(&json_text(e));
                text.push(',');
            }
            None => text.push_str("null,"),
        }
        match output {
            None => text.push_str("0,null]"),
            Some(o) if o.len() <= OUTPUT_INLINE_MAX_BYTES => {
                text.push_str("1,");
                text.push_str(&json_text(o));
                text.push(']');
            }
            Some(o) => {
                external.push((i, o.as_str()));
                text.push_str("2,null]");
            }
        }
        if let Some(holder) = &s.holder {
            text.pop();
            text.push(',');
            text.push_str(&json_text(holder));
            text.push(']');
        }
    }
    text.push(']');
    (text, external)
}

/// Decodes the `steps` column: the step records, each step's output (an
/// output kept in `outputs` reads as [`EXTERNAL_OUTPUT`]) and whether any is.
fn decode_steps(id: EntityId, text: &str) -> Result<(Vec<StepRecord>, Vec<Option<String>>, bool)> {
    let columns: Vec<StepColumns> = serde_json::from_str(text)
        .map_err(|e| StoreError::Internal(format!("entity {id}: malformed steps column: {e}")))?;
    let mut steps = Vec::with_capacity(columns.len());
    let mut outputs = Vec::with_capacity(columns.len());
    let mut external = false;
    for StepColumns(
        name,
        critical,
        status,
        attempts,
        epoch,
        due_at_us,
        last_error,
        kept,
        output,
        holder,
    ) in columns
    {
        steps.push(StepRecord {
            name,
            critical: critical != 0,
            state: StepState {
                status: step_status(&status)?,
                attempts,
                epoch,
                due_at_us,
                last_error,
                holder,
            },
        });
        outputs.push(match kept {
            0 => None,
            1 => output,
            _ => {
                external = true;
                Some(EXTERNAL_OUTPUT.to_owned())
            }
        });
    }
    Ok((steps, outputs, external))
}

/// `s` as a JSON string literal.
fn json_text(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// The raw payload of `stored`; `None` once it was pruned.
fn read_payload(conn: &Connection, stored: &Stored<i64>) -> Result<Option<String>> {
    if stored.record.payload_pruned_at_us.is_some() {
        return Ok(None);
    }
    let payload_id = stored.extra;
    conn.prepare_cached("SELECT body FROM payloads WHERE id = ?1")?
        .query_row([payload_id], |r| r.get(0))
        .optional()?
        .ok_or_else(|| StoreError::Internal(format!("payload {payload_id} is missing")))
        .map(Some)
}

/// The payload an attempt of `record` carries: a claimed step's entity
/// always has one (the pruner leaves entities with live steps alone, and a
/// retry of a pruned one is refused).
fn read_payload_of(conn: &Connection, record: &EntityRecord, payload_id: i64) -> Result<String> {
    if record.payload_pruned_at_us.is_some() {
        return Err(StoreError::Internal(format!(
            "entity {}: a step was claimed after its payload was pruned",
            record.id
        )));
    }
    conn.prepare_cached("SELECT body FROM payloads WHERE id = ?1")?
        .query_row([payload_id], |r| r.get(0))
        .optional()?
        .ok_or_else(|| StoreError::Internal(format!("payload {payload_id} is missing")))
}

// ---------------------------------------------------------------------------
// The writer thread

/// A write command queued for the writer thread, erased over its result type.
trait Job: Send {
    /// Runs the command inside the open transaction. False when it failed (or
    /// panicked) and its writes must be rolled back. A command may run more
    /// than once: when another command of its batch fails, the whole batch is
    /// rolled back and run again, and only the last run counts.
    fn run(&mut self, writer: &mut Writer) -> bool;
    /// Answers the caller once the fate of the transaction is known:
    /// `failure` is set when the batch did not commit.
    fn answer(self: Box<Self>, failure: Option<&StoreError>);
    /// The create this job is, if it is one: the writer writes the creates
    /// of a batch together, with multi-row inserts.
    fn as_create(&mut self) -> Option<&mut CreateRequest> {
        None
    }
}

/// A queued `Store::create`.
struct CreateRequest {
    entity: NewEntity,
    prepared: Prepared,
    result: Option<Result<Created>>,
    reply: oneshot::Sender<Result<IntakeOutcome>>,
}

impl CreateRequest {
    fn item(&self) -> CreateItem<'_> {
        CreateItem {
            entity: &self.entity,
            prepared: &self.prepared,
        }
    }
}

impl Job for CreateRequest {
    fn run(&mut self, writer: &mut Writer) -> bool {
        self.result = None;
        let result = writer.create_many(&[self.item()]).and_then(|mut outcomes| {
            outcomes
                .pop()
                .ok_or_else(|| StoreError::Internal("a create had no outcome".into()))
        });
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn answer(self: Box<Self>, failure: Option<&StoreError>) {
        let result = match (failure, self.result) {
            (Some(e), _) => Err(e.clone()),
            // The record was built before the write; it is handed over, not copied.
            (None, Some(Ok(Created::New))) => Ok(IntakeOutcome::Created(self.prepared.rows.record)),
            (None, Some(Ok(Created::Depending(record)))) => Ok(IntakeOutcome::Created(*record)),
            (None, Some(Ok(Created::Refused(r)))) => Ok(IntakeOutcome::ReferenceRefused(r)),
            (None, Some(Ok(Created::Existing(outcome)))) => Ok(outcome),
            (None, Some(Err(e))) => Err(e),
            (None, None) => Err(StoreError::Internal(
                "the create panicked and was rolled back".into(),
            )),
        };
        let _ = self.reply.send(result);
    }

    fn as_create(&mut self) -> Option<&mut CreateRequest> {
        Some(self)
    }
}

/// What the writer did with one create.
#[derive(Debug)]
enum Created {
    /// Wrote the prepared entity.
    New,
    /// Wrote nothing: the idempotency key was taken.
    Existing(IntakeOutcome),
    /// Wrote the entity with the dependencies its references decided.
    Depending(Box<EntityRecord>),
    /// Wrote nothing: a reference does not hold.
    Refused(crate::deps::ReferenceRefusal),
}

struct Request<T, F> {
    command: F,
    result: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
}

impl<T, F> Job for Request<T, F>
where
    T: Send,
    F: FnMut(&mut Writer) -> Result<T> + Send,
{
    fn run(&mut self, writer: &mut Writer) -> bool {
        self.result = None;
        let result = (self.command)(writer);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn answer(self: Box<Self>, failure: Option<&StoreError>) {
        let result = match (failure, self.result) {
            (Some(e), _) => Err(e.clone()),
            (None, Some(result)) => result,
            (None, None) => Err(StoreError::Internal(
                "the write command panicked and was rolled back".into(),
            )),
        };
        // The caller may have gone away; the write stands regardless.
        let _ = self.reply.send(result);
    }
}

/// Pipeline commands (claims, results, recovery, operator commands) that
/// the writer takes into a batch while submissions are waiting. Submissions
/// go first, so that a burst is acknowledged at the rate of an idle
/// pipeline; the pipeline's work waits and catches up once the burst ends.
const PIPELINE_JOBS_BESIDE_INTAKE: usize = 1;
/// The longest a pipeline command waits behind submissions before it joins
/// the next batch whatever is queued: far below any lease, so that a
/// recorded result is never lost to a burst.
const PIPELINE_WAIT_MAX: Duration = Duration::from_millis(250);

/// The commands the writer has taken off its channel but not yet run, in
/// two lines: submissions, and the pipeline's commands with the time they
/// were taken.
struct Backlog<T> {
    creates: std::collections::VecDeque<T>,
    pipeline: std::collections::VecDeque<(std::time::Instant, T)>,
}

impl<T> Backlog<T> {
    fn new() -> Backlog<T> {
        Backlog {
            creates: std::collections::VecDeque::new(),
            pipeline: std::collections::VecDeque::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.creates.is_empty() && self.pipeline.is_empty()
    }

    fn len(&self) -> usize {
        self.creates.len() + self.pipeline.len()
    }

    fn push(&mut self, job: T, is_create: bool, now: std::time::Instant) {
        if is_create {
            self.creates.push_back(job);
        } else {
            self.pipeline.push_back((now, job));
        }
    }

    /// The next batch, at most `batch_max` commands: every waiting
    /// submission first, then pipeline commands in order: all of them when
    /// no submission waits, else [`PIPELINE_JOBS_BESIDE_INTAKE`] plus those
    /// that waited [`PIPELINE_WAIT_MAX`].
    fn next_batch(&mut self, batch_max: usize, now: std::time::Instant) -> Vec<T> {
        let mut batch = Vec::with_capacity(batch_max.min(self.creates.len() + self.pipeline.len()));
        while batch.len() < batch_max {
            match self.creates.pop_front() {
                Some(job) => batch.push(job),
                None => break,
            }
        }
        let mut budget = if batch.is_empty() {
            batch_max
        } else {
            PIPELINE_JOBS_BESIDE_INTAKE
        };
        while batch.len() < batch_max {
            let Some((since, _)) = self.pipeline.front() else {
                break;
            };
            let overdue = now.saturating_duration_since(*since) >= PIPELINE_WAIT_MAX;
            if !overdue {
                if budget == 0 {
                    break;
                }
                budget -= 1;
            }
            if let Some((_, job)) = self.pipeline.pop_front() {
                batch.push(job);
            }
        }
        batch
    }
}

/// How a batch transaction ended short of its commit.
enum BatchError {
    /// A command failed; the others may commit without it.
    CommandFailed,
    /// The transaction itself failed; no command of the batch commits.
    Store(StoreError),
}

impl From<StoreError> for BatchError {
    fn from(e: StoreError) -> BatchError {
        BatchError::Store(e)
    }
}

/// A committed (or failed) batch on its way back to its callers.
struct Answered {
    jobs: Vec<Box<dyn Job>>,
    failure: Option<StoreError>,
}

/// Answers the callers of each batch the writer sends. Ends when the writer
/// does.
async fn relay_answers(mut batches: mpsc::UnboundedReceiver<Answered>) {
    while let Some(batch) = batches.recv().await {
        for job in batch.jobs {
            job.answer(batch.failure.as_ref());
        }
    }
}

/// The owner of the only connection that writes.
struct Writer {
    /// Where answered batches go; `None` answers on the writer thread.
    relay: Option<mpsc::UnboundedSender<Answered>>,
    conn: Connection,
    decider: Arc<Decider>,
    /// Wakes the checkpointer after a commit; `None` in unit tests.
    checkpointer: Option<Checkpointer>,
    /// The text of the multi-row inserts, by table and row count.
    sql_cache: HashMap<(&'static str, usize), String>,
    /// The queues this batch may have given runnable work, told to the
    /// watchers once it commits.
    woken: Vec<String>,
    watchers: Arc<WorkWatchers>,
    /// The entities whose history this batch grew, told to the change
    /// watchers once it commits (gathered only when there are some).
    changed: Vec<EntityId>,
    /// Whether this batch wrote outbox rows.
    outbox_written: bool,
    changes: Arc<ChangeWatchers>,
    /// `None` in unit tests.
    commits: Option<CommitMetrics>,
}

impl Writer {
    fn run(mut self, mut commands: mpsc::Receiver<Box<dyn Job>>, batch_max: usize) {
        let mut backlog: Backlog<Box<dyn Job>> = Backlog::new();
        loop {
            if backlog.is_empty() {
                match commands.blocking_recv() {
                    Some(mut job) => {
                        let is_create = job.as_create().is_some();
                        backlog.push(job, is_create, std::time::Instant::now());
                    }
                    None => break,
                }
            }
            // Taken off the channel only up to its own bound, so that
            // callers still wait when the writer is behind.
            let now = std::time::Instant::now();
            while backlog.len() < WRITE_QUEUE_MAX {
                let Ok(mut job) = commands.try_recv() else {
                    break;
                };
                let is_create = job.as_create().is_some();
                backlog.push(job, is_create, now);
            }
            let mut batch = backlog.next_batch(batch_max, now);
            let started = std::time::Instant::now();
            let failure = self.commit_batch(&mut batch).err();
            if let (Some(commits), None) = (&self.commits, &failure) {
                commits.observe(started.elapsed().as_secs_f64(), batch.len());
            }
            if let Some(e) = &failure {
                tracing::warn!(error = %e, commands = batch.len(), "sqlite write batch failed");
            }
            let ok = failure.is_none();
            self.answer(&mut batch, failure);
            if ok {
                for queue in std::mem::take(&mut self.woken) {
                    self.watchers.wake(Some(&queue));
                }
                let changed = std::mem::take(&mut self.changed);
                if !changed.is_empty() || self.outbox_written {
                    // Outbox ids are positions here: written means readable.
                    self.changes.tell(&Changes {
                        entities: Some(&changed),
                        outbox_written: self.outbox_written,
                        sequenced: self.outbox_written,
                        keys: false,
                    });
                }
                self.outbox_written = false;
                self.changed = changed;
                self.changed.clear();
                self.after_commit();
            }
        }
        tracing::debug!("sqlite writer stopped: every store handle is gone");
    }

    /// Answers every job of the batch. Each answer wakes its caller's task,
    /// and a wake-up sent from this thread costs a system call and, on a
    /// machine with few cores, hands the core to the woken thread; so the
    /// whole batch goes to the relay task in one message, and the wake-ups
    /// happen on the runtime.
    fn answer(&mut self, batch: &mut Vec<Box<dyn Job>>, failure: Option<StoreError>) {
        let mut answered = Answered {
            jobs: std::mem::replace(batch, Vec::with_capacity(batch.capacity())),
            failure,
        };
        if let Some(relay) = &self.relay {
            match relay.send(answered) {
                Ok(()) => return,
                // The runtime is gone; answer from here.
                Err(mpsc::error::SendError(back)) => answered = back,
            }
        }
        for job in answered.jobs {
            job.answer(answered.failure.as_ref());
        }
    }

    /// Runs every job of the batch in one transaction.
    ///
    /// The first try runs the commands back to back: a savepoint per command
    /// would copy every page a command touches into the statement journal
    /// first, which costs more than the command itself. Only when a command
    /// fails is the transaction rolled back and the batch run again with a
    /// savepoint around each command, so that the failing one rolls back
    /// alone.
    fn commit_batch(&mut self, batch: &mut [Box<dyn Job>]) -> Result<()> {
        let first = self.try_commit_batch(batch, false);
        let result = match first {
            Ok(()) => return Ok(()),
            Err(BatchError::CommandFailed) => {
                self.rollback();
                match self.try_commit_batch(batch, true) {
                    Ok(()) => Ok(()),
                    Err(BatchError::CommandFailed) => Err(StoreError::Internal(
                        "a command failed outside its savepoint".into(),
                    )),
                    Err(BatchError::Store(e)) => Err(e),
                }
            }
            Err(BatchError::Store(e)) => Err(e),
        };
        if result.is_err() {
            self.rollback();
        }
        result
    }

    fn rollback(&mut self) {
        if !self.conn.is_autocommit() {
            if let Err(e) = self.exec("ROLLBACK") {
                tracing::error!(error = %e, "roll back a failed sqlite write batch");
            }
        }
    }

    fn try_commit_batch(
        &mut self,
        batch: &mut [Box<dyn Job>],
        savepoints: bool,
    ) -> Result<(), BatchError> {
        self.exec("BEGIN IMMEDIATE")?;
        // A batch may run twice; only the run that commits wakes anyone.
        self.woken.clear();
        self.changed.clear();
        self.outbox_written = false;
        if !savepoints {
            // The creates go first, together: they depend on nothing else in
            // the batch, and a claim later in the batch may take their steps.
            let mut creates: Vec<&mut CreateRequest> =
                batch.iter_mut().filter_map(|job| job.as_create()).collect();
            if !creates.is_empty() {
                let outcomes = {
                    let items: Vec<CreateItem<'_>> = creates.iter().map(|c| c.item()).collect();
                    catch_unwind(AssertUnwindSafe(|| self.create_many(&items)))
                };
                if self.conn.is_autocommit() {
                    return Err(BatchError::Store(StoreError::Unavailable(
                        "sqlite rolled back the write transaction".into(),
                    )));
                }
                match outcomes {
                    Ok(Ok(outcomes)) => {
                        for (create, outcome) in creates.iter_mut().zip(outcomes) {
                            create.result = Some(Ok(outcome));
                        }
                    }
                    _ => return Err(BatchError::CommandFailed),
                }
            }
        }
        for job in batch.iter_mut() {
            if !savepoints && job.as_create().is_some() {
                continue;
            }
            if savepoints {
                self.exec("SAVEPOINT command")?;
            }
            let ok = catch_unwind(AssertUnwindSafe(|| job.run(self))).unwrap_or(false);
            if self.conn.is_autocommit() {
                // Some errors (a full disk, an I/O error) make SQLite roll
                // back the whole transaction, taking earlier commands with it.
                return Err(BatchError::Store(StoreError::Unavailable(
                    "sqlite rolled back the write transaction".into(),
                )));
            }
            if !savepoints {
                if !ok {
                    return Err(BatchError::CommandFailed);
                }
                continue;
            }
            if !ok {
                self.exec("ROLLBACK TO command")?;
            }
            self.exec("RELEASE command")?;
        }
        self.exec("COMMIT")?;
        Ok(())
    }

    /// Keeps the write-ahead log short without stalling commits: the
    /// checkpointer thread copies committed pages into the database file in
    /// the background. It never quite catches up with a busy writer, so the
    /// log would only grow; once it is past [`WAL_RESTART_FRAMES`], the writer
    /// finishes a checkpoint itself (copying only what the checkpointer has
    /// not) so that its next transaction starts the log over. Commands that
    /// arrive meanwhile wait.
    fn after_commit(&mut self) {
        let Some(checkpointer) = &self.checkpointer else {
            return;
        };
        if checkpointer.wal_frames.load(AtomicOrdering::Relaxed) > WAL_RESTART_FRAMES {
            match checkpoint(&self.conn) {
                // The next transaction starts the log over.
                Ok(_) => checkpointer.wal_frames.store(0, AtomicOrdering::Relaxed),
                Err(e) => tracing::warn!(error = %e, "checkpoint the sqlite log"),
            }
        }
        checkpointer.wake();
    }

    fn exec(&self, sql: &str) -> Result<()> {
        self.conn.prepare_cached(sql)?.execute([])?;
        Ok(())
    }

    /// Notes that `queue` may have runnable work once this batch commits.
    fn wake(&mut self, queue: &str) {
        if !self.woken.iter().any(|q| q == queue) {
            self.woken.push(queue.to_owned());
        }
    }

    #[cfg(test)]
    fn create(
        &mut self,
        pipeline: &Arc<Pipeline>,
        entity: &NewEntity,
        now_us: UnixMicros,
    ) -> Result<IntakeOutcome> {
        let prepared = Prepared::new(pipeline, entity, now_us);
        let outcome = self
            .create_many(&[CreateItem {
                entity,
                prepared: &prepared,
            }])?
            .pop()
            .ok_or_else(|| StoreError::Internal("a create had no outcome".into()))?;
        Ok(match outcome {
            Created::New => IntakeOutcome::Created(prepared.rows.record),
            Created::Existing(outcome) => outcome,
            Created::Depending(record) => IntakeOutcome::Created(*record),
            Created::Refused(r) => IntakeOutcome::ReferenceRefused(r),
        })
    }

    /// Creates many entities with a few multi-row inserts, and answers each
    /// one as `create` would have, in order. An idempotency key used twice in
    /// `items` behaves as if the two came one after the other.
    fn create_many(&mut self, items: &[CreateItem<'_>]) -> Result<Vec<Created>> {
        let mut outcomes: Vec<Option<Created>> = Vec::with_capacity(items.len());
        outcomes.resize_with(items.len(), || None);
        let entities: Vec<&NewEntity> = items.iter().map(|item| item.entity).collect();
        let repeats = working::repeated_keys(&entities);
        // Items that create a new entity; the others found their key taken
        // or were refused for a reference.
        let mut fresh: Vec<usize> = Vec::with_capacity(items.len());
        // The rows of new entities with dependencies, built here since
        // their state depends on what the references read.
        let mut depending: HashMap<usize, Prepared> = HashMap::new();
        let mut added_waits = HashMap::new();
        for (i, e) in entities.iter().enumerate() {
            if repeats[i].is_some() {
                continue;
            }
            if let Some(key) = e.idempotency_key.as_deref() {
                if let Some(outcome) = self.existing_key(e, key)? {
                    outcomes[i] = Some(Created::Existing(outcome));
                    continue;
                }
            }
            if !e.refs.is_empty() {
                let parents = deps::read_parents(&self.conn, &e.refs)?;
                match crate::deps::check_references(&e.tenant, &e.refs, &parents, &mut added_waits)
                {
                    Err(refusal) => {
                        outcomes[i] = Some(Created::Refused(refusal));
                        continue;
                    }
                    Ok(found) => {
                        let pipeline = self.decider.pipeline(&e.type_name, e.version)?;
                        let now_us = items[i].prepared.record.created_at_us;
                        depending.insert(i, Prepared::depending(&pipeline, e, now_us, found));
                    }
                }
            }
            fresh.push(i);
        }

        if !fresh.is_empty() {
            let first_payload_id: i64 = self
                .conn
                .prepare_cached("SELECT COALESCE(MAX(id), 0) + 1 FROM payloads")?
                .query_row([], |r| r.get(0))?;
            let mut payloads = Vec::with_capacity(fresh.len() * 2);
            let mut entities = Vec::with_capacity(fresh.len() * 12);
            let mut due = Vec::with_capacity(fresh.len() * 3);
            let mut idempotency = Vec::new();
            let mut events = Vec::with_capacity(fresh.len() * 7);
            let mut outbox = Vec::with_capacity(fresh.len() * 2);
            let mut waits = Vec::new();
            for (k, &i) in fresh.iter().enumerate() {
                let e = items[i].entity;
                let p = depending.get(&i).unwrap_or(items[i].prepared);
                waits.extend_from_slice(&p.waits);
                let r = &p.record;
                let id = blob(e.id.as_bytes());
                let payload_id = first_payload_id + k as i64;
                payloads.extend([int(payload_id), text(&e.payload)]);
                entities.extend([
                    id.clone(),
                    text(&e.tenant),
                    text(&e.type_name),
                    int(i64::from(e.version)),
                    text(r.status.as_str()),
                    int(i64::from(r.degraded)),
                    int(r.created_at_us),
                    int(r.updated_at_us),
                    opt_int(r.ready_at_us),
                    int(to_i64(p.next_seq, "next_seq")?),
                    int(payload_id),
                    text(&p.steps),
                    opt_text(p.deps.as_deref()),
                ]);
                for (queue, at) in &p.due {
                    due.extend([text(queue), int(*at), id.clone()]);
                    if !self.woken.iter().any(|q| q == queue) {
                        self.woken.push(queue.clone());
                    }
                }
                if let Some(key) = &e.idempotency_key {
                    idempotency.extend([
                        text(&e.tenant),
                        text(&e.type_name),
                        text(key),
                        id.clone(),
                        int(r.created_at_us),
                    ]);
                }
                let c = &p.created;
                events.extend([
                    id.clone(),
                    int(to_i64(c.seq, "seq")?),
                    int(c.at_us),
                    text(&c.kind),
                    opt_text(c.step.as_deref()),
                    opt_int(c.attempt.map(i64::from)),
                    text(&p.detail),
                ]);
                outbox.extend([id, int(to_i64(c.seq, "seq")?)]);
            }
            let cache = &mut self.sql_cache;
            insert_many(&self.conn, cache, "payloads", &["id", "body"], &payloads)?;
            insert_many(&self.conn, cache, "entities", ENTITY_COLUMNS, &entities)?;
            insert_many(&self.conn, cache, "due", DUE_COLUMNS, &due)?;
            insert_many(
                &self.conn,
                cache,
                "idempotency",
                &["tenant", "type", "key", "entity_id", "created_at"],
                &idempotency,
            )?;
            insert_many(&self.conn, cache, "events", EVENT_COLUMNS, &events)?;
            insert_many(&self.conn, cache, "outbox", OUTBOX_COLUMNS, &outbox)?;
            drop((payloads, entities, due, idempotency, events, outbox));
            deps::write_waits(&self.conn, &waits, &[])?;
            self.outbox_written = true;
            if !self.changes.is_empty() {
                self.changed
                    .extend(fresh.iter().map(|&i| items[i].entity.id));
            }
            for &i in &fresh {
                outcomes[i] = Some(match depending.remove(&i) {
                    Some(p) => Created::Depending(Box::new(p.rows.record)),
                    None => Created::New,
                });
            }
        }

        for (i, first) in repeats.into_iter().enumerate() {
            let Some(first) = first else {
                continue;
            };
            // The first holder of the key is new in this batch, or was
            // answered from the table; either way its outcome stands.
            let outcome = match &outcomes[first] {
                Some(Created::New) => working::replay(
                    &items[first].prepared.record,
                    Some(&items[first].entity.payload),
                    items[i].entity,
                ),
                Some(Created::Depending(record)) => {
                    working::replay(record, Some(&items[first].entity.payload), items[i].entity)
                }
                // Nothing holds the key: the repeat fares as the first did.
                Some(Created::Refused(r)) => IntakeOutcome::ReferenceRefused(r.clone()),
                Some(Created::Existing(IntakeOutcome::Replayed(record))) => {
                    let payload = &items[first].entity.payload;
                    working::replay(record, Some(payload), items[i].entity)
                }
                Some(Created::Existing(_)) | None => match self.existing_key(
                    items[i].entity,
                    items[i]
                        .entity
                        .idempotency_key
                        .as_deref()
                        .unwrap_or_default(),
                )? {
                    Some(outcome) => outcome,
                    None => {
                        return Err(StoreError::Internal(
                            "a repeated idempotency key has no holder".into(),
                        ))
                    }
                },
            };
            outcomes[i] = Some(Created::Existing(outcome));
        }
        outcomes
            .into_iter()
            .map(|o| o.ok_or_else(|| StoreError::Internal("a create had no outcome".into())))
            .collect()
    }

    /// The answer to a create whose idempotency key is already stored.
    fn existing_key(&self, entity: &NewEntity, key: &str) -> Result<Option<IntakeOutcome>> {
        let existing: Option<Vec<u8>> = self
            .conn
            .prepare_cached(
                "SELECT entity_id FROM idempotency WHERE tenant = ?1 AND type = ?2 AND key = ?3",
            )?
            .query_row(params![entity.tenant, entity.type_name, key], |r| r.get(0))
            .optional()?;
        let Some(bytes) = existing else {
            return Ok(None);
        };
        let id = entity_id(&bytes)?;
        let stored = read_entity(&self.conn, id)?.ok_or_else(|| {
            StoreError::Internal(format!("idempotency key points at missing entity {id}"))
        })?;
        let payload = read_payload(&self.conn, &stored)?;
        Ok(Some(working::replay(
            &stored.record,
            payload.as_deref(),
            entity,
        )))
    }

    fn claim_due(&mut self, claim: &Claim<'_>, now_us: UnixMicros) -> Result<ClaimBatch> {
        let (queue, limit) = (claim.queue, claim.limit);
        let ids = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT entity_id FROM due WHERE queue = ?1 AND due_at <= ?2
                 ORDER BY due_at LIMIT ?3",
            )?;
            let mut rows = stmt.query(params![
                queue,
                now_us,
                i64::try_from(limit).unwrap_or(i64::MAX)
            ])?;
            let mut ids = Vec::new();
            while let Some(r) = rows.next()? {
                let id = entity_id(&r.get::<_, Vec<u8>>(0)?)?;
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            ids
        };
        let mut stored = Vec::with_capacity(ids.len());
        for id in ids {
            stored.extend(read_entity(&self.conn, id)?);
        }
        let mut entities = self.decider.schedulable(stored)?;
        self.decider.claim_due(&mut entities, claim, now_us);
        let attempts = self.save(&mut entities, now_us)?;
        let next_due_us = self
            .conn
            .prepare_cached("SELECT due_at FROM due WHERE queue = ?1 ORDER BY due_at LIMIT 1")?
            .query_row([queue], |r| r.get(0))
            .optional()?;
        Ok(ClaimBatch {
            attempts,
            next_due_us,
        })
    }

    fn complete(
        &mut self,
        completions: &[Completion],
        claim_queue: Option<&str>,
        now_us: UnixMicros,
    ) -> Result<CompleteBatch> {
        let mut entities = self.load_many(completions.iter().map(|c| c.entity_id))?;
        let results = self
            .decider
            .complete(&mut entities, completions, claim_queue, now_us);
        let claimed = self.save(&mut entities, now_us)?;
        Ok(CompleteBatch { results, claimed })
    }

    fn heartbeat(&mut self, beats: &[Heartbeat], now_us: UnixMicros) -> Result<Vec<Option<i64>>> {
        let mut entities = self.load_many(beats.iter().map(|b| b.entity_id))?;
        let leases = self.decider.heartbeat(&mut entities, beats, now_us);
        self.save(&mut entities, now_us)?;
        Ok(leases)
    }

    /// Loads each of `ids` once; unknown ones are left out.
    fn load_many(&self, ids: impl Iterator<Item = EntityId>) -> Result<Vec<Working<i64>>> {
        let mut entities = Vec::new();
        let mut seen: HashSet<EntityId> = HashSet::new();
        for id in ids {
            if seen.insert(id) {
                entities.extend(self.load(id)?);
            }
        }
        Ok(entities)
    }

    fn recover(&mut self, now_us: UnixMicros) -> Result<u64> {
        // Every running step has a lease expiry, so its entity has a due
        // row; scanning them avoids reading settled entities.
        let ids = {
            let mut stmt = self
                .conn
                .prepare_cached("SELECT DISTINCT entity_id FROM due")?;
            let mut rows = stmt.query([])?;
            let mut ids = Vec::new();
            while let Some(r) = rows.next()? {
                ids.push(entity_id(&r.get::<_, Vec<u8>>(0)?)?);
            }
            ids
        };
        let mut entities = Vec::with_capacity(ids.len());
        for id in ids {
            entities.extend(self.load(id)?);
        }
        let lost = self.decider.recover(&mut entities, now_us);
        self.save(&mut entities, now_us)?;
        Ok(lost)
    }

    fn command(
        &mut self,
        tenant: &str,
        id: EntityId,
        input: Input,
        now_us: UnixMicros,
    ) -> Result<CommandOutcome> {
        let Some(stored) = read_entity(&self.conn, id)? else {
            return Ok(CommandOutcome::NotFound);
        };
        if stored.record.tenant != tenant {
            return Ok(CommandOutcome::NotFound);
        }
        let mut w = self.decider.working(stored)?;
        let refused = self.decider.command(&mut w, input, now_us)?;
        self.save(std::slice::from_mut(&mut w), now_us)?;
        Ok(working::command_outcome(w, refused))
    }

    /// Loads one entity; `None` when it is unknown, or when its pipeline
    /// cannot run here (the decider reports it).
    fn load(&self, id: EntityId) -> Result<Option<Working<i64>>> {
        match read_entity(&self.conn, id)? {
            Some(stored) => Ok(self.decider.schedulable(vec![stored])?.pop()),
            None => Ok(None),
        }
    }

    /// Writes what changed in `entities` and returns the attempts they claimed.
    fn save(&mut self, entities: &mut [Working<i64>], now_us: UnixMicros) -> Result<Vec<Attempt>> {
        let mut rows = Rows::default();
        let mut columns = Vec::new();
        for w in entities.iter_mut() {
            let before = rows.entities.len();
            w.flush(now_us, &mut rows);
            if rows.entities.len() > before {
                // The whole step array is one column: encode it as flushed.
                columns.push(encode_steps(&w.record().steps, w.outputs()));
            }
        }
        self.write_rows(&rows, &columns)?;
        for queue in &rows.woken {
            self.wake(queue);
        }
        let mut attempts = Vec::new();
        for w in entities.iter_mut().filter(|w| w.has_claims()) {
            let payload = read_payload_of(&self.conn, w.record(), w.extra)?;
            attempts.extend(w.take_attempts(&payload)?);
        }
        Ok(attempts)
    }

    /// Binds the rows of a batch of changes: one update per changed entity
    /// (its `steps` column encoded in `columns`, in the same order), the due
    /// rows that moved, the outputs too large to inline, and multi-row
    /// inserts for the history and the outbox.
    fn write_rows(&mut self, rows: &Rows, columns: &[(String, Vec<(usize, &str)>)]) -> Result<()> {
        debug_assert_eq!(rows.entities.len(), columns.len());
        for (e, (steps, external)) in rows.entities.iter().zip(columns) {
            self.conn
                .prepare_cached(
                    "UPDATE entities SET status = ?2, degraded = ?3, ready_at = ?4,
                                         updated_at = ?5, next_seq = ?6, steps = ?7, deps = ?8
                     WHERE id = ?1",
                )?
                .execute(params![
                    e.id.as_bytes(),
                    e.status.as_str(),
                    e.degraded,
                    e.ready_at_us,
                    e.updated_at_us,
                    to_i64(e.next_seq, "next_seq")?,
                    steps,
                    e.deps,
                ])?;
            for (idx, body) in external {
                // Only a step that just succeeded has a new output; an older
                // large one is in place already.
                let fresh = rows
                    .steps
                    .iter()
                    .any(|s| s.entity_id == e.id && s.idx == *idx && s.output.is_some());
                if fresh {
                    self.conn
                        .prepare_cached(
                            "INSERT OR REPLACE INTO outputs (entity_id, idx, body)
                             VALUES (?1, ?2, ?3)",
                        )?
                        .execute(params![e.id.as_bytes(), *idx as i64, body])?;
                }
            }
        }
        let mut due = Vec::with_capacity(rows.due.len() * 3);
        for d in &rows.due {
            if let Some(from) = d.from {
                self.conn
                    .prepare_cached(
                        "DELETE FROM due WHERE queue = ?1 AND due_at = ?2 AND entity_id = ?3",
                    )?
                    .execute(params![d.queue, from, d.entity_id.as_bytes()])?;
            }
            if let Some(to) = d.to {
                due.extend([text(&d.queue), int(to), blob(d.entity_id.as_bytes())]);
            }
        }
        let cache = &mut self.sql_cache;
        insert_many(&self.conn, cache, "due", DUE_COLUMNS, &due)?;
        let mut events = Vec::with_capacity(rows.events.len() * 7);
        for r in &rows.events {
            let e = &r.event;
            events.extend([
                blob(r.entity_id.as_bytes()),
                int(to_i64(e.seq, "seq")?),
                int(e.at_us),
                text(&e.kind),
                opt_text(e.step.as_deref()),
                opt_int(e.attempt.map(i64::from)),
                text(&r.detail),
            ]);
        }
        insert_many(&self.conn, cache, "events", EVENT_COLUMNS, &events)?;
        let mut outbox = Vec::with_capacity(rows.outbox.len() * 2);
        for o in &rows.outbox {
            outbox.extend([blob(o.entity_id.as_bytes()), int(to_i64(o.seq, "seq")?)]);
        }
        insert_many(&self.conn, cache, "outbox", OUTBOX_COLUMNS, &outbox)?;
        deps::write_waits(&self.conn, &rows.waits_added, &rows.waits_removed)?;
        self.outbox_written |= !rows.outbox.is_empty();
        if !self.changes.is_empty() {
            for r in &rows.events {
                if self.changed.last() != Some(&r.entity_id) {
                    self.changed.push(r.entity_id);
                }
            }
        }
        Ok(())
    }
}

/// One entity to create, as the writer's batch holds it.
struct CreateItem<'a> {
    entity: &'a NewEntity,
    prepared: &'a Prepared,
}

/// A new entity's rows and its encoded `steps` column, built by the caller
/// before the create reaches the writer.
struct Prepared {
    rows: NewRows,
    steps: String,
}

impl Prepared {
    fn new(pipeline: &Pipeline, entity: &NewEntity, now_us: UnixMicros) -> Prepared {
        Prepared::from_rows(NewRows::new(pipeline, entity, now_us))
    }

    fn depending(
        pipeline: &Pipeline,
        entity: &NewEntity,
        now_us: UnixMicros,
        found: Vec<crate::deps::DependencyRecord>,
    ) -> Prepared {
        Prepared::from_rows(NewRows::depending(pipeline, entity, now_us, found))
    }

    fn from_rows(rows: NewRows) -> Prepared {
        let outputs = vec![None; rows.record.steps.len()];
        let (steps, _) = encode_steps(&rows.record.steps, &outputs);
        Prepared { rows, steps }
    }
}

impl std::ops::Deref for Prepared {
    type Target = NewRows;
    fn deref(&self) -> &NewRows {
        &self.rows
    }
}
fn int(v: i64) -> ToSqlOutput<'static> {
    ToSqlOutput::Owned(SqlValue::Integer(v))
}

fn opt_int(v: Option<i64>) -> ToSqlOutput<'static> {
    ToSqlOutput::Owned(v.map_or(SqlValue::Null, SqlValue::Integer))
}

fn text(s: &str) -> ToSqlOutput<'_> {
    ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes()))
}

fn opt_text(s: Option<&str>) -> ToSqlOutput<'_> {
    s.map_or(ToSqlOutput::Owned(SqlValue::Null), text)
}

fn blob(b: &[u8]) -> ToSqlOutput<'_> {
    ToSqlOutput::Borrowed(ValueRef::Blob(b))
}

/// Inserts `values.len() / columns.len()` rows (the values row after row)
/// with as few statements as it can: up to [`INSERT_ROWS_MAX`] rows each, in
/// power-of-two sizes so that a handful of cached statements serve every
/// batch.
fn insert_many(
    conn: &Connection,
    sql_cache: &mut HashMap<(&'static str, usize), String>,
    table: &'static str,
    columns: &[&str],
    values: &[ToSqlOutput<'_>],
) -> Result<()> {
    let width = columns.len();
    debug_assert_eq!(values.len() % width, 0);
    let mut rest = values;
    while !rest.is_empty() {
        let left = rest.len() / width;
        let rows = if left >= INSERT_ROWS_MAX {
            INSERT_ROWS_MAX
        } else {
            1 << left.ilog2()
        };
        let sql = sql_cache.entry((table, rows)).or_insert_with(|| {
            let mut sql = format!("INSERT INTO {table} ({}) VALUES ", columns.join(", "));
            let row = format!("({})", vec!["?"; width].join(", "));
            for i in 0..rows {
                if i > 0 {
                    sql.push(',');
                }
                sql.push_str(&row);
            }
            sql
        });
        let (now, later) = rest.split_at(rows * width);
        conn.prepare_cached(sql)?.execute(params_from_iter(now))?;
        rest = later;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::{catalog, T0};
    use serde_json::json;

    fn open(dir: &tempfile::TempDir) -> SqliteStore {
        SqliteStore::open(SqliteOptions::new(dir.path().join("ripen.db")), catalog()).expect("open")
    }

    fn entity() -> NewEntity {
        crate::suite::new_entity("single", "{}")
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
            relay: None,
            conn: open_writer(&path).expect("open"),
            decider: Arc::new(Decider::new(catalog(), 0, Jitter::random())),
            checkpointer: None,
            sql_cache: HashMap::new(),
            woken: Vec::new(),
            changed: Vec::new(),
            outbox_written: false,
            changes: Arc::default(),
            watchers: Arc::new(WorkWatchers::default()),
            commits: None,
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
                command: move |w: &mut Writer| w.create(&p1, &first, T0),
                result: None,
                reply: tx1,
            }),
            Box::new(Request {
                command: |w: &mut Writer| -> Result<()> {
                    w.exec("INSERT INTO payloads (body) VALUES ('doomed')")?;
                    Err(StoreError::Internal(
                        "the command fails after writing".into(),
                    ))
                },
                result: None,
                reply: tx2,
            }),
            Box::new(Request {
                command: move |w: &mut Writer| w.create(&pipeline, &second, T0),
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
        store
            .claim_due(Claim::local(ripen_core::HTTP_QUEUE, 10), T0)
            .await
            .expect("claim");
        store
            .cancel(crate::DEFAULT_TENANT, id, T0 + 1)
            .await
            .expect("cancel");
        let rows = store.outbox(0, 100).await.expect("read outbox");
        let kinds: Vec<&str> = rows.iter().map(|r| r.kind.as_str()).collect();
        assert_eq!(kinds, vec!["created", "created", "status_changed"]);
        let (entity_id, seq, body) = (rows[2].entity_id, rows[2].seq as i64, &rows[2].body);
        assert_eq!(entity_id, id);
        let body: serde_json::Value = serde_json::from_str(body).expect("json body");
        assert_eq!(body["entity_id"], id.to_string());
        assert_eq!(body["seq"], seq);
        assert_eq!(body["type"], "single");
        assert_eq!(
            body["detail"],
            json!({"from": "pending", "to": "cancelled"})
        );
        // The row itself is only a pointer to the history event.
        let width = store
            .read(|conn| {
                let stmt = conn.prepare("SELECT * FROM outbox")?;
                Ok(stmt.column_count())
            })
            .await
            .expect("read");
        assert_eq!(width, 3, "id, entity_id, seq");
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
            change.seq as i64, seq,
            "the outbox row carries the history seq"
        );
    }

    #[tokio::test]
    async fn one_batch_of_creates_behaves_like_creates_one_by_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ripen.db");
        let mut writer = Writer {
            relay: None,
            conn: open_writer(&path).expect("open"),
            decider: Arc::new(Decider::new(catalog(), 0, Jitter::random())),
            checkpointer: None,
            sql_cache: HashMap::new(),
            woken: Vec::new(),
            changed: Vec::new(),
            outbox_written: false,
            changes: Arc::default(),
            watchers: Arc::new(WorkWatchers::default()),
            commits: None,
        };
        let pipeline = catalog().get("w5", 1).cloned().expect("pipeline");
        let keyed = |key: &str, payload: &str| NewEntity {
            idempotency_key: Some(key.into()),
            payload: payload.into(),
            type_name: "w5".into(),
            ..entity()
        };
        // Enough entities for several statement sizes (64 + 32 + ... + 1).
        let mut entities: Vec<NewEntity> = (0..100)
            .map(|i| keyed(&format!("k{i}"), &format!("{{\"i\":{i}}}")))
            .collect();
        entities.push(keyed("k7", r#"{"i":7}"#));
        entities.push(keyed("k8", r#"{"i":"other"}"#));
        entities.push(NewEntity {
            type_name: "w5".into(),
            ..entity()
        });
        let prepared: Vec<Prepared> = entities
            .iter()
            .map(|e| Prepared::new(&pipeline, e, T0))
            .collect();
        let items: Vec<CreateItem<'_>> = entities
            .iter()
            .zip(&prepared)
            .map(|(entity, prepared)| CreateItem { entity, prepared })
            .collect();
        writer.exec("BEGIN IMMEDIATE").expect("begin");
        let outcomes = writer.create_many(&items).expect("create many");
        writer.exec("COMMIT").expect("commit");
        assert_eq!(outcomes.len(), entities.len());
        assert!(outcomes[..100].iter().all(|o| matches!(o, Created::New)));
        assert!(matches!(
            &outcomes[100],
            Created::Existing(IntakeOutcome::Replayed(r)) if r.id == entities[7].id
        ));
        assert!(matches!(
            &outcomes[101],
            Created::Existing(IntakeOutcome::KeyReused { entity_id }) if *entity_id == entities[8].id
        ));
        assert!(matches!(outcomes[102], Created::New));

        // What the batch wrote reads back exactly as prepared.
        let conn = open_reader(&path).expect("reader");
        for i in [0, 63, 64, 99, 102] {
            let stored = read_entity(&conn, entities[i].id)
                .expect("read")
                .expect("found");
            assert_eq!(stored.record, prepared[i].record);
            assert_eq!(
                read_payload(&conn, &stored).expect("payload"),
                Some(entities[i].payload.clone())
            );
        }
        assert_eq!(count(&conn, "entities"), 101);
        assert_eq!(count(&conn, "payloads"), 101);
        assert_eq!(count(&conn, "due"), 101, "one due row each: step a");
        assert_eq!(count(&conn, "idempotency"), 100);
        assert_eq!(count(&conn, "events"), 101);
        assert_eq!(count(&conn, "outbox"), 101);

        // A later batch replays from the table.
        writer.exec("BEGIN IMMEDIATE").expect("begin");
        let again = writer.create_many(&items[..1]).expect("create again");
        writer.exec("COMMIT").expect("commit");
        assert!(matches!(
            &again[0],
            Created::Existing(IntakeOutcome::Replayed(r)) if r.id == entities[0].id
        ));
    }

    #[tokio::test]
    async fn a_version_1_database_is_upgraded_in_place() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ripen.db");
        {
            let conn = Connection::open(&path).expect("open");
            let v1 = SCHEMA_V2
                .replace(
                    "id INTEGER PRIMARY KEY,\n    entity_id BLOB NOT NULL,\n    seq",
                    "id INTEGER PRIMARY KEY AUTOINCREMENT,\n    entity_id BLOB NOT NULL,\n    seq",
                )
                .replace(
                    "entities_by_type_status ON entities (tenant, type, status, id)",
                    "entities_by_type ON entities (tenant, type, id)",
                )
                .replace(
                    "steps_due ON steps (queue, due_at, status)",
                    "steps_due ON steps (queue, due_at)",
                )
                .replace(
                    "CREATE INDEX IF NOT EXISTS entities_by_status",
                    "CREATE INDEX IF NOT EXISTS entities_by_tenant ON entities (tenant, id);\nCREATE INDEX IF NOT EXISTS entities_by_status",
                );
            assert_ne!(v1, SCHEMA_V2, "the version 1 outbox differs");
            conn.execute_batch(&v1).expect("v1 schema");
            conn.execute_batch(
                "INSERT INTO outbox (entity_id, seq, at, kind, body) VALUES (x'00', 1, 2, 'created', '{}');
                 INSERT INTO outbox (entity_id, seq, at, kind, body) VALUES (x'00', 2, 3, 'status_changed', '{}');
                 PRAGMA user_version = 1;",
            )
            .expect("v1 rows");
        }
        let store = open(&dir);
        store.create(entity(), T0).await.expect("create");
        let (ids, autoincrement, indexes) = store
            .read(|conn| {
                let mut stmt = conn.prepare("SELECT id FROM outbox ORDER BY id")?;
                let ids = stmt
                    .query_map([], |r| r.get::<_, i64>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                let sql: String = conn.query_row(
                    "SELECT sql FROM sqlite_schema WHERE name = 'outbox'",
                    [],
                    |r| r.get(0),
                )?;
                let mut stmt = conn.prepare(
                    "SELECT sql FROM sqlite_schema WHERE type = 'index' AND sql IS NOT NULL ORDER BY name",
                )?;
                let indexes = stmt
                    .query_map([], |r| r.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok((ids, sql.contains("AUTOINCREMENT"), indexes))
            })
            .await
            .expect("read");
        assert_eq!(ids, vec![1, 2, 3], "old rows kept, new ones after them");
        assert!(!autoincrement);
        let indexes = indexes.join("\n");
        assert!(!indexes.contains("entities_by_type "), "{indexes}");
        assert!(!indexes.contains("entities_by_tenant"), "{indexes}");
        assert!(indexes.contains("(tenant, type, status, id)"), "{indexes}");
        assert!(!indexes.contains("steps_due"), "{indexes}");
    }

    #[tokio::test]
    async fn a_version_2_database_folds_its_step_rows_into_the_entities() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ripen.db");
        // A w5 entity as version 2 stored it: a succeeded with a small
        // output, e failed, b and c queued (due), d blocked; a created event
        // with its outbox row.
        let id = EntityId::new_v7();
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(SCHEMA_V2).expect("v2 schema");
            conn.execute(
                "INSERT INTO payloads (id, body) VALUES (1, '{\"p\":1}')",
                [],
            )
            .expect("payload");
            conn.execute(
                "INSERT INTO entities VALUES (?1, 'default', 'w5', 1, 'pending', 1, ?2, ?2, NULL, 2, 1)",
                params![id.as_bytes(), T0],
            )
            .expect("entity");
            let steps = [
                ("a", 1, "succeeded", 1, 1, None, None, Some("{\"x\":1}")),
                ("b", 1, "queued", 0, 0, Some(T0 + 5), None, None),
                ("c", 1, "queued", 0, 0, Some(T0 + 3), None, None),
                ("d", 1, "blocked", 0, 0, None, None, None),
                ("e", 0, "failed", 3, 3, None, Some("HTTP 422"), None),
            ];
            for (idx, (name, critical, status, attempts, epoch, due, error, output)) in
                steps.into_iter().enumerate()
            {
                conn.execute(
                    "INSERT INTO steps VALUES (?1, ?2, ?3, ?4, 'http', ?5, ?6, ?7, ?8, ?9, ?10)",
                    params![
                        id.as_bytes(),
                        idx as i64,
                        name,
                        critical,
                        status,
                        attempts,
                        epoch,
                        due,
                        error,
                        output
                    ],
                )
                .expect("step");
            }
            conn.execute(
                "INSERT INTO events VALUES (?1, 1, ?2, 'created', NULL, NULL, '{\"status\":\"pending\"}')",
                params![id.as_bytes(), T0],
            )
            .expect("event");
            conn.execute(
                "INSERT INTO outbox (id, entity_id, seq, at, kind, body) VALUES (7, ?1, 1, ?2, 'created', '{}')",
                params![id.as_bytes(), T0],
            )
            .expect("outbox");
            conn.execute_batch("PRAGMA user_version = 2")
                .expect("version");
        }
        let store = open(&dir);
        let record = store
            .get(crate::DEFAULT_TENANT, id)
            .await
            .expect("get")
            .expect("found");
        let statuses: Vec<&str> = record
            .steps
            .iter()
            .map(|s| s.state.status.as_str())
            .collect();
        assert_eq!(
            statuses,
            ["succeeded", "queued", "queued", "blocked", "failed"]
        );
        assert_eq!(
            record.steps[4].state.last_error.as_deref(),
            Some("HTTP 422")
        );
        assert_eq!(
            (record.steps[4].state.attempts, record.steps[4].state.epoch),
            (3, 3)
        );
        assert!(!record.steps[4].critical && record.steps[0].critical);
        assert!(record.degraded);
        let data = store
            .get_data(crate::DEFAULT_TENANT, id)
            .await
            .expect("data")
            .expect("found");
        assert_eq!(data.outputs, vec![("a".to_owned(), "{\"x\":1}".to_owned())]);
        assert_eq!(data.payload.as_deref(), Some("{\"p\":1}"));
        let outbox = store.outbox(0, 10).await.expect("outbox");
        assert_eq!(outbox.len(), 1);
        assert_eq!(
            (outbox[0].id, outbox[0].entity_id, outbox[0].seq),
            (7, id, 1)
        );
        // The earliest due step became the entity's due row.
        let batch = store
            .claim_due(Claim::local(ripen_core::HTTP_QUEUE, 10), T0 + 3)
            .await
            .expect("claim");
        let claimed: Vec<&str> = batch
            .attempts
            .iter()
            .map(|a| a.step_name.as_str())
            .collect();
        assert_eq!(claimed, ["c"]);
        assert_eq!(batch.attempts[0].outputs, data.outputs);
        assert_eq!(batch.next_due_us, Some(T0 + 5));
        let tables: i64 = store
            .read(|conn| {
                Ok(conn.query_row(
                    "SELECT COUNT(*) FROM sqlite_schema WHERE name IN ('steps', 'outbox_v2')",
                    [],
                    |r| r.get(0),
                )?)
            })
            .await
            .expect("read");
        assert_eq!(tables, 0, "the old tables are gone");
    }

    #[test]
    fn steps_columns_round_trip_with_large_outputs_kept_apart() {
        let big = format!("\"{}\"", "x".repeat(OUTPUT_INLINE_MAX_BYTES));
        let steps = vec![
            StepRecord {
                name: "a\"b".into(),
                critical: true,
                state: StepState {
                    status: ripen_core::StepStatus::Succeeded,
                    attempts: 2,
                    epoch: 9,
                    due_at_us: None,
                    last_error: Some("line\nbreak é".into()),
                    holder: None,
                },
            },
            StepRecord {
                name: "big".into(),
                critical: false,
                state: StepState {
                    status: ripen_core::StepStatus::Running,
                    attempts: 1,
                    epoch: 1,
                    due_at_us: Some(T0),
                    last_error: None,
                    holder: Some("worker \"7\"".into()),
                },
            },
            StepRecord {
                name: "none".into(),
                critical: true,
                state: StepState {
                    status: ripen_core::StepStatus::Blocked,
                    attempts: 0,
                    epoch: 0,
                    due_at_us: None,
                    last_error: None,
                    holder: None,
                },
            },
        ];
        let outputs = vec![Some("{\"k\":[1,2]}".to_owned()), Some(big.clone()), None];
        let (text, external) = encode_steps(&steps, &outputs);
        assert_eq!(external, vec![(1, big.as_str())]);
        let id = EntityId::new_v7();
        let (back, read, any_external) = decode_steps(id, &text).expect("decode");
        assert_eq!(back, steps);
        assert!(any_external);
        assert_eq!(read[0], outputs[0]);
        assert_eq!(read[1].as_deref(), Some(EXTERNAL_OUTPUT));
        assert_eq!(read[2], None);
        assert!(decode_steps(id, "[[1]]").is_err());
    }

    #[test]
    fn submissions_go_first_and_the_pipeline_waits_a_bounded_time() {
        let t0 = std::time::Instant::now();
        let mut backlog = Backlog::new();
        for job in ["claim", "create1", "result", "create2", "result2"] {
            backlog.push(job, job.starts_with("create"), t0);
        }
        // Submissions first, and one pipeline command beside them.
        assert_eq!(backlog.next_batch(100, t0), ["create1", "create2", "claim"]);
        // Without submissions waiting, the pipeline runs in full.
        assert_eq!(backlog.next_batch(100, t0), ["result", "result2"]);
        assert!(backlog.is_empty());
        // Under a steady stream of submissions, an overdue pipeline command
        // still joins the next batch, in order.
        backlog.push("old", false, t0);
        backlog.push("young", false, t0 + PIPELINE_WAIT_MAX);
        backlog.push("newer", false, t0 + PIPELINE_WAIT_MAX);
        backlog.push("create3", true, t0 + PIPELINE_WAIT_MAX);
        let later = t0 + PIPELINE_WAIT_MAX;
        assert_eq!(backlog.next_batch(100, later), ["create3", "old", "young"]);
        backlog.push("create4", true, later);
        assert_eq!(backlog.next_batch(100, later), ["create4", "newer"]);
        // The batch bound holds for both lines.
        for i in 0..5 {
            backlog.push(if i % 2 == 0 { "c" } else { "p" }, i % 2 == 0, t0);
        }
        assert_eq!(backlog.next_batch(2, later), ["c", "c"]);
        assert_eq!(backlog.next_batch(2, later), ["c", "p"]);
        assert_eq!(backlog.next_batch(2, later), ["p"]);
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
