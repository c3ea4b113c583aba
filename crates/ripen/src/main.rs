//! The `ripen` binary: the server and the commands that talk to it.

mod cli;
mod demo;
mod keys;
mod store;
mod subscriptions;
mod types;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use cli::ServerArg;

#[derive(Parser)]
#[command(
    name = "ripen",
    version,
    about = "Create entities through asynchronous pipelines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        /// The configuration file.
        #[arg(long, short, default_value = "ripen.toml")]
        config: PathBuf,
    },
    /// Submit an entity from a JSON file ("-" reads standard input).
    Submit {
        #[arg(value_name = "TYPE")]
        type_name: String,
        file: PathBuf,
        /// An idempotency key, so that submitting again is safe.
        #[arg(long)]
        key: Option<String>,
        /// Then follow its steps until it settles, as `ripen watch` does.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Print an entity's view.
    Status {
        id: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Follow an entity's steps until it settles.
    Watch {
        id: String,
        /// How often to ask, in milliseconds.
        #[arg(long, default_value_t = 250)]
        interval_ms: u64,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Read and operate entities: list, get, events, retry, cancel.
    Entities {
        #[command(subcommand)]
        command: cli::EntitiesCommand,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Webhook subscriptions and their deliveries: create, list, get, delete, deliveries, redeliver.
    Subscriptions {
        #[command(subcommand)]
        command: subscriptions::SubscriptionsCommand,
        #[command(flatten)]
        server: ServerArg,
    },
    /// API keys: create, list, revoke.
    Keys {
        #[command(subcommand)]
        command: keys::KeysCommand,
        #[command(flatten)]
        server: ServerArg,
    },
    /// The store of a configuration, offline: stats, prune (docs/retention.md).
    Store {
        #[command(subcommand)]
        command: store::StoreCommand,
    },
    /// The type registry: list, show, push.
    Types {
        #[command(subcommand)]
        command: types::TypesCommand,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Run a server with an example pipeline and a fake downstream, and submit entities to it.
    Demo(demo::DemoArgs),
    /// Measure intake and pipeline throughput against a real server on loopback.
    Bench(BenchArgs),
}

/// The flags of `ripen bench`; the bench itself is `ripen_bench`.
#[derive(clap::Args)]
struct BenchArgs {
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
    /// Entities of the burst row (intake on an executing node); 0 skips it.
    #[arg(long, default_value_t = 60_000)]
    burst_entities: usize,
    /// Concurrent clients of the burst row.
    #[arg(long, default_value_t = 64)]
    burst_clients: usize,
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
    /// Run only the intake rows (intake-only node and burst).
    #[arg(long, conflicts_with_all = ["w5_only", "workers_only"])]
    intake_only: bool,
    /// Run only the W5 rows.
    #[arg(long, conflicts_with = "workers_only")]
    w5_only: bool,
    /// Run only the W5 row whose steps b and c are served by remote
    /// workers (the Rust SDK, long-polling).
    #[arg(long)]
    workers_only: bool,
    /// Entities of the W5 row with worker steps; 0 skips it.
    #[arg(long, default_value_t = 10_000)]
    worker_entities: usize,
    /// Also run the W5 row with one webhook subscription (every event) on a
    /// local receiver, and report the delivery lag.
    #[arg(long)]
    notify: bool,
    /// Serve with API keys: every request carries a key, checked as in
    /// production (what authentication costs).
    #[arg(long)]
    auth: bool,
    /// Also run the 1,000,000-entity row (takes several minutes).
    #[arg(long)]
    million: bool,
    /// Settled entities preloaded for the `--million` row.
    #[arg(long, default_value_t = 1_000_000)]
    preload: usize,
    /// Submissions per second of the `--million` preload, spread evenly
    /// (default: as fast as the server answers, which outruns the pipeline).
    #[arg(long)]
    preload_rate: Option<f64>,
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
    /// The body of the servers' `[retention]` table, e.g.
    /// 'payload = "1s"' with 'interval = "1s"' on a new line: what pruning costs.
    #[arg(long)]
    retention: Option<String>,
    /// More lines of the servers' `[notify]` table, e.g.
    /// 'outbox_retention = "10s"' (outbox rows keep their entity from
    /// retention.entities).
    #[arg(long)]
    notify_config: Option<String>,
    /// Run only the `--million` preload, printing the size of the SQLite
    /// files every 10 s, and none of the other rows (implies --million).
    #[arg(long, conflicts_with_all = ["intake_only", "w5_only", "workers_only", "notify"])]
    preload_only: bool,
}

impl BenchArgs {
    /// The bench's options; the servers it starts are this very binary.
    fn into_options(self) -> Result<ripen_bench::Options> {
        Ok(ripen_bench::Options {
            exe: std::env::current_exe().context("find the ripen executable")?,
            runs: self.runs,
            intake_entities: self.intake_entities,
            intake_clients: self.intake_clients,
            burst_entities: self.burst_entities,
            burst_clients: self.burst_clients,
            entities: self.entities,
            clients: self.clients,
            payload_bytes: self.payload_bytes,
            no_keys: self.no_keys,
            intake_only: self.intake_only,
            w5_only: self.w5_only,
            workers_only: self.workers_only,
            worker_entities: self.worker_entities,
            notify: self.notify,
            auth: self.auth,
            million: self.million,
            preload: self.preload,
            preload_rate: self.preload_rate,
            storage: self.storage,
            nodes: self.nodes,
            data_dir: self.data_dir,
            retention: self.retention,
            notify_config: self.notify_config,
            preload_only: self.preload_only,
        })
    }
}

fn main() {
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Serve { .. } | Command::Demo(_) | Command::Bench(_)
    ) {
        cli::quiet_panics();
    }
    // A user's error is one line, never a backtrace, whatever
    // RUST_BACKTRACE says.
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve { config } => cli_serve(config).await,
            Command::Submit {
                type_name,
                file,
                key,
                watch,
                server,
            } => {
                let id = cli_submit(&server, &type_name, &file, key.as_deref()).await?;
                if watch {
                    cli::watch(&server, &id, 250).await?;
                }
                Ok(())
            }
            Command::Status { id, server } => cli_status(&server, &id).await,
            Command::Watch {
                id,
                interval_ms,
                server,
            } => cli::watch(&server, &id, interval_ms).await,
            Command::Entities { command, server } => cli::entities(&server, command).await,
            Command::Subscriptions { command, server } => {
                subscriptions::run(&server, command).await
            }
            Command::Types { command, server } => types::run(&server, command).await,
            Command::Keys { command, server } => keys::run(&server, command).await,
            Command::Store { command } => store::run(command).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Bench(args) => ripen_bench::run(args.into_options()?).await,
        }
    })
}

