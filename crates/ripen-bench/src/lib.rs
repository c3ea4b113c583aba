//! `ripen bench`: measures a real `ripen serve` process on loopback against the
//! performance targets (docs/concepts.md), and prints each figure beside its target.
//!
//! Rows, each run `runs` times on a fresh server and a fresh SQLite file:
//! - intake: a node with `[engine] execute = false` (it accepts and serves but
//!   runs no steps), flooded by `intake_clients` clients with ~1 KiB
//!   payloads; then the same node at half the target rate, for latency;
//! - burst: intake on a node that executes, during a burst of
//!   `burst_entities` W5 entities from `burst_clients` clients, then the time
//!   the pipelines take to catch up (every entity settled);
//! - W5: the five-step `w5` pipeline against a no-op fake downstream,
//!   `entities` entities from `clients` clients, measured from the server's
//!   own timestamps, with the server's CPU time per entity; then an unloaded
//!   probe, one entity at a time;
//! - W5 with workers: the same pipeline with `b` and `c` run by remote
//!   workers (the Rust SDK, `ripen_worker::Worker`, in this process) that
//!   long-poll their queue: `worker_entities` entities, ready/s, and the
//!   time from runnable to claimed (from the commit of `a`'s success, which
//!   makes `b` and `c` runnable, to the commit of their claims, both the
//!   server's own history timestamps): under load mostly the wait behind
//!   the burst; in the unloaded probe, one entity at a time, the long-poll
//!   wake-up itself;
//! - with `million`: a store preloaded with `preload` settled entities, then
//!   intake and W5 on top of it, the server's RSS, and the time from spawning
//!   a server after `kill -9` to its first `/readyz` 200.
//!
//! The load clients speak just enough HTTP/1.1 over keep-alive connections and
//! write each request into a reused buffer, so that the bench, which shares
//! the machine's cores with the server, costs as little as it can. Everything
//! else (polling, listing, probing) goes through `ripen_client`, and the
//! server, the fake downstream and the config come from `ripen_testkit`.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use ripen_client::{snippet, Client, EntityStatus, EntityView, ListQuery};
use ripen_testkit::{
    cpu_ticks, sqlite_url, Config, Downstream, Profile, ServerProcess, Stats, Step, TempDir,
    TypeDef,
};
use ripen_worker::{Task, TaskError, Worker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// How long the pipeline may take to settle every entity of one run.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(1_800);
/// How often to ask whether anything is still pending. It bounds the
/// resolution of the burst row's catch-up time.
const SETTLE_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// The page size used to read every entity back.
const LIST_PAGE_LIMIT: u32 = 1000;
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
/// The performance targets (docs/concepts.md), as the summary prints them.
const INTAKE_TARGET_PER_S: f64 = 30_000.0;
/// The intake rate of the latency row: half the throughput target.
const HALF_RATE_PER_S: f64 = INTAKE_TARGET_PER_S / 2.0;
const HALF_RATE_P99_TARGET_MS: f64 = 5.0;
/// Acks per second on a node that executes, during the burst.
const BURST_INTAKE_TARGET_PER_S: f64 = 15_000.0;
const BURST_P99_TARGET_MS: f64 = 10.0;
const READY_TARGET_PER_S: f64 = 8_000.0;
const UNLOADED_P50_TARGET_MS: f64 = 2.0;
/// The server's CPU time (user and system) per W5 entity, in milliseconds.
const CPU_PER_ENTITY_TARGET_MS: f64 = 0.15;
/// The W5 target on the PostgreSQL backend, one node.
const PG_READY_TARGET_PER_S: f64 = 3_000.0;
/// How long `/readyz` may take to answer 200 after a restart.
const READYZ_TIMEOUT: Duration = Duration::from_secs(120);
/// The largest answer head the load client accepts.
const ANSWER_HEAD_BYTES_MAX: usize = 16 * 1024;
/// The largest answer body the load client accepts.
const ANSWER_BODY_BYTES_MAX: usize = 1024 * 1024;
/// The W5 type whose steps `b` and `c` are worker steps, and their queue.
const WORKER_TYPE: &str = "w5w";
const WORKER_QUEUE: &str = "bench";
/// In-process SDK workers of the workers row, and the tasks each runs at once.
const WORKERS: usize = 4;
const WORKER_CONCURRENCY: usize = 64;
/// Entities of the workers row whose histories are read for the wake-up
/// latency, spread evenly over the run.
const WAKE_SAMPLE_MAX: usize = 2_000;
/// Concurrent history reads.
const WAKE_SAMPLE_READERS: usize = 8;
/// How often the `million` preload samples the size of its SQLite files.
const SIZE_SAMPLE_INTERVAL: Duration = Duration::from_secs(10);
/// The summary's table of those samples keeps at most about this many rows.
const SIZE_TABLE_ROWS_MAX: usize = 24;

/// What to measure and how; `ripen bench` fills it from its flags.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `ripen` executable that the bench starts as `ripen serve`.
    pub exe: PathBuf,
    /// Runs of each row, each on a fresh server and database; the summary
    /// shows their median, min and max.
    pub runs: usize,
    /// Entities submitted in the full-rate intake row.
    pub intake_entities: usize,
    /// Concurrent clients of the intake row.
    pub intake_clients: usize,
    /// Entities of the burst row (0 skips it).
    pub burst_entities: usize,
    /// Concurrent clients of the burst row.
    pub burst_clients: usize,
    /// Entities of the W5 row.
    pub entities: usize,
    /// Concurrent clients of the W5 row.
    pub clients: usize,
    /// The size of each submitted JSON payload, in bytes.
    pub payload_bytes: usize,
    /// Send no Idempotency-Key (by default every request carries one).
    pub no_keys: bool,
    /// Run only the intake rows (intake and burst).
    pub intake_only: bool,
    /// Run only the W5 rows.
    pub w5_only: bool,
    /// Run only the W5 row with worker steps.
    pub workers_only: bool,
    /// Entities of the W5 row with worker steps.
    pub worker_entities: usize,
    /// Run the W5 row again with one webhook subscription on a local
    /// receiver, and report its delivery lag.
    pub notify: bool,
    /// Also run the 1,000,000-entity row (takes several minutes).
    pub million: bool,
    /// Settled entities preloaded for the `million` row.
    pub preload: usize,
    /// Submissions per second of the preload, spread evenly; `None` floods
    /// (intake then outruns the pipeline, and what is pending waits).
    pub preload_rate: Option<f64>,
    /// The storage URL of the servers (default: a fresh SQLite file per run).
    /// A `postgres://` database is shared by every run and every node.
    pub storage: Option<String>,
    /// Servers sharing `storage` in the W5 row; clients are spread over them.
    pub nodes: usize,
    /// Serve with API keys: each fresh server gets a key with every scope,
    /// and every request of the bench carries it (what auth costs).
    pub auth: bool,
    /// Where the `million` row keeps its database (default: a temporary
    /// directory, removed afterwards). A directory that already holds a
    /// preloaded database is reused as it is.
    pub data_dir: Option<PathBuf>,
    /// The body of the servers' `[retention]` table (say `payload = "1s"`),
    /// to measure what pruning costs; the defaults when `None`.
    pub retention: Option<String>,
    /// More `key = value` lines of the servers' `[notify]` table (say
    /// `outbox_retention = "10s"`: outbox rows keep their entity).
    pub notify_config: Option<String>,
    /// Run only the `million` preload (with its size samples), none of
    /// the other rows nor the rows on top of the preloaded store.
    pub preload_only: bool,
}

