//! A billing worker: serves a worker queue of a Ripen server and answers
//! each task with an invoice made from the entity's payload.
//!
//! ```text
//! RIPEN_URL=http://127.0.0.1:8080 cargo run -p ripen-worker --example billing -- billing
//! ```
//!
//! Arguments (each also read from the environment where one is named):
//! - `QUEUE` (first free argument, or `RIPEN_QUEUE`; default `billing`);
//! - `--url URL` (`RIPEN_URL`; default `http://127.0.0.1:8080`);
//! - `--worker-id ID` (default `{hostname}-{pid}`), `--concurrency N`
//!   (default 4), `--grace-ms MS` (the shutdown grace, default 10000);
//! - for tests: `--sleep-ms MS`, a delay in every handler; `--fail MODE`
//!   where MODE is `fatal` (every task fails for good) or `retryable`
//!   (every task fails and is retried).
//!
//! It prints `worker ready` once the server answered its first claim, and
//! stops gracefully on SIGTERM or Ctrl-C. Logs go to standard error
//! (`RIPEN_LOG`, default `info`).

use std::io::Write as _;
use std::time::Duration;

use ripen_worker::{Task, TaskError, Worker};
use serde::Deserialize;
use serde_json::{json, Value};

/// The part of the payload a bill needs; everything else is ignored.
#[derive(Deserialize)]
struct Order {
    #[serde(default)]
    customer: Option<String>,
    #[serde(default)]
    amount_cents: u64,
    #[serde(default)]
    items: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    #[serde(default)]
    price_cents: u64,
    #[serde(default = "one")]
    quantity: u64,
}

fn one() -> u64 {
    1
}

#[derive(Clone, Copy, PartialEq)]
enum FailMode {
    None,
    Fatal,
    Retryable,
}

struct Args {
    url: String,
    queue: String,
    worker_id: Option<String>,
    concurrency: usize,
    grace: Duration,
    sleep: Duration,
    fail: FailMode,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        url: std::env::var("RIPEN_URL").unwrap_or_else(|_| "http://127.0.0.1:8080".to_owned()),
        queue: std::env::var("RIPEN_QUEUE").unwrap_or_else(|_| "billing".to_owned()),
        worker_id: None,
        concurrency: 4,
        grace: Duration::from_secs(10),
        sleep: Duration::ZERO,
        fail: FailMode::None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        let ms = |text: String, name: &str| {
            text.parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|e| format!("{name} {text:?}: {e}"))
        };
        match arg.as_str() {
            "--url" => args.url = value("--url")?,
            "--worker-id" => args.worker_id = Some(value("--worker-id")?),
            "--concurrency" => {
                let text = value("--concurrency")?;
                args.concurrency = text
                    .parse()
                    .map_err(|e| format!("--concurrency {text:?}: {e}"))?;
            }
            "--grace-ms" => args.grace = ms(value("--grace-ms")?, "--grace-ms")?,
            "--sleep-ms" => args.sleep = ms(value("--sleep-ms")?, "--sleep-ms")?,
            "--fail" => {
                args.fail = match value("--fail")?.as_str() {
                    "fatal" => FailMode::Fatal,
                    "retryable" => FailMode::Retryable,
                    other => return Err(format!("--fail {other:?}: use fatal or retryable")),
                }
            }
            "-h" | "--help" => {
                return Err(
                    "usage: billing [QUEUE] [--url URL] [--worker-id ID] [--concurrency N] \
                     [--grace-ms MS] [--sleep-ms MS] [--fail fatal|retryable]"
                        .to_owned(),
                )
            }
            _ if !arg.starts_with('-') => args.queue = arg,
            _ => return Err(format!("unknown argument {arg:?}; see --help")),
        }
    }
    Ok(args)
}

async fn bill(task: Task, sleep: Duration, fail: FailMode) -> Result<Value, TaskError> {
    let order: Order = task.payload()?;
    if !sleep.is_zero() {
        tokio::time::sleep(sleep).await;
    }
    match fail {
        FailMode::Fatal => {
            return Err(TaskError::fatal(format!(
                "card declined for entity {}",
                task.entity_id()
            )))
        }
        FailMode::Retryable => {
            return Err(TaskError::retryable("the payment provider is busy"));
        }
        FailMode::None => {}
    }
    let amount_cents = order.amount_cents
        + order
            .items
            .iter()
            .map(|i| i.price_cents * i.quantity)
            .sum::<u64>();
    Ok(json!({
        "invoice": format!("inv-{}", task.entity_id()),
        "customer": order.customer,
        "amount_cents": amount_cents,
        "attempt": task.attempt(),
        "after": task.output_steps().collect::<Vec<_>>(),
    }))
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("RIPEN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let mut worker = Worker::new(&args.url, &args.queue)
        .concurrency(args.concurrency)
        .shutdown_grace(args.grace);
    if let Some(id) = &args.worker_id {
        worker = worker.worker_id(id.as_str());
    }
    let id = worker.id().to_owned();
    let (sleep, fail) = (args.sleep, args.fail);
    let result = worker
        .run_until_with_ready(
            ripen_worker::shutdown_signal(),
            move |task| bill(task, sleep, fail),
            move || {
                println!("worker ready: {id}");
                let _ = std::io::stdout().flush();
            },
        )
        .await;
    if let Err(e) = result {
        eprintln!("billing worker: {e}");
        std::process::exit(1);
    }
}
