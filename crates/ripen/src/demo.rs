//! `ripen demo`: a server with an example `merchant` pipeline and a fake
//! downstream, fed with a merchant every few hundred milliseconds, so that a
//! newcomer sees entities ripen with nothing else installed.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{ensure, Context, Result};
use ripen_client::{Client, EntityStatus, EntityView, ListQuery};
use ripen_testkit::{
    sqlite_url, Behavior, Config, Downstream, Profile, ServerProcess, Step, TempDir, TypeDef,
};

/// How often the demo asks the server which entities settled.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// The list page read on each poll; the entities in flight are the newest.
const POLL_PAGE_LIMIT: u32 = 100;
/// The width of the merchant column in the settled lines.
const NAME_COLUMN_CHARS: usize = 30;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// The port the server listens on, on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Stop after this many submitted entities have settled (default: run until Ctrl-C).
    #[arg(long)]
    count: Option<usize>,
    /// Submit a merchant this often, in milliseconds.
    #[arg(long, default_value_t = 400)]
    interval_ms: u64,
    /// Where the configuration, the database and the server log go (default: a new temporary directory, kept).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

pub async fn run(args: DemoArgs) -> Result<()> {
    ensure!(args.interval_ms >= 1, "--interval-ms must be at least 1");
    ensure!(args.count != Some(0), "--count must be at least 1");
    let downstream = Downstream::with_profile(Profile::realistic())
        .await
        .context("start the fake downstream")?;
    // Beyond the transient 503s of every service: KYC refuses one merchant
    // in twenty once (the entity fails; an operator retry then gets it
    // through), and the welcome email bounces for one in ten (the merchant
    // is ready but degraded).
    downstream.set(
        "/kyc",
        Behavior::refuse_some(5, 422, Some(1), 60, serde_json::json!({"kyc": "passed"})),
    );
    downstream.set(
        "/welcome_email",
        Behavior::refuse_some(10, 400, None, 60, serde_json::json!({"sent": true})),
    );
    let downstream_addr = downstream.addr();
    let downstream_stats = downstream.stats().clone();
    let data_dir = prepare_data_dir(args.data_dir.as_deref())?;
    let config_path = write_config(&data_dir, args.port, downstream_addr)?;
    let exe = std::env::current_exe().context("find the ripen executable")?;
    let mut server = ServerProcess::start(&exe, &config_path, &data_dir.join("server.log")).await?;

    let mut demo = Demo::new(server.client().clone());
    // The first merchant is submitted before the banner, so that the
    // examples can name a real entity.
    let first_id = demo
        .submit()
        .await
        .context("submit the first example merchant")?;
    print_banner(&server, &data_dir, downstream_addr, &first_id, &args);

    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut submit_tick = tokio::time::interval(Duration::from_millis(args.interval_ms));
    submit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick completes at once; the first merchant is already in.
    submit_tick.tick().await;
    let mut poll_tick = tokio::time::interval(POLL_INTERVAL);
    poll_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let interrupted = loop {
        if args.count.is_some_and(|count| demo.settled_ours >= count) {
            break false;
        }
        tokio::select! {
            biased;
            result = &mut ctrl_c => {
                result.context("listen for Ctrl-C")?;
                break true;
            }
            _ = poll_tick.tick() => {
                server.check_alive()?;
                demo.poll().await;
            }
            _ = submit_tick.tick() => {
                if !matches!(args.count, Some(count) if demo.submitted >= count) {
                    if let Err(error) = demo.submit().await {
                        server.check_alive()?;
                        println!("  submit failed: {error:#}");
                    }
                }
            }
        }
    };
    server.stop();

    if interrupted {
        println!("\nstopped by Ctrl-C");
    }
    println!(
        "\n{} submitted, {} settled: {} ready ({} degraded), {} failed, {} cancelled; {} still pending when stopped",
        demo.submitted,
        demo.settled_ours,
        demo.ready,
        demo.degraded,
        demo.failed,
        demo.cancelled,
        demo.in_flight.len()
    );
    println!(
        "the fake downstream answered {} calls, {} of them with an injected 503",
        downstream_stats.requests(),
        downstream_stats.injected_failures()
    );
    if downstream_stats.contract_violations() > 0 {
        println!(
            "warning: {} step calls broke the HTTP step contract, first: {}",
            downstream_stats.contract_violations(),
            downstream_stats.first_violation().unwrap_or_default()
        );
    }
    println!(
        "the server is stopped; its data and log stay in {}",
        data_dir.display()
    );
    Ok(())
}

fn prepare_data_dir(data_dir: Option<&Path>) -> Result<PathBuf> {
    let dir = match data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
            dir.to_owned()
        }
        // Kept after the demo, so that the database and the log can be
        // looked at.
        None => TempDir::new("ripen-demo-")
            .context("create a temporary directory for the demo")?
            .keep(),
    };
    std::fs::canonicalize(&dir).with_context(|| format!("resolve {}", dir.display()))
}

