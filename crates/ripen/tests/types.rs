//! The type registry through the real binary, on SQLite and (with
//! `RIPEN_TEST_STORAGE=postgres`) on PostgreSQL: versions registered from
//! `ripen.toml` at start and over the API, entities pinned to their version
//! across restarts and config changes, entities whose version cannot run
//! failed once with their cause, the compatibility check's 409, `force`,
//! 422 and 404 answers, and `ripen types push|list|show`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const SETTLE: Duration = Duration::from_secs(30);
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The storage URL the server's `ripen.toml` names.
fn storage_of(server: &Server) -> String {
    let toml = std::fs::read_to_string(server.dir().join("ripen.toml")).expect("read ripen.toml");
    let line = toml
        .lines()
        .skip_while(|l| l.trim() != "[storage]")
        .find(|l| l.trim_start().starts_with("url"))
        .expect("a storage url");
    let value = line.split_once('=').expect("url = …").1.trim();
    serde_json::from_str(value).expect("a TOML basic string")
}

/// Writes `cfg` as the server's `ripen.toml`, on the same storage; applied
/// at its next start.
fn reconfigure(server: &Server, cfg: &Config) {
    let url = storage_of(server);
    cfg.write(server.dir(), &url).expect("write ripen.toml");
}

/// Deletes a registered version from the store, as a database written
/// before the registry existed lacks it. The server must be stopped.
async fn forget_version(url: &str, type_name: &str, version: u32) {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let conn = rusqlite::Connection::open(path).expect("open the database");
        let n = conn
            .execute(
                "DELETE FROM type_versions WHERE type = ?1 AND version = ?2",
                rusqlite::params![type_name, version],
            )
            .expect("delete the version");
        assert_eq!(n, 1);
    } else {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect to PostgreSQL");
        let driver = tokio::spawn(conn);
        let n = client
            .execute(
                "DELETE FROM type_versions WHERE type = $1 AND version = $2",
                &[&type_name, &i64::from(version)],
            )
            .await
            .expect("delete the version");
        assert_eq!(n, 1);
        drop(client);
        let _ = driver.await;
    }
}

