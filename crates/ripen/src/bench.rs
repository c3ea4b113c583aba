//! `ripen bench`: measures a real `ripen serve` process on loopback against the
//! performance targets of DESIGN.md, and prints each figure beside its target.
//!
//! Rows, each run `--runs` times on a fresh server and a fresh SQLite file:
//! - intake: a node with `[engine] execute = false` (it accepts and serves but
//!   runs no steps), flooded by `--intake-clients` clients with ~1 KiB
//!   payloads; then the same node at half the target rate, for latency;
//! - W5: the five-step `w5` pipeline against a no-op fake downstream,
//!   `--entities` entities from `--clients` clients, measured from the
//!   server's own timestamps; then an unloaded probe, one entity at a time;
//! - with `--million`: a store preloaded with `--preload` settled entities,
//!   then intake and W5 on top of it, the server's RSS, and the time from
//!   spawning a server after `kill -9` to its first `/readyz` 200.
//!
//! The load clients speak just enough HTTP/1.1 over keep-alive connections and
//! write each request into a reused buffer, so that the bench, which shares
//! the machine's cores with the server, costs as little as it can.
//!
//! This module also holds [`ServerProcess`], the guard around a `ripen serve`
//! child that `ripen demo` uses too.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use hyper::StatusCode;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::client::Client;
use crate::downstream::{self, Profile};

/// How long a server may take to print its "listening on" line.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the pipeline may take to settle every entity of one run.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(1_800);
/// How often to ask whether anything is still pending.
const SETTLE_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// The page size used to read every entity back.
const LIST_PAGE_LIMIT: usize = 1000;
/// Entities submitted one at a time, each after the previous one settled, to
/// measure submit-to-ready latency on an idle server.
const UNLOADED_PROBE_ENTITIES: usize = 21;
/// How often the unloaded probe asks for its entity.
const UNLOADED_PROBE_POLL_INTERVAL: Duration = Duration::from_millis(1);
/// How long one probe entity may take to settle.
const UNLOADED_PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// The unit of the CPU times in /proc/PID/stat (`USER_HZ`), 100 on every
/// Linux architecture in use.
const CLOCK_TICKS_PER_S: f64 = 100.0;
/// The server's default body limit; larger payloads need a configured one.
const DEFAULT_BODY_LIMIT_BYTES: usize = 1024 * 1024;
/// Requests sent before each measured intake phase, to open connections and
/// warm caches.
const WARMUP_REQUESTS: usize = 2_000;
/// The intake rate of the latency row: half the throughput target.
const HALF_RATE_PER_S: f64 = 10_000.0;
/// The targets of DESIGN.md, as the summary prints them.
const INTAKE_TARGET_PER_S: f64 = 20_000.0;
const READY_TARGET_PER_S: f64 = 3_000.0;
/// DESIGN.md's W5 target on the PostgreSQL backend.
const PG_READY_TARGET_PER_S: f64 = 1_000.0;
/// How long `/readyz` may take to answer 200 after a restart.
const READYZ_TIMEOUT: Duration = Duration::from_secs(120);
/// The largest answer head the load client accepts.
const ANSWER_HEAD_BYTES_MAX: usize = 16 * 1024;
/// The largest answer body the load client accepts.
const ANSWER_BODY_BYTES_MAX: usize = 1024 * 1024;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Runs of each row, each on a fresh server and database; the summary
    /// shows their median, min and max.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Entities submitted in the full-rate intake row.
    #[arg(long, default_value_t = 60_000)]
    intake_entities: usize,
    /// Concurrent clients of the intake row.
    #[arg(long, default_value_t = 64)]
    intake_clients: usize,
    /// Entities of the W5 row.
    #[arg(long, default_value_t = 20_000)]
    entities: usize,
    /// Concurrent clients of the W5 row.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// The size of each submitted JSON payload, in bytes.
    #[arg(long, default_value_t = 1024)]
    payload_bytes: usize,
    /// Send no Idempotency-Key (by default every request carries one).
    #[arg(long)]
    no_keys: bool,
    /// Run only the intake rows.
    #[arg(long, conflicts_with = "w5_only")]
    intake_only: bool,
    /// Run only the W5 rows.
    #[arg(long)]
    w5_only: bool,
    /// Also run the 1,000,000-entity row (takes several minutes).
    #[arg(long)]
    million: bool,
    /// Settled entities preloaded for the `--million` row.
    #[arg(long, default_value_t = 1_000_000)]
    preload: usize,
    /// The storage URL of the servers (default: a fresh SQLite file per run).
    /// A `postgres://` database is shared by every run and every node.
    #[arg(long)]
    storage: Option<String>,
    /// Servers sharing `--storage` in the W5 row; clients are spread over them.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Where the `--million` row keeps its database (default: a temporary
    /// directory, removed afterwards). A directory that already holds a
    /// preloaded database is reused as it is.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

impl BenchArgs {
    fn runs_intake(&self) -> bool {
        !self.w5_only
    }

    fn runs_w5(&self) -> bool {
        !self.intake_only
    }
}

