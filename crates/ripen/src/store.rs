//! `ripen store …`: the store of a configuration, offline: what it holds
//! (`stats`) and what retention removes (`prune`, `--dry-run` to only
//! count). It opens the store as `ripen keys create --config` does; on
//! SQLite the server must be stopped.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Subcommand;
use ripen_engine::time::rfc3339;
use ripen_store::{Pruned, Store};
use serde_json::{json, Value};

use crate::cli::Output;

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Rows and sizes per table, and the oldest payload retention keeps.
    Stats {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Prune what `[retention]` no longer keeps, in passes of `batch` rows.
    Prune {
        #[arg(long)]
        config: PathBuf,
        /// Count what the next pass would remove, and remove nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
}

pub async fn run(command: StoreCommand) -> Result<()> {
    match command {
        StoreCommand::Stats { config, output } => {
            let (_, store, _lock) = open(&config).await?;
            let stats = store.stats().await?;
            let view = json!({
                "tables": stats.tables.iter().map(|t| json!({
                    "name": t.name, "rows": t.rows, "bytes": t.bytes,
                })).collect::<Vec<_>>(),
                "total_bytes": stats.total_bytes,
                "free_bytes": stats.free_bytes,
                "oldest_kept_payload_at": stats.oldest_kept_payload_us.map(rfc3339),
            });
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&view)?),
                Output::Table => print!("{}", stats_table(&view)),
            }
        }
        StoreCommand::Prune {
            config,
            dry_run,
            output,
        } => {
            let (config, store, _lock) = open(&config).await?;
            let retention = &config.retention;
            let mut total = Pruned::default();
            loop {
                let now = store.clock_us().await?;
                let pass = store.prune(retention.pass(now, dry_run), now).await?;
                total.payloads += pass.payloads;
                total.keys += pass.keys;
                total.entities += pass.entities;
                let full = [pass.payloads, pass.keys, pass.entities]
                    .iter()
                    .any(|&n| n >= u64::from(retention.batch));
                if dry_run || !full {
                    break;
                }
            }
            let view = json!({
                "dry_run": dry_run,
                "payloads": total.payloads,
                "idempotency_keys": total.keys,
                "entities": total.entities,
            });
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&view)?),
                Output::Table => println!(
                    "{} {} payloads, {} idempotency keys, {} entities{}",
                    if dry_run { "would prune" } else { "pruned" },
                    total.payloads,
                    total.keys,
                    total.entities,
                    if dry_run {
                        format!(" (the next pass, at most {} of each)", retention.batch)
                    } else {
                        String::new()
                    }
                ),
            }
        }
    }
    Ok(())
}

async fn open(
    path: &Path,
) -> Result<(ripen_engine::Config, Arc<dyn Store>, Option<std::fs::File>)> {
    let config = ripen_engine::Config::load(path)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("read {}", path.display()))?;
    let (store, lock) = ripen_engine::open_store(&config, &Default::default())
        .await
        .context("open the store (on SQLite, stop the server first)")?;
    Ok((config, store, lock))
}

fn stats_table(view: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:<24} {:>12} {:>14}", "table", "rows", "bytes");
    for t in view["tables"].as_array().into_iter().flatten() {
        let bytes = match &t["bytes"] {
            Value::Null => "-".to_owned(),
            b => b.to_string(),
        };
        let _ = writeln!(
            out,
            "{:<24} {:>12} {:>14}",
            crate::cli::cell(&t["name"]),
            t["rows"],
            bytes
        );
    }
    let _ = writeln!(
        out,
        "total bytes: {}",
        crate::cli::cell(&view["total_bytes"])
    );
    if !view["free_bytes"].is_null() {
        let _ = writeln!(out, "free bytes: {}", view["free_bytes"]);
    }
    let _ = writeln!(
        out,
        "oldest kept payload of a settled entity: {}",
        match &view["oldest_kept_payload_at"] {
            Value::Null => "none".to_owned(),
            v => crate::cli::cell(v),
        }
    );
    out
}
