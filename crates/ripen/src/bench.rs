//! `ripen bench`: measures a real `ripen serve` process on loopback against the
//! performance targets of DESIGN.md.
//!
//! Each run starts a fresh server on a fresh SQLite file with the five-step
//! `w5` pipeline pointed at a no-op fake downstream, floods intake from many
//! client tasks, waits until every entity has settled and reads the server's
//! own timestamps to compute pipeline throughput and latency. Every error is
//! counted and printed, and a run with errors makes the command fail.
//!
//! This module also holds [`ServerProcess`], the guard around a `ripen serve`
//! child that `ripen demo` uses too.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use hyper::StatusCode;
use serde::Deserialize;
use tokio::task::JoinSet;

use crate::client::Client;
use crate::downstream::{self, Profile};

/// How long a server may take to print its "listening on" line.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the pipeline may take to settle every entity of one run.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(600);
/// How often to ask whether anything is still pending.
const SETTLE_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// The page size used to read every entity back.
const LIST_PAGE_LIMIT: usize = 1000;
/// Entities submitted one at a time, each after the previous one settled, to
/// measure submit-to-ready latency on an idle server.
const UNLOADED_PROBE_ENTITIES: usize = 20;
/// How often the unloaded probe asks for its entity.
const UNLOADED_PROBE_POLL_INTERVAL: Duration = Duration::from_millis(1);
/// How long one probe entity may take to settle.
const UNLOADED_PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// The unit of the CPU times in /proc/PID/stat (`USER_HZ`), 100 on every
/// Linux architecture in use.
const CLOCK_TICKS_PER_S: f64 = 100.0;
/// The server's default body limit; larger payloads need a configured one.
const DEFAULT_BODY_LIMIT_BYTES: usize = 1024 * 1024;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Entities to submit in each run.
    #[arg(long, default_value_t = 5000)]
    entities: usize,
    /// Concurrent client tasks submitting them.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Runs, each on a fresh server and database; the summary shows their median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The approximate size of each submitted JSON payload.
    #[arg(long, default_value_t = 1024)]
    payload_bytes: usize,
    /// Measure intake only; do not wait for the pipelines.
    #[arg(long)]
    intake_only: bool,
}

pub async fn run(args: BenchArgs) -> Result<()> {
    ensure!(args.entities >= 1, "--entities must be at least 1");
    ensure!(args.clients >= 1, "--clients must be at least 1");
    ensure!(args.runs >= 1, "--runs must be at least 1");
    ensure!(
        args.payload_bytes <= 32 * 1024 * 1024,
        "--payload-bytes must be at most 32 MiB"
    );
    println!(
        "ripen bench: {} entities x {} runs, {} clients, ~{} B payloads, SQLite (durable), no-op downstream",
        group(args.entities as f64),
        args.runs,
        args.clients,
        args.payload_bytes
    );
    println!("pipeline w5: a; b and c after a; d after b and c; e (non-critical) after a");
    if args.intake_only {
        println!("intake only: the pipelines are not awaited");
    }
    println!();

    let pad = Arc::new(
        std::iter::repeat_with(fastrand::alphanumeric)
            .take(args.payload_bytes)
            .collect::<String>(),
    );
    let mut runs = Vec::with_capacity(args.runs);
    for run in 1..=args.runs {
        let result = run_once(&args, &pad)
            .await
            .with_context(|| format!("bench run {run}"))?;
        println!("run {run}/{}: {}", args.runs, result.line());
        for (kind, error) in &result.errors.kinds {
            println!("  error: {kind} x{}: {}", error.count, error.sample);
        }
        runs.push(result);
    }
    println!();
    print_summary(&runs);

    let errors: u64 = runs.iter().map(|r| r.errors.total()).sum();
    if errors > 0 {
        bail!("{errors} errors over {} runs (listed above)", runs.len());
    }
    Ok(())
}

/// The figures of one run.
struct RunResult {
    intake_acks_per_s: f64,
    intake_p50: Duration,
    intake_p99: Duration,
    half_rate: Option<HalfRate>,
    pipeline: Option<PipelineFigures>,
    peak_rss_bytes: Option<u64>,
    /// CPU cores busy during the full-rate intake: the server's and the bench's
    /// own (its clients and the fake downstream), where /proc has them.
    intake_cpu: Option<(f64, f64)>,
    downstream_calls: u64,
    errors: Errors,
}

struct HalfRate {
    rate_per_s: f64,
    p99: Duration,
}

