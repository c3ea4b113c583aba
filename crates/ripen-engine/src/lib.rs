//! Ripen's runtime: everything around the pure core that does I/O, behind
//! one facade, [`Engine`].
//!
//! - [`config`] reads `ripen.toml` into validated pipelines and schemas;
//! - `intake` validates submissions and hands them to the store;
//! - `scheduler` claims runnable steps, runs them on tasks it owns, records
//!   results, and drains on shutdown;
//! - [`executor`] runs attempts: the [`StepExecutor`] trait, the registry of
//!   executors by kind, the HTTP executor of the step contract, and the
//!   built-in connectors (`executor::builtin`);
//! - [`workers`] serves worker queues to remote workers: long-poll claims,
//!   heartbeats and results;
//! - [`feed`] follows one entity's history live;
//! - [`time`] is the [`Clock`] every part reads.
//!
//! Architecture invariant: the runtime never decides what a result does to an
//! entity; it passes results to the store, which applies the core machine in
//! the transaction that persists them. The runtime only acts on what was
//! committed.

pub mod blobs;
pub mod compat;
pub mod config;
pub mod deps;
pub mod executor;
pub mod feed;
mod intake;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod notify;
pub mod registry;
pub mod retention;
mod scheduler;
pub mod schema;
pub mod secrets;
pub mod time;
pub mod trace;
mod validation;
pub mod workers;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ripen_store::{
    CommandOutcome, EntityData, EntityId, EntityRecord, HistoryEvent, Instrumented, IntakeOutcome,
    ListQuery, PostgresOptions, PostgresStore, SqliteOptions, SqliteStore, Store, StoreError,
};

pub use config::{Config, StorageUrl, TypeConfig};
pub use executor::builtin::ConfigRefused;
pub use executor::{ExecutorKind, ExecutorRegistry, StepExecutor};
pub use feed::EntityFeed;
pub use intake::{SubmitError, IDEMPOTENCY_KEY_LEN_MAX};
pub use scheduler::Drained;
pub use time::{Clock, ManualClock, StoreClock};
pub use workers::{Task, TaskId, WorkerError, Workers};

use intake::Intake;
use scheduler::Scheduler;

/// The parts of an engine that an embedder or a test may replace; `None`
/// takes the standard one.
#[derive(Default)]
pub struct EngineParts {
    /// The clock every decision reads; the standard one is the store's clock.
    pub clock: Option<Arc<dyn Clock>>,
    /// The executors of this node; the standard registry has HTTP, and the
    /// built-in connectors when the configuration has built-in steps. A
    /// registry given here is used as it is: no connector is checked.
    pub executors: Option<ExecutorRegistry>,
}

/// How many retries of one bulk retry are in flight at once: enough for
/// them to share the store's commits.
const BULK_RETRY_CONCURRENCY: usize = 64;

/// Running totals of what a node did since it started; see
/// [`Engine::activity`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Activity {
    /// Entities this node's intake created (replays not counted).
    pub created: u64,
    /// Entities that became ready through this node's decisions.
    pub ready: u64,
}