impl Options {
    fn runs_intake(&self) -> bool {
        !self.w5_only && !self.workers_only && !self.preload_only
    }

    fn runs_w5(&self) -> bool {
        !self.intake_only && !self.workers_only && !self.preload_only
    }

    fn runs_million(&self) -> bool {
        self.million || self.preload_only
    }

    fn runs_notify(&self) -> bool {
        self.notify && self.runs_w5()
    }

    fn runs_workers(&self) -> bool {
        !self.intake_only && !self.w5_only && !self.preload_only && self.worker_entities > 0
    }

    fn postgres(&self) -> bool {
        self.storage
            .as_deref()
            .is_some_and(|s| s.starts_with("postgres"))
    }
}

/// Runs every row the options ask for and prints the summary; an error if
/// anything went wrong on the way (a refused request, a failed entity).
pub async fn run(args: Options) -> Result<()> {
    ensure!(args.runs >= 1, "--runs must be at least 1");
    ensure!(
        args.nodes == 1 || args.postgres(),
        "--nodes above 1 needs a shared --storage postgres://… database"
    );
    ensure!(args.entities >= 1, "--entities must be at least 1");
    ensure!(
        args.preload_rate.is_none_or(|r| r.is_finite() && r > 0.0),
        "--preload-rate must be more than zero (leave it out to submit as fast as the server answers)"
    );
    ensure!(
        args.intake_entities >= 1,
        "--intake-entities must be at least 1"
    );
    ensure!(
        args.clients >= 1 && args.intake_clients >= 1 && args.burst_clients >= 1,
        "--clients, --intake-clients and --burst-clients must be at least 1"
    );
    ensure!(
        args.payload_bytes <= 32 * 1024 * 1024,
        "--payload-bytes must be at most 32 MiB"
    );
    let storage = if args.postgres() {
        format!(
            "PostgreSQL (synchronous_commit=on: every ack is on disk), {} node(s)",
            args.nodes
        )
    } else {
        "SQLite (WAL, synchronous=FULL: every ack is on disk)".to_owned()
    };
    println!(
        "ripen bench: {storage}, {} B payloads, {}, {}, {} run(s) per row",
        args.payload_bytes,
        if args.no_keys {
            "no idempotency keys"
        } else {
            "an idempotency key per request"
        },
        if args.auth {
            "an API key on every request"
        } else {
            "no API keys (open)"
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
        if args.burst_entities > 0 {
            println!(
                "burst: intake on an executing node, a burst of {} w5 entities from {} clients, then the catch-up",
                group(args.burst_entities as f64),
                args.burst_clients
            );
        }
    }
    if args.runs_w5() {
        println!(
            "w5: a; b and c after a; d after b and c; e (non-critical) after a; {} entities from {} clients, no-op downstream",
            group(args.entities as f64),
            args.clients
        );
    }
    if args.runs_notify() {
        println!(
            "w5 with a webhook: the same W5 row with one subscription to every event, delivered to a local receiver"
        );
    }
    if args.runs_workers() {
        println!(
            "w5 with workers: the same pipeline, b and c served by {WORKERS} Rust SDK workers (concurrency {WORKER_CONCURRENCY} each, long polls); {} entities from {} clients",
            group(args.worker_entities as f64),
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
    // `--preload-only` runs none of these rows.
    let rows_runs = if args.preload_only { 0 } else { args.runs };
    for run in 1..=rows_runs {
        if args.runs_intake() {
            let fresh = Bench::fresh(&args, &pad, false).await?;
            let r = fresh
                .intake_row(&mut errors)
                .await
                .with_context(|| format!("intake run {run}"))?;
            println!("intake run {run}/{}: {}", args.runs, r.line());
            figures.intake.push(r);
            settle_disk();
            if args.burst_entities > 0 {
                let fresh = Bench::fresh(&args, &pad, true).await?;
                let r = fresh
                    .burst_row(&mut errors)
                    .await
                    .with_context(|| format!("burst run {run}"))?;
                println!("burst run {run}/{}: {}", args.runs, r.line());
                figures.burst.push(r);
                settle_disk();
            }
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
        if args.runs_notify() {
            let fresh = Bench::fresh(&args, &pad, true).await?;
            let (r, lag) = fresh
                .notify_row(&mut errors)
                .await
                .with_context(|| format!("w5 with a webhook run {run}"))?;
            println!(
                "w5 with a webhook run {run}/{}: {} | {}",
                args.runs,
                r.line(),
                lag.line()
            );
            figures.notify.push((r, lag));
            settle_disk();
        }
        if args.runs_workers() {
            let fresh = Bench::fresh(&args, &pad, true).await?;
            let r = fresh
                .workers_row(&mut errors)
                .await
                .with_context(|| format!("w5 with workers run {run}"))?;
            println!("w5 with workers run {run}/{}: {}", args.runs, r.line());
            figures.workers.push(r);
            settle_disk();
        }
    }
    if args.runs_million() {
        million(&args, &pad, &mut figures, &mut errors).await?;
    }
    for (kind, error) in &errors.kinds {
        println!("  error: {kind} x{}: {}", error.count, error.sample);
    }
    println!();
    println!("load average after the runs: {}", load_average());
    print_summary(&figures, args.postgres());
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
    args: &Options,
    pad: &Arc<String>,
    figures: &mut Figures,
    errors: &mut Errors,
) -> Result<()> {
    let downstream = Downstream::with_profile(Profile::noop())
        .await
        .context("start the fake downstream")?;
    let temp;
    let dir = match &args.data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
            dir.clone()
        }
        None => {
            temp = TempDir::new("ripen-bench-1m-")
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
        exe: args.exe.clone(),
        dir: dir.clone(),
        downstream: downstream.addr(),
        payload_bytes: args.payload_bytes,
        storage: args.storage.clone(),
        retention: args.retention.clone(),
        notify_config: args.notify_config.clone(),
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
            "1M: preloading {} settled entities of type `bulk` (one no-op step) into {} through the API, {} clients, {} ...",
            group(need as f64),
            dir.display(),
            args.intake_clients,
            args.preload_rate
                .map_or("as fast as they are answered".to_owned(), |r| format!("{}/s", group(r)))
        );
        let server = node.start(true).await?;
        let started = Instant::now();
        let submitted = Arc::new(AtomicUsize::new(0));
        // The files are SQLite's only when the node runs on its own file.
        let sampler = args
            .storage
            .is_none()
            .then(|| SizeSampler::start(dir.clone(), started, submitted.clone()));
        let phase = submit_phase(
            vec![server.addr()?],
            SubmitPlan {
                type_name: "bulk",
                key_prefix: (!args.no_keys).then(|| format!("preload-{:016x}", fastrand::u64(..))),
                count: need,
                clients: args.intake_clients,
                rate_per_s: args.preload_rate,
                auth: None,
                progress: Some(submitted),
            },
            pad.clone(),
            args.payload_bytes,
        )
        .await;
        errors.merge(phase.errors);
        let mut server = server;
        wait_until_settled(&mut server).await?;
        let settled_after = started.elapsed();
        if let Some(sampler) = sampler {
            figures.million_sizes = sampler.finish().await;
        }
        settle_disk();
        let per_s = phase.accepted as f64 / settled_after.as_secs_f64();
        figures.million_preload = Some((phase.accepted, settled_after));
        println!(
            "1M: preloaded {} entities in {:.0} s ({}/s, intake and pipeline together)",
            group(phase.accepted as f64),
            settled_after.as_secs_f64(),
            group(per_s)
        );
        std::fs::write(&marker, (preloaded + phase.accepted).to_string())
            .with_context(|| format!("write {}", marker.display()))?;
        server.stop();
    }
    println!("1M: database files: {}", db_size(&dir));
    if args.preload_only {
        add_violations(errors, downstream.stats());
        return Ok(());
    }

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
    add_violations(errors, downstream.stats());
    Ok(())
}

fn add_violations(errors: &mut Errors, stats: &Stats) {
    errors.add_many(
        "downstream contract violations",
        stats.contract_violations(),
        stats.first_violation().unwrap_or_default(),
    );
}

/// One server directory: its configuration and database.
struct Node {
    exe: PathBuf,
    dir: PathBuf,
    downstream: SocketAddr,
    payload_bytes: usize,
    storage: Option<String>,
    retention: Option<String>,
    /// More lines of `[notify]`.
    notify_config: Option<String>,
}

impl Node {
    async fn start(&self, execute: bool) -> Result<ServerProcess> {
        let storage = self
            .storage
            .clone()
            .unwrap_or_else(|| sqlite_url(&self.dir));
        let mut config = bench_config(self.downstream, self.payload_bytes, execute);
        if let Some(retention) = &self.retention {
            config = config.extra(&format!("[retention]\n{retention}"));
        }
        if let Some(notify) = &self.notify_config {
            config = config.notify(notify);
        }
        let config_path = config
            .write(&self.dir, &storage)
            .with_context(|| format!("write the config into {}", self.dir.display()))?;
        Ok(ServerProcess::start(&self.exe, &config_path, &self.dir.join("server.log")).await?)
    }

    /// Another node on the same config (and so the same shared database).
    async fn start_another(&self, n: usize) -> Result<ServerProcess> {
        let config_path = self.dir.join("ripen.toml");
        let log = self.dir.join(format!("server-{n}.log"));
        Ok(ServerProcess::start(&self.exe, &config_path, &log).await?)
    }

    /// Floods an intake-only node, kills it with SIGKILL mid-flood, and times
    /// a new server from spawn to its first `/readyz` 200.
    async fn restart_after_kill(&self, args: &Options, pad: &Arc<String>) -> Result<Restart> {
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
                auth: None,
                progress: None,
            },
            pad.clone(),
            args.payload_bytes,
        ));
        tokio::time::sleep(FLOOD).await;
        // The child is killed with SIGKILL: no shutdown, no checkpoint.
        server.stop();
        // The clients see their connections cut and stop.
        let _ = flood.await;

        let spawned = Instant::now();
        let server = self.start(false).await?;
        server.wait_ready(READYZ_TIMEOUT).await?;
        let ready_after = spawned.elapsed();
        let peak_rss_bytes = server.peak_rss_bytes();
        server.stop();
        Ok(Restart {
            ready_after,
            peak_rss_bytes,
        })
    }
}

