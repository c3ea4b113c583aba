//! `ripen types …`: the type registry from the command line.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Subcommand;
use ripen_client::{percent_encode, Method, StatusCode};
use serde_json::Value;

use crate::cli::{friendly, Output, ServerArg};

#[derive(Subcommand)]
pub enum TypesCommand {
    /// List the registered types with their latest version.
    List {
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Print a type's versions, or one version (a number or "latest").
    Show {
        #[arg(value_name = "TYPE")]
        type_name: String,
        version: Option<String>,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Register a version from a JSON file ("-" reads standard input):
    /// {"type", "schema", "steps", "references"}.
    Push {
        file: PathBuf,
        /// The type, if the file does not name it (or to override it).
        #[arg(long = "type", value_name = "TYPE")]
        type_name: Option<String>,
        /// Register it even if the compatibility check refuses it.
        #[arg(long)]
        force: bool,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
}

pub async fn run(server: &ServerArg, command: TypesCommand) -> Result<()> {
    let (url, client) = server.connect()?;
    let get = |path: String| {
        let (client, url) = (&client, &url);
        async move {
            let response = client
                .request(Method::GET, &path, &[("accept", "application/json")], None)
                .await
                .and_then(|r| r.expect(StatusCode::OK))
                .map_err(|e| friendly(url, e))?;
            serde_json::from_slice::<Value>(&response.body)
                .map_err(|e| anyhow::anyhow!("the server's answer is not JSON: {e}"))
        }
    };
    match command {
        TypesCommand::List { output } => {
            let page = get("/v1/types".into()).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&page)?),
                Output::Table => {
                    let items = page["items"].as_array().cloned().unwrap_or_default();
                    print!("{}", types_table(&items));
                }
            }
        }
        TypesCommand::Show {
            type_name,
            version,
            output,
        } => {
            let t = percent_encode(&type_name);
            match version {
                None => {
                    let page = get(format!("/v1/types/{t}/versions")).await?;
                    match output {
                        Output::Json => println!("{}", serde_json::to_string_pretty(&page)?),
                        Output::Table => {
                            let items = page["items"].as_array().cloned().unwrap_or_default();
                            print!("{}", versions_table(&items));
                        }
                    }
                }
                Some(n) => {
                    let v = get(format!("/v1/types/{t}/versions/{}", percent_encode(&n))).await?;
                    match output {
                        Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                        Output::Table => print!("{}", version_text(&v)),
                    }
                }
            }
        }
        TypesCommand::Push {
            file,
            type_name,
            force,
            output,
        } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("read standard input")?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("read {}", file.display()))?
            };
            let mut body: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            let Some(object) = body.as_object_mut() else {
                anyhow::bail!("{} must hold a JSON object", file.display());
            };
            let named = object.remove("type");
            let type_name = match (type_name, named) {
                (Some(t), _) => t,
                (None, Some(Value::String(t))) => t,
                _ => anyhow::bail!(
                    "{} names no type: add \"type\": \"NAME\" or pass --type NAME",
                    file.display()
                ),
            };
            if force {
                object.insert("force".into(), Value::Bool(true));
            }
            let path = format!("/v1/types/{}/versions", percent_encode(&type_name));
            let response = client
                .request(
                    Method::POST,
                    &path,
                    &[("accept", "application/json")],
                    Some(Bytes::from(body.to_string())),
                )
                .await
                .map_err(|e| friendly(&url, e))?;
            let status = response.status;
            let answer: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
            if status == StatusCode::CREATED || status == StatusCode::OK {
                match output {
                    Output::Json => println!("{}", serde_json::to_string_pretty(&answer)?),
                    Output::Table if status == StatusCode::CREATED => {
                        println!("registered {} version {}", type_name, answer["version"])
                    }
                    Output::Table => println!(
                        "unchanged: {} version {} has this content already",
                        type_name, answer["version"]
                    ),
                }
                return Ok(());
            }
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            }
            let mut message = format!(
                "{} ({}): {}",
                answer["title"].as_str().unwrap_or("refused"),
                status.as_u16(),
                answer["detail"].as_str().unwrap_or("")
            );
            for key in ["incompatibilities", "errors"] {
                for item in answer[key].as_array().into_iter().flatten() {
                    let pointer = item["pointer"].as_str().unwrap_or("");
                    let pointer = if pointer.is_empty() {
                        "(whole)"
                    } else {
                        pointer
                    };
                    match item["rule"].as_str() {
                        Some(rule) => write!(message, "\n  {pointer} [{rule}]: "),
                        None => write!(message, "\n  {pointer}: "),
                    }?;
                    message.push_str(item["message"].as_str().unwrap_or(""));
                }
            }
            anyhow::bail!(message);
        }
    }
    Ok(())
}