struct PipelineFigures {
    ready_per_s: f64,
    submit_to_ready_p50: Duration,
    submit_to_ready_p99: Duration,
    unloaded_p50: Option<Duration>,
}

impl RunResult {
    fn line(&self) -> String {
        let mut line = format!(
            "intake {} acks/s (p50 {}, p99 {}",
            group(self.intake_acks_per_s),
            ms(self.intake_p50),
            ms(self.intake_p99)
        );
        if let Some(half) = &self.half_rate {
            let _ = write!(
                line,
                "; at {}/s p99 {}",
                group(half.rate_per_s),
                ms(half.p99)
            );
        }
        line.push(')');
        if let Some(p) = &self.pipeline {
            let _ = write!(
                line,
                " | ready {}/s (submit->ready p50 {}, p99 {}",
                group(p.ready_per_s),
                ms(p.submit_to_ready_p50),
                ms(p.submit_to_ready_p99)
            );
            if let Some(unloaded) = p.unloaded_p50 {
                let _ = write!(line, "; unloaded p50 {}", ms(unloaded));
            }
            line.push(')');
        }
        if let Some((server, bench)) = self.intake_cpu {
            let _ = write!(
                line,
                " | intake CPU: server {server:.2}, bench {bench:.2} cores"
            );
        }
        match self.peak_rss_bytes {
            Some(bytes) => {
                let _ = write!(line, " | peak RSS {:.1} MiB", mib(bytes));
            }
            None => line.push_str(" | peak RSS n/a"),
        }
        let _ = write!(
            line,
            " | {} downstream calls | errors: {}",
            group(self.downstream_calls as f64),
            self.errors.total()
        );
        line
    }
}

/// Errors by kind, each with its first example.
#[derive(Default)]
struct Errors {
    kinds: BTreeMap<String, ErrorKind>,
}

struct ErrorKind {
    count: u64,
    sample: String,
}

impl Errors {
    fn add(&mut self, kind: impl Into<String>, sample: impl Into<String>) {
        self.add_many(kind, 1, sample);
    }

    fn add_many(&mut self, kind: impl Into<String>, count: u64, sample: impl Into<String>) {
        if count == 0 {
            return;
        }
        self.kinds
            .entry(kind.into())
            .or_insert_with(|| ErrorKind {
                count: 0,
                sample: sample.into(),
            })
            .count += count;
    }

    fn merge(&mut self, other: Errors) {
        for (kind, error) in other.kinds {
            self.add_many(kind, error.count, error.sample);
        }
    }

    fn total(&self) -> u64 {
        self.kinds.values().map(|e| e.count).sum()
    }
}

async fn run_once(args: &BenchArgs, pad: &Arc<String>) -> Result<RunResult> {
    let (downstream_addr, downstream_stats) = downstream::spawn(Profile::noop()).await?;
    // Declared before the server so that it is removed after the server is
    // killed.
    let dir = tempfile::Builder::new()
        .prefix("ripen-bench-")
        .tempdir()
        .context("create the bench's temporary directory")?;
    let config_path = dir.path().join("ripen.toml");
    std::fs::write(
        &config_path,
        w5_config(dir.path(), downstream_addr, args.payload_bytes),
    )
    .with_context(|| format!("write {}", config_path.display()))?;
    let mut server = ServerProcess::start(&config_path, &dir.path().join("server.log")).await?;
    let client = Client::new(server.url());
    let mut errors = Errors::default();
    let nonce = fastrand::u64(..);

    let cpu_before = (server.cpu_ticks(), cpu_ticks("self"));
    let intake = submit_phase(
        &client,
        SubmitPlan {
            key_prefix: format!("bench-{nonce:016x}-full"),
            count: args.entities,
            clients: args.clients,
            rate_per_s: None,
        },
        pad,
        args.payload_bytes,
    )
    .await;
    let intake_cpu = match (cpu_before, (server.cpu_ticks(), cpu_ticks("self"))) {
        ((Some(server0), Some(bench0)), (Some(server1), Some(bench1))) => {
            let wall_s = intake.wall.as_secs_f64().max(1e-6);
            let cores = |ticks: u64| ticks as f64 / CLOCK_TICKS_PER_S / wall_s;
            Some((cores(server1 - server0), cores(bench1 - bench0)))
        }
        _ => None,
    };
    let accepted = intake.accepted;
    let intake_acks_per_s = accepted as f64 / intake.wall.as_secs_f64();
    let mut intake_latencies = intake.latencies;
    intake_latencies.sort_unstable();
    errors.merge(intake.errors);
    server.check_alive()?;

    let pipeline = if args.intake_only {
        None
    } else {
        let figures = measure_pipeline(&client, &mut server, accepted, &mut errors).await?;
        Some(figures)
    };

    // Intake latency at half the measured rate, on a server that is otherwise
    // idle; the target's p99 is stated at that rate.
    let half_rate = if accepted > 0 && intake_acks_per_s.is_finite() {
        let rate_per_s = intake_acks_per_s / 2.0;
        let phase = submit_phase(
            &client,
            SubmitPlan {
                key_prefix: format!("bench-{nonce:016x}-half"),
                count: (args.entities / 2).max(1),
                clients: args.clients,
                rate_per_s: Some(rate_per_s),
            },
            pad,
            args.payload_bytes,
        )
        .await;
        errors.merge(phase.errors);
        let mut latencies = phase.latencies;
        latencies.sort_unstable();
        Some(HalfRate {
            rate_per_s,
            p99: percentile(&latencies, 0.99),
        })
    } else {
        None
    };

    server.check_alive()?;
    let peak_rss_bytes = server.peak_rss_bytes();
    server.stop();

    errors.add_many(
        "downstream contract violations",
        downstream_stats.contract_violations(),
        downstream_stats.first_violation().unwrap_or_default(),
    );
    Ok(RunResult {
        intake_acks_per_s,
        intake_p50: percentile(&intake_latencies, 0.50),
        intake_p99: percentile(&intake_latencies, 0.99),
        half_rate,
        pipeline,
        peak_rss_bytes,
        intake_cpu,
        downstream_calls: downstream_stats.requests(),
        errors,
    })
}

