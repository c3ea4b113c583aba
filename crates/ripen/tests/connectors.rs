//! The built-in connectors against real stores: a private PostgreSQL
//! cluster (the user's database, not Ripen's own) and a private
//! `redis-server`, through the real binary. What was written is read back
//! with other clients (`tokio-postgres`, `redis-cli`), never through Ripen.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ripen_engine::executor::BuiltinExecutor;
use ripen_engine::StepExecutor;
use ripen_store::{Attempt, EntityId, Outcome};
use ripen_testkit::{toml_str, PgCluster, RedisServer};
use serde_json::{json, Value};

const PATIENCE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Helpers

/// A client of the user's database, for setting up tables and reading rows.
async fn pg(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(connection);
    client
}

/// A fresh database on the shared cluster, with `ddl` run in it.
async fn user_database(ddl: &str) -> String {
    let url = tokio::task::spawn_blocking(|| PgCluster::shared().create_database())
        .await
        .unwrap();
    pg(&url)
        .await
        .batch_execute(ddl)
        .await
        .expect("create the tables");
    url
}

const MERCHANTS: &str = "CREATE TABLE merchants (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    score numeric CHECK (score >= 0),
    band text,
    tags jsonb,
    note text DEFAULT 'untouched'
)";

/// One `[[types.merchant.steps]]` with a built-in connector and a retry
/// policy patient enough for an outage.
fn builtin_step(name: &str, needs: &[&str], builtin: &str) -> String {
    let needs: Vec<String> = needs.iter().map(|n| toml_str(n)).collect();
    format!(
        "\n[[types.merchant.steps]]\nname = {}\nneeds = [{}]\ntimeout = \"2s\"\n\
         retry = {{ max_attempts = 200, initial_backoff = \"50ms\", max_backoff = \"300ms\" }}\n\
         builtin = {builtin}\n",
        toml_str(name),
        needs.join(", ")
    )
}

fn upsert(url: &str, table: &str, columns: &str) -> String {
    format!(
        "{{ postgres_upsert = {{ url = {}, table = {}, columns = {{ {columns} }} }} }}",
        toml_str(url),
        toml_str(table)
    )
}

/// A server whose pipeline is `kyc` (HTTP, answering `kyc_output`) followed
/// by the given built-in steps.
async fn serve(ds: &Downstream, kyc_output: Value, builtin_steps: String) -> Server {
    ds.set("/merchant/kyc", Behavior::ok(kyc_output));
    let cfg = Config::new().with_type(TypeDef::new(
        "merchant",
        vec![Step::http("kyc", ds.url("/merchant/kyc"))],
    ));
    Server::start_with(move |dir| Ok(cfg.render_on(dir, &storage_url(dir))? + &builtin_steps)).await
}

/// A server whose pipeline is only the given built-in steps.
async fn serve_builtin_only(builtin_steps: String) -> Server {
    Server::start_with(move |dir| {
        Ok(format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[storage]\nurl = {}\n\n\
             [engine]\npoll_interval = \"100ms\"\nlease_grace = \"1s\"\n{builtin_steps}",
            toml_str(&storage_url(dir))
        ))
    })
    .await
}

/// The fields of a hash as sorted `(field, value)` pairs.
fn hash(redis: &RedisServer, key: &str) -> Vec<(String, String)> {
    let out = redis.cli(&["HGETALL", key]);
    let lines: Vec<&str> = out.lines().collect();
    let mut pairs: Vec<(String, String)> = lines
        .chunks(2)
        .map(|c| (c[0].to_owned(), c.get(1).unwrap_or(&"").to_string()))
        .collect();
    pairs.sort();
    pairs
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = items
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    v.sort();
    v
}

