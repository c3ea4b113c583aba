//! `ripen keys …`: API keys from the command line. `create --config`
//! writes the first key straight into the configured store, with no server
//! running: how a server that must not run open gets its first admin key.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use ripen_client::{Method, StatusCode};
use ripen_engine::keys::Scopes;
use serde_json::{json, Value};

use crate::cli::{call_json, cell, Output, ServerArg};

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a key; prints it once.
    Create {
        /// The tenant the key speaks for (the caller's own by default; the
        /// default tenant with --config).
        #[arg(long)]
        tenant: Option<String>,
        /// What the key may do: submit, read, operate, admin, worker,
        /// comma-separated.
        #[arg(long, required = true)]
        scopes: String,
        /// A name to tell the key by.
        #[arg(long, default_value = "")]
        name: String,
        /// Write the key into the store of this configuration directly,
        /// with no server (on SQLite, the server must be stopped).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// List keys (every tenant's for an admin of the default tenant).
    List {
        /// Only this tenant's keys.
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Revoke a key: it stops working at once, on every node.
    Revoke { id: String },
}

pub async fn run(server: &ServerArg, command: KeysCommand) -> Result<()> {
    if let KeysCommand::Create {
        tenant,
        scopes,
        name,
        config: Some(config),
        output,
    } = command
    {
        return create_offline(&config, tenant.as_deref(), &scopes, &name, output).await;
    }
    let (url, client) = server.connect()?;
    let call = |method: Method, path: String, body: Option<Value>, expected: StatusCode| {
        let (client, url) = (&client, &url);
        async move { call_json(client, url, method, &path, body, expected).await }
    };
    match command {
        KeysCommand::Create {
            tenant,
            scopes,
            name,
            output,
            ..
        } => {
            let mut body = json!({"scopes": scopes, "name": name});
            if let Some(t) = tenant {
                body["tenant"] = json!(t);
            }
            let key = call(
                Method::POST,
                "/v1/keys".into(),
                Some(body),
                StatusCode::CREATED,
            )
            .await?;
            print_created(&key, output)?;
        }
        KeysCommand::List { tenant, output } => {
            let path = match tenant {
                Some(t) => format!("/v1/keys?tenant={}", ripen_client::percent_encode(&t)),
                None => "/v1/keys".into(),
            };
            let page = call(Method::GET, path, None, StatusCode::OK).await?;
            let items = page["items"].as_array().cloned().unwrap_or_default();
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&page)?),
                Output::Table => print!("{}", key_table(&items)),
            }
        }
        KeysCommand::Revoke { id } => {
            call(
                Method::DELETE,
                format!("/v1/keys/{}", ripen_client::percent_encode(&id)),
                None,
                StatusCode::OK,
            )
            .await?;
            println!("revoked {id}");
        }
    }
    Ok(())
}

async fn create_offline(
    path: &std::path::Path,
    tenant: Option<&str>,
    scopes: &str,
    name: &str,
    output: Output,
) -> Result<()> {
    let config = ripen_engine::Config::load(path)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("read {}", path.display()))?;
    let scopes = Scopes::parse(scopes.split(',')).map_err(anyhow::Error::msg)?;
    let (store, _lock) = ripen_engine::open_store(&config, &Default::default())
        .await
        .context("open the store (on SQLite, stop the server first)")?;
    let tenant = tenant.unwrap_or(ripen_engine::keys::DEFAULT_TENANT);
    let minted = ripen_engine::keys::create(store.as_ref(), tenant, name, scopes, now_us()).await?;
    let k = &minted.key;
    let view = json!({
        "id": k.id, "tenant": k.tenant, "name": k.name, "scopes": k.scopes,
        "created_at": ripen_engine::time::rfc3339(k.created_at_us), "revoked_at": null,
        "key": minted.secret,
    });
    print_created(&view, output)
}

fn now_us() -> i64 {
    ripen_engine::time::local_now_us()
}

fn print_created(key: &Value, output: Output) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(key)?),
        Output::Table => {
            print!("{}", key_table(std::slice::from_ref(key)));
            println!(
                "key: {}  (shown once: keep it secret; send it as Authorization: Bearer KEY)",
                cell(&key["key"])
            );
        }
    }
    Ok(())
}

fn key_table(items: &[Value]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20}  {:<16} {:<28} {:<24} {:<24} name",
        "id", "tenant", "scopes", "created", "revoked"
    );
    for k in items {
        let scopes: Vec<String> = k["scopes"]
            .as_array()
            .map(|a| a.iter().map(cell).collect())
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<20}  {:<16} {:<28} {:<24} {:<24} {}",
            cell(&k["id"]),
            cell(&k["tenant"]),
            scopes.join(","),
            cell(&k["created_at"]),
            cell(&k["revoked_at"]),
            cell(&k["name"]),
        );
    }
    out
}
