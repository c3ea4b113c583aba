//! The operator dashboard (docs/dashboard.md) and the endpoints it reads
//! (`/v1/stats`, `/v1/types`, `POST /v1/entities:retry`, the list's
//! filters), against the real binary.
//!
//! The browser tests run the Python selenium scripts of `tests/browser/` in
//! a headless Chromium, one script per test, against a server holding
//! entities in every status. They need `chromium`, `chromedriver` and a
//! Python with selenium in `RIPEN_TEST_PYTHON`: `scripts/test` installs
//! them. Each script saves screenshots into `target/browser-shots/`.

mod common;

use std::collections::HashSet;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// How long a short pipeline may take to settle in a debug build.
const SETTLE: Duration = Duration::from_secs(20);
/// How long one browser script may run.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------
// A server with entities in every status
// ---------------------------------------------------------------------------

/// How many entities of each outcome an estate holds.
#[derive(Clone, Copy)]
struct Mix {
    failed: usize,
    degraded: usize,
    ready: usize,
    pending: usize,
    cancelled: usize,
}

const MIX: Mix = Mix {
    failed: 3,
    degraded: 2,
    ready: 4,
    pending: 2,
    cancelled: 1,
};

/// A server whose entities end in every status, and their ids, oldest first
/// per outcome:
/// - `merchant`: `kyc` (one attempt) → `billing`, and a non-critical
///   `welcome_email` after `kyc`. Failed merchants are refused by KYC;
///   ready ones went through (one of them with the key `signup-42`).
/// - `account`: `open` (its first call fails with a 503, so it is retried)
///   and a non-critical `welcome` that bounces: ready and degraded.
/// - `slow`: `hold`, which takes ten minutes, then `after`, blocked until
///   then: pending; or cancelled.
/// - `brief`: one step that takes `BRIEF_MS`; the cancel script submits one.
struct Estate {
    server: Server,
    ds: Downstream,
    failed: Vec<String>,
    degraded: Vec<String>,
    ready: Vec<String>,
    keyed: String,
    pending: Vec<String>,
    cancelled: Vec<String>,
}

const BRIEF_MS: u64 = 4_000;

impl Estate {
    async fn start(mix: Mix) -> Estate {
        let ds = Downstream::start().await;
        let url = |t: &str, s: &str| ds.url(&step_path(t, s));
        let merchant = TypeDef::new(
            "merchant",
            vec![
                Step::http("kyc", url("merchant", "kyc")).attempts(1),
                Step::http("billing", url("merchant", "billing")).needs(&["kyc"]),
                Step::http("welcome_email", url("merchant", "welcome_email"))
                    .needs(&["kyc"])
                    .non_critical(),
            ],
        );
        let account = TypeDef::new(
            "account",
            vec![
                Step::http("open", url("account", "open")).backoff("200ms", "200ms"),
                Step::http("welcome", url("account", "welcome"))
                    .needs(&["open"])
                    .non_critical()
                    .attempts(1),
            ],
        );
        let slow = TypeDef::new(
            "slow",
            vec![
                Step::http("hold", url("slow", "hold")).timeout("1h"),
                Step::http("after", url("slow", "after")).needs(&["hold"]),
            ],
        );
        let brief = TypeDef::new(
            "brief",
            vec![Step::http("work", url("brief", "work")).timeout("1m")],
        );
        ds.set("/merchant/kyc", Behavior::always(422));
        ds.set(
            "/account/open",
            Behavior::fail_first(503, 1, json!({"account": "opened"})),
        );
        ds.set("/account/welcome", Behavior::always(400));
        ds.set(
            "/slow/hold",
            Behavior::sleep(Duration::from_secs(600), json!({})),
        );
        ds.set(
            "/brief/work",
            Behavior::sleep(Duration::from_millis(BRIEF_MS), json!({"worked": true})),
        );
        let server = Server::start(
            &Config::new()
                .with_type(merchant)
                .with_type(account)
                .with_type(slow)
                .with_type(brief),
        )
        .await;
        let submit = |t: &'static str, n: usize| {
            let server = server.api().clone();
            async move {
                let mut ids = Vec::new();
                for i in 0..n {
                    let payload = json!({"name": format!("{t} {i}"), "note": "<b>not markup</b>"});
                    ids.push(server.submit_ok(t, &payload).await);
                }
                ids
            }
        };
        let failed = submit("merchant", mix.failed).await;
        for id in &failed {
            let v = server.wait_settled(id, SETTLE).await;
            assert_eq!(v["status"], "failed", "{v:#}");
        }
        ds.set("/merchant/kyc", Behavior::ok(json!({"kyc": "passed"})));
        let degraded = submit("account", mix.degraded).await;
        let mut ready = submit("merchant", mix.ready).await;
        let r = server
            .submit("merchant", &json!({"name": "keyed"}), Some("signup-42"))
            .await;
        assert_eq!(r.status, 202, "{r}");
        let keyed = r.json()["id"].as_str().expect("an id").to_owned();
        ready.push(keyed.clone());
        for id in &degraded {
            let v = server.wait_settled(id, SETTLE).await;
            assert_eq!(
                (&v["status"], &v["degraded"]),
                (&json!("ready"), &json!(true))
            );
        }
        for id in &ready {
            let v = server.wait_settled(id, SETTLE).await;
            assert_eq!(v["status"], "ready", "{v:#}");
        }
        let pending = submit("slow", mix.pending).await;
        let cancelled = submit("slow", mix.cancelled).await;
        for id in &cancelled {
            let r = server
                .post_empty(&format!("/v1/entities/{id}/cancel"))
                .await;
            assert_eq!(r.status, 202, "{r}");
        }
        for id in &pending {
            server
                .wait_until(id, SETTLE, "running its first step", |v| {
                    step(v, "hold")["status"] == "running"
                })
                .await;
        }
        Estate {
            server,
            ds,
            failed,
            degraded,
            ready,
            keyed,
            pending,
            cancelled,
        }
    }

    /// What a browser script is told about the estate.
    fn case(&self) -> Value {
        json!({
            "failed": self.failed,
            "degraded": self.degraded,
            "ready": self.ready,
            "keyed": self.keyed,
            "key": "signup-42",
            "pending": self.pending,
            "cancelled": self.cancelled,
            "brief_ms": BRIEF_MS,
        })
    }
}

