//! The PostgreSQL backend: one database shared by any number of Ripen nodes.
//!
//! Same tables, same decisions and the same observable behaviour as the SQLite
//! backend (the conformance suite is the contract); what differs is how
//! several nodes share the data safely:
//!
//! - **Entity row locks.** Every transaction that changes an entity first
//!   locks its `entities` row (`FOR UPDATE`), then reads its steps in a new
//!   statement, so every decision is made on the latest committed state.
//!   `complete`, `recover` and the operator commands lock in id order, so
//!   they cannot deadlock one another; claims lock with `SKIP LOCKED`, so
//!   they never wait and many nodes claim different entities at once.
//! - **Idempotency across nodes.** The key row is inserted first with
//!   `ON CONFLICT DO NOTHING`: of two nodes submitting one key, one inserts
//!   it (the other waits for that commit) and only the winner writes an
//!   entity; the loser reads the winner's entity and compares the payloads.
//! - **Group commit.** Concurrent `create` calls are queued to a batching
//!   task that commits up to [`PostgresOptions::batch_max`] of them in one
//!   transaction with multi-row (`UNNEST`) statements; a few batches commit
//!   in parallel. `complete` already takes batches and writes them the same way.
//! - **Wake-ups.** Every transaction that may make steps runnable runs
//!   `pg_notify('ripen_work', queue)` for each queue concerned;
//!   [`Store::watch_work`] listens on a connection of its own (every node
//!   hears its own commits too), reconnects with backoff, and tells the
//!   watchers which queue to look at.
//! - **Connection loss.** A small pool drops broken connections and
//!   reconnects on the next use; connection errors are
//!   [`StoreError::Unavailable`], so a restarted database is used again
//!   without restarting the process.
//!
//! Every connection runs with `synchronous_commit = on`: nothing is
//! acknowledged before its commit is flushed to disk.
//!
//! Architecture invariant: every write to an entity's rows happens in a
//! transaction that holds that entity's row lock (a new entity's rows are
//! invisible until they commit), and writes its state, its history events
//! and its outbox rows together.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::try_join_all;
use futures_util::StreamExt;
use ripen_core::{Input, Pipeline, StepState, UnixMicros};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, Config, Row, Statement};

mod deps;
mod keys;
mod notify;
mod registry;
mod retention;
mod tls;

pub use tls::PgTls;

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

/// The schema this build writes, kept in `ripen_schema`.
const SCHEMA_VERSION: i32 = 6;
/// The advisory lock that serializes schema migrations of nodes starting at once.
const MIGRATION_LOCK: i64 = 0x7269_7065_6e5f_6d31; // "ripen_m1"
/// The channel of work notifications.
const WORK_CHANNEL: &str = "ripen_work";
/// Creates waiting for the batching task; senders wait beyond this.
const CREATE_QUEUE_MAX: usize = 4_096;
/// Create batches committing at once, at most.
const CREATE_BATCHES_IN_FLIGHT_MAX: usize = 4;
/// How many due step rows a claim looks at per step it may claim, so that
/// claimers skipping each other's locked entities still find work.
const CLAIM_SCAN_FACTOR: usize = 4;
/// The most due step rows one claim looks at.
const CLAIM_SCAN_MAX: usize = 10_000;
/// How long opening a connection may take.
const CONNECT_TIMEOUT_MS: u64 = 5_000;
/// How long `ping` waits for an answer.
const PING_TIMEOUT_MS: u64 = 2_000;
/// TCP keepalive: idle time before the first probe, then the probe interval.
const KEEPALIVE_IDLE_S: u64 = 30;
const KEEPALIVE_INTERVAL_S: u64 = 10;
/// Backoff of the notification listener between reconnection attempts.
const LISTEN_BACKOFF_MIN_MS: u64 = 100;
const LISTEN_BACKOFF_MAX_MS: u64 = 5_000;
/// Session settings of every connection. `synchronous_commit = on` makes a
/// commit return only once it is flushed to disk; the timeouts bound how long
/// a stuck statement or an abandoned transaction can hold locks.
/// Bounds of the server-side limit on a session idle inside a transaction.
const IDLE_IN_TX_MIN_MS: u64 = 200;
const IDLE_IN_TX_MAX_MS: u64 = 60_000;

const SESSION_SETUP: &str = "SET synchronous_commit = on;
SET statement_timeout = '30s';
SET application_name = 'ripen'";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS entities (
    id bytea NOT NULL PRIMARY KEY,
    tenant text NOT NULL,
    type text NOT NULL,
    version bigint NOT NULL,
    status text NOT NULL,
    degraded boolean NOT NULL,
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL,
    ready_at bigint,
    next_seq bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS entities_by_tenant ON entities (tenant, id);
CREATE INDEX IF NOT EXISTS entities_by_type ON entities (tenant, type, id);
CREATE INDEX IF NOT EXISTS entities_by_status ON entities (tenant, status, id);
CREATE TABLE IF NOT EXISTS payloads (
    entity_id bytea NOT NULL PRIMARY KEY,
    body bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS steps (
    entity_id bytea NOT NULL,
    idx integer NOT NULL,
    name text NOT NULL,
    critical boolean NOT NULL,
    queue text NOT NULL,
    status text NOT NULL,
    attempts bigint NOT NULL,
    epoch bigint NOT NULL,
    due_at bigint,
    last_error text,
    output bytea,
    holder text,
    PRIMARY KEY (entity_id, idx)
);
ALTER TABLE steps ADD COLUMN IF NOT EXISTS holder text;
CREATE INDEX IF NOT EXISTS steps_due ON steps (queue, due_at) WHERE due_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS idempotency (
    tenant text NOT NULL,
    type text NOT NULL,
    key text NOT NULL,
    entity_id bytea NOT NULL,
    created_at bigint NOT NULL,
    PRIMARY KEY (tenant, type, key)
);
CREATE TABLE IF NOT EXISTS events (
    entity_id bytea NOT NULL,
    seq bigint NOT NULL,
    at bigint NOT NULL,
    kind text NOT NULL,
    step text,
    attempt bigint,
    detail text NOT NULL,
    PRIMARY KEY (entity_id, seq)
);
CREATE TABLE IF NOT EXISTS outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entity_id bytea NOT NULL,
    seq bigint NOT NULL,
    at bigint NOT NULL,
    kind text NOT NULL,
    body text NOT NULL
);
";

/// The columns of an entity row followed by those of one of its steps, as
/// every entity-reading query returns them; `output` is read where needed.
const ENTITY_STEP_COLUMNS: &str = "e.id, e.tenant, e.type, e.version, e.status, e.degraded,
    e.created_at, e.updated_at, e.ready_at, e.next_seq,
    s.idx, s.name, s.critical, s.status, s.attempts, s.epoch, s.due_at, s.last_error, s.holder,
    e.deps, e.payload_pruned_at";

/// How to connect a [`PostgresStore`].
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// `postgres://user@host:port/database` (libpq URL or key=value form).
    pub url: String,
    /// The most connections this store opens (besides the listener's).
    pub pool_size: usize,
    /// The most creates committed by one transaction.
    pub batch_max: usize,
    /// How long a lease outlives the step's timeout.
    pub lease_grace_ms: u64,
    /// Where backoff jitter comes from.
    pub jitter: Jitter,
}

impl PostgresOptions {
    pub fn new(url: impl Into<String>) -> PostgresOptions {
        PostgresOptions {
            url: url.into(),
            pool_size: 16,
            batch_max: 512,
            lease_grace_ms: 5_000,
            jitter: Jitter::random(),
        }
    }
}

/// The shared store: one PostgreSQL database. See the module documentation.
pub struct PostgresStore {
    shared: Arc<Shared>,
    creates: mpsc::Sender<CreateJob>,
    /// The notification listener, started by the first `watch_work`;
    /// aborted on drop.
    listeners: Mutex<Vec<JoinHandle<()>>>,
    watchers: Arc<WorkWatchers>,
    changes: Arc<ChangeWatchers>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("hosts", &self.shared.pool.config.get_hosts())
            .field("database", &self.shared.pool.config.get_dbname())
            .finish_non_exhaustive()
    }
}

/// What the store's tasks share.
struct Shared {
    pool: Arc<Pool>,
    decider: Decider,
}

impl PostgresStore {
    /// Connects, migrates the schema (safe when several nodes start at once)
    /// and starts the create-batching task on the current runtime.
    pub async fn connect(
        opts: PostgresOptions,
        pipelines: impl Into<crate::Pipelines>,
    ) -> Result<PostgresStore, StoreError> {
        let (url, tls) = PgTls::from_url(&opts.url)
            .map_err(|e| StoreError::Internal(format!("the postgres url: {e}")))?;
        let mut config: Config = url
            .parse()
            .map_err(|e| StoreError::Internal(format!("parse the postgres url: {e}")))?;
        // A node that stalls inside a transaction (stopped, partitioned) holds
        // row locks that other nodes' SKIP LOCKED claims step around. The
        // server ends such a session within the lease grace, so those locks
        // go no later than the stalled node's leases would.
        let idle_in_tx_ms = opts
            .lease_grace_ms
            .clamp(IDLE_IN_TX_MIN_MS, IDLE_IN_TX_MAX_MS);
        config
            .options(format!(
                "-c idle_in_transaction_session_timeout={idle_in_tx_ms}"
            ))
            .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(KEEPALIVE_IDLE_S))
            .keepalives_interval(Duration::from_secs(KEEPALIVE_INTERVAL_S));
        let pool_size = opts.pool_size.max(1);
        let pool = Arc::new(Pool {
            config,
            tls,
            idle: Mutex::new(Vec::with_capacity(pool_size)),
            permits: Arc::new(Semaphore::new(pool_size)),
            commits: CommitMetrics::default(),
        });
        {
            let conn = pool.get().await?;
            migrate(&conn).await?;
            let fsync = conn
                .client()
                .query_one("SHOW fsync", &[])
                .await
                .map_err(|e| conn.fail(e))?;
            if fsync.try_get::<_, String>(0).ok().as_deref() == Some("off") {
                tracing::error!(
                    "the postgres server runs with fsync=off: acknowledged entities may be lost in a crash"
                );
            }
        }
        let shared = Arc::new(Shared {
            pool,
            decider: Decider::new(pipelines, opts.lease_grace_ms, opts.jitter.clone()),
        });
        let (creates, queue) = mpsc::channel(CREATE_QUEUE_MAX);
        let in_flight = (pool_size / 2).clamp(1, CREATE_BATCHES_IN_FLIGHT_MAX);
        tokio::spawn(run_create_batcher(
            shared.clone(),
            queue,
            opts.batch_max.max(1),
            in_flight,
        ));
        Ok(PostgresStore {
            shared,
            creates,
            listeners: Mutex::new(Vec::new()),
            watchers: Arc::new(WorkWatchers::default()),
            changes: Arc::new(ChangeWatchers::default()),
            runtime: tokio::runtime::Handle::current(),
        })
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // The batching task ends by itself once `creates` is gone.
        for listener in self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            listener.abort();
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn create(&self, entity: NewEntity, now_us: UnixMicros) -> Result<IntakeOutcome> {
        let pipeline = self
            .shared
            .decider
            .pipeline(&entity.type_name, entity.version)?;
        let (reply, answer) = oneshot::channel();
        let job = CreateJob {
            entity,
            pipeline,
            now_us,
            reply,
        };
        self.creates.send(job).await.map_err(|_| {
            StoreError::Unavailable("the postgres create batcher has stopped".into())
        })?;
        answer.await.map_err(|_| {
            StoreError::Unavailable("the postgres create batcher stopped before answering".into())
        })?
    }