/// Starts what notifies: the hub that hears the store's commits, the
/// dispatcher of webhooks and mail, and the registration of the email sink.
async fn start_notifications(
    config: &Config,
    store: &Arc<dyn Store>,
    clock: &Arc<dyn Clock>,
    observers: &scheduler::Observers,
    background: &mut tokio::task::JoinSet<()>,
    registry: &Arc<registry::Registry>,
    payloads: &blobs::Payloads,
) -> Result<(Arc<notify::Hub>, notify::Notifications)> {
    let scheduler::Observers { metrics, tracer } = observers;
    let key = registry.master_key();
    let hub = Arc::new(notify::Hub::new(config.notify.stream_buffer));
    let heard = hub.clone();
    store.watch_changes(Arc::new(move |c: &ripen_store::Changes<'_>| heard.heard(c)));
    let poll = Duration::from_millis(config.engine.poll_interval_ms);
    // Live streams start from here; read before the node serves, so that
    // a stream opened at once misses nothing.
    let head = store.outbox_head().await.context("read the outbox head")?;
    background.spawn(hub.clone().run(store.clone(), head, poll));
    let n = &config.notify;
    let policy = ripen_notify::ssrf::Policy::new(&n.allow_networks)
        .map_err(|e| anyhow::anyhow!("{}: {e}", config.path.display()))?;
    let client = Arc::new(ripen_notify::client::SafeClient::with_system_defaults(
        policy.clone(),
    ));
    let email = match &n.email {
        Some(email) => {
            let sink = notify::EmailSink::new(email.clone(), store.clone(), payloads.clone())
                .map_err(|e| anyhow::anyhow!("{}: notify.email: {e}", config.path.display()))?;
            store
                .put_subscription(notify::EmailSink::subscription(email, clock.now_us()))
                .await
                .context("register the email sink")?;
            Some(Arc::new(sink) as Arc<dyn notify::Sink>)
        }
        None => {
            store
                .delete_subscription(ripen_store::notify::ANY_TENANT, notify::EMAIL_SUBSCRIPTION)
                .await
                .context("remove the email sink")?;
            None
        }
    };
    let webhook = notify::WebhookSink::new(
        ripen_notify::client::SafeClient::with_system_defaults(policy),
        key.clone(),
        Duration::from_millis(n.attempt_timeout_ms),
        clock.clone(),
    );
    let dispatcher = Arc::new(notify::Dispatcher {
        store: store.clone(),
        hub: hub.clone(),
        clock: clock.clone(),
        config: n.clone(),
        poll,
        webhook: Arc::new(webhook),
        email,
        metrics: notify::dispatcher::DispatchMetrics::new(metrics.registry())
            .context("register the notification metrics")?,
        tracer: tracer.clone(),
    });
    background.spawn(dispatcher.run());
    let registry = Arc::downgrade(registry);
    let types: notify::TypeNames = Arc::new(move || {
        registry
            .upgrade()
            .map(|r| r.type_names())
            .unwrap_or_default()
    });
    let notifications =
        notify::Notifications::new(store.clone(), client, key, clock.clone(), types);
    Ok((hub, notifications))
}

/// Why a node is not ready to serve.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// The node is draining before it exits; balancers should send elsewhere.
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("the store is not reachable: {0}")]
    Store(StoreError),
}

/// A running engine, and the one way in for the HTTP API: intake, reads,
/// operator commands, readiness and shutdown. What the store and the
/// scheduler must do together (a retry re-queues steps, then the scheduler
/// wakes) happens here, so that no caller can do half of it.
pub struct Engine {
    config: Arc<Config>,
    registry: Arc<registry::Registry>,
    store: Arc<dyn Store>,
    intake: Intake,
    scheduler: Scheduler,
    workers: Arc<Workers>,
    metrics: Arc<metrics::EngineMetrics>,
    tracer: Option<trace::Tracer>,
    clock: Arc<dyn Clock>,
    /// Where payloads are read and written: inline, or in `[blobs]`.
    payloads: blobs::Payloads,
    hub: Arc<notify::Hub>,
    notifications: notify::Notifications,
    shutting_down: AtomicBool,
    /// Entities this node's intake created; see [`Engine::activity`].
    created: AtomicU64,
    /// Tasks that live as long as the engine, aborted when it is dropped.
    _background: tokio::task::JoinSet<()>,
    /// Held for the life of the engine so that one embedded database has one owner.
    _lock: Option<std::fs::File>,
}

impl Engine {
    /// Opens the store, recovers the attempts a previous process left
    /// running, and starts the scheduler with the standard executors, on the
    /// store's clock.
    pub async fn start(config: Config) -> Result<Engine> {
        Engine::start_with(config, EngineParts::default()).await
    }

