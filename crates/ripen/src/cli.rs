//! The commands that talk to a running server: the server and API key they
//! all take, `ripen entities …`, `ripen watch`, and the friendly form of
//! every error they can meet.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::time::Duration;

use anyhow::{anyhow, Result};
use clap::{Subcommand, ValueEnum};
use ripen_client::{Client, EntityStatus, EntityView, Event, ListQuery, StepStatus};

/// Where the server is and how to speak to it: every command that talks to
/// one takes these.
#[derive(clap::Args)]
pub struct ServerArg {
    /// The server's root URL (`http://` is assumed without a scheme).
    #[arg(
        long,
        global = true,
        env = "RIPEN_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// An API key, sent as `Authorization: Bearer KEY` with every request.
    #[arg(long, global = true, env = "RIPEN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

impl ServerArg {
    /// The server's URL, and a client of it that sends the API key.
    pub fn connect(&self) -> Result<(String, Client)> {
        let url = server_url(&self.server);
        let mut client = Client::new(&url);
        if let Some(key) = self.api_key.as_deref().filter(|k| !k.is_empty()) {
            client = client.with_api_key(key).map_err(|_| {
                anyhow!(
                    "the API key (--api-key or RIPEN_API_KEY) has a character that cannot be sent in a header"
                )
            })?;
        }
        Ok((url, client))
    }
}

/// Makes a panic of a command that talks to a server one line on standard
/// error and exit status 1, whatever `RUST_BACKTRACE` says; output cut off
/// by a closed pipe (`ripen entities list | head -1`) ends it quietly.
pub fn quiet_panics() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unexpected failure".to_owned());
        if !message.contains("Broken pipe") {
            eprintln!("error: {message}");
        }
        std::process::exit(1);
    }));
}

/// How a command prints what it got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    #[default]
    Table,
    /// The API's JSON, for scripts.
    Json,
}

#[derive(Subcommand)]
pub enum EntitiesCommand {
    /// List entities, newest first.
    List {
        /// Only entities of this type.
        #[arg(long = "type", value_name = "TYPE")]
        type_name: Option<String>,
        /// Only entities in this status (pending, ready, failed, cancelled).
        #[arg(long)]
        status: Option<String>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// The `next` cursor a previous page printed.
        #[arg(long)]
        after: Option<String>,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Print one entity: its status and steps.
    Get {
        id: String,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Print an entity's history, oldest first.
    Events {
        id: String,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Run a failed entity's failed and skipped steps again.
    Retry {
        id: String,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Stop a pending entity.
    Cancel {
        id: String,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
}

/// A server address as given: a missing scheme means `http://`.
pub fn server_url(server: &str) -> String {
    let s = server.trim();
    if s.contains("://") {
        s.to_owned()
    } else {
        format!("http://{s}")
    }
}

pub async fn entities(server: &ServerArg, command: EntitiesCommand) -> Result<()> {
    let (url, client) = server.connect()?;
    let friendly = |e| friendly(&url, e);
    match command {
        EntitiesCommand::List {
            type_name,
            status,
            limit,
            after,
            output,
        } => {
            let status = match status.as_deref() {
                None => None,
                Some(s) => Some(parse_status(s)?),
            };
            let query = ListQuery {
                type_name: type_name.as_deref(),
                status,
                limit: Some(limit),
                after: after.as_deref(),
            };
            let page = client.list(&query).await.map_err(friendly)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&page)?),
                Output::Table => {
                    print!("{}", entity_table(&page.items));
                    if let Some(next) = &page.next {
                        println!("more: --after {next}");
                    }
                }
            }
        }
        EntitiesCommand::Get { id, output } => {
            let view = client.get(&id).await.map_err(friendly)?;
            print_view(&view, output)?;
        }
        EntitiesCommand::Events { id, output } => {
            let events = client.events(&id, None, None).await.map_err(friendly)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&events)?),
                Output::Table => print!("{}", event_table(&events)),
            }
        }
        EntitiesCommand::Retry { id, output } => {
            let view = client.retry(&id).await.map_err(friendly)?;
            print_view(&view, output)?;
        }
        EntitiesCommand::Cancel { id, output } => {
            let view = client.cancel(&id).await.map_err(friendly)?;
            print_view(&view, output)?;
        }
    }
    Ok(())
}

