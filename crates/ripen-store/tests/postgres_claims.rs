//! What only a store shared by many nodes must show: concurrent claimers
//! never share a step, one idempotency key makes one entity across nodes,
//! migrations race safely, nodes wake each other, and a crashed database is
//! used again once it is back, without restarting anything.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ripen_core::{Catalog, EntityStatus, Executor, Pipeline, RetryPolicy, StepDef, StepStatus};
use ripen_store::suite::{catalog, T0};
use ripen_store::{
    CommandOutcome, Completion, CompletionResult, EntityId, IntakeOutcome, ListQuery, NewEntity,
    Outcome, PostgresOptions, PostgresStore, Store, StoreError, DEFAULT_TENANT,
};
use ripen_testkit::PgCluster;

/// How long any wait in these tests may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(60);

/// `chain`: `a`, then `b`, then `c`, each critical, with a long timeout so
/// that no lease expires while the test runs at a fixed time.
fn chain_catalog() -> Arc<Catalog> {
    let step = |name: &str, needs: &[&str]| StepDef {
        name: name.into(),
        needs: needs.iter().map(|n| n.to_string()).collect(),
        critical: true,
        timeout_ms: 60_000,
        retry: RetryPolicy::default(),
        executor: Executor::Http {
            url: format!("http://127.0.0.1:9/{name}"),
        },
        compensate: None,
    };
    let chain = Pipeline::new(vec![step("a", &[]), step("b", &["a"]), step("c", &["b"])])
        .expect("chain is a valid pipeline");
    let mut catalog = Catalog::default();
    catalog.insert("chain", 1, chain);
    Arc::new(catalog)
}

/// One claim of a run: (entity, step, epoch, claimer).
type Claim = (EntityId, usize, u64, usize);

fn entity(type_name: &str, payload: &str, key: Option<&str>) -> NewEntity {
    NewEntity {
        id: EntityId::new_v7(),
        tenant: DEFAULT_TENANT.into(),
        type_name: type_name.into(),
        version: 1,
        payload: payload.into(),
        idempotency_key: key.map(str::to_owned),
        refs: Vec::new(),
    }
}

async fn connect(url: &str, pool_size: usize, catalog: Arc<Catalog>) -> PostgresStore {
    let mut opts = PostgresOptions::new(url);
    opts.pool_size = pool_size;
    PostgresStore::connect(opts, catalog)
        .await
        .expect("connect the postgres store")
}

