//! API keys, scopes and tenants through the real binary, on SQLite and
//! (with `RIPEN_TEST_STORAGE=postgres`) on PostgreSQL: a server runs open on
//! loopback only until a key exists; a public address refuses to start
//! without one; every tenant sees only its own entities, events, streams,
//! stats, subscriptions and keys (another tenant's id is 404); scopes are
//! enforced; a revoked key stops at once, on every node; request rates are
//! limited per key and per tenant; and `ripen keys` does it all from the
//! command line.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ripen_client::Method;
use serde_json::{json, Value};

const CLI_TIMEOUT: Duration = Duration::from_secs(30);

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// A call with `key` (or none) and an optional JSON body.
async fn call(
    api: &Api,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> Resp {
    let auth = key.map(bearer);
    let mut headers = vec![("accept", "application/json")];
    if let Some(a) = auth.as_deref() {
        headers.push(("authorization", a));
    }
    if body.is_some() {
        headers.push(("content-type", "application/json"));
    }
    api.request(
        method,
        path,
        &headers,
        body.map(|b| b.to_string().into_bytes()),
    )
    .await
}

async fn get(api: &Api, path: &str, key: &str) -> Resp {
    call(api, Method::GET, path, Some(key), None).await
}

/// Creates a key with `scopes` for `tenant`, as `admin` (none: the open
/// server); returns its id and secret.
async fn make_key(
    api: &Api,
    admin: Option<&str>,
    tenant: &str,
    scopes: &[&str],
) -> (String, String) {
    let r = call(
        api,
        Method::POST,
        "/v1/keys",
        admin,
        Some(&json!({"tenant": tenant, "scopes": scopes, "name": format!("{tenant} {scopes:?}")})),
    )
    .await;
    assert_eq!(r.status, 201, "{r}");
    let v = r.json();
    (
        v["id"].as_str().expect("id").to_owned(),
        v["key"].as_str().expect("key").to_owned(),
    )
}

/// Polls `done` every 20 ms for up to 30 s.
async fn eventually<F, Fut>(what: &str, done: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Webhooks to loopback receivers, their secrets sealed with a key file
/// in `sealing`.
trait WithWebhooks {
    fn with_webhooks(self, sealing: &TempDir) -> Self;
}

impl WithWebhooks for Config {
    fn with_webhooks(self, sealing: &TempDir) -> Config {
        let key_file = sealing.path().join("master.key");
        self.notify("allow_networks = [\"127.0.0.0/8\"]")
            .notify(&format!(
                "master_key_file = {}",
                ripen_testkit::toml_str(&key_file.to_string_lossy())
            ))
    }
}

fn merchant(ds: &Downstream) -> TypeDef {
    single("merchant", ds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_server_runs_open_until_its_first_key() {
    let ds = Downstream::start().await;
    let srv = Server::start(&Config::new().with_type(merchant(&ds))).await;
    assert_eq!(
        srv.get("/v1/entities").await.status,
        200,
        "open: no key needed"
    );
    assert!(
        srv.log().contains("no API key exists"),
        "the open server warns: {}",
        srv.log()
    );
    // A key that the server does not know is refused even while it is open.
    let r = get(srv.api(), "/v1/entities", "rpk_not-a-key").await;
    assert_problem(&r, 401);
    assert!(
        r.headers
            .get("www-authenticate")
            .is_some_and(|v| v.to_str().unwrap_or("").starts_with("Bearer")),
        "{r}"
    );

    let (id, admin) = make_key(srv.api(), None, "default", &["admin", "read"]).await;
    assert!(admin.starts_with("rpk_") && admin.len() > 40, "{admin}");
    // The server closed at once.
    assert_problem(&srv.get("/v1/entities").await, 401);
    let r = call(
        srv.api(),
        Method::GET,
        "/v1/entities",
        Some("Basic Zm9vOmJhcg=="),
        None,
    )
    .await;
    assert_problem(&r, 401);
    assert_eq!(get(srv.api(), "/v1/entities", &admin).await.status, 200);
    // The list shows the key without its secret.
    let keys = get(srv.api(), "/v1/keys", &admin).await.json();
    let listed = &keys["items"][0];
    assert_eq!(listed["id"], id.as_str(), "{keys}");
    assert_eq!(listed["scopes"], json!(["read", "admin"]), "{keys}");
    assert!(
        listed.get("key").is_none() && !keys.to_string().contains(&admin),
        "{keys}"
    );
    // Health and the dashboard's page stay public.
    assert_eq!(srv.get("/healthz").await.status, 200);
    assert_eq!(srv.get("/").await.status, 200);
    // A bad scope and a bad tenant are 422.
    for body in [
        json!({"scopes": ["read", "everything"]}),
        json!({"scopes": []}),
        json!({"scopes": ["read"], "tenant": "no spaces"}),
    ] {
        let r = call(
            srv.api(),
            Method::POST,
            "/v1/keys",
            Some(&admin),
            Some(&body),
        )
        .await;
        assert_problem(&r, 422);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_address_needs_a_key_or_auth_open() {
    let ds = Downstream::start().await;
    let dir = TempDir::new("ripen-auth-").expect("temp dir");
    let url = storage_url(dir.path());
    let cfg = Config::new().listen("0.0.0.0:0").with_type(merchant(&ds));
    let path = cfg.write(dir.path(), &url).expect("write ripen.toml");
    let path = path.display().to_string();
    let out = run_ripen(
        args(&["serve", "--config", &path]),
        dir.path().to_owned(),
        CLI_TIMEOUT,
    )
    .await;
    assert!(!out.success(), "{out}");
    assert!(
        out.stderr.contains("refusing to serve") && out.stderr.contains("ripen keys create"),
        "{out}"
    );

    // auth.open lets it serve without keys.
    let open = Server::start(&cfg.clone().extra("[auth]\nopen = true\n")).await;
    assert_eq!(open.get("/v1/entities").await.status, 200);
    drop(open);

    // The first key, written with no server running, lets it start.
    let out = run_ripen(
        args(&[
            "keys",
            "create",
            "--config",
            &path,
            "--scopes",
            "admin,read",
            "--output",
            "json",
        ]),
        dir.path().to_owned(),
        CLI_TIMEOUT,
    )
    .await;
    assert!(out.success(), "{out}");
    let printed: Value = serde_json::from_str(out.stdout.trim()).expect("JSON");
    let admin = printed["key"].as_str().expect("key").to_owned();
    assert_eq!(printed["tenant"], "default");
    let srv = Server::start_with(|_| std::fs::read_to_string(&path)).await;
    assert_problem(&srv.get("/v1/entities").await, 401);
    assert_eq!(get(srv.api(), "/v1/entities", &admin).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_only_their_own_and_scopes_hold() {
    let ds = Downstream::start().await;
    let sealing = TempDir::new("ripen-auth-key-").expect("temp dir");
    let srv = Server::start(
        &Config::new()
            .with_type(merchant(&ds))
            .with_webhooks(&sealing),
    )
    .await;
    let api = srv.api();
    let (_, root) = make_key(api, None, "default", &["admin", "read", "worker"]).await;
    let all = ["submit", "read", "operate", "admin"];
    let (acme_id, acme) = make_key(api, Some(&root), "acme", &all).await;
    let (_, beta) = make_key(api, Some(&root), "beta", &all).await;
    let (_, reader) = make_key(api, Some(&root), "acme", &["read"]).await;
    let (_, acme_worker) = make_key(api, Some(&root), "acme", &["worker"]).await;

    let r = call(
        api,
        Method::POST,
        "/v1/entities/merchant",
        Some(&acme),
        Some(&json!({"name": "a"})),
    )
    .await;
    assert_eq!(r.status, 202, "{r}");
    let id = r.json()["id"].as_str().expect("id").to_owned();
    eventually(&format!("acme's entity {id} ready"), || async {
        get(api, &format!("/v1/entities/{id}"), &acme).await.json()["status"] == "ready"
    })
    .await;

    // Every read of acme's entity by beta is 404, as if it did not exist.
    for path in [
        format!("/v1/entities/{id}"),
        format!("/v1/entities/{id}/data"),
        format!("/v1/entities/{id}/events"),
    ] {
        assert_eq!(get(api, &path, &acme).await.status, 200, "{path}");
        let r = get(api, &path, &beta).await;
        assert_problem(&r, 404);
    }
    let r = call(
        api,
        Method::GET,
        &format!("/v1/entities/{id}/events"),
        Some(&beta),
        None,
    )
    .await;
    assert_problem(&r, 404);
    let sse = api
        .request(
            Method::GET,
            &format!("/v1/entities/{id}/events"),
            &[
                ("accept", "text/event-stream"),
                ("authorization", &bearer(&beta)),
            ],
            None,
        )
        .await;
    assert_problem(&sse, 404);
    for op in ["retry", "cancel"] {
        let r = call(
            api,
            Method::POST,
            &format!("/v1/entities/{id}/{op}"),
            Some(&beta),
            None,
        )
        .await;
        assert_problem(&r, 404);
    }
    // Lists and counts hold only the caller's entities.
    let listed = |v: Value| -> Vec<String> {
        v["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|e| e["id"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    assert_eq!(
        listed(get(api, "/v1/entities", &acme).await.json()),
        vec![id.clone()]
    );
    assert!(listed(get(api, "/v1/entities", &beta).await.json()).is_empty());
    assert!(
        listed(get(api, "/v1/entities", &root).await.json()).is_empty(),
        "the operator's tenant is its own too"
    );
    let count = |v: &Value| -> u64 {
        v["types"]
            .as_array()
            .expect("types")
            .iter()
            .filter(|t| t["type"] == "merchant")
            .map(|t| t["counts"]["ready"].as_u64().unwrap_or(0))
            .sum()
    };
    let acme_stats = get(api, "/v1/stats", &acme).await.json();
    assert_eq!(count(&acme_stats), 1, "{acme_stats}");
    assert!(
        acme_stats["rates"].is_null(),
        "node-wide rates are the default tenant's: {acme_stats}"
    );
    let beta_stats = get(api, "/v1/stats", &beta).await.json();
    assert_eq!(count(&beta_stats), 0, "{beta_stats}");
    assert!(get(api, "/v1/stats", &root).await.json()["rates"].is_object());
    // The same idempotency key in two tenants makes two entities.
    let keyed = |key: &str| {
        let auth = bearer(key);
        async move {
            api.request(
                Method::POST,
                "/v1/entities/merchant",
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                    ("idempotency-key", "k-1"),
                ],
                Some(br#"{"name": "k"}"#.to_vec()),
            )
            .await
        }
    };
    let (a, b) = (keyed(&acme).await, keyed(&beta).await);
    assert_eq!((a.status, b.status), (202, 202), "{a}\n{b}");
    assert_ne!(a.json()["id"], b.json()["id"]);

    // Subscriptions are the tenant's own.
    let r = call(
        api,
        Method::POST,
        "/v1/subscriptions",
        Some(&acme),
        Some(&json!({"url": format!("{}/hook", ds.base())})),
    )
    .await;
    assert_eq!(r.status, 201, "{r}");
    let sub = r.json()["id"].as_str().expect("id").to_owned();
    assert_eq!(
        get(api, &format!("/v1/subscriptions/{sub}"), &acme)
            .await
            .status,
        200
    );
    assert_problem(
        &get(api, &format!("/v1/subscriptions/{sub}"), &beta).await,
        404,
    );
    assert_problem(
        &get(api, &format!("/v1/subscriptions/{sub}/deliveries"), &beta).await,
        404,
    );
    let r = call(
        api,
        Method::DELETE,
        &format!("/v1/subscriptions/{sub}"),
        Some(&beta),
        None,
    )
    .await;
    assert_problem(&r, 404);
    assert!(get(api, "/v1/subscriptions", &beta).await.json()["items"]
        .as_array()
        .expect("items")
        .is_empty());

    // Keys: a tenant's admin sees and revokes its own only, and makes keys
    // for its own tenant only.
    let acme_keys = get(api, "/v1/keys", &acme).await.json();
    assert!(
        acme_keys["items"]
            .as_array()
            .expect("items")
            .iter()
            .all(|k| k["tenant"] == "acme"),
        "{acme_keys}"
    );
    assert_eq!(
        get(api, "/v1/keys", &root).await.json()["items"]
            .as_array()
            .expect("items")
            .len(),
        5
    );
    let r = call(
        api,
        Method::DELETE,
        &format!("/v1/keys/{acme_id}"),
        Some(&beta),
        None,
    )
    .await;
    assert_problem(&r, 404);
    let r = call(
        api,
        Method::POST,
        "/v1/keys",
        Some(&acme),
        Some(&json!({"tenant": "beta", "scopes": ["read"]})),
    )
    .await;
    assert_problem(&r, 403);
    // Types are shared: only the operator registers versions.
    let r = call(
        api,
        Method::POST,
        "/v1/types/merchant/versions",
        Some(&acme),
        Some(&json!({"steps": []})),
    )
    .await;
    assert_problem(&r, 403);
    // Worker queues are the operator's.
    let claim = json!({"max": 1, "wait_ms": 0});
    let r = call(
        api,
        Method::POST,
        "/v1/queues/q/claim",
        Some(&acme_worker),
        Some(&claim),
    )
    .await;
    assert_problem(&r, 403);
    let r = call(
        api,
        Method::POST,
        "/v1/queues/q/claim",
        Some(&root),
        Some(&claim),
    )
    .await;
    // Past authorization: the handler answers that no step uses the queue.
    assert!(
        assert_problem(&r, 404)["detail"]
            .as_str()
            .unwrap_or("")
            .contains("worker queue"),
        "{r}"
    );

    // Scopes: a read-only key reads, and is refused the rest with 403
    // naming the scope it lacks.
    assert_eq!(
        get(api, &format!("/v1/entities/{id}"), &reader)
            .await
            .status,
        200
    );
    let r = call(
        api,
        Method::POST,
        "/v1/entities/merchant",
        Some(&reader),
        Some(&json!({})),
    )
    .await;
    assert_eq!(assert_problem(&r, 403)["scope"], "submit");
    let r = call(
        api,
        Method::POST,
        &format!("/v1/entities/{id}/retry"),
        Some(&reader),
        None,
    )
    .await;
    assert_eq!(assert_problem(&r, 403)["scope"], "operate");
    assert_eq!(
        assert_problem(&get(api, "/v1/keys", &reader).await, 403)["scope"],
        "admin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_streams_carry_only_the_tenants_changes() {
    let ds = Downstream::start().await;
    let srv = Server::start(&Config::new().with_type(merchant(&ds))).await;
    let api = srv.api();
    let (_, root) = make_key(api, None, "default", &["admin"]).await;
    let (_, acme) = make_key(api, Some(&root), "acme", &["submit", "read"]).await;
    let (_, beta) = make_key(api, Some(&root), "beta", &["submit", "read"]).await;
    let mut acme_stream = SseReader::open(api, "/v1/events", &acme).await;
    let mut beta_stream = SseReader::open(api, "/v1/events", &beta).await;
    let r = call(
        api,
        Method::POST,
        "/v1/entities/merchant",
        Some(&acme),
        Some(&json!({"name": "a"})),
    )
    .await;
    let acme_id = r.json()["id"].as_str().expect("id").to_owned();
    let r = call(
        api,
        Method::POST,
        "/v1/entities/merchant",
        Some(&beta),
        Some(&json!({"name": "b"})),
    )
    .await;
    let beta_id = r.json()["id"].as_str().expect("id").to_owned();
    let heard_by_acme = acme_stream.until_ready(&acme_id).await;
    let heard_by_beta = beta_stream.until_ready(&beta_id).await;
    assert!(!heard_by_acme.contains(&beta_id), "{heard_by_acme}");
    assert!(!heard_by_beta.contains(&acme_id), "{heard_by_beta}");
}

/// A raw SSE connection read as text.
struct SseReader {
    stream: tokio::net::TcpStream,
    seen: String,
}

impl SseReader {
    async fn open(api: &Api, path: &str, key: &str) -> SseReader {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(api.addr())
            .await
            .expect("connect");
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nAuthorization: Bearer {key}\r\n\r\n",
            api.addr()
        );
        stream.write_all(head.as_bytes()).await.expect("send");
        let mut reader = SseReader {
            stream,
            seen: String::new(),
        };
        reader.until(|s| s.contains("\r\n\r\n")).await;
        assert!(reader.seen.starts_with("HTTP/1.1 200"), "{}", reader.seen);
        reader
    }

    async fn until(&mut self, done: impl Fn(&str) -> bool) -> String {
        use tokio::io::AsyncReadExt;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 8192];
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => self.seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                other => panic!("the stream ended or stalled ({other:?}): {}", self.seen),
            }
        }
        self.seen.clone()
    }

    /// What the stream said until `id` became ready.
    async fn until_ready(&mut self, id: &str) -> String {
        let id = id.to_owned();
        self.until(move |s| {
            s.split("\n\n")
                .any(|event| event.contains("entity.ready") && event.contains(&id))
        })
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_stops_at_once() {
    let ds = Downstream::start().await;
    let srv = Server::start(&Config::new().with_type(merchant(&ds))).await;
    let api = srv.api();
    let (_, root) = make_key(api, None, "default", &["admin"]).await;
    let (id, key) = make_key(api, Some(&root), "acme", &["read"]).await;
    assert_eq!(get(api, "/v1/entities", &key).await.status, 200);
    let r = call(
        api,
        Method::DELETE,
        &format!("/v1/keys/{id}"),
        Some(&root),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r}");
    assert!(r.json()["revoked_at"].is_string(), "{r}");
    let r = get(api, "/v1/entities", &key).await;
    assert!(
        assert_problem(&r, 401)["detail"]
            .as_str()
            .unwrap_or("")
            .contains("revoked"),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_rates_are_limited_per_key_and_per_tenant() {
    let ds = Downstream::start().await;
    let srv = Server::start(
        &Config::new()
            .with_type(merchant(&ds))
            .extra("[auth]\nrate_per_key = 1\nrate_per_tenant = 2\nburst = 4\n"),
    )
    .await;
    let api = srv.api();
    let (_, root) = make_key(api, None, "default", &["admin"]).await;
    let (_, a1) = make_key(api, Some(&root), "acme", &["read"]).await;
    let (_, a2) = make_key(api, Some(&root), "acme", &["read"]).await;
    let (_, b) = make_key(api, Some(&root), "beta", &["read"]).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(get(api, "/v1/entities", &a1).await.status);
    }
    assert_eq!(statuses, [200; 4], "the burst passes");
    let r = get(api, "/v1/entities", &a1).await;
    assert_problem(&r, 429);
    let wait: u64 = r
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("Retry-After: {r}"));
    assert!((1..=2).contains(&wait), "{r}");
    // acme's bucket is empty too: its other key is limited with it.
    assert_problem(&get(api, "/v1/entities", &a2).await, 429);
    // Another tenant is not.
    assert_eq!(get(api, "/v1/entities", &b).await.status, 200);
    // After the wait, the key is served again.
    tokio::time::sleep(Duration::from_secs(wait) + Duration::from_millis(100)).await;
    assert_eq!(get(api, "/v1/entities", &a1).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ripen_keys_creates_lists_and_revokes() {
    let ds = Downstream::start().await;
    let srv = Server::start(&Config::new().with_type(merchant(&ds))).await;
    let (_, root) = make_key(srv.api(), None, "default", &["admin"]).await;
    let base = srv.base();
    let run = |list: &[&str]| {
        let mut a = args(list);
        a.extend(args(&["--server", &base, "--api-key", &root]));
        run_ripen(a, srv.dir().to_owned(), CLI_TIMEOUT)
    };
    let out = run(&[
        "keys",
        "create",
        "--tenant",
        "acme",
        "--scopes",
        "submit,read",
        "--name",
        "ci",
    ])
    .await;
    assert!(out.success(), "{out}");
    let secret = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("key: "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("the key is printed: {out}"))
        .to_owned();
    assert_eq!(get(srv.api(), "/v1/entities", &secret).await.status, 200);
    let out = run(&["keys", "list", "--output", "json"]).await;
    assert!(out.success(), "{out}");
    let page: Value = serde_json::from_str(out.stdout.trim()).expect("JSON");
    let ci = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|k| k["name"] == "ci")
        .unwrap_or_else(|| panic!("{page}"))
        .clone();
    assert_eq!(ci["scopes"], json!(["submit", "read"]));
    let out = run(&["keys", "revoke", ci["id"].as_str().expect("id")]).await;
    assert!(out.success(), "{out}");
    assert_problem(&get(srv.api(), "/v1/entities", &secret).await, 401);
    let out = run(&["keys", "create", "--scopes", "root"]).await;
    assert!(
        !out.success() && out.stderr.contains("unknown scope"),
        "{out}"
    );
}

/// Two nodes on one PostgreSQL: a key created on one works on the other,
/// and a revoke on one stops it on the other well before the few seconds
/// a node remembers checked keys: the store's notification did it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_on_one_node_stops_the_key_on_another() {
    let ds = Downstream::start().await;
    let url = ripen_testkit::PgCluster::shared().create_database();
    let cfg = Config::new().with_type(merchant(&ds));
    let a = Server::start_on(&cfg, &url).await;
    let b = Server::start_on(&cfg, &url).await;
    let (_, root) = make_key(a.api(), None, "default", &["admin"]).await;
    // b hears that a key exists and closes.
    eventually("node b closes", || async {
        b.get("/v1/entities").await.status == 401
    })
    .await;
    let (id, key) = make_key(a.api(), Some(&root), "acme", &["read"]).await;
    assert_eq!(
        get(b.api(), "/v1/entities", &key).await.status,
        200,
        "b checked and remembers it"
    );
    let r = call(
        a.api(),
        Method::DELETE,
        &format!("/v1/keys/{id}"),
        Some(&root),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r}");
    let revoked = Instant::now();
    loop {
        if get(b.api(), "/v1/entities", &key).await.status == 401 {
            break;
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(2),
            "node b still serves a key revoked on node a"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A tenant's entity whose step runs on a worker: the operator's worker
/// key claims it (with the tenant's payload) and completes it, and the
/// entity is ready for its tenant; a worker key cannot read entities.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_worker_key_serves_every_tenants_tasks() {
    let srv = Server::start(
        &Config::new().with_type(TypeDef::new("merchant", vec![Step::worker("kyc", "kyc")])),
    )
    .await;
    let api = srv.api();
    let (_, root) = make_key(api, None, "default", &["admin"]).await;
    let (_, worker) = make_key(api, Some(&root), "default", &["worker"]).await;
    let (_, acme) = make_key(api, Some(&root), "acme", &["submit", "read"]).await;
    let r = call(
        api,
        Method::POST,
        "/v1/entities/merchant",
        Some(&acme),
        Some(&json!({"name": "w"})),
    )
    .await;
    let id = r.json()["id"].as_str().expect("id").to_owned();
    let r = call(
        api,
        Method::POST,
        "/v1/queues/kyc/claim",
        Some(&worker),
        Some(&json!({"max": 1, "wait_ms": 10000})),
    )
    .await;
    assert_eq!(r.status, 200, "{r}");
    let task = r.json()["tasks"][0].clone();
    assert_eq!(task["entity_id"], id.as_str(), "{task}");
    assert_eq!(task["payload"]["name"], "w");
    let r = call(
        api,
        Method::POST,
        &format!(
            "/v1/tasks/{}/complete",
            task["task_id"].as_str().expect("task id")
        ),
        Some(&worker),
        Some(&json!({"lease": task["lease"], "output": {"ok": true}})),
    )
    .await;
    assert_eq!(r.status, 200, "{r}");
    eventually("the worker's entity ready", || async {
        get(api, &format!("/v1/entities/{id}"), &acme).await.json()["status"] == "ready"
    })
    .await;
    let r = get(api, &format!("/v1/entities/{id}"), &worker).await;
    assert_eq!(assert_problem(&r, 403)["scope"], "read");
}

/// With every debug line on, the server's log holds no API key (good or
/// bad), no webhook secret and no payload, whether a request was accepted
/// or refused; a refusal does not echo the key it refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_secret_or_payload_reaches_the_log() {
    let ds = Downstream::start().await;
    let sealing = TempDir::new("ripen-auth-key-").expect("temp dir");
    let mut srv = Server::start(
        &Config::new()
            .with_type(merchant(&ds).schema(json!({
                "type": "object",
                "properties": {"n": {"type": "integer"}}
            })))
            .with_webhooks(&sealing),
    )
    .await;
    srv.set_env("RIPEN_LOG", "debug");
    srv.restart().await;
    let api = srv.api().clone();
    let (_, root) = make_key(&api, None, "default", &["admin", "submit", "read"]).await;

    let accepted = "payload-mark-accepted-4f1c";
    let r = call(
        &api,
        Method::POST,
        "/v1/entities/merchant",
        Some(&root),
        Some(&json!({"note": accepted})),
    )
    .await;
    assert_eq!(r.status, 202, "{r}");
    let id = r.json()["id"].as_str().expect("id").to_owned();
    let refused = "payload-mark-refused-9a2e";
    let r = call(
        &api,
        Method::POST,
        "/v1/entities/merchant",
        Some(&root),
        Some(&json!({"n": refused})),
    )
    .await;
    assert_problem(&r, 422);
    let broken = "payload-mark-malformed-77d0";
    let r = api
        .request(
            Method::POST,
            "/v1/entities/merchant",
            &[
                ("authorization", &bearer(&root)),
                ("content-type", "application/json"),
            ],
            Some(format!("{{\"note\": \"{broken}\"").into_bytes()),
        )
        .await;
    assert_problem(&r, 400);
    let wrong = "rpk_wrongkeymarkwrongkeymarkwrongkeymark0000";
    let r = get(&api, "/v1/entities", wrong).await;
    assert_problem(&r, 401);
    assert!(
        !String::from_utf8_lossy(&r.body).contains(wrong),
        "the refusal echoes the key: {r}"
    );
    let r = call(
        &api,
        Method::POST,
        "/v1/subscriptions",
        Some(&root),
        Some(&json!({"url": "http://127.0.0.1:9/hooks"})),
    )
    .await;
    assert_eq!(r.status, 201, "{r}");
    let secret = r.json()["secret"].as_str().expect("secret").to_owned();
    eventually("the entity to be ready", || async {
        get(&api, &format!("/v1/entities/{id}"), &root).await.json()["status"] == "ready"
    })
    .await;

    srv.kill();
    let log = srv.log();
    assert!(
        log.lines().any(|l| l.contains(" DEBUG ")),
        "debug lines are on: {log}"
    );
    for (what, needle) in [
        ("the admin key", root.as_str()),
        ("the refused key", wrong),
        ("the webhook secret", secret.as_str()),
        ("an accepted payload", accepted),
        ("a refused payload", refused),
        ("a malformed payload", broken),
    ] {
        assert!(!log.contains(needle), "{what} is in the log:\n{log}");
    }
}

/// Every operation of the OpenAPI document that needs a key, called with no
/// key, an unknown key, a revoked key, a key of the owner's tenant missing
/// the operation's scope, and another tenant's key: 401, 401, 401, 403, and
/// for a resource the owner's tenant holds 404 (never 403, never its data).
/// The table is the document itself: a new operation cannot skip this test,
/// and a path parameter it does not know fails it until it is taught here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_refuses_who_may_not_call_it() {
    const SCOPES: [&str; 5] = ["submit", "read", "operate", "admin", "worker"];
    let ds = Downstream::start().await;
    let sealing = TempDir::new("ripen-auth-key-").expect("temp dir");
    let srv = Server::start(
        &Config::new()
            .with_type(merchant(&ds))
            .with_webhooks(&sealing)
            .notify("initial_backoff = \"50ms\""),
    )
    .await;
    let api = srv.api();
    let (_, root) = make_key(api, None, "default", &SCOPES).await;
    // The owner's resources, which the other tenant must never reach.
    let (_, owner) = make_key(api, Some(&root), "acme", &SCOPES).await;
    let (_, other) = make_key(api, Some(&root), "beta", &SCOPES).await;
    let (victim_id, _) = make_key(api, Some(&root), "acme", &["read"]).await;
    let (revoked_id, revoked) = make_key(api, Some(&root), "acme", &SCOPES).await;
    let r = call(
        api,
        Method::DELETE,
        &format!("/v1/keys/{revoked_id}"),
        Some(&root),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r}");
    // The subscription first: it hears what happens after it is made.
    let r = call(
        api,
        Method::POST,
        "/v1/subscriptions",
        Some(&owner),
        Some(&json!({"url": "http://127.0.0.1:9/hooks"})),
    )
    .await;
    assert_eq!(r.status, 201, "{r}");
    let subscription = r.json()["id"].as_str().expect("id").to_owned();
    let r = call(
        api,
        Method::POST,
        "/v1/entities/merchant",
        Some(&owner),
        Some(&json!({"n": 1})),
    )
    .await;
    assert_eq!(r.status, 202, "{r}");
    let entity = r.json()["id"].as_str().expect("id").to_owned();
    let deliveries = format!("/v1/subscriptions/{subscription}/deliveries");
    eventually("a delivery of the owner's subscription", || async {
        get(api, &deliveries, &owner).await.json()["items"]
            .as_array()
            .is_some_and(|items| !items.is_empty())
    })
    .await;
    let delivery = get(api, &deliveries, &owner).await.json()["items"][0]["id"].to_string();
    let delivery = delivery.trim_matches('"').to_owned();
    // Delivery ids are small numbers, which any text may hold.
    let owned = [entity.as_str(), subscription.as_str(), victim_id.as_str()];

    let doc = srv.get("/openapi.json").await;
    assert_eq!(doc.status, 200, "{doc}");
    let doc = doc.json();
    let mut checked = 0;
    for (template, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("a path item") {
            let Ok(method) = method.to_uppercase().parse::<Method>() else {
                continue; // "parameters", "summary", ...
            };
            let scope = op["x-ripen-scope"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {template} has no x-ripen-scope"));
            if scope == "public" {
                continue;
            }
            assert!(SCOPES.contains(&scope), "{method} {template}: {scope}");
            // The path, each parameter filled with the owner's resource.
            let mut holds_owned = false;
            let path = fill(template, |name| match (name, template.as_str()) {
                ("type_or_id", _) if method == Method::POST => "merchant".to_owned(),
                ("type_or_id" | "id", t) if t.starts_with("/v1/entities/") => {
                    holds_owned = true;
                    entity.clone()
                }
                ("id", t) if t.starts_with("/v1/subscriptions/") => {
                    holds_owned = true;
                    subscription.clone()
                }
                ("id", t) if t.starts_with("/v1/deliveries/") => {
                    holds_owned = true;
                    delivery.clone()
                }
                ("id", t) if t.starts_with("/v1/keys/") => {
                    holds_owned = true;
                    victim_id.clone()
                }
                ("type", _) => "merchant".to_owned(),
                ("n", _) => "1".to_owned(),
                ("queue", _) => "billing".to_owned(),
                ("task", _) => "task-of-nobody".to_owned(),
                (other, _) => panic!("{method} {template}: teach this test the parameter {other}"),
            });
            let body = op.get("requestBody").map(|_| json!({}));
            let what = format!("{method} {path}");
            let missing: Vec<&str> = SCOPES.iter().copied().filter(|s| *s != scope).collect();
            let (_, lacking) = make_key(api, Some(&root), "acme", &missing).await;
            for (who, key) in [
                ("no key", None),
                (
                    "an unknown key",
                    Some("rpk_0000000000000000000000000000000000000000000"),
                ),
                ("a revoked key", Some(revoked.as_str())),
            ] {
                let r = call(api, method.clone(), &path, key, body.as_ref()).await;
                assert_problem(&r, 401);
                assert!(
                    r.headers.contains_key("www-authenticate"),
                    "{what}, {who}: {r}"
                );
            }
            let r = call(api, method.clone(), &path, Some(&lacking), body.as_ref()).await;
            let p = assert_problem(&r, 403);
            assert_eq!(p["scope"], scope, "{what}, a key without {scope}: {p}");

            // A stream of the other tenant's own changes never ends; that
            // streams carry only their tenant's is tested above.
            let streams = op["responses"]["200"]["content"]
                .get("text/event-stream")
                .is_some();
            if streams && !holds_owned {
                checked += 1;
                continue;
            }
            let r = call(api, method.clone(), &path, Some(&other), body.as_ref()).await;
            let text = String::from_utf8_lossy(&r.body).into_owned();
            // Workers serve every tenant's tasks, so only the operator's
            // tenant runs them; types are shared, so only the operator
            // registers them.
            let operator_only =
                scope == "worker" || (method == Method::POST && template.ends_with("/versions"));
            if operator_only {
                assert_problem(&r, 403);
            } else if holds_owned {
                assert_problem(&r, 404);
            } else {
                assert!(
                    r.status < 500 && r.status != 401 && r.status != 403,
                    "{what}, another tenant: {r}"
                );
            }
            // A 404 may name the id it was asked for; anything else must
            // name none of the owner's ids.
            if !holds_owned {
                for id in owned {
                    assert!(
                        !text.contains(id),
                        "{what} shows another tenant's {id}: {text}"
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 25, "only {checked} operations were checked");
    // The owner's resources are as they were.
    let view = get(api, &format!("/v1/entities/{entity}"), &owner).await;
    assert_eq!(view.status, 200, "{view}");
    let r = get(api, &format!("/v1/subscriptions/{subscription}"), &owner).await;
    assert_eq!(r.status, 200, "{r}");
    let keys = get(api, "/v1/keys", &owner).await.json();
    assert!(
        keys["items"]
            .as_array()
            .expect("keys")
            .iter()
            .any(|k| k["id"] == victim_id.as_str() && k["revoked_at"].is_null()),
        "{keys}"
    );
}

/// `template` with each `{name}` replaced by `value(name)`.
fn fill(template: &str, mut value: impl FnMut(&str) -> String) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let close = rest[open..].find('}').expect("a closed parameter") + open;
        out.push_str(&rest[..open]);
        out.push_str(&value(&rest[open + 1..close]));
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}