fn names(view: &Value) -> Vec<String> {
    view["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["name"].as_str().expect("a name").to_owned())
        .collect()
}

async fn type_item(api: &Api, t: &str) -> Value {
    let r = api.get("/v1/types").await;
    assert_eq!(r.status, 200, "{r}");
    r.json()["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|i| i["type"] == t)
        .cloned()
        .unwrap_or_else(|| panic!("no type {t} in {r}"))
}

/// A step that keeps entities pending: 503 until told otherwise, retried
/// quickly for a long time.
fn held(name: &str, url: String) -> Step {
    Step::http(name, url)
        .attempts(1_000)
        .backoff("20ms", "100ms")
}

/// New content for a type registers version 2 at the next start; the
/// entities in flight on version 1 finish on version 1's pipeline (its
/// steps, its URLs), new ones run version 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_bump_keeps_entities_in_flight_on_their_version() {
    let ds = Downstream::start().await;
    ds.set("/m/a", Behavior::always(503));
    let v1 = Config::new().with_type(TypeDef::new("m", vec![held("a", ds.url("/m/a"))]));
    let mut srv = Server::start(&v1).await;
    let item = type_item(&srv, "m").await;
    assert_eq!(
        (item["latest_version"].clone(), item["versions"].clone()),
        (json!(1), json!(1))
    );

    let mut old = Vec::new();
    for i in 0..3 {
        old.push(srv.submit_ok("m", &json!({"n": i})).await);
    }
    srv.wait_until(&old[2], SETTLE, "tried once", |v| {
        v["steps"][0]["attempts"].as_u64() >= Some(1)
    })
    .await;

    let v2 = Config::new().with_type(TypeDef::new(
        "m",
        vec![
            Step::http("a", ds.url("/m2/a")),
            Step::http("b", ds.url("/m2/b")).needs(&["a"]),
        ],
    ));
    reconfigure(&srv, &v2);
    srv.restart().await;
    let item = type_item(&srv, "m").await;
    assert_eq!(
        (item["latest_version"].clone(), item["versions"].clone()),
        (json!(2), json!(2))
    );
    assert_eq!(item["steps"].as_array().map(Vec::len), Some(2), "{item}");
    let v1_view = srv.get("/v1/types/m/versions/1").await;
    assert_eq!(v1_view.status, 200, "{v1_view}");
    assert_eq!(v1_view.json()["live_entities"], 3, "{v1_view}");
    assert_eq!(v1_view.json()["steps"][0]["http"], ds.url("/m/a"));

    let new = srv.submit_ok("m", &json!({"n": 9})).await;
    assert_eq!(srv.entity(&new).await["version"], 2);
    let done = srv.wait_terminal(&new, SETTLE).await;
    assert_eq!(
        (done["status"].as_str(), names(&done)),
        (Some("ready"), vec!["a".into(), "b".into()])
    );

    // Version 1's entities are still pending on version 1's URL.
    for id in &old {
        let v = srv.entity(id).await;
        assert_eq!(
            (v["status"].as_str(), v["version"].as_u64()),
            (Some("pending"), Some(1)),
            "{v}"
        );
    }
    ds.set("/m/a", Behavior::ok(json!({"v": 1})));
    for id in &old {
        let v = srv.wait_terminal(id, SETTLE).await;
        assert_eq!(v["status"], "ready", "{v}");
        assert_eq!(names(&v), vec!["a".to_owned()]);
        let calls = ds.calls_to("/m/a");
        assert!(calls
            .iter()
            .any(|c| c.entity_id() == Some(id.as_str()) && c.succeeded()));
        assert!(ds
            .calls_to("/m2/a")
            .iter()
            .all(|c| c.entity_id() != Some(id.as_str())));
    }
    let v1_view = srv.get("/v1/types/m/versions/1").await;
    assert_eq!(v1_view.json()["live_entities"], 0, "{v1_view}");

    // The same content again at the next start is the same version.
    srv.restart().await;
    let item = type_item(&srv, "m").await;
    assert_eq!(
        (item["latest_version"].clone(), item["versions"].clone()),
        (json!(2), json!(2))
    );
}

/// A step renamed without a version bump registers the next version, and
/// the entities in flight finish on theirs. A version missing from the
/// store (a database from before the registry) fails its entities once,
/// with the cause, while other types keep running: no start-up refusal,
/// no log line per entity or per claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_steps_and_versions_missing_from_the_store() {
    let ds = Downstream::start().await;
    ds.set("/t/a", Behavior::always(503));
    ds.set("/other/only", Behavior::ok(json!({})));
    let first = Config::new()
        .with_type(TypeDef::new("t", vec![held("a", ds.url("/t/a"))]))
        .with_type(single("other", &ds));
    let mut srv = Server::start(&first).await;
    let mut kept = Vec::new();
    for i in 0..3 {
        kept.push(srv.submit_ok("t", &json!({"n": i})).await);
    }

    // The step is renamed; the config says nothing of versions.
    let renamed = Config::new()
        .with_type(TypeDef::new("t", vec![held("a2", ds.url("/t/a"))]))
        .with_type(single("other", &ds));
    reconfigure(&srv, &renamed);
    srv.restart().await;
    assert_eq!(type_item(&srv, "t").await["latest_version"], 2);
    ds.set("/t/a", Behavior::ok(json!({})));
    for id in &kept {
        let v = srv.wait_terminal(id, SETTLE).await;
        assert_eq!(
            (v["status"].as_str(), v["version"].as_u64()),
            (Some("ready"), Some(1)),
            "{v}"
        );
        assert_eq!(names(&v), vec!["a".to_owned()]);
    }

    // Entities of version 2 in flight, then version 2 vanishes from the
    // store while the config now names version 5.
    ds.set("/t/a", Behavior::always(503));
    let mut orphans = Vec::new();
    for i in 0..20 {
        orphans.push(srv.submit_ok("t", &json!({"n": i})).await);
    }
    assert_eq!(srv.entity(&orphans[0]).await["version"], 2);
    let third = Config::new()
        .with_type(TypeDef::new("t", vec![Step::http("a3", ds.url("/t/a3"))]))
        .with_type(single("other", &ds));
    ds.set("/t/a3", Behavior::ok(json!({})));
    reconfigure(&srv, &third);
    // Numbered 5 in the file, so that no version 2 comes back.
    let path = srv.dir().join("ripen.toml");
    let toml = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        toml.replacen("[types.t]\n", "[types.t]\nversion = 5\n", 1),
    )
    .unwrap();
    srv.kill();
    forget_version(&storage_of(&srv), "t", 2).await;
    let log_before = srv.log().len();
    srv.restart().await;
    assert_eq!(type_item(&srv, "t").await["latest_version"], 5);

    for id in &orphans {
        let v = srv.wait_terminal(id, SETTLE).await;
        assert_eq!(v["status"], "failed", "{v}");
        let error = v["steps"][0]["last_error"].as_str().unwrap_or_default();
        assert!(
            error.contains("type \"t\" version 2 is not in the type registry"),
            "{v}"
        );
        assert_eq!(v["steps"][0]["status"], "skipped", "{v}");
    }
    let history = srv.events(&orphans[0]).await;
    let cause = history
        .iter()
        .find(|e| e["kind"] == "unrunnable")
        .unwrap_or_else(|| panic!("no unrunnable event: {history:?}"));
    assert!(
        cause["error"]
            .as_str()
            .unwrap_or_default()
            .contains("version 2"),
        "{cause}"
    );
    assert_lifecycle(&history);
    assert_eq!(
        status_changes(&history).last().map(String::as_str),
        Some("failed")
    );

    // Other entities keep running, new ones of t too.
    let other = srv.submit_ok("other", &json!({})).await;
    assert_eq!(srv.wait_terminal(&other, SETTLE).await["status"], "ready");
    let fresh = srv.submit_ok("t", &json!({})).await;
    let v = srv.wait_terminal(&fresh, SETTLE).await;
    assert_eq!(
        (v["status"].as_str(), v["version"].as_u64()),
        (Some("ready"), Some(5)),
        "{v}"
    );

    // A failed orphan cannot be retried: its pipeline is gone.
    let r = srv
        .post_empty(&format!("/v1/entities/{}/retry", orphans[0]))
        .await;
    let p = assert_problem(&r, 409);
    assert!(
        p["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("version 2"),
        "{p}"
    );
    let r = srv
        .post(
            "/v1/entities:retry",
            &json!({"type": "t", "status": "failed", "limit": 100}),
        )
        .await;
    assert_eq!(
        (r.status, r.json()["requeued"].clone()),
        (202, json!(0)),
        "{r}"
    );
    assert_eq!(srv.entity(&orphans[0]).await["status"], "failed");

    // A line or two about it, not one per entity, claim or batch.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = srv.log();
    let since = &log[log_before.min(log.len())..];
    let lines = since
        .lines()
        .filter(|l| l.contains("cannot run") || l.contains("not in the type registry"))
        .count();
    assert!((1..=3).contains(&lines), "{lines} lines:\n{since}");
}