const MERCHANT_SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "title": "merchant",
  "type": "object",
  "required": ["name", "country"],
  "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 200},
    "country": {"type": "string", "pattern": "^[A-Z]{2}$", "description": "ISO 3166-1 alpha-2"},
    "email": {"type": "string", "maxLength": 254}
  }
}
"#;

/// Writes `ripen.toml` and the merchant schema into `dir`; returns the
/// configuration's path.
fn write_config(dir: &Path, port: u16, downstream: std::net::SocketAddr) -> Result<PathBuf> {
    let schema: serde_json::Value =
        serde_json::from_str(MERCHANT_SCHEMA).context("parse the merchant schema")?;
    let step = |name: &str, needs: &[&str]| {
        Step::http(name, format!("http://{downstream}/{name}"))
            .needs(needs)
            .timeout("2s")
            .attempts(5)
            .backoff("50ms", "2s")
    };
    let merchant = TypeDef::new(
        "merchant",
        vec![
            step("kyc", &[]),
            step("billing", &["kyc"]),
            step("search_index", &["kyc"]),
            step("activate", &["billing", "search_index"]),
            step("welcome_email", &["kyc"]).non_critical(),
        ],
    )
    .schema(schema);
    Config::bare()
        .comment("Written by `ripen demo`; the fake downstream's port changes on every run.")
        .listen(&format!("127.0.0.1:{port}"))
        .with_type(merchant)
        .write(dir, &sqlite_url(dir))
        .with_context(|| format!("write the demo's config into {}", dir.display()))
}

fn print_banner(
    server: &ServerProcess,
    data_dir: &Path,
    downstream: std::net::SocketAddr,
    first_id: &str,
    args: &DemoArgs,
) {
    let url = server.url();
    println!("Ripen demo: merchants ripen through kyc -> (billing, search_index) -> activate,");
    println!("with a non-critical welcome_email after kyc.");
    println!();
    println!("  server      {url}");
    println!("  dashboard   {url}/");
    println!(
        "  data        {} (ripen.toml, schemas/merchant.json, ripen.db)",
        data_dir.display()
    );
    println!("  server log  {}", server.log_path().display());
    println!("  downstream  http://{downstream} (fake: 5-60 ms per call, ~8% transient 503s)");
    println!();
    println!("Not every merchant gets through: KYC refuses about 1 in 20 once (422), and");
    println!("the welcome email bounces for about 1 in 10 (400, a non-critical step).");
    println!("  - a refused merchant ends `failed`: open the dashboard, set the status filter");
    println!("    to failed, click the merchant, then Retry: this time KYC lets it through;");
    println!("  - a bounced one ends `ready` but degraded (its welcome_email step failed);");
    println!("  - transient 503s show as retries in each entity's history.");
    println!(
        "  The same from the command line: ripen entities list --status failed --server {url}"
    );
    println!("                                  ripen entities retry ID --server {url}");
    println!();
    println!("Try, in another terminal:");
    println!("  curl -i -X POST {url}/v1/entities/merchant \\");
    println!(
        "       -H 'Content-Type: application/json' -H 'Idempotency-Key: my-first-merchant' \\"
    );
    println!("       -d '{{\"name\": \"Acme Tools\", \"country\": \"FR\", \"email\": \"hello@acme.example\"}}'");
    println!("  curl {url}/v1/entities/{first_id}");
    println!("  curl {url}/v1/entities/{first_id}/events");
    println!("  curl -N -H 'Accept: text/event-stream' {url}/v1/entities/{first_id}/events");
    println!("  curl {url}/v1/entities/{first_id}/data");
    println!("  ripen watch {first_id} --server {url}");
    println!();
    match args.count {
        Some(count) => println!(
            "Submitting a merchant every {} ms until {count} have settled (Ctrl-C stops sooner):",
            args.interval_ms
        ),
        None => println!(
            "Submitting a merchant every {} ms; Ctrl-C stops:",
            args.interval_ms
        ),
    }
}

/// A merchant the demo submitted and has not seen settle yet.
struct InFlight {
    label: String,
    submitted: Instant,
}

struct Demo {
    client: Client,
    nonce: u64,
    /// Keyed by entity id.
    in_flight: BTreeMap<String, InFlight>,
    /// Entities already reported, so that each is printed once.
    reported: HashSet<String>,
    /// Entities created before the demo started are not reported.
    started: SystemTime,
    submitted: usize,
    settled_ours: usize,
    ready: usize,
    degraded: usize,
    failed: usize,
    cancelled: usize,
}

