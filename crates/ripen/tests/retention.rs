//! Retention through the real binary: raw payloads of settled entities are
//! pruned once `retention.payload` passed since their last change, never
//! before and never while the entity is pending; `/data` keeps the outputs
//! and says when the payload went; a retry is refused; a `kill -9` while
//! the pruner works loses nothing that was not due. Runs on SQLite, and on
//! PostgreSQL with `RIPEN_TEST_STORAGE=postgres`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// The payload period of these tests.
const PAYLOAD_S: i64 = 2;
const WAIT: Duration = Duration::from_secs(30);

/// Unix microseconds of the server's RFC 3339 times
/// (`2026-01-02T03:04:05.123456Z`).
fn micros(t: &Value) -> i64 {
    let s = t.as_str().unwrap_or_else(|| panic!("not a time: {t}"));
    let n = |r: std::ops::Range<usize>| -> i64 { s[r].parse().expect("digits") };
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from the civil date (proleptic Gregorian).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + n(11..13) * 3_600 + n(14..16) * 60 + n(17..19);
    let frac = s[20..s.len() - 1].to_owned() + "000000";
    secs * 1_000_000 + frac[..6].parse::<i64>().expect("fraction")
}

fn config(ds: &Downstream, batch: u32) -> Config {
    config_every(ds, batch, "100ms")
}

fn config_every(ds: &Downstream, batch: u32, interval: &str) -> Config {
    ds.set(&step_path("doomed", "only"), Behavior::always(400));
    ds.set(&step_path("stuck", "only"), Behavior::always(503));
    Config::new()
        .with_type(single("kept", ds))
        .with_type(single("doomed", ds))
        .with_type(single("stuck", ds).map_steps(|s| s.attempts(100).backoff("1h", "1h")))
        .extra(&format!(
            "[retention]\npayload = \"{PAYLOAD_S}s\"\ninterval = \"{interval}\"\nbatch = {batch}"
        ))
}

async fn data(api: &Api, id: &str) -> Value {
    let r = api.get(&format!("/v1/entities/{id}/data")).await;
    assert_eq!(r.status, 200, "GET data of {id}: {r}");
    r.json()
}

