//! `ripen subscriptions …`: webhook subscriptions and their deliveries,
//! from the command line.

use std::fmt::Write as _;

use anyhow::Result;
use clap::Subcommand;
use ripen_client::{Method, StatusCode};
use serde_json::{json, Value};

use crate::cli::{call_json, cell, Output, ServerArg};

#[derive(Subcommand)]
pub enum SubscriptionsCommand {
    /// Subscribe a URL to status changes; prints the signing secret once.
    Create {
        /// Where deliveries are POSTed (https, or an address the server's
        /// notify.allow_networks permits).
        url: String,
        /// Only these events (entity.created, entity.pending, entity.ready,
        /// entity.failed, entity.cancelled, entity.degraded); all by default.
        #[arg(long = "event", value_name = "EVENT")]
        events: Vec<String>,
        /// Only entities of these types; all by default.
        #[arg(long = "type", value_name = "TYPE")]
        types: Vec<String>,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// List subscriptions with their delivery counts.
    List {
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Print one subscription.
    Get {
        id: String,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a subscription and its deliveries.
    Delete { id: String },
    /// List a subscription's deliveries, newest first.
    Deliveries {
        id: String,
        /// Only deliveries in this status (pending, delivered, dead).
        #[arg(long)]
        status: Option<String>,
        /// At most this many (1 to 500).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Queue a dead delivery again.
    Redeliver { delivery_id: u64 },
}

pub async fn run(server: &ServerArg, command: SubscriptionsCommand) -> Result<()> {
    let (url, client) = server.connect()?;
    let call = |method: Method, path: String, body: Option<Value>, expected: StatusCode| {
        let (client, url) = (&client, &url);
        async move { call_json(client, url, method, &path, body, expected).await }
    };
    match command {
        SubscriptionsCommand::Create {
            url: target,
            events,
            types,
            output,
        } => {
            let body = json!({"url": target, "events": events, "types": types});
            let sub = call(
                Method::POST,
                "/v1/subscriptions".into(),
                Some(body),
                StatusCode::CREATED,
            )
            .await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&sub)?),
                Output::Table => {
                    print!("{}", subscription_table(std::slice::from_ref(&sub)));
                    println!(
                        "secret: {}  (shown once: give it to the receiver to verify signatures)",
                        sub["secret"].as_str().unwrap_or("")
                    );
                }
            }
        }
        SubscriptionsCommand::List { output } => {
            let page = call(
                Method::GET,
                "/v1/subscriptions".into(),
                None,
                StatusCode::OK,
            )
            .await?;
            let items = page["items"].as_array().cloned().unwrap_or_default();
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&page)?),
                Output::Table => print!("{}", subscription_table(&items)),
            }
        }
        SubscriptionsCommand::Get { id, output } => {
            let sub = call(
                Method::GET,
                format!("/v1/subscriptions/{}", ripen_client::percent_encode(&id)),
                None,
                StatusCode::OK,
            )
            .await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&sub)?),
                Output::Table => print!("{}", subscription_table(std::slice::from_ref(&sub))),
            }
        }
        SubscriptionsCommand::Delete { id } => {
            call(
                Method::DELETE,
                format!("/v1/subscriptions/{}", ripen_client::percent_encode(&id)),
                None,
                StatusCode::NO_CONTENT,
            )
            .await?;
            println!("deleted {id}");
        }
        SubscriptionsCommand::Deliveries {
            id,
            status,
            limit,
            output,
        } => {
            let mut path = format!(
                "/v1/subscriptions/{}/deliveries?limit={limit}",
                ripen_client::percent_encode(&id)
            );
            if let Some(s) = status {
                let _ = write!(path, "&status={}", ripen_client::percent_encode(&s));
            }
            let page = call(Method::GET, path, None, StatusCode::OK).await?;
            let items = page["items"].as_array().cloned().unwrap_or_default();
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&page)?),
                Output::Table => print!("{}", delivery_table(&items)),
            }
        }
        SubscriptionsCommand::Redeliver { delivery_id } => {
            call(
                Method::POST,
                format!("/v1/deliveries/{delivery_id}/redeliver"),
                None,
                StatusCode::ACCEPTED,
            )
            .await?;
            println!("delivery {delivery_id} queued again");
        }
    }
    Ok(())
}

fn names(v: &Value) -> String {
    let list: Vec<String> = v
        .as_array()
        .map(|a| a.iter().map(cell).collect())
        .unwrap_or_default();
    if list.is_empty() {
        "all".into()
    } else {
        list.join(",")
    }
}

fn subscription_table(items: &[Value]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<36}  {:<9} {:<9} {:<5}  events / types  url",
        "id", "delivered", "pending", "dead"
    );
    for s in items {
        let d = &s["deliveries"];
        let _ = writeln!(
            out,
            "{:<36}  {:<9} {:<9} {:<5}  {} / {}  {}",
            cell(&s["id"]),
            cell(&d["delivered"]),
            cell(&d["pending"]),
            cell(&d["dead"]),
            names(&s["events"]),
            names(&s["types"]),
            cell(&s["url"]),
        );
    }
    out
}

fn delivery_table(items: &[Value]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>8}  {:<9}  {:<16}  {:<36}  attempts  last error",
        "id", "status", "event", "entity"
    );
    for d in items {
        let _ = writeln!(
            out,
            "{:>8}  {:<9}  {:<16}  {:<36}  {:>8}  {}",
            cell(&d["id"]),
            cell(&d["status"]),
            cell(&d["event"]),
            cell(&d["entity_id"]),
            cell(&d["attempts"]),
            cell(&d["last_error"]),
        );
    }
    out
}
