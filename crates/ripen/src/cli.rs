//! The commands that talk to a running server: `ripen entities …`, and the
//! friendly form of every error they can meet.

use std::fmt::Write as _;

use anyhow::{anyhow, Result};
use clap::{Subcommand, ValueEnum};
use ripen_client::{Client, EntityStatus, EntityView, Event, ListQuery};

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

pub async fn entities(server: &str, command: EntitiesCommand) -> Result<()> {
    let url = server_url(server);
    let client = Client::new(&url);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_without_a_scheme_is_http() {
        assert_eq!(server_url("127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(server_url(" localhost:1 "), "http://localhost:1");
        assert_eq!(server_url("https://ripen.example"), "https://ripen.example");
    }

    #[test]
    fn statuses_parse_by_name() {
        assert_eq!(parse_status("failed").unwrap(), EntityStatus::Failed);
        let e = parse_status("done").unwrap_err().to_string();
        assert!(e.contains("pending, ready, failed or cancelled"), "{e}");
    }
}