impl Demo {
    fn new(client: Client) -> Demo {
        Demo {
            client,
            nonce: fastrand::u64(..),
            in_flight: BTreeMap::new(),
            reported: HashSet::new(),
            // A little slack, in case the server's clock runs behind ours.
            started: SystemTime::now() - Duration::from_secs(1),
            submitted: 0,
            settled_ours: 0,
            ready: 0,
            degraded: 0,
            failed: 0,
            cancelled: 0,
        }
    }

    /// Submits one random merchant and returns its id.
    async fn submit(&mut self) -> Result<String> {
        let merchant = random_merchant();
        let key = format!("demo-{:016x}-{}", self.nonce, self.submitted);
        let submitted = self
            .client
            .submit("merchant", merchant.json.to_string(), Some(&key))
            .await
            .context("POST /v1/entities/merchant")?;
        let id = submitted.view.id;
        self.submitted += 1;
        self.in_flight.insert(
            id.clone(),
            InFlight {
                label: merchant.label,
                submitted: Instant::now(),
            },
        );
        Ok(id)
    }

    /// Asks which entities settled and prints a line for each; problems are
    /// printed, not returned, so that a hiccup does not end the demo.
    async fn poll(&mut self) {
        if let Err(error) = self.poll_inner().await {
            println!("  could not read the entities: {error:#}");
        }
    }

    async fn poll_inner(&mut self) -> Result<()> {
        let query = ListQuery {
            type_name: Some("merchant"),
            limit: Some(POLL_PAGE_LIMIT),
            ..ListQuery::default()
        };
        let page = self
            .client
            .list(&query)
            .await
            .with_context(|| format!("GET {}", query.path()))?;
        let complete = page.next.is_none();
        let mut listed = HashSet::new();
        for entity in page.items {
            listed.insert(entity.id.clone());
            self.consider(entity);
        }
        // An entity of ours that is no longer on the first page (a slow one,
        // under a flood of newer ones) is asked for by id.
        let missing: Vec<String> = self
            .in_flight
            .keys()
            .filter(|id| !complete && !listed.contains(*id))
            .cloned()
            .collect();
        for id in missing {
            let entity = self
                .client
                .get(&id)
                .await
                .with_context(|| format!("GET /v1/entities/{id}"))?;
            self.consider(entity);
        }
        Ok(())
    }

    fn consider(&mut self, entity: EntityView) {
        if !entity.status.is_terminal() || self.reported.contains(&entity.id) {
            return;
        }
        let ours = self.in_flight.remove(&entity.id);
        if ours.is_none() {
            // Merchants submitted by hand while the demo runs are reported
            // too; older ones (a reused data directory) are not.
            let recent =
                parse_time(&entity.created_at).is_ok_and(|created| created >= self.started);
            if !recent {
                return;
            }
        }
        self.reported.insert(entity.id.clone());
        if ours.is_some() {
            self.settled_ours += 1;
            match entity.status {
                EntityStatus::Ready => self.ready += 1,
                EntityStatus::Failed => self.failed += 1,
                _ => self.cancelled += 1,
            }
            if entity.degraded {
                self.degraded += 1;
            }
        }
        println!("{}", settled_line(&entity, ours.as_ref()));
    }
}

fn settled_line(entity: &EntityView, ours: Option<&InFlight>) -> String {
    let label = ours.map_or("(submitted elsewhere)", |f| f.label.as_str());
    let label: String = if label.chars().count() > NAME_COLUMN_CHARS {
        let mut short: String = label.chars().take(NAME_COLUMN_CHARS - 1).collect();
        short.push('…');
        short
    } else {
        label.to_owned()
    };
    // The server's own timestamps; the time since we submitted otherwise.
    let settled_at = entity
        .ready_at
        .as_deref()
        .or(Some(entity.updated_at.as_str()));
    let taken = settled_at
        .and_then(|at| {
            let created = parse_time(&entity.created_at).ok()?;
            parse_time(at).ok()?.duration_since(created).ok()
        })
        .or_else(|| ours.map(|f| f.submitted.elapsed()));
    let taken = taken.map_or("?".to_owned(), |t| format!("{} ms", t.as_millis()));

    let mut notes = Vec::new();
    let retried: Vec<String> = entity
        .steps
        .iter()
        .filter(|s| s.attempts > 1)
        .map(|s| format!("{} x{}", s.name, s.attempts))
        .collect();
    if !retried.is_empty() {
        notes.push(format!("retried {}", retried.join(", ")));
    }
    if entity.degraded || entity.status == EntityStatus::Failed {
        notes.push(entity.failed_steps());
    }
    let status = if entity.degraded {
        "degraded".to_owned()
    } else {
        entity.status.as_str().to_owned()
    };
    format!(
        "  {status:<9} {}  {label:<width$}  {taken:>8}  {}",
        entity.id,
        notes.join("; "),
        width = NAME_COLUMN_CHARS
    )
    .trim_end()
    .to_owned()
}

