//! The Rust worker SDK against the real thing: a `ripen serve` process and
//! the `billing` example as separate worker processes, checked through the
//! server's API (entity views and histories), not through worker logs.
//!
//! On SQLite by default; `RIPEN_TEST_STORAGE=postgres` runs them on a
//! private PostgreSQL cluster.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use ripen_client::{Client, EntityStatus, EntityView, Event, StepStatus, StepView};
use ripen_testkit::{
    step_path, workspace_binary, Config, Downstream, ServerProcess, Step, Target, TempDir, TypeDef,
    WorkerProcess,
};
use serde_json::{json, Value};

const TYPE: &str = "order";
const QUEUE: &str = "billing";
/// How long anything in these tests may take to happen.
const PATIENCE: Duration = Duration::from_secs(30);

/// The `ripen` server and the `billing` example, built once per test binary.
fn binaries() -> &'static (PathBuf, PathBuf) {
    static BINARIES: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BINARIES.get_or_init(|| {
        let ripen = workspace_binary("ripen", Target::Bin("ripen")).expect("build ripen");
        let billing = workspace_binary("ripen-worker", Target::Example("billing"))
            .expect("build the billing example");
        (ripen, billing)
    })
}

fn storage_url(dir: &Path) -> String {
    match std::env::var("RIPEN_TEST_STORAGE").as_deref() {
        Ok("postgres") => ripen_testkit::PgCluster::shared().create_database(),
        Ok("sqlite") | Err(_) => ripen_testkit::sqlite_url(dir),
        Ok(other) => panic!("RIPEN_TEST_STORAGE={other:?}: use sqlite or postgres"),
    }
}

/// A server whose type `order` runs `a` (HTTP) -> `bill` (worker queue
/// `billing`) -> `c` (HTTP), the fake downstream of `a` and `c`, and the
/// directory that holds the config, the database and the logs.
struct Env {
    client: Client,
    downstream: Downstream,
    server: ServerProcess,
    /// Removed after the server is killed (fields drop in order).
    dir: TempDir,
    workers: usize,
}

impl Env {
    async fn start(bill: impl FnOnce(Step) -> Step) -> Env {
        let (ripen, _) = binaries();
        let downstream = Downstream::start().await;
        let url = |step: &str| downstream.url(&step_path(TYPE, step));
        let pipeline = TypeDef::new(
            TYPE,
            vec![
                Step::http("a", url("a")),
                bill(Step::worker("bill", QUEUE).needs(&["a"])),
                Step::http("c", url("c")).needs(&["bill"]),
            ],
        );
        let dir = TempDir::new("ripen-worker-sdk-").expect("create a temporary directory");
        let config = Config::new()
            .with_type(pipeline)
            .write(dir.path(), &storage_url(dir.path()))
            .expect("write the config");
        let server = ServerProcess::start(ripen, &config, &dir.path().join("server.log"))
            .await
            .expect("start ripen serve");
        server.wait_ready(PATIENCE).await.expect("readyz");
        Env {
            client: server.client().clone(),
            downstream,
            server,
            dir,
            workers: 0,
        }
    }

    /// Starts the billing example on this server's queue with `args`.
    async fn worker(&mut self, args: &[&str]) -> WorkerProcess {
        let (_, billing) = binaries();
        self.workers += 1;
        let log = self.dir.path().join(format!("worker-{}.log", self.workers));
        let url = self.server.url();
        let mut all = vec![QUEUE];
        all.extend_from_slice(args);
        WorkerProcess::start(billing, &all, &[("RIPEN_URL", url.as_str())], &log)
            .await
            .expect("start the billing worker")
    }

    async fn submit(&self, payload: Value) -> String {
        let submitted = self
            .client
            .submit(TYPE, payload.to_string(), None)
            .await
            .expect("submit");
        submitted.view.id
    }