/// The SQLite files of a data directory: the main file and its
/// write-ahead log.
const DB_FILES: [&str; 2] = ["ripen.db", "ripen.db-wal"];

/// The sizes of [`DB_FILES`] in `dir`, `None` for a file that is not there.
fn db_file_sizes(dir: &Path) -> [Option<u64>; 2] {
    DB_FILES.map(|name| std::fs::metadata(dir.join(name)).ok().map(|m| m.len()))
}

/// The total size of the database files in `dir`.
fn db_size(dir: &Path) -> String {
    DB_FILES
        .iter()
        .zip(db_file_sizes(dir))
        .filter_map(|(name, len)| len.map(|len| format!("{name} {:.0} MiB", mib(len))))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The bytes of the free pages of the SQLite file at `path`, from its
/// header (page size at offset 16, free page count at offset 36). In WAL
/// mode the header on disk is the one of the last checkpoint, so this is
/// the free space as of then; `None` if the file has no SQLite header yet.
fn free_bytes_at_checkpoint(path: &Path) -> Option<u64> {
    use std::io::Read as _;
    let mut header = [0u8; 100];
    std::fs::File::open(path)
        .ok()?
        .read_exact(&mut header)
        .ok()?;
    if &header[..16] != b"SQLite format 3\0" {
        return None;
    }
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536,
        n => u64::from(n),
    };
    let free_pages = u32::from_be_bytes([header[36], header[37], header[38], header[39]]);
    Some(page_size * u64::from(free_pages))
}

/// The size of a SQLite data directory at one moment of the `million`
/// preload.
#[derive(Clone, Debug, PartialEq)]
struct SizeSample {
    /// Since the preload started.
    at: Duration,
    /// Submissions acknowledged by then.
    submitted: usize,
    main_bytes: u64,
    wal_bytes: u64,
    /// See [`free_bytes_at_checkpoint`].
    free_bytes: Option<u64>,
}

impl SizeSample {
    fn take(dir: &Path, at: Duration, submitted: usize) -> SizeSample {
        let [main, wal] = db_file_sizes(dir);
        SizeSample {
            at,
            submitted,
            main_bytes: main.unwrap_or(0),
            wal_bytes: wal.unwrap_or(0),
            free_bytes: free_bytes_at_checkpoint(&dir.join(DB_FILES[0])),
        }
    }

    fn total_bytes(&self) -> u64 {
        self.main_bytes + self.wal_bytes
    }

    fn free(&self) -> String {
        self.free_bytes
            .map_or("n/a".to_owned(), |b| format!("{:.0}", mib(b)))
    }

    /// `1M size: t=…s submitted=… db=… MiB (main … MiB, wal … MiB, free … MiB)`.
    fn line(&self) -> String {
        format!(
            "1M size: t={:.0}s submitted={} db={:.0} MiB (main {:.0} MiB, wal {:.0} MiB, free {} MiB)",
            self.at.as_secs_f64(),
            group(self.submitted as f64),
            mib(self.total_bytes()),
            mib(self.main_bytes),
            mib(self.wal_bytes),
            self.free()
        )
    }
}

/// Samples the SQLite files of the `million` preload every
/// [`SIZE_SAMPLE_INTERVAL`] on a task of its own (two `stat`s and one
/// 100-byte read, so the submitting clients do not wait for it), printing
/// each sample as it takes it.
struct SizeSampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<SizeSample>>,
}

impl SizeSampler {
    fn start(dir: PathBuf, started: Instant, submitted: Arc<AtomicUsize>) -> SizeSampler {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut ticks = tokio::time::interval_at(
                (started + SIZE_SAMPLE_INTERVAL).into(),
                SIZE_SAMPLE_INTERVAL,
            );
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sample = || {
                let s =
                    SizeSample::take(&dir, started.elapsed(), submitted.load(Ordering::Relaxed));
                println!("{}", s.line());
                samples.push(s);
            };
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = ticks.tick() => sample(),
                }
            }
            // The last one, at the end of the phase.
            sample();
            samples
        });
        SizeSampler { stop, task }
    }

    /// Takes the last sample and returns them all.
    async fn finish(self) -> Vec<SizeSample> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_else(|e| {
            println!("1M size: the sampler failed: {e}");
            Vec::new()
        })
    }
}