/// Every id `GET /v1/entities?{query}` lists, page after page.
async fn list_all(api: &Api, query: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let cursor = after
            .as_deref()
            .map(|a| format!("&after={a}"))
            .unwrap_or_default();
        let r = api
            .get(&format!("/v1/entities?limit=3&{query}{cursor}"))
            .await;
        assert_eq!(r.status, 200, "{query}: {r}");
        let page = r.json();
        for item in page["items"].as_array().expect("items") {
            ids.push(item["id"].as_str().expect("an id").to_owned());
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return ids,
        }
    }
}

/// When a UUIDv7 entity id was minted, to the millisecond, as RFC 3339.
fn minted_at(id: &str) -> String {
    let uuid = uuid::Uuid::parse_str(id).expect("an entity id");
    let (secs, nanos) = uuid
        .get_timestamp()
        .expect("a UUIDv7 has a timestamp")
        .to_unix();
    let at = std::time::UNIX_EPOCH + Duration::new(secs, nanos);
    humantime::format_rfc3339_millis(at).to_string()
}

fn newest_first(groups: &[&[String]]) -> Vec<String> {
    let mut all: Vec<String> = groups.iter().flat_map(|g| g.iter().cloned()).collect();
    // UUIDv7 ids sort by creation time.
    all.sort_unstable_by(|a, b| b.cmp(a));
    all
}