fn parse_status(s: &str) -> Result<EntityStatus> {
    serde_json::from_value(serde_json::Value::from(s))
        .map_err(|_| anyhow!("{s:?} is not a status; use pending, ready, failed or cancelled"))
}

pub fn print_view(view: &EntityView, output: Output) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(view)?),
        Output::Table => print!("{}", view_text(view)),
    }
    Ok(())
}

/// One entity as text: a header line, then a line per step.
fn view_text(v: &EntityView) -> String {
    let mut out = String::new();
    let degraded = if v.degraded { " (degraded)" } else { "" };
    let _ = writeln!(
        out,
        "{} {} v{} {}{degraded}  created {}",
        v.id, v.type_name, v.version, v.status, v.created_at
    );
    let width = v
        .steps
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        out,
        "  {:<width$}  {:<10} attempts  error",
        "step", "status"
    );
    for s in &v.steps {
        let critical = if s.critical { "" } else { " (non-critical)" };
        let error = s.last_error.as_deref().unwrap_or("");
        let _ = writeln!(
            out,
            "  {:<width$}  {:<10} {:>8}  {error}{critical}",
            s.name,
            s.status.as_str(),
            s.attempts
        );
    }
    out
}

fn entity_table(items: &[EntityView]) -> String {
    let mut out = String::new();
    let width = items
        .iter()
        .map(|v| v.type_name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        out,
        "{:<36}  {:<width$}  {:<9}  {:<5}  created",
        "id", "type", "status", "steps"
    );
    for v in items {
        let done = v
            .steps
            .iter()
            .filter(|s| s.status == ripen_client::StepStatus::Succeeded)
            .count();
        let status = if v.degraded {
            format!("{}*", v.status)
        } else {
            v.status.to_string()
        };
        let _ = writeln!(
            out,
            "{:<36}  {:<width$}  {:<9}  {:<5}  {}",
            v.id,
            v.type_name,
            status,
            format!("{done}/{}", v.steps.len()),
            v.created_at
        );
    }
    if items.iter().any(|v| v.degraded) {
        let _ = writeln!(out, "* degraded: a non-critical step failed for good");
    }
    out
}

fn event_table(events: &[Event]) -> String {
    let mut out = String::new();
    for e in events {
        let step = e.step.as_deref().unwrap_or("");
        let attempt = e.attempt.map(|a| format!("#{a}")).unwrap_or_default();
        let detail = serde_json::to_string(&e.detail).unwrap_or_default();
        let detail = if detail == "{}" {
            String::new()
        } else {
            detail
        };
        let _ = writeln!(
            out,
            "{:>4}  {}  {:<16} {step} {attempt}  {detail}",
            e.seq, e.at, e.kind
        );
    }
    out
}

/// The error of a call to the server at `url`, in words a user can act on:
/// the server's problem detail, or why it could not be reached.
/// One JSON request to the server at `url`: the answer's JSON (`null`
/// when it has no body), or a friendly error unless it is `expected`.
pub async fn call_json(
    client: &Client,
    url: &str,
    method: ripen_client::Method,
    path: &str,
    body: Option<serde_json::Value>,
    expected: ripen_client::StatusCode,
) -> Result<serde_json::Value> {
    let body = body.map(|b| bytes::Bytes::from(b.to_string()));
    let headers = [
        ("accept", "application/json"),
        ("content-type", "application/json"),
    ];
    let response = client
        .request(method, path, &headers, body)
        .await
        .and_then(|r| r.expect(expected))
        .map_err(|e| friendly(url, e))?;
    if response.body.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_slice(&response.body)
        .map_err(|e| anyhow!("the server's answer is not JSON: {e}"))
}

/// A JSON value as a table cell: strings bare, null empty.
pub fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