/// At most about `max` of `samples`, evenly spaced, always with the last.
fn thin(samples: &[SizeSample], max: usize) -> Vec<&SizeSample> {
    let step = samples.len().div_ceil(max.max(1)).max(1);
    let mut kept: Vec<&SizeSample> = samples.iter().step_by(step).collect();
    if let Some(last) = samples.last() {
        if kept.last().is_none_or(|k| !std::ptr::eq(*k, last)) {
            kept.push(last);
        }
    }
    kept
}

/// The preload's size samples as a table (from the summary).
fn print_size_table(samples: &[SizeSample], preload: Option<(usize, Duration)>) {
    if samples.is_empty() {
        return;
    }
    println!();
    print!("1M preload: SQLite files over time");
    if let Some((entities, took)) = preload {
        print!(
            " ({} entities in {:.0} s, {}/s)",
            group(entities as f64),
            took.as_secs_f64(),
            group(entities as f64 / took.as_secs_f64())
        );
    }
    println!("; free is as of the last checkpoint");
    println!(
        "{:>7} {:>11} {:>9} {:>9} {:>9} {:>9}",
        "t (s)", "submitted", "db MiB", "main MiB", "wal MiB", "free MiB"
    );
    for s in thin(samples, SIZE_TABLE_ROWS_MAX) {
        println!(
            "{:>7.0} {:>11} {:>9.0} {:>9.0} {:>9.0} {:>9}",
            s.at.as_secs_f64(),
            group(s.submitted as f64),
            mib(s.total_bytes()),
            mib(s.main_bytes),
            mib(s.wal_bytes),
            s.free()
        );
    }
    println!();
}

/// A server and what a row needs around it.
struct Bench<'a> {
    args: &'a Options,
    pad: Arc<String>,
    server: ServerProcess,
    /// Further nodes on the same shared database (`--nodes`).
    others: Vec<ServerProcess>,
    /// `Authorization` of every request, with `--auth`.
    auth: Option<String>,
    /// Counts contract violations; the 1M row counts its shared one itself.
    downstream: Option<Downstream>,
    /// Removed after the server is killed (fields drop in order).
    _dir: Option<TempDir>,
}

/// Makes a key with every scope on a server that has none yet (it runs
/// open until then), and returns it.
async fn make_key(client: &Client) -> Result<String> {
    let body = r#"{"scopes": ["submit", "read", "operate", "admin", "worker"], "name": "bench"}"#;
    let r = client
        .request(
            ripen_client::Method::POST,
            "/v1/keys",
            &[("content-type", "application/json")],
            Some(bytes::Bytes::from_static(body.as_bytes())),
        )
        .await
        .and_then(|r| r.expect(ripen_client::StatusCode::CREATED))
        .context("create the bench's API key")?;
    let v: serde_json::Value = serde_json::from_slice(&r.body).context("the key's answer")?;
    v["key"]
        .as_str()
        .map(str::to_owned)
        .context("the key's answer has no key")
}