    /// Like [`Engine::start`], with the parts an embedder or a test replaces.
    pub async fn start_with(config: Config, parts: EngineParts) -> Result<Engine> {
        let config = Arc::new(config);
        // Built-in connectors check their tables before anything else is
        // opened: one that does not fit refuses the configuration
        // ([`ConfigRefused`]). A node that runs no step does not check.
        let builtin = match parts.executors {
            None if config.engine.execute => executor::BuiltinExecutor::start(&config).await?,
            _ => None,
        };
        // Filled from the type registry once the store is open: the store
        // decides with it, and the registry replaces it as versions arrive.
        let pipelines = ripen_store::Pipelines::default();
        let (store, lock) = open_store(&config, &pipelines).await?;
        let mut background = tokio::task::JoinSet::new();
        let clock: Arc<dyn Clock> = match parts.clock {
            Some(clock) => clock,
            None => {
                let clock = Arc::new(StoreClock::new());
                clock
                    .measure(store.as_ref())
                    .await
                    .context("read the store's clock")?;
                if store.is_shared() {
                    // Leases expire by the database clock, which drifts
                    // from ours.
                    background.spawn(clock.clone().track(store.clone()));
                }
                clock
            }
        };
        // Every configured type is a registered version before anything is
        // decided: recovery and claims run on the registry's pipelines.
        // The master key seals webhook secrets and connector passwords.
        let key = notify::master_key(config.notify.master_key_file.as_deref(), &config.storage)
            .map_err(|e| anyhow::anyhow!("{}: notify: {e}", config.path.display()))?
            .map(Arc::new);
        let registry = Arc::new(registry::Registry::new(
            store.clone(),
            pipelines.clone(),
            clock.clone(),
            key.clone(),
        ));
        registry.register_config(&config).await?;
        if let Some(key) = key.as_deref().filter(|k| k.rotating()) {
            let done = secrets::reseal(&store, key)
                .await
                .context("seal secrets again with the current master key")?;
            tracing::info!(
                secrets = done.secrets,
                definitions = done.definitions,
                written = done.written,
                unopened = done.unopened,
                "master key rotation: sealed again with the current key what previous keys had sealed"
            );
            if done.unopened > 0 {
                tracing::warn!(
                    unopened = done.unopened,
                    "some sealed values open with none of the master keys; they stay as they are"
                );
            }
        }
        // Other nodes may hold the leases of the running attempts of a shared
        // store: those are reclaimed only when they expire.
        if !store.is_shared() {
            // One process owns an embedded database, so whatever it left
            // running died with it.
            let lost = store
                .recover(clock.now_us())
                .await
                .context("recover attempts left running by the previous process")?;
            if lost > 0 {
                tracing::info!(
                    lost,
                    "recovered attempts left running by the previous process"
                );
            }
        }
        let metrics =
            Arc::new(metrics::EngineMetrics::new(store.as_ref()).context("register the metrics")?);
        // Payloads above `blobs.inline_max` live in the blob store.
        let payloads = match &config.blobs {
            Some(b) => blobs::Payloads::open(b, metrics.registry())
                .with_context(|| format!("{}: blobs", config.path.display()))?,
            None => blobs::Payloads::inline(),
        };
        let executors = Arc::new(
            match parts.executors {
                Some(executors) => executors,
                None => {
                    let http =
                        executor::HttpExecutor::with_tls(config.engine.concurrency, &config.tls)
                            .map_err(|e| anyhow::anyhow!("{}: tls: {e}", config.path.display()))?
                            .with_node(config.engine.node.as_deref());
                    let mut registry = ExecutorRegistry::empty();
                    registry.register(ExecutorKind::Http, [ripen_core::HTTP_QUEUE], Arc::new(http));
                    if let Some(builtin) = builtin {
                        registry.register(
                            ExecutorKind::Builtin,
                            [executor::BUILTIN_QUEUE],
                            Arc::new(builtin),
                        );
                    }
                    registry
                }
            }
            .with_payloads(payloads.clone()),
        );
        let tracer = trace::Tracer::from_env().map(|(tracer, export)| {
            background.spawn(export);
            tracer
        });
        let load = Arc::new(intake::IntakeLoad::new(!store.is_shared()));
        let local_queues: Vec<String> = executors
            .local_queues()
            .into_iter()
            .map(str::to_owned)
            .collect();
        let scheduler = Scheduler::start(
            store.clone(),
            pipelines.clone(),
            executors,
            clock.clone(),
            load.clone(),
            scheduler::Observers {
                metrics: metrics.clone(),
                tracer: tracer.clone(),
            },
            &config.engine,
        );
        let workers = Workers::new(
            store.clone(),
            &pipelines.known().catalog,
            clock.clone(),
            config.engine.waiting_claims_max,
            scheduler.waker(),
            tracer.clone(),
            payloads.clone(),
        );
        // Always: a version registered later may bring worker queues.
        background.spawn(
            workers
                .clone()
                .expire_leases(Duration::from_millis(config.engine.poll_interval_ms)),
        );
        // After each read of the registry the claims wake (entities that
        // could not run may run now) and the workers serve new queues.
        let woken = (
            scheduler.waker(),
            Arc::downgrade(&workers),
            pipelines.clone(),
        );
        registry.on_reload(Box::new(move || {
            woken.0.notify_one();
            if let Some(w) = woken.1.upgrade() {
                w.learn(&woken.2.known().catalog);
                w.wake(None);
            }
        }));
        background.spawn(
            registry
                .clone()
                .run(Duration::from_millis(config.engine.poll_interval_ms)),
        );
        watch_work(
            store.as_ref(),
            &workers,
            local_queues,
            (store.is_shared() && config.engine.execute).then(|| scheduler.waker()),
        );
        let intake = Intake::new(
            store.clone(),
            registry.clone(),
            scheduler.waker(),
            clock.clone(),
            load,
            &config.limits,
            payloads.clone(),
        );
        let (hub, notifications) = start_notifications(
            &config,
            &store,
            &clock,
            &scheduler::Observers {
                metrics: metrics.clone(),
                tracer: tracer.clone(),
            },
            &mut background,
            &registry,
            &payloads,
        )
        .await?;
        // The dependency resolver looks whenever new outbox rows are
        // readable: on SQLite after each commit that wrote some, on
        // PostgreSQL once a fan-out gave them positions.
        let resolver_wake = Arc::new(tokio::sync::Notify::new());
        let heard = resolver_wake.clone();
        store.watch_changes(Arc::new(move |c: &ripen_store::Changes<'_>| {
            if c.sequenced {
                heard.notify_one();
            }
        }));
        // The pruner removes what `[retention]` no longer keeps, off the
        // hot path, a batch per transaction.
        let prune_metrics = retention::PruneMetrics::new(metrics.registry())
            .context("register the retention metrics")?;
        background.spawn(retention::run(
            store.clone(),
            clock.clone(),
            config.retention.clone(),
            prune_metrics,
        ));
        if let (Some(config), Some(blobs)) = (&config.blobs, payloads.store()) {
            let sweep_metrics = blobs::SweepMetrics::new(metrics.registry())
                .context("register the blob metrics")?;
            background.spawn(blobs::run_sweep(
                blobs.clone(),
                store.clone(),
                config.clone(),
                sweep_metrics,
            ));
        }
        background.spawn(deps::run_resolver(
            store.clone(),
            clock.clone(),
            resolver_wake,
            scheduler.waker(),
        ));
        Ok(Engine {
            config,
            registry,
            store,
            intake,
            scheduler,
            workers,
            metrics,
            tracer,
            clock,
            payloads,
            hub,
            notifications,
            shutting_down: AtomicBool::new(false),
            created: AtomicU64::new(0),
            _background: background,
            _lock: lock,
        })
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Mints and stores an API key; the secret is in the answer only.
    pub async fn create_key(
        &self,
        tenant: &str,
        name: &str,
        scopes: keys::Scopes,
    ) -> Result<keys::Minted, SubmitError> {
        let minted = keys::mint(tenant, name, scopes, self.clock.now_us())
            .map_err(SubmitError::Malformed)?;
        self.store
            .put_key(minted.key.clone())
            .await
            .map_err(SubmitError::Store)?;
        Ok(minted)
    }