    async fn claim_due(&self, claim: Claim<'_>, now_us: UnixMicros) -> Result<ClaimBatch> {
        let conn = self.shared.pool.get().await?;
        conn.begin().await?;
        let result = self.shared.claim_due(&conn, &claim, now_us).await;
        conn.finish(result).await
    }

    async fn heartbeat(
        &self,
        beats: Vec<Heartbeat>,
        now_us: UnixMicros,
    ) -> Result<Vec<Option<UnixMicros>>> {
        if beats.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.shared.pool.get().await?;
        conn.begin().await?;
        let result = self.shared.heartbeat(&conn, &beats, now_us).await;
        conn.finish(result).await
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
        let conn = self.shared.pool.get().await?;
        conn.begin().await?;
        let result = self
            .shared
            .complete(&conn, &completions, claim_queue, now_us)
            .await;
        conn.finish(result).await
    }

    async fn recover(&self, now_us: UnixMicros) -> Result<u64> {
        let conn = self.shared.pool.get().await?;
        conn.begin().await?;
        let result = self.shared.recover(&conn, now_us).await;
        conn.finish(result).await
    }

    async fn cancel(
        &self,
        tenant: &str,
        id: EntityId,
        now_us: UnixMicros,
    ) -> Result<CommandOutcome> {
        self.command(tenant, id, Input::Cancel, now_us).await
    }

    async fn retry(
        &self,
        tenant: &str,
        id: EntityId,
        now_us: UnixMicros,
    ) -> Result<CommandOutcome> {
        let conn = self.shared.pool.get().await?;
        conn.begin().await?;
        let result = deps::retry(&self.shared, &conn, tenant, id, now_us).await;
        conn.finish(result).await
    }