async fn cli_serve(config_path: PathBuf) -> Result<()> {
    init_logging();
    let config = match ripen_engine::Config::load(&config_path) {
        Ok(c) => c,
        Err(message) => {
            eprintln!("error: {message}");
            std::process::exit(2);
        }
    };
    // The first signal starts a drain; a second one means the operator will
    // not wait for it.
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let first_signal = async move {
        shutdown_signal().await;
        tracing::info!("shutting down: draining running attempts");
        let _ = first_tx.send(());
    };
    let second_signal = async move {
        if first_rx.await.is_err() {
            return std::future::pending().await;
        }
        shutdown_signal().await;
    };
    tokio::select! {
        served = ripen_server::serve(config, first_signal) => {
            // A configuration the engine refused at start (a table that
            // does not fit a connector) exits like one refused at load.
            if let Some(refused) = served
                .as_ref()
                .err()
                .and_then(|e| e.downcast_ref::<ripen_engine::ConfigRefused>())
            {
                eprintln!("error: {refused}");
                std::process::exit(2);
            }
            served
        }
        () = second_signal => {
            tracing::warn!("second signal: exiting without waiting for the drain");
            std::process::exit(1);
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("RIPEN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    if std::env::var("RIPEN_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

async fn cli_submit(
    server: &ServerArg,
    type_name: &str,
    file: &std::path::Path,
    key: Option<&str>,
) -> Result<String> {
    let body = if file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
        buf
    } else {
        std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?
    };
    let (url, client) = server.connect()?;
    let submitted = client
        .submit(type_name, body, key)
        .await
        .or_else(|e| print_refusal(&url, e))?;
    if submitted.replayed {
        eprintln!("this key was used before: the answer is the entity it created");
    }
    println!("{}", serde_json::to_string_pretty(&submitted.view)?);
    Ok(submitted.view.id)
}

/// Prints the server's answer to a refused request on standard error (a
/// schema violation's `errors` in full) and
/// makes the command fail with its detail; an error without an answer says
/// why the server could not be reached.
fn print_refusal<T>(url: &str, error: ripen_client::Error) -> Result<T> {
    if let Some(response) = error.response() {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&response.body) {
            // A schema violation's list says what to fix; print it whole.
            if let Some(errors) = v.get("errors") {
                eprintln!("{}", serde_json::to_string_pretty(errors)?);
            }
        }
    }
    Err(cli::friendly(url, error))
}

async fn cli_status(server: &ServerArg, id: &str) -> Result<()> {
    let (url, client) = server.connect()?;
    let view = client.get(id).await.or_else(|e| print_refusal(&url, e))?;
    println!("{}", serde_json::to_string_pretty(&view)?);
    Ok(())
}