    /// The key a request presents, revoked or not.
    pub async fn key_by_secret(
        &self,
        secret: &str,
    ) -> Result<Option<ripen_store::ApiKey>, StoreError> {
        self.store.key_by_hash(&keys::hash(secret)).await
    }

    /// The keys of `tenant` (of every tenant for `None`).
    pub async fn keys(&self, tenant: Option<&str>) -> Result<Vec<ripen_store::ApiKey>, StoreError> {
        self.store.keys(tenant).await
    }

    /// Revokes a key of `tenant` (of any tenant for `None`).
    pub async fn revoke_key(
        &self,
        tenant: Option<&str>,
        id: &str,
    ) -> Result<Option<ripen_store::ApiKey>, StoreError> {
        self.store.revoke_key(tenant, id, self.clock.now_us()).await
    }

    /// Whether the store has ever held a key.
    pub async fn any_keys(&self) -> Result<bool, StoreError> {
        self.store.any_keys().await
    }

    /// Calls `heard` whenever any node creates or revokes a key.
    pub fn watch_keys(&self, heard: Arc<dyn Fn() + Send + Sync>) {
        keys::watch(self.store.as_ref(), heard);
    }

    /// Validates one submission and stores it durably; it runs once the
    /// store has committed it.
    pub async fn submit(
        &self,
        tenant: &str,
        type_name: &str,
        body: bytes::Bytes,
        idempotency_key: Option<&str>,
    ) -> Result<IntakeOutcome, SubmitError> {
        self.submit_traced(tenant, type_name, body, idempotency_key, None)
            .await
    }