pub fn friendly(url: &str, e: ripen_client::Error) -> anyhow::Error {
    if let Some(response) = e.response() {
        if let Some(p) = e.problem() {
            return anyhow!("{} ({}): {}", p.title, response.status.as_u16(), p.detail);
        }
        return anyhow!(
            "the server at {url} answered {} with {}",
            response.status,
            ripen_client::snippet(&response.body)
        );
    }
    let message = e.to_string();
    let reason = if message.contains("Connection refused") {
        "connection refused (is `ripen serve` running?)"
    } else if message.contains("invalid format") || message.contains("invalid uri") {
        return anyhow!("{url:?} is not a server address such as http://127.0.0.1:8080");
    } else if message.contains("no answer within") {
        "no answer in time"
    } else if message.contains("dns error") || message.contains("failed to lookup") {
        "the host name does not resolve"
    } else {
        return anyhow!("cannot reach the server at {url}: {message}");
    };
    anyhow!("cannot reach the server at {url}: {reason}")
}

/// `ripen watch`: follows an entity until it settles (a terminal status,
/// and no step left to run). On a terminal, a table of its steps redrawn in
/// place, in colour (unless `NO_COLOR` is set); piped, a line per change.
/// Succeeds if the entity ended ready.
pub async fn watch(server: &ServerArg, id: &str, interval_ms: u64) -> Result<()> {
    let (url, client) = server.connect()?;
    let interval = Duration::from_millis(interval_ms.max(10));
    let tty = std::io::stdout().is_terminal();
    let style = Style {
        colour: tty && std::env::var_os("NO_COLOR").is_none(),
    };
    let mut history: Vec<Event> = Vec::new();
    let mut drawn = 0;
    let mut seen: Vec<(StepStatus, u32)> = Vec::new();
    let mut status = None;
    loop {
        let view = client.get(id).await.map_err(|e| friendly(&url, e))?;
        let after = history.last().map(|e| e.seq);
        let new = client
            .events(id, after, None)
            .await
            .map_err(|e| friendly(&url, e))?;
        history.extend(new);
        let rows = step_rows(&view, &history, ripen_engine::time::local_now_us());
        let done = settled(&view);
        let mut out = std::io::stdout().lock();
        if tty {
            let lines = table(&view, &rows, style, width());
            if drawn > 0 {
                // Back to the table's first line, and clear what follows.
                write!(out, "\x1b[{drawn}F\x1b[J")?;
            }
            for line in &lines {
                writeln!(out, "{line}")?;
            }
            drawn = lines.len();
        } else {
            if status != Some(view.status) {
                writeln!(out, "entity {} is {}", view.id, view.status)?;
                status = Some(view.status);
            }
            for (i, row) in rows.iter().enumerate() {
                let now = (row.status, row.attempts);
                if seen.get(i) != Some(&now) {
                    writeln!(out, "{}", plain_line(row))?;
                    if i < seen.len() {
                        seen[i] = now;
                    } else {
                        seen.push(now);
                    }
                }
            }
        }
        out.flush()?;
        drop(out);
        if done {
            let degraded = if view.degraded { " (degraded)" } else { "" };
            println!("entity {id} is {}{degraded}", view.status);
            if view.status == EntityStatus::Ready {
                return Ok(());
            }
            let steps = view.failed_steps();
            return Err(if steps.is_empty() {
                anyhow!("entity {id} ended {}", view.status)
            } else {
                anyhow!("entity {id} ended {}: {steps}", view.status)
            });
        }
        tokio::time::sleep(interval).await;
    }
}

/// A terminal status, and no step that can still run.
fn settled(view: &EntityView) -> bool {
    view.status.is_terminal() && view.steps.iter().all(|s| s.status.is_terminal())
}

/// One step as `ripen watch` shows it.
#[derive(Clone, Debug, PartialEq)]
struct StepRow {
    name: String,
    critical: bool,
    status: StepStatus,
    attempts: u32,
    /// From the step's first start (since the last operator retry) to its
    /// end, or to now while it runs or waits.
    duration_us: Option<i64>,
    /// When the next attempt is due, while retrying: the time, and how far
    /// from now.
    next_retry: Option<(String, i64)>,
    error: Option<String>,
}