    async fn get(&self, tenant: &str, id: EntityId) -> Result<Option<EntityRecord>> {
        let conn = self.shared.pool.get().await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT {ENTITY_STEP_COLUMNS} FROM entities e JOIN steps s ON s.entity_id = e.id
                     WHERE e.id = $1 AND e.tenant = $2 ORDER BY s.idx"
                ),
                &[&id.as_bytes().as_slice(), &tenant],
            )
            .await?;
        Ok(decode_entities(&rows, false)?
            .into_iter()
            .next()
            .map(|e| e.record))
    }

    async fn get_data(&self, tenant: &str, id: EntityId) -> Result<Option<EntityData>> {
        let conn = self.shared.pool.get().await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT {ENTITY_STEP_COLUMNS}, s.output, p.body
                     FROM entities e JOIN steps s ON s.entity_id = e.id
                     LEFT JOIN payloads p ON p.entity_id = e.id
                     WHERE e.id = $1 AND e.tenant = $2 ORDER BY s.idx"
                ),
                &[&id.as_bytes().as_slice(), &tenant],
            )
            .await?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let payload: Option<Vec<u8>> = first.try_get(22).map_err(decode_error)?;
        let Some(stored) = decode_entities(&rows, true)?.into_iter().next() else {
            return Ok(None);
        };
        let payload = match (payload, stored.record.payload_pruned_at_us) {
            (_, Some(_)) => None,
            (Some(body), None) => Some(text_of(body, "payloads.body")?),
            (None, None) => {
                return Err(StoreError::Internal(format!(
                    "the payload of entity {id} is missing"
                )))
            }
        };
        let outputs = stored.succeeded_outputs();
        Ok(Some(EntityData {
            record: stored.record,
            payload,
            outputs,
        }))
    }

    async fn list(&self, tenant: &str, query: ListQuery) -> Result<Vec<EntityRecord>> {
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let mut filter = String::from("tenant = $1");
        let mut args: Vec<Box<dyn ToSql + Send + Sync>> = vec![Box::new(tenant.to_owned())];
        let (below, from) = (query.id_below(), query.id_from());
        if let Some(key) = query.key {
            // A key names at most one entity of its type: the lookup is the
            // primary key of `idempotency`.
            let Some(type_name) = query.type_name.clone() else {
                return Ok(Vec::new());
            };
            args.push(Box::new(type_name));
            args.push(Box::new(key));
            filter.push_str(&format!(
                " AND id = (SELECT entity_id FROM idempotency
                            WHERE tenant = $1 AND type = ${} AND key = ${})",
                args.len() - 1,
                args.len()
            ));
        }
        if let Some(type_name) = query.type_name {
            args.push(Box::new(type_name));
            filter.push_str(&format!(" AND type = ${}", args.len()));
        }
        if let Some(status) = query.status {
            args.push(Box::new(status.as_str()));
            filter.push_str(&format!(" AND status = ${}", args.len()));
        }
        if let Some(below) = below {
            args.push(Box::new(below.as_bytes().to_vec()));
            filter.push_str(&format!(" AND id < ${}", args.len()));
        }
        if let Some(from) = from {
            args.push(Box::new(from.as_bytes().to_vec()));
            filter.push_str(&format!(" AND id >= ${}", args.len()));
        }
        if let Some(degraded) = query.degraded {
            args.push(Box::new(degraded));
            filter.push_str(&format!(" AND degraded = ${}", args.len()));
        }
        args.push(Box::new(i64::from(query.limit)));
        let sql = format!(
            "WITH e AS (
                SELECT id, tenant, type, version, status, degraded, created_at, updated_at,
                       ready_at, next_seq, deps, payload_pruned_at
                FROM entities WHERE {filter} ORDER BY id DESC LIMIT ${})
             SELECT {ENTITY_STEP_COLUMNS} FROM e JOIN steps s ON s.entity_id = e.id
             ORDER BY e.id DESC, s.idx",
            args.len()
        );
        let params: Vec<&(dyn ToSql + Sync)> =
            args.iter().map(|a| &**a as &(dyn ToSql + Sync)).collect();
        let conn = self.shared.pool.get().await?;
        let rows = conn.query(&sql, &params).await?;
        Ok(decode_entities(&rows, false)?
            .into_iter()
            .map(|e| e.record)
            .collect())
    }

    async fn events(
        &self,
        tenant: &str,
        id: EntityId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Option<Vec<HistoryEvent>>> {
        let conn = self.shared.pool.get().await?;
        let owner = conn
            .query_opt(
                "SELECT 1 FROM entities WHERE id = $1 AND tenant = $2",
                &[&id.as_bytes().as_slice(), &tenant],
            )
            .await?;
        if owner.is_none() {
            return Ok(None);
        }
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let rows = conn
            .query(
                "SELECT seq, at, kind, step, attempt, detail FROM events
                 WHERE entity_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&id.as_bytes().as_slice(), &after, &i64::from(limit)],
            )
            .await?;
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            let detail: String = row.try_get(5).map_err(decode_error)?;
            events.push(HistoryEvent {
                seq: to_u64(row.try_get(0).map_err(decode_error)?, "events.seq")?,
                at_us: row.try_get(1).map_err(decode_error)?,
                kind: row.try_get(2).map_err(decode_error)?,
                step: row.try_get(3).map_err(decode_error)?,
                attempt: row
                    .try_get::<_, Option<i64>>(4)
                    .map_err(decode_error)?
                    .map(|a| to_u32(a, "events.attempt"))
                    .transpose()?,
                detail: serde_json::from_str(&detail).map_err(|e| {
                    StoreError::Internal(format!("parse the detail of an event of {id}: {e}"))
                })?,
            });
        }
        Ok(Some(events))
    }

    async fn outbox(&self, after_pos: u64, limit: u32) -> Result<Vec<OutboxEntry>> {
        let conn = self.shared.pool.get().await?;
        notify::read_outbox(&conn, after_pos, limit).await
    }

    async fn resolve_dependencies(&self, now_us: UnixMicros) -> Result<crate::deps::Resolved> {
        deps::resolve(&self.shared, now_us).await
    }

    async fn outbox_head(&self) -> Result<u64> {
        let conn = self.shared.pool.get().await?;
        notify::outbox_head(&conn).await
    }

    async fn fan_out(&self, limit: u32, now_us: UnixMicros) -> Result<FanOut> {
        let conn = self.shared.pool.get().await?;
        conn.begin().await?;
        let result = notify::fan_out(&conn, limit, now_us).await;
        conn.finish(result).await
    }

    async fn prune(&self, prune: crate::Prune, now_us: UnixMicros) -> Result<crate::Pruned> {
        let conn = self.shared.pool.get().await?;
        conn.begin().await?;
        let result = retention::prune(&self.shared, &conn, &prune, now_us).await;
        conn.finish(result).await
    }

    async fn stats(&self) -> Result<crate::StoreStats> {
        let conn = self.shared.pool.get().await?;
        retention::stats(&conn).await
    }

    async fn payloads_kept(&self, ids: Vec<EntityId>) -> Result<Vec<EntityId>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.shared.pool.get().await?;
        let rows = conn
            .query(
                "SELECT entity_id FROM payloads WHERE entity_id = ANY($1)",
                &[&id_params(&ids)],
            )
            .await?;
        rows.iter()
            .map(|row| entity_id(row.try_get::<_, &[u8]>(0).map_err(decode_error)?))
            .collect()
    }

    async fn prune_outbox(&self, before_us: UnixMicros, limit: u32) -> Result<u64> {
        let conn = self.shared.pool.get().await?;
        notify::prune(&conn, before_us, limit).await
    }

    async fn register_type(
        &self,
        version: crate::NewTypeVersion,
        now_us: UnixMicros,
    ) -> Result<crate::Registered> {
        let conn = self.shared.pool.get().await?;
        conn.begin().await?;
        let result = registry::register(&conn, &version, now_us).await;
        conn.finish(result).await
    }

    async fn reseal(&self, values: Vec<crate::Reseal>) -> Result<u64> {
        let conn = self.shared.pool.get().await?;
        conn.begin().await?;
        let result = registry::reseal(&conn, &values).await;
        conn.finish(result).await
    }

    async fn type_heads(&self) -> Result<Vec<crate::TypeHead>> {
        let conn = self.shared.pool.get().await?;
        registry::type_heads(&conn).await
    }

    async fn type_versions(&self, type_name: Option<&str>) -> Result<Vec<crate::TypeVersion>> {
        let conn = self.shared.pool.get().await?;
        registry::type_versions(&conn, type_name).await
    }

    async fn live_entities(&self, tenant: &str, type_name: &str) -> Result<Vec<(u32, u64)>> {
        let conn = self.shared.pool.get().await?;
        registry::live_entities(&conn, tenant, type_name).await
    }

    async fn put_key(&self, key: crate::ApiKey) -> Result<()> {
        let conn = self.shared.pool.get().await?;
        conn.begin().await?;
        let result = keys::put(&conn, &key).await;
        conn.finish(result).await?;
        self.keys_changed();
        Ok(())
    }

    async fn key_by_hash(&self, hash: &str) -> Result<Option<crate::ApiKey>> {
        let conn = self.shared.pool.get().await?;
        keys::by_hash(&conn, hash).await
    }

    async fn keys(&self, tenant: Option<&str>) -> Result<Vec<crate::ApiKey>> {
        let conn = self.shared.pool.get().await?;
        keys::list(&conn, tenant).await
    }

    async fn revoke_key(
        &self,
        tenant: Option<&str>,
        id: &str,
        now_us: UnixMicros,
    ) -> Result<Option<crate::ApiKey>> {
        let conn = self.shared.pool.get().await?;
        conn.begin().await?;
        let result = keys::revoke(&conn, tenant, id, now_us).await;
        let key = conn.finish(result).await?;
        self.keys_changed();
        Ok(key)
    }

    async fn any_keys(&self) -> Result<bool> {
        let conn = self.shared.pool.get().await?;
        keys::any(&conn).await
    }

    async fn fail_unrunnable(
        &self,
        ids: Vec<EntityId>,
        now_us: UnixMicros,
    ) -> Result<Vec<EntityRecord>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.shared.pool.get().await?;
        conn.begin().await?;
        let result = registry::fail_unrunnable(&self.shared, &conn, &ids, now_us).await;
        conn.finish(result).await
    }

    async fn put_subscription(&self, sub: Subscription) -> Result<Subscription> {
        let conn = self.shared.pool.get().await?;
        notify::put_subscription(&conn, &sub).await
    }

    async fn subscriptions(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<(Subscription, DeliveryCounts)>> {
        let conn = self.shared.pool.get().await?;
        notify::subscriptions(&conn, tenant).await
    }

    async fn subscription_list(&self) -> Result<Vec<Subscription>> {
        let conn = self.shared.pool.get().await?;
        notify::subscription_list(&conn).await
    }

    async fn delete_subscription(&self, tenant: &str, id: &str) -> Result<bool> {
        let conn = self.shared.pool.get().await?;
        conn.begin().await?;
        let result = notify::delete_subscription(&conn, tenant, id).await;
        conn.finish(result).await
    }

    async fn claim_deliveries(
        &self,
        claim: DeliveryClaim,
        now_us: UnixMicros,
    ) -> Result<Vec<Delivery>> {
        let conn = self.shared.pool.get().await?;
        notify::claim_deliveries(&conn, &claim, now_us).await
    }

    async fn finish_deliveries(
        &self,
        results: Vec<DeliveryResult>,
        now_us: UnixMicros,
    ) -> Result<()> {
        let conn = self.shared.pool.get().await?;
        notify::finish_deliveries(&conn, &results, now_us).await
    }

    async fn deliveries(
        &self,
        subscription_id: &str,
        query: DeliveryQuery,
    ) -> Result<Vec<Delivery>> {
        let conn = self.shared.pool.get().await?;
        notify::deliveries(&conn, subscription_id, &query).await
    }

    async fn redeliver(
        &self,
        tenant: &str,
        delivery_id: u64,
        now_us: UnixMicros,
    ) -> Result<RedeliverOutcome> {
        let conn = self.shared.pool.get().await?;
        conn.begin().await?;
        let result = notify::redeliver(&conn, tenant, delivery_id, now_us).await;
        conn.finish(result).await
    }

    async fn ping(&self) -> Result<()> {
        let ping = async {
            let conn = self.shared.pool.get().await?;
            conn.query_opt("SELECT 1", &[]).await.map(|_| ())
        };
        tokio::time::timeout(Duration::from_millis(PING_TIMEOUT_MS), ping)
            .await
            .map_err(|_| StoreError::Unavailable("postgres did not answer a ping in time".into()))?
    }

    async fn clock_us(&self) -> Result<UnixMicros> {
        let conn = self.shared.pool.get().await?;
        let row = conn
            .query_opt(
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint",
                &[],
            )
            .await?
            .ok_or_else(|| StoreError::Internal("the database clock returned no row".into()))?;
        row.try_get(0).map_err(decode_error)
    }

    fn stale_completions(&self) -> u64 {
        self.shared.decider.stale_completions()
    }

    fn register_metrics(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        self.shared.decider.metrics().register(registry)?;
        self.shared.pool.commits.register(registry)
    }

    async fn counts(&self, now_us: UnixMicros) -> Result<Counts> {
        let conn = self.shared.pool.get().await?;
        let mut counts = Counts::default();
        let rows = conn
            .query(
                "SELECT tenant, type, status, COUNT(*) FROM entities GROUP BY tenant, type, status",
                &[],
            )
            .await?;
        for r in rows {
            let status: &str = r.try_get(2).map_err(decode_error)?;
            let n: i64 = r.try_get(3).map_err(decode_error)?;
            counts.add_entities(
                r.try_get(0).map_err(decode_error)?,
                r.try_get(1).map_err(decode_error)?,
                entity_status(status)?,
                n,
            );
        }
        let rows = conn
            .query(
                "SELECT queue, COUNT(DISTINCT entity_id) FROM steps
                 WHERE due_at IS NOT NULL AND due_at <= $1 GROUP BY queue",
                &[&now_us],
            )
            .await?;
        for r in rows {
            let n: i64 = r.try_get(1).map_err(decode_error)?;
            counts
                .due
                .push((r.try_get(0).map_err(decode_error)?, to_u64(n, "count")?));
        }
        Ok(counts)
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn watch_work(&self, watcher: WorkWatcher) {
        self.watchers.add(watcher);
        self.listen();
    }

    fn watch_changes(&self, watcher: ChangeWatcher) {
        self.changes.add(watcher);
        self.listen();
    }
}

impl PostgresStore {
    /// Tells this node's change watchers that keys changed, at once; the
    /// other nodes hear it from the notification of the commit.
    fn keys_changed(&self) {
        self.changes.tell(&Changes {
            entities: Some(&[]),
            outbox_written: false,
            sequenced: false,
            keys: true,
        });
    }

    /// Starts the notification listener, once.
    fn listen(&self) {
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        if listeners.is_empty() {
            let config = self.shared.pool.config.clone();
            let tls = self.shared.pool.tls.clone();
            let watchers = self.watchers.clone();
            let changes = self.changes.clone();
            listeners.push(
                self.runtime
                    .spawn(listen_for_work(config, tls, watchers, changes)),
            );
        }
    }
}

impl PostgresStore {
    async fn command(
        &self,
        tenant: &str,
        id: EntityId,
        input: Input,
        now_us: UnixMicros,
    ) -> Result<CommandOutcome> {
        let conn = self.shared.pool.get().await?;
        conn.begin().await?;
        let result = self.shared.command(&conn, tenant, id, input, now_us).await;
        conn.finish(result).await
    }
}

// ---------------------------------------------------------------------------
// Connections

/// A bounded set of connections. A connection that failed at the connection
/// level is dropped, and so are the idle ones (they most likely broke the
/// same way); the next caller opens a new one.
struct Pool {
    config: Config,
    /// How every connection, the listener's too, negotiates TLS.
    tls: PgTls,
    idle: Mutex<Vec<Conn>>,
    permits: Arc<Semaphore>,
    /// Shared by every connection: how their transactions commit.
    commits: CommitMetrics,
}

impl Pool {
    async fn get(self: &Arc<Self>) -> Result<PooledConn> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("the postgres pool is closed".into()))?;
        loop {
            let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match idle {
                Some(conn) if conn.client.is_closed() => continue,
                Some(conn) => {
                    return Ok(PooledConn {
                        conn: Some(conn),
                        pool: self.clone(),
                        _permit: permit,
                    })
                }
                None => break,
            }
        }
        let conn = Conn::open(&self.config, &self.tls, self.commits.clone()).await?;
        Ok(PooledConn {
            conn: Some(conn),
            pool: self.clone(),
            _permit: permit,
        })
    }
}

/// One connection with its prepared statements.
struct Conn {
    client: Client,
    statements: Mutex<HashMap<String, Statement>>,
    /// Set when an error left the connection unusable.
    broken: AtomicBool,
    /// Set between `BEGIN` and the end of the transaction: a connection
    /// dropped in that state (its caller was cancelled) is closed, which
    /// rolls the transaction back, instead of going back to the pool.
    in_tx: AtomicBool,
    /// When the open transaction began, for the commit metrics.
    began: Mutex<Option<std::time::Instant>>,
    commits: CommitMetrics,
}