fn success() -> Outcome {
    Outcome::Succeeded {
        output: Some(r#"{"ok": true}"#.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claimers_claim_each_step_exactly_once() {
    const ENTITIES: usize = 300;
    const CLAIMERS: usize = 64;
    const CLAIM_LIMIT: usize = 4;
    let url = PgCluster::shared().create_database();
    let creator = Arc::new(connect(&url, 16, chain_catalog()).await);
    let mut creates = tokio::task::JoinSet::new();
    for i in 0..ENTITIES {
        let creator = creator.clone();
        creates.spawn(async move {
            let outcome = creator
                .create(entity("chain", &format!("{{\"i\": {i}}}"), None), T0)
                .await
                .expect("create");
            match outcome {
                IntakeOutcome::Created(record) => record.id,
                other => panic!("expected Created, got {other:?}"),
            }
        });
    }
    let mut ids = BTreeSet::new();
    while let Some(id) = creates.join_next().await {
        ids.insert(id.expect("create task"));
    }
    assert_eq!(ids.len(), ENTITIES);

    let mut stores = Vec::with_capacity(CLAIMERS);
    for i in 0..CLAIMERS {
        stores.push(Arc::new(connect(&url, 1 + i % 2, chain_catalog()).await));
    }
    let claims: Arc<Mutex<Vec<Claim>>> = Arc::default();
    let finished = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut claimers = tokio::task::JoinSet::new();
    for (n, store) in stores.iter().enumerate() {
        let (store, claims, finished) = (store.clone(), claims.clone(), finished.clone());
        claimers.spawn(async move {
            while finished.load(Ordering::SeqCst) < ENTITIES {
                assert!(started.elapsed() < DEADLINE, "the claimers did not finish");
                // Time stands still at T0, so no lease ever expires: a step
                // claimed twice would be two live leases at once.
                let batch = store
                    .claim_due(
                        ripen_store::Claim::local(ripen_core::HTTP_QUEUE, CLAIM_LIMIT),
                        T0,
                    )
                    .await
                    .expect("claim_due");
                if batch.attempts.is_empty() {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                let mut work = batch.attempts;
                while let Some(attempt) = work.pop() {
                    claims.lock().unwrap().push((
                        attempt.entity_id,
                        attempt.step,
                        attempt.epoch,
                        n,
                    ));
                    let completion = Completion {
                        entity_id: attempt.entity_id,
                        step: attempt.step,
                        epoch: attempt.epoch,
                        outcome: success(),
                    };
                    let done = store
                        .complete(vec![completion], Some(ripen_core::HTTP_QUEUE), T0)
                        .await
                        .expect("complete");
                    assert_eq!(done.results, vec![CompletionResult::Applied], "{attempt:?}");
                    if attempt.step_name == "c" {
                        finished.fetch_add(1, Ordering::SeqCst);
                    }
                    // The next step of the chain comes back claimed at once.
                    work.extend(done.claimed);
                }
            }
        });
    }
    while let Some(joined) = claimers.join_next().await {
        joined.expect("claimer task");
    }
    let elapsed = started.elapsed();

    let claims = claims.lock().unwrap().clone();
    let mut seen: HashMap<(EntityId, usize), u64> = HashMap::new();
    for &(id, step, epoch, _) in &claims {
        if let Some(first) = seen.insert((id, step), epoch) {
            panic!("step {step} of {id} was claimed twice (epochs {first} and {epoch})");
        }
        assert_eq!(epoch, 1, "no step needed a second attempt");
    }
    assert_eq!(claims.len(), ENTITIES * 3, "each step claimed exactly once");
    let claimers_with_work: BTreeSet<usize> = claims.iter().map(|c| c.3).collect();
    assert!(
        claimers_with_work.len() > 1,
        "the work was shared between claimers"
    );
    for id in &ids {
        let record = creator
            .get(DEFAULT_TENANT, *id)
            .await
            .expect("get")
            .expect("found");
        assert_eq!(record.status, EntityStatus::Ready, "{record:?}");
        for step in &record.steps {
            assert_eq!(
                (step.state.status, step.state.attempts),
                (StepStatus::Succeeded, 1)
            );
        }
    }
    for store in &stores {
        assert_eq!(store.stale_completions(), 0);
    }
    let left = creator
        .claim_due(ripen_store::Claim::local(ripen_core::HTTP_QUEUE, 100), T0)
        .await
        .expect("claim_due");
    assert!(left.attempts.is_empty());
    assert_eq!(left.next_due_us, None);
    eprintln!(
        "{CLAIMERS} claimers ran {} steps of {ENTITIES} entities in {elapsed:?} ({} claimers got work)",
        claims.len(),
        claimers_with_work.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_through_two_stores_makes_one_entity() {
    const ROUNDS: usize = 20;
    let url = PgCluster::shared().create_database();
    let one = connect(&url, 4, catalog()).await;
    let two = connect(&url, 4, catalog()).await;
    let mut created = BTreeSet::new();
    for round in 0..ROUNDS {
        let key = format!("key-{round}");
        let same_body = round % 2 == 0;
        let first = entity("single", r#"{"n": 1}"#, Some(&key));
        let second = entity(
            "single",
            if same_body {
                r#"{"n": 1}"#
            } else {
                r#"{"n": 2}"#
            },
            Some(&key),
        );
        // Odd rounds race two nodes; every fourth round races two creates
        // of one node, which may share a batch.
        let (a, b) = if round % 4 == 3 {
            tokio::join!(one.create(first, T0), one.create(second, T0))
        } else {
            tokio::join!(one.create(first, T0), two.create(second, T0))
        };
        let (a, b) = (a.expect("create"), b.expect("create"));
        let (winner, loser) = match (&a, &b) {
            (IntakeOutcome::Created(record), other) | (other, IntakeOutcome::Created(record)) => {
                (record.clone(), other.clone())
            }
            _ => panic!("round {round}: nothing was created: {a:?} {b:?}"),
        };
        match loser {
            IntakeOutcome::Replayed(record) if same_body => assert_eq!(record.id, winner.id),
            IntakeOutcome::KeyReused { entity_id } if !same_body => {
                assert_eq!(entity_id, winner.id)
            }
            other => panic!("round {round}: the second create answered {other:?}"),
        }
        created.insert(winner.id);
    }
    let listed = two
        .list(
            DEFAULT_TENANT,
            ListQuery {
                limit: 1_000,
                ..ListQuery::default()
            },
        )
        .await
        .expect("list");
    let listed: BTreeSet<EntityId> = listed.iter().map(|r| r.id).collect();
    assert_eq!(listed, created, "one entity per key, nothing else");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_works_again_after_the_database_restarts() {
    let cluster = PgCluster::start();
    let url = cluster.create_database();
    let store = connect(&url, 4, catalog()).await;
    let before = match store
        .create(entity("single", "{}", Some("before")), T0)
        .await
        .expect("create")
    {
        IntakeOutcome::Created(record) => record,
        other => panic!("expected Created, got {other:?}"),
    };
    // Fill the pool, so that the crash breaks connections the store holds.
    let pings: Vec<_> = (0..4).map(|_| store.ping()).collect();
    for ping in futures_util::future::join_all(pings).await {
        ping.expect("ping");
    }

    cluster.restart_immediate();
    let restarted = Instant::now();
    let mut failures = 0;
    loop {
        match store.create(entity("single", "{}", None), T0).await {
            Ok(IntakeOutcome::Created(_)) => break,
            Err(StoreError::Unavailable(_)) => failures += 1,
            other => panic!("after a restart a create either works or is unavailable: {other:?}"),
        }
        assert!(restarted.elapsed() < DEADLINE, "the store did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "usable again {:?} after the restart, {failures} unavailable answers",
        restarted.elapsed()
    );
    assert_eq!(
        store.get(DEFAULT_TENANT, before.id).await.expect("get"),
        Some(before.clone()),
        "a committed entity survives the crash"
    );

    // While the database is down, every call is unavailable: no hang, no panic.
    cluster.stop();
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.create(entity("single", "{}", None), T0).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store
            .claim_due(ripen_store::Claim::local(ripen_core::HTTP_QUEUE, 10), T0)
            .await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.get(DEFAULT_TENANT, before.id).await,
        Err(StoreError::Unavailable(_))
    ));

    cluster.start_again();
    let back = Instant::now();
    while store.ping().await.is_err() {
        assert!(back.elapsed() < DEADLINE, "the store did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let replay = store
        .create(entity("single", "{}", Some("before")), T0)
        .await
        .expect("create");
    assert!(matches!(replay, IntakeOutcome::Replayed(r) if r.id == before.id));
    let claimed = store
        .claim_due(ripen_store::Claim::local(ripen_core::HTTP_QUEUE, 10), T0)
        .await
        .expect("claim_due");
    assert_eq!(claimed.attempts.len(), 2, "{claimed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_all_succeed() {
    const NODES: usize = 8;
    let url = PgCluster::shared().create_database();
    let connects =
        (0..NODES).map(|_| PostgresStore::connect(PostgresOptions::new(&url), catalog()));
    let stores: Vec<PostgresStore> = futures_util::future::join_all(connects)
        .await
        .into_iter()
        .map(|s| s.expect("connect while other nodes migrate"))
        .collect();
    for store in &stores {
        store
            .create(entity("single", "{}", None), T0)
            .await
            .expect("create");
    }
    let listed = stores[0]
        .list(
            DEFAULT_TENANT,
            ListQuery {
                limit: 100,
                ..ListQuery::default()
            },
        )
        .await
        .expect("list");
    assert_eq!(listed.len(), NODES, "every node writes the same tables");
}

/// A database of schema version 1 (before lease holders) is brought to the
/// current version in place, its entities and outbox kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_schema_gains_lease_holders() {
    let url = PgCluster::shared().create_database();
    let store = connect(&url, 1, catalog()).await;
    let created = store
        .create(entity("mixed", "{}", None), T0)
        .await
        .expect("create");
    let IntakeOutcome::Created(record) = created else {
        panic!("expected Created, got {created:?}");
    };
    drop(store);
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect raw");
    let driver = tokio::spawn(connection);
    client
        .batch_execute(
            "ALTER TABLE steps DROP COLUMN holder;
             ALTER TABLE entities DROP COLUMN deps;
             DROP TABLE cursors, subscriptions, deliveries, dependencies;
             ALTER TABLE outbox DROP COLUMN pos;
             UPDATE ripen_schema SET version = 1",
        )
        .await
        .expect("go back to version 1");
    let store = connect(&url, 1, catalog()).await;
    let version: i32 = client
        .query_one("SELECT version FROM ripen_schema", &[])
        .await
        .expect("version")
        .get(0);
    assert_eq!(version, 6, "migrated to the current schema");
    drop(client);
    // Its outbox rows count as fanned out: they have positions, and the
    // fan-out starts after them.
    let outbox = store.outbox(0, 10).await.expect("outbox");
    assert_eq!(outbox.len(), 1, "the created row, positioned");
    assert_eq!(store.outbox_head().await.expect("head"), outbox[0].id);
    assert_eq!(store.fan_out(10, T0).await.expect("fan out").rows, 0);
    // The dependency resolver starts at the head too: nothing waited then.
    let round = store.resolve_dependencies(T0).await.expect("resolve");
    assert_eq!((round.last_pos, round.rows), (outbox[0].id, 0));
    let _ = driver.await;
    let fetch = store
        .claim_due(ripen_store::Claim::local(ripen_core::HTTP_QUEUE, 10), T0)
        .await
        .expect("claim")
        .attempts;
    let done = Completion {
        entity_id: record.id,
        step: fetch[0].step,
        epoch: fetch[0].epoch,
        outcome: Outcome::Succeeded { output: None },
    };
    store
        .complete(vec![done], None, T0)
        .await
        .expect("complete");
    let claim = ripen_store::Claim::by("worker:scoring", 1, Some("w1"));
    assert_eq!(
        store
            .claim_due(claim, T0)
            .await
            .expect("claim")
            .attempts
            .len(),
        1
    );
    let got = store
        .get(DEFAULT_TENANT, record.id)
        .await
        .expect("get")
        .expect("kept");
    assert_eq!(got.steps[1].state.holder.as_deref(), Some("w1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused() {
    let url = PgCluster::shared().create_database();
    drop(connect(&url, 1, catalog()).await);
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect raw");
    let driver = tokio::spawn(connection);
    client
        .batch_execute("UPDATE ripen_schema SET version = 99")
        .await
        .expect("bump version");
    drop(client);
    let _ = driver.await;
    let err = PostgresStore::connect(PostgresOptions::new(&url), catalog())
        .await
        .expect_err("newer schema");
    assert!(err.to_string().contains("schema version 99"), "{err}");
}

/// Watches `store` for work: a notify woken on every call, and the queues heard.
#[allow(clippy::type_complexity)]
fn watch(store: &PostgresStore) -> (Arc<tokio::sync::Notify>, Arc<Mutex<Vec<Option<String>>>>) {
    let waker = Arc::new(tokio::sync::Notify::new());
    let heard = Arc::new(Mutex::new(Vec::new()));
    let (w, h) = (waker.clone(), heard.clone());
    store.watch_work(Arc::new(move |queue: Option<&str>| {
        h.lock().unwrap().push(queue.map(str::to_owned));
        w.notify_one();
    }));
    (waker, heard)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_wake_each_other() {
    let url = PgCluster::shared().create_database();
    let listening = connect(&url, 2, catalog()).await;
    let other = connect(&url, 2, catalog()).await;
    let (waker, heard) = watch(&listening);
    let woken = || async {
        tokio::time::timeout(Duration::from_secs(10), waker.notified())
            .await
            .is_ok()
    };
    // The listener wakes every queue as soon as it listens (it may have
    // missed work).
    assert!(woken().await, "no wake-up once listening");
    assert_eq!(heard.lock().unwrap().pop(), Some(None), "any queue");

    let created = other
        .create(entity("single", "{}", None), T0)
        .await
        .expect("create");
    let IntakeOutcome::Created(record) = created else {
        panic!("expected Created, got {created:?}");
    };
    assert!(woken().await, "a create on another node wakes this one");
    assert_eq!(
        heard.lock().unwrap().pop(),
        Some(Some(ripen_core::HTTP_QUEUE.to_owned())),
        "the notification names the queue of the runnable step"
    );

    let attempt = other
        .claim_due(ripen_store::Claim::local(ripen_core::HTTP_QUEUE, 10), T0)
        .await
        .expect("claim_due")
        .attempts
        .pop()
        .expect("one attempt");
    let failure = Completion {
        entity_id: attempt.entity_id,
        step: attempt.step,
        epoch: attempt.epoch,
        outcome: Outcome::Failed {
            error: "400".into(),
            retryable: false,
            retry_after_ms: None,
        },
    };
    other
        .complete(vec![failure], Some(ripen_core::HTTP_QUEUE), T0)
        .await
        .expect("complete");
    assert!(matches!(
        other
            .retry(DEFAULT_TENANT, record.id, T0)
            .await
            .expect("retry"),
        CommandOutcome::Applied(_)
    ));
    assert!(woken().await, "an operator retry wakes other nodes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_reconnects_after_a_restart() {
    let cluster = PgCluster::start();
    let url = cluster.create_database();
    let listening = connect(&url, 1, catalog()).await;
    let other = connect(&url, 1, catalog()).await;
    let (waker, _heard) = watch(&listening);
    let woken = || async {
        tokio::time::timeout(Duration::from_secs(20), waker.notified())
            .await
            .is_ok()
    };
    assert!(woken().await, "no wake-up once listening");
    cluster.restart_immediate();
    // Reconnected: it wakes once, then hears other nodes again.
    assert!(woken().await, "no wake-up after reconnecting");
    let deadline = Instant::now() + DEADLINE;
    loop {
        match other.create(entity("single", "{}", None), T0).await {
            Ok(_) => break,
            Err(StoreError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("create after the restart: {e}"),
        }
    }
    assert!(
        woken().await,
        "a create after the restart wakes the listener"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_completions_are_counted() {
    let url = PgCluster::shared().create_database();
    let store = connect(&url, 2, catalog()).await;
    store
        .create(entity("single", "{}", None), T0)
        .await
        .expect("create");
    let attempt = store
        .claim_due(ripen_store::Claim::local(ripen_core::HTTP_QUEUE, 10), T0)
        .await
        .expect("claim_due")
        .attempts
        .pop()
        .expect("one attempt");
    let completion = Completion {
        entity_id: attempt.entity_id,
        step: attempt.step,
        epoch: attempt.epoch,
        outcome: success(),
    };
    let batch = store
        .complete(
            vec![completion.clone(), completion],
            Some(ripen_core::HTTP_QUEUE),
            T0,
        )
        .await
        .expect("complete");
    assert_eq!(
        batch.results,
        vec![CompletionResult::Applied, CompletionResult::Stale]
    );
    assert_eq!(store.stale_completions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clock_is_the_database_clock() {
    let url = PgCluster::shared().create_database();
    let store = connect(&url, 1, catalog()).await;
    assert!(store.is_shared(), "a shared store never recovers at start");
    let local = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_micros() as i64;
    let db = store.clock_us().await.expect("clock");
    // The database runs on this machine: the clocks agree closely.
    assert!((db - local).abs() < 5_000_000, "db {db} vs local {local}");
    let later = store.clock_us().await.expect("clock");
    assert!(later >= db, "the clock moves forward");
}

/// Two nodes prune one database at once: each payload is pruned once (one
/// node holds the pass at a time, the other returns at once), and intake
/// goes on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_prune_each_payload_once_while_intake_goes_on() {
    const ENTITIES: usize = 40;
    let url = PgCluster::shared().create_database();
    let one = Arc::new(connect(&url, 4, catalog()).await);
    let two = Arc::new(connect(&url, 4, catalog()).await);
    let mut ids = Vec::new();
    for i in 0..ENTITIES {
        let e = entity("single", &format!("{{\"i\": {i}}}"), None);
        ids.push(e.id);
        one.create(e, T0).await.expect("create");
    }
    let mut left = ENTITIES;
    while left > 0 {
        let batch = one
            .claim_due(ripen_store::Claim::local("http", ENTITIES), T0)
            .await
            .expect("claim");
        let done: Vec<Completion> = batch
            .attempts
            .iter()
            .map(|a| Completion {
                entity_id: a.entity_id,
                step: a.step,
                epoch: a.epoch,
                outcome: success(),
            })
            .collect();
        left -= done.len();
        one.complete(done, None, T0).await.expect("complete");
    }
    let later = T0 + 10_000_000;
    let prune = ripen_store::Prune {
        payload_before_us: Some(T0 + 1),
        keys_before_us: Some(T0 + 1),
        entities_before_us: None,
        limit: 3,
        dry_run: false,
    };
    let pruner = |store: Arc<PostgresStore>| {
        tokio::spawn(async move {
            let (mut total, mut empty) = (0u64, 0);
            let started = Instant::now();
            // Until a few passes in a row find nothing (the other node may
            // hold the pass now and then).
            while empty < 20 && started.elapsed() < DEADLINE {
                let p = store.prune(prune, later).await.expect("prune");
                total += p.payloads;
                empty = if p.payloads == 0 { empty + 1 } else { 0 };
            }
            total
        })
    };
    let (a, b) = (pruner(one.clone()), pruner(two.clone()));
    // Intake meanwhile: new entities commit while the pruners run.
    for i in 0..10 {
        let e = entity("single", &format!("{{\"new\": {i}}}"), None);
        assert!(matches!(
            two.create(e, later).await.expect("create while pruning"),
            IntakeOutcome::Created(_)
        ));
    }
    let (a, b) = (a.await.expect("join"), b.await.expect("join"));
    assert_eq!(a + b, ENTITIES as u64, "each payload once: {a} + {b}");
    for id in ids {
        let data = two
            .get_data(DEFAULT_TENANT, id)
            .await
            .expect("data")
            .expect("found");
        assert_eq!(data.payload, None);
        assert_eq!(data.record.payload_pruned_at_us, Some(later));
    }
}