/// The compatibility check over the API: 409 with the report, `force`
/// registers and records it, 422 for what is not a valid version, 400 for
/// what is not JSON, 404 for unknown types and versions; a pushed type
/// takes submissions at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_over_the_api() {
    let ds = Downstream::start().await;
    ds.set("/p/a", Behavior::ok(json!({"ok": true})));
    let srv = Server::start(&Config::new().with_type(single("base", &ds))).await;
    let schema_v1 =
        json!({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]});
    let body_v1 = json!({"schema": schema_v1, "steps": [{"name": "a", "http": ds.url("/p/a")}]});
    let r = srv.post("/v1/types/p/versions", &body_v1).await;
    assert_eq!(r.status, 201, "{r}");
    assert_eq!(
        r.header("location").as_deref(),
        Some("/v1/types/p/versions/1")
    );
    let v = r.json();
    assert_eq!(
        (v["type"].clone(), v["version"].clone(), v["forced"].clone()),
        (json!("p"), json!(1), json!(false))
    );
    assert_eq!(v["schema"], schema_v1);
    assert_eq!(
        v["steps"][0]["timeout"], "30000ms",
        "defaults are written out: {v}"
    );
    assert_eq!(v["references"], json!({}));
    assert!(
        v["digest"]
            .as_str()
            .unwrap_or_default()
            .starts_with("sha256:"),
        "{v}"
    );

    // The same content, written another way, is the same version.
    let same = json!({"steps": [{"http": ds.url("/p/a"), "name": "a", "critical": true}], "schema": schema_v1, "references": {}, "force": false});
    let r = srv.post("/v1/types/p/versions", &same).await;
    assert_eq!(
        (r.status, r.json()["version"].clone()),
        (200, json!(1)),
        "{r}"
    );

    // A new required field is refused with the report.
    let schema_v2 = json!({"type": "object", "properties": {"name": {"type": "string"}, "zip": {"type": "string"}}, "required": ["name", "zip"]});
    let body_v2 = json!({"schema": schema_v2, "steps": [{"name": "a", "http": ds.url("/p/a")}]});
    let r = srv.post("/v1/types/p/versions", &body_v2).await;
    let p = assert_problem(&r, 409);
    assert_eq!(p["latest_version"], 1, "{p}");
    let report = p["incompatibilities"]
        .as_array()
        .expect("incompatibilities");
    let found: Vec<(&str, &str)> = report
        .iter()
        .map(|i| (i["pointer"].as_str().unwrap(), i["rule"].as_str().unwrap()))
        .collect();
    // A typed property where any value was accepted, and newly required.
    assert_eq!(
        found,
        [("/zip", "narrowed_type"), ("/zip", "new_required")],
        "{p}"
    );
    assert!(
        report
            .iter()
            .all(|i| i["message"].as_str().is_some_and(|m| m.contains("zip"))),
        "{p}"
    );
    assert_eq!(type_item(&srv, "p").await["latest_version"], 1);

    // Forced, it is registered, and the report is kept with it.
    let mut forced = body_v2.clone();
    forced["force"] = json!(true);
    let r = srv.post("/v1/types/p/versions", &forced).await;
    assert_eq!(r.status, 201, "{r}");
    let v = srv.get("/v1/types/p/versions/2").await.json();
    assert_eq!(v["forced"], true, "{v}");
    assert_eq!(v["incompatibilities"], json!(report), "{v}");
    let latest = srv.get("/v1/types/p/versions/latest").await.json();
    assert_eq!(latest["version"], 2);
    let list = srv.get("/v1/types/p/versions").await;
    assert_eq!(list.status, 200, "{list}");
    let versions: Vec<u64> = list.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![1, 2]);
    let one = srv.get("/v1/types/p").await;
    assert_eq!(
        (
            one.status,
            one.json()["latest_version"].clone(),
            one.json()["versions"].clone()
        ),
        (200, json!(2), json!(2)),
        "{one}"
    );

    // The pushed type takes submissions at once, on its latest version.
    let r = srv.submit("p", &json!({"name": "x"}), None).await;
    assert_problem(&r, 422);
    let id = srv
        .submit_ok("p", &json!({"name": "x", "zip": "1000"}))
        .await;
    let v = srv.wait_terminal(&id, SETTLE).await;
    assert_eq!(
        (v["status"].as_str(), v["version"].as_u64()),
        (Some("ready"), Some(2)),
        "{v}"
    );

    // Invalid versions: 422 with where.
    let invalid = [
        (json!({"steps": []}), "/steps"),
        (json!({"steps": [{"name": "a"}]}), "/steps/0"),
        (
            json!({"steps": [{"name": "a", "http": "http://h/a", "needs": ["a"]}]}),
            "/steps",
        ),
        (
            json!({"steps": [{"name": "a", "http": "http://h/a", "needs": ["b"]}, {"name": "b", "http": "http://h/b", "needs": ["a"]}]}),
            "/steps",
        ),
        (
            json!({"steps": [{"name": "a", "http": "gopher://h"}]}),
            "/steps/0/http",
        ),
        (
            json!({"steps": [{"name": "a", "http": "http://h", "ca_file": "/etc/passwd"}]}),
            "/steps/0/ca_file",
        ),
        (
            json!({"schema": {"type": 12}, "steps": [{"name": "a", "http": "http://h"}]}),
            "/schema",
        ),
        (
            json!({"schema": "object", "steps": [{"name": "a", "http": "http://h"}]}),
            "/schema",
        ),
        (
            json!({"references": {"m": "nowhere"}, "steps": [{"name": "a", "http": "http://h"}]}),
            "/references/m",
        ),
        (
            json!({"steps": [{"name": "a", "http": "http://h"}], "extra": 1}),
            "/extra",
        ),
        (
            json!({"steps": [{"name": "a", "http": "http://h"}], "force": "yes"}),
            "/force",
        ),
        (json!([1, 2]), ""),
    ];
    for (body, pointer) in invalid {
        let r = srv.post("/v1/types/p/versions", &body).await;
        let p = assert_problem(&r, 422);
        let errors = p["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("no errors: {p}"));
        assert!(
            errors.iter().any(|e| e["pointer"] == pointer),
            "{body}: {p}"
        );
    }
    let r = srv.post("/v1/types/bad%20name/versions", &body_v1).await;
    assert_problem(&r, 422);
    let r = srv
        .post_bytes("/v1/types/p/versions", b"{not json".to_vec())
        .await;
    assert_problem(&r, 400);
    assert_eq!(type_item(&srv, "p").await["latest_version"], 2);

    // Unknown types and versions.
    for path in [
        "/v1/types/nope",
        "/v1/types/nope/versions",
        "/v1/types/nope/versions/1",
        "/v1/types/p/versions/9",
        "/v1/types/p/versions/two",
        "/v1/types/p/versions/-1",
    ] {
        assert_problem(&srv.get(path).await, 404);
    }
    // Subscriptions know the pushed type.
    let r = srv
        .post(
            "/v1/subscriptions",
            &json!({"url": "https://hooks.example/x", "types": ["nope"]}),
        )
        .await;
    let p = assert_problem(&r, 422);
    assert!(
        p["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("known types: base, p"),
        "{p}"
    );
    // The dashboard's list keeps its step shape.
    let base = type_item(&srv, "base").await;
    assert_eq!(base["steps"][0]["queue"], "http", "{base}");
    assert_eq!(base["steps"][0]["executor"], "http", "{base}");
}

/// An incompatible schema in `ripen.toml` refuses the start with the report
/// and exit status 2; `force = true` on the type registers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_config_change_needs_force() {
    let ds = Downstream::start().await;
    ds.set("/c/only", Behavior::ok(json!({})));
    let schema = |required: Value| json!({"type": "object", "properties": {"name": {"type": "string"}, "zip": {"type": "string"}}, "required": required});
    let first = Config::new().with_type(single("c", &ds).schema(schema(json!(["name"]))));
    let mut srv = Server::start(&first).await;
    let narrowed = Config::new().with_type(single("c", &ds).schema(schema(json!(["name", "zip"]))));
    reconfigure(&srv, &narrowed);
    srv.kill();
    let out = run_ripen(
        args(&[
            "serve",
            "--config",
            &srv.dir().join("ripen.toml").display().to_string(),
        ]),
        srv.dir().to_owned(),
        CLI_TIMEOUT,
    )
    .await;
    assert_eq!(out.status.and_then(|s| s.code()), Some(2), "{out}");
    assert!(
        out.stderr
            .contains("types.c.schema: not compatible with the registered version 1"),
        "{out}"
    );
    assert!(out.stderr.contains("/zip (new_required)"), "{out}");
    assert!(out.stderr.contains("force = true"), "{out}");

    let path = srv.dir().join("ripen.toml");
    let toml = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        toml.replacen("[types.c]\n", "[types.c]\nforce = true\n", 1),
    )
    .unwrap();
    srv.restart().await;
    let v = srv.get("/v1/types/c/versions/2").await;
    assert_eq!(v.status, 200, "{v}");
    assert_eq!(v.json()["forced"], true, "{v}");
    // Forced once: the next start finds the same content, and starts.
    srv.restart().await;
    assert_eq!(type_item(&srv, "c").await["versions"], 2);
}