impl Conn {
    async fn open(config: &Config, tls: &PgTls, commits: CommitMetrics) -> Result<Conn> {
        let connecting = config.connect(tls.connector());
        let (client, connection) =
            tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), connecting)
                .await
                .map_err(|_| StoreError::Unavailable("connect to postgres: timed out".into()))?
                .map_err(|e| connect_error(config, tls, &e))?;
        // The connection task ends when the client is dropped or the server
        // goes away; the client then reports itself closed.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %describe(&e), "postgres connection ended");
            }
        });
        client.batch_execute(SESSION_SETUP).await.map_err(|e| {
            StoreError::Unavailable(format!("set up a postgres session: {}", describe(&e)))
        })?;
        Ok(Conn {
            client,
            statements: Mutex::new(HashMap::new()),
            broken: AtomicBool::new(false),
            in_tx: AtomicBool::new(false),
            began: Mutex::new(None),
            commits,
        })
    }

    fn client(&self) -> &Client {
        &self.client
    }

    /// Maps a driver error and remembers whether the connection survived it.
    fn fail(&self, e: tokio_postgres::Error) -> StoreError {
        let (error, broken) = classify(&e);
        if broken {
            self.broken.store(true, Ordering::Relaxed);
        }
        error
    }

    /// The prepared statement for `sql`, prepared on first use.
    async fn statement(&self, sql: &str) -> Result<Statement> {
        let cached = self
            .statements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(sql)
            .cloned();
        if let Some(statement) = cached {
            return Ok(statement);
        }
        let statement = self.client.prepare(sql).await.map_err(|e| self.fail(e))?;
        self.statements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let statement = self.statement(sql).await?;
        self.client
            .query(&statement, params)
            .await
            .map_err(|e| self.fail(e))
    }

    async fn query_opt(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
        let statement = self.statement(sql).await?;
        self.client
            .query_opt(&statement, params)
            .await
            .map_err(|e| self.fail(e))
    }

    async fn simple(&self, sql: &str) -> Result<()> {
        self.client
            .batch_execute(sql)
            .await
            .map_err(|e| self.fail(e))
    }

    async fn begin(&self) -> Result<()> {
        self.in_tx.store(true, Ordering::Relaxed);
        *self.began.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
        self.simple("BEGIN").await
    }

    /// Commits when `result` is `Ok`, rolls back otherwise, and returns
    /// `result` (or the commit's error).
    async fn finish<T>(&self, result: Result<T>) -> Result<T> {
        self.finish_batch(result, 1).await
    }

    /// [`Conn::finish`] for a transaction that carried `commands` commands.
    async fn finish_batch<T>(&self, result: Result<T>, commands: usize) -> Result<T> {
        let began = self.began.lock().unwrap_or_else(|e| e.into_inner()).take();
        match result {
            Ok(value) => {
                self.simple("COMMIT").await?;
                self.in_tx.store(false, Ordering::Relaxed);
                if let Some(began) = began {
                    self.commits
                        .observe(began.elapsed().as_secs_f64(), commands);
                }
                Ok(value)
            }
            Err(e) => {
                if self.simple("ROLLBACK").await.is_ok() {
                    self.in_tx.store(false, Ordering::Relaxed);
                }
                Err(e)
            }
        }
    }

    fn reusable(&self) -> bool {
        !self.broken.load(Ordering::Relaxed)
            && !self.in_tx.load(Ordering::Relaxed)
            && !self.client.is_closed()
    }
}

/// A connection checked out of the pool; it goes back when dropped.
struct PooledConn {
    conn: Option<Conn>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl std::ops::Deref for PooledConn {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn
            .as_ref()
            .expect("a pooled connection is present until dropped")
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let mut idle = self.pool.idle.lock().unwrap_or_else(|e| e.into_inner());
        if conn.reusable() {
            idle.push(conn);
        } else if conn.broken.load(Ordering::Relaxed) {
            idle.clear();
        }
    }
}

/// Maps a driver error to a store error, and tells whether the connection
/// is unusable afterwards.
fn classify(e: &tokio_postgres::Error) -> (StoreError, bool) {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        let message = format!("postgres: {} (SQLSTATE {code})", db.message());
        let (transient, broken) = classify_sqlstate(code);
        let error = if transient {
            StoreError::Unavailable(message)
        } else {
            StoreError::Internal(message)
        };
        return (error, broken);
    }
    // Everything else is about the connection itself (closed, I/O, a
    // protocol error): the connection is not trusted any more.
    (
        StoreError::Unavailable(format!("postgres: {}", describe(e))),
        true,
    )
}

/// Whether a SQLSTATE is worth retrying later, and whether the connection
/// is gone with it. 08: connection exception; 57: operator intervention
/// (shutdown, cancel, statement timeout); 53: insufficient resources; 40:
/// transaction rollback (deadlock, serialization); 58: system error; 55P03:
/// lock not available.
fn classify_sqlstate(code: &str) -> (bool, bool) {
    let class = code.get(..2).unwrap_or_default();
    let transient = matches!(class, "08" | "57" | "53" | "40" | "58") || code == "55P03";
    let broken = class == "08" || matches!(code, "57P01" | "57P02" | "57P03");
    (transient, broken)
}

/// The error with its cause, which the driver keeps apart.
fn describe(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(source) => format!("{e}: {source}"),
        None => e.to_string(),
    }
}

/// A failed connection attempt. A certificate that is not trusted (or a
/// client that is refused) fails the same way on every attempt, so it is not
/// `Unavailable`.
fn connect_error(config: &Config, tls: &PgTls, e: &tokio_postgres::Error) -> StoreError {
    match std::error::Error::source(e).and_then(ripen_tls::find_tls_error) {
        Some(tls_error) if ripen_tls::is_permanent(tls_error) => {
            let host = match config.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
                _ => "the server".to_owned(),
            };
            StoreError::Internal(format!(
                "connect to postgres: TLS handshake with {host} failed (sslmode={}): {}",
                tls.mode,
                ripen_tls::describe(tls_error)
            ))
        }
        _ => StoreError::Unavailable(format!("connect to postgres: {}", describe(e))),
    }
}

fn decode_error(e: tokio_postgres::Error) -> StoreError {
    StoreError::Internal(format!("decode a postgres row: {}", describe(&e)))
}

/// Brings the schema to [`SCHEMA_VERSION`].
///
/// A node that starts while others are busy must not take table locks: a
/// `CREATE ... IF NOT EXISTS` still locks the table it names, and in one
/// transaction with other DDL it deadlocks with live nodes' writes. So the
/// version is read first, without locks, and a current schema is left alone;
/// only an older (or missing) one is migrated, under an advisory lock that
/// serialises nodes starting together.
async fn migrate(conn: &Conn) -> Result<()> {
    if schema_version(conn).await? == Some(SCHEMA_VERSION) {
        return Ok(());
    }
    conn.begin().await?;
    let result = async {
        conn.simple(&format!(
            "SELECT pg_advisory_xact_lock({MIGRATION_LOCK});
             CREATE TABLE IF NOT EXISTS ripen_schema (
                 singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
                 version integer NOT NULL
             )"
        ))
        .await?;
        // Another node may have migrated while this one waited for the lock.
        if schema_version(conn).await? == Some(SCHEMA_VERSION) {
            return Ok(());
        }
        conn.simple(SCHEMA).await?;
        conn.simple(notify::SCHEMA).await?;
        conn.simple(deps::SCHEMA).await?;
        conn.simple(registry::SCHEMA).await?;
        conn.simple(keys::SCHEMA).await?;
        conn.simple(retention::SCHEMA).await?;
        conn.simple(&format!(
            "INSERT INTO ripen_schema (singleton, version) VALUES (true, {SCHEMA_VERSION})
             ON CONFLICT (singleton) DO UPDATE SET version = EXCLUDED.version"
        ))
        .await
    }
    .await;
    conn.finish(result).await
}

/// The schema version the database holds, if it has one; an error when it
/// is newer than this build.
async fn schema_version(conn: &Conn) -> Result<Option<i32>> {
    let found = conn
        .client()
        .query_opt("SELECT version FROM ripen_schema", &[])
        .await;
    let row = match found {
        Ok(row) => row,
        // A new database: nothing is there yet.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => None,
        Err(e) => return Err(conn.fail(e)),
    };
    let Some(row) = row else {
        return Ok(None);
    };
    let version: i32 = row.try_get(0).map_err(decode_error)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Internal(format!(
            "the database has schema version {version}, newer than the {SCHEMA_VERSION} this build knows"
        )));
    }
    Ok(Some(version))
}

// ---------------------------------------------------------------------------
// Row decoding

fn text_of(bytes: Vec<u8>, what: &str) -> Result<String> {
    String::from_utf8(bytes).map_err(|_| StoreError::Internal(format!("{what} is not UTF-8")))
}

/// PostgreSQL text cannot hold NUL characters; error texts from downstreams might.
fn pg_text(s: &str) -> String {
    s.replace('\0', "\u{fffd}")
}

/// Decodes rows of [`ENTITY_STEP_COLUMNS`] (then `s.output` when
/// `with_output`), ordered by entity and then step index.
fn decode_entities(rows: &[Row], with_output: bool) -> Result<Vec<Stored>> {
    let mut entities: Vec<Stored> = Vec::new();
    for row in rows {
        let id = entity_id(row.try_get::<_, &[u8]>(0).map_err(decode_error)?)?;
        if entities.last().map(|e| e.record.id) != Some(id) {
            let status: &str = row.try_get(4).map_err(decode_error)?;
            entities.push(Stored {
                record: EntityRecord {
                    id,
                    tenant: row.try_get(1).map_err(decode_error)?,
                    type_name: row.try_get(2).map_err(decode_error)?,
                    version: to_u32(row.try_get(3).map_err(decode_error)?, "entities.version")?,
                    status: entity_status(status)?,
                    degraded: row.try_get(5).map_err(decode_error)?,
                    created_at_us: row.try_get(6).map_err(decode_error)?,
                    updated_at_us: row.try_get(7).map_err(decode_error)?,
                    ready_at_us: row.try_get(8).map_err(decode_error)?,
                    payload_pruned_at_us: row.try_get(20).map_err(decode_error)?,
                    steps: Vec::new(),
                    deps: crate::deps::decode(
                        id,
                        row.try_get::<_, Option<&str>>(19).map_err(decode_error)?,
                    )?,
                },
                next_seq: to_u64(row.try_get(9).map_err(decode_error)?, "entities.next_seq")?,
                outputs: Vec::new(),
                extra: (),
            });
        }
        let entity = entities.last_mut().expect("pushed above");
        let idx: i32 = row.try_get(10).map_err(decode_error)?;
        if usize::try_from(idx).ok() != Some(entity.record.steps.len()) {
            return Err(StoreError::Internal(format!(
                "entity {id}: step rows are not numbered 0..n (found {idx} at {})",
                entity.record.steps.len()
            )));
        }
        let status: &str = row.try_get(13).map_err(decode_error)?;
        entity.record.steps.push(StepRecord {
            name: row.try_get(11).map_err(decode_error)?,
            critical: row.try_get(12).map_err(decode_error)?,
            state: StepState {
                status: step_status(status)?,
                attempts: to_u32(row.try_get(14).map_err(decode_error)?, "steps.attempts")?,
                epoch: to_u64(row.try_get(15).map_err(decode_error)?, "steps.epoch")?,
                due_at_us: row.try_get(16).map_err(decode_error)?,
                last_error: row.try_get(17).map_err(decode_error)?,
                holder: row.try_get(18).map_err(decode_error)?,
            },
        });
        let output = if with_output {
            row.try_get::<_, Option<Vec<u8>>>(21)
                .map_err(decode_error)?
                .map(|o| text_of(o, "steps.output"))
                .transpose()?
        } else {
            None
        };
        entity.outputs.push(output);
    }
    Ok(entities)
}