    /// Polls the entity until `done` holds; panics with the last view after
    /// [`PATIENCE`].
    async fn wait_for(
        &self,
        id: &str,
        what: &str,
        done: impl Fn(&EntityView) -> bool,
    ) -> EntityView {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let view = self.client.get(id).await.expect("get the entity");
            if done(&view) {
                return view;
            }
            assert!(
                Instant::now() < deadline,
                "entity {id} not {what} within {PATIENCE:?}: {view:#?}\nserver log:\n{}",
                self.server.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the entity settles, and asserts it settled as `status`.
    async fn wait_status(&self, id: &str, status: EntityStatus) -> EntityView {
        let view = self
            .wait_for(id, "settled", |v| v.status.is_terminal())
            .await;
        assert_eq!(view.status, status, "entity {id}: {view:#?}");
        view
    }

    /// Waits until step `bill` is held by worker `worker`.
    async fn wait_held_by(&self, id: &str, worker: &str) -> EntityView {
        self.wait_for(id, &format!("held by {worker}"), |v| {
            let bill = bill(v);
            bill.status == StepStatus::Running && bill.extra.get("worker") == Some(&json!(worker))
        })
        .await
    }

    async fn events(&self, id: &str) -> Vec<Event> {
        self.client.events(id, None, None).await.expect("events")
    }
}

fn bill(view: &EntityView) -> &StepView {
    view.step("bill").expect("the pipeline has a step bill")
}

fn of_bill<'a>(events: &'a [Event], kind: &'a str) -> impl Iterator<Item = &'a Event> + 'a {
    events
        .iter()
        .filter(move |e| e.kind == kind && e.step.as_deref() == Some("bill"))
}

fn time(text: &str) -> SystemTime {
    let secs = |t: &str| -> Option<SystemTime> {
        // The server writes `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
        let (date, rest) = t.split_once('T')?;
        let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
        let (y, m, day) = (d.next()??, d.next()??, d.next()??);
        let rest = rest.strip_suffix('Z')?;
        let (hms, frac) = rest.split_once('.').unwrap_or((rest, "0"));
        let mut h = hms.split(':').map(|x| x.parse::<i64>().ok());
        let (hh, mm, ss) = (h.next()??, h.next()??, h.next()??);
        let yy = if m <= 2 { y - 1 } else { y };
        let era = yy.div_euclid(400);
        let yoe = yy - era * 400;
        let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
        let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
        let micros: u64 = format!("{frac:0<6}")[..6].parse().ok()?;
        let s = u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()?;
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(s) + Duration::from_micros(micros))
    };
    secs(text).unwrap_or_else(|| panic!("{text:?} is not the server's RFC 3339"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_step_runs_between_two_http_steps() {
    let mut env = Env::start(|s| s).await;
    let _worker = env
        .worker(&["--worker-id", "billing-1", "--sleep-ms", "1500"])
        .await;
    let id = env
        .submit(json!({"customer": "Acme", "amount_cents": 1200, "items": [{"price_cents": 150, "quantity": 2}]}))
        .await;

    // While the worker holds the task, the view names it and its lease.
    let held = env.wait_held_by(&id, "billing-1").await;
    let step = bill(&held);
    assert_eq!(
        step.extra.get("executor"),
        Some(&json!("worker")),
        "{step:?}"
    );
    let expires = step.extra["lease_expires_at"]
        .as_str()
        .expect("a running worker step shows lease_expires_at");
    assert!(
        time(expires) > SystemTime::now() - Duration::from_secs(1),
        "{expires}"
    );
    assert_eq!(
        held.step("a").unwrap().extra.get("executor"),
        Some(&json!("http"))
    );
    assert_eq!(held.step("c").unwrap().status, StepStatus::Blocked);

    let ready = env.wait_status(&id, EntityStatus::Ready).await;
    let step = bill(&ready);
    assert_eq!((step.status, step.attempts), (StepStatus::Succeeded, 1));
    assert!(step.extra.get("lease_expires_at").is_none(), "{step:?}");
    let expected = json!({
        "invoice": format!("inv-{id}"),
        "customer": "Acme",
        "amount_cents": 1500,
        "attempt": 1,
        "after": ["a"],
    });
    let data = env.client.data(&id).await.expect("data");
    assert_eq!(data.outputs["bill"], expected);
    // The next step got the worker's output as its input.
    let calls = env.downstream.calls_for(&step_path(TYPE, "c"), &id);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].body.as_ref().unwrap()["outputs"]["bill"], expected);
    let events = env.events(&id).await;
    let started: Vec<&Event> = of_bill(&events, "step_started").collect();
    assert_eq!(started.len(), 1, "{events:#?}");
    assert_eq!(started[0].detail["worker"], "billing-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_a_task_past_its_lease() {
    // The lease is 1 s (the timeout) plus 1 s (the test config's grace);
    // the handler takes 3 s.
    let mut env = Env::start(|s| s.timeout("1s")).await;
    let _worker = env.worker(&["--sleep-ms", "3000"]).await;
    let id = env.submit(json!({"amount_cents": 5})).await;
    let ready = env.wait_status(&id, EntityStatus::Ready).await;
    let step = bill(&ready);
    assert_eq!((step.status, step.attempts), (StepStatus::Succeeded, 1));
    let events = env.events(&id).await;
    assert_eq!(of_bill(&events, "step_started").count(), 1, "{events:#?}");
    assert_eq!(of_bill(&events, "attempt_failed").count(), 0, "{events:#?}");
    let started = of_bill(&events, "step_started").next().unwrap();
    let succeeded = of_bill(&events, "step_succeeded").next().unwrap();
    let held = time(&succeeded.at)
        .duration_since(time(&started.at))
        .unwrap();
    assert!(held >= Duration::from_secs(3), "the task was held {held:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_task_goes_to_the_next_worker_after_its_lease() {
    let mut env = Env::start(|s| s.timeout("2s")).await;
    let mut first = env
        .worker(&["--worker-id", "w-1", "--sleep-ms", "60000"])
        .await;
    let id = env.submit(json!({"amount_cents": 7})).await;
    let held = env.wait_held_by(&id, "w-1").await;
    first.kill();
    let killed_at = SystemTime::now();
    // Heartbeats may have moved the lease on; the view says where to.
    let lease_end = time(bill(&held).extra["lease_expires_at"].as_str().unwrap());
    let _second = env.worker(&["--worker-id", "w-2"]).await;

    let ready = env.wait_status(&id, EntityStatus::Ready).await;
    let step = bill(&ready);
    assert_eq!((step.status, step.attempts), (StepStatus::Succeeded, 2));
    let data = env.client.data(&id).await.expect("data");
    assert_eq!(data.outputs["bill"]["attempt"], 2);
    let events = env.events(&id).await;
    let lost: Vec<&Event> = of_bill(&events, "attempt_failed").collect();
    assert_eq!(lost.len(), 1, "{events:#?}");
    assert!(lost[0].detail.get("lost").is_some(), "{:?}", lost[0]);
    let started: Vec<&Event> = of_bill(&events, "step_started").collect();
    assert_eq!(started.len(), 2, "{events:#?}");
    assert_eq!(started[0].detail["worker"], "w-1");
    assert_eq!(started[1].detail["worker"], "w-2");
    // Taken over only once the dead worker's lease had run out.
    let taken_over = time(&started[1].at);
    assert!(
        taken_over >= lease_end.max(killed_at) - Duration::from_millis(50),
        "taken over at {} before the lease ended at {:?}",
        started[1].at,
        lease_end
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_running_task_finish_and_report() {
    let mut env = Env::start(|s| s).await;
    let mut worker = env
        .worker(&["--worker-id", "w-term", "--sleep-ms", "2000"])
        .await;
    let id = env.submit(json!({"amount_cents": 9})).await;
    env.wait_held_by(&id, "w-term").await;
    let signalled = Instant::now();
    worker.sigterm();
    let status = worker
        .wait_exit(PATIENCE)
        .await
        .expect("the worker exits after SIGTERM");
    assert!(status.success(), "exit status {status}\n{}", worker.log());
    // It waited for the handler rather than dropping it.
    assert!(signalled.elapsed() >= Duration::from_millis(500));
    // No other worker runs: the result the stopping worker reported is
    // what moves the entity on.
    let view = env.client.get(&id).await.expect("get");
    let step = bill(&view);
    assert_eq!(
        (step.status, step.attempts),
        (StepStatus::Succeeded, 1),
        "{view:#?}"
    );
    env.wait_status(&id, EntityStatus::Ready).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_abandons_a_task_that_outlives_the_grace() {
    let mut env = Env::start(|s| s.timeout("2s")).await;
    let mut worker = env
        .worker(&[
            "--worker-id",
            "w-slow",
            "--sleep-ms",
            "60000",
            "--grace-ms",
            "300",
        ])
        .await;
    let id = env.submit(json!({"amount_cents": 1})).await;
    env.wait_held_by(&id, "w-slow").await;
    let signalled = Instant::now();
    worker.sigterm();
    let status = worker.wait_exit(PATIENCE).await.expect("the worker exits");
    assert!(status.success(), "exit status {status}\n{}", worker.log());
    assert!(signalled.elapsed() < Duration::from_secs(5));
    // Nothing was reported: the step is still the abandoned attempt's.
    let view = env.client.get(&id).await.expect("get");
    assert_eq!(
        (bill(&view).status, bill(&view).attempts),
        (StepStatus::Running, 1),
        "{view:#?}"
    );
    let events = env.events(&id).await;
    assert_eq!(of_bill(&events, "step_succeeded").count(), 0);
    assert_eq!(of_bill(&events, "attempt_failed").count(), 0);
    // A new worker takes it over once the lease ran out, as a new attempt.
    let _next = env.worker(&["--worker-id", "w-next"]).await;
    let ready = env.wait_status(&id, EntityStatus::Ready).await;
    assert_eq!(bill(&ready).attempts, 2);
    let events = env.events(&id).await;
    let lost: Vec<&Event> = of_bill(&events, "attempt_failed").collect();
    assert!(
        lost.len() == 1 && lost[0].detail.get("lost").is_some(),
        "{events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_error_fails_the_step_for_good_on_its_first_attempt() {
    let mut env = Env::start(|s| s.attempts(5)).await;
    let _worker = env.worker(&["--fail", "fatal"]).await;
    let id = env.submit(json!({"amount_cents": 3})).await;
    let failed = env.wait_status(&id, EntityStatus::Failed).await;
    let step = bill(&failed);
    assert_eq!(
        (step.status, step.attempts),
        (StepStatus::Failed, 1),
        "{failed:#?}"
    );
    let error = step.last_error.as_deref().unwrap_or_default();
    assert!(
        error.contains(&format!("card declined for entity {id}")),
        "{error:?}"
    );
    assert_eq!(failed.step("c").unwrap().status, StepStatus::Skipped);
    assert!(env
        .downstream
        .calls_for(&step_path(TYPE, "c"), &id)
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_error_is_retried_within_the_budget() {
    let mut env = Env::start(|s| s.attempts(3)).await;
    let _worker = env.worker(&["--fail", "retryable"]).await;
    let id = env.submit(json!({})).await;
    let failed = env.wait_status(&id, EntityStatus::Failed).await;
    let step = bill(&failed);
    assert_eq!(
        (step.status, step.attempts),
        (StepStatus::Failed, 3),
        "{failed:#?}"
    );
    assert!(step
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("the payment provider is busy")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_of_an_unknown_queue_stops_with_an_error() {
    let env = Env::start(|s| s).await;
    let (_, billing) = binaries();
    let url = env.server.url();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(billing)
            .arg("no-such-queue")
            .env("RIPEN_URL", url)
            .output()
    })
    .await
    .unwrap()
    .expect("run the billing worker");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no worker queue \"no-such-queue\""),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("worker ready"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_waits_out_an_unreachable_server() {
    // Start the worker first, against a server that is not there yet; it
    // keeps trying (backoff) and serves the queue once the server is up.
    let (ripen, billing) = binaries();
    let downstream = Downstream::start().await;
    let url = |step: &str| downstream.url(&step_path(TYPE, step));
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = TempDir::new("ripen-worker-sdk-").unwrap();
    let config = Config::new()
        .listen(&format!("127.0.0.1:{port}"))
        .with_type(TypeDef::new(
            TYPE,
            vec![
                Step::http("a", url("a")),
                Step::worker("bill", QUEUE).needs(&["a"]),
            ],
        ))
        .write(dir.path(), &storage_url(dir.path()))
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let log = dir.path().join("worker.log");
    let worker = tokio::spawn({
        let (billing, base, log) = (billing.clone(), base.clone(), log.clone());
        async move {
            WorkerProcess::start(&billing, &[QUEUE], &[("RIPEN_URL", base.as_str())], &log).await
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let server = ServerProcess::start(ripen, &config, &dir.path().join("server.log"))
        .await
        .expect("start ripen serve");
    let _worker = worker.await.unwrap().expect("the worker becomes ready");
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("claim failed"), "{log_text}");
    let client = server.client();
    let id = client
        .submit(TYPE, "{}", None)
        .await
        .expect("submit")
        .view
        .id;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let view = client.get(&id).await.unwrap();
        if view.status == EntityStatus::Ready {
            break;
        }
        assert!(Instant::now() < deadline, "{view:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