/// Waits until nothing is pending, reads every entity back and measures the
/// pipeline from the server's timestamps, then probes the idle latency.
async fn measure_pipeline(
    client: &Client,
    server: &mut ServerProcess,
    accepted: usize,
    errors: &mut Errors,
) -> Result<PipelineFigures> {
    wait_until_settled(client, server).await?;

    let entities = list_all(client, "w5", errors).await?;
    if entities.len() != accepted {
        errors.add(
            "entity count mismatch",
            format!(
                "GET /v1/entities?type=w5 listed {} entities, {} were acknowledged with 202",
                entities.len(),
                accepted
            ),
        );
    }
    let mut first_created: Option<SystemTime> = None;
    let mut last_ready: Option<SystemTime> = None;
    let mut latencies = Vec::with_capacity(entities.len());
    for entity in &entities {
        let created = match parse_time(&entity.created_at) {
            Ok(created) => created,
            Err(error) => {
                errors.add("bad created_at", format!("entity {}: {error:#}", entity.id));
                continue;
            }
        };
        first_created = Some(first_created.map_or(created, |t| t.min(created)));
        if entity.status != "ready" {
            errors.add(
                format!("entity {}", entity.status),
                format!(
                    "entity {} settled as {}: {}",
                    entity.id,
                    entity.status,
                    entity.failed_steps()
                ),
            );
            continue;
        }
        if entity.degraded {
            errors.add(
                "entity degraded",
                format!(
                    "entity {} is ready but degraded: {}",
                    entity.id,
                    entity.failed_steps()
                ),
            );
        }
        let Some(ready_at) = entity.ready_at.as_deref() else {
            errors.add("ready without ready_at", format!("entity {}", entity.id));
            continue;
        };
        let ready = match parse_time(ready_at) {
            Ok(ready) => ready,
            Err(error) => {
                errors.add("bad ready_at", format!("entity {}: {error:#}", entity.id));
                continue;
            }
        };
        last_ready = Some(last_ready.map_or(ready, |t| t.max(ready)));
        match ready.duration_since(created) {
            Ok(latency) => latencies.push(latency),
            Err(_) => errors.add(
                "ready_at before created_at",
                format!(
                    "entity {}: created {}, ready {ready_at}",
                    entity.id, entity.created_at
                ),
            ),
        }
    }
    latencies.sort_unstable();
    let ready_per_s = match (first_created, last_ready) {
        (Some(first), Some(last)) => {
            let span = last.duration_since(first).unwrap_or_default();
            latencies.len() as f64 / span.as_secs_f64().max(1e-6)
        }
        _ => 0.0,
    };
    let unloaded = probe_unloaded(client, errors).await?;
    Ok(PipelineFigures {
        ready_per_s,
        submit_to_ready_p50: percentile(&latencies, 0.50),
        submit_to_ready_p99: percentile(&latencies, 0.99),
        unloaded_p50: (!unloaded.is_empty()).then(|| percentile(&unloaded, 0.50)),
    })
}