/// The rows of `view`'s steps, timed by `history` (oldest first) at `now_us`.
fn step_rows(view: &EntityView, history: &[Event], now_us: i64) -> Vec<StepRow> {
    let at = |e: &Event| ripen_server::parse_rfc3339(&e.at);
    view.steps
        .iter()
        .map(|s| {
            let mut start = None;
            let mut end = None;
            for e in history
                .iter()
                .filter(|e| e.step.as_deref() == Some(&s.name))
            {
                match e.kind.as_str() {
                    "step_requeued" => (start, end) = (None, None),
                    "step_started" if start.is_none() => start = at(e),
                    "step_succeeded" | "step_failed" | "step_skipped" => end = at(e),
                    _ => {}
                }
            }
            let running = !s.status.is_terminal();
            let duration_us = match (start, end) {
                (Some(a), Some(b)) if !running => Some(b - a),
                (Some(a), _) => Some(now_us - a),
                _ => None,
            };
            let next_retry = s
                .next_attempt_at
                .as_ref()
                .filter(|_| s.status == StepStatus::Retrying)
                .map(|t| {
                    let due = ripen_server::parse_rfc3339(t).unwrap_or(now_us);
                    (t.clone(), due - now_us)
                });
            StepRow {
                name: s.name.clone(),
                critical: s.critical,
                status: s.status,
                attempts: s.attempts,
                duration_us: duration_us.map(|d| d.max(0)),
                next_retry,
                error: s.last_error.clone(),
            }
        })
        .collect()
}

/// A duration for people: `850 ms`, `4.2 s`, `3m 05s`.
fn human(us: i64) -> String {
    let ms = us / 1_000;
    if ms < 1_000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1_000.0)
    } else {
        format!("{}m {:02}s", ms / 60_000, ms % 60_000 / 1_000)
    }
}

/// A line of piped output: what changed in one step.
fn plain_line(row: &StepRow) -> String {
    let mut line = format!(
        "{:<24} {:<10} attempts {}",
        row.name,
        row.status.as_str(),
        row.attempts
    );
    if let (Some(d), true) = (row.duration_us, row.status.is_terminal()) {
        let _ = write!(line, "  after {}", human(d));
    }
    if let Some((at, _)) = &row.next_retry {
        let _ = write!(line, "  next retry {at}");
    }
    if let Some(e) = &row.error {
        let _ = write!(line, "  ({e})");
    }
    line
}

#[derive(Clone, Copy)]
struct Style {
    colour: bool,
}