impl<'a> Bench<'a> {
    /// A fresh server on a fresh database, running steps or not.
    async fn fresh(args: &'a Options, pad: &Arc<String>, execute: bool) -> Result<Bench<'a>> {
        let downstream = Downstream::with_profile(Profile::noop())
            .await
            .context("start the fake downstream")?;
        let dir = TempDir::new("ripen-bench-").context("create the bench's temporary directory")?;
        let node = Node {
            exe: args.exe.clone(),
            dir: dir.path().to_owned(),
            downstream: downstream.addr(),
            payload_bytes: args.payload_bytes,
            storage: args.storage.clone(),
            retention: args.retention.clone(),
            notify_config: args.notify_config.clone(),
        };
        let mut server = node.start(execute).await?;
        let mut others = Vec::new();
        for i in 2..=args.nodes {
            others.push(node.start_another(i).await?);
        }
        let auth = if args.auth {
            let key = make_key(server.client()).await?;
            for s in std::iter::once(&mut server).chain(others.iter_mut()) {
                s.use_api_key(&key)?;
            }
            Some(format!("Bearer {key}"))
        } else {
            None
        };
        Ok(Bench {
            args,
            pad: pad.clone(),
            server,
            others,
            auth,
            downstream: Some(downstream),
            _dir: if std::env::var_os("RIPEN_BENCH_KEEP").is_some() {
                println!("keeping {}", dir.keep().display());
                None
            } else {
                Some(dir)
            },
        })
    }

    /// A bench on a server whose store outlives it (the `--million` rows).
    fn on(args: &'a Options, pad: &Arc<String>, server: ServerProcess) -> Bench<'a> {
        Bench {
            args,
            pad: pad.clone(),
            server,
            others: Vec::new(),
            auth: None,
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
                auth: self.auth.clone(),
                progress: None,
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
                auth: self.auth.clone(),
                progress: None,
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
                auth: self.auth.clone(),
                progress: None,
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

    /// The W5 row with one webhook subscription to every event: its
    /// figures, and the delivery lag the receiver saw.
    async fn notify_row(self, errors: &mut Errors) -> Result<(W5Figures, LagFigures)> {
        let receiver = Downstream::start().await;
        // Instants of arrival, told apart from wall-clock commit times.
        let (base_instant, base_wall) = (Instant::now(), SystemTime::now());
        let client = self.server.client().clone();
        let body = serde_json::json!({"url": receiver.url("/hook")});
        client
            .request(
                ripen_client::Method::POST,
                "/v1/subscriptions",
                &[],
                Some(body.to_string().into()),
            )
            .await
            .and_then(|r| r.expect(ripen_client::StatusCode::CREATED))
            .context("create the bench's subscription")?;
        let figures = self.w5_row_with(errors, Some(&receiver)).await?;
        let calls = receiver.calls_to("/hook");
        let mut lags: Vec<Duration> = calls
            .iter()
            .filter(|c| c.succeeded())
            .filter_map(|c| {
                let at = c.body.as_ref()?.get("timestamp")?.as_str()?;
                let committed = parse_time(at).ok()?;
                let arrived = base_wall + c.received_at.duration_since(base_instant);
                Some(arrived.duration_since(committed).unwrap_or_default())
            })
            .collect();
        lags.sort_unstable();
        Ok((
            figures,
            LagFigures {
                delivered: lags.len(),
                p50: percentile(&lags, 0.50),
                p99: percentile(&lags, 0.99),
            },
        ))
    }

    async fn w5_row(self, errors: &mut Errors) -> Result<W5Figures> {
        self.w5_row_with(errors, None).await
    }

    /// The W5 row; with `receiver`, it also waits for the receiver to get
    /// both notifications (created, ready) of every entity before the
    /// server stops.
    async fn w5_row_with(
        mut self,
        errors: &mut Errors,
        receiver: Option<&Downstream>,
    ) -> Result<W5Figures> {
        let mut addrs = vec![self.server.addr()?];
        for other in &self.others {
            addrs.push(other.addr()?);
        }
        let client = self.server.client().clone();
        // A reused store may hold pending entities of earlier runs; they are
        // not this row's work.
        wait_until_settled(&mut self.server).await?;
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
                auth: self.auth.clone(),
                progress: None,
            },
            self.pad.clone(),
            self.args.payload_bytes,
        )
        .await;
        errors.merge(phase.errors);
        wait_until_settled(&mut self.server).await?;
        let cpu = cpu_cores(cpu_before, &self.server, started.elapsed());
        // The server's own CPU time over the whole run, intake and pipeline,
        // shared out over the entities it acknowledged.
        let cpu_ms_per_entity = match (cpu_before.0, self.server.cpu_ticks()) {
            (Some(before), Some(after)) if phase.accepted > 0 => {
                Some((after - before) as f64 / CLOCK_TICKS_PER_S * 1000.0 / phase.accepted as f64)
            }
            _ => None,
        };

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
        if let Some(receiver) = receiver {
            // The probe's entities notify too.
            let want = 2 * (phase.accepted + unloaded.len());
            let deadline = Instant::now() + SETTLE_TIMEOUT;
            loop {
                let got = receiver
                    .calls_to("/hook")
                    .iter()
                    .filter(|c| c.succeeded())
                    .count();
                if got >= want {
                    break;
                }
                if Instant::now() > deadline {
                    errors.add(
                        "missing deliveries",
                        format!("the receiver got {got} of {want} notifications"),
                    );
                    break;
                }
                tokio::time::sleep(SETTLE_POLL_INTERVAL).await;
            }
        }
        self.server.check_alive()?;
        let peak_rss_bytes = self.server.peak_rss_bytes();
        self.server.stop();
        for mut other in std::mem::take(&mut self.others) {
            other.check_alive()?;
            other.stop();
        }
        if let Some(downstream) = &self.downstream {
            add_violations(errors, downstream.stats());
        }
        Ok(W5Figures {
            ready_per_s,
            p50: percentile(&latencies, 0.50),
            p99: percentile(&latencies, 0.99),
            unloaded_p50: percentile(&unloaded, 0.50),
            cpu,
            cpu_ms_per_entity,
            peak_rss_bytes,
        })
    }

    /// W5 with `b` and `c` served by in-process SDK workers: throughput,
    /// submit-to-ready, and how long a runnable worker step waits for a
    /// long-polling claim to take it.
    async fn workers_row(mut self, errors: &mut Errors) -> Result<WorkerFigures> {
        let addr = self.server.addr()?;
        let client = self.server.client().clone();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut workers = JoinSet::new();
        for i in 0..WORKERS {
            let mut stopped = stopped.clone();
            let worker = Worker::with_client(client.clone(), WORKER_QUEUE)
                .concurrency(WORKER_CONCURRENCY)
                .worker_id(format!("bench-{i}"));
            workers.spawn(worker.run_until(
                async move {
                    let _ = stopped.wait_for(|s| *s).await;
                },
                |_task: Task| async { Ok::<_, TaskError>(serde_json::json!({})) },
            ));
        }
        wait_until_settled(&mut self.server).await?;
        let started_at = SystemTime::now();
        let phase = submit_phase(
            vec![addr],
            SubmitPlan {
                type_name: WORKER_TYPE,
                key_prefix: self.key_prefix("workers"),
                count: self.args.worker_entities,
                clients: self.args.clients,
                rate_per_s: None,
                auth: self.auth.clone(),
                progress: None,
            },
            self.pad.clone(),
            self.args.payload_bytes,
        )
        .await;
        errors.merge(phase.errors);
        wait_until_settled(&mut self.server).await?;

        let mut entities = list_newest(&client, WORKER_TYPE, phase.accepted, errors).await?;
        let since = started_at - Duration::from_secs(1);
        entities.retain(|e| parse_time(&e.created_at).is_ok_and(|t| t >= since));
        if entities.len() != phase.accepted {
            errors.add(
                "entity count mismatch",
                format!(
                    "GET /v1/entities?type={WORKER_TYPE} listed {} entities created by this row, {} were acknowledged with 202",
                    entities.len(),
                    phase.accepted
                ),
            );
        }
        let (ready_per_s, mut latencies) = pipeline_figures(&entities, errors);
        latencies.sort_unstable();
        let step = (entities.len() / WAKE_SAMPLE_MAX).max(1);
        let sample: Vec<String> = entities
            .iter()
            .step_by(step)
            .map(|e| e.id.clone())
            .collect();
        let mut loaded_wake_ups = wake_ups(&client, sample, errors).await?;
        loaded_wake_ups.sort_unstable();

        let probes = probe_unloaded_on(&client, WORKER_TYPE, errors).await?;
        let mut unloaded: Vec<Duration> = probes.iter().map(|(_, l)| *l).collect();
        unloaded.sort_unstable();
        let ids = probes.into_iter().map(|(id, _)| id).collect();
        let mut unloaded_wake_ups = wake_ups(&client, ids, errors).await?;
        unloaded_wake_ups.sort_unstable();

        let _ = stop.send(true);
        while let Some(done) = workers.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.add("worker stopped", e.to_string()),
                Err(e) => errors.add("worker panicked", e.to_string()),
            }
        }
        self.server.check_alive()?;
        self.server.stop();
        if let Some(downstream) = &self.downstream {
            add_violations(errors, downstream.stats());
        }
        Ok(WorkerFigures {
            ready_per_s,
            p50: percentile(&latencies, 0.50),
            p99: percentile(&latencies, 0.99),
            wake_p50: percentile(&loaded_wake_ups, 0.50),
            wake_p99: percentile(&loaded_wake_ups, 0.99),
            unloaded_p50: percentile(&unloaded, 0.50),
            unloaded_wake_p50: percentile(&unloaded_wake_ups, 0.50),
            unloaded_wake_p99: percentile(&unloaded_wake_ups, 0.99),
        })
    }

    /// Intake on a node that executes: a burst of W5 entities as fast as the
    /// clients can send them, while the pipelines start on the first ones;
    /// then the time from the last ack until every entity has settled.
    async fn burst_row(mut self, errors: &mut Errors) -> Result<BurstFigures> {
        let addr = self.server.addr()?;
        let client = self.server.client().clone();
        let phase = submit_phase(
            vec![addr],
            SubmitPlan {
                type_name: "w5",
                key_prefix: self.key_prefix("burst"),
                count: self.args.burst_entities,
                clients: self.args.burst_clients,
                rate_per_s: None,
                auth: self.auth.clone(),
                progress: None,
            },
            self.pad.clone(),
            self.args.payload_bytes,
        )
        .await;
        let acked = Instant::now();
        errors.merge(phase.errors);
        wait_until_settled(&mut self.server).await?;
        let catch_up = acked.elapsed();
        let failed = client
            .list(&ListQuery {
                type_name: Some("w5"),
                status: Some(EntityStatus::Failed),
                limit: Some(1),
                after: None,
            })
            .await
            .context("ask for failed entities")?;
        if let Some(entity) = failed.items.first() {
            errors.add(
                "entity failed",
                format!(
                    "burst entity {} failed: {}",
                    entity.id,
                    entity.failed_steps()
                ),
            );
        }
        let mut latencies = phase.latencies;
        latencies.sort_unstable();
        self.server.check_alive()?;
        self.server.stop();
        if let Some(downstream) = &self.downstream {
            add_violations(errors, downstream.stats());
        }
        Ok(BurstFigures {
            acks_per_s: phase.accepted as f64 / phase.wall.as_secs_f64().max(1e-6),
            p50: percentile(&latencies, 0.50),
            p99: percentile(&latencies, 0.99),
            catch_up,
        })
    }
}