struct SubmitPlan {
    key_prefix: String,
    count: usize,
    clients: usize,
    /// `None` submits as fast as the server answers; otherwise requests are
    /// spread evenly at this overall rate.
    rate_per_s: Option<f64>,
}

struct SubmitOutcome {
    accepted: usize,
    wall: Duration,
    /// One per acknowledged request, unsorted.
    latencies: Vec<Duration>,
    errors: Errors,
}

async fn submit_phase(
    client: &Client,
    plan: SubmitPlan,
    pad: &Arc<String>,
    payload_bytes: usize,
) -> SubmitOutcome {
    let next = Arc::new(AtomicUsize::new(0));
    let plan = Arc::new(plan);
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..plan.clients.min(plan.count) {
        let client = client.clone();
        let next = next.clone();
        let plan = plan.clone();
        let pad = pad.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(plan.count / plan.clients + 1);
            let mut errors = Errors::default();
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= plan.count {
                    break;
                }
                if let Some(rate) = plan.rate_per_s {
                    let due = started + Duration::from_secs_f64(seq as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let key = format!("{}-{seq}", plan.key_prefix);
                let body = bench_payload(seq, &pad, payload_bytes);
                let sent = Instant::now();
                match client
                    .post("/v1/entities/w5", &[("Idempotency-Key", &key)], body)
                    .await
                {
                    Ok(reply) if reply.status == StatusCode::ACCEPTED => {
                        latencies.push(sent.elapsed())
                    }
                    Ok(reply) => errors.add(
                        format!("intake answered {}", reply.status.as_u16()),
                        format!("POST /v1/entities/w5: {}", snippet(&reply.body)),
                    ),
                    Err(error) => errors.add("intake request failed", format!("{error:#}")),
                }
            }
            (latencies, errors)
        });
    }
    let mut latencies = Vec::with_capacity(plan.count);
    let mut errors = Errors::default();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((task_latencies, task_errors)) => {
                latencies.extend(task_latencies);
                errors.merge(task_errors);
            }
            Err(error) => errors.add("client task panicked", error.to_string()),
        }
    }
    SubmitOutcome {
        accepted: latencies.len(),
        wall: started.elapsed(),
        latencies,
        errors,
    }
}

/// A JSON object of about `target_bytes` bytes.
fn bench_payload(seq: usize, pad: &str, target_bytes: usize) -> String {
    let head = format!("{{\"seq\":{seq},\"name\":\"bench entity {seq}\",\"pad\":\"");
    let tail = "\"}";
    let fill = target_bytes
        .saturating_sub(head.len() + tail.len())
        .min(pad.len());
    let mut body = String::with_capacity(head.len() + fill + tail.len());
    body.push_str(&head);
    body.push_str(&pad[..fill]);
    body.push_str(tail);
    body
}

async fn wait_until_settled(client: &Client, server: &mut ServerProcess) -> Result<()> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let reply = client
            .get("/v1/entities?status=pending&limit=1")
            .await
            .context("ask for pending entities")?;
        ensure!(
            reply.status == StatusCode::OK,
            "GET /v1/entities?status=pending&limit=1 answered {}: {}",
            reply.status,
            snippet(&reply.body)
        );
        let page: ListPage = serde_json::from_slice(&reply.body).with_context(|| {
            format!(
                "parse the answer to GET /v1/entities?status=pending: {}",
                snippet(&reply.body)
            )
        })?;
        if page.items.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "entities were still pending after {} (for example {})",
                humantime::format_duration(SETTLE_TIMEOUT),
                page.items[0].id
            );
        }
        server.check_alive()?;
        tokio::time::sleep(SETTLE_POLL_INTERVAL).await;
    }
}