pub async fn run(args: BenchArgs) -> Result<()> {
    ensure!(args.runs >= 1, "--runs must be at least 1");
    ensure!(
        args.nodes == 1
            || args
                .storage
                .as_deref()
                .is_some_and(|s| s.starts_with("postgres")),
        "--nodes above 1 needs a shared --storage postgres://… database"
    );
    ensure!(args.entities >= 1, "--entities must be at least 1");
    ensure!(
        args.intake_entities >= 1,
        "--intake-entities must be at least 1"
    );
    ensure!(
        args.clients >= 1 && args.intake_clients >= 1,
        "--clients and --intake-clients must be at least 1"
    );
    ensure!(
        args.payload_bytes <= 32 * 1024 * 1024,
        "--payload-bytes must be at most 32 MiB"
    );
    let storage = match &args.storage {
        Some(url) if url.starts_with("postgres") => format!(
            "PostgreSQL (synchronous_commit=on: every ack is on disk), {} node(s)",
            args.nodes
        ),
        _ => "SQLite (WAL, synchronous=FULL: every ack is on disk)".to_owned(),
    };
    println!(
        "ripen bench: {storage}, {} B payloads, {}, {} run(s) per row",
        args.payload_bytes,
        if args.no_keys {
            "no idempotency keys"
        } else {
            "an idempotency key per request"
        },
        args.runs,
    );
    if args.runs_intake() {
        println!(
            "intake: intake-only node ([engine] execute = false), {} entities from {} clients; latency at {}/s",
            group(args.intake_entities as f64),
            args.intake_clients,
            group(HALF_RATE_PER_S)
        );
    }
    if args.runs_w5() {
        println!(
            "w5: a; b and c after a; d after b and c; e (non-critical) after a; {} entities from {} clients, no-op downstream",
            group(args.entities as f64),
            args.clients
        );
    }
    println!(
        "machine: {} cores, load average {}",
        cores(),
        load_average()
    );
    println!();

    let pad = Arc::new(
        std::iter::repeat_with(fastrand::alphanumeric)
            .take(args.payload_bytes)
            .collect::<String>(),
    );
    let mut figures = Figures::default();
    let mut errors = Errors::default();
    for run in 1..=args.runs {
        if args.runs_intake() {
            let fresh = Bench::fresh(&args, &pad, false).await?;
            let r = fresh
                .intake_row(&mut errors)
                .await
                .with_context(|| format!("intake run {run}"))?;
            println!("intake run {run}/{}: {}", args.runs, r.line());
            figures.intake.push(r);
            settle_disk();
        }
        if args.runs_w5() {
            let fresh = Bench::fresh(&args, &pad, true).await?;
            let r = fresh
                .w5_row(&mut errors)
                .await
                .with_context(|| format!("w5 run {run}"))?;
            println!("w5 run {run}/{}: {}", args.runs, r.line());
            figures.w5.push(r);
            settle_disk();
        }
    }
    if args.million {
        million(&args, &pad, &mut figures, &mut errors).await?;
    }
    for (kind, error) in &errors.kinds {
        println!("  error: {kind} x{}: {}", error.count, error.sample);
    }
    println!();
    println!("load average after the runs: {}", load_average());
    print_summary(
        &figures,
        args.storage
            .as_deref()
            .is_some_and(|s| s.starts_with("postgres")),
    );
    if errors.total() > 0 {
        bail!("{} errors (listed above)", errors.total());
    }
    Ok(())
}

/// Flushes what earlier rows left in the page cache (a run writes hundreds
/// of megabytes), so that the next row does not pay for their writeback.
fn settle_disk() {
    let _ = Command::new("sync").status();
}

