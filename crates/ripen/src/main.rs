//! The `ripen` binary: the server and the commands that talk to it.

mod bench;
mod client;
mod demo;
mod downstream;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

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
    /// Run a server with an example pipeline and a fake downstream, and submit entities to it.
    Demo(demo::DemoArgs),
    /// Measure intake and pipeline throughput against a real server on loopback.
    Bench(bench::BenchArgs),
}

#[derive(clap::Args)]
struct ServerArg {
    /// The server's root URL.
    #[arg(long, env = "RIPEN_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
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
                server,
            } => cli_submit(&server.server, &type_name, &file, key.as_deref()).await,
            Command::Status { id, server } => cli_status(&server.server, &id).await,
            Command::Watch {
                id,
                interval_ms,
                server,
            } => cli_watch(&server.server, &id, interval_ms).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Bench(args) => bench::run(args).await,
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
        served = ripen_server::serve(config, first_signal) => served,
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
        builder.json().init();
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
    server: &str,
    type_name: &str,
    file: &std::path::Path,
    key: Option<&str>,
) -> Result<()> {
    let body = if file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
        buf
    } else {
        std::fs::read(file).with_context(|| format!("read {}", file.display()))?
    };
    let client = client::Client::new(server);
    let mut headers = Vec::new();
    if let Some(k) = key {
        headers.push(("idempotency-key", k));
    }
    let reply = client
        .post(&format!("/v1/entities/{type_name}"), &headers, body)
        .await?;
    if reply.header("idempotent-replayed") == Some("true") {
        eprintln!("this key was used before: the answer is the entity it created");
    }
    print_reply(&reply)
}

/// Prints the JSON answer; an error answer makes the command fail.
fn print_reply(reply: &client::Reply) -> Result<()> {
    let text = match reply.json() {
        Ok(v) => serde_json::to_string_pretty(&v)?,
        Err(_) => String::from_utf8_lossy(&reply.body).into_owned(),
    };
    if reply.status.is_success() {
        println!("{text}");
        Ok(())
    } else {
        eprintln!("{text}");
        bail!("the server answered {}", reply.status)
    }
}

async fn cli_status(server: &str, id: &str) -> Result<()> {
    let client = client::Client::new(server);
    let reply = client.get(&format!("/v1/entities/{id}")).await?;
    print_reply(&reply)
}

async fn cli_watch(server: &str, id: &str, interval_ms: u64) -> Result<()> {
    let client = client::Client::new(server);
    let mut seen: Vec<(String, String, u64)> = Vec::new();
    let interval = std::time::Duration::from_millis(interval_ms.max(10));
    loop {
        let reply = client.get(&format!("/v1/entities/{id}")).await?;
        if !reply.status.is_success() {
            return print_reply(&reply);
        }
        let view = reply.json()?;
        let steps = view["steps"].as_array().cloned().unwrap_or_default();
        for (i, step) in steps.iter().enumerate() {
            let now = (
                step["name"].as_str().unwrap_or("?").to_owned(),
                step["status"].as_str().unwrap_or("?").to_owned(),
                step["attempts"].as_u64().unwrap_or(0),
            );
            if seen.get(i) != Some(&now) {
                let error = step["last_error"]
                    .as_str()
                    .map(|e| format!("  ({e})"))
                    .unwrap_or_default();
                println!("{:<24} {:<10} attempts {}{error}", now.0, now.1, now.2);
                if i < seen.len() {
                    seen[i] = now;
                } else {
                    seen.push(now);
                }
            }
        }
        let status = view["status"].as_str().unwrap_or("?");
        if status != "pending" {
            let degraded = if view["degraded"] == true {
                " (degraded)"
            } else {
                ""
            };
            println!("entity {id} is {status}{degraded}");
            if status == "ready" {
                return Ok(());
            }
            std::process::exit(1);
        }
        tokio::time::sleep(interval).await;
    }
}