    /// [`Engine::submit`] on behalf of a caller whose own trace is
    /// `caller` (`(trace id, span id)` of its `traceparent`): the entity's
    /// trace links to it.
    pub async fn submit_traced(
        &self,
        tenant: &str,
        type_name: &str,
        body: bytes::Bytes,
        idempotency_key: Option<&str>,
        caller: Option<([u8; 16], [u8; 8])>,
    ) -> Result<IntakeOutcome, SubmitError> {
        let started = std::time::Instant::now();
        let wall = std::time::SystemTime::now();
        let result = self
            .intake
            .submit(tenant, type_name, body, idempotency_key)
            .await;
        let outcome = match &result {
            Ok(IntakeOutcome::Created(_)) => "created",
            Ok(IntakeOutcome::Replayed(_)) => "replayed",
            Ok(IntakeOutcome::KeyReused { .. }) => "key_reused",
            Ok(IntakeOutcome::ReferenceRefused(_)) | Err(SubmitError::ReferenceRefused(_)) => {
                "reference_refused"
            }
            Err(SubmitError::BadReference(_)) => "bad_reference",
            Err(SubmitError::UnknownType(_)) => "unknown_type",
            Err(SubmitError::Malformed(_)) => "malformed",
            Err(SubmitError::JsonLimit {
                limit: limits::JsonLimit::Depth,
                ..
            }) => "too_deep",
            Err(SubmitError::JsonLimit { .. }) => "json_limit",
            Err(SubmitError::Invalid(_)) => "invalid",
            Err(SubmitError::TooCostly(_)) => "too_costly",
            Err(SubmitError::Overloaded(_))
            | Err(SubmitError::Store(StoreError::Overloaded(_))) => "overloaded",
            Err(SubmitError::BadKey) => "bad_key",
            Err(SubmitError::KeyInFlight) => "in_flight",
            Err(SubmitError::Store(StoreError::Unavailable(_)))
            | Err(SubmitError::BlobStore(_)) => "unavailable",
            Err(SubmitError::Store(_)) => "error",
        };
        // The label is bounded by the configuration: a type that does not
        // exist is counted as `unknown`.
        let type_label = match self.config.type_config(type_name) {
            Some(t) => t.name.as_str(),
            None => "unknown",
        };
        self.metrics.intake(type_label, outcome, started.elapsed());
        if outcome == "created" {
            self.created.fetch_add(1, Ordering::Relaxed);
        }
        if let (Some(tracer), Ok(IntakeOutcome::Created(record))) = (&self.tracer, &result) {
            tracer.record(trace::Span {
                trace_id: trace::trace_id(record.id),
                span_id: trace::root_span_id(record.id),
                parent: None,
                name: format!("intake {type_label}"),
                kind: trace::Kind::Server,
                start: wall,
                end: wall + started.elapsed(),
                attributes: vec![
                    ("ripen.entity_id", trace::Value::Str(record.id.to_string())),
                    (
                        "ripen.entity_type",
                        trace::Value::Str(type_label.to_owned()),
                    ),
                    (
                        "ripen.entity_version",
                        trace::Value::Int(i64::from(record.version)),
                    ),
                ],
                error: None,
                links: caller.into_iter().collect(),
            });
        }
        result
    }

    /// Every metric of this node in the Prometheus text format; see
    /// [`metrics`].
    pub async fn metrics_text(&self) -> String {
        self.metrics
            .render(
                self.store.as_ref(),
                self.clock.as_ref(),
                self.workers.waiting_claims(),
            )
            .await
    }

    pub async fn get(
        &self,
        tenant: &str,
        id: EntityId,
    ) -> Result<Option<EntityRecord>, StoreError> {
        self.store.get(tenant, id).await
    }

    /// The entity with its payload and outputs, whatever its status: the
    /// caller serves it as consumable only when it is ready.
    pub async fn get_data(
        &self,
        tenant: &str,
        id: EntityId,
    ) -> Result<Option<EntityData>, StoreError> {
        match self.store.get_data(tenant, id).await? {
            Some(data) => Ok(Some(read_data(&self.payloads, data).await?)),
            None => Ok(None),
        }
    }