/// The figures of one burst run.
struct BurstFigures {
    acks_per_s: f64,
    p50: Duration,
    p99: Duration,
    /// From the last ack to the last entity settled.
    catch_up: Duration,
}

impl BurstFigures {
    fn line(&self) -> String {
        format!(
            "{} acks/s (p50 {}, p99 {}) while executing | all settled {:.2} s after the last ack",
            group(self.acks_per_s),
            ms(self.p50),
            ms(self.p99),
            self.catch_up.as_secs_f64()
        )
    }
}

/// The figures of one run of W5 with worker steps.
struct WorkerFigures {
    ready_per_s: f64,
    p50: Duration,
    p99: Duration,
    /// From the commit that made `b` or `c` runnable to the commit of its
    /// claim, under load: mostly the wait in the queue behind the burst,
    /// since the workers are busy; the unloaded figures are the wake-up.
    wake_p50: Duration,
    wake_p99: Duration,
    unloaded_p50: Duration,
    unloaded_wake_p50: Duration,
    unloaded_wake_p99: Duration,
}

impl WorkerFigures {
    fn line(&self) -> String {
        format!(
            "ready {}/s (submit->ready p50 {}, p99 {}) | runnable->claimed p50 {}, p99 {} | unloaded: submit->ready p50 {}, wake-up p50 {}, p99 {}",
            group(self.ready_per_s),
            ms(self.p50),
            ms(self.p99),
            ms(self.wake_p50),
            ms(self.wake_p99),
            ms(self.unloaded_p50),
            ms(self.unloaded_wake_p50),
            ms(self.unloaded_wake_p99)
        )
    }
}

