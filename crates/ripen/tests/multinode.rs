//! Fault tests of several nodes on one PostgreSQL database (README.md,
//! "Running several nodes"): two real `ripen serve` processes on different
//! ports share one database, with a real HTTP downstream from the harness.
//!
//! - a node killed with SIGKILL loses its running steps to the other node
//!   once their leases expire, and nothing acknowledged is lost;
//! - a node frozen (SIGSTOP) past its leases has its late results refused,
//!   and holds nothing back once its leases expire, even when it froze in
//!   the middle of a transaction;
//! - PostgreSQL crashing under load, or stopping for a while, is survived
//!   without restarting any node;
//! - one idempotency key sent to both nodes at once gives one entity;
//! - an intake-only node wakes an executing node through LISTEN/NOTIFY;
//! - a node restarted again and again (kill -9 or SIGTERM) while the other
//!   node is under steady load is ready within 2 s of each spawn, and its
//!   start never deadlocks with the live node in PostgreSQL.
//!
//! Both nodes have the same configuration but for their name
//! (`engine.node`), which they send as `ripen-node` with each step call; the
//! downstream records each call under a path of its node (`/A/...`,
//! `/B/...`), so that every call can be traced to the node that made it.
//!
//! The tests run one at a time (they measure takeover delays on a small
//! machine), each on its own runtime; the ones that stop or restart
//! PostgreSQL get a private cluster, the others a database on the shared one.

mod common;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use ripen_testkit::PgCluster;
use serde_json::{json, Value};

/// The step timeout of the lease tests; a lease lasts it plus the grace.
const STEP_TIMEOUT: &str = "1s";
const LEASE_GRACE: &str = "500ms";
const POLL: &str = "200ms";
const LEASE_TTL: Duration = Duration::from_millis(1_500);
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Headroom for a debug build on a busy 2-core machine.
const SLACK: Duration = Duration::from_secs(3);
/// How long a downstream call of the lease tests takes.
const STEP_DELAY: Duration = Duration::from_millis(400);
/// The steps of the lease tests: a chain `s1 -> s2 -> s3`.
const CHAIN: [&str; 3] = ["s1", "s2", "s3"];

// ---------------------------------------------------------------------------
// Running the tests one at a time
// ---------------------------------------------------------------------------

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs one test on a runtime of its own, after the previous test ended.
fn run(name: &str, test: impl Future<Output = ()>) {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build a runtime");
    let started = Instant::now();
    runtime.block_on(test);
    eprintln!("{name}: {:?}", started.elapsed());
}

/// A fresh database on the cluster shared by the tests of this binary.
async fn shared_database() -> String {
    tokio::task::spawn_blocking(|| PgCluster::shared().create_database())
        .await
        .expect("create a database")
}

/// A private cluster, for a test that stops or restarts PostgreSQL.
async fn private_cluster() -> Arc<PgCluster> {
    tokio::task::spawn_blocking(|| Arc::new(PgCluster::start()))
        .await
        .expect("start a PostgreSQL cluster")
}

/// Runs a blocking cluster operation off the runtime; returns its duration.
async fn on_cluster(cluster: &Arc<PgCluster>, op: fn(&PgCluster)) -> Duration {
    let cluster = cluster.clone();
    let started = Instant::now();
    tokio::task::spawn_blocking(move || op(&cluster))
        .await
        .expect("a cluster operation panicked");
    started.elapsed()
}

async fn create_database(cluster: &Arc<PgCluster>) -> String {
    let cluster = cluster.clone();
    tokio::task::spawn_blocking(move || cluster.create_database())
        .await
        .expect("create a database")
}

async fn drop_cluster(cluster: Arc<PgCluster>) {
    let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
}

// ---------------------------------------------------------------------------
// Pipelines and the downstream
// ---------------------------------------------------------------------------

/// A chain of critical steps, each after the previous one, whose steps call
/// `/{node}/{type}/{step}`: the same pipeline on every node, but each node's
/// calls on paths of its own.
/// A chain of steps, the same on every node: each node's calls are told
/// apart by the name it sends (see [`node_config`]).
fn chain(type_name: &str, ds: &Downstream, steps: &[&str]) -> TypeDef {
    let mut defs = Vec::new();
    for (i, name) in steps.iter().enumerate() {
        let mut step = Step::http(name, ds.url(&step_path(type_name, name)));
        if i > 0 {
            step = step.needs(&[steps[i - 1]]);
        }
        defs.push(step);
    }
    TypeDef::new(type_name, defs)
}

/// The configuration of node `node`: the defaults of the tests, and its name.
fn node_config(node: &str) -> Config {
    Config::new().node(node)
}

fn node_path(node: &str, type_name: &str, step: &str) -> String {
    format!("/{node}{}", step_path(type_name, step))
}

/// Every step of `type_name`, on both nodes, answers after `delay` with an
/// output that names the node.
fn slow_steps(ds: &Downstream, type_name: &str, steps: &[&str], delay: Duration) {
    for node in ["A", "B"] {
        for step in steps {
            ds.set(
                &node_path(node, type_name, step),
                Behavior::sleep(delay, json!({"node": node, "step": step})),
            );
        }
    }
}

/// The configuration of the lease tests on one node.
fn lease_config(type_name: &str, ds: &Downstream, node: &str) -> Config {
    let pipeline = chain(type_name, ds, &CHAIN)
        .map_steps(|s| s.timeout(STEP_TIMEOUT).attempts(10).backoff("10ms", "50ms"));
    node_config(node)
        .with_type(pipeline)
        .lease_grace(LEASE_GRACE)
        .poll_interval(POLL)
}

/// The node that made a call: the first segment of its path.
fn node_of(c: &Call) -> &str {
    c.path.split('/').nth(1).unwrap_or("")
}

fn step_of(c: &Call) -> &str {
    c.path.rsplit('/').next().unwrap_or("")
}

/// One call of a step that a node had in flight.
#[derive(Clone, Debug)]
struct Flight {
    entity: String,
    step: String,
    attempt: u64,
    received_at: Instant,
}

/// The calls `node` has made that the downstream has not answered yet.
fn in_flight(ds: &Downstream, node: &str) -> Vec<Flight> {
    ds.calls()
        .iter()
        .filter(|c| node_of(c) == node && c.replied_at.is_none())
        .map(|c| Flight {
            entity: c.entity_id().expect("a call with entity_id").to_owned(),
            step: step_of(c).to_owned(),
            attempt: c.attempt().expect("a call with attempt"),
            received_at: c.received_at,
        })
        .collect()
}