    /// Newest first; the caller bounds `query.limit`.
    pub async fn list(
        &self,
        tenant: &str,
        query: ListQuery,
    ) -> Result<Vec<EntityRecord>, StoreError> {
        self.store.list(tenant, query).await
    }

    /// History events with `seq > after_seq`, oldest first, at most `limit`;
    /// `None` for an unknown entity.
    pub async fn events(
        &self,
        tenant: &str,
        id: EntityId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Option<Vec<HistoryEvent>>, StoreError> {
        self.store.events(tenant, id, after_seq, limit).await
    }

    /// Follows one entity's history live from `after_seq`; `None` for an
    /// unknown entity.
    pub async fn follow(
        &self,
        tenant: &str,
        id: EntityId,
        after_seq: u64,
    ) -> Result<Option<EntityFeed>, StoreError> {
        if self.store.get(tenant, id).await?.is_none() {
            return Ok(None);
        }
        Ok(Some(EntityFeed::new(
            self.store.clone(),
            self.hub.follow(id),
            tenant,
            id,
            after_seq,
        )))
    }

    /// Waits up to `wait` for the entity to settle (a terminal status with
    /// no attempt left running), then returns it as `get_data` does; `None`
    /// for an unknown entity.
    pub async fn wait_settled(
        &self,
        tenant: &str,
        id: EntityId,
        wait: Duration,
    ) -> Result<Option<EntityData>, StoreError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut following = self.hub.follow(id);
        loop {
            let Some(data) = self.store.get_data(tenant, id).await? else {
                return Ok(None);
            };
            let settled = data.record.status.is_terminal();
            if settled || tokio::time::Instant::now() >= deadline {
                return Ok(Some(read_data(&self.payloads, data).await?));
            }
            let _ = tokio::time::timeout_at(deadline, following.changed()).await;
        }
    }

    /// Every status change from now on, as this node hears of them.
    pub fn live_notifications(
        &self,
    ) -> tokio::sync::broadcast::Receiver<Arc<ripen_store::Notification>> {
        self.hub.live()
    }

