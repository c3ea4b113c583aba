//! The crash test: `kill -9` the server at random moments under load, restart
//! it on the same data, and check that nothing acknowledged is lost, every
//! entity ripens, and idempotency keys still map to the same entities.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const ENTITIES: usize = 1_000;
const CLIENTS: usize = 16;
const MIN_KILLS: usize = 3;
const MAX_KILLS: usize = 12;
/// The pause of a client between two submissions, in milliseconds.
const PACE_MS: std::ops::RangeInclusive<u64> = 20..=80;
/// The whole test must end well within a minute.
const INTAKE_DEADLINE: Duration = Duration::from_secs(35);
const RIPEN_DEADLINE: Duration = Duration::from_secs(50);

fn key_of(i: usize) -> String {
    format!("crash-key-{i:04}")
}

fn body_of(i: usize) -> Value {
    json!({"i": i, "name": format!("entity {i}"), "pad": "p".repeat(64 + i % 200)})
}

#[derive(Default)]
struct Ledger {
    /// Idempotency key index -> entity id, for every 202.
    acked: HashMap<usize, String>,
    /// Answers that are neither a 202 nor an expected transient refusal.
    unexpected: Vec<String>,
    transport_errors: usize,
    transient_refusals: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_loses_nothing_acknowledged() {
    let started = Instant::now();
    let ds = Downstream::start().await;
    for s in ["a", "b", "c", "d", "e"] {
        let path = step_path("w5", s);
        ds.set(
            &path,
            Behavior::Flaky {
                max_delay_ms: 5,
                fail_percent: 3,
                ok: json!({"from": path}),
            },
        );
    }
    let pipeline =
        w5("w5", &ds).map_steps(|s| s.attempts(25).backoff("10ms", "100ms").timeout("1s"));
    let mut srv = Server::start(&Config::new().with_type(pipeline).lease_grace("500ms")).await;
    let api = srv.api().clone();

    // Intake from concurrent clients; a client keeps retrying one key with
    // the same body until it gets a 202, whatever happens to the server.
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let next = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let api = api.clone();
        let ledger = ledger.clone();
        let next = next.clone();
        clients.push(tokio::spawn(async move {
            loop {
                // Pace the load (about 300 submissions a second in all), so
                // that the intake spans several kills.
                tokio::time::sleep(Duration::from_millis(fastrand::u64(PACE_MS))).await;
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= ENTITIES {
                    return;
                }
                let key = key_of(i);
                let body = body_of(i);
                loop {
                    assert!(
                        started.elapsed() < INTAKE_DEADLINE,
                        "intake of key {key} did not finish in time"
                    );
                    match api.try_submit("w5", &body, Some(&key)).await {
                        Ok(r) if r.status == 202 => {
                            let id = r.json()["id"].as_str().map(str::to_owned);
                            let mut l = ledger.lock().unwrap();
                            match id {
                                Some(id) => {
                                    l.acked.insert(i, id);
                                }
                                None => l.unexpected.push(format!("{key}: 202 without id: {r}")),
                            }
                            break;
                        }
                        Ok(r) if r.status == 409 || r.status == 503 || r.status == 429 => {
                            ledger.lock().unwrap().transient_refusals += 1;
                        }
                        Ok(r) => {
                            ledger
                                .lock()
                                .unwrap()
                                .unexpected
                                .push(format!("{key}: {r}"));
                        }
                        Err(_) => {
                            ledger.lock().unwrap().transport_errors += 1;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }

    // Kill and restart while the load runs: at least MIN_KILLS times, and on
    // while the intake is still going (up to MAX_KILLS).
    let mut kills = 0;
    let mut kills_during_intake = 0;
    let mut restart_times = Vec::new();
    loop {
        let intake_done = ledger.lock().unwrap().acked.len() >= ENTITIES;
        if kills >= MAX_KILLS || (kills >= MIN_KILLS && intake_done) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(150..=600))).await;
        let acked_before = ledger.lock().unwrap().acked.len();
        srv.kill();
        kills += 1;
        if acked_before < ENTITIES {
            kills_during_intake += 1;
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..50))).await;
        let t = Instant::now();
        srv.restart().await;
        restart_times.push(t.elapsed());
    }
    for c in clients {
        c.await.expect("a client task failed");
    }
    let intake_time = started.elapsed();

    let ledger = Arc::try_unwrap(ledger)
        .ok()
        .expect("clients are done")
        .into_inner()
        .unwrap();
    eprintln!(
        "crash test: {kills} kills ({kills_during_intake} during intake), restarts {restart_times:?}, \
         intake {intake_time:?}, {} transport errors, {} transient refusals",
        ledger.transport_errors, ledger.transient_refusals
    );
    assert!(
        ledger.unexpected.is_empty(),
        "unexpected answers to submissions ({}):\n{}",
        ledger.unexpected.len(),
        ledger
            .unexpected
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(ledger.acked.len(), ENTITIES);
    let distinct: HashSet<&String> = ledger.acked.values().collect();
    assert_eq!(
        distinct.len(),
        ENTITIES,
        "two keys were given the same entity"
    );
    assert!(kills >= MIN_KILLS);
    assert!(
        kills_during_intake >= MIN_KILLS,
        "only {kills_during_intake} kills hit the intake; the test did not test much"
    );

    // Every acknowledged entity exists and ripens.
    let mut waiting: Vec<(usize, String)> = ledger
        .acked
        .iter()
        .map(|(i, id)| (*i, id.clone()))
        .collect();
    waiting.sort();
    let mut ready: Vec<(usize, String)> = Vec::new();
    let mut ready_views: HashMap<String, Value> = HashMap::new();
    while !waiting.is_empty() {
        let views = fetch_all(&api, &waiting, |id| format!("/v1/entities/{id}")).await;
        let mut still = Vec::new();
        for ((i, id), r) in waiting.into_iter().zip(views) {
            match r.status {
                200 => {
                    let view = r.json();
                    match view["status"].as_str() {
                        Some("ready") => {
                            ready_views.insert(id.clone(), view);
                            ready.push((i, id));
                        }
                        Some("pending") => still.push((i, id)),
                        _ => panic!("entity {id} (key {}) did not ripen: {view:#}", key_of(i)),
                    }
                }
                404 => panic!("acknowledged entity {id} (key {}) is lost: {r}", key_of(i)),
                _ => panic!("GET entity {id}: {r}"),
            }
        }
        waiting = still;
        if !waiting.is_empty() {
            if started.elapsed() > RIPEN_DEADLINE {
                let (i, id) = &waiting[0];
                let view = api.entity(id).await;
                panic!(
                    "{} entities still pending after {:?}; e.g. key {} id {id}: {view:#}",
                    waiting.len(),
                    started.elapsed(),
                    key_of(*i)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!("crash test: all ready after {:?}", started.elapsed());

    // The payload of every acknowledged entity survived, byte for byte as JSON.
    ready.sort();
    let datas = fetch_all(&api, &ready, |id| format!("/v1/entities/{id}/data")).await;
    for ((i, id), r) in ready.iter().zip(datas) {
        assert_eq!(r.status, 200, "data of {id}: {r}");
        let data = r.json();
        assert_eq!(data["id"], id.as_str());
        assert_eq!(
            data["payload"],
            body_of(*i),
            "payload of {id} (key {})",
            key_of(*i)
        );
        for s in ["a", "b", "c", "d"] {
            assert!(
                data["outputs"][s].is_object(),
                "output of {s} missing for {id}: {data}"
            );
        }
    }

    // Every key still maps to its entity: a replay with the ledger's id.
    let replays = replay_all(&api, &ready).await;
    for ((i, id), r) in ready.iter().zip(replays) {
        assert_eq!(r.status, 202, "replay of key {}: {r}", key_of(*i));
        assert_eq!(
            r.header("idempotent-replayed").as_deref(),
            Some("true"),
            "replay of key {}: {r}",
            key_of(*i)
        );
        assert_eq!(
            r.json()["id"],
            id.as_str(),
            "key {} now maps elsewhere",
            key_of(*i)
        );
    }

    // The downstream's view: calls carry the stable key, and no step started
    // before a success of each of its needs.
    let calls = ds.calls();
    let mut by_entity: HashMap<String, Vec<&Call>> = HashMap::new();
    for c in &calls {
        let id = c
            .entity_id()
            .unwrap_or_else(|| panic!("a step call without entity_id: {c:?}"))
            .to_owned();
        let step_name = c.path.rsplit('/').next().unwrap();
        assert_eq!(
            c.header("idempotency-key"),
            Some(format!("{id}:{step_name}").as_str()),
            "{c:?}"
        );
        by_entity.entry(id).or_default().push(c);
    }
    let needs: [(&str, &[&str]); 4] = [
        ("b", &["a"]),
        ("c", &["a"]),
        ("d", &["b", "c"]),
        ("e", &["a"]),
    ];
    for (_, id) in &ready {
        let calls = by_entity
            .get(id)
            .unwrap_or_else(|| panic!("the downstream never heard of {id}"));
        let first_start = |s: &str| {
            calls
                .iter()
                .filter(|c| c.path.ends_with(&format!("/{s}")))
                .map(|c| c.received_at)
                .min()
        };
        let first_success = |s: &str| {
            calls
                .iter()
                .filter(|c| c.path.ends_with(&format!("/{s}")) && c.succeeded())
                .filter_map(|c| c.replied_at)
                .min()
        };
        for s in ["a", "b", "c", "d"] {
            assert!(
                first_success(s).is_some(),
                "{id}: no successful call of {s}"
            );
        }
        // Every call was its own attempt: an attempt is persisted before it
        // runs, so a crash never makes two calls share an attempt number,
        // and the view counts them all.
        for s in ["a", "b", "c", "d"] {
            let mut attempts: Vec<u64> = calls
                .iter()
                .filter(|c| c.path.ends_with(&format!("/{s}")))
                .map(|c| c.attempt().unwrap_or_else(|| panic!("no attempt in {c:?}")))
                .collect();
            let n = attempts.len();
            attempts.sort();
            attempts.dedup();
            assert_eq!(attempts.len(), n, "{id}: step {s} reused an attempt number");
            let counted = ready_views[id]["steps"]
                .as_array()
                .and_then(|steps| steps.iter().find(|x| x["name"] == s))
                .and_then(|x| x["attempts"].as_u64())
                .unwrap_or(0);
            assert!(
                attempts.last().copied().unwrap_or(0) <= counted,
                "{id}: step {s} was called with attempts {attempts:?} but the view counts {counted}"
            );
        }
        for (s, deps) in needs {
            let Some(start) = first_start(s) else {
                continue;
            };
            for dep in deps {
                let done = first_success(dep)
                    .unwrap_or_else(|| panic!("{id}: {s} ran but {dep} never succeeded"));
                assert!(start >= done, "{id}: {s} started before {dep} succeeded");
            }
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the crash test took {:?}",
        started.elapsed()
    );
    drop(srv);
}

/// GETs one path per entity, 16 at a time, in order.
async fn fetch_all(api: &Api, ids: &[(usize, String)], path: impl Fn(&str) -> String) -> Vec<Resp> {
    let paths: Vec<String> = ids.iter().map(|(_, id)| path(id)).collect();
    in_parallel(paths.len(), |k| {
        let api = api.clone();
        let p = paths[k].clone();
        async move { api.get(&p).await }
    })
    .await
}

/// Submits every key again with its body.
async fn replay_all(api: &Api, ids: &[(usize, String)]) -> Vec<Resp> {
    in_parallel(ids.len(), |k| {
        let api = api.clone();
        let i = ids[k].0;
        async move { api.submit("w5", &body_of(i), Some(&key_of(i))).await }
    })
    .await
}

/// Runs `n` jobs with at most 16 in flight; results in job order.
async fn in_parallel<F, Fut>(n: usize, job: F) -> Vec<Resp>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Resp> + Send + 'static,
{
    let mut results: Vec<Option<Resp>> = vec![None; n];
    let mut set = tokio::task::JoinSet::new();
    let mut k = 0;
    while k < n || !set.is_empty() {
        while k < n && set.len() < CLIENTS {
            let fut = job(k);
            let index = k;
            set.spawn(async move { (index, fut.await) });
            k += 1;
        }
        if let Some(done) = set.join_next().await {
            let (index, resp) = done.expect("a request task failed");
            results[index] = Some(resp);
        }
    }
    results.into_iter().map(|r| r.unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_cut_short_by_a_crash_is_retried_as_a_new_attempt() {
    let ds = Downstream::start().await;
    // The first call never answers in time: the server dies during it.
    ds.set(
        "/cut/only",
        Behavior::sleep_first(1, Duration::from_secs(30), json!({"ok": true})),
    );
    let t = TypeDef::new(
        "cut",
        vec![
            Step::http("only", ds.url("/cut/only")).timeout("1s"),
            Step::http("after", ds.url("/cut/after")).needs(&["only"]),
        ],
    );
    let mut srv = Server::start(&Config::new().with_type(t).lease_grace("500ms")).await;
    let id = srv.submit_ok("cut", &json!({"n": 1})).await;

    let deadline = Instant::now() + Duration::from_secs(10);
    while ds.calls_to("/cut/only").is_empty() {
        assert!(Instant::now() < deadline, "the step was never called");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let view = srv.entity(&id).await;
    assert_eq!(step(&view, "only")["status"], "running", "{view:#}");
    assert_eq!(step(&view, "only")["attempts"], 1, "{view:#}");

    srv.kill();
    let killed_at = Instant::now();
    srv.restart().await;
    let view = srv.wait_terminal(&id, Duration::from_secs(20)).await;
    assert_eq!(view["status"], "ready", "{view:#}");
    assert_eq!(
        step(&view, "only")["attempts"],
        2,
        "the cut attempt counts: {view:#}"
    );

    let calls = ds.calls_to("/cut/only");
    assert_eq!(calls.len(), 2, "{calls:#?}");
    assert_eq!(calls[0].attempt(), Some(1));
    assert_eq!(
        calls[1].attempt(),
        Some(2),
        "a new attempt number after the crash"
    );
    let resumed = calls[1].received_at - killed_at;
    assert!(
        resumed < Duration::from_secs(6),
        "the step was retried {resumed:?} after the crash; its lease was 1.5 s"
    );
    let after = ds.calls_to("/cut/after");
    assert_eq!(after.len(), 1);
    assert_eq!(
        after[0].body.as_ref().unwrap()["outputs"]["only"],
        json!({"ok": true})
    );

    let events = srv.events(&id).await;
    assert_lifecycle(&events);
    assert!(
        events
            .iter()
            .any(|e| event_kind(e) == "attempt_failed" && event_step(e) == Some("only")),
        "the attempt cut short is recorded as failed: {events:#?}"
    );
}