/// The 1,000,000-entity row: preload once, then measure on top of it.
async fn million(
    args: &BenchArgs,
    pad: &Arc<String>,
    figures: &mut Figures,
    errors: &mut Errors,
) -> Result<()> {
    let (downstream_addr, downstream_stats) = downstream::spawn(Profile::noop()).await?;
    let temp;
    let dir = match &args.data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
            dir.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("ripen-bench-1m-")
                .tempdir()
                .context("create the bench's temporary directory")?;
            temp.path().to_owned()
        }
    };
    let marker = dir.join("preloaded");
    let preloaded: usize = std::fs::read_to_string(&marker)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let node = Node {
        dir: dir.clone(),
        downstream: downstream_addr,
        payload_bytes: args.payload_bytes,
        storage: args.storage.clone(),
    };
    println!();
    if preloaded >= args.preload {
        println!(
            "1M: reusing {} ({} entities preloaded)",
            dir.display(),
            group(preloaded as f64)
        );
    } else {
        let need = args.preload - preloaded;
        println!(
            "1M: preloading {} settled entities of type `bulk` (one no-op step) into {} through the API, {} clients ...",
            group(need as f64),
            dir.display(),
            args.intake_clients
        );
        let server = node.start(true).await?;
        let started = Instant::now();
        let phase = submit_phase(
            vec![server.addr()?],
            SubmitPlan {
                type_name: "bulk",
                key_prefix: (!args.no_keys).then(|| format!("preload-{:016x}", fastrand::u64(..))),
                count: need,
                clients: args.intake_clients,
                rate_per_s: None,
            },
            pad.clone(),
            args.payload_bytes,
        )
        .await;
        errors.merge(phase.errors);
        let client = Client::new(server.url());
        let mut server = server;
        wait_until_settled(&client, &mut server).await?;
        settle_disk();
        println!(
            "1M: preloaded {} entities in {:.0} s ({}/s, intake and pipeline together)",
            group(phase.accepted as f64),
            started.elapsed().as_secs_f64(),
            group(phase.accepted as f64 / started.elapsed().as_secs_f64())
        );
        std::fs::write(&marker, (preloaded + phase.accepted).to_string())
            .with_context(|| format!("write {}", marker.display()))?;
        server.stop();
    }
    println!("1M: database files: {}", db_size(&dir));

    // W5 runs first: the intake rows leave pending entities behind (their
    // node runs no steps), which a later W5 node would otherwise execute.
    if args.runs_w5() {
        for run in 1..=args.runs {
            let server = node.start(true).await?;
            let bench = Bench::on(args, pad, server);
            let r = bench
                .w5_row(errors)
                .await
                .with_context(|| format!("1M w5 run {run}"))?;
            println!("1M w5 run {run}/{}: {}", args.runs, r.line());
            figures.million_w5.push(r);
        }
    }
    if args.runs_intake() {
        for run in 1..=args.runs {
            let server = node.start(false).await?;
            let bench = Bench::on(args, pad, server);
            let r = bench
                .intake_row(errors)
                .await
                .with_context(|| format!("1M intake run {run}"))?;
            println!("1M intake run {run}/{}: {}", args.runs, r.line());
            figures.million_intake.push(r);
        }
    }
    for run in 1..=args.runs {
        let restart = node
            .restart_after_kill(args, pad)
            .await
            .with_context(|| format!("1M restart run {run}"))?;
        println!(
            "1M restart run {run}/{}: killed with -9 under full intake load, serving again (/readyz 200) {} after spawn; peak RSS {}",
            args.runs,
            ms(restart.ready_after),
            restart
                .peak_rss_bytes
                .map_or("n/a".to_owned(), |b| format!("{:.1} MiB", mib(b)))
        );
        figures.million_restart.push(restart);
    }
    println!("1M: database files after the runs: {}", db_size(&dir));
    errors.add_many(
        "downstream contract violations",
        downstream_stats.contract_violations(),
        downstream_stats.first_violation().unwrap_or_default(),
    );
    Ok(())
}

/// One server directory: its configuration and database.
struct Node {
    dir: PathBuf,
    downstream: SocketAddr,
    payload_bytes: usize,
    storage: Option<String>,
}

impl Node {
    async fn start(&self, execute: bool) -> Result<ServerProcess> {
        let config_path = self.dir.join("ripen.toml");
        std::fs::write(
            &config_path,
            bench_config(
                &self.dir,
                self.downstream,
                self.payload_bytes,
                execute,
                self.storage.as_deref(),
            ),
        )
        .with_context(|| format!("write {}", config_path.display()))?;
        ServerProcess::start(&config_path, &self.dir.join("server.log")).await
    }