/// `ripen types push|list|show` against a running server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_types_commands() {
    let ds = Downstream::start().await;
    ds.set("/k/a", Behavior::ok(json!({})));
    let srv = Server::start(&Config::new().with_type(single("base", &ds))).await;
    let base = srv.base();
    let run = |list: Vec<String>| run_ripen(list, srv.dir().to_owned(), CLI_TIMEOUT);
    let file = srv.dir().join("k.json");
    let schema = json!({"type": "object", "properties": {"sku": {"type": "string"}}});
    std::fs::write(
        &file,
        json!({"type": "k", "schema": schema, "steps": [{"name": "a", "http": ds.url("/k/a")}]})
            .to_string(),
    )
    .unwrap();
    let f = file.display().to_string();

    let out = run(args(&["types", "push", &f, "--server", &base])).await;
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("registered k version 1"), "{out}");
    let out = run(args(&["types", "push", &f, "--server", &base])).await;
    assert!(out.success() && out.stdout.contains("unchanged"), "{out}");

    let out = run(args(&["types", "list", "--server", &base])).await;
    assert!(out.success(), "{out}");
    let rows: Vec<&str> = out.stdout.lines().collect();
    assert!(rows[0].starts_with("TYPE"), "{out}");
    assert!(
        rows.iter()
            .any(|r| r.split_whitespace().collect::<Vec<_>>() == ["k", "1", "1", "a"]),
        "{out}"
    );
    assert!(rows.iter().any(|r| r.starts_with("base ")), "{out}");
    let out = run(args(&["types", "list", "-o", "json", "--server", &base])).await;
    let listed: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|_| panic!("{out}"));
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(2), "{out}");

    // Narrowed: refused, with the report, exit status 1.
    let narrowed =
        json!({"type": "object", "properties": {"sku": {"type": "string", "maxLength": 4}}});
    std::fs::write(
        &file,
        json!({"schema": narrowed, "steps": [{"name": "a", "http": ds.url("/k/a")}]}).to_string(),
    )
    .unwrap();
    let out = run(args(&[
        "types", "push", &f, "--type", "k", "--server", &base,
    ]))
    .await;
    assert_eq!(out.status.and_then(|s| s.code()), Some(1), "{out}");
    assert!(
        out.stderr.contains("409") && out.stderr.contains("/sku [tightened_bound]"),
        "{out}"
    );
    let out = run(args(&[
        "types", "push", &f, "--type", "k", "--force", "--server", &base,
    ]))
    .await;
    assert!(
        out.success() && out.stdout.contains("registered k version 2"),
        "{out}"
    );
    // A file without a type, and no --type.
    let out = run(args(&["types", "push", &f, "--server", &base])).await;
    assert!(
        !out.success() && out.stderr.contains("names no type"),
        "{out}"
    );
    // Not a valid version: the errors are listed.
    std::fs::write(
        &file,
        json!({"type": "k", "steps": [{"name": "a"}]}).to_string(),
    )
    .unwrap();
    let out = run(args(&["types", "push", &f, "--server", &base])).await;
    assert!(
        !out.success() && out.stderr.contains("422") && out.stderr.contains("/steps/0"),
        "{out}"
    );

    let out = run(args(&["types", "show", "k", "--server", &base])).await;
    assert!(out.success(), "{out}");
    assert!(
        out.stdout
            .lines()
            .next()
            .is_some_and(|l| l.contains("VERSION")),
        "{out}"
    );
    assert_eq!(out.stdout.lines().count(), 3, "{out}");
    assert!(
        out.stdout.lines().nth(2).is_some_and(|l| l.contains("yes")),
        "version 2 is forced: {out}"
    );
    let out = run(args(&["types", "show", "k", "1", "--server", &base])).await;
    assert!(
        out.success() && out.stdout.starts_with("k version 1"),
        "{out}"
    );
    assert!(out.stdout.contains(&ds.url("/k/a")), "{out}");
    let out = run(args(&[
        "types", "show", "k", "latest", "-o", "json", "--server", &base,
    ]))
    .await;
    let shown: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|_| panic!("{out}"));
    assert_eq!(
        (shown["version"].clone(), shown["forced"].clone()),
        (json!(2), json!(true))
    );
    let out = run(args(&["types", "show", "nope", "--server", &base])).await;
    assert!(!out.success() && out.stderr.contains("404"), "{out}");
}