// ---------------------------------------------------------------------------
// The endpoints
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_filters_by_degraded_creation_time_and_key() {
    let e = Estate::start(MIX).await;
    let api = e.server.api();
    assert_eq!(
        list_all(api, "degraded=true").await,
        newest_first(&[&e.degraded])
    );
    assert_eq!(
        list_all(api, "type=merchant&degraded=false&status=ready").await,
        newest_first(&[&e.ready])
    );
    assert_eq!(
        list_all(api, "type=merchant&key=signup-42").await,
        vec![e.keyed.clone()]
    );
    assert_eq!(
        list_all(api, "type=account&key=signup-42").await,
        Vec::<String>::new()
    );
    assert_eq!(
        list_all(api, "type=merchant&key=signup-42&status=failed").await,
        Vec::<String>::new()
    );

    // The minting times of the first degraded and the first pending entity
    // (the millisecond in their ids, which the filters compare with) bound
    // exactly the entities created between them.
    let from = minted_at(&e.degraded[0]);
    let to = minted_at(&e.pending[0]);
    let q = format!(
        "created_after={}&created_before={}",
        encode_query(&from),
        encode_query(&to)
    );
    assert_eq!(
        list_all(api, &q).await,
        newest_first(&[&e.degraded, &e.ready])
    );
    // An offset names the same instant.
    let shifted = from.replace('Z', "+00:00");
    assert_eq!(
        list_all(
            api,
            &format!("created_after={}&type=slow", encode_query(&shifted))
        )
        .await,
        newest_first(&[&e.pending, &e.cancelled])
    );

    for (query, what) in [
        ("degraded=yes", "degraded"),
        ("created_after=yesterday", "created_after"),
        ("created_before=2026-13-01T00:00:00Z", "created_before"),
        ("key=signup-42", "key needs type"),
    ] {
        let r = api.get(&format!("/v1/entities?{query}")).await;
        let p = assert_problem(&r, 400);
        assert!(
            p["detail"].as_str().unwrap_or("").contains(what),
            "{query}: {p:#}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_every_status_and_the_rates_count_intake() {
    let e = Estate::start(MIX).await;
    let api = e.server.api();
    let stats = api.get("/v1/stats").await;
    assert_eq!(stats.status, 200, "{stats}");
    let stats = stats.json();
    let types: Vec<&str> = stats["types"]
        .as_array()
        .expect("types")
        .iter()
        .map(|t| t["type"].as_str().unwrap_or(""))
        .collect();
    // In the configuration's order, which is by name.
    assert_eq!(types, ["account", "brief", "merchant", "slow"], "{stats:#}");
    for t in stats["types"].as_array().expect("types") {
        let name = t["type"].as_str().unwrap_or("");
        for status in ["pending", "ready", "failed", "cancelled"] {
            let listed = list_all(api, &format!("type={name}&status={status}")).await;
            assert_eq!(
                t["counts"][status].as_u64(),
                Some(listed.len() as u64),
                "{name} {status}: {stats:#}"
            );
        }
    }
    assert_eq!(stats["types"][2]["counts"]["failed"], MIX.failed);
    assert_eq!(stats["types"][3]["counts"]["cancelled"], MIX.cancelled);
    let rates = &stats["rates"];
    assert_eq!(rates["bucket_seconds"], 10);
    let sum = |k: &str| -> u64 {
        let buckets = rates[k].as_array().expect("buckets");
        assert_eq!(buckets.len(), 30, "{rates:#}");
        buckets.iter().map(|n| n.as_u64().expect("a count")).sum()
    };
    let total = MIX.failed + MIX.degraded + MIX.ready + 1 + MIX.pending + MIX.cancelled;
    assert_eq!(sum("created"), total as u64, "{rates:#}");
    assert_eq!(
        sum("ready"),
        (MIX.degraded + MIX.ready + 1) as u64,
        "{rates:#}"
    );
    assert!(stats["counted_at"].is_string(), "{stats:#}");

    // The counts are at most a few seconds old: a new failure shows.
    e.ds.set("/merchant/kyc", Behavior::always(422));
    let id = e
        .server
        .submit_ok("merchant", &json!({"name": "late"}))
        .await;
    e.server.wait_settled(&id, SETTLE).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = api.get("/v1/stats").await.json();
        if now["types"][2]["counts"]["failed"] == MIX.failed + 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new failure is not counted: {now:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_show_each_pipeline_and_views_show_each_steps_needs() {
    let e = Estate::start(Mix {
        failed: 0,
        degraded: 1,
        ready: 0,
        pending: 0,
        cancelled: 0,
    })
    .await;
    let api = e.server.api();
    let r = api.get("/v1/types").await;
    assert_eq!(r.status, 200, "{r}");
    let types = r.json();
    let merchant = &types["items"][2];
    assert_eq!(merchant["type"], "merchant");
    assert_eq!(merchant["latest_version"], 1);
    assert_eq!(merchant["versions"], 1);
    assert_eq!(
        merchant["steps"],
        json!([
            {"name": "kyc", "needs": [], "critical": true, "executor": "http", "queue": "http", "timeout_ms": 5000, "max_attempts": 1},
            {"name": "billing", "needs": ["kyc"], "critical": true, "executor": "http", "queue": "http", "timeout_ms": 5000, "max_attempts": 3},
            {"name": "welcome_email", "needs": ["kyc"], "critical": false, "executor": "http", "queue": "http", "timeout_ms": 5000, "max_attempts": 3},
        ])
    );
    assert_eq!(types["items"].as_array().map(Vec::len), Some(4));
    let view = api.entity(&e.degraded[0]).await;
    assert_eq!(step(&view, "open")["needs"], json!([]));
    assert_eq!(step(&view, "welcome")["needs"], json!(["open"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_retry_requeues_the_failed_entities_it_names_or_selects() {
    let e = Estate::start(Mix {
        failed: 4,
        degraded: 1,
        ready: 1,
        pending: 1,
        cancelled: 0,
    })
    .await;
    let api = e.server.api();
    e.ds.set("/merchant/kyc", Behavior::ok(json!({"kyc": "passed"})));

    // By ids: only the failed merchants among them are re-queued.
    let mut ids: Vec<&str> = e.failed[..2].iter().map(String::as_str).collect();
    ids.extend([
        e.ready[0].as_str(),
        e.degraded[0].as_str(),
        e.pending[0].as_str(),
    ]);
    ids.push("01a233a6-ee20-72be-b1c2-82b64fb86873");
    let r = api
        .post(
            "/v1/entities:retry",
            &json!({"type": "merchant", "ids": ids}),
        )
        .await;
    assert_eq!(r.status, 202, "{r}");
    assert_eq!(r.json(), json!({"requeued": 2}));
    for id in &e.failed[..2] {
        let v = api.wait_settled(id, SETTLE).await;
        assert_eq!(v["status"], "ready", "{v:#}");
    }
    assert_eq!(api.entity(&e.failed[2]).await["status"], "failed");

    // By status: the newest `limit` failed entities of the type.
    let r = api
        .post(
            "/v1/entities:retry",
            &json!({"type": "merchant", "status": "failed", "limit": 1}),
        )
        .await;
    assert_eq!(r.json(), json!({"requeued": 1}), "{r}");
    assert_eq!(
        api.wait_settled(&e.failed[3], SETTLE).await["status"],
        "ready"
    );
    assert_eq!(api.entity(&e.failed[2]).await["status"], "failed");
    let r = api
        .post(
            "/v1/entities:retry",
            &json!({"type": "merchant", "status": "failed"}),
        )
        .await;
    assert_eq!(r.json(), json!({"requeued": 1}), "{r}");
    assert_eq!(
        api.wait_settled(&e.failed[2], SETTLE).await["status"],
        "ready"
    );
    let r = api
        .post(
            "/v1/entities:retry",
            &json!({"type": "merchant", "status": "failed"}),
        )
        .await;
    assert_eq!(r.json(), json!({"requeued": 0}), "{r}");

    let many: Vec<String> = (0..1_001).map(|_| e.failed[0].clone()).collect();
    for (body, status, what) in [
        (b"{\"type\": ".to_vec(), 400, "not JSON"),
        (b"[]".to_vec(), 422, "does not fit"),
        (
            json!({"type": "nothing", "ids": []})
                .to_string()
                .into_bytes(),
            422,
            "the types are",
        ),
        (
            json!({"type": "merchant"}).to_string().into_bytes(),
            422,
            "one of the two",
        ),
        (
            json!({"type": "merchant", "ids": [], "status": "failed"})
                .to_string()
                .into_bytes(),
            422,
            "one of the two",
        ),
        (
            json!({"type": "merchant", "status": "ready"})
                .to_string()
                .into_bytes(),
            422,
            "only failed",
        ),
        (
            json!({"type": "merchant", "status": "failed", "limit": 1001})
                .to_string()
                .into_bytes(),
            422,
            "between 1 and 1000",
        ),
        (
            json!({"type": "merchant", "status": "failed", "limit": 0})
                .to_string()
                .into_bytes(),
            422,
            "between 1 and 1000",
        ),
        (
            json!({"type": "merchant", "ids": ["nope"]})
                .to_string()
                .into_bytes(),
            422,
            "not an entity id",
        ),
        (
            json!({"type": "merchant", "ids": many})
                .to_string()
                .into_bytes(),
            422,
            "at most 1000",
        ),
        (
            json!({"type": "merchant", "ids": [], "limit": 3})
                .to_string()
                .into_bytes(),
            422,
            "limit goes with status",
        ),
        (
            json!({"type": "merchant", "ids": [], "what": 1})
                .to_string()
                .into_bytes(),
            422,
            "unknown field",
        ),
    ] {
        let r = api.post_bytes("/v1/entities:retry", body.clone()).await;
        let p = assert_problem(&r, status);
        assert!(
            p["detail"].as_str().unwrap_or("").contains(what),
            "{}: {p:#}",
            String::from_utf8_lossy(&body)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_served_from_the_binary_with_a_strict_policy() {
    let ds = Downstream::start().await;
    let srv = Server::start(&Config::new().with_type(single("t", &ds))).await;
    let page = srv.get("/").await;
    assert_eq!(page.status, 200, "{page}");
    assert!(page
        .header("content-type")
        .unwrap_or_default()
        .starts_with("text/html"));
    let csp = page.header("content-security-policy").unwrap_or_default();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    let html = page.text();
    let mut total = html.len();
    for (path, kind) in [
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/app.css", "text/css"),
    ] {
        assert!(html.contains(path), "the page links {path}");
        let r = srv.get(path).await;
        assert_eq!(r.status, 200, "{r}");
        assert!(
            r.header("content-type")
                .unwrap_or_default()
                .starts_with(kind),
            "{r}"
        );
        total += r.body.len();
    }
    assert!(total < 60 * 1024, "the dashboard weighs {total} bytes");
}

// ---------------------------------------------------------------------------
// The browser tests
// ---------------------------------------------------------------------------

/// Where the screenshots go: `target/browser-shots/`, beside the build.
fn shots_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/debug/deps/dashboard-HASH
    let target = exe
        .ancestors()
        .nth(3)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    let dir = target.join("browser-shots");
    std::fs::create_dir_all(&dir).expect("create target/browser-shots");
    dir
}

/// A Python with selenium, and Chromium with its driver; anything missing
/// fails the test with what to do.
fn browser_tools() -> String {
    let python = std::env::var("RIPEN_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import selenium.webdriver"])
        .output();
    assert!(
        probe.is_ok_and(|o| o.status.success()),
        "{python} cannot import selenium: run scripts/test, which installs Chromium and \
         makes a virtual environment with selenium, or set RIPEN_TEST_PYTHON to a Python \
         that has it"
    );
    for tool in ["chromium", "chromedriver"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is not installed: run scripts/test, which installs chromium and \
             chromium-driver with apt-get"
        );
    }
    python
}

/// One browser at a time: two cores do not run several Chromiums well.
static BROWSER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `tests/browser/{script}` against `base` with `case` and asserts
/// that it passed, printing its output and where its screenshots are.
async fn run_browser(script: &str, base: String, case: Value) {
    let python = browser_tools();
    let shots = shots_dir();
    let path = format!("{}/tests/browser/{script}", env!("CARGO_MANIFEST_DIR"));
    let name = script.to_owned();
    let (status, stdout, stderr) = tokio::task::spawn_blocking(move || {
        let _one = BROWSER.lock().unwrap_or_else(|e| e.into_inner());
        let mut child = Command::new(&python)
            .arg(&path)
            .env("RIPEN_URL", &base)
            .env("RIPEN_CASE", case.to_string())
            .env("RIPEN_SHOTS", &shots)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {python} {path}: {e}"));
        let mut out = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let out_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + SCRIPT_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => break None,
            }
        };
        (
            status,
            out_reader.join().unwrap_or_default(),
            err_reader.join().unwrap_or_default(),
        )
    })
    .await
    .expect("join the browser script");
    println!("{name}: screenshots in {}", shots_dir().display());
    print!("{stdout}");
    assert!(
        status.is_some_and(|s| s.success()),
        "{name} failed ({status:?}; killed after {SCRIPT_TIMEOUT:?} if None)\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_overview_counts_match_the_api_and_follow_new_entities() {
    let e = Estate::start(MIX).await;
    run_browser("overview.py", e.server.base(), e.case()).await;
    // The script submitted merchants while it watched.
    let ready = list_all(e.server.api(), "type=merchant&status=ready").await;
    assert!(ready.len() > MIX.ready + 1, "{ready:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_list_filters_pages_and_searches() {
    let e = Estate::start(MIX).await;
    let all = newest_first(&[&e.failed, &e.degraded, &e.ready, &e.pending, &e.cancelled]);
    let mut case = e.case();
    case["all"] = json!(all);
    run_browser("entity_list.py", e.server.base(), case).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_entity_page_draws_the_dag_the_attempts_and_the_data() {
    let e = Estate::start(MIX).await;
    run_browser("entity_page.py", e.server.base(), e.case()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_retry_shows_pending_then_ready_without_a_reload() {
    let e = Estate::start(MIX).await;
    // KYC now lets merchants through, slowly enough to see them pending.
    e.ds.set(
        "/merchant/kyc",
        Behavior::sleep(Duration::from_secs(3), json!({"kyc": "passed"})),
    );
    run_browser("retry_live.py", e.server.base(), e.case()).await;
    let v = e.server.entity(&e.failed[0]).await;
    assert_eq!(v["status"], "ready", "{v:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_cancel_of_an_entity_that_became_ready_shows_the_refusal() {
    let e = Estate::start(Mix {
        failed: 1,
        degraded: 0,
        ready: 1,
        pending: 1,
        cancelled: 0,
    })
    .await;
    run_browser("cancel_refused.py", e.server.base(), e.case()).await;
    let brief = list_all(e.server.api(), "type=brief").await;
    assert_eq!(brief.len(), 1, "the script submitted one: {brief:?}");
    let v = e.server.entity(&brief[0]).await;
    assert_eq!(
        v["status"], "ready",
        "the refused cancel changed nothing: {v:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_bulk_retry_requeues_the_filtered_failed_entities() {
    let e = Estate::start(Mix {
        failed: 3,
        degraded: 1,
        ready: 1,
        pending: 1,
        cancelled: 0,
    })
    .await;
    e.ds.set("/merchant/kyc", Behavior::ok(json!({"kyc": "passed"})));
    run_browser("bulk_retry.py", e.server.base(), e.case()).await;
    let failed: HashSet<String> = list_all(e.server.api(), "status=failed")
        .await
        .into_iter()
        .collect();
    assert!(failed.is_empty(), "still failed: {failed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_phone_viewport_has_no_sideways_scrolling() {
    let e = Estate::start(MIX).await;
    run_browser("phone.py", e.server.base(), e.case()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_keyboard_reaches_every_view_with_visible_focus() {
    let e = Estate::start(MIX).await;
    run_browser("keyboard.py", e.server.base(), e.case()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_a_waiting_entity_shows_what_it_waits_for_and_why_it_failed() {
    let ds = Downstream::start().await;
    let cfg = Config::new()
        .with_type(TypeDef::new(
            "merchant",
            vec![ripen_testkit::Step::worker("kyc", "merchants")],
        ))
        .with_type(single("store", &ds).references("merchant_id", "merchant"));
    let srv = Server::start(&cfg).await;
    let merchant = srv.submit_ok("merchant", &json!({})).await;
    let store = srv
        .submit_ok("store", &json!({"merchant_id": merchant}))
        .await;
    let case = json!({"merchant": merchant, "store": store});
    run_browser("dependency.py", srv.base(), case).await;
}

/// A key's request to the server; panics unless it answers `status`.
async fn with_key(
    srv: &Server,
    key: Option<&str>,
    method: &str,
    path: &str,
    body: Value,
    status: u16,
) -> Value {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![
        ("accept", "application/json"),
        ("content-type", "application/json"),
    ];
    if let Some(a) = auth.as_deref() {
        headers.push(("authorization", a));
    }
    let method = ripen_client::Method::from_bytes(method.as_bytes()).expect("a method");
    let r = srv
        .request(method, path, &headers, Some(body.to_string().into_bytes()))
        .await;
    assert_eq!(r.status, status, "{r}");
    r.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_asks_for_a_key_and_shows_that_tenants_entities_only() {
    let ds = Downstream::start().await;
    let srv = Server::start(&Config::new().with_type(single("merchant", &ds))).await;
    let root = with_key(
        &srv,
        None,
        "POST",
        "/v1/keys",
        json!({"scopes": ["admin"]}),
        201,
    )
    .await;
    let root = root["key"].as_str().expect("key").to_owned();
    let mut case = json!({});
    for tenant in ["acme", "beta"] {
        let key = with_key(
            &srv,
            Some(&root),
            "POST",
            "/v1/keys",
            json!({"tenant": tenant, "scopes": ["submit", "read"]}),
            201,
        )
        .await;
        let key = key["key"].as_str().expect("key").to_owned();
        let e = with_key(
            &srv,
            Some(&key),
            "POST",
            "/v1/entities/merchant",
            json!({"name": tenant}),
            202,
        )
        .await;
        let id = e["id"].as_str().expect("id").to_owned();
        let deadline = Instant::now() + SETTLE;
        while with_key(
            &srv,
            Some(&key),
            "GET",
            &format!("/v1/entities/{id}"),
            json!({}),
            200,
        )
        .await["status"]
            != "ready"
        {
            assert!(
                Instant::now() < deadline,
                "{tenant}'s entity did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        case[format!("{tenant}_key")] = json!(key);
        case[format!("{tenant}_entity")] = json!(id);
    }
    run_browser("auth.py", srv.base(), case).await;
}