/// Keeps the flights whose answer was not given before `cutoff` (an answer
/// given later never reached the node, which was dead or frozen by then).
fn still_unanswered_at(ds: &Downstream, flights: Vec<Flight>, cutoff: Instant) -> Vec<Flight> {
    let calls = ds.calls();
    flights
        .into_iter()
        .filter(|f| {
            calls.iter().any(|c| {
                c.entity_id() == Some(f.entity.as_str())
                    && step_of(c) == f.step
                    && c.attempt() == Some(f.attempt)
                    && !matches!(c.replied_at, Some(at) if at < cutoff)
            })
        })
        .collect()
}

/// For each flight, the first call by `node` of the same entity and step
/// with a later attempt: the takeover.
fn takeovers(ds: &Downstream, flights: &[Flight], node: &str) -> Vec<Option<Call>> {
    let calls = ds.calls();
    flights
        .iter()
        .map(|f| {
            calls
                .iter()
                .filter(|c| {
                    node_of(c) == node
                        && c.entity_id() == Some(f.entity.as_str())
                        && step_of(c) == f.step
                        && c.attempt().is_some_and(|a| a > f.attempt)
                })
                .min_by_key(|c| c.received_at)
                .cloned()
        })
        .collect()
}

/// Waits until `node` has taken over every flight; returns the takeovers.
async fn wait_takeovers(
    ds: &Downstream,
    flights: &[Flight],
    node: &str,
    timeout: Duration,
) -> Vec<Call> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = takeovers(ds, flights, node);
        if found.iter().all(Option::is_some) {
            return found.into_iter().map(Option::unwrap).collect();
        }
        if Instant::now() > deadline {
            let missing: Vec<&Flight> = flights
                .iter()
                .zip(&found)
                .filter(|(_, t)| t.is_none())
                .map(|(f, _)| f)
                .collect();
            panic!(
                "node {node} did not take over {} of {} attempts within {timeout:?}: {missing:#?}",
                missing.len(),
                flights.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ---------------------------------------------------------------------------
// Intake and reads
// ---------------------------------------------------------------------------

/// What the clients saw besides 202s.
#[derive(Default)]
struct Tally {
    unavailable: AtomicUsize,
    conflicts: AtomicUsize,
    transport_errors: AtomicUsize,
    /// Answers that are neither a 202 nor an expected transient refusal.
    unexpected: Mutex<Vec<String>>,
}

impl Tally {
    fn assert_clean(&self) {
        let unexpected = self.unexpected.lock().unwrap();
        assert!(
            unexpected.is_empty(),
            "unexpected answers to submissions ({}):\n{}",
            unexpected.len(),
            unexpected
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    fn summary(&self) -> String {
        format!(
            "{} × 503, {} × 409, {} transport errors",
            self.unavailable.load(Ordering::Relaxed),
            self.conflicts.load(Ordering::Relaxed),
            self.transport_errors.load(Ordering::Relaxed)
        )
    }
}

/// Submits one key until some node answers 202, trying the nodes in turn
/// from `first`; 503 (with `Retry-After`), 409, 429 and connection errors
/// are retried with the same key and body. Returns the entity id.
async fn submit_until_accepted(
    nodes: &[Api],
    first: usize,
    type_name: &str,
    body: &Value,
    key: &str,
    deadline: Instant,
    tally: &Tally,
) -> String {
    let mut last = String::new();
    let mut k = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "key {key} got no 202 in time; last answer: {last}"
        );
        let api = &nodes[(first + k) % nodes.len()];
        match api.try_submit(type_name, body, Some(key)).await {
            Ok(r) if r.status == 202 => {
                return r.json()["id"]
                    .as_str()
                    .unwrap_or_else(|| panic!("a 202 without id for key {key}: {r}"))
                    .to_owned();
            }
            Ok(r) if r.status == 503 => {
                tally.unavailable.fetch_add(1, Ordering::Relaxed);
                if r.header("retry-after").is_none() {
                    tally
                        .unexpected
                        .lock()
                        .unwrap()
                        .push(format!("{key}: a 503 without Retry-After: {r}"));
                }
                last = r.to_string();
            }
            Ok(r) if r.status == 409 || r.status == 429 => {
                tally.conflicts.fetch_add(1, Ordering::Relaxed);
                last = r.to_string();
            }
            Ok(r) => {
                tally
                    .unexpected
                    .lock()
                    .unwrap()
                    .push(format!("{key} via {}: {r}", api.base()));
                last = r.to_string();
            }
            Err(e) => {
                tally.transport_errors.fetch_add(1, Ordering::Relaxed);
                last = format!("{e:#}");
            }
        }
        k += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Entities per wave of [`load_until_a_is_busy`], and waves at most.
const WAVE: usize = 24;
const WAVES_MAX: usize = 5;
/// The attempts node A must have in flight before the fault.
const BUSY_MIN: usize = 4;

/// Submits waves of entities (keys `{type}-{i}`, bodies `{"i": i}`), half to
/// each node, until node A has attempts in flight: whichever node claims an
/// entity's first step usually runs its whole chain, so one wave may go to B
/// alone. Returns the ledger of 202s (key index, id) and A's calls in flight.
async fn load_until_a_is_busy(
    nodes: &[Api],
    ds: &Downstream,
    type_name: &str,
) -> (Vec<(usize, String)>, Vec<Flight>) {
    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ledger = Vec::new();
    for wave in 0..WAVES_MAX {
        let mut set = tokio::task::JoinSet::new();
        for i in wave * WAVE..(wave + 1) * WAVE {
            let nodes = nodes.to_vec();
            let tally = tally.clone();
            let type_name = type_name.to_owned();
            set.spawn(async move {
                let body = json!({"i": i});
                let key = format!("{type_name}-{i}");
                let id =
                    submit_until_accepted(&nodes, i % 2, &type_name, &body, &key, deadline, &tally)
                        .await;
                (i, id)
            });
        }
        while let Some(done) = set.join_next().await {
            ledger.push(done.expect("a client task panicked"));
        }
        tally.assert_clean();
        let look_until = Instant::now() + STEP_DELAY;
        while Instant::now() < look_until {
            let flights = in_flight(ds, "A");
            if flights.len() >= BUSY_MIN {
                ledger.sort();
                return (ledger, flights);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    panic!(
        "node A never had {BUSY_MIN} attempts in flight after {} submissions; {} calls: {:?}",
        ledger.len(),
        ds.calls().len(),
        ds.calls()
            .iter()
            .map(|c| c.path.clone())
            .collect::<HashSet<_>>()
    );
}

/// GETs the paths with at most 16 requests in flight; answers in order.
async fn get_all(api: &Api, paths: Vec<String>) -> Vec<anyhow::Result<Resp>> {
    let mut results: Vec<Option<anyhow::Result<Resp>>> = (0..paths.len()).map(|_| None).collect();
    let mut set = tokio::task::JoinSet::new();
    let mut next = 0;
    while next < paths.len() || !set.is_empty() {
        while next < paths.len() && set.len() < 16 {
            let api = api.clone();
            let path = paths[next].clone();
            let index = next;
            set.spawn(async move {
                let r = api
                    .try_request(
                        hyper::Method::GET,
                        &path,
                        &[("accept", "application/json")],
                        None,
                    )
                    .await;
                (index, r)
            });
            next += 1;
        }
        if let Some(done) = set.join_next().await {
            let (index, r) = done.expect("a GET task panicked");
            results[index] = Some(r);
        }
    }
    results.into_iter().map(Option::unwrap).collect()
}

/// Waits until every entity is `ready` with every step settled, reading
/// through the nodes in turn; returns the final views. An entity that fails,
/// or that a node does not know (404), fails the test.
async fn wait_all_ready(
    nodes: &[Api],
    ids: &[String],
    timeout: Duration,
) -> HashMap<String, Value> {
    let deadline = Instant::now() + timeout;
    let mut views = HashMap::new();
    let mut waiting: Vec<String> = ids.to_vec();
    let mut round = 0;
    loop {
        let api = &nodes[round % nodes.len()];
        let paths = waiting
            .iter()
            .map(|id| format!("/v1/entities/{id}"))
            .collect();
        let answers = get_all(api, paths).await;
        let mut still = Vec::new();
        let mut last = String::new();
        for (id, answer) in waiting.into_iter().zip(answers) {
            match answer {
                Ok(r) if r.status == 200 => {
                    let view = r.json();
                    let settled = view["steps"]
                        .as_array()
                        .is_some_and(|steps| steps.iter().all(|s| s["status"] == "succeeded"));
                    match view["status"].as_str() {
                        Some("ready") if settled => {
                            views.insert(id, view);
                        }
                        Some("ready") | Some("pending") => {
                            last = view.to_string();
                            still.push(id);
                        }
                        _ => panic!("entity {id} did not ripen: {view:#}"),
                    }
                }
                Ok(r) if r.status == 404 => {
                    panic!("acknowledged entity {id} is unknown to {}: {r}", api.base())
                }
                Ok(r) => {
                    last = r.to_string();
                    still.push(id);
                }
                Err(e) => {
                    last = format!("{e:#}");
                    still.push(id);
                }
            }
        }
        waiting = still;
        if waiting.is_empty() {
            return views;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} entities not ready within {timeout:?}; e.g. {}: {last}",
            waiting.len(),
            ids.len(),
            waiting[0]
        );
        round += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The events of one step in a history.
fn step_events<'a>(events: &'a [Value], step: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["step"] == step).collect()
}

/// The `step_started` event of one attempt.
fn started<'a>(events: &'a [Value], step: &str, attempt: u64) -> &'a Value {
    step_events(events, step)
        .into_iter()
        .find(|e| e["kind"] == "step_started" && e["attempt"] == attempt)
        .unwrap_or_else(|| panic!("no step_started of {step} attempt {attempt}: {events:#?}"))
}

fn assert_alive(node: &mut Server, name: &str) {
    if let Some(status) = node.exited() {
        panic!(
            "node {name} exited ({status}); log tail:\n{}",
            node.log_tail(40)
        );
    }
}

// ---------------------------------------------------------------------------
// 1. kill -9 of a node holding leases
// ---------------------------------------------------------------------------

#[test]
fn kill_9_a_node_holding_leases() {
    run("kill_9_a_node_holding_leases", async {
        let db = shared_database().await;
        let ds = Downstream::start().await;
        slow_steps(&ds, "k9", &CHAIN, STEP_DELAY);
        // Both nodes start together: migrations run under an advisory lock.
        let (config_a, config_b) = (lease_config("k9", &ds, "A"), lease_config("k9", &ds, "B"));
        let (mut a, b) = tokio::join!(
            Server::start_on(&config_a, &db),
            Server::start_on(&config_b, &db)
        );
        let nodes = [a.api().clone(), b.api().clone()];

        // Load both nodes until A runs steps, then kill it in their middle.
        let (ledger, flights) = load_until_a_is_busy(&nodes, &ds, "k9").await;
        let ids: Vec<String> = ledger.iter().map(|(_, id)| id.clone()).collect();
        a.kill();
        let killed_at = Instant::now();
        let flights = still_unanswered_at(&ds, flights, killed_at);
        assert!(!flights.is_empty(), "A answered everything before it died");

        // B takes over every step A was running once its lease expires.
        let bound = LEASE_TTL + POLL_INTERVAL + SLACK;
        let taken = wait_takeovers(&ds, &flights, "B", bound + Duration::from_secs(5)).await;
        let mut worst = Duration::ZERO;
        let mut worst_after_kill = Duration::ZERO;
        for (f, t) in flights.iter().zip(&taken) {
            let delay = t.received_at.duration_since(f.received_at);
            worst = worst.max(delay);
            worst_after_kill =
                worst_after_kill.max(t.received_at.saturating_duration_since(killed_at));
            assert!(
                delay <= bound,
                "B took over {}:{} (attempt {}) {delay:?} after A started it; the lease is {LEASE_TTL:?}, the bound {bound:?}",
                f.entity,
                f.step,
                f.attempt
            );
        }
        eprintln!(
            "kill -9: {} attempts in flight on A; B took over all of them at most {worst:?} after A started them ({worst_after_kill:?} after the kill)",
            flights.len()
        );

        // Every acknowledged entity ripens, read through B alone.
        let views = wait_all_ready(&nodes[1..], &ids, Duration::from_secs(40)).await;
        assert_eq!(views.len(), ids.len());
        // The history of every step that was running on A shows the lost
        // attempt and a later one that won.
        for f in &flights {
            let events = b.events(&f.entity).await;
            let lost = step_events(&events, &f.step)
                .into_iter()
                .find(|e| e["kind"] == "attempt_failed" && e["attempt"] == f.attempt);
            let lost = lost.unwrap_or_else(|| {
                panic!(
                    "no failure of {}:{} attempt {}: {events:#?}",
                    f.entity, f.step, f.attempt
                )
            });
            assert!(
                lost["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("lease expired"),
                "{lost}"
            );
            let won = step_events(&events, &f.step)
                .into_iter()
                .find(|e| e["kind"] == "step_succeeded")
                .expect("the step succeeded");
            assert!(won["attempt"].as_u64() > Some(f.attempt), "{events:#?}");
        }
        // Every key still maps to its entity, through B.
        for (i, id) in &ledger {
            let r = b
                .submit("k9", &json!({"i": i}), Some(&format!("k9-{i}")))
                .await;
            assert_eq!(r.status, 202, "{r}");
            assert_eq!(r.json()["id"], id.as_str(), "key k9-{i}");
        }
    });
}

// ---------------------------------------------------------------------------
// 2. SIGSTOP past the lease, then SIGCONT
// ---------------------------------------------------------------------------

#[test]
fn sigstop_past_the_lease_then_sigcont() {
    run("sigstop_past_the_lease_then_sigcont", async {
        let db = shared_database().await;
        let ds = Downstream::start().await;
        slow_steps(&ds, "zz", &CHAIN, STEP_DELAY);
        let a = Server::start_on(&lease_config("zz", &ds, "A"), &db).await;
        let b = Server::start_on(&lease_config("zz", &ds, "B"), &db).await;
        let nodes = [a.api().clone(), b.api().clone()];

        // Load both nodes until A runs steps, then freeze it in their middle.
        let (ledger, flights) = load_until_a_is_busy(&nodes, &ds, "zz").await;
        let ids: Vec<String> = ledger.iter().map(|(_, id)| id.clone()).collect();
        a.sigstop();
        let stopped_at = Instant::now();
        let flights = still_unanswered_at(&ds, flights, stopped_at);
        assert!(!flights.is_empty(), "A heard every answer before it froze");

        // B takes them over while A is frozen; A stays frozen past its leases.
        let bound = LEASE_TTL + POLL_INTERVAL + SLACK;
        let taken = wait_takeovers(&ds, &flights, "B", bound + Duration::from_secs(5)).await;
        let worst = flights
            .iter()
            .zip(&taken)
            .map(|(f, t)| t.received_at.duration_since(f.received_at))
            .max()
            .unwrap_or_default();
        assert!(worst <= bound, "the slowest takeover took {worst:?}");
        let frozen_for = LEASE_TTL + Duration::from_millis(500);
        if let Some(rest) = frozen_for.checked_sub(stopped_at.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        a.sigcont();
        let frozen = stopped_at.elapsed();
        eprintln!(
            "sigstop: {} attempts in flight on A; B took over at most {worst:?} after A started them; A frozen for {frozen:?}",
            flights.len()
        );

        // Everything ripens; both nodes agree.
        let views = wait_all_ready(&nodes, &ids, Duration::from_secs(40)).await;
        for id in &ids {
            assert_eq!(
                a.entity(id).await,
                b.entity(id).await,
                "the nodes disagree on {id}"
            );
        }

        // A's late results were refused: its log names each of them, with
        // the epoch of A's attempt.
        let mut histories = HashMap::new();
        for id in &ids {
            histories.insert(id.clone(), b.events(id).await);
        }
        let expected: Vec<String> = flights
            .iter()
            .map(|f| {
                let epoch = started(&histories[&f.entity], &f.step, f.attempt)["epoch"].clone();
                let index = CHAIN.iter().position(|s| *s == f.step).unwrap();
                format!("entity={} step={index} epoch={epoch}", f.entity)
            })
            .collect();
        let log_deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let log = a.log();
            let refusals: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("refused a stale completion"))
                .collect();
            let missing: Vec<&String> = expected
                .iter()
                .filter(|e| !refusals.iter().any(|l| l.contains(e.as_str())))
                .collect();
            if missing.is_empty() {
                assert!(log.contains("refused results of stale attempts"), "{log}");
                break;
            }
            assert!(
                Instant::now() < log_deadline,
                "A's log does not show the refusal of {missing:?}; log tail:\n{}",
                a.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Each step ran as its history says: one downstream call per
        // attempt at most, every attempt but the last one lost or failed,
        // the later epoch won, and the output is that of the winning call.
        let calls = ds.calls();
        let mut requests: HashMap<(String, String), Vec<&Call>> = HashMap::new();
        for c in &calls {
            let key = c
                .header("idempotency-key")
                .expect("an Idempotency-Key")
                .to_owned();
            let (entity, step) = key.split_once(':').expect("key = entity:step");
            assert_eq!(step, step_of(c), "{c:?}");
            requests
                .entry((entity.to_owned(), step.to_owned()))
                .or_default()
                .push(c);
        }
        for id in &ids {
            let events = &histories[id];
            let view = &views[id];
            let data = b.get(&format!("/v1/entities/{id}/data")).await;
            assert_eq!(data.status, 200, "{data}");
            let data = data.json();
            for name in CHAIN {
                let attempts = step(view, name)["attempts"].as_u64().unwrap();
                let mine = step_events(events, name);
                let count = |kind: &str| mine.iter().filter(|e| e["kind"] == kind).count() as u64;
                let calls = requests
                    .get(&(id.clone(), name.to_owned()))
                    .map_or(&[][..], |v| v);
                assert!(
                    calls.len() as u64 <= attempts,
                    "{id}:{name}: {} calls for {attempts} attempts",
                    calls.len()
                );
                assert_eq!(count("step_started"), attempts, "{id}:{name}: {events:#?}");
                assert_eq!(count("step_succeeded"), 1, "{id}:{name}: {events:#?}");
                assert_eq!(
                    count("attempt_failed") + 1,
                    attempts,
                    "{id}:{name}: {events:#?}"
                );
                let won = mine.iter().find(|e| e["kind"] == "step_succeeded").unwrap();
                assert_eq!(won["attempt"].as_u64(), Some(attempts), "{events:#?}");
                let winner = calls
                    .iter()
                    .find(|c| c.attempt() == Some(attempts))
                    .unwrap_or_else(|| panic!("{id}:{name}: no call of attempt {attempts}"));
                assert_eq!(
                    data["outputs"][name]["node"],
                    node_of(winner),
                    "{id}:{name}: the output is not that of the winning attempt"
                );
            }
        }
        for f in &flights {
            let events = &histories[&f.entity];
            let lost_epoch = started(events, &f.step, f.attempt)["epoch"]
                .as_u64()
                .unwrap();
            let won = step_events(events, &f.step)
                .into_iter()
                .find(|e| e["kind"] == "step_succeeded")
                .unwrap();
            let won_attempt = won["attempt"].as_u64().unwrap();
            let won_epoch = started(events, &f.step, won_attempt)["epoch"]
                .as_u64()
                .unwrap();
            assert!(
                won_epoch > lost_epoch,
                "{}:{}: epoch {won_epoch} won over A's {lost_epoch}?",
                f.entity,
                f.step
            );
            let lost = step_events(events, &f.step)
                .into_iter()
                .find(|e| e["kind"] == "attempt_failed" && e["attempt"] == f.attempt)
                .unwrap_or_else(|| panic!("A's attempt is not lost in {events:#?}"));
            assert!(
                lost["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("lease expired"),
                "{lost}"
            );
            assert!(
                requests[&(f.entity.clone(), f.step.clone())].len() >= 2,
                "A's and B's calls"
            );
        }
    });
}

// ---------------------------------------------------------------------------
// 3. PostgreSQL crashes under load
// ---------------------------------------------------------------------------

#[test]
fn postgres_restart_under_load() {
    run("postgres_restart_under_load", async {
        const CLIENTS: usize = 4;
        let cluster = private_cluster().await;
        let db = create_database(&cluster).await;
        let ds = Downstream::start().await;
        let config = |node: &str| {
            let pipeline = chain("pg", &ds, &["s1", "s2"])
                .map_steps(|s| s.timeout("2s").attempts(30).backoff("10ms", "200ms"));
            node_config(node)
                .with_type(pipeline)
                .lease_grace(LEASE_GRACE)
                .poll_interval(POLL)
        };
        let mut a = Server::start_on(&config("A"), &db).await;
        let mut b = Server::start_on(&config("B"), &db).await;
        let nodes = [a.api().clone(), b.api().clone()];

        // A steady stream of submissions to both nodes; each key is retried
        // until a 202, on the other node each time.
        let started = Instant::now();
        let deadline = started + Duration::from_secs(45);
        let tally = Arc::new(Tally::default());
        let next = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for c in 0..CLIENTS {
            let nodes = nodes.clone();
            let (tally, next, stop) = (tally.clone(), next.clone(), stop.clone());
            clients.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(40..=100))).await;
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let key = format!("pg-{i}");
                    let body = json!({"i": i, "pad": "p".repeat(i % 100)});
                    let id =
                        submit_until_accepted(&nodes, c + i, "pg", &body, &key, deadline, &tally)
                            .await;
                    acked.push((i, id));
                }
                acked
            }));
        }

        // Crash PostgreSQL twice while the stream runs.
        let mut restarts = Vec::new();
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            restarts.push(on_cluster(&cluster, PgCluster::restart_immediate).await);
            assert_alive(&mut a, "A");
            assert_alive(&mut b, "B");
        }
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        stop.store(true, Ordering::Relaxed);
        let mut ledger = Vec::new();
        for c in clients {
            ledger.extend(c.await.expect("a client task panicked"));
        }
        let intake_time = started.elapsed();
        tally.assert_clean();
        assert!(
            tally.unavailable.load(Ordering::Relaxed)
                + tally.transport_errors.load(Ordering::Relaxed)
                > 0,
            "no submission met the outages; the test tested nothing"
        );
        ledger.sort();
        let keys = next.load(Ordering::Relaxed);
        assert!(ledger.len() <= keys);
        let distinct: HashSet<&String> = ledger.iter().map(|(_, id)| id).collect();
        assert_eq!(distinct.len(), ledger.len(), "two keys got one entity");

        // Both nodes are still the same processes and serve again.
        for (node, name) in [(&mut a, "A"), (&mut b, "B")] {
            assert_alive(node, name);
            let r = node.get("/readyz").await;
            assert_eq!(r.status, 200, "node {name}: {r}");
        }

        // Every acknowledged entity ripens, and every key replays to its id.
        let ids: Vec<String> = ledger.iter().map(|(_, id)| id.clone()).collect();
        let ready_started = Instant::now();
        wait_all_ready(&nodes, &ids, Duration::from_secs(40)).await;
        let ripening = ready_started.elapsed();
        for (n, (i, id)) in ledger.iter().enumerate() {
            let body = json!({"i": i, "pad": "p".repeat(i % 100)});
            let r = nodes[n % 2]
                .submit("pg", &body, Some(&format!("pg-{i}")))
                .await;
            assert_eq!(r.status, 202, "replay of pg-{i}: {r}");
            assert_eq!(
                r.header("idempotent-replayed").as_deref(),
                Some("true"),
                "{r}"
            );
            assert_eq!(r.json()["id"], id.as_str(), "key pg-{i} now maps elsewhere");
        }
        assert_alive(&mut a, "A");
        assert_alive(&mut b, "B");
        eprintln!(
            "postgres restarts {restarts:?}: {} keys acknowledged in {intake_time:?} ({}), all ready {ripening:?} later",
            ledger.len(),
            tally.summary()
        );
        drop((a, b));
        drop_cluster(cluster).await;
    });
}