    /// Status changes after outbox position `after`, oldest first, at most
    /// `limit`: what a live stream resumes from.
    pub async fn notifications_after(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<ripen_store::Notification>, StoreError> {
        let entries = self.store.outbox(after, limit).await?;
        Ok(entries
            .iter()
            .filter_map(ripen_store::Notification::from_outbox)
            .collect())
    }

    /// The webhook subscriptions API.
    pub fn notifications(&self) -> &notify::Notifications {
        &self.notifications
    }

    /// Cancels a pending entity. Its running attempts are skipped, and their
    /// late results are refused as stale.
    pub async fn cancel(&self, tenant: &str, id: EntityId) -> Result<CommandOutcome, StoreError> {
        self.store.cancel(tenant, id, self.clock.now_us()).await
    }

    /// Re-queues the failed and skipped steps of a failed entity and wakes
    /// the scheduler, so that they run without waiting for its next poll.
    pub async fn retry(&self, tenant: &str, id: EntityId) -> Result<CommandOutcome, StoreError> {
        let outcome = self.store.retry(tenant, id, self.clock.now_us()).await?;
        if matches!(outcome, CommandOutcome::Applied(_)) {
            self.scheduler.waker().notify_one();
        }
        Ok(outcome)
    }

    /// Retries every failed entity of `type_name` among `ids`, as
    /// [`Engine::retry`] does one, a few at a time so that they share the
    /// store's commits; wakes the scheduler once. Unknown ids, entities of
    /// another type and entities that are not failed are left as they are.
    /// Returns how many were re-queued; after a store error, some may have
    /// been, and asking again retries only those still failed.
    pub async fn retry_many(
        &self,
        tenant: &str,
        type_name: &str,
        ids: &[EntityId],
    ) -> Result<u64, StoreError> {
        let mut requeued = 0;
        for chunk in ids.chunks(BULK_RETRY_CONCURRENCY) {
            let mut retries = tokio::task::JoinSet::new();
            for &id in chunk {
                let store = self.store.clone();
                let (tenant, type_name) = (tenant.to_owned(), type_name.to_owned());
                let now_us = self.clock.now_us();
                retries.spawn(async move {
                    match store.get(&tenant, id).await? {
                        Some(r) if r.type_name == type_name => {
                            let outcome = store.retry(&tenant, id, now_us).await?;
                            Ok(matches!(outcome, CommandOutcome::Applied(_)))
                        }
                        _ => Ok::<bool, StoreError>(false),
                    }
                });
            }
            let mut failure = None;
            while let Some(joined) = retries.join_next().await {
                match joined {
                    Ok(Ok(applied)) => requeued += u64::from(applied),
                    // Pinned to a version that cannot run: not retried.
                    Ok(Err(StoreError::UnknownPipeline { .. })) => {}
                    Ok(Err(e)) => failure = Some(e),
                    Err(e) => failure = Some(StoreError::Internal(format!("a retry task: {e}"))),
                }
            }
            if requeued > 0 {
                self.scheduler.waker().notify_one();
            }
            if let Some(e) = failure {
                return Err(e);
            }
        }
        Ok(requeued)
    }

    /// Retries the newest `limit` failed entities of `type_name`; see
    /// [`Engine::retry_many`].
    pub async fn retry_failed(
        &self,
        tenant: &str,
        type_name: &str,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let failed = self
            .store
            .list(
                tenant,
                ListQuery {
                    type_name: Some(type_name.to_owned()),
                    status: Some(ripen_core::EntityStatus::Failed),
                    limit,
                    ..ListQuery::default()
                },
            )
            .await?;
        let ids: Vec<EntityId> = failed.iter().map(|r| r.id).collect();
        self.retry_many(tenant, type_name, &ids).await
    }

    /// Entities by type and status (and due work by queue), counted by the
    /// store now; the caller bounds how often it asks.
    pub async fn counts(&self) -> Result<ripen_store::Counts, StoreError> {
        self.store.counts(self.clock.now_us()).await
    }

    /// What this node has done since it started: entities it created and
    /// entities its decisions made ready. Cheap: counters, no store call.
    pub fn activity(&self) -> Activity {
        let ready = self
            .metrics
            .registry()
            .gather()
            .iter()
            .filter(|f| f.name() == "ripen_entity_status_changes_total")
            .flat_map(|f| f.get_metric())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "status" && l.value() == "ready")
            })
            .map(|m| m.get_counter().get_value() as u64)
            .sum();
        Activity {
            created: self.created.load(Ordering::Relaxed),
            ready,
        }
    }

    /// Claims up to `max` tasks of worker queue `queue` for `worker`,
    /// waiting up to `wait` for work when none is due.
    pub async fn claim_tasks(
        &self,
        queue: &str,
        worker: Option<&str>,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Task>, WorkerError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(WorkerError::ShuttingDown);
        }
        self.workers.claim(queue, worker, max, wait).await
    }

    /// Extends the lease of a worker's task; the new expiry.
    pub async fn heartbeat_task(
        &self,
        id: TaskId,
        lease: &str,
    ) -> Result<ripen_core::UnixMicros, WorkerError> {
        self.workers.heartbeat(id, lease).await
    }

    /// Records a worker's result for its task.
    pub async fn report_task(
        &self,
        id: TaskId,
        lease: &str,
        outcome: ripen_store::Outcome,
    ) -> Result<(), WorkerError> {
        self.workers.report(id, lease, outcome).await
    }

    /// The pipeline of a type version this node can run.
    pub fn pipeline(&self, type_name: &str, version: u32) -> Option<Arc<ripen_core::Pipeline>> {
        self.registry.pipeline(type_name, version)
    }

    /// The type registry: every version of every type, and registration.
    pub fn registry(&self) -> &registry::Registry {
        &self.registry
    }

    /// Registers a version of a type at run time; see
    /// [`registry::Registry::register`].
    pub async fn register_type(
        &self,
        type_name: &str,
        built: &registry::Built,
        force: bool,
    ) -> Result<registry::Registration, registry::RegisterError> {
        self.registry.check_references(type_name, built)?;
        self.registry.register(type_name, built, force, None).await
    }

    /// Whether this node can serve requests now.
    pub async fn readiness(&self) -> Result<(), NotReady> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(NotReady::ShuttingDown);
        }
        self.store.ping().await.map_err(NotReady::Store)
    }

    /// Drains the node: stops claiming, waits up to `engine.shutdown_grace`
    /// for the running attempts, and records their results. Intake and reads
    /// keep working meanwhile; what is submitted now is durable and runs
    /// after the next start (or on another node sharing the store), while
    /// readiness reports the node as shutting down.
    pub async fn shutdown(&self) -> Drained {
        self.shutting_down.store(true, Ordering::SeqCst);
        // Waiting workers answer now and claim from another node; their
        // results and heartbeats are still taken while the node drains.
        self.workers.close();
        let grace = Duration::from_millis(self.config.engine.shutdown_grace_ms);
        self.scheduler.shutdown(grace).await
    }
}