fn id_params(ids: &[EntityId]) -> Vec<&[u8]> {
    ids.iter().map(|id| id.as_bytes().as_slice()).collect()
}

// ---------------------------------------------------------------------------
// Loading, deciding and writing back

/// Rows to write, gathered across entities so that each table takes one
/// multi-row statement per transaction.
#[derive(Default)]
struct Writes {
    step_entity: Vec<Vec<u8>>,
    step_idx: Vec<i32>,
    step_status: Vec<&'static str>,
    step_attempts: Vec<i64>,
    step_epoch: Vec<i64>,
    step_due_at: Vec<Option<i64>>,
    step_error: Vec<Option<String>>,
    step_holder: Vec<Option<String>>,
    step_set_output: Vec<bool>,
    step_output: Vec<Option<Vec<u8>>>,

    entity_id: Vec<Vec<u8>>,
    entity_status: Vec<&'static str>,
    entity_degraded: Vec<bool>,
    entity_ready_at: Vec<Option<i64>>,
    entity_updated_at: Vec<i64>,
    entity_next_seq: Vec<i64>,
    entity_deps: Vec<Option<String>>,

    wait_added_parent: Vec<Vec<u8>>,
    wait_added_dependent: Vec<Vec<u8>>,
    wait_removed_parent: Vec<Vec<u8>>,
    wait_removed_dependent: Vec<Vec<u8>>,

    event_entity: Vec<Vec<u8>>,
    event_seq: Vec<i64>,
    event_at: Vec<i64>,
    event_kind: Vec<String>,
    event_step: Vec<Option<String>>,
    event_attempt: Vec<Option<i64>>,
    event_detail: Vec<String>,

    outbox_entity: Vec<Vec<u8>>,
    outbox_seq: Vec<i64>,
    outbox_at: Vec<i64>,
    outbox_kind: Vec<String>,
    outbox_body: Vec<String>,

    /// The queues in which some step became runnable now or later: every
    /// node's watchers hear of them.
    woken: Vec<String>,
}

type WriteFuture<'a> = Pin<Box<dyn Future<Output = Result<u64>> + Send + 'a>>;

impl Writes {
    /// Binds the rows of a batch of changes, one array per column.
    fn from_rows(rows: &Rows) -> Result<Writes> {
        let mut w = Writes {
            woken: rows.woken.clone(),
            ..Writes::default()
        };
        for r in &rows.steps {
            let now = &r.state;
            w.step_entity.push(r.entity_id.as_bytes().to_vec());
            w.step_idx.push(r.idx as i32);
            w.step_status.push(now.status.as_str());
            w.step_attempts.push(i64::from(now.attempts));
            w.step_epoch.push(to_i64(now.epoch, "epoch")?);
            w.step_due_at.push(now.due_at_us);
            w.step_error.push(now.last_error.as_deref().map(pg_text));
            w.step_holder.push(now.holder.as_deref().map(pg_text));
            w.step_set_output.push(r.output.is_some());
            w.step_output.push(
                r.output
                    .as_ref()
                    .and_then(|o| o.as_ref())
                    .map(|o| o.as_bytes().to_vec()),
            );
        }
        for e in &rows.entities {
            w.entity_id.push(e.id.as_bytes().to_vec());
            w.entity_status.push(e.status.as_str());
            w.entity_degraded.push(e.degraded);
            w.entity_ready_at.push(e.ready_at_us);
            w.entity_updated_at.push(e.updated_at_us);
            w.entity_next_seq.push(to_i64(e.next_seq, "next_seq")?);
            w.entity_deps.push(e.deps.clone());
        }
        w.waits(&rows.waits_added, &rows.waits_removed);
        for e in &rows.events {
            w.event(e.entity_id, &e.event, &e.detail)?;
        }
        for o in &rows.outbox {
            w.outbox(o.entity_id, o.seq, o.at_us, &o.kind, &o.body)?;
        }
        Ok(w)
    }

    fn waits(&mut self, added: &[crate::deps::WaitRow], removed: &[crate::deps::WaitRow]) {
        for r in added {
            self.wait_added_parent.push(r.parent.as_bytes().to_vec());
            self.wait_added_dependent
                .push(r.dependent.as_bytes().to_vec());
        }
        for r in removed {
            self.wait_removed_parent.push(r.parent.as_bytes().to_vec());
            self.wait_removed_dependent
                .push(r.dependent.as_bytes().to_vec());
        }
    }

    fn event(&mut self, id: EntityId, e: &HistoryEvent, detail: &str) -> Result<()> {
        self.event_entity.push(id.as_bytes().to_vec());
        self.event_seq.push(to_i64(e.seq, "seq")?);
        self.event_at.push(e.at_us);
        self.event_kind.push(e.kind.clone());
        self.event_step.push(e.step.clone());
        self.event_attempt.push(e.attempt.map(i64::from));
        self.event_detail.push(pg_text(detail));
        Ok(())
    }

    fn outbox(
        &mut self,
        id: EntityId,
        seq: u64,
        at_us: UnixMicros,
        kind: &str,
        body: &str,
    ) -> Result<()> {
        self.outbox_entity.push(id.as_bytes().to_vec());
        self.outbox_seq.push(to_i64(seq, "seq")?);
        self.outbox_at.push(at_us);
        self.outbox_kind.push(kind.to_owned());
        self.outbox_body.push(pg_text(body));
        Ok(())
    }

    /// Runs the queued writes, pipelined on one connection, and a wake-up
    /// notification per queue that got runnable work.
    async fn execute(&self, conn: &Conn) -> Result<()> {
        let mut writes: Vec<WriteFuture<'_>> = Vec::new();
        // Prepare first: a statement prepared on first use would otherwise
        // cost a round trip inside the pipeline.
        if !self.step_entity.is_empty() {
            let statement = conn
                .statement(
                    "UPDATE steps AS s SET status = u.status, attempts = u.attempts,
                            epoch = u.epoch, due_at = u.due_at, last_error = u.last_error,
                            holder = u.holder,
                            output = CASE WHEN u.set_output THEN u.output ELSE s.output END
                     FROM UNNEST($1::bytea[], $2::int4[], $3::text[], $4::int8[], $5::int8[],
                                 $6::int8[], $7::text[], $8::bool[], $9::bytea[], $10::text[])
                          AS u(entity_id, idx, status, attempts, epoch, due_at, last_error,
                               set_output, output, holder)
                     WHERE s.entity_id = u.entity_id AND s.idx = u.idx",
                )
                .await?;
            writes.push(Box::pin(async move {
                conn.client()
                    .execute(
                        &statement,
                        &[
                            &self.step_entity,
                            &self.step_idx,
                            &self.step_status,
                            &self.step_attempts,
                            &self.step_epoch,
                            &self.step_due_at,
                            &self.step_error,
                            &self.step_set_output,
                            &self.step_output,
                            &self.step_holder,
                        ],
                    )
                    .await
                    .map_err(|e| conn.fail(e))
            }));
        }
        if !self.entity_id.is_empty() {
            let statement = conn
                .statement(
                    "UPDATE entities AS e SET status = u.status, degraded = u.degraded,
                            ready_at = u.ready_at, updated_at = u.updated_at,
                            next_seq = u.next_seq, deps = u.deps
                     FROM UNNEST($1::bytea[], $2::text[], $3::bool[], $4::int8[], $5::int8[],
                                 $6::int8[], $7::text[])
                          AS u(id, status, degraded, ready_at, updated_at, next_seq, deps)
                     WHERE e.id = u.id",
                )
                .await?;
            writes.push(Box::pin(async move {
                conn.client()
                    .execute(
                        &statement,
                        &[
                            &self.entity_id,
                            &self.entity_status,
                            &self.entity_degraded,
                            &self.entity_ready_at,
                            &self.entity_updated_at,
                            &self.entity_next_seq,
                            &self.entity_deps,
                        ],
                    )
                    .await
                    .map_err(|e| conn.fail(e))
            }));
        }
        if !self.event_entity.is_empty() {
            let statement = conn
                .statement(
                    "INSERT INTO events (entity_id, seq, at, kind, step, attempt, detail)
                     SELECT * FROM UNNEST($1::bytea[], $2::int8[], $3::int8[], $4::text[],
                                          $5::text[], $6::int8[], $7::text[])",
                )
                .await?;
            writes.push(Box::pin(async move {
                conn.client()
                    .execute(
                        &statement,
                        &[
                            &self.event_entity,
                            &self.event_seq,
                            &self.event_at,
                            &self.event_kind,
                            &self.event_step,
                            &self.event_attempt,
                            &self.event_detail,
                        ],
                    )
                    .await
                    .map_err(|e| conn.fail(e))
            }));
        }
        if !self.outbox_entity.is_empty() {
            let statement = conn
                .statement(
                    "INSERT INTO outbox (entity_id, seq, at, kind, body)
                     SELECT * FROM UNNEST($1::bytea[], $2::int8[], $3::int8[], $4::text[],
                                          $5::text[])",
                )
                .await?;
            writes.push(Box::pin(async move {
                conn.client()
                    .execute(
                        &statement,
                        &[
                            &self.outbox_entity,
                            &self.outbox_seq,
                            &self.outbox_at,
                            &self.outbox_kind,
                            &self.outbox_body,
                        ],
                    )
                    .await
                    .map_err(|e| conn.fail(e))
            }));
        }
        deps::push_waits(
            conn,
            &mut writes,
            [&self.wait_added_parent, &self.wait_added_dependent],
            [&self.wait_removed_parent, &self.wait_removed_dependent],
        )
        .await?;
        if !self.event_entity.is_empty() {
            // Live streams on every node follow changes through this.
            let statement = conn.statement("SELECT pg_notify($1, $2)").await?;
            let written = if self.outbox_entity.is_empty() {
                ""
            } else {
                "o"
            };
            writes.push(Box::pin(async move {
                conn.client()
                    .execute(&statement, &[&notify::CHANGED_CHANNEL, &written])
                    .await
                    .map_err(|e| conn.fail(e))
            }));
        }
        if !self.woken.is_empty() {
            let statement = conn
                .statement("SELECT pg_notify($1, q) FROM UNNEST($2::text[]) AS q")
                .await?;
            writes.push(Box::pin(async move {
                conn.client()
                    .execute(&statement, &[&WORK_CHANNEL, &self.woken])
                    .await
                    .map_err(|e| conn.fail(e))
            }));
        }
        try_join_all(writes).await.map(|_| ())
    }
}