async fn start_redis() -> RedisServer {
    tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_and_keys_hold_exactly_what_the_mapping_says() {
    let url = user_database(MERCHANTS).await;
    let redis = start_redis().await;
    let ds = Downstream::start().await;
    let steps = builtin_step(
        "row",
        &["kyc"],
        &upsert(
            &url,
            "public.merchants",
            "name = \"/payload/name\", score = \"/outputs/kyc/score\", \
             band = \"/outputs/kyc/band\", tags = \"/payload/tags\"",
        ),
    ) + &builtin_step(
        "cache",
        &["kyc"],
        &format!(
            "{{ redis_set = {{ url = {}, key = \"{{type}}:{{id}}\", \
             fields = {{ name = \"/payload/name\", score = \"/outputs/kyc/score\", missing = \"/payload/nope\" }} }} }}",
            toml_str(&redis.url())
        ),
    ) + &builtin_step(
        "doc",
        &[],
        &format!(
            "{{ redis_set = {{ url = {}, key = \"doc:{{id}}\", value = \"json\", pointer = \"/payload\", ttl = \"1h\" }} }}",
            toml_str(&redis.url())
        ),
    );
    let server = serve(&ds, json!({"score": 0.93, "band": "low"}), steps).await;

    let payload = json!({"name": "Ada", "tags": ["a", "b"]});
    let id = server.submit_ok("merchant", &payload).await;
    let view = server.wait_terminal(&id, PATIENCE).await;
    assert_eq!(view["status"], "ready", "{view:#}");
    for name in ["row", "cache", "doc"] {
        assert_eq!(step(&view, name)["attempts"], 1, "{view:#}");
    }

    let rows = pg(&url)
        .await
        .query(
            "SELECT id::text, name, score::text, band, tags::text, note FROM merchants",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let row: (String, String, String, String, String, String) = (
        rows[0].get(0),
        rows[0].get(1),
        rows[0].get(2),
        rows[0].get(3),
        rows[0].get(4),
        rows[0].get(5),
    );
    assert_eq!(
        row,
        (
            id.clone(),
            "Ada".into(),
            "0.93".into(),
            "low".into(),
            r#"["a", "b"]"#.into(),
            "untouched".into()
        ),
        "an unmapped column keeps its default"
    );

    assert_eq!(
        hash(&redis, &format!("merchant:{id}")),
        pairs(&[("name", "Ada"), ("score", "0.93")]),
        "a field whose pointer finds nothing is not written"
    );
    let doc: Value =
        serde_json::from_str(redis.cli(&["GET", &format!("doc:{id}")]).trim()).unwrap();
    assert_eq!(doc, payload);
    let ttl: i64 = redis
        .cli(&["PTTL", &format!("doc:{id}")])
        .trim()
        .parse()
        .unwrap();
    assert!(ttl > 3_500_000 && ttl <= 3_600_000, "ttl {ttl}");

    let data = server.get(&format!("/v1/entities/{id}/data")).await.json();
    assert_eq!(data["outputs"]["row"], json!({"upserted": 1}));
    assert_eq!(
        data["outputs"]["cache"],
        json!({"key": format!("merchant:{id}")})
    );
    assert_eq!(data["outputs"]["doc"], json!({"key": format!("doc:{id}")}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_attempt_leaves_one_row_and_writes_nothing_twice() {
    let url = user_database(MERCHANTS).await;
    let redis = start_redis().await;
    let text = format!(
        "[[types.merchant.steps]]\nname = \"kyc\"\nhttp = \"http://127.0.0.1:9/kyc\"\n\
         [[types.merchant.steps]]\nname = \"row\"\nneeds = [\"kyc\"]\nbuiltin = {}\n\
         [[types.merchant.steps]]\nname = \"cache\"\nneeds = [\"kyc\"]\n\
         builtin = {{ redis_set = {{ url = {}, key = \"m:{{id}}\", fields = {{ name = \"/payload/name\", score = \"/outputs/kyc/score\" }} }} }}\n",
        upsert(
            &url,
            "merchants",
            "name = \"/payload/name\", score = \"/outputs/kyc/score\"",
        ),
        toml_str(&redis.url()),
    );
    let config =
        ripen_engine::Config::parse(&text, Path::new("ripen.toml"), Path::new("/tmp")).unwrap();
    let executor = Arc::new(
        BuiltinExecutor::start(&config)
            .await
            .expect("the tables fit")
            .expect("there are built-in steps"),
    );
    let pipeline = &config.type_config("merchant").unwrap().pipeline;
    let id = EntityId::new_v7();
    let mut attempt = Attempt {
        entity_id: id,
        type_name: "merchant".into(),
        version: 1,
        step: 1,
        step_name: "row".into(),
        attempt: 1,
        epoch: 1,
        lease_expires_at_us: 0,
        payload: r#"{"name":"Ada"}"#.into(),
        outputs: vec![("kyc".into(), r#"{"score":1.5}"#.into())],
    };
    let client = pg(&url).await;
    let read = || async {
        client
            .query(
                "SELECT name, score::text, xmin::text FROM merchants WHERE id = $1::text::uuid",
                &[&id.to_string()],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                )
            })
            .collect::<Vec<_>>()
    };
    let upserted = |n: u64| Outcome::Succeeded {
        output: Some(json!({ "upserted": n }).to_string()),
    };

    assert_eq!(executor.run(pipeline.step(1), &attempt).await, upserted(1));
    let first = read().await;
    assert_eq!(first.len(), 1);
    assert_eq!((first[0].0.as_str(), first[0].1.as_str()), ("Ada", "1.5"));

    // The same attempt again, as after a lost result: the row is already
    // right, so nothing is written (same row version).
    attempt.attempt = 2;
    attempt.epoch = 2;
    assert_eq!(executor.run(pipeline.step(1), &attempt).await, upserted(0));
    assert_eq!(read().await, first, "one row, untouched");

    // A later attempt that sees other values updates the one row.
    attempt.attempt = 3;
    attempt.payload = r#"{"name":"Ada L."}"#.into();
    assert_eq!(executor.run(pipeline.step(1), &attempt).await, upserted(1));
    let updated = read().await;
    assert_eq!(updated.len(), 1);
    assert_eq!(updated[0].0, "Ada L.");
    let count: i64 = client
        .query_one("SELECT count(*) FROM merchants", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);

    // Redis: twice the same hash.
    attempt.step = 2;
    attempt.step_name = "cache".into();
    let key = format!("m:{id}");
    let wrote = Outcome::Succeeded {
        output: Some(json!({ "key": key }).to_string()),
    };
    for _ in 0..2 {
        assert_eq!(executor.run(pipeline.step(2), &attempt).await, wrote);
        assert_eq!(
            hash(&redis, &key),
            pairs(&[("name", "Ada L."), ("score", "1.5")])
        );
    }

    // A key that holds another type fails the step for good.
    let other = EntityId::new_v7();
    redis.cli(&["SET", &format!("m:{other}"), "a string"]);
    attempt.entity_id = other;
    match executor.run(pipeline.step(2), &attempt).await {
        Outcome::Failed {
            error, retryable, ..
        } => {
            assert!(!retryable, "{error}");
            assert!(
                error.starts_with(&format!(
                    "redis_set m:{other}: the key holds another type of value: WRONGTYPE"
                )),
                "{error}"
            );
        }
        other => panic!("expected a failure, got {other:?}"),
    }

    // A value that does not parse as its column's type fails for good.
    attempt.step = 1;
    attempt.step_name = "row".into();
    attempt.outputs = vec![("kyc".into(), r#"{"score":"high"}"#.into())];
    match executor.run(pipeline.step(1), &attempt).await {
        Outcome::Failed {
            error, retryable, ..
        } => {
            assert!(!retryable, "{error}");
            assert!(
                error.starts_with("postgres_upsert merchants: a value does not fit its column: ")
                    && error.contains("SQLSTATE 22P02"),
                "{error}"
            );
        }
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_constraint_violation_fails_the_step_for_good_at_once() {
    let url = user_database(
        "CREATE TABLE strict_merchants (
            id text PRIMARY KEY,
            name text NOT NULL,
            score numeric CHECK (score >= 0)
        )",
    )
    .await;
    let server = serve_builtin_only(builtin_step(
        "row",
        &[],
        &upsert(
            &url,
            "strict_merchants",
            "name = \"/payload/name\", score = \"/payload/score\"",
        ),
    ))
    .await;

    let cases = [
        (
            json!({"name": "Ada", "score": -1}),
            "postgres_upsert strict_merchants: constraint violation: new row for relation \"strict_merchants\" violates check constraint",
            "SQLSTATE 23514",
        ),
        (
            json!({"score": 1}),
            "postgres_upsert strict_merchants: constraint violation: null value in column \"name\"",
            "SQLSTATE 23502",
        ),
    ];
    let mut failed = Vec::new();
    for (payload, start, code) in cases {
        let id = server.submit_ok("merchant", &payload).await;
        let view = server.wait_terminal(&id, PATIENCE).await;
        assert_eq!(view["status"], "failed", "{view:#}");
        let row = step(&view, "row");
        assert_eq!(row["status"], "failed", "{view:#}");
        assert_eq!(row["attempts"], 1, "no second attempt: {view:#}");
        let error = row["last_error"].as_str().unwrap_or_default();
        assert!(error.starts_with(start) && error.contains(code), "{error}");
        failed.push(id);
    }
    let ok = server
        .submit_ok("merchant", &json!({"name": "Bo", "score": 2}))
        .await;
    let view = server.wait_terminal(&ok, PATIENCE).await;
    assert_eq!(view["status"], "ready", "{view:#}");
    let rows = pg(&url)
        .await
        .query("SELECT id, name FROM strict_merchants", &[])
        .await
        .unwrap();
    let rows: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        rows,
        [(ok, "Bo".to_owned())],
        "only the valid entity has a row"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_is_retried_until_it_heals() {
    let mut redis = start_redis().await;
    let redis_url = redis.url();
    // Down before Ripen starts: the node starts anyway and says so.
    redis.stop();
    let server = serve_builtin_only(builtin_step(
        "cache",
        &[],
        &format!(
            "{{ redis_set = {{ url = {}, key = \"merchant:{{id}}\", fields = {{ name = \"/payload/name\" }} }} }}",
            toml_str(&redis_url)
        ),
    ))
    .await;
    assert!(
        server
            .log()
            .contains("a built-in connector's store is not reachable; starting anyway"),
        "{}",
        server.log_tail(20)
    );

    let id = server.submit_ok("merchant", &json!({"name": "Ada"})).await;
    let want = format!("redis_set merchant:{id}: cannot connect: ");
    let view = server
        .wait_until(&id, PATIENCE, "retrying with an error", |v| {
            let s = step(v, "cache");
            s["status"] == "retrying"
                && s["last_error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with(&want))
        })
        .await;
    assert_eq!(view["status"], "pending");

    let mut redis = tokio::task::spawn_blocking(move || {
        redis.start_again();
        redis
    })
    .await
    .unwrap();
    let view = server.wait_terminal(&id, PATIENCE).await;
    assert_eq!(view["status"], "ready", "{view:#}");
    assert!(step(&view, "cache")["attempts"].as_u64().unwrap() > 1);
    assert_eq!(
        hash(&redis, &format!("merchant:{id}")),
        pairs(&[("name", "Ada")])
    );

    // Once more after the connections it pooled were cut.
    tokio::task::block_in_place(|| redis.start_again());
    let id = server.submit_ok("merchant", &json!({"name": "Bo"})).await;
    let view = server.wait_terminal(&id, PATIENCE).await;
    assert_eq!(view["status"], "ready", "{view:#}");
    assert_eq!(
        step(&view, "cache")["attempts"],
        1,
        "a dead pooled connection costs no attempt"
    );
    assert_eq!(
        hash(&redis, &format!("merchant:{id}")),
        pairs(&[("name", "Bo")])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_is_retried_until_it_heals() {
    let cluster = tokio::task::spawn_blocking(|| Arc::new(PgCluster::start()))
        .await
        .unwrap();
    let url = {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.create_database())
            .await
            .unwrap()
    };
    pg(&url).await.batch_execute(MERCHANTS).await.unwrap();
    let server = serve_builtin_only(builtin_step(
        "row",
        &[],
        &upsert(&url, "merchants", "name = \"/payload/name\""),
    ))
    .await;
    let first = server.submit_ok("merchant", &json!({"name": "Ada"})).await;
    assert_eq!(
        server.wait_terminal(&first, PATIENCE).await["status"],
        "ready"
    );

    {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.stop())
            .await
            .unwrap();
    }
    let id = server.submit_ok("merchant", &json!({"name": "Bo"})).await;
    let view = server
        .wait_until(&id, PATIENCE, "retrying with an error", |v| {
            let s = step(v, "row");
            s["status"] == "retrying"
                && s["last_error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("postgres_upsert merchants: cannot connect: "))
        })
        .await;
    assert_eq!(view["status"], "pending");

    {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.start_again())
            .await
            .unwrap();
    }
    let view = server.wait_terminal(&id, PATIENCE).await;
    assert_eq!(view["status"], "ready", "{view:#}");
    assert!(step(&view, "row")["attempts"].as_u64().unwrap() > 1);
    let rows = pg(&url)
        .await
        .query("SELECT id::text, name FROM merchants ORDER BY name", &[])
        .await
        .unwrap();
    let rows: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(rows, [(first, "Ada".to_owned()), (id, "Bo".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_does_not_fit_is_refused_at_start() {
    let url = user_database(MERCHANTS).await;
    let config = |table: &str, columns: &str| {
        format!(
            "[storage]\nurl = \"sqlite://@DIR@/ripen.db\"\n\n\
             [[types.merchant.steps]]\nname = \"row\"\nbuiltin = {}\n",
            upsert(&url, table, columns)
        )
    };
    let cases = [
        (
            config("merchants", "name = \"/payload/name\", nope = \"/payload/x\""),
            "ripen.toml: types.merchant.steps[0].builtin.postgres_upsert.columns.nope: the table \"merchants\" has no column \"nope\"",
        ),
        (
            config("nosuch", "name = \"/payload/name\""),
            "ripen.toml: types.merchant.steps[0].builtin.postgres_upsert.table: the table \"nosuch\" does not exist in the database",
        ),
        (
            // Refused at load, before any database is asked.
            config("merchants", "name = \"payload/name\""),
            "ripen.toml: types.merchant.steps[0].builtin.postgres_upsert.columns.name: \"payload/name\" is not a JSON pointer",
        ),
    ];
    for (toml, want) in cases {
        let (out, dir) = serve_bad_config(&toml, &[]).await;
        assert_eq!(out.status.and_then(|s| s.code()), Some(2), "{out}");
        assert!(out.stderr.contains(want), "{want:?} not in:\n{out}");
        assert!(!out.stdout.contains("listening"), "{out}");
        assert!(
            !dir.path().join("ripen.db").exists(),
            "nothing was opened before the check"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_entity_takes_its_row_and_key_back() {
    let url = user_database(MERCHANTS).await;
    let redis = start_redis().await;
    let ds = Downstream::start().await;
    // `row` and `cache` write and then undo themselves; `publish`, after
    // both, refuses every entity for good.
    ds.set("/merchant/publish", Behavior::always(400));
    let steps = builtin_step(
        "row",
        &["kyc"],
        &upsert(&url, "public.merchants", "name = \"/payload/name\""),
    ) + "compensate = { builtin = true }\n"
        + &builtin_step(
            "cache",
            &["kyc"],
            &format!(
                "{{ redis_set = {{ url = {}, key = \"m:{{id}}\", fields = {{ name = \"/payload/name\" }} }} }}",
                toml_str(&redis.url())
            ),
        )
        + "compensate = { builtin = true }\n"
        + &format!(
            "\n[[types.merchant.steps]]\nname = \"publish\"\nneeds = [\"row\", \"cache\"]\n\
             http = {}\nretry = {{ max_attempts = 1 }}\n",
            toml_str(&ds.url("/merchant/publish"))
        );
    let server = serve(&ds, json!({"score": 1}), steps).await;
    let other = server
        .submit_ok("merchant", &json!({"name": "Other"}))
        .await;
    let id = server.submit_ok("merchant", &json!({"name": "Gone"})).await;
    let view = server
        .wait_until(&id, PATIENCE, "compensated", |v| {
            v["compensation"]["status"] == "done"
        })
        .await;
    assert_eq!(view["status"], "failed", "{view:#}");
    let rows = pg(&url)
        .await
        .query("SELECT id::text FROM merchants ORDER BY name", &[])
        .await
        .expect("read the rows");
    let ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert!(
        !ids.contains(&id),
        "the failed entity's row is gone: {ids:?}"
    );
    let exists = |key: String| redis.cli(&["EXISTS", &key]).trim().to_owned();
    assert_eq!(exists(format!("m:{id}")), "0", "its key is gone");
    // The other entity failed the same way and was undone too: nothing of
    // either is left.
    server
        .wait_until(&other, PATIENCE, "compensated", |v| {
            v["compensation"]["status"] == "done"
        })
        .await;
    assert!(ids.len() <= 1, "{ids:?}");
    let rows = pg(&url)
        .await
        .query("SELECT count(*) FROM merchants", &[])
        .await
        .expect("count the rows");
    assert_eq!(rows[0].get::<_, i64>(0), 0);
    assert_eq!(exists(format!("m:{other}")), "0");
}

/// A connector's password is sealed in the type registry, whatever the
/// backend, opened again to connect, and hidden from the registry's views.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_password_is_sealed_at_rest_and_hidden_from_views() {
    const PASSWORD: &str = "hunter2-not-in-the-store";
    let plain = user_database(MERCHANTS).await;
    // The test cluster trusts loopback, so any password connects.
    let url = plain.replacen("@127.0.0.1", &format!(":{PASSWORD}@127.0.0.1"), 1);
    assert!(url.contains(PASSWORD), "{url}");
    let key_dir = TempDir::new("ripen-connector-key-").expect("temp dir");
    let key_file = key_dir.path().join("master.key");
    let steps = builtin_step(
        "row",
        &[],
        &upsert(&url, "public.merchants", "name = \"/payload/name\""),
    );
    let master = format!(
        "\n[notify]\nmaster_key_file = {}\n",
        toml_str(&key_file.to_string_lossy())
    );
    let mut server = serve_builtin_only(master + &steps).await;
    let id = server
        .submit_ok("merchant", &json!({"name": "Sealed"}))
        .await;
    let view = server.wait_terminal(&id, PATIENCE).await;
    assert_eq!(
        view["status"], "ready",
        "the opened password connects: {view:#}"
    );

    let toml = std::fs::read_to_string(server.dir().join("ripen.toml")).expect("read ripen.toml");
    let storage: String = toml
        .lines()
        .find_map(|l| l.trim().strip_prefix("url = "))
        .map(|v| serde_json::from_str(v).expect("a TOML basic string"))
        .expect("a storage url");
    let stored = stored_definitions(&storage).await;
    assert!(!stored.is_empty());
    for definition in &stored {
        assert!(
            !definition.contains(PASSWORD),
            "stored in the clear: {definition}"
        );
        assert!(definition.contains(":sealed."), "{definition}");
    }
    let version = server.get("/v1/types/merchant/versions/1").await;
    assert_eq!(version.status, 200, "{version}");
    let text = String::from_utf8_lossy(&version.body).into_owned();
    assert!(
        !text.contains(PASSWORD) && !text.contains("sealed."),
        "{text}"
    );
    assert!(text.contains(":***@127.0.0.1"), "{text}");

    // A rotation: a start with the new key followed by the old one seals
    // the password again with the new key, which alone then connects.
    let old_key = std::fs::read_to_string(&key_file).expect("read the key file");
    let new_key = "5e".repeat(32);
    server.kill();
    std::fs::write(&key_file, format!("{new_key}\n{}", old_key.trim())).expect("write the ring");
    server.restart().await;
    let log = server.log();
    let rotated = log
        .lines()
        .find(|l| l.contains("master key rotation"))
        .unwrap_or_else(|| panic!("no rotation line in the log:\n{log}"));
    assert!(rotated.contains("definitions=1"), "{rotated}");
    assert!(rotated.contains("written=1"), "{rotated}");
    let resealed = stored_definitions(&storage).await;
    assert_ne!(resealed, stored, "sealed again");
    assert!(resealed
        .iter()
        .all(|d| d.contains(":sealed.") && !d.contains(PASSWORD)));
    server.kill();
    std::fs::write(&key_file, format!("{new_key}\n")).expect("write the new key");
    server.restart().await;
    let id = server
        .submit_ok("merchant", &json!({"name": "Rotated"}))
        .await;
    let view = server.wait_terminal(&id, PATIENCE).await;
    assert_eq!(
        view["status"], "ready",
        "the new key alone opens the password: {view:#}"
    );
}

/// The stored definitions of every type version, sealed as they are.
async fn stored_definitions(storage: &str) -> Vec<String> {
    if let Some(path) = storage.strip_prefix("sqlite://") {
        let db = rusqlite::Connection::open(path).expect("open the database");
        let mut stmt = db
            .prepare("SELECT definition FROM type_versions ORDER BY type, version")
            .expect("prepare");
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .expect("query")
            .collect::<Result<Vec<_>, _>>()
            .expect("rows");
        rows
    } else {
        pg(storage)
            .await
            .query(
                "SELECT definition FROM type_versions ORDER BY type, version",
                &[],
            )
            .await
            .expect("query")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}