    /// Floods an intake-only node, kills it with SIGKILL mid-flood, and times
    /// a new server from spawn to its first `/readyz` 200.
    async fn restart_after_kill(&self, args: &BenchArgs, pad: &Arc<String>) -> Result<Restart> {
        const FLOOD: Duration = Duration::from_millis(1_500);
        let server = self.start(false).await?;
        let addr = server.addr()?;
        let flood = tokio::spawn(submit_phase(
            vec![addr],
            SubmitPlan {
                type_name: "bulk",
                key_prefix: None,
                count: usize::MAX / 2,
                clients: args.intake_clients,
                rate_per_s: None,
            },
            pad.clone(),
            args.payload_bytes,
        ));
        tokio::time::sleep(FLOOD).await;
        // The child is killed with SIGKILL: no shutdown, no checkpoint.
        server.stop();
        // The clients see their connections cut and stop.
        let _ = flood.await;

        let config_path = self.dir.join("ripen.toml");
        let spawned = Instant::now();
        let server = ServerProcess::start(&config_path, &self.dir.join("server.log")).await?;
        let client = Client::new(server.url());
        loop {
            if let Ok(reply) = client.get("/readyz").await {
                if reply.status == StatusCode::OK {
                    break;
                }
            }
            ensure!(
                spawned.elapsed() < READYZ_TIMEOUT,
                "/readyz did not answer 200 within {}",
                humantime::format_duration(READYZ_TIMEOUT)
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let ready_after = spawned.elapsed();
        let peak_rss_bytes = server.peak_rss_bytes();
        server.stop();
        Ok(Restart {
            ready_after,
            peak_rss_bytes,
        })
    }
}

/// The total size of the database files in `dir`.
fn db_size(dir: &Path) -> String {
    let mut parts = Vec::new();
    for name in ["ripen.db", "ripen.db-wal"] {
        if let Ok(meta) = std::fs::metadata(dir.join(name)) {
            parts.push(format!("{name} {:.0} MiB", mib(meta.len())));
        }
    }
    parts.join(", ")
}

/// A server and what a row needs around it.
struct Bench<'a> {
    args: &'a BenchArgs,
    pad: Arc<String>,
    server: ServerProcess,
    /// Further nodes on the same shared database (`--nodes`).
    others: Vec<ServerProcess>,
    /// Counts contract violations; the 1M row counts its shared one itself.
    downstream: Option<downstream::Stats>,
    /// Removed after the server is killed (fields drop in order).
    _dir: Option<tempfile::TempDir>,
}

impl<'a> Bench<'a> {
    /// A fresh server on a fresh database, running steps or not.
    async fn fresh(args: &'a BenchArgs, pad: &Arc<String>, execute: bool) -> Result<Bench<'a>> {
        let (downstream_addr, downstream_stats) = downstream::spawn(Profile::noop()).await?;
        let dir = tempfile::Builder::new()
            .prefix("ripen-bench-")
            .tempdir()
            .context("create the bench's temporary directory")?;
        let node = Node {
            dir: dir.path().to_owned(),
            downstream: downstream_addr,
            payload_bytes: args.payload_bytes,
            storage: args.storage.clone(),
        };
        let server = node.start(execute).await?;
        let mut others = Vec::new();
        for i in 2..=args.nodes {
            let config_path = dir.path().join("ripen.toml");
            let log = dir.path().join(format!("server-{i}.log"));
            others.push(ServerProcess::start(&config_path, &log).await?);
        }
        Ok(Bench {
            args,
            pad: pad.clone(),
            server,
            others,
            downstream: Some(downstream_stats),
            _dir: if std::env::var_os("RIPEN_BENCH_KEEP").is_some() {
                println!("keeping {}", dir.keep().display());
                None
            } else {
                Some(dir)
            },
        })
    }

    /// A bench on a server whose store outlives it (the `--million` rows).
    fn on(args: &'a BenchArgs, pad: &Arc<String>, server: ServerProcess) -> Bench<'a> {
        Bench {
            args,
            pad: pad.clone(),
            server,
            others: Vec::new(),
            downstream: None,
            _dir: None,
        }
    }

    fn key_prefix(&self, phase: &str) -> Option<String> {
        (!self.args.no_keys).then(|| format!("bench-{:016x}-{phase}", fastrand::u64(..)))
    }

    async fn intake_row(mut self, errors: &mut Errors) -> Result<IntakeFigures> {
        let addr = self.server.addr()?;
        let warmup = submit_phase(
            vec![addr],
            SubmitPlan {
                type_name: "w5",
                key_prefix: self.key_prefix("warmup"),
                count: WARMUP_REQUESTS,
                clients: self.args.intake_clients,
                rate_per_s: None,
            },
            self.pad.clone(),
            self.args.payload_bytes,
        )
        .await;
        errors.merge(warmup.errors);

        let cpu_before = (self.server.cpu_ticks(), cpu_ticks("self"));
        let full = submit_phase(
            vec![addr],
            SubmitPlan {
                type_name: "w5",
                key_prefix: self.key_prefix("full"),
                count: self.args.intake_entities,
                clients: self.args.intake_clients,
                rate_per_s: None,
            },
            self.pad.clone(),
            self.args.payload_bytes,
        )
        .await;
        let cpu = cpu_cores(cpu_before, &self.server, full.wall);
        errors.merge(full.errors);
        self.server.check_alive()?;
        let acks_per_s = full.accepted as f64 / full.wall.as_secs_f64().max(1e-6);
        let mut latencies = full.latencies;
        latencies.sort_unstable();

        let half_count = (HALF_RATE_PER_S * 3.0) as usize;
        let half = submit_phase(
            vec![addr],
            SubmitPlan {
                type_name: "w5",
                key_prefix: self.key_prefix("half"),
                count: half_count,
                clients: self.args.intake_clients,
                rate_per_s: Some(HALF_RATE_PER_S),
            },
            self.pad.clone(),
            self.args.payload_bytes,
        )
        .await;
        errors.merge(half.errors);
        let half_rate_per_s = half.accepted as f64 / half.wall.as_secs_f64().max(1e-6);
        let mut half_latencies = half.latencies;
        half_latencies.sort_unstable();
        self.server.check_alive()?;
        let peak_rss_bytes = self.server.peak_rss_bytes();
        self.server.stop();
        Ok(IntakeFigures {
            acks_per_s,
            p50: percentile(&latencies, 0.50),
            p99: percentile(&latencies, 0.99),
            half_rate_per_s,
            half_p50: percentile(&half_latencies, 0.50),
            half_p99: percentile(&half_latencies, 0.99),
            cpu,
            peak_rss_bytes,
        })
    }

    async fn w5_row(mut self, errors: &mut Errors) -> Result<W5Figures> {
        let mut addrs = vec![self.server.addr()?];
        for other in &self.others {
            addrs.push(other.addr()?);
        }
        let client = Client::new(self.server.url());
        // A reused store may hold pending entities of earlier runs; they are
        // not this row's work.
        wait_until_settled(&client, &mut self.server).await?;
        let started_at = SystemTime::now();
        let cpu_before = (self.server.cpu_ticks(), cpu_ticks("self"));
        let started = Instant::now();
        let phase = submit_phase(
            addrs.clone(),
            SubmitPlan {
                type_name: "w5",
                key_prefix: self.key_prefix("w5"),
                count: self.args.entities,
                clients: self.args.clients,
                rate_per_s: None,
            },
            self.pad.clone(),
            self.args.payload_bytes,
        )
        .await;
        errors.merge(phase.errors);
        wait_until_settled(&client, &mut self.server).await?;
        let cpu = cpu_cores(cpu_before, &self.server, started.elapsed());

        // Newest first: the entities this row submitted lead the list.
        let mut entities = list_newest(&client, "w5", phase.accepted, errors).await?;
        // Allow for clock steps of the server's timestamps against ours.
        let since = started_at - Duration::from_secs(1);
        entities.retain(|e| parse_time(&e.created_at).is_ok_and(|t| t >= since));
        if entities.len() != phase.accepted {
            errors.add(
                "entity count mismatch",
                format!(
                    "GET /v1/entities?type=w5 listed {} entities created by this row, {} were acknowledged with 202",
                    entities.len(),
                    phase.accepted
                ),
            );
        }
        let (ready_per_s, mut latencies) = pipeline_figures(&entities, errors);
        latencies.sort_unstable();
        let unloaded = probe_unloaded(&client, errors).await?;
        self.server.check_alive()?;
        let peak_rss_bytes = self.server.peak_rss_bytes();
        self.server.stop();
        for mut other in std::mem::take(&mut self.others) {
            other.check_alive()?;
            other.stop();
        }
        if let Some(stats) = &self.downstream {
            errors.add_many(
                "downstream contract violations",
                stats.contract_violations(),
                stats.first_violation().unwrap_or_default(),
            );
        }
        Ok(W5Figures {
            ready_per_s,
            p50: percentile(&latencies, 0.50),
            p99: percentile(&latencies, 0.99),
            unloaded_p50: percentile(&unloaded, 0.50),
            cpu,
            peak_rss_bytes,
        })
    }
}

/// CPU cores busy over `wall`: the server's and the bench's own (its clients
/// and the fake downstream), where /proc has them.
fn cpu_cores(
    before: (Option<u64>, Option<u64>),
    server: &ServerProcess,
    wall: Duration,
) -> Option<(f64, f64)> {
    match (before, (server.cpu_ticks(), cpu_ticks("self"))) {
        ((Some(server0), Some(bench0)), (Some(server1), Some(bench1))) => {
            let wall_s = wall.as_secs_f64().max(1e-6);
            let cores = |ticks: u64| ticks as f64 / CLOCK_TICKS_PER_S / wall_s;
            Some((cores(server1 - server0), cores(bench1 - bench0)))
        }
        _ => None,
    }
}

/// Throughput (ready entities over first created to last ready) and the
/// submit-to-ready latencies, from the server's own timestamps.
fn pipeline_figures(entities: &[EntityView], errors: &mut Errors) -> (f64, Vec<Duration>) {
    let mut first_created: Option<SystemTime> = None;
    let mut last_ready: Option<SystemTime> = None;
    let mut latencies = Vec::with_capacity(entities.len());
    for entity in entities {
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
    let ready_per_s = match (first_created, last_ready) {
        (Some(first), Some(last)) => {
            let span = last.duration_since(first).unwrap_or_default();
            latencies.len() as f64 / span.as_secs_f64().max(1e-6)
        }
        _ => 0.0,
    };
    (ready_per_s, latencies)
}

/// The figures of one intake run.
struct IntakeFigures {
    acks_per_s: f64,
    p50: Duration,
    p99: Duration,
    /// The rate actually achieved by the paced phase.
    half_rate_per_s: f64,
    half_p50: Duration,
    half_p99: Duration,
    cpu: Option<(f64, f64)>,
    peak_rss_bytes: Option<u64>,
}

impl IntakeFigures {
    fn line(&self) -> String {
        let mut line = format!(
            "{} acks/s (p50 {}, p99 {}) | at {}/s p50 {}, p99 {}",
            group(self.acks_per_s),
            ms(self.p50),
            ms(self.p99),
            group(self.half_rate_per_s),
            ms(self.half_p50),
            ms(self.half_p99)
        );
        push_cpu_rss(&mut line, self.cpu, self.peak_rss_bytes);
        line
    }
}

/// The figures of one W5 run.
struct W5Figures {
    ready_per_s: f64,
    p50: Duration,
    p99: Duration,
    unloaded_p50: Duration,
    cpu: Option<(f64, f64)>,
    peak_rss_bytes: Option<u64>,
}

impl W5Figures {
    fn line(&self) -> String {
        let mut line = format!(
            "ready {}/s (submit->ready p50 {}, p99 {}) | unloaded p50 {}",
            group(self.ready_per_s),
            ms(self.p50),
            ms(self.p99),
            ms(self.unloaded_p50)
        );
        push_cpu_rss(&mut line, self.cpu, self.peak_rss_bytes);
        line
    }
}

struct Restart {
    ready_after: Duration,
    peak_rss_bytes: Option<u64>,
}

fn push_cpu_rss(line: &mut String, cpu: Option<(f64, f64)>, rss: Option<u64>) {
    if let Some((server, bench)) = cpu {
        let _ = write!(line, " | CPU: server {server:.2}, bench {bench:.2} cores");
    }
    match rss {
        Some(bytes) => {
            let _ = write!(line, " | peak RSS {:.1} MiB", mib(bytes));
        }
        None => line.push_str(" | peak RSS n/a"),
    }
}

#[derive(Default)]
struct Figures {
    intake: Vec<IntakeFigures>,
    w5: Vec<W5Figures>,
    million_intake: Vec<IntakeFigures>,
    million_w5: Vec<W5Figures>,
    million_restart: Vec<Restart>,
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

struct SubmitPlan {
    type_name: &'static str,
    /// Each request carries the key `{prefix}-{seq}`; none without a prefix.
    key_prefix: Option<String>,
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

/// Submits `plan.count` entities from `plan.clients` connections. Each client
/// writes its requests into one reused buffer; a cut connection ends the
/// client (the restart row cuts them on purpose).
async fn submit_phase(
    addrs: Vec<SocketAddr>,
    plan: SubmitPlan,
    pad: Arc<String>,
    payload_bytes: usize,
) -> SubmitOutcome {
    let next = Arc::new(AtomicUsize::new(0));
    let plan = Arc::new(plan);
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for client in 0..plan.clients.min(plan.count) {
        // Clients are spread over the nodes, one connection each.
        let addr = addrs[client % addrs.len()];
        let next = next.clone();
        let plan = plan.clone();
        let pad = pad.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity((plan.count / plan.clients + 1).min(1 << 16));
            let mut errors = Errors::default();
            let mut conn = match LoadConn::open(addr).await {
                Ok(conn) => conn,
                Err(error) => {
                    errors.add("connect failed", format!("{error:#}"));
                    return (latencies, errors);
                }
            };
            let path = format!("/v1/entities/{}", plan.type_name);
            let mut request = Vec::with_capacity(payload_bytes + 512);
            let mut body = Vec::with_capacity(payload_bytes + 128);
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= plan.count {
                    break;
                }
                if let Some(rate) = plan.rate_per_s {
                    let due = started + Duration::from_secs_f64(seq as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                write_payload(&mut body, seq, &pad, payload_bytes);
                request.clear();
                let _ = write!(
                    request,
                    "POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
                    body.len()
                );
                if let Some(prefix) = &plan.key_prefix {
                    let _ = write!(request, "idempotency-key: {prefix}-{seq}\r\n");
                }
                request.extend_from_slice(b"\r\n");
                request.extend_from_slice(&body);
                let sent = Instant::now();
                match conn.round_trip(&request).await {
                    Ok(202) => latencies.push(sent.elapsed()),
                    Ok(status) => errors.add(
                        format!("intake answered {status}"),
                        format!("POST {path}: {}", snippet(conn.body())),
                    ),
                    Err(error) => {
                        errors.add("intake request failed", format!("{error:#}"));
                        break;
                    }
                }
            }
            (latencies, errors)
        });
    }
    let mut latencies = Vec::with_capacity(plan.count.min(1 << 20));
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

/// A keep-alive HTTP/1.1 connection that sends ready-made requests and reads
/// answers framed by `content-length`: one write and usually one read per
/// request.
struct LoadConn {
    stream: TcpStream,
    buf: Vec<u8>,
    body: std::ops::Range<usize>,
}

impl LoadConn {
    async fn open(addr: SocketAddr) -> Result<LoadConn> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(LoadConn {
            stream,
            buf: Vec::with_capacity(8 * 1024),
            body: 0..0,
        })
    }

    /// The body of the last answer.
    fn body(&self) -> &[u8] {
        &self.buf[self.body.clone()]
    }

    /// Sends one request and reads its answer; returns the status code.
    async fn round_trip(&mut self, request: &[u8]) -> Result<u16> {
        self.stream
            .write_all(request)
            .await
            .context("send the request")?;
        self.buf.clear();
        let (status, head_len, body_len) = loop {
            if let Some(head) = parse_head(&self.buf)? {
                break head;
            }
            ensure!(
                self.buf.len() <= ANSWER_HEAD_BYTES_MAX,
                "the answer head exceeds {ANSWER_HEAD_BYTES_MAX} bytes"
            );
            self.read_more().await?;
        };
        ensure!(
            body_len <= ANSWER_BODY_BYTES_MAX,
            "the answer body of {body_len} bytes exceeds {ANSWER_BODY_BYTES_MAX}"
        );
        while self.buf.len() < head_len + body_len {
            self.read_more().await?;
        }
        ensure!(
            self.buf.len() == head_len + body_len,
            "the server sent more than one answer"
        );
        self.body = head_len..head_len + body_len;
        Ok(status)
    }

    async fn read_more(&mut self) -> Result<()> {
        self.buf.reserve(4096);
        let n = self
            .stream
            .read_buf(&mut self.buf)
            .await
            .context("read the answer")?;
        ensure!(n > 0, "the server closed the connection");
        Ok(())
    }
}

/// `(status, head length, body length)` once the head is complete.
fn parse_head(buf: &[u8]) -> Result<Option<(u16, usize, usize)>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).context("the answer head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .trim()
                    .parse::<usize>()
                    .with_context(|| format!("bad content-length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("the answer is not framed by content-length: {line:?}");
        }
    }
    Ok(Some((status, end + 4, length.unwrap_or(0))))
}

/// A JSON object of `target_bytes` bytes (at least its fixed fields).
fn write_payload(out: &mut Vec<u8>, seq: usize, pad: &str, target_bytes: usize) {
    out.clear();
    let _ = write!(
        out,
        "{{\"seq\":{seq},\"name\":\"bench entity {seq}\",\"pad\":\""
    );
    let tail = b"\"}";
    let fill = target_bytes
        .saturating_sub(out.len() + tail.len())
        .min(pad.len());
    out.extend_from_slice(&pad.as_bytes()[..fill]);
    out.extend_from_slice(tail);
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

/// Reads the newest `count` entities of a type, page by page.
async fn list_newest(
    client: &Client,
    type_name: &str,
    count: usize,
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
        if entities.len() >= count {
            entities.truncate(count);
            return Ok(entities);
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

/// The bench's configuration: the five-step `w5` pipeline and the one-step
/// `bulk` type that the `--million` row preloads, both against `downstream`.
fn bench_config(
    dir: &Path,
    downstream: SocketAddr,
    payload_bytes: usize,
    execute: bool,
    storage: Option<&str>,
) -> String {
    let db = storage.map_or_else(
        || format!("sqlite://{}", dir.join("ripen.db").display()),
        str::to_owned,
    );
    let mut config = String::new();
    let _ = writeln!(config, "[server]\nlisten = \"127.0.0.1:0\"");
    // Leave room for the JSON around the padding.
    let body_limit_bytes = payload_bytes * 2 + 4096;
    if body_limit_bytes > DEFAULT_BODY_LIMIT_BYTES {
        let _ = writeln!(config, "body_limit_bytes = {body_limit_bytes}");
    }
    let _ = writeln!(config, "\n[storage]\nurl = {}\n", toml_string(&db));
    let _ = writeln!(config, "[engine]\nexecute = {execute}\n");
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
    let _ = writeln!(
        config,
        "\n[types.bulk]\n\n[[types.bulk.steps]]\nname = \"a\"\nhttp = \"http://{downstream}/a\"\ntimeout = \"10s\""
    );
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

fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// The three load averages of /proc/loadavg, or "n/a".
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "n/a".to_owned())
}

/// One line of the summary: the median, min and max over the runs.
struct Row {
    figure: String,
    values: Vec<f64>,
    decimals: usize,
    target: String,
    /// Whether a median meets the target; `None` when there is no target.
    meets: Option<Box<dyn Fn(f64) -> bool>>,
    /// Judge the worst run (the max) rather than the median.
    judge_max: bool,
}

impl Row {
    fn new(figure: &str, values: Vec<f64>, decimals: usize) -> Row {
        Row {
            figure: figure.to_owned(),
            values,
            decimals,
            target: String::new(),
            meets: None,
            judge_max: false,
        }
    }

    fn target(mut self, target: impl Into<String>, meets: impl Fn(f64) -> bool + 'static) -> Row {
        self.target = target.into();
        self.meets = Some(Box::new(meets));
        self
    }

    fn judged_by_max(mut self) -> Row {
        self.judge_max = true;
        self
    }
}

fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    Some(if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    })
}

/// Prints the figures beside their targets; on PostgreSQL the W5 target is
/// that backend's, and the latency targets (stated for SQLite) are not shown.
fn print_summary(f: &Figures, postgres: bool) {
    let msf = |d: Duration| d.as_secs_f64() * 1000.0;
    let intake = |fs: &[IntakeFigures], g: &dyn Fn(&IntakeFigures) -> f64| -> Vec<f64> {
        fs.iter().map(g).collect()
    };
    let w5 = |fs: &[W5Figures], g: &dyn Fn(&W5Figures) -> f64| -> Vec<f64> {
        fs.iter().map(g).collect()
    };
    let rss = |a: Vec<Option<u64>>| -> Vec<f64> { a.into_iter().flatten().map(mib).collect() };
    let mut rows = vec![
        Row::new(
            "intake acks/s (64 clients)",
            intake(&f.intake, &|r| r.acks_per_s),
            0,
        )
        .target(">= 20,000", |v| v >= INTAKE_TARGET_PER_S),
        Row::new(
            "  latency p50 at full rate (ms)",
            intake(&f.intake, &|r| msf(r.p50)),
            2,
        ),
        Row::new(
            "  latency p99 at full rate (ms)",
            intake(&f.intake, &|r| msf(r.p99)),
            2,
        ),
        Row::new(
            "intake p50 at 10,000/s (ms)",
            intake(&f.intake, &|r| msf(r.half_p50)),
            2,
        )
        .target("<= 2", |v| v <= 2.0),
        Row::new(
            "intake p99 at 10,000/s (ms)",
            intake(&f.intake, &|r| msf(r.half_p99)),
            2,
        )
        .target("<= 5", |v| v <= 5.0),
        Row::new(
            "  server CPU at full rate (cores)",
            intake(&f.intake, &|r| r.cpu.map_or(f64::NAN, |c| c.0)),
            2,
        ),
        Row::new(
            "  bench CPU at full rate (cores)",
            intake(&f.intake, &|r| r.cpu.map_or(f64::NAN, |c| c.1)),
            2,
        ),
        if postgres {
            Row::new("W5 entities ready/s", w5(&f.w5, &|r| r.ready_per_s), 0)
                .target(">= 1,000", |v| v >= PG_READY_TARGET_PER_S)
        } else {
            Row::new("W5 entities ready/s", w5(&f.w5, &|r| r.ready_per_s), 0)
                .target(">= 3,000", |v| v >= READY_TARGET_PER_S)
        },
        Row::new(
            "  submit->ready p50 loaded (ms)",
            w5(&f.w5, &|r| msf(r.p50)),
            2,
        ),
        Row::new(
            "  submit->ready p99 loaded (ms)",
            w5(&f.w5, &|r| msf(r.p99)),
            2,
        ),
        {
            let row = Row::new(
                "W5 submit->ready p50 unloaded (ms)",
                w5(&f.w5, &|r| msf(r.unloaded_p50)),
                2,
            );
            if postgres {
                row
            } else {
                row.target("<= 10", |v| v <= 10.0)
            }
        },
        Row::new(
            "  peak RSS, empty store (MiB)",
            rss(f
                .intake
                .iter()
                .map(|r| r.peak_rss_bytes)
                .chain(f.w5.iter().map(|r| r.peak_rss_bytes))
                .collect()),
            1,
        ),
    ];
    if !f.million_intake.is_empty() || !f.million_w5.is_empty() {
        let empty_intake = median(&intake(&f.intake, &|r| r.acks_per_s));
        let empty_ready = median(&w5(&f.w5, &|r| r.ready_per_s));
        let within = |base: Option<f64>| -> (String, Box<dyn Fn(f64) -> bool>) {
            match base {
                Some(b) => (
                    format!(">= {} (80% of empty)", group(0.8 * b)),
                    Box::new(move |v| v >= 0.8 * b),
                ),
                None => ("within 20% of empty".to_owned(), Box::new(|_| false)),
            }
        };
        let (t, m) = within(empty_intake);
        let mut row = Row::new(
            "1M: intake acks/s",
            intake(&f.million_intake, &|r| r.acks_per_s),
            0,
        );
        row.target = t;
        row.meets = Some(m);
        rows.push(row);
        rows.push(
            Row::new(
                "1M: intake p99 at 10,000/s (ms)",
                intake(&f.million_intake, &|r| msf(r.half_p99)),
                2,
            )
            .target("<= 5", |v| v <= 5.0),
        );
        let (t, m) = within(empty_ready);
        let mut row = Row::new(
            "1M: W5 entities ready/s",
            w5(&f.million_w5, &|r| r.ready_per_s),
            0,
        );
        row.target = t;
        row.meets = Some(m);
        rows.push(row);
        rows.push(
            Row::new(
                "1M: W5 p50 unloaded (ms)",
                w5(&f.million_w5, &|r| msf(r.unloaded_p50)),
                2,
            )
            .target("<= 10", |v| v <= 10.0),
        );
    }
    if !f.million_restart.is_empty() || !f.million_w5.is_empty() || !f.million_intake.is_empty() {
        rows.push(
            Row::new(
                "1M: server peak RSS (MiB)",
                rss(f
                    .million_intake
                    .iter()
                    .map(|r| r.peak_rss_bytes)
                    .chain(f.million_w5.iter().map(|r| r.peak_rss_bytes))
                    .chain(f.million_restart.iter().map(|r| r.peak_rss_bytes))
                    .collect()),
                1,
            )
            .target("<= 256 (max of the runs)", |v| v <= 256.0)
            .judged_by_max(),
        );
        rows.push(
            Row::new(
                "1M: kill -9 -> /readyz 200 (s)",
                f.million_restart
                    .iter()
                    .map(|r| r.ready_after.as_secs_f64())
                    .collect(),
                2,
            )
            .target("<= 2", |v| v <= 2.0),
        );
    }

    println!(
        "{:<36} {:>10} {:>10} {:>10}  {:<26} meets",
        "figure", "median", "min", "max", "target"
    );
    for row in rows.iter() {
        let mut values: Vec<f64> = row
            .values
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .collect();
        if values.is_empty() {
            continue;
        }
        values.sort_by(f64::total_cmp);
        let Some(mid) = median(&values) else { continue };
        let show = |v: f64| {
            if row.decimals == 0 {
                group(v)
            } else {
                format!("{v:.prec$}", prec = row.decimals)
            }
        };
        let judged = if row.judge_max {
            values[values.len() - 1]
        } else {
            mid
        };
        let verdict = match &row.meets {
            Some(meets) if meets(judged) => "yes",
            Some(_) => "NO",
            None => "",
        };
        let line = format!(
            "{:<36} {:>10} {:>10} {:>10}  {:<26} {}",
            row.figure,
            show(mid),
            show(values[0]),
            show(values[values.len() - 1]),
            row.target,
            verdict
        );
        println!("{}", line.trim_end());
    }
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

    /// The address the server listens on.
    fn addr(&self) -> Result<SocketAddr> {
        let host = self.url.trim_start_matches("http://");
        host.parse()
            .with_context(|| format!("{host:?} is not an address"))
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
    fn payload_is_json_of_the_asked_size() {
        let pad: String = "x".repeat(2048);
        let mut body = Vec::new();
        for target in [0, 10, 100, 1024, 2000] {
            write_payload(&mut body, 12345, &pad, target);
            let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(value["seq"], 12345);
            if target >= 100 {
                assert_eq!(body.len(), target);
            }
        }
    }

    #[test]
    fn answer_heads_are_framed_by_content_length() {
        let answer = b"HTTP/1.1 202 Accepted\r\nContent-Length: 5\r\nx: y\r\n\r\nhello";
        assert_eq!(parse_head(&answer[..10]).unwrap(), None);
        let (status, head, body) = parse_head(answer).unwrap().unwrap();
        assert_eq!((status, &answer[head..head + body]), (202, &b"hello"[..]));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(parse_head(chunked).is_err());
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
        let config = bench_config(Path::new("/tmp/x"), addr, 1024, false, None);
        assert!(config.contains("[engine]\nexecute = false"));
        assert!(config.contains("[types.bulk]"));
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