impl Shared {
    /// Reads entities with their steps and outputs, in id order. Callers
    /// hold the entities' row locks, taken by an earlier statement, so this
    /// statement's snapshot shows their latest committed state. (The id
    /// condition on both tables lets the planner use both primary keys.)
    async fn read_entities(&self, conn: &Conn, ids: &[EntityId]) -> Result<Vec<Stored>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = conn
            .query(
                &format!(
                    "SELECT {ENTITY_STEP_COLUMNS}, s.output
                     FROM entities e JOIN steps s ON s.entity_id = e.id
                     WHERE e.id = ANY($1) AND s.entity_id = ANY($1)
                     ORDER BY e.id, s.idx"
                ),
                &[&id_params(ids)],
            )
            .await?;
        decode_entities(&rows, true)
    }

    /// Locks the rows of `ids` (which must be sorted) in id order, waiting
    /// for other writers, and returns the ids that exist.
    async fn lock_entities(&self, conn: &Conn, ids: &[EntityId]) -> Result<Vec<EntityId>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = conn
            .query(
                "SELECT id FROM entities WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                &[&id_params(ids)],
            )
            .await?;
        rows.iter()
            .map(|r| entity_id(r.try_get::<_, &[u8]>(0).map_err(decode_error)?))
            .collect()
    }

    async fn payloads(&self, conn: &Conn, ids: &[EntityId]) -> Result<HashMap<EntityId, String>> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let rows = conn
            .query(
                "SELECT entity_id, body FROM payloads WHERE entity_id = ANY($1)",
                &[&id_params(ids)],
            )
            .await?;
        let mut payloads = HashMap::with_capacity(rows.len());
        for row in rows {
            let id = entity_id(row.try_get::<_, &[u8]>(0).map_err(decode_error)?)?;
            let body = text_of(row.try_get(1).map_err(decode_error)?, "payloads.body")?;
            payloads.insert(id, body);
        }
        Ok(payloads)
    }

    /// Writes what changed in `entities` (waking every node's watchers of
    /// the queues that got runnable work), then returns the attempts they
    /// claimed.
    async fn save(
        &self,
        conn: &Conn,
        entities: &mut [Working],
        now_us: UnixMicros,
    ) -> Result<Vec<Attempt>> {
        let mut rows = Rows::default();
        for w in entities.iter_mut() {
            w.flush(now_us, &mut rows);
        }
        if !rows.is_empty() {
            Writes::from_rows(&rows)?.execute(conn).await?;
        }
        let ids: Vec<EntityId> = entities
            .iter()
            .filter(|w| w.has_claims())
            .map(|w| w.id())
            .collect();
        let payloads = self.payloads(conn, &ids).await?;
        let mut attempts = Vec::new();
        for w in entities.iter_mut().filter(|w| w.has_claims()) {
            let id = w.id();
            let payload = payloads.get(&id).ok_or_else(|| {
                StoreError::Internal(format!("the payload of entity {id} is missing"))
            })?;
            attempts.extend(w.take_attempts(payload)?);
        }
        Ok(attempts)
    }

    async fn claim_due(
        &self,
        conn: &Conn,
        claim: &Claim<'_>,
        now_us: UnixMicros,
    ) -> Result<ClaimBatch> {
        let (queue, limit) = (claim.queue, claim.limit);
        let mut attempts = Vec::new();
        if limit > 0 {
            // Lock the entities of the earliest due steps, skipping those
            // another node holds; then decide on their fresh state.
            let scan = limit
                .saturating_mul(CLAIM_SCAN_FACTOR)
                .min(CLAIM_SCAN_MAX)
                .max(limit);
            let rows = conn
                .query(
                    "SELECT e.id FROM entities e
                     JOIN (SELECT entity_id, min(due_at) AS due
                           FROM (SELECT entity_id, due_at FROM steps
                                 WHERE queue = $1 AND due_at IS NOT NULL AND due_at <= $2
                                   AND (NOT $5 OR status = 'running')
                                 ORDER BY due_at LIMIT $3) AS due_steps
                           GROUP BY entity_id) AS d ON d.entity_id = e.id
                     ORDER BY d.due, e.id LIMIT $4
                     FOR UPDATE OF e SKIP LOCKED",
                    &[
                        &queue,
                        &now_us,
                        &i64::try_from(scan).unwrap_or(i64::MAX),
                        &i64::try_from(limit).unwrap_or(i64::MAX),
                        &claim.expire_only,
                    ],
                )
                .await?;
            let mut ids = rows
                .iter()
                .map(|r| entity_id(r.try_get::<_, &[u8]>(0).map_err(decode_error)?))
                .collect::<Result<Vec<_>>>()?;
            ids.sort();
            let stored = self.read_entities(conn, &ids).await?;
            let mut entities = self.decider.schedulable(stored)?;
            self.decider.claim_due(&mut entities, claim, now_us);
            attempts = self.save(conn, &mut entities, now_us).await?;
        }
        let next_due_us = conn
            .query_opt(
                "SELECT due_at FROM steps WHERE queue = $1 AND due_at IS NOT NULL
                 ORDER BY due_at LIMIT 1",
                &[&queue],
            )
            .await?
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(decode_error)?;
        Ok(ClaimBatch {
            attempts,
            next_due_us,
        })
    }

    async fn complete(
        &self,
        conn: &Conn,
        completions: &[Completion],
        claim_queue: Option<&str>,
        now_us: UnixMicros,
    ) -> Result<CompleteBatch> {
        let ids = completions.iter().map(|c| c.entity_id);
        let mut entities = self.load_locked(conn, ids).await?;
        let results = self
            .decider
            .complete(&mut entities, completions, claim_queue, now_us);
        let claimed = self.save(conn, &mut entities, now_us).await?;
        Ok(CompleteBatch { results, claimed })
    }

    async fn heartbeat(
        &self,
        conn: &Conn,
        beats: &[Heartbeat],
        now_us: UnixMicros,
    ) -> Result<Vec<Option<UnixMicros>>> {
        let ids = beats.iter().map(|b| b.entity_id);
        let mut entities = self.load_locked(conn, ids).await?;
        let leases = self.decider.heartbeat(&mut entities, beats, now_us);
        self.save(conn, &mut entities, now_us).await?;
        Ok(leases)
    }

    /// Locks and loads each of `ids` once, in id order; unknown ones are
    /// left out.
    async fn load_locked(
        &self,
        conn: &Conn,
        ids: impl Iterator<Item = EntityId>,
    ) -> Result<Vec<Working>> {
        let mut ids: Vec<EntityId> = ids.collect();
        ids.sort();
        ids.dedup();
        let locked = self.lock_entities(conn, &ids).await?;
        let stored = self.read_entities(conn, &locked).await?;
        // One whose pipeline cannot run here is left out (and reported).
        self.decider.schedulable(stored)
    }

    async fn recover(&self, conn: &Conn, now_us: UnixMicros) -> Result<u64> {
        let rows = conn
            .query(
                "SELECT DISTINCT entity_id FROM steps
                 WHERE due_at IS NOT NULL AND status = 'running' ORDER BY entity_id",
                &[],
            )
            .await?;
        let ids = rows
            .iter()
            .map(|r| entity_id(r.try_get::<_, &[u8]>(0).map_err(decode_error)?))
            .collect::<Result<Vec<_>>>()?;
        let locked = self.lock_entities(conn, &ids).await?;
        let stored = self.read_entities(conn, &locked).await?;
        let mut entities = self.decider.schedulable(stored)?;
        let lost = self.decider.recover(&mut entities, now_us);
        self.save(conn, &mut entities, now_us).await?;
        Ok(lost)
    }

    /// Locks `tenant`'s entity `id` for the caller's transaction and reads
    /// it; `None` when the tenant has no such entity.
    pub(super) async fn lock_entity(
        &self,
        conn: &Conn,
        tenant: &str,
        id: EntityId,
    ) -> Result<Option<Stored>> {
        let found = conn
            .query_opt(
                "SELECT id FROM entities WHERE id = $1 AND tenant = $2 FOR UPDATE",
                &[&id.as_bytes().as_slice(), &tenant],
            )
            .await?;
        if found.is_none() {
            return Ok(None);
        }
        Ok(self.read_entities(conn, &[id]).await?.into_iter().next())
    }

    async fn command(
        &self,
        conn: &Conn,
        tenant: &str,
        id: EntityId,
        input: Input,
        now_us: UnixMicros,
    ) -> Result<CommandOutcome> {
        let Some(stored) = self.lock_entity(conn, tenant, id).await? else {
            return Ok(CommandOutcome::NotFound);
        };
        let mut w = self.decider.working(stored)?;
        let refused = self.decider.command(&mut w, input, now_us)?;
        self.save(conn, std::slice::from_mut(&mut w), now_us)
            .await?;
        Ok(working::command_outcome(w, refused))
    }
}

// ---------------------------------------------------------------------------
// Creates: batched into shared transactions

struct CreateJob {
    entity: NewEntity,
    pipeline: Arc<Pipeline>,
    now_us: UnixMicros,
    reply: oneshot::Sender<Result<IntakeOutcome>>,
}