impl Style {
    /// `text` padded to `width`, in the colour of `status`.
    fn status(self, status: StepStatus, width: usize) -> String {
        let text = format!("{:<width$}", status.as_str());
        if !self.colour {
            return text;
        }
        let code = match status {
            StepStatus::Succeeded => "32",
            StepStatus::Failed => "31",
            StepStatus::Running | StepStatus::Queued => "36",
            StepStatus::Retrying => "33",
            StepStatus::Blocked | StepStatus::Skipped => "2",
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    }

    fn bold(self, text: &str) -> String {
        if self.colour {
            format!("\x1b[1m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

/// The terminal's width from `COLUMNS`, else 100.
fn width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .filter(|&c: &usize| c >= 40)
        .unwrap_or(100)
}

/// The table `ripen watch` redraws on a terminal: one line each, cut to
/// `columns` so that no line wraps and the redraw stays in place.
fn table(view: &EntityView, rows: &[StepRow], style: Style, columns: usize) -> Vec<String> {
    let name_w = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
    let degraded = if view.degraded { " (degraded)" } else { "" };
    let mut lines = vec![cut(
        &format!(
            "{} {} v{}: {}{degraded}",
            view.id, view.type_name, view.version, view.status
        ),
        columns,
    )];
    lines.push(cut(
        &format!(
            "  {:<name_w$}  {:<10}  {:>8}  {:>9}  {:<12}  error",
            "step", "status", "attempts", "duration", "next retry"
        ),
        columns,
    ));
    for r in rows {
        let duration = r.duration_us.map(human).unwrap_or_default();
        let next = match &r.next_retry {
            Some((_, in_us)) if *in_us > 0 => format!("in {}", human(*in_us)),
            Some(_) => "now".to_owned(),
            None => String::new(),
        };
        let critical = if r.critical { "" } else { " (non-critical)" };
        let head = format!("  {:<name_w$}  ", r.name);
        let tail = format!(
            "  {:>8}  {duration:>9}  {next:<12}  {}{critical}",
            r.attempts,
            r.error.as_deref().unwrap_or("")
        );
        // The status cell is 10 visible characters, whatever its colour.
        let room = columns.saturating_sub(head.chars().count() + 10 + 1);
        lines.push(format!(
            "{head}{}{}",
            style.status(r.status, 10),
            cut(&tail, room)
        ));
    }
    lines[0] = style.bold(&lines[0]);
    lines
}

/// `text` cut to `max` characters, marked with `…` when cut.
fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_without_a_scheme_is_http() {
        assert_eq!(server_url("127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(server_url(" localhost:1 "), "http://localhost:1");
        assert_eq!(server_url("https://ripen.example"), "https://ripen.example");
    }

    fn view(steps: serde_json::Value) -> EntityView {
        serde_json::from_value(serde_json::json!({
            "id": "01a233a6-ee20-72be-b1c2-82b64fb86873", "type": "merchant", "version": 1,
            "status": "pending", "degraded": false,
            "created_at": "2026-12-01T22:08:27.000000Z", "updated_at": "2026-12-01T22:08:27.000000Z",
            "ready_at": null, "steps": steps,
        }))
        .expect("a view")
    }

    fn event(seq: u64, at: &str, kind: &str, step: &str) -> Event {
        serde_json::from_value(serde_json::json!({
            "seq": seq, "at": format!("2026-12-01T22:08:{at}Z"), "kind": kind, "step": step, "attempt": 1,
        }))
        .expect("an event")
    }

    #[test]
    fn rows_time_each_step_from_its_history() {
        let v = view(serde_json::json!([
            {"name": "kyc", "status": "succeeded", "critical": true, "attempts": 2, "last_error": null},
            {"name": "billing", "status": "retrying", "critical": true, "attempts": 1,
             "last_error": "HTTP 503", "next_attempt_at": "2026-12-01T22:08:40.000000Z"},
            {"name": "email", "status": "blocked", "critical": false, "attempts": 0, "last_error": null},
        ]));
        let history = [
            event(2, "27.000000", "step_started", "kyc"),
            event(3, "27.250000", "step_requeued", "kyc"),
            event(4, "28.000000", "step_started", "kyc"),
            event(5, "28.500000", "step_succeeded", "kyc"),
            event(6, "29.000000", "step_started", "billing"),
        ];
        let now = ripen_server::parse_rfc3339("2026-12-01T22:08:35Z").expect("a time");
        let rows = step_rows(&v, &history, now);
        assert_eq!(
            rows[0].duration_us,
            Some(500_000),
            "from the start after the requeue"
        );
        assert_eq!(
            rows[1].duration_us,
            Some(6_000_000),
            "still waiting: up to now"
        );
        assert_eq!(
            rows[1].next_retry,
            Some(("2026-12-01T22:08:40.000000Z".to_owned(), 5_000_000))
        );
        assert_eq!(rows[2].duration_us, None);
        assert_eq!(
            plain_line(&rows[0]),
            format!("{:<24} succeeded  attempts 2  after 500 ms", "kyc")
        );
        assert!(
            plain_line(&rows[1]).ends_with("next retry 2026-12-01T22:08:40.000000Z  (HTTP 503)")
        );

        let plain = table(&v, &rows, Style { colour: false }, 60);
        assert!(plain.iter().all(|l| l.chars().count() <= 60), "{plain:#?}");
        assert!(plain.iter().all(|l| !l.contains('\x1b')));
        assert!(plain[3].contains("in 5.0 s"), "{plain:#?}");
        let coloured = table(&v, &rows, Style { colour: true }, 60);
        assert!(coloured[2].contains("\x1b[32msucceeded"), "{coloured:#?}");
        assert!(coloured[3].contains("\x1b[33mretrying"), "{coloured:#?}");
    }

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(human(850_000), "850 ms");
        assert_eq!(human(4_200_000), "4.2 s");
        assert_eq!(human(185_000_000), "3m 05s");
    }

    #[test]
    fn statuses_parse_by_name() {
        assert_eq!(parse_status("failed").unwrap(), EntityStatus::Failed);
        let e = parse_status("done").unwrap_err().to_string();
        assert!(e.contains("pending, ready, failed or cancelled"), "{e}");
    }
}