/// Two nodes on one PostgreSQL database: a version registered on one node
/// runs on the other, which had not read it yet (its poll is an hour away),
/// when it meets the version's first entity: read again, not failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_registered_on_another_node_runs_here() {
    let ds = Downstream::start().await;
    ds.set("/late/a", Behavior::ok(json!({})));
    ds.set("/late/b", Behavior::ok(json!({})));
    let url = ripen_testkit::PgCluster::shared().create_database();
    let base = Config::new().with_type(single("base", &ds));
    let intake = Server::start_on(&base.clone().execute(false), &url).await;
    let runner = Server::start_on(&base.clone().poll_interval("1h"), &url).await;

    let body = json!({"steps": [{"name": "a", "http": ds.url("/late/a")}]});
    let r = intake.post("/v1/types/late/versions", &body).await;
    assert_eq!(r.status, 201, "{r}");
    let first = intake.submit_ok("late", &json!({})).await;
    let v = runner.wait_terminal(&first, SETTLE).await;
    assert_eq!(
        (v["status"].as_str(), v["version"].as_u64()),
        (Some("ready"), Some(1)),
        "{v}"
    );

    let body = json!({"steps": [
        {"name": "a", "http": ds.url("/late/a")},
        {"name": "b", "http": ds.url("/late/b"), "needs": ["a"]},
    ]});
    let r = intake.post("/v1/types/late/versions", &body).await;
    assert_eq!(r.status, 201, "{r}");
    let second = intake.submit_ok("late", &json!({})).await;
    let v = runner.wait_terminal(&second, SETTLE).await;
    assert_eq!(
        (v["status"].as_str(), v["version"].as_u64()),
        (Some("ready"), Some(2)),
        "{v}"
    );
    assert_eq!(names(&v), vec!["a".to_owned(), "b".to_owned()]);
    assert!(
        !runner
            .log()
            .contains("failed entities whose pipeline cannot run"),
        "{}",
        runner.log_tail(30)
    );
    // It met the version first in a claim, and read the registry then.
    assert!(
        runner.log().contains("asking the registry"),
        "{}",
        runner.log_tail(30)
    );
    // The runner serves the version it learnt from the store.
    assert_eq!(type_item(&runner, "late").await["latest_version"], 2);
}