/// Takes queued creates in batches of up to `batch_max` and commits each
/// batch in one transaction, `in_flight` batches at a time. A batch is cut
/// when a commit slot frees up, so the busier the store, the larger the
/// batches (group commit).
async fn run_create_batcher(
    shared: Arc<Shared>,
    mut queue: mpsc::Receiver<CreateJob>,
    batch_max: usize,
    in_flight: usize,
) {
    let slots = Arc::new(Semaphore::new(in_flight));
    let mut running = JoinSet::new();
    while let Some(first) = queue.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < batch_max {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let shared = shared.clone();
        running.spawn(async move {
            let _slot = slot;
            shared.commit_creates(batch).await;
        });
        while let Some(done) = running.try_join_next() {
            if let Err(e) = done {
                tracing::error!(error = %e, "a postgres create batch task failed");
            }
        }
    }
    while running.join_next().await.is_some() {}
    tracing::debug!("postgres create batcher stopped: the store is gone");
}

impl Shared {
    /// Commits a batch of creates and answers every caller. When the batch
    /// fails for a reason other than the connection, each create is tried
    /// again in a transaction of its own, so that one bad create fails alone.
    async fn commit_creates(&self, batch: Vec<CreateJob>) {
        let conn = match self.pool.get().await {
            Ok(conn) => conn,
            Err(e) => {
                for job in batch {
                    let _ = job.reply.send(Err(e.clone()));
                }
                return;
            }
        };
        let jobs: Vec<&CreateJob> = batch.iter().collect();
        let outcome = self.create_in_tx(&conn, &jobs).await;
        let results = match outcome {
            Ok(results) => results,
            Err(e @ StoreError::Internal(_)) if batch.len() > 1 => {
                tracing::warn!(error = %e, creates = batch.len(), "a postgres create batch failed; committing its creates one by one");
                let mut results = Vec::with_capacity(batch.len());
                for job in &batch {
                    let result = self.create_in_tx(&conn, &[job]).await;
                    results.push(result.and_then(|mut r| {
                        r.pop()
                            .unwrap_or_else(|| Err(StoreError::Internal("no result".into())))
                    }));
                }
                results
            }
            Err(e) => {
                if !matches!(e, StoreError::Unavailable(_)) {
                    tracing::warn!(error = %e, creates = batch.len(), "a postgres create batch failed");
                }
                batch.iter().map(|_| Err(e.clone())).collect()
            }
        };
        drop(conn);
        for (job, result) in batch.into_iter().zip(results) {
            // The caller may have gone away; the write stands regardless.
            let _ = job.reply.send(result);
        }
    }

    async fn create_in_tx(
        &self,
        conn: &Conn,
        jobs: &[&CreateJob],
    ) -> Result<Vec<Result<IntakeOutcome>>> {
        conn.begin().await?;
        let result = self.create_batch(conn, jobs).await;
        conn.finish_batch(result, jobs.len()).await
    }

    async fn create_batch(
        &self,
        conn: &Conn,
        jobs: &[&CreateJob],
    ) -> Result<Vec<Result<IntakeOutcome>>> {
        // Idempotency keys first, in key order so that two nodes inserting
        // overlapping keys wait for each other instead of deadlocking. Of
        // several creates with one key, the earliest queued one may create;
        // the others find its key taken below.
        let entities: Vec<&NewEntity> = jobs.iter().map(|job| &job.entity).collect();
        let repeats = working::repeated_keys(&entities);
        let mut keyed: Vec<usize> = (0..jobs.len())
            .filter(|&j| jobs[j].entity.idempotency_key.is_some() && repeats[j].is_none())
            .collect();
        let scope = |j: usize| {
            let e = &jobs[j].entity;
            (&e.tenant, &e.type_name, e.idempotency_key.as_deref())
        };
        keyed.sort_by(|&a, &b| scope(a).cmp(&scope(b)));
        let mut creators: Vec<usize> = (0..jobs.len())
            .filter(|&j| jobs[j].entity.idempotency_key.is_none())
            .collect();
        if !keyed.is_empty() {
            let (mut tenants, mut types, mut keys, mut ids, mut ats) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for &j in &keyed {
                let e = &jobs[j].entity;
                tenants.push(e.tenant.as_str());
                types.push(e.type_name.as_str());
                keys.push(e.idempotency_key.as_deref().unwrap_or_default());
                ids.push(e.id.as_bytes().as_slice());
                ats.push(jobs[j].now_us);
            }
            let rows = conn
                .query(
                    "INSERT INTO idempotency (tenant, type, key, entity_id, created_at)
                     SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[],
                                          $5::int8[])
                     ON CONFLICT (tenant, type, key) DO NOTHING
                     RETURNING entity_id",
                    &[&tenants, &types, &keys, &ids, &ats],
                )
                .await?;
            let won: HashSet<Vec<u8>> = rows
                .iter()
                .map(|r| r.try_get::<_, Vec<u8>>(0))
                .collect::<Result<_, _>>()
                .map_err(decode_error)?;
            creators.extend(
                keyed
                    .iter()
                    .filter(|&&j| won.contains(jobs[j].entity.id.as_bytes().as_slice())),
            );
        }
        creators.sort_unstable();

        let mut results: Vec<Option<Result<IntakeOutcome>>> =
            (0..jobs.len()).map(|_| None).collect();
        // References hold or refuse their create: see `deps::check_creates`.
        let entities: Vec<&NewEntity> = jobs.iter().map(|job| &job.entity).collect();
        let mut depending =
            deps::check_creates(conn, &entities, &mut creators, &mut results).await?;
        let mut inserts = Inserts::default();
        let mut writes = Writes::default();
        for &j in &creators {
            let job = jobs[j];
            let rows = match depending.remove(&j) {
                Some(found) => NewRows::depending(&job.pipeline, &job.entity, job.now_us, found),
                None => NewRows::new(&job.pipeline, &job.entity, job.now_us),
            };
            writes.waits(&rows.waits, &[]);
            inserts.add(&job.entity, &rows)?;
            for (queue, _) in &rows.due {
                if !writes.woken.contains(queue) {
                    writes.woken.push(queue.clone());
                }
            }
            let (id, created) = (job.entity.id, &rows.created);
            writes.event(id, created, &rows.detail)?;
            writes.outbox(
                id,
                created.seq,
                created.at_us,
                &created.kind,
                &rows.outbox_body,
            )?;
            results[j] = Some(Ok(IntakeOutcome::Created(rows.record)));
        }
        if !creators.is_empty() {
            inserts.execute(conn).await?;
            writes.execute(conn).await?;
        }

        // The others found their key taken, by an earlier commit or by a
        // create of this batch: replay its entity or report the reuse.
        let losers: Vec<usize> = (0..jobs.len()).filter(|&j| results[j].is_none()).collect();
        if !losers.is_empty() {
            let (mut tenants, mut types, mut keys) = (Vec::new(), Vec::new(), Vec::new());
            for &j in &losers {
                let e = &jobs[j].entity;
                tenants.push(e.tenant.as_str());
                types.push(e.type_name.as_str());
                keys.push(e.idempotency_key.as_deref().unwrap_or_default());
            }
            let rows = conn
                .query(
                    "SELECT k.ord, i.entity_id
                     FROM UNNEST($1::text[], $2::text[], $3::text[])
                          WITH ORDINALITY AS k(tenant, type, key, ord)
                     JOIN idempotency i
                       ON i.tenant = k.tenant AND i.type = k.type AND i.key = k.key",
                    &[&tenants, &types, &keys],
                )
                .await?;
            let mut owner: HashMap<usize, EntityId> = HashMap::new();
            for row in &rows {
                let ord: i64 = row.try_get(0).map_err(decode_error)?;
                let id = entity_id(row.try_get::<_, &[u8]>(1).map_err(decode_error)?)?;
                if let Some(&j) = usize::try_from(ord - 1).ok().and_then(|k| losers.get(k)) {
                    owner.insert(j, id);
                }
            }
            let mut ids: Vec<EntityId> = owner.values().copied().collect();
            ids.sort();
            ids.dedup();
            let existing: HashMap<EntityId, Stored> = self
                .read_entities(conn, &ids)
                .await?
                .into_iter()
                .map(|e| (e.record.id, e))
                .collect();
            let payloads = self.payloads(conn, &ids).await?;
            for &j in &losers {
                let entity = &jobs[j].entity;
                let outcome = match owner.get(&j) {
                    None => Err(StoreError::Internal(format!(
                        "idempotency key {:?} conflicted but cannot be found",
                        entity.idempotency_key
                    ))),
                    Some(id) => match (existing.get(id), payloads.get(id)) {
                        (Some(stored), payload)
                            if payload.is_some()
                                || stored.record.payload_pruned_at_us.is_some() =>
                        {
                            Ok(working::replay(
                                &stored.record,
                                payload.map(String::as_str),
                                entity,
                            ))
                        }
                        _ => Err(StoreError::Internal(format!(
                            "idempotency key points at missing entity {id}"
                        ))),
                    },
                };
                results[j] = Some(outcome);
            }
        }
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(StoreError::Internal("create left unanswered".into())))
            })
            .collect())
    }
}

/// The rows of new entities, gathered for multi-row inserts.
#[derive(Default)]
struct Inserts {
    payload_entity: Vec<Vec<u8>>,
    payload_body: Vec<Vec<u8>>,

    entity_id: Vec<Vec<u8>>,
    entity_tenant: Vec<String>,
    entity_type: Vec<String>,
    entity_version: Vec<i64>,
    entity_status: Vec<&'static str>,
    entity_degraded: Vec<bool>,
    entity_at: Vec<i64>,
    entity_ready_at: Vec<Option<i64>>,
    entity_next_seq: Vec<i64>,
    entity_deps: Vec<Option<String>>,

    step_entity: Vec<Vec<u8>>,
    step_idx: Vec<i32>,
    step_name: Vec<String>,
    step_critical: Vec<bool>,
    step_queue: Vec<String>,
    step_status: Vec<&'static str>,
    step_attempts: Vec<i64>,
    step_epoch: Vec<i64>,
    step_due_at: Vec<Option<i64>>,
    step_error: Vec<Option<String>>,
}