/// Waits until the payload of `id` was pruned and checks it was not early:
/// at least the period after the entity's last change, by the server's
/// own times.
async fn wait_pruned(api: &Api, id: &str) -> Value {
    let view = api
        .wait_until(id, WAIT, "pruned", |v| !v["payload_pruned_at"].is_null())
        .await;
    let (updated, pruned) = (
        micros(&view["updated_at"]),
        micros(&view["payload_pruned_at"]),
    );
    assert!(
        pruned >= updated + PAYLOAD_S * 1_000_000,
        "pruned at {} though last changed at {}: {view:#}",
        view["payload_pruned_at"],
        view["updated_at"]
    );
    view
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_payloads_are_pruned_when_due_and_data_says_so() {
    let ds = Downstream::start().await;
    let srv = Server::start(&config(&ds, 500)).await;
    let api = srv.api();

    let kept = api.submit_ok("kept", &json!({"name": "kept"})).await;
    let doomed = api.submit_ok("doomed", &json!({"name": "doomed"})).await;
    let stuck = api.submit_ok("stuck", &json!({"name": "stuck"})).await;
    let view = api.wait_terminal(&kept, WAIT).await;
    assert_eq!(view["status"], "ready");
    assert!(view["payload_pruned_at"].is_null(), "{view:#}");
    assert_eq!(api.wait_terminal(&doomed, WAIT).await["status"], "failed");
    let fresh = data(api, &kept).await;
    assert_eq!(fresh["payload"], json!({"name": "kept"}));
    assert!(fresh["payload_pruned_at"].is_null());

    wait_pruned(api, &kept).await;
    wait_pruned(api, &doomed).await;

    let pruned = data(api, &kept).await;
    assert!(pruned["payload"].is_null(), "{pruned:#}");
    assert!(pruned["payload_pruned_at"].is_string(), "{pruned:#}");
    assert_eq!(
        pruned["outputs"]["only"],
        json!({"from": step_path("kept", "only")}),
        "the outputs are kept"
    );
    assert!(!api.events(&kept).await.is_empty(), "the history is kept");

    let r = api
        .post_empty(&format!("/v1/entities/{doomed}/retry"))
        .await;
    let problem = assert_problem(&r, 409);
    assert_eq!(problem["type"], "urn:ripen:problem:payload-pruned", "{r}");
    assert_eq!(api.entity(&doomed).await["status"], "failed");

    // The pending one is older than the period, and keeps its payload.
    let view = api.entity(&stuck).await;
    assert_eq!(view["status"], "pending");
    assert!(view["payload_pruned_at"].is_null(), "{view:#}");

    let metrics = api.get("/metrics").await.text();
    let payloads: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ripen_pruned_total{what=\"payload\"} "))
        .unwrap_or_else(|| panic!("no ripen_pruned_total in {metrics}"))
        .parse()
        .expect("a count");
    assert!(payloads >= 2.0, "{payloads}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_pruning_loses_nothing_that_was_not_due() {
    let ds = Downstream::start().await;
    // One payload per pass, so that the kill finds the pruner mid-way.
    let mut srv = Server::start(&config(&ds, 1)).await;
    let mut settled = Vec::new();
    for i in 0..30 {
        settled.push(srv.api().submit_ok("kept", &json!({"i": i})).await);
    }
    for id in &settled {
        srv.api().wait_terminal(id, WAIT).await;
    }
    let stuck = srv.api().submit_ok("stuck", &json!({"stuck": true})).await;
    // Wait for the first prune, then kill at once.
    srv.api()
        .wait_until(&settled[0], WAIT, "pruned", |v| {
            !v["payload_pruned_at"].is_null()
        })
        .await;
    srv.kill();
    srv.restart().await;
    let api = srv.api();

    // Everything is there; each payload is either kept or was due.
    for (i, id) in settled.iter().enumerate() {
        let d = data(api, id).await;
        assert_eq!(
            d["outputs"]["only"],
            json!({"from": step_path("kept", "only")})
        );
        if d["payload_pruned_at"].is_null() {
            assert_eq!(d["payload"], json!({"i": i}), "{d:#}");
        } else {
            assert!(d["payload"].is_null(), "{d:#}");
        }
    }
    // A new entity settles and keeps its payload until due, after the
    // restart too.
    let late = api.submit_ok("kept", &json!({"late": true})).await;
    api.wait_terminal(&late, WAIT).await;
    assert_eq!(data(api, &late).await["payload"], json!({"late": true}));
    for id in settled.iter().chain([&late]) {
        wait_pruned(api, id).await;
    }
    let view = api.entity(&stuck).await;
    assert_eq!(view["status"], "pending");
    assert!(view["payload_pruned_at"].is_null(), "{view:#}");
}

/// `ripen store stats|prune --config` on a stopped server's store.
async fn store_cmd(srv: &Server, args: &[&str]) -> Value {
    let mut all: Vec<String> = vec!["store".into()];
    all.extend(args.iter().map(|a| a.to_string()));
    all.extend([
        "--config".into(),
        "ripen.toml".into(),
        "-o".into(),
        "json".into(),
    ]);
    let out = run_ripen(all, srv.dir().to_path_buf(), WAIT).await;
    assert!(out.success(), "ripen store {args:?}: {out}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn rows(stats: &Value, table: &str) -> u64 {
    stats["tables"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == table))
        .and_then(|t| t["rows"].as_u64())
        .unwrap_or_else(|| panic!("no table {table}: {stats:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_commands_count_and_prune_offline() {
    let ds = Downstream::start().await;
    // The server's own pruner waits an hour: only the command prunes.
    let mut srv = Server::start(&config_every(&ds, 2, "1h")).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let id = srv.api().submit_ok("kept", &json!({"i": i})).await;
        srv.api().wait_terminal(&id, WAIT).await;
        ids.push(id);
    }
    srv.terminate(WAIT).await.expect("the server stops");

    let stats = store_cmd(&srv, &["stats"]).await;
    assert_eq!(rows(&stats, "entities"), 3, "{stats:#}");
    assert_eq!(rows(&stats, "payloads"), 3, "{stats:#}");
    assert!(stats["oldest_kept_payload_at"].is_string(), "{stats:#}");

    // Once the period passed, a dry run counts the next pass (a batch of
    // 2) and removes nothing.
    let deadline = std::time::Instant::now() + WAIT;
    let dry = loop {
        let dry = store_cmd(&srv, &["prune", "--dry-run"]).await;
        if dry["payloads"] == 2 || std::time::Instant::now() > deadline {
            break dry;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(dry["payloads"], 2, "{dry:#}");
    assert_eq!(rows(&store_cmd(&srv, &["stats"]).await, "payloads"), 3);

    let pruned = store_cmd(&srv, &["prune"]).await;
    assert_eq!(
        pruned["payloads"], 3,
        "passes until none is full: {pruned:#}"
    );
    let stats = store_cmd(&srv, &["stats"]).await;
    assert_eq!(rows(&stats, "payloads"), 0, "{stats:#}");
    assert_eq!(rows(&stats, "entities"), 3, "{stats:#}");
    assert!(stats["oldest_kept_payload_at"].is_null(), "{stats:#}");

    srv.restart().await;
    for id in &ids {
        wait_pruned(srv.api(), id).await;
    }
}

/// Keys are kept a day at least, and entities at least as long as keys: a
/// configuration that asks for less does not start, and says which key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_short_periods_stop_the_server_naming_the_key() {
    let ds = Downstream::start().await;
    for (extra, key) in [
        (
            "[retention]\nidempotency_keys = \"23h\"",
            "retention.idempotency_keys",
        ),
        ("[retention]\nentities = \"12h\"", "retention.entities"),
    ] {
        let dir = TempDir::new("ripen-retention-").expect("temp dir");
        let cfg = Config::new().with_type(single("kept", &ds)).extra(extra);
        let path = cfg
            .write(dir.path(), &ripen_testkit::sqlite_url(dir.path()))
            .expect("write the config");
        let out = run_ripen(
            vec![
                "serve".into(),
                "--config".into(),
                path.display().to_string(),
            ],
            dir.path().to_path_buf(),
            WAIT,
        )
        .await;
        assert!(!out.success(), "{extra}: {out}");
        assert!(out.stderr.contains(key), "{extra}: {out}");
    }
}

/// `allow_short_periods`: idempotency keys may be kept seconds; the node
/// warns when it starts, and a retry after the key period creates a second
/// entity (what the 24 h floor prevents in production).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_key_periods_warn_and_a_late_retry_makes_a_second_entity() {
    let ds = Downstream::start().await;
    let cfg = Config::new().with_type(single("kept", &ds)).extra(
        "[retention]\npayload = \"10s\"\nidempotency_keys = \"1s\"\nentities = \"60s\"\n\
         allow_short_periods = true\ninterval = \"100ms\"",
    );
    let srv = Server::start(&cfg).await;
    let api = srv.api();
    let body = json!({"name": "once"});
    let id = |r: &Resp| -> String {
        assert_eq!(r.status, 202, "{r}");
        r.json()["id"].as_str().expect("an id").to_owned()
    };
    let first = id(&api.submit("kept", &body, Some("late-retry")).await);
    let again = api.submit("kept", &body, Some("late-retry")).await;
    assert!(again.status < 300, "{again}");
    assert_eq!(
        again.json()["id"],
        first.as_str(),
        "a retry within the period"
    );

    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let metrics = api.get("/metrics").await.text();
        let keys: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("ripen_pruned_total{what=\"idempotency_key\"} "))
            .unwrap_or_else(|| panic!("no ripen_pruned_total in {metrics}"))
            .parse()
            .expect("a count");
        if keys >= 1.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the key was not pruned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The pruner warned when it started, before its first pass.
    let log = srv.log();
    assert!(
        log.contains("idempotency keys may expire before 24h"),
        "no warning at start in:\n{log}"
    );
    let later = id(&api.submit("kept", &body, Some("late-retry")).await);
    assert_ne!(later, first, "a retry after the key period is a new entity");
    assert_eq!(api.entity(&first).await["id"], first.as_str());
}

/// `entities`: a settled entity is deleted entirely once due — its view,
/// data and history answer 404 like an unknown id — while a pending one
/// stays, and an entity within its period stays too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_entities_are_deleted_when_due() {
    let ds = Downstream::start().await;
    ds.set(&step_path("stuck", "only"), Behavior::always(503));
    let cfg = Config::new()
        .with_type(single("kept", &ds))
        .with_type(single("stuck", &ds).map_steps(|s| s.attempts(100).backoff("1h", "1h")))
        .notify("outbox_retention = \"1s\"")
        .extra(
            "[retention]\npayload = \"1s\"\nidempotency_keys = \"1s\"\nentities = \"2s\"\n\
             allow_short_periods = true\ninterval = \"100ms\"",
        );
    let srv = Server::start(&cfg).await;
    let doomed = srv.submit_ok("kept", &json!({"n": 1})).await;
    let stuck = srv.submit_ok("stuck", &json!({"n": 2})).await;
    let settled = srv.wait_terminal(&doomed, WAIT).await;
    assert_eq!(settled["status"], "ready", "{settled}");
    let ready_at = std::time::Instant::now();
    // The newest outbox row is always kept (a stream resumes after it):
    // a later submission's row takes that place.
    srv.submit_ok("stuck", &json!({"n": 3})).await;

    let deadline = ready_at + WAIT;
    loop {
        let r = srv.get(&format!("/v1/entities/{doomed}")).await;
        if r.status == 404 {
            break;
        }
        assert_eq!(r.status, 200, "{r}");
        assert!(std::time::Instant::now() < deadline, "not deleted: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ready_at.elapsed() >= Duration::from_millis(1_900),
        "deleted {:?} after it settled, before its 2 s",
        ready_at.elapsed()
    );
    for path in ["data", "events"] {
        let r = srv.get(&format!("/v1/entities/{doomed}/{path}")).await;
        assert_problem(&r, 404);
    }
    let v = srv.entity(&stuck).await;
    assert_eq!(v["status"], "pending", "a pending entity stays: {v}");
    let metrics = srv.get("/metrics").await.text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ripen_pruned_total{what=\"entity\"} ") && !l.ends_with(" 0")),
        "{metrics}"
    );
}