/// Routes the store's work notifications: a local queue wakes the
/// scheduler (when `scheduler` is set: a shared store, where other nodes
/// make work for this one), a worker queue wakes the claims waiting on it.
/// `data` with its payload read from the blob store when it is there: a
/// lost blob is a store failure, an unreachable blob store an unavailable
/// store.
pub async fn read_data(
    payloads: &blobs::Payloads,
    mut data: EntityData,
) -> Result<EntityData, StoreError> {
    let Some(stored) = data.payload.as_deref().filter(|p| blobs::is_blob(p)) else {
        return Ok(data);
    };
    let json = match payloads.read(data.record.id, stored).await {
        Ok(json) => json.into_owned(),
        Err(e) if e.is_transient() => return Err(StoreError::Unavailable(e.to_string())),
        Err(e) => return Err(StoreError::Internal(e.to_string())),
    };
    data.payload = Some(json);
    Ok(data)
}

fn watch_work(
    store: &dyn Store,
    workers: &Arc<Workers>,
    local_queues: Vec<String>,
    scheduler: Option<Arc<tokio::sync::Notify>>,
) {
    // Weak: the store outlives neither the engine nor its workers.
    let workers = Arc::downgrade(workers);
    store.watch_work(Arc::new(move |queue: Option<&str>| {
        let local = queue.is_none_or(|q| local_queues.iter().any(|l| l == q));
        if local {
            if let Some(s) = &scheduler {
                s.notify_one();
            }
        }
        if queue.is_none() || !local {
            if let Some(w) = workers.upgrade() {
                w.wake(queue);
            }
        }
    }));
}

/// Opens the configured store: on SQLite, with the lock that makes this
/// process the database's one owner (held as long as the file handle is).
/// What the engine starts on, and what `ripen keys create --config` writes
/// to with no server running.
pub async fn open_store(
    config: &Config,
    pipelines: &ripen_store::Pipelines,
) -> Result<(Arc<dyn Store>, Option<std::fs::File>)> {
    Ok(match &config.storage {
        StorageUrl::Sqlite(path) => {
            let lock = lock_database(path)?;
            let mut opts = SqliteOptions::new(path.clone());
            opts.lease_grace_ms = config.engine.lease_grace_ms;
            opts.write_queue_max = config.limits.write_queue_max;
            let store = SqliteStore::open(opts, pipelines.clone())
                .with_context(|| format!("open the database {}", path.display()))?;
            (Arc::new(Instrumented::new(store)), Some(lock))
        }
        StorageUrl::Postgres(url) => {
            let store = connect_postgres(url, config, pipelines).await?;
            (Arc::new(Instrumented::new(store)), None)
        }
    })
}

/// How long a starting node waits for PostgreSQL to answer.
const POSTGRES_CONNECT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// Connects to PostgreSQL, waiting a while for it if it is still starting.
async fn connect_postgres(
    url: &str,
    config: &Config,
    pipelines: &ripen_store::Pipelines,
) -> Result<PostgresStore> {
    let deadline = tokio::time::Instant::now() + POSTGRES_CONNECT_PATIENCE;
    loop {
        let mut opts = PostgresOptions::new(url);
        opts.lease_grace_ms = config.engine.lease_grace_ms;
        match PostgresStore::connect(opts, pipelines.clone()).await {
            Ok(store) => return Ok(store),
            Err(StoreError::Unavailable(e)) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "PostgreSQL is not reachable yet; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => return Err(anyhow::anyhow!(e).context("connect to PostgreSQL")),
        }
    }
}

/// Takes an exclusive lock beside the database file, so that a second server
/// on the same file fails fast instead of stealing the first one's leases.
fn lock_database(path: &std::path::Path) -> Result<std::fs::File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("create the directory {}", dir.display()))?;
    }
    let lock_path = path.with_extension("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("open the lock file {}", lock_path.display()))?;
    file.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "the database {} is in use by another ripen process (lock {})",
            path.display(),
            lock_path.display()
        )
    })?;
    Ok(file)
}