fn parse_time(value: &str) -> Result<SystemTime> {
    humantime::parse_rfc3339(value)
        .with_context(|| format!("{value:?} is not an RFC 3339 UTC time"))
}

struct Merchant {
    json: serde_json::Value,
    /// "Name (CC)", for the settled lines.
    label: String,
}

fn random_merchant() -> Merchant {
    const FIRST: &[&str] = &[
        "Blue", "Golden", "Northern", "Little", "Urban", "Silver", "Green", "Old Town", "Harbor",
        "Maple", "Copper", "Sunny", "Nordic", "Royal", "Wild", "Velvet",
    ];
    const SECOND: &[&str] = &[
        "Bakery",
        "Coffee",
        "Bicycles",
        "Books",
        "Florist",
        "Tailors",
        "Ceramics",
        "Records",
        "Pantry",
        "Optics",
        "Hardware",
        "Tea House",
        "Kitchen",
        "Gallery",
        "Outfitters",
        "Pharmacy",
    ];
    const SUFFIX: &[&str] = &["", "", "", " Ltd", " GmbH", " SAS", " & Co", " Inc"];
    const COUNTRIES: &[&str] = &[
        "FR", "DE", "GB", "US", "NL", "ES", "IT", "SE", "JP", "BR", "IN", "CA", "AU", "SG", "PL",
        "IE",
    ];
    let pick = |list: &[&'static str]| list[fastrand::usize(..list.len())];
    let name = format!("{} {}{}", pick(FIRST), pick(SECOND), pick(SUFFIX));
    let country = pick(COUNTRIES);
    let mut json = serde_json::json!({"name": name, "country": country});
    if fastrand::u8(..10) < 7 {
        let domain: String = name
            .split_whitespace()
            .take(2)
            .collect::<String>()
            .to_lowercase()
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect();
        json["email"] = serde_json::Value::from(format!("hello@{domain}.example"));
    }
    Merchant {
        label: format!("{name} ({country})"),
        json,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_merchants_fit_the_schema() {
        for _ in 0..200 {
            let merchant = random_merchant();
            let name = merchant.json["name"].as_str().unwrap();
            assert!(!name.is_empty());
            let country = merchant.json["country"].as_str().unwrap();
            assert!(country.len() == 2 && country.chars().all(|c| c.is_ascii_uppercase()));
            if let Some(email) = merchant.json.get("email") {
                assert!(email.as_str().unwrap().starts_with("hello@"));
            }
        }
    }

    #[test]
    fn config_has_the_merchant_pipeline() {
        let dir = TempDir::new("ripen-demo-test-").unwrap();
        let addr: std::net::SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let path = write_config(dir.path(), 0, addr).unwrap();
        let config = std::fs::read_to_string(path).unwrap();
        assert!(config.starts_with("# Written by `ripen demo`"));
        assert!(config.contains("listen = \"127.0.0.1:0\""));
        assert!(config.contains(&format!(
            "url = \"sqlite://{}/ripen.db\"",
            dir.path().display()
        )));
        assert!(config.contains("name = \"activate\"\nhttp = \"http://127.0.0.1:9000/activate\"\nneeds = [\"billing\", \"search_index\"]"));
        assert!(config.contains(
            "retry = { max_attempts = 5, initial_backoff = \"50ms\", max_backoff = \"2s\" }"
        ));
        assert!(config.contains("name = \"welcome_email\"\nhttp = \"http://127.0.0.1:9000/welcome_email\"\nneeds = [\"kyc\"]\ncritical = false"));
        let schema: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("schemas/merchant.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(schema["required"], serde_json::json!(["name", "country"]));
    }

    #[test]
    fn settled_line_shows_retries_and_time() {
        let entity: EntityView = serde_json::from_value(serde_json::json!({
            "id": "0193c5b2-0000-7000-8000-000000000001", "type": "merchant", "version": 1,
            "status": "ready", "degraded": false,
            "created_at": "2026-01-01T00:00:00.000000Z", "updated_at": "2026-01-01T00:00:00.143000Z",
            "ready_at": "2026-01-01T00:00:00.143000Z",
            "steps": [
                {"name": "kyc", "status": "succeeded", "critical": true, "attempts": 2, "last_error": null},
                {"name": "billing", "status": "succeeded", "critical": true, "attempts": 1, "last_error": null}
            ]
        }))
        .unwrap();
        let line = settled_line(&entity, None);
        assert!(line.contains("ready"), "{line}");
        assert!(line.contains("143 ms"), "{line}");
        assert!(line.ends_with("retried kyc x2"), "{line}");
    }
}