impl Inserts {
    /// Queues the rows of one new entity.
    fn add(&mut self, entity: &NewEntity, rows: &NewRows) -> Result<()> {
        let r = &rows.record;
        let id = entity.id.as_bytes().to_vec();
        self.payload_entity.push(id.clone());
        self.payload_body.push(entity.payload.as_bytes().to_vec());
        self.entity_id.push(id.clone());
        self.entity_tenant.push(entity.tenant.clone());
        self.entity_type.push(entity.type_name.clone());
        self.entity_version.push(i64::from(entity.version));
        self.entity_status.push(r.status.as_str());
        self.entity_degraded.push(r.degraded);
        self.entity_at.push(r.created_at_us);
        self.entity_ready_at.push(r.ready_at_us);
        self.entity_next_seq
            .push(to_i64(rows.next_seq, "next_seq")?);
        self.entity_deps.push(rows.deps.clone());
        for (i, (s, queue)) in r.steps.iter().zip(&rows.queues).enumerate() {
            self.step_entity.push(id.clone());
            self.step_idx.push(i as i32);
            self.step_name.push(s.name.clone());
            self.step_critical.push(s.critical);
            self.step_queue.push(queue.clone());
            self.step_status.push(s.state.status.as_str());
            self.step_attempts.push(i64::from(s.state.attempts));
            self.step_epoch.push(to_i64(s.state.epoch, "epoch")?);
            self.step_due_at.push(s.state.due_at_us);
            self.step_error.push(s.state.last_error.clone());
        }
        Ok(())
    }

    async fn execute(&self, conn: &Conn) -> Result<()> {
        let payloads = conn
            .statement(
                "INSERT INTO payloads (entity_id, body)
                 SELECT * FROM UNNEST($1::bytea[], $2::bytea[])",
            )
            .await?;
        let entities = conn
            .statement(
                "INSERT INTO entities (id, tenant, type, version, status, degraded, created_at,
                                       updated_at, ready_at, next_seq, deps)
                 SELECT u.id, u.tenant, u.type, u.version, u.status, u.degraded, u.at, u.at,
                        u.ready_at, u.next_seq, u.deps
                 FROM UNNEST($1::bytea[], $2::text[], $3::text[], $4::int8[], $5::text[],
                             $6::bool[], $7::int8[], $8::int8[], $9::int8[], $10::text[])
                      AS u(id, tenant, type, version, status, degraded, at, ready_at, next_seq,
                           deps)",
            )
            .await?;
        let steps = conn
            .statement(
                "INSERT INTO steps (entity_id, idx, name, critical, queue, status, attempts,
                                    epoch, due_at, last_error)
                 SELECT * FROM UNNEST($1::bytea[], $2::int4[], $3::text[], $4::bool[],
                                      $5::text[], $6::text[], $7::int8[], $8::int8[],
                                      $9::int8[], $10::text[])",
            )
            .await?;
        let client = conn.client();
        let fail = |e| conn.fail(e);
        tokio::try_join!(
            async {
                client
                    .execute(&payloads, &[&self.payload_entity, &self.payload_body])
                    .await
                    .map_err(fail)
            },
            async {
                client
                    .execute(
                        &entities,
                        &[
                            &self.entity_id,
                            &self.entity_tenant,
                            &self.entity_type,
                            &self.entity_version,
                            &self.entity_status,
                            &self.entity_degraded,
                            &self.entity_at,
                            &self.entity_ready_at,
                            &self.entity_next_seq,
                            &self.entity_deps,
                        ],
                    )
                    .await
                    .map_err(fail)
            },
            async {
                client
                    .execute(
                        &steps,
                        &[
                            &self.step_entity,
                            &self.step_idx,
                            &self.step_name,
                            &self.step_critical,
                            &self.step_queue,
                            &self.step_status,
                            &self.step_attempts,
                            &self.step_epoch,
                            &self.step_due_at,
                            &self.step_error,
                        ],
                    )
                    .await
                    .map_err(fail)
            },
        )?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Wake-ups from other nodes

/// Listens for work notifications on a connection of its own and tells the
/// watchers each queue named. Reconnects with backoff when the connection
/// drops, and wakes every queue after every (re)connection, since
/// notifications sent while it was not listening are lost.
async fn listen_for_work(
    config: Config,
    tls: PgTls,
    watchers: Arc<WorkWatchers>,
    changes: Arc<ChangeWatchers>,
) {
    let heard = |n: &tokio_postgres::Notification| match n.channel() {
        WORK_CHANNEL => watchers.wake(Some(n.payload())),
        notify::OUTBOX_CHANNEL => changes.tell(&Changes {
            entities: None,
            outbox_written: false,
            sequenced: true,
            keys: false,
        }),
        keys::CHANNEL => changes.tell(&Changes {
            entities: Some(&[]),
            outbox_written: false,
            sequenced: false,
            keys: true,
        }),
        _ => changes.tell(&Changes {
            entities: None,
            outbox_written: n.payload() == "o",
            sequenced: false,
            keys: false,
        }),
    };
    let mut backoff_ms = LISTEN_BACKOFF_MIN_MS;
    loop {
        match config.connect(tls.connector()).await {
            Ok((client, mut connection)) => {
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                // LISTEN needs the connection driven while it runs.
                let listen_sql = format!(
                    "LISTEN {WORK_CHANNEL}; LISTEN {}; LISTEN {}; LISTEN {}",
                    notify::OUTBOX_CHANNEL,
                    notify::CHANGED_CHANNEL,
                    keys::CHANNEL
                );
                let listening = {
                    let listen = client.batch_execute(&listen_sql);
                    tokio::pin!(listen);
                    loop {
                        tokio::select! {
                            done = &mut listen => break done.is_ok(),
                            message = messages.next() => match message {
                                Some(Ok(AsyncMessage::Notification(n))) => heard(&n),
                                Some(Ok(_)) => {}
                                _ => break false,
                            },
                        }
                    }
                };
                if listening {
                    backoff_ms = LISTEN_BACKOFF_MIN_MS;
                    tracing::debug!("listening for work notifications");
                    watchers.wake(None);
                    changes.tell(&Changes {
                        entities: None,
                        outbox_written: true,
                        sequenced: true,
                        keys: true,
                    });
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(AsyncMessage::Notification(n)) => heard(&n),
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %describe(&e), "the work notification connection failed");
                                break;
                            }
                        }
                    }
                }
                drop(client);
            }
            Err(e) => {
                tracing::debug!(error = %describe(&e), "connect to postgres to listen for work");
            }
        }
        tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
        backoff_ms = (backoff_ms * 2).min(LISTEN_BACKOFF_MAX_MS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::{catalog, T0};
    use ripen_testkit::PgCluster;

    async fn store() -> (PostgresStore, String) {
        let url = PgCluster::shared().create_database();
        let store = PostgresStore::connect(PostgresOptions::new(&url), catalog())
            .await
            .expect("connect");
        (store, url)
    }

    fn entity() -> NewEntity {
        crate::suite::new_entity("single", "{}")
    }

    fn idle(store: &PostgresStore) -> usize {
        store.shared.pool.idle.lock().unwrap().len()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_connection_commits_synchronously() {
        let url = PgCluster::shared().create_database();
        let db = url.rsplit('/').next().expect("database name").to_owned();
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect raw");
        let driver = tokio::spawn(connection);
        // A database default can weaken durability; the store overrides it.
        client
            .batch_execute(&format!(
                "ALTER DATABASE \"{db}\" SET synchronous_commit = off"
            ))
            .await
            .expect("weaken the database default");
        drop(client);
        let _ = driver.await;
        let store = PostgresStore::connect(PostgresOptions::new(&url), catalog())
            .await
            .expect("connect");
        let conn = store.shared.pool.get().await.expect("connection");
        let row = conn
            .query_opt("SHOW synchronous_commit", &[])
            .await
            .expect("show")
            .expect("a row");
        assert_eq!(row.get::<_, String>(0), "on");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_left_inside_a_transaction_is_not_reused() {
        let (store, _url) = store().await;
        let before = idle(&store);
        assert!(before >= 1, "the migration's connection is kept");
        {
            let conn = store.shared.pool.get().await.expect("connection");
            conn.begin().await.expect("begin");
            // Dropped here, as when a caller is cancelled mid-transaction.
        }
        assert_eq!(idle(&store), before - 1, "the connection was closed");
        {
            let conn = store.shared.pool.get().await.expect("connection");
            conn.begin().await.expect("begin");
            conn.finish(Ok(())).await.expect("commit");
        }
        assert_eq!(idle(&store), before, "a finished connection goes back");
        store
            .create(entity(), T0)
            .await
            .expect("the store still works");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_create_in_a_batch_fails_alone() {
        let (store, _url) = store().await;
        let existing = entity();
        let duplicate_id = existing.id;
        store.create(existing, T0).await.expect("create");
        let pipeline = catalog().get("single", 1).cloned().expect("pipeline");
        let mut answers = Vec::new();
        let mut batch = Vec::new();
        for id in [EntityId::new_v7(), duplicate_id, EntityId::new_v7()] {
            let (reply, answer) = oneshot::channel();
            answers.push(answer);
            batch.push(CreateJob {
                entity: NewEntity { id, ..entity() },
                pipeline: pipeline.clone(),
                now_us: T0,
                reply,
            });
        }
        store.shared.commit_creates(batch).await;
        let mut outcomes = Vec::new();
        for answer in answers {
            outcomes.push(answer.await.expect("answered"));
        }
        assert!(
            matches!(outcomes[0], Ok(IntakeOutcome::Created(_))),
            "{outcomes:?}"
        );
        assert!(
            matches!(outcomes[1], Err(StoreError::Internal(_))),
            "{outcomes:?}"
        );
        assert!(
            matches!(outcomes[2], Ok(IntakeOutcome::Created(_))),
            "{outcomes:?}"
        );
        let listed = store
            .list(
                crate::DEFAULT_TENANT,
                ListQuery {
                    limit: 10,
                    ..ListQuery::default()
                },
            )
            .await
            .expect("list");
        assert_eq!(listed.len(), 3);
    }

    #[test]
    fn driver_errors_map_to_unavailable_or_internal() {
        // Shutdowns and broken links are retried on a new connection;
        // deadlocks and timeouts are retried on the same one; the rest is a bug.
        let cases = [
            ("57P01", true, true),
            ("08006", true, true),
            ("40P01", true, false),
            ("57014", true, false),
            ("23505", false, false),
            ("42P01", false, false),
        ];
        for (code, transient, broken) in cases {
            assert_eq!(classify_sqlstate(code), (transient, broken), "{code}");
        }
    }
}