/// A version registered over the API with a worker step: its queue is
/// served at once, and a worker's result finishes the entity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_worker_queue_is_served_at_once() {
    let ds = Downstream::start().await;
    let srv = Server::start(&Config::new().with_type(single("base", &ds))).await;
    let r = srv
        .post("/v1/queues/pushed/claim", &json!({"max": 1, "wait_ms": 0}))
        .await;
    assert_problem(&r, 404);
    let body = json!({"steps": [{"name": "w", "worker": "pushed"}]});
    assert_eq!(srv.post("/v1/types/job/versions", &body).await.status, 201);
    let id = srv.submit_ok("job", &json!({"n": 1})).await;
    let r = srv
        .post(
            "/v1/queues/pushed/claim",
            &json!({"max": 1, "wait_ms": 5000}),
        )
        .await;
    assert_eq!(r.status, 200, "{r}");
    let task = r.json()["tasks"][0].clone();
    assert_eq!(task["entity_id"], id.as_str(), "{r}");
    let done = srv
        .post(
            &format!("/v1/tasks/{}/complete", task["task_id"].as_str().unwrap()),
            &json!({"lease": task["lease"], "output": {"ok": true}}),
        )
        .await;
    assert_eq!(done.status, 200, "{done}");
    let v = srv.wait_terminal(&id, SETTLE).await;
    assert_eq!(v["status"], "ready", "{v}");
}