/// Reads every entity of a type, page by page.
async fn list_all(
    client: &Client,
    type_name: &str,
    errors: &mut Errors,
) -> Result<Vec<EntityView>> {
    let mut entities = Vec::new();
    let mut seen = HashSet::new();
    let mut cursors = HashSet::new();
    let mut after: Option<String> = None;
    loop {
        let mut path = format!("/v1/entities?type={type_name}&limit={LIST_PAGE_LIMIT}");
        if let Some(cursor) = &after {
            path.push_str("&after=");
            path.push_str(&percent_encode(cursor));
        }
        let reply = client
            .get(&path)
            .await
            .with_context(|| format!("list entities: GET {path}"))?;
        ensure!(
            reply.status == StatusCode::OK,
            "GET {path} answered {}: {}",
            reply.status,
            snippet(&reply.body)
        );
        let page: ListPage = serde_json::from_slice(&reply.body)
            .with_context(|| format!("parse the answer to GET {path}: {}", snippet(&reply.body)))?;
        ensure!(
            page.items.len() <= LIST_PAGE_LIMIT,
            "GET {path} returned {} items, more than the limit",
            page.items.len()
        );
        for entity in page.items {
            if seen.insert(entity.id.clone()) {
                entities.push(entity);
            } else {
                errors.add(
                    "entity listed twice",
                    format!(
                        "entity {} appeared twice while paging (at {path})",
                        entity.id
                    ),
                );
            }
        }
        match page.next.and_then(cursor_string) {
            None => return Ok(entities),
            Some(cursor) => {
                ensure!(
                    cursors.insert(cursor.clone()),
                    "GET {path} returned the cursor {cursor:?} a second time; paging would never end"
                );
                after = Some(cursor);
            }
        }
    }
}

/// Submits entities one at a time, each after the previous one settled, and
/// returns their server-side submit-to-ready latencies, sorted.
async fn probe_unloaded(client: &Client, errors: &mut Errors) -> Result<Vec<Duration>> {
    let mut latencies = Vec::with_capacity(UNLOADED_PROBE_ENTITIES);
    let nonce = fastrand::u64(..);
    for seq in 0..UNLOADED_PROBE_ENTITIES {
        let key = format!("bench-{nonce:016x}-probe-{seq}");
        let body = serde_json::json!({"seq": seq, "name": "probe"}).to_string();
        let reply = client
            .post("/v1/entities/w5", &[("Idempotency-Key", &key)], body)
            .await
            .context("submit a probe entity")?;
        if reply.status != StatusCode::ACCEPTED {
            errors.add(
                format!("intake answered {}", reply.status.as_u16()),
                format!("POST /v1/entities/w5 (probe): {}", snippet(&reply.body)),
            );
            continue;
        }
        let accepted: EntityView = serde_json::from_slice(&reply.body)
            .with_context(|| format!("parse the 202 answer: {}", snippet(&reply.body)))?;
        let path = format!("/v1/entities/{}", accepted.id);
        let deadline = Instant::now() + UNLOADED_PROBE_TIMEOUT;
        let entity = loop {
            let reply = client
                .get(&path)
                .await
                .with_context(|| format!("GET {path}"))?;
            ensure!(
                reply.status == StatusCode::OK,
                "GET {path} answered {}: {}",
                reply.status,
                snippet(&reply.body)
            );
            let entity: EntityView = serde_json::from_slice(&reply.body).with_context(|| {
                format!("parse the answer to GET {path}: {}", snippet(&reply.body))
            })?;
            if entity.status != "pending" {
                break entity;
            }
            ensure!(
                Instant::now() < deadline,
                "probe entity {} still pending after {}",
                accepted.id,
                humantime::format_duration(UNLOADED_PROBE_TIMEOUT)
            );
            tokio::time::sleep(UNLOADED_PROBE_POLL_INTERVAL).await;
        };
        match entity.submit_to_ready() {
            Ok(latency) => latencies.push(latency),
            Err(error) => errors.add("probe entity not ready", format!("{error:#}")),
        }
    }
    latencies.sort_unstable();
    Ok(latencies)
}

fn w5_config(dir: &Path, downstream: std::net::SocketAddr, payload_bytes: usize) -> String {
    let db = format!("sqlite://{}", dir.join("ripen.db").display());
    let mut config = String::new();
    let _ = writeln!(config, "[server]\nlisten = \"127.0.0.1:0\"");
    // Leave room for the JSON around the padding.
    let body_limit_bytes = payload_bytes * 2 + 4096;
    if body_limit_bytes > DEFAULT_BODY_LIMIT_BYTES {
        let _ = writeln!(config, "body_limit_bytes = {body_limit_bytes}");
    }
    let _ = writeln!(config, "\n[storage]\nurl = {}\n", toml_string(&db));
    let _ = writeln!(config, "[types.w5]");
    let steps: [(&str, &[&str], bool); 5] = [
        ("a", &[], true),
        ("b", &["a"], true),
        ("c", &["a"], true),
        ("d", &["b", "c"], true),
        ("e", &["a"], false),
    ];
    for (name, needs, critical) in steps {
        let needs: Vec<String> = needs.iter().map(|n| toml_string(n)).collect();
        let _ = writeln!(
            config,
            "\n[[types.w5.steps]]\nname = \"{name}\"\nhttp = \"http://{downstream}/{name}\"\nneeds = [{}]\ncritical = {critical}\ntimeout = \"10s\"",
            needs.join(", ")
        );
    }
    config
}