fn types_table(items: &[Value]) -> String {
    let mut out = format!(
        "{:<24} {:>7} {:>9}  {}\n",
        "TYPE", "LATEST", "VERSIONS", "STEPS"
    );
    for t in items {
        let steps: Vec<&str> = t["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["name"].as_str())
            .collect();
        let _ = writeln!(
            out,
            "{:<24} {:>7} {:>9}  {}",
            t["type"].as_str().unwrap_or(""),
            t["latest_version"],
            t["versions"],
            steps.join(", ")
        );
    }
    out
}

fn versions_table(items: &[Value]) -> String {
    let mut out = format!(
        "{:>7}  {:<27} {:>6} {:>6}  {}\n",
        "VERSION", "CREATED", "LIVE", "FORCED", "DIGEST"
    );
    for v in items {
        let runnable = v["runnable"].as_bool().unwrap_or(true);
        let _ = writeln!(
            out,
            "{:>7}  {:<27} {:>6} {:>6}  {}{}",
            v["version"],
            v["created_at"].as_str().unwrap_or(""),
            v["live_entities"],
            if v["forced"].as_bool().unwrap_or(false) {
                "yes"
            } else {
                "no"
            },
            v["digest"].as_str().unwrap_or(""),
            if runnable { "" } else { "  (cannot run here)" }
        );
    }
    out
}

fn version_text(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} version {}  created {}  live entities {}{}",
        v["type"].as_str().unwrap_or(""),
        v["version"],
        v["created_at"].as_str().unwrap_or(""),
        v["live_entities"],
        if v["forced"].as_bool().unwrap_or(false) {
            "  (forced)"
        } else {
            ""
        }
    );
    if let Some(why) = v["unrunnable"].as_str() {
        let _ = writeln!(out, "cannot run on this node: {why}");
    }
    let _ = writeln!(
        out,
        "{:<20} {:<20} {:>8} {:>9}  RUNS ON",
        "STEP", "NEEDS", "CRITICAL", "TIMEOUT"
    );
    for s in v["steps"].as_array().into_iter().flatten() {
        let needs: Vec<&str> = s["needs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let runs_on = if let Some(url) = s["http"].as_str() {
            format!("http {url}")
        } else if let Some(q) = s["worker"].as_str() {
            format!("worker {q}")
        } else if let Some(b) = s["builtin"].as_object() {
            format!("builtin {}", b.keys().next().map_or("", String::as_str))
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{:<20} {:<20} {:>8} {:>9}  {runs_on}",
            s["name"].as_str().unwrap_or(""),
            if needs.is_empty() {
                "-".to_owned()
            } else {
                needs.join(",")
            },
            if s["critical"].as_bool().unwrap_or(true) {
                "yes"
            } else {
                "no"
            },
            s["timeout"].as_str().unwrap_or(""),
        );
    }
    let schema = if v["schema"].is_null() {
        "none (any JSON object)".to_owned()
    } else {
        serde_json::to_string(&v["schema"]).unwrap_or_default()
    };
    let _ = writeln!(out, "schema: {schema}");
    out
}