// ---------------------------------------------------------------------------
// 4. A database outage is visible, and heals
// ---------------------------------------------------------------------------

#[test]
fn database_outage_is_visible_and_heals() {
    run("database_outage_is_visible_and_heals", async {
        let cluster = private_cluster().await;
        let db = create_database(&cluster).await;
        let ds = Downstream::start().await;
        slow_steps(&ds, "out", &["s1", "s2"], Duration::from_millis(300));
        // A only takes intake; B runs every step. With polling every 30 s,
        // B hears of A's intake only through its LISTEN connection, which
        // must come back after the outage too.
        let config = |node: &str| {
            let pipeline = chain("out", &ds, &["s1", "s2"]).map_steps(|s| {
                s.timeout(STEP_TIMEOUT)
                    .attempts(30)
                    .backoff("10ms", "200ms")
            });
            node_config(node)
                .with_type(pipeline)
                .lease_grace(LEASE_GRACE)
                .poll_interval("30s")
        };
        let mut a = Server::start_on(&config("A").execute(false), &db).await;
        let mut b = Server::start_on(&config("B"), &db).await;
        let pids = (a.pid(), b.pid());
        let nodes = [a.api().clone(), b.api().clone()];
        for api in &nodes {
            let r = api.get("/readyz").await;
            assert_eq!(r.status, 200, "{r}");
        }
        // Some entities are running when the database goes away.
        let mut ids = Vec::new();
        for i in 0..6 {
            ids.push(nodes[i % 2].submit_ok("out", &json!({"before": i})).await);
        }

        let stopping = Instant::now();
        on_cluster(&cluster, PgCluster::stop).await;
        let stopped_at = Instant::now();
        let mut readyz_503_after = Vec::new();
        for (n, api) in nodes.iter().enumerate() {
            loop {
                let health = api.get("/healthz").await;
                assert_eq!(
                    health.status, 200,
                    "/healthz while the database is down: {health}"
                );
                let r = api.get("/readyz").await;
                if r.status == 503 {
                    assert_problem(&r, 503);
                    readyz_503_after.push(stopped_at.elapsed());
                    break;
                }
                assert_eq!(r.status, 200, "{r}");
                assert!(
                    stopped_at.elapsed() < Duration::from_secs(5),
                    "node {n}: /readyz still {r} 5 s into the outage"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Intake refuses with 503 and Retry-After: nothing can be durable.
            for k in 0..3 {
                let r = api
                    .submit(
                        "out",
                        &json!({"during": n, "k": k}),
                        Some(&format!("out-{n}-{k}")),
                    )
                    .await;
                assert_problem(&r, 503);
                assert!(r.header("retry-after").is_some(), "{r}");
            }
        }
        // The outage lasts beyond the leases of the running attempts.
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        for api in &nodes {
            let health = api.get("/healthz").await;
            assert_eq!(health.status, 200, "{health}");
            assert_problem(&api.get("/readyz").await, 503);
        }
        assert_alive(&mut a, "A");
        assert_alive(&mut b, "B");
        let outage = stopping.elapsed();

        on_cluster(&cluster, PgCluster::start_again).await;
        let back_at = Instant::now();
        let mut healed_after = Vec::new();
        let tally = Tally::default();
        for (n, api) in nodes.iter().enumerate() {
            loop {
                let r = api.get("/readyz").await;
                if r.status == 200 {
                    break;
                }
                assert!(
                    back_at.elapsed() < Duration::from_secs(15),
                    "node {n}: /readyz still {r} 15 s after the database came back"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // The keys refused during the outage are accepted now.
            let deadline = back_at + Duration::from_secs(20);
            for k in 0..3 {
                let key = format!("out-{n}-{k}");
                let body = json!({"during": n, "k": k});
                let single = std::slice::from_ref(api);
                ids.push(
                    submit_until_accepted(single, 0, "out", &body, &key, deadline, &tally).await,
                );
            }
            healed_after.push(back_at.elapsed());
        }
        tally.assert_clean();
        // B's listener reconnects with a backoff of at most 5 s, and wakes
        // its scheduler when it does: A's new entities run long before the
        // 30 s poll.
        let listen_bound = Duration::from_secs(5) + SLACK;
        wait_all_ready(&nodes, &ids, listen_bound).await;
        let all_ready_after = back_at.elapsed();
        assert!(
            all_ready_after <= listen_bound + Duration::from_secs(2),
            "entities ready {all_ready_after:?} after the database came back"
        );
        // Once B is idle (its scheduler asleep for 30 s), only a
        // notification can make it run what A takes in.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let probe_at = Instant::now();
        let probe = a.submit_ok("out", &json!({"probe": true})).await;
        let view = b.wait_terminal(&probe, Duration::from_secs(15)).await;
        let probe_took = probe_at.elapsed();
        assert_eq!(view["status"], "ready", "{view:#}");
        assert!(
            probe_took <= listen_bound,
            "an entity taken in by A after the outage waited {probe_took:?} for B"
        );
        assert_alive(&mut a, "A");
        assert_alive(&mut b, "B");
        assert_eq!((a.pid(), b.pid()), pids, "a node was restarted");
        eprintln!(
            "outage of {outage:?}: /readyz 503 after {readyz_503_after:?}; healed {healed_after:?} \
             after the database came back; all ready after {all_ready_after:?}; a new entity \
             ready after {probe_took:?}"
        );
        drop((a, b));
        drop_cluster(cluster).await;
    });
}

// ---------------------------------------------------------------------------
// 5. One key sent to both nodes at once
// ---------------------------------------------------------------------------

#[test]
fn one_key_on_two_nodes_gives_one_entity() {
    run("one_key_on_two_nodes_gives_one_entity", async {
        const KEYS: usize = 20;
        let db = shared_database().await;
        let ds = Downstream::start().await;
        let config = |node: &str| node_config(node).with_type(chain("dup", &ds, &["s1"]));
        let a = Server::start_on(&config("A"), &db).await;
        let b = Server::start_on(&config("B"), &db).await;

        let mut ids = HashMap::new();
        let mut conflicts = 0;
        for k in 0..KEYS {
            let key = format!("dup-{k}");
            let body = json!({"key": key, "k": k});
            let (ra, rb) = tokio::join!(
                a.submit("dup", &body, Some(&key)),
                b.submit("dup", &body, Some(&key))
            );
            let mut id = None;
            let mut created = 0;
            for r in [&ra, &rb] {
                match r.status {
                    202 => {
                        let this = r.json()["id"].as_str().unwrap().to_owned();
                        if let Some(first) = &id {
                            assert_eq!(*first, this, "key {key} gave two entities: {ra} / {rb}");
                        }
                        id = Some(this);
                        if r.header("idempotent-replayed").as_deref() != Some("true") {
                            created += 1;
                        }
                    }
                    409 => {
                        assert_problem(r, 409);
                        conflicts += 1;
                    }
                    _ => panic!("key {key}: {r}"),
                }
            }
            let id = id.unwrap_or_else(|| panic!("key {key}: no 202 at all: {ra} / {rb}"));
            assert_eq!(created, 1, "key {key}: {ra} / {rb}");
            // Both nodes replay the key to the one entity.
            for node in [&a, &b] {
                let r = node.submit("dup", &body, Some(&key)).await;
                assert_eq!(r.status, 202, "{r}");
                assert_eq!(
                    r.header("idempotent-replayed").as_deref(),
                    Some("true"),
                    "{r}"
                );
                assert_eq!(r.json()["id"], id.as_str(), "{r}");
            }
            ids.insert(key, id);
        }
        let distinct: HashSet<&String> = ids.values().collect();
        assert_eq!(distinct.len(), KEYS);
        // The database holds one entity per key, no more.
        let list = a.get("/v1/entities?type=dup&limit=1000").await;
        assert_eq!(list.status, 200, "{list}");
        let listed: HashSet<String> = list.json()["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            listed,
            distinct.into_iter().cloned().collect::<HashSet<_>>()
        );
        let all: Vec<String> = ids.values().cloned().collect();
        wait_all_ready(
            &[a.api().clone(), b.api().clone()],
            &all,
            Duration::from_secs(20),
        )
        .await;
        eprintln!("one key on two nodes: {KEYS} keys, {conflicts} answers 409");
    });
}

// ---------------------------------------------------------------------------
// 6. Nodes wake each other
// ---------------------------------------------------------------------------

#[test]
fn nodes_wake_each_other() {
    run("nodes_wake_each_other", async {
        let db = shared_database().await;
        let ds = Downstream::start().await;
        // Polling every 30 s: only a notification can make B run at once.
        let config = |node: &str| {
            node_config(node)
                .with_type(chain("wake", &ds, &["s1", "s2"]))
                .poll_interval("30s")
        };
        let b = Server::start_on(&config("B"), &db).await;
        let a = Server::start_on(&config("A").execute(false), &db).await;
        // Let B's listener connect and its first claim pass go by.
        tokio::time::sleep(Duration::from_millis(1_500)).await;

        let mut took = Vec::new();
        for i in 0..3 {
            let submitted = Instant::now();
            let id = a.submit_ok("wake", &json!({"i": i})).await;
            let view = b.wait_terminal(&id, Duration::from_secs(10)).await;
            let elapsed = submitted.elapsed();
            assert_eq!(view["status"], "ready", "{view:#}");
            assert!(
                elapsed <= Duration::from_secs(3),
                "entity {i} took {elapsed:?} to ripen: B was not woken by A's intake"
            );
            took.push(elapsed);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let calls = ds.calls();
        assert!(
            calls.iter().all(|c| node_of(c) == "B"),
            "the intake-only node ran steps: {calls:#?}"
        );
        assert_eq!(calls.len(), 6, "{calls:#?}");
        eprintln!("wake-ups: submitted on A, ready through B after {took:?}");
    });
}

// ---------------------------------------------------------------------------
// 7. A node frozen in the middle of a transaction
// ---------------------------------------------------------------------------

/// Like test 2, but with fast steps, so that node A is almost always inside
/// a claim or completion transaction when it freezes: the entities that
/// transaction has locked must still be taken over once the leases expire
/// (README.md: "a node that dies or stalls loses its steps to the others
/// once the lease runs out").
#[test]
fn a_node_frozen_mid_transaction_blocks_nothing_past_the_lease() {
    run(
        "a_node_frozen_mid_transaction_blocks_nothing_past_the_lease",
        async {
            const ROUNDS: usize = 3;
            const ENTITIES: usize = 120;
            let db = shared_database().await;
            let ds = Downstream::start().await;
            slow_steps(&ds, "mx", &CHAIN, Duration::from_millis(5));
            let a = Server::start_on(&lease_config("mx", &ds, "A"), &db).await;
            let b = Server::start_on(&lease_config("mx", &ds, "B"), &db).await;
            let nodes = [a.api().clone(), b.api().clone()];
            let bound = LEASE_TTL + POLL_INTERVAL + SLACK;
            let mut took = Vec::new();
            for round in 0..ROUNDS {
                let tally = Arc::new(Tally::default());
                let deadline = Instant::now() + Duration::from_secs(30);
                let mut set = tokio::task::JoinSet::new();
                for i in 0..ENTITIES {
                    let nodes = nodes.clone();
                    let tally = tally.clone();
                    set.spawn(async move {
                        let key = format!("mx-{round}-{i}");
                        let body = json!({"round": round, "i": i});
                        submit_until_accepted(&nodes, i % 2, "mx", &body, &key, deadline, &tally)
                            .await
                    });
                }
                let mut ids = Vec::new();
                while let Some(done) = set.join_next().await {
                    ids.push(done.expect("a client task panicked"));
                }
                tally.assert_clean();
                // A is claiming and completing the steps of this round now.
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..40))).await;
                a.sigstop();
                let stopped_at = Instant::now();
                let mut waiting = ids.clone();
                while !waiting.is_empty() {
                    let paths = waiting
                        .iter()
                        .map(|id| format!("/v1/entities/{id}"))
                        .collect();
                    let answers = get_all(b.api(), paths).await;
                    let mut still = Vec::new();
                    for (id, answer) in waiting.into_iter().zip(answers) {
                        let view = match answer {
                            Ok(r) if r.status == 200 => r.json(),
                            other => panic!("GET {id} through B: {other:?}"),
                        };
                        if view["status"] != "ready" {
                            still.push((id, view));
                        }
                    }
                    if !still.is_empty() && stopped_at.elapsed() > bound {
                        panic!(
                            "round {round}: {} of {ENTITIES} entities made no progress {:?} after \
                             node A froze (lease {LEASE_TTL:?}); the frozen node still holds them. \
                             PostgreSQL sessions in a transaction:\n{}\ne.g. {:#}",
                            still.len(),
                            stopped_at.elapsed(),
                            pg_open_transactions(&db),
                            still[0].1
                        );
                    }
                    waiting = still.into_iter().map(|(id, _)| id).collect();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                took.push(stopped_at.elapsed());
                a.sigcont();
                wait_all_ready(&nodes, &ids, Duration::from_secs(20)).await;
            }
            eprintln!("frozen mid-transaction: B finished every round after {took:?}");
        },
    );
}

/// Best effort, for failure messages: the sessions of the database at `url`
/// that are inside a transaction, through `psql` if it is installed.
fn pg_open_transactions(url: &str) -> String {
    let mut candidates: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.filter_map(|d| Some(d.ok()?.path().join("bin/psql")))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    candidates.push("psql".into());
    let sql = "SELECT pid, state, now() - xact_start AS open_for, left(query, 70) \
               FROM pg_stat_activity WHERE datname = current_database() \
               AND xact_start IS NOT NULL AND pid <> pg_backend_pid()";
    for psql in candidates {
        if let Ok(out) = std::process::Command::new(&psql)
            .args(["-X", "-A", "-c", sql, url])
            .output()
        {
            return String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
        }
    }
    "(psql is not available)".to_owned()
}

// ---------------------------------------------------------------------------
// 8. Restarting a node while the other one is under load
// ---------------------------------------------------------------------------

/// Restarts of node B while A takes submissions and both run pipelines.
const RESTARTS: usize = 5;
/// The restart target of docs/concepts.md: "serving again ≤ 2 s after
/// `kill -9` … on PostgreSQL with another node under load".
const RESTART_READY_BUDGET: Duration = Duration::from_secs(2);
/// Concurrent submitters on node A, each pausing between submissions, so
/// that A is busy but a debug build on two cores still keeps up.
const LOAD_CLIENTS: usize = 4;
const LOAD_PAUSE: Duration = Duration::from_millis(10);
/// How long B serves under the load between two restarts.
const UP_BETWEEN_RESTARTS: Duration = Duration::from_millis(1_000);

/// One restart of B: how it was stopped, and how long from its spawn to
/// `/readyz` 200, or why it never got there.
#[derive(Debug)]
struct Restart {
    stopped_by: &'static str,
    ready_after: Result<Duration, String>,
}

/// A steady stream of submissions to node A until `stop` is set; returns
/// how many were acknowledged and the first few refusals or failures.
async fn steady_load(a: Api, stop: Arc<AtomicBool>) -> (usize, Vec<String>) {
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..LOAD_CLIENTS {
        let a = a.clone();
        let stop = stop.clone();
        clients.spawn(async move {
            let mut accepted = 0;
            let mut problems = Vec::new();
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                let payload = json!({"client": client, "seq": seq});
                seq += 1;
                match a.try_submit("w5", &payload, None).await {
                    Ok(r) if r.status == 202 => accepted += 1,
                    Ok(r) => problems.push(format!("A answered: {r}")),
                    Err(e) => problems.push(format!("A did not answer: {e:#}")),
                }
                tokio::time::sleep(LOAD_PAUSE).await;
            }
            (accepted, problems)
        });
    }
    let mut accepted = 0;
    let mut problems = Vec::new();
    while let Some(joined) = clients.join_next().await {
        let (n, p) = joined.expect("a load client panicked");
        accepted += n;
        problems.extend(p);
    }
    problems.truncate(5);
    (accepted, problems)
}

/// The reports of a deadlock (SQLSTATE 40P01) in a PostgreSQL log, each with
/// the DETAIL, HINT, CONTEXT and STATEMENT lines that follow it and say
/// which statements took part.
fn deadlock_lines(log: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut in_report = false;
    for line in log.lines() {
        if line.contains("deadlock detected") || line.contains("40P01") {
            in_report = true;
            out.push(line);
        } else if in_report
            && (line.starts_with(char::is_whitespace)
                || ["DETAIL:", "HINT:", "CONTEXT:", "STATEMENT:"]
                    .iter()
                    .any(|tag| line.contains(tag)))
        {
            out.push(line);
        } else {
            in_report = false;
        }
    }
    out
}

#[test]
fn restarting_a_node_under_load_is_quick_and_deadlock_free() {
    run(
        "restarting_a_node_under_load_is_quick_and_deadlock_free",
        async {
            // A private cluster, so that its log speaks of this test alone.
            let cluster = private_cluster().await;
            let db = create_database(&cluster).await;
            let log_before = cluster.log().len();
            let ds = Downstream::start().await;
            let config = Config::new().with_type(w5("w5", &ds));
            let mut a = Server::start_on(&config, &db).await;
            let mut b = Server::start_on(&config, &db).await;

            let stop = Arc::new(AtomicBool::new(false));
            let load = tokio::spawn(steady_load(a.api().clone(), stop.clone()));
            tokio::time::sleep(UP_BETWEEN_RESTARTS).await;
            let mut restarts = Vec::new();
            for round in 0..RESTARTS {
                // Alternate: no shutdown at all, then a graceful one.
                let stopped_by = if round % 2 == 0 {
                    b.kill();
                    "kill -9"
                } else {
                    b.terminate(Duration::from_secs(10)).await;
                    "SIGTERM"
                };
                let spawned = Instant::now();
                let ready_after = match b.try_restart().await {
                    Ok(()) => {
                        let left = RESTART_READY_BUDGET.saturating_sub(spawned.elapsed());
                        match b.try_wait_ready(left).await {
                            Ok(_) => Ok(spawned.elapsed()),
                            Err(e) => Err(format!("{e} ({:?} after spawn)", spawned.elapsed())),
                        }
                    }
                    Err(e) => Err(format!("the start failed: {e}")),
                };
                eprintln!("restart {round} ({stopped_by}): {ready_after:?}");
                restarts.push(Restart {
                    stopped_by,
                    ready_after,
                });
                assert_alive(&mut a, "A");
                tokio::time::sleep(UP_BETWEEN_RESTARTS).await;
            }
            stop.store(true, Ordering::Relaxed);
            let (accepted, problems) = load.await.expect("the load task panicked");

            let log = cluster.log();
            let deadlocks = deadlock_lines(&log[log_before.min(log.len())..]);
            assert!(
                deadlocks.is_empty(),
                "PostgreSQL detected deadlocks while node B restarted under load:\n{}\n\nrestarts: {restarts:#?}\nB's log tail:\n{}",
                deadlocks.join("\n"),
                b.log_tail(40)
            );
            let slow: Vec<String> = restarts
                .iter()
                .enumerate()
                .filter(|(_, r)| {
                    !r.ready_after
                        .as_ref()
                        .is_ok_and(|t| *t <= RESTART_READY_BUDGET)
                })
                .map(|(i, r)| format!("restart {i} after {}: {:?}", r.stopped_by, r.ready_after))
                .collect();
            assert!(
                slow.is_empty(),
                "node B was not ready within {RESTART_READY_BUDGET:?} of its spawn: {slow:#?}\nB's log tail:\n{}",
                b.log_tail(40)
            );
            assert!(
                problems.is_empty(),
                "node A refused or dropped submissions while B restarted: {problems:#?}"
            );
            assert!(accepted > 0, "the load never reached node A");

            // Everything A acknowledged ripens, whichever node ran it.
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let pending = a.get("/v1/entities?status=pending&limit=1").await;
                assert_eq!(pending.status, 200, "{pending}");
                if pending.json()["items"]
                    .as_array()
                    .is_some_and(|i| i.is_empty())
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "entities still pending a minute after the load: {pending}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let failed = a.get("/v1/entities?status=failed&limit=1").await;
            assert_eq!(failed.json()["items"], json!([]), "{failed}");
            eprintln!("restarts under load: {accepted} entities acknowledged by A; {restarts:?}");
            drop(a);
            drop(b);
            drop_cluster(cluster).await;
        },
    );
}

/// Workers attached to different nodes: a worker long-polling node B is
/// woken by a submission to node A (the notification names its queue), and
/// its result, recorded through B, lets A's scheduler run the next step.
#[test]
fn workers_on_different_nodes() {
    run("workers_on_different_nodes", async {
        let db = shared_database().await;
        let ds = Downstream::start().await;
        let config = |node: &str| {
            node_config(node)
                .with_type(TypeDef::new(
                    "wk",
                    vec![
                        Step::worker("bill", "billing"),
                        Step::http("c", ds.url("/wk/c")).needs(&["bill"]),
                    ],
                ))
                // Polling every 30 s: only notifications can be this quick.
                .poll_interval("30s")
        };
        // A takes intake and runs HTTP steps; B serves only workers.
        let a = Server::start_on(&config("A"), &db).await;
        let b = Server::start_on(&config("B").execute(false), &db).await;
        let mut wakeups = Vec::new();
        for _ in 0..5 {
            let waiting = {
                let b = b.api().clone();
                tokio::spawn(async move {
                    let r = b
                        .post(
                            "/v1/queues/billing/claim",
                            &json!({"wait_ms": 10_000, "worker_id": "on-b"}),
                        )
                        .await;
                    (Instant::now(), r)
                })
            };
            tokio::time::sleep(Duration::from_millis(100)).await;
            let id = a.submit_ok("wk", &json!({})).await;
            let acked = Instant::now();
            let (answered, r) = waiting.await.expect("claim");
            assert_eq!(r.status, 200, "{r}");
            let tasks = r.json()["tasks"].as_array().expect("tasks").clone();
            assert_eq!(tasks.len(), 1, "{tasks:#?}");
            assert_eq!(tasks[0]["entity_id"], id.as_str());
            wakeups.push(answered.saturating_duration_since(acked));
            let task_id = tasks[0]["task_id"].as_str().expect("task id");
            let done = b
                .post(
                    &format!("/v1/tasks/{task_id}/complete"),
                    &json!({"lease": tasks[0]["lease"], "output": {"node": "B"}}),
                )
                .await;
            assert_eq!(done.status, 200, "{done}");
            let view = a.wait_terminal(&id, SLACK).await;
            assert_eq!(view["status"], "ready", "{view:#}");
            assert_eq!(ds.calls_to("/A/wk/c").len(), wakeups.len(), "A ran c");
        }
        wakeups.sort();
        eprintln!("cross-node long-poll wake-ups: {wakeups:?}");
        assert!(
            wakeups[wakeups.len() - 1] < Duration::from_secs(2),
            "{wakeups:?}"
        );
        assert!(ds.calls_to("/B/wk/c").is_empty(), "B runs no steps");
    });
}