/// A TOML basic string. JSON's string escapes are all valid in TOML.
pub fn toml_string(value: &str) -> String {
    serde_json::Value::from(value).to_string()
}

/// The nearest-rank percentile of sorted values; zero when there are none.
fn percentile(sorted: &[Duration], quantile: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn print_summary(runs: &[RunResult]) {
    struct Row {
        figure: &'static str,
        values: Vec<f64>,
        decimals: usize,
        target: &'static str,
        /// Whether a median meets the target; `None` when there is no target.
        meets: Option<fn(f64) -> bool>,
    }
    let durations = |f: &dyn Fn(&RunResult) -> Option<Duration>| -> Vec<f64> {
        runs.iter()
            .filter_map(f)
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect()
    };
    let rows = [
        Row {
            figure: "intake (acks/s)",
            values: runs.iter().map(|r| r.intake_acks_per_s).collect(),
            decimals: 0,
            target: ">= 20,000",
            meets: Some(|v| v >= 20_000.0),
        },
        Row {
            figure: "intake latency p50 (ms)",
            values: durations(&|r| Some(r.intake_p50)),
            decimals: 2,
            target: "",
            meets: None,
        },
        Row {
            figure: "intake latency p99 (ms)",
            values: durations(&|r| Some(r.intake_p99)),
            decimals: 2,
            target: "(<= 5 at half rate)",
            meets: None,
        },
        Row {
            figure: "intake p99 at half rate (ms)",
            values: durations(&|r| r.half_rate.as_ref().map(|h| h.p99)),
            decimals: 2,
            target: "<= 5",
            meets: Some(|v| v <= 5.0),
        },
        Row {
            figure: "entities ready/s",
            values: runs
                .iter()
                .filter_map(|r| r.pipeline.as_ref().map(|p| p.ready_per_s))
                .collect(),
            decimals: 0,
            target: ">= 3,000",
            meets: Some(|v| v >= 3_000.0),
        },
        Row {
            figure: "submit->ready p50 (ms)",
            values: durations(&|r| r.pipeline.as_ref().map(|p| p.submit_to_ready_p50)),
            decimals: 2,
            target: "(<= 10 unloaded)",
            meets: None,
        },
        Row {
            figure: "submit->ready p99 (ms)",
            values: durations(&|r| r.pipeline.as_ref().map(|p| p.submit_to_ready_p99)),
            decimals: 2,
            target: "",
            meets: None,
        },
        Row {
            figure: "submit->ready p50 unloaded (ms)",
            values: durations(&|r| r.pipeline.as_ref().and_then(|p| p.unloaded_p50)),
            decimals: 2,
            target: "<= 10",
            meets: Some(|v| v <= 10.0),
        },
        Row {
            figure: "peak RSS (MiB)",
            values: runs
                .iter()
                .filter_map(|r| r.peak_rss_bytes.map(mib))
                .collect(),
            decimals: 1,
            target: "<= 256 (at 1M entities)",
            meets: Some(|v| v <= 256.0),
        },
    ];

    println!(
        "{:<32} {:>10} {:>10} {:>10}  {:<24} meets",
        "figure", "median", "min", "max", "target"
    );
    for row in rows.iter().filter(|row| !row.values.is_empty()) {
        let mut values = row.values.clone();
        values.sort_by(f64::total_cmp);
        let median = if values.len() % 2 == 1 {
            values[values.len() / 2]
        } else {
            (values[values.len() / 2 - 1] + values[values.len() / 2]) / 2.0
        };
        let show = |v: f64| {
            if row.decimals == 0 {
                group(v)
            } else {
                format!("{v:.prec$}", prec = row.decimals)
            }
        };
        let verdict = match row.meets {
            Some(meets) if meets(median) => "yes",
            Some(_) => "NO",
            None => "",
        };
        let line = format!(
            "{:<32} {:>10} {:>10} {:>10}  {:<24} {}",
            row.figure,
            show(median),
            show(values[0]),
            show(values[values.len() - 1]),
            row.target,
            verdict
        );
        println!("{}", line.trim_end());
    }
    let errors: u64 = runs.iter().map(|r| r.errors.total()).sum();
    println!("{:<32} {:>10}", "errors (all runs)", errors);
}

/// Milliseconds with two decimals and the unit.
fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A number rounded to an integer, with thousands separated by commas.
fn group(value: f64) -> String {
    if !value.is_finite() {
        return value.to_string();
    }
    let digits = format!("{:.0}", value.abs());
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if value < -0.5 {
        out.push('-');
    }
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// The start of an answer's body, for error messages.
pub fn snippet(body: &[u8]) -> String {
    const SNIPPET_CHARS_MAX: usize = 300;
    let text = String::from_utf8_lossy(body);
    let mut snippet: String = text.chars().take(SNIPPET_CHARS_MAX).collect();
    if text.chars().count() > SNIPPET_CHARS_MAX {
        snippet.push('…');
    }
    snippet
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// The CPU time (user and system, all threads) a process has used so far, in
/// clock ticks, where /proc has it; `pid` may be "self".
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces; the fields after it
    // start with the third, the state, so utime and stime (the 14th and 15th)
    // are at 11 and 12.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

pub fn parse_time(value: &str) -> Result<SystemTime> {
    humantime::parse_rfc3339(value)
        .with_context(|| format!("{value:?} is not an RFC 3339 UTC time"))
}

/// One page of `GET /v1/entities`.
#[derive(Deserialize)]
pub struct ListPage {
    pub items: Vec<EntityView>,
    #[serde(default)]
    pub next: Option<serde_json::Value>,
}

/// The list cursor as a string, whether the server sends a string or a number.
pub fn cursor_string(next: serde_json::Value) -> Option<String> {
    match next {
        serde_json::Value::Null => None,
        serde_json::Value::String(cursor) => Some(cursor),
        other => Some(other.to_string()),
    }
}

/// The parts of the entity view (API.md) the bench and the demo read.
#[derive(Deserialize, Clone)]
pub struct EntityView {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub degraded: bool,
    pub created_at: String,
    #[serde(default)]
    pub updated_at: Option<String>,
    #[serde(default)]
    pub ready_at: Option<String>,
    #[serde(default)]
    pub steps: Vec<StepView>,
}

#[derive(Deserialize, Clone)]
pub struct StepView {
    pub name: String,
    pub status: String,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub last_error: Option<serde_json::Value>,
}

impl EntityView {
    pub fn is_terminal(&self) -> bool {
        matches!(self.status.as_str(), "ready" | "failed" | "cancelled")
    }

    /// `ready_at − created_at`; an error unless the entity is ready.
    pub fn submit_to_ready(&self) -> Result<Duration> {
        ensure!(
            self.status == "ready",
            "entity {} is {}: {}",
            self.id,
            self.status,
            self.failed_steps()
        );
        let ready_at = self
            .ready_at
            .as_deref()
            .with_context(|| format!("entity {} is ready without ready_at", self.id))?;
        let created = parse_time(&self.created_at)?;
        let ready = parse_time(ready_at)?;
        ready.duration_since(created).with_context(|| {
            format!(
                "entity {}: ready_at {ready_at} is before created_at {}",
                self.id, self.created_at
            )
        })
    }

    /// The steps that failed or were skipped, with their last error, for
    /// messages; "no failed step" when there is none.
    pub fn failed_steps(&self) -> String {
        let failed: Vec<String> = self
            .steps
            .iter()
            .filter(|s| s.status == "failed" || s.status == "skipped")
            .map(|s| match &s.last_error {
                Some(serde_json::Value::Null) | None => format!("{} {}", s.name, s.status),
                Some(serde_json::Value::String(e)) => format!("{} {} ({e})", s.name, s.status),
                Some(e) => format!("{} {} ({e})", s.name, s.status),
            })
            .collect();
        if failed.is_empty() {
            "no failed step".to_owned()
        } else {
            failed.join(", ")
        }
    }
}

/// A `ripen serve` child process. Dropping it kills the process, so that no
/// server outlives the command that started it, whatever way it ends.
pub struct ServerProcess {
    child: Child,
    url: String,
    log_path: PathBuf,
}

impl ServerProcess {
    /// Runs `ripen serve --config CONFIG` from this very binary, with its
    /// standard error (and any standard output after the first line) written
    /// to `log_path`, and waits for its "listening on" line.
    pub async fn start(config: &Path, log_path: &Path) -> Result<ServerProcess> {
        let exe = std::env::current_exe().context("find the ripen executable")?;
        let log = std::fs::File::create(log_path)
            .with_context(|| format!("create the server log {}", log_path.display()))?;
        let mut stdout_log = log.try_clone().context("share the server log")?;
        let mut child = Command::new(&exe)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("start {} serve", exe.display()))?;
        let stdout = child.stdout.take().context("take the server's stdout")?;
        let mut server = ServerProcess {
            child,
            url: String::new(),
            log_path: log_path.to_owned(),
        };

        let (listening_tx, listening_rx) = tokio::sync::oneshot::channel::<String>();
        // The pipe is read on a plain thread because tokio's process support
        // is not enabled; the thread ends when the server closes its stdout.
        std::thread::Builder::new()
            .name("ripen-serve-stdout".to_owned())
            .spawn(move || {
                let mut listening_tx = Some(listening_tx);
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some(url) = line.trim().strip_prefix("listening on ") {
                        if let Some(tx) = listening_tx.take() {
                            let _ = tx.send(url.trim().to_owned());
                            continue;
                        }
                    }
                    let _ = writeln!(stdout_log, "{line}");
                }
            })
            .context("start the thread that reads the server's stdout")?;

        let url = match tokio::time::timeout(SERVER_START_TIMEOUT, listening_rx).await {
            Ok(Ok(url)) => url,
            Ok(Err(_)) => {
                let status = server.child.wait().ok();
                bail!(
                    "ripen serve ended before it was listening ({}); its log {}:\n{}",
                    status.map_or("unknown status".to_owned(), |s| s.to_string()),
                    server.log_path.display(),
                    server.log_tail()
                );
            }
            Err(_) => bail!(
                "ripen serve printed no \"listening on\" line within {}; its log {}:\n{}",
                humantime::format_duration(SERVER_START_TIMEOUT),
                server.log_path.display(),
                server.log_tail()
            ),
        };
        ensure!(
            url.starts_with("http://"),
            "ripen serve printed \"listening on {url}\", expected an http:// URL"
        );
        server.url = url.trim_end_matches('/').to_owned();
        Ok(server)
    }

    /// The server's root URL, such as `http://127.0.0.1:43117`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// An error, with the end of the server's log, if the server has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(
                "ripen serve exited ({status}); the end of its log {}:\n{}",
                self.log_path.display(),
                self.log_tail()
            ),
            Err(error) => Err(error).context("check on the ripen serve process"),
        }
    }

    /// The CPU time the server has used so far, in clock ticks.
    fn cpu_ticks(&self) -> Option<u64> {
        cpu_ticks(&self.child.id().to_string())
    }

    /// The server's peak resident set size (VmHWM), where /proc has it.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line
            .trim_start_matches("VmHWM:")
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    }

    /// Kills the server and waits for it to exit.
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        const LOG_TAIL_BYTES: u64 = 4096;
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log_path) {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
            let mut bytes = Vec::new();
            let _ = file.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        if text.trim().is_empty() {
            "(empty)".to_owned()
        } else {
            text
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&values, 0.50), Duration::from_millis(50));
        assert_eq!(percentile(&values, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&values[..1], 0.99), Duration::from_millis(1));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn payload_is_json_of_about_the_asked_size() {
        let pad: String = "x".repeat(2048);
        for target in [0, 10, 100, 1024, 2000] {
            let body = bench_payload(12345, &pad, target);
            let value: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(value["seq"], 12345);
            if target >= 100 {
                assert_eq!(body.len(), target);
            }
        }
    }

    #[test]
    fn group_separates_thousands() {
        assert_eq!(group(0.0), "0");
        assert_eq!(group(999.4), "999");
        assert_eq!(group(1000.0), "1,000");
        assert_eq!(group(1234567.8), "1,234,568");
    }

    #[test]
    fn config_names_the_five_steps() {
        let addr: std::net::SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let config = w5_config(Path::new("/tmp/x"), addr, 1024);
        assert!(config.contains("url = \"sqlite:///tmp/x/ripen.db\""));
        assert!(config
            .contains("name = \"d\"\nhttp = \"http://127.0.0.1:9000/d\"\nneeds = [\"b\", \"c\"]"));
        assert!(config.contains(
            "name = \"e\"\nhttp = \"http://127.0.0.1:9000/e\"\nneeds = [\"a\"]\ncritical = false"
        ));
        assert!(!config.contains("body_limit_bytes"));
    }

    #[test]
    fn cpu_ticks_reads_this_process() {
        if Path::new("/proc/self/stat").exists() {
            assert!(cpu_ticks("self").is_some());
        }
    }

    #[test]
    fn percent_encoding_keeps_unreserved() {
        assert_eq!(percent_encode("a-b_c.d~9"), "a-b_c.d~9");
        assert_eq!(percent_encode("x+y/z="), "x%2By%2Fz%3D");
    }
}