/// The long-poll wake-ups of the worker steps `b` and `c` of the given
/// entities, from their histories: each first claim (`step_started`,
/// attempt 1) minus the success of `a`, the commit that made it runnable.
async fn wake_ups(client: &Client, ids: Vec<String>, errors: &mut Errors) -> Result<Vec<Duration>> {
    let mut readers = JoinSet::new();
    let chunk = ids.len().div_ceil(WAKE_SAMPLE_READERS).max(1);
    for part in ids.chunks(chunk) {
        let client = client.clone();
        let part = part.to_vec();
        readers.spawn(async move {
            let mut histories = Vec::with_capacity(part.len());
            for id in part {
                let events = client
                    .events(&id, None, None)
                    .await
                    .with_context(|| format!("GET /v1/entities/{id}/events"))?;
                histories.push((id, events));
            }
            anyhow::Ok(histories)
        });
    }
    let mut wake_ups = Vec::new();
    while let Some(done) = readers.join_next().await {
        for (id, events) in done.context("join a history reader")?? {
            let at = |kind: &str, step: &str| {
                events
                    .iter()
                    .find(|e| {
                        e.kind == kind && e.step.as_deref() == Some(step) && e.attempt == Some(1)
                    })
                    .and_then(|e| parse_time(&e.at).ok())
            };
            let Some(runnable) = at("step_succeeded", "a") else {
                errors.add("no success of a", format!("entity {id}"));
                continue;
            };
            for step in ["b", "c"] {
                match at("step_started", step).map(|t| t.duration_since(runnable)) {
                    Some(Ok(wait)) => wake_ups.push(wait),
                    Some(Err(_)) => errors.add(
                        "claimed before runnable",
                        format!("entity {id}: {step} started before a succeeded"),
                    ),
                    None => errors.add(
                        "worker step never claimed",
                        format!("entity {id} step {step}"),
                    ),
                }
            }
        }
    }
    Ok(wake_ups)
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
        if entity.status != EntityStatus::Ready {
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
    /// The server's CPU time per entity, in milliseconds.
    cpu_ms_per_entity: Option<f64>,
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
        if let Some(cpu_ms) = self.cpu_ms_per_entity {
            let _ = write!(line, " | server CPU {cpu_ms:.3} ms/entity");
        }
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
    burst: Vec<BurstFigures>,
    w5: Vec<W5Figures>,
    million_intake: Vec<IntakeFigures>,
    million_w5: Vec<W5Figures>,
    million_restart: Vec<Restart>,
    /// The `million` preload: entities, and the time until all settled.
    million_preload: Option<(usize, Duration)>,
    /// The `million` preload's SQLite sizes, every [`SIZE_SAMPLE_INTERVAL`].
    million_sizes: Vec<SizeSample>,
    workers: Vec<WorkerFigures>,
    notify: Vec<(W5Figures, LagFigures)>,
}

/// How late a webhook receiver got the notifications of a W5 run.
struct LagFigures {
    delivered: usize,
    /// From a status change's commit to its arrival at the receiver.
    p50: Duration,
    p99: Duration,
}

impl LagFigures {
    fn line(&self) -> String {
        format!(
            "{} deliveries, commit->delivery p50 {}, p99 {}",
            group(self.delivered as f64),
            ms(self.p50),
            ms(self.p99)
        )
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

struct SubmitPlan {
    type_name: &'static str,
    /// Each request carries the key `{prefix}-{seq}`; none without a prefix.
    key_prefix: Option<String>,
    count: usize,
    clients: usize,
    /// `None` submits as fast as the server answers; otherwise requests are
    /// spread evenly at this overall rate.
    rate_per_s: Option<f64>,
    /// `Authorization` of every request, with `--auth`.
    auth: Option<String>,
    /// Counts acknowledged submissions as they come, for whoever watches
    /// the phase from outside (the size sampler of the `million` preload).
    progress: Option<Arc<AtomicUsize>>,
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
                if let Some(auth) = &plan.auth {
                    let _ = write!(request, "authorization: {auth}\r\n");
                }
                request.extend_from_slice(b"\r\n");
                request.extend_from_slice(&body);
                let sent = Instant::now();
                match conn.round_trip(&request).await {
                    Ok(202) => {
                        latencies.push(sent.elapsed());
                        if let Some(progress) = &plan.progress {
                            progress.fetch_add(1, Ordering::Relaxed);
                        }
                    }
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

/// Waits until no entity is pending, asking `GET /v1/entities?status=pending&limit=1`.
async fn wait_until_settled(server: &mut ServerProcess) -> Result<()> {
    let client = server.client().clone();
    let pending = ListQuery {
        status: Some(EntityStatus::Pending),
        limit: Some(1),
        ..ListQuery::default()
    };
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let page = client
            .list(&pending)
            .await
            .context("ask for pending entities")?;
        let Some(first) = page.items.first() else {
            return Ok(());
        };
        if Instant::now() >= deadline {
            bail!(
                "entities were still pending after {} (for example {})",
                humantime::format_duration(SETTLE_TIMEOUT),
                first.id
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
        let query = ListQuery {
            type_name: Some(type_name),
            limit: Some(LIST_PAGE_LIMIT),
            after: after.as_deref(),
            ..ListQuery::default()
        };
        let page = client
            .list(&query)
            .await
            .with_context(|| format!("list entities: GET {}", query.path()))?;
        ensure!(
            page.items.len() <= LIST_PAGE_LIMIT as usize,
            "GET {} returned {} items, more than the limit",
            query.path(),
            page.items.len()
        );
        for entity in page.items {
            if seen.insert(entity.id.clone()) {
                entities.push(entity);
            } else {
                errors.add(
                    "entity listed twice",
                    format!(
                        "entity {} appeared twice while paging (at {})",
                        entity.id,
                        query.path()
                    ),
                );
            }
        }
        if entities.len() >= count {
            entities.truncate(count);
            return Ok(entities);
        }
        match page.next {
            None => return Ok(entities),
            Some(cursor) => {
                ensure!(
                    cursors.insert(cursor.clone()),
                    "GET {} returned the cursor {cursor:?} a second time; paging would never end",
                    query.path()
                );
                after = Some(cursor);
            }
        }
    }
}

/// Submits entities one at a time, each after the previous one settled, and
/// returns their server-side submit-to-ready latencies, sorted.
async fn probe_unloaded(client: &Client, errors: &mut Errors) -> Result<Vec<Duration>> {
    let mut latencies: Vec<Duration> = probe_unloaded_on(client, "w5", errors)
        .await?
        .into_iter()
        .map(|(_, latency)| latency)
        .collect();
    latencies.sort_unstable();
    Ok(latencies)
}

/// [`probe_unloaded`] on entity type `type_name`: each ready entity's id and
/// submit-to-ready latency, in submission order.
async fn probe_unloaded_on(
    client: &Client,
    type_name: &str,
    errors: &mut Errors,
) -> Result<Vec<(String, Duration)>> {
    let mut latencies = Vec::with_capacity(UNLOADED_PROBE_ENTITIES);
    let nonce = fastrand::u64(..);
    for seq in 0..UNLOADED_PROBE_ENTITIES {
        let key = format!("bench-{nonce:016x}-probe-{seq}");
        let body = serde_json::json!({"seq": seq, "name": "probe"}).to_string();
        let accepted = match client.submit(type_name, body, Some(&key)).await {
            Ok(submitted) => submitted.view,
            Err(error) if error.response().is_some() => {
                errors.add(
                    format!(
                        "intake answered {}",
                        error.status().map_or(0, |s| s.as_u16())
                    ),
                    format!("POST /v1/entities/{type_name} (probe): {error}"),
                );
                continue;
            }
            Err(error) => return Err(error).context("submit a probe entity"),
        };
        let deadline = Instant::now() + UNLOADED_PROBE_TIMEOUT;
        let entity = loop {
            let entity = client
                .get(&accepted.id)
                .await
                .with_context(|| format!("GET /v1/entities/{}", accepted.id))?;
            if entity.status != EntityStatus::Pending {
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
        match submit_to_ready(&entity) {
            Ok(latency) => latencies.push((entity.id, latency)),
            Err(error) => errors.add("probe entity not ready", format!("{error:#}")),
        }
    }
    Ok(latencies)
}

/// The bench's configuration: the five-step `w5` pipeline and the one-step
/// `bulk` type that the `million` row preloads, both against `downstream`,
/// with the server's own engine defaults and retry policy.
fn bench_config(downstream: SocketAddr, payload_bytes: usize, execute: bool) -> Config {
    let step = |name: &str, needs: &[&str]| {
        Step::http(name, format!("http://{downstream}/{name}"))
            .needs(needs)
            .timeout("10s")
            .default_retry()
    };
    let w5 = TypeDef::new(
        "w5",
        vec![
            step("a", &[]),
            step("b", &["a"]),
            step("c", &["a"]),
            step("d", &["b", "c"]),
            step("e", &["a"]).non_critical(),
        ],
    );
    let bulk = TypeDef::new("bulk", vec![step("a", &[])]);
    let worker_step = |name: &str| {
        Step::worker(name, WORKER_QUEUE)
            .needs(&["a"])
            .timeout("10s")
            .default_retry()
    };
    let w5w = TypeDef::new(
        WORKER_TYPE,
        vec![
            step("a", &[]),
            worker_step("b"),
            worker_step("c"),
            step("d", &["b", "c"]),
            step("e", &["a"]).non_critical(),
        ],
    );
    let mut config = Config::bare()
        // The webhook row's receiver listens on loopback.
        .notify("allow_networks = [\"127.0.0.0/8\"]")
        .execute(execute)
        .with_type(w5)
        .with_type(bulk)
        .with_type(w5w);
    // Leave room for the JSON around the padding.
    let body_limit_bytes = payload_bytes * 2 + 4096;
    if body_limit_bytes > DEFAULT_BODY_LIMIT_BYTES {
        config = config.body_limit(body_limit_bytes as u64);
    }
    config
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
    print_size_table(&f.million_sizes, f.million_preload);
    let msf = |d: Duration| d.as_secs_f64() * 1000.0;
    let intake = |fs: &[IntakeFigures], g: &dyn Fn(&IntakeFigures) -> f64| -> Vec<f64> {
        fs.iter().map(g).collect()
    };
    let w5 = |fs: &[W5Figures], g: &dyn Fn(&W5Figures) -> f64| -> Vec<f64> {
        fs.iter().map(g).collect()
    };
    let rss = |a: Vec<Option<u64>>| -> Vec<f64> { a.into_iter().flatten().map(mib).collect() };
    let burst = |g: &dyn Fn(&BurstFigures) -> f64| -> Vec<f64> { f.burst.iter().map(g).collect() };
    let half = group(HALF_RATE_PER_S);
    let mut rows = vec![
        Row::new(
            "intake acks/s (intake-only node)",
            intake(&f.intake, &|r| r.acks_per_s),
            0,
        )
        .target(format!(">= {}", group(INTAKE_TARGET_PER_S)), |v| {
            v >= INTAKE_TARGET_PER_S
        }),
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
            &format!("intake p50 at {half}/s (ms)"),
            intake(&f.intake, &|r| msf(r.half_p50)),
            2,
        ),
        Row::new(
            &format!("intake p99 at {half}/s (ms)"),
            intake(&f.intake, &|r| msf(r.half_p99)),
            2,
        )
        .target(format!("<= {HALF_RATE_P99_TARGET_MS}"), |v| {
            v <= HALF_RATE_P99_TARGET_MS
        }),
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
        Row::new(
            "burst intake acks/s (executing node)",
            burst(&|r| r.acks_per_s),
            0,
        )
        .target(format!(">= {}", group(BURST_INTAKE_TARGET_PER_S)), |v| {
            v >= BURST_INTAKE_TARGET_PER_S
        }),
        Row::new("  burst ack p99 (ms)", burst(&|r| msf(r.p99)), 2)
            .target(format!("<= {BURST_P99_TARGET_MS}"), |v| {
                v <= BURST_P99_TARGET_MS
            }),
        Row::new(
            "  burst catch-up, all settled (s)",
            burst(&|r| r.catch_up.as_secs_f64()),
            2,
        ),
        if postgres {
            Row::new("W5 entities ready/s", w5(&f.w5, &|r| r.ready_per_s), 0)
                .target(format!(">= {}", group(PG_READY_TARGET_PER_S)), |v| {
                    v >= PG_READY_TARGET_PER_S
                })
        } else {
            Row::new("W5 entities ready/s", w5(&f.w5, &|r| r.ready_per_s), 0)
                .target(format!(">= {}", group(READY_TARGET_PER_S)), |v| {
                    v >= READY_TARGET_PER_S
                })
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
                row.target(format!("<= {UNLOADED_P50_TARGET_MS}"), |v| {
                    v <= UNLOADED_P50_TARGET_MS
                })
            }
        },
        Row::new(
            "server CPU per W5 entity (ms)",
            w5(&f.w5, &|r| r.cpu_ms_per_entity.unwrap_or(f64::NAN)),
            3,
        )
        .target(format!("<= {CPU_PER_ENTITY_TARGET_MS}"), |v| {
            v <= CPU_PER_ENTITY_TARGET_MS
        }),
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
    if !f.notify.is_empty() {
        let plain = median(&w5(&f.w5, &|r| r.ready_per_s));
        let notify = |g: &dyn Fn(&(W5Figures, LagFigures)) -> f64| -> Vec<f64> {
            f.notify.iter().map(g).collect()
        };
        let mut row = Row::new(
            "W5 with a webhook: ready/s",
            notify(&|(r, _)| r.ready_per_s),
            0,
        );
        if let Some(b) = plain {
            row = row.target(format!(">= {} (85% of W5)", group(0.85 * b)), move |v| {
                v >= 0.85 * b
            });
        }
        rows.extend([
            row,
            Row::new(
                "  webhook commit->delivery p50 (ms)",
                notify(&|(_, l)| msf(l.p50)),
                2,
            ),
            Row::new(
                "  webhook commit->delivery p99 (ms)",
                notify(&|(_, l)| msf(l.p99)),
                2,
            ),
        ]);
    }
    let workers =
        |g: &dyn Fn(&WorkerFigures) -> f64| -> Vec<f64> { f.workers.iter().map(g).collect() };
    rows.extend([
        Row::new("W5 with workers: ready/s", workers(&|r| r.ready_per_s), 0),
        Row::new(
            "  workers submit->ready p50 (ms)",
            workers(&|r| msf(r.p50)),
            2,
        ),
        Row::new(
            "  workers submit->ready p99 (ms)",
            workers(&|r| msf(r.p99)),
            2,
        ),
        Row::new(
            "  worker claim wait p50 loaded (ms)",
            workers(&|r| msf(r.wake_p50)),
            2,
        ),
        Row::new(
            "  worker claim wait p99 loaded (ms)",
            workers(&|r| msf(r.wake_p99)),
            2,
        ),
        Row::new(
            "  worker wake-up p50 unloaded (ms)",
            workers(&|r| msf(r.unloaded_wake_p50)),
            2,
        ),
        Row::new(
            "  worker wake-up p99 unloaded (ms)",
            workers(&|r| msf(r.unloaded_wake_p99)),
            2,
        ),
        Row::new(
            "  workers submit->ready p50 unl. (ms)",
            workers(&|r| msf(r.unloaded_p50)),
            2,
        ),
    ]);
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
                &format!("1M: intake p99 at {half}/s (ms)"),
                intake(&f.million_intake, &|r| msf(r.half_p99)),
                2,
            )
            .target(format!("<= {HALF_RATE_P99_TARGET_MS}"), |v| {
                v <= HALF_RATE_P99_TARGET_MS
            }),
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

fn parse_time(value: &str) -> Result<SystemTime> {
    humantime::parse_rfc3339(value)
        .with_context(|| format!("{value:?} is not an RFC 3339 UTC time"))
}

/// `ready_at − created_at`; an error unless the entity is ready.
fn submit_to_ready(entity: &EntityView) -> Result<Duration> {
    ensure!(
        entity.status == EntityStatus::Ready,
        "entity {} is {}: {}",
        entity.id,
        entity.status,
        entity.failed_steps()
    );
    let ready_at = entity
        .ready_at
        .as_deref()
        .with_context(|| format!("entity {} is ready without ready_at", entity.id))?;
    let created = parse_time(&entity.created_at)?;
    let ready = parse_time(ready_at)?;
    ready.duration_since(created).with_context(|| {
        format!(
            "entity {}: ready_at {ready_at} is before created_at {}",
            entity.id, entity.created_at
        )
    })
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
        let addr: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let dir = TempDir::new("ripen-bench-test-").unwrap();
        let config = bench_config(addr, 1024, false)
            .render_on(dir.path(), "sqlite:///tmp/x/ripen.db")
            .unwrap();
        assert!(config.contains("[engine]\nexecute = false"));
        assert!(config.contains("[types.bulk]"));
        assert!(config.contains("url = \"sqlite:///tmp/x/ripen.db\""));
        assert!(config
            .contains("name = \"d\"\nhttp = \"http://127.0.0.1:9000/d\"\nneeds = [\"b\", \"c\"]"));
        assert!(config.contains(
            "name = \"e\"\nhttp = \"http://127.0.0.1:9000/e\"\nneeds = [\"a\"]\ncritical = false"
        ));
        assert!(config.contains("[types.w5w]"));
        assert!(config.contains("name = \"b\"\nworker = \"bench\"\nneeds = [\"a\"]"));
        assert!(!config.contains("body_limit_bytes"));
        assert!(!config.contains("retry"));
        assert!(bench_config(addr, 4 << 20, true)
            .render_on(dir.path(), "sqlite://x")
            .unwrap()
            .contains("body_limit_bytes = 8392704"));
    }

    fn sample(at_s: u64) -> SizeSample {
        SizeSample {
            at: Duration::from_secs(at_s),
            submitted: 1_234_567,
            main_bytes: 300 << 20,
            wal_bytes: 12 << 20,
            free_bytes: Some(3 << 20),
        }
    }

    #[test]
    fn a_size_sample_prints_as_one_line() {
        assert_eq!(
            sample(20).line(),
            "1M size: t=20s submitted=1,234,567 db=312 MiB (main 300 MiB, wal 12 MiB, free 3 MiB)"
        );
    }

    #[test]
    fn thinning_keeps_the_first_and_the_last() {
        let samples: Vec<SizeSample> = (1..=30).map(|i| sample(i * 10)).collect();
        let kept: Vec<u64> = thin(&samples, 6).iter().map(|s| s.at.as_secs()).collect();
        assert_eq!(kept, [10, 60, 110, 160, 210, 260, 300]);
        assert_eq!(thin(&samples[..3], 6).len(), 3);
        assert!(thin(&[], 6).is_empty());
    }

    #[test]
    fn free_pages_are_read_from_the_sqlite_header() {
        let dir = TempDir::new("ripen-bench-test-").unwrap();
        let path = dir.path().join("ripen.db");
        let mut header = vec![0u8; 100];
        header[..16].copy_from_slice(b"SQLite format 3\0");
        header[16..18].copy_from_slice(&4096u16.to_be_bytes());
        header[36..40].copy_from_slice(&25u32.to_be_bytes());
        std::fs::write(&path, &header).unwrap();
        assert_eq!(free_bytes_at_checkpoint(&path), Some(25 * 4096));
        std::fs::write(&path, b"not a database").unwrap();
        assert_eq!(free_bytes_at_checkpoint(&path), None);
    }
}
