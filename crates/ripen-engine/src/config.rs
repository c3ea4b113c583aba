//! `ripen.toml`: parsing and validation.
//!
//! Every error names the file, the key and the problem, and the server does
//! not start. The reference of every key is `docs/config.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ripen_core::{CompensationDef, Executor, Pipeline, RetryPolicy, StepDef};
use ripen_tls::ClientFiles;
use serde::Deserialize;

use crate::executor::builtin::{self, BuiltinSpec};
use crate::schema::Schema;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_BODY_LIMIT_BYTES: usize = 1024 * 1024;
/// The largest body limit a configuration may set.
pub const BODY_LIMIT_BYTES_MAX: usize = 64 * 1024 * 1024;
pub const DEFAULT_STEP_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_CONCURRENCY: usize = 512;
pub const DEFAULT_LEASE_GRACE_MS: u64 = 5_000;
pub const DEFAULT_POLL_INTERVAL_MS: u64 = 1_000;
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10_000;
pub const DEFAULT_WAITING_CLAIMS_MAX: usize = 1_000;
pub const TYPES_MAX: usize = 256;

/// The certificate chain and private key a node serves HTTPS with, both
/// PEM files that were read and parsed when the configuration was.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// A validated configuration.
#[derive(Debug)]
pub struct Config {
    /// The file it was read from, for messages.
    pub path: PathBuf,
    pub listen: String,
    pub body_limit_bytes: usize,
    /// `server.tls_cert_file` and `server.tls_key_file`: serve HTTPS
    /// rather than plain HTTP.
    pub server_tls: Option<ServerTls>,
    pub storage: StorageUrl,
    pub engine: EngineConfig,
    pub types: Vec<TypeConfig>,
    /// How `https` steps connect.
    pub tls: HttpTls,
    /// `[notify]`: webhooks, email and the outbox.
    pub notify: NotifyConfig,
    /// `[auth]`: API keys and request rates. See docs/security.md.
    pub auth: AuthConfig,
    /// `[limits]`: timeouts, caps and the shape of JSON bodies. See
    /// docs/security.md.
    pub limits: crate::limits::Limits,
    /// `[retention]`: how long payloads, keys and settled entities are
    /// kept. See docs/retention.md.
    pub retention: crate::retention::Retention,
    /// `[blobs]`: where payloads larger than `inline_max` are kept; `None`
    /// keeps every payload in the store. See docs/blobs.md.
    pub blobs: Option<crate::blobs::BlobsConfig>,
}

/// `[auth]`: when the API may run without keys, and how fast a key or a
/// tenant may call it.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Serve without keys on a non-loopback address while the store has
    /// none. A loopback-bound server runs open without it (with a warning).
    pub open: bool,
    /// Requests per second one key may make (a token bucket); 0: no limit.
    pub rate_per_key: f64,
    /// Requests per second all the keys of one tenant may make together;
    /// 0: no limit.
    pub rate_per_tenant: f64,
    /// How many requests a bucket holds: the burst above the rate. 0: one
    /// second's worth of the rate (at least 1).
    pub burst: u32,
}

/// `[notify]`: how notifications are delivered. See docs/notifications.md.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// CIDR ranges webhooks may reach although they are private (loopback,
    /// RFC 1918, ...); empty by default.
    pub allow_networks: Vec<String>,
    /// How long a failing delivery is retried before it is dead.
    pub retry_for_ms: u64,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// How long one delivery attempt may take.
    pub attempt_timeout_ms: u64,
    /// Deliveries of one subscription in flight on one node, at most.
    pub per_subscription: u32,
    /// How long outbox rows (what `/v1/events` resumes from) are kept after
    /// they were fanned out.
    pub outbox_retention_ms: u64,
    /// The file with the master key that seals webhook secrets; the
    /// environment's `RIPEN_MASTER_KEY` wins over it. On SQLite it defaults
    /// to the database file's name with `.key` added.
    pub master_key_file: Option<PathBuf>,
    /// Status changes a live stream may fall behind before it is told so
    /// and closed.
    pub stream_buffer: usize,
    /// `[notify.email]`: mail when entities settle; off when absent.
    pub email: Option<ripen_notify::email::EmailConfig>,
}

pub const DEFAULT_NOTIFY_RETRY_FOR_MS: u64 = 24 * 3_600_000;
pub const DEFAULT_NOTIFY_ATTEMPT_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_NOTIFY_PER_SUBSCRIPTION: u32 = 32;

impl Default for NotifyConfig {
    fn default() -> NotifyConfig {
        NotifyConfig {
            allow_networks: Vec::new(),
            retry_for_ms: DEFAULT_NOTIFY_RETRY_FOR_MS,
            initial_backoff_ms: 1_000,
            max_backoff_ms: 600_000,
            attempt_timeout_ms: DEFAULT_NOTIFY_ATTEMPT_TIMEOUT_MS,
            per_subscription: DEFAULT_NOTIFY_PER_SUBSCRIPTION,
            outbox_retention_ms: 24 * 3_600_000,
            master_key_file: None,
            stream_buffer: 4_096,
            email: None,
        }
    }
}

/// The TLS settings of `https` steps: the `[tls]` table, and the steps that
/// set a `ca_file` or a client certificate of their own. Every file named
/// here was read and found usable when the configuration was loaded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HttpTls {
    /// `[tls]`: for every https step without settings of its own. No
    /// `ca_file` means the system's root certificates.
    pub default: ClientFiles,
    /// The steps with settings of their own, by type and step name; what
    /// they do not set comes from `default`.
    pub steps: BTreeMap<(String, String), ClientFiles>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StorageUrl {
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL, shared by any number of nodes.
    Postgres(String),
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Whether this node runs steps. A node that does not still accepts
    /// intake and serves reads; its entities wait for a node that does.
    pub execute: bool,
    pub concurrency: usize,
    pub lease_grace_ms: u64,
    pub poll_interval_ms: u64,
    /// How long a stopping node waits for its running attempts to finish.
    pub shutdown_grace_ms: u64,
    /// The most worker claims that may wait for work on this node at once.
    pub waiting_claims_max: usize,
    /// `engine.node`: this node's name, sent as `ripen-node` with every
    /// HTTP step call; none by default.
    pub node: Option<String>,
}

#[derive(Debug)]
pub struct TypeConfig {
    pub name: String,
    pub version: u32,
    pub schema: Option<Arc<Schema>>,
    pub pipeline: Pipeline,
    /// `references`: payload field -> the type of the entity it names,
    /// sorted by field (docs/dependencies.md).
    pub references: Vec<(String, String)>,
    /// `force`: register this content at start even if the compatibility
    /// check refuses it (see docs/types.md).
    pub force: bool,
}

impl Config {
    pub fn type_config(&self, name: &str) -> Option<&TypeConfig> {
        self.types.iter().find(|t| t.name == name)
    }

    /// Reads and validates the file.
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read the configuration: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, path, base)
    }

    /// Parses configuration text; relative paths resolve against `base`.
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Config, String> {
        let file = path.display();
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let msg = e.message();
            match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    format!("{file}:{line}: {msg}")
                }
                None => format!("{file}: {msg}"),
            }
        })?;
        let err = |key: &str, problem: String| format!("{file}: {key}: {problem}");

        let server = raw.server.unwrap_or_default();
        let listen = server.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        if listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(err(
                "server.listen",
                format!("{listen:?} is not an address such as \"127.0.0.1:8080\""),
            ));
        }
        let body_limit_bytes = server.body_limit_bytes.unwrap_or(DEFAULT_BODY_LIMIT_BYTES);
        if body_limit_bytes == 0 || body_limit_bytes > BODY_LIMIT_BYTES_MAX {
            return Err(err(
                "server.body_limit_bytes",
                format!("must be between 1 and {BODY_LIMIT_BYTES_MAX}"),
            ));
        }

        let server_tls = match (server.tls_cert_file, server.tls_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let (cert_file, key_file) = (base.join(cert), base.join(key));
                ripen_tls::read_cert_chain(&cert_file)
                    .map_err(|p| err("server.tls_cert_file", p))?;
                ripen_tls::read_private_key(&key_file)
                    .map_err(|p| err("server.tls_key_file", p))?;
                Some(ServerTls {
                    cert_file,
                    key_file,
                })
            }
            (Some(_), None) => {
                return Err(err(
                    "server.tls_key_file",
                    "is needed with server.tls_cert_file".to_owned(),
                ))
            }
            (None, Some(_)) => {
                return Err(err(
                    "server.tls_cert_file",
                    "is needed with server.tls_key_file".to_owned(),
                ))
            }
        };

        let url = raw
            .storage
            .and_then(|s| s.url)
            .unwrap_or_else(|| "sqlite://ripen.db".to_owned());
        let storage = if let Some(rest) = url.strip_prefix("sqlite://") {
            if rest.is_empty() {
                return Err(err("storage.url", "the sqlite URL names no file".into()));
            }
            StorageUrl::Sqlite(base.join(rest))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            ripen_store::postgres::PgTls::from_url(&url).map_err(|p| err("storage.url", p))?;
            StorageUrl::Postgres(url)
        } else {
            return Err(err(
                "storage.url",
                format!(
                    "{url:?} is not a storage URL; use sqlite://FILE or postgres://USER@HOST:PORT/DB"
                ),
            ));
        };

        let e = raw.engine.unwrap_or_default();
        let engine = EngineConfig {
            execute: e.execute.unwrap_or(true),
            concurrency: e.concurrency.unwrap_or(DEFAULT_CONCURRENCY),
            lease_grace_ms: duration_ms(e.lease_grace.as_deref(), DEFAULT_LEASE_GRACE_MS)
                .map_err(|p| err("engine.lease_grace", p))?,
            poll_interval_ms: duration_ms(e.poll_interval.as_deref(), DEFAULT_POLL_INTERVAL_MS)
                .map_err(|p| err("engine.poll_interval", p))?,
            shutdown_grace_ms: duration_ms(e.shutdown_grace.as_deref(), DEFAULT_SHUTDOWN_GRACE_MS)
                .map_err(|p| err("engine.shutdown_grace", p))?,
            waiting_claims_max: e.waiting_claims_max.unwrap_or(DEFAULT_WAITING_CLAIMS_MAX),
            node: e.node,
        };
        if let Some(node) = &engine.node {
            if !valid_type_name(node) {
                return Err(err(
                    "engine.node",
                    "a node name is 1 to 64 characters of a-z, A-Z, 0-9, '_' and '-'".into(),
                ));
            }
        }
        if engine.waiting_claims_max == 0 || engine.waiting_claims_max > 100_000 {
            return Err(err(
                "engine.waiting_claims_max",
                "must be between 1 and 100000".into(),
            ));
        }
        if engine.concurrency == 0 || engine.concurrency > 65_536 {
            return Err(err(
                "engine.concurrency",
                "must be between 1 and 65536".into(),
            ));
        }
        if engine.poll_interval_ms == 0 {
            return Err(err("engine.poll_interval", "must be more than zero".into()));
        }

        let mut tls = HttpTls::default();
        if let Some(t) = raw.tls {
            let files = RawTlsFiles {
                ca_file: t.ca_file,
                client_cert: t.client_cert,
                client_key: t.client_key,
            };
            tls.default = client_files(files, base, &ClientFiles::default())
                .map_err(|(k, p)| err(&format!("tls.{k}"), p))?;
            tls.default
                .client_config()
                .map_err(|e| err(&format!("tls.{}", e.key.as_str()), e.problem))?;
        }

        if raw.types.is_empty() {
            return Err(format!(
                "{file}: types: no entity type is defined; add a [types.NAME] table with steps"
            ));
        }
        if raw.types.len() > TYPES_MAX {
            return Err(err("types", format!("at most {TYPES_MAX} types")));
        }
        let mut types = Vec::new();
        let type_names: Vec<String> = raw.types.keys().cloned().collect();
        for (name, t) in raw.types {
            let key = format!("types.{name}");
            if !valid_type_name(&name) {
                return Err(err(
                    &key,
                    "a type name is 1 to 64 characters of a-z, A-Z, 0-9, '_' and '-'".into(),
                ));
            }
            let references =
                crate::deps::check_config(t.references.unwrap_or_default(), &type_names)
                    .map_err(|(k, p)| err(&format!("{key}.references{k}"), p))?;
            let version = t.version.unwrap_or(1);
            if version == 0 {
                return Err(err(&format!("{key}.version"), "must be 1 or more".into()));
            }
            let schema = match &t.schema {
                None => None,
                Some(rel) => {
                    let schema_path = base.join(rel);
                    Some(Arc::new(
                        Schema::load(&schema_path).map_err(|p| err(&format!("{key}.schema"), p))?,
                    ))
                }
            };
            let mut defs = Vec::with_capacity(t.steps.len());
            for (i, mut s) in t.steps.into_iter().enumerate() {
                let skey = format!("{key}.steps[{i}]");
                let step_files = RawTlsFiles {
                    ca_file: s.ca_file.take(),
                    client_cert: s.client_cert.take(),
                    client_key: s.client_key.take(),
                };
                let (step_name, https) = (s.name.clone(), s.http.as_deref().is_some_and(is_https));
                defs.push(step_def(s).map_err(|(k, p)| err(&format!("{skey}{k}"), p))?);
                if let Some(files) = step_tls(step_files, https, base, &tls.default)
                    .map_err(|(k, p)| err(&format!("{skey}.{k}"), p))?
                {
                    tls.steps.insert((name.clone(), step_name), files);
                }
            }
            let pipeline =
                Pipeline::new(defs).map_err(|p| err(&format!("{key}.steps"), p.to_string()))?;
            // A compensation reads nothing the connector needs checked.
            for i in 0..pipeline.forward_len() {
                builtin::check_upstream(&pipeline, i)
                    .map_err(|(k, p)| err(&format!("{key}.steps[{i}]{k}"), p))?;
            }
            types.push(TypeConfig {
                name,
                version,
                schema,
                pipeline,
                references,
                force: t.force.unwrap_or(false),
            });
        }
        let notify =
            notify_config(raw.notify.unwrap_or_default(), base).map_err(|(k, p)| err(&k, p))?;
        let auth = auth_config(raw.auth.unwrap_or_default()).map_err(|(k, p)| err(&k, p))?;
        let limits = raw
            .limits
            .unwrap_or_default()
            .parse()
            .map_err(|(k, p)| err(&k, p))?;
        let retention = raw
            .retention
            .unwrap_or_default()
            .parse()
            .map_err(|(k, p)| err(&k, p))?;

        let blobs = raw
            .blobs
            .map(|b| b.parse(base))
            .transpose()
            .map_err(|(k, p)| err(&k, p))?;

        Ok(Config {
            path: path.to_owned(),
            listen,
            body_limit_bytes,
            server_tls,
            storage,
            engine,
            types,
            tls,
            notify,
            auth,
            limits,
            retention,
            blobs,
        })
    }
}

pub(crate) fn valid_type_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn step_def(s: RawStep) -> Result<StepDef, (String, String)> {
    let executor = match (s.http, s.worker) {
        (None, None) if s.builtin.is_some() => {
            let spec = s.builtin.expect("checked by the guard");
            spec.check()?;
            spec.executor()
        }
        _ if s.builtin.is_some() => {
            return Err((
                "".into(),
                "a step has one executor: http, worker or builtin, not two".into(),
            ))
        }
        (Some(url), None) => {
            check_http_url(&url).map_err(|p| (".http".to_owned(), p))?;
            Executor::Http { url }
        }
        (None, Some(queue)) => {
            if !valid_type_name(&queue) {
                return Err((
                    ".worker".into(),
                    format!("{queue:?} is not a queue name: 1 to 64 letters, digits, '_' or '-'"),
                ));
            }
            Executor::Worker { queue }
        }
        (Some(_), Some(_)) => {
            return Err((
                "".into(),
                "a step has one executor: http, worker or builtin, not two".into(),
            ))
        }
        (None, None) => {
            return Err((
                "".into(),
                format!(
                    "step {:?} has no executor; set http = \"http://…\", worker = \"queue\" or builtin = {{ … }}",
                    s.name
                ),
            ))
        }
    };
    let timeout_ms = duration_ms(s.timeout.as_deref(), DEFAULT_STEP_TIMEOUT_MS)
        .map_err(|p| (".timeout".to_owned(), p))?;
    let retry = retry_policy(s.retry, RetryPolicy::default(), ".retry")?;
    let compensate = match s.compensate {
        None => None,
        Some(raw) => Some(compensation_def(raw, &executor, timeout_ms, retry)?),
    };
    Ok(StepDef {
        name: s.name,
        needs: s.needs,
        critical: s.critical.unwrap_or(true),
        timeout_ms,
        retry,
        executor,
        compensate,
    })
}

fn retry_policy(
    raw: Option<RawRetry>,
    default: RetryPolicy,
    key: &str,
) -> Result<RetryPolicy, (String, String)> {
    let retry = match raw {
        None => default,
        Some(r) => RetryPolicy {
            max_attempts: r.max_attempts.unwrap_or(default.max_attempts),
            initial_backoff_ms: duration_ms(
                r.initial_backoff.as_deref(),
                default.initial_backoff_ms,
            )
            .map_err(|p| (format!("{key}.initial_backoff"), p))?,
            max_backoff_ms: duration_ms(r.max_backoff.as_deref(), default.max_backoff_ms)
                .map_err(|p| (format!("{key}.max_backoff"), p))?,
        },
    };
    if retry.max_attempts > 1_000 {
        return Err((format!("{key}.max_attempts"), "at most 1000".into()));
    }
    Ok(retry)
}

/// A step's `compensate`: a URL, or a table naming one executor. Its
/// timeout and retry policy default to the step's own.
fn compensation_def(
    raw: toml::Value,
    step: &Executor,
    timeout_ms: u64,
    retry: RetryPolicy,
) -> Result<CompensationDef, (String, String)> {
    let key = ".compensate";
    let raw = match raw {
        toml::Value::String(url) => RawCompensate {
            http: Some(url),
            worker: None,
            builtin: None,
            timeout: None,
            retry: None,
        },
        table @ toml::Value::Table(_) => table
            .try_into()
            .map_err(|e: toml::de::Error| (key.to_owned(), e.message().to_owned()))?,
        other => {
            return Err((
                key.to_owned(),
                format!(
                    "expected a URL or a table such as {{ http = \"…\" }}, {{ worker = \"queue\" }} or {{ builtin = true }}, found a {}",
                    other.type_str()
                ),
            ))
        }
    };
    let two = || {
        (
            key.to_owned(),
            "a compensation has one executor: http, worker or builtin, not two".to_owned(),
        )
    };
    let executor = match (raw.http, raw.worker, raw.builtin) {
        (Some(url), None, None) => {
            check_http_url(&url).map_err(|p| (format!("{key}.http"), p))?;
            Executor::Http { url }
        }
        (None, Some(queue), None) => {
            if !valid_type_name(&queue) {
                return Err((
                    format!("{key}.worker"),
                    format!("{queue:?} is not a queue name: 1 to 64 letters, digits, '_' or '-'"),
                ));
            }
            Executor::Worker { queue }
        }
        (None, None, Some(true)) => match step {
            Executor::Builtin { .. } => step.clone(),
            _ => {
                return Err((
                    format!("{key}.builtin"),
                    "builtin = true undoes a built-in connector's write; this step has no builtin"
                        .into(),
                ))
            }
        },
        (None, None, Some(false)) | (None, None, None) => {
            return Err((
                key.to_owned(),
                "a compensation needs an executor: http = \"http://…\", worker = \"queue\" or builtin = true".into(),
            ))
        }
        _ => return Err(two()),
    };
    let timeout_ms = duration_ms(raw.timeout.as_deref(), timeout_ms)
        .map_err(|p| (format!("{key}.timeout"), p))?;
    let retry = retry_policy(raw.retry, retry, &format!("{key}.retry"))?;
    Ok(CompensationDef {
        executor,
        timeout_ms,
        retry,
    })
}

/// A step of a type version in its JSON form (the registry's and the API's):
/// the keys of a `[[types.T.steps]]` table, without the TLS files, which
/// belong to a node's configuration. The problem's key is below the step.
pub(crate) fn step_from_json(value: &serde_json::Value) -> Result<StepDef, (String, String)> {
    let raw: RawStep =
        serde_json::from_value(value.clone()).map_err(|e| (String::new(), e.to_string()))?;
    for (key, set) in [
        ("ca_file", raw.ca_file.is_some()),
        ("client_cert", raw.client_cert.is_some()),
        ("client_key", raw.client_key.is_some()),
    ] {
        if set {
            return Err((
                format!(".{key}"),
                "TLS files are set in a node's ripen.toml, not in a registered version".into(),
            ));
        }
    }
    step_def(raw)
}

fn check_http_url(url: &str) -> Result<(), String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("{url:?} must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{url:?} names no host"));
    }
    Ok(())
}

fn is_https(url: &str) -> bool {
    url.parse::<hyper::Uri>()
        .is_ok_and(|uri| uri.scheme_str() == Some("https"))
}

/// The files of a `[tls]` table or a step, relative to `base`; what a step
/// does not set comes from `inherit`. Errors are `(key, problem)`.
fn client_files(
    raw: RawTlsFiles,
    base: &Path,
    inherit: &ClientFiles,
) -> Result<ClientFiles, (String, String)> {
    let identity = match (raw.client_cert, raw.client_key) {
        (Some(cert), Some(key)) => Some((base.join(cert), base.join(key))),
        (None, None) => inherit.identity.clone(),
        (Some(_), None) => {
            return Err((
                "client_key".into(),
                "client_cert is set, so client_key must be too".into(),
            ))
        }
        (None, Some(_)) => {
            return Err((
                "client_cert".into(),
                "client_key is set, so client_cert must be too".into(),
            ))
        }
    };
    Ok(ClientFiles {
        ca_file: raw
            .ca_file
            .map(|f| base.join(f))
            .or_else(|| inherit.ca_file.clone()),
        identity,
    })
}

/// A step's own TLS settings, read and checked; `None` when it has none.
fn step_tls(
    raw: RawTlsFiles,
    https: bool,
    base: &Path,
    default: &ClientFiles,
) -> Result<Option<ClientFiles>, (String, String)> {
    let set = [
        ("ca_file", raw.ca_file.is_some()),
        ("client_cert", raw.client_cert.is_some()),
        ("client_key", raw.client_key.is_some()),
    ];
    let Some((first, _)) = set.iter().find(|(_, is_set)| *is_set) else {
        return Ok(None);
    };
    if !https {
        return Err((
            (*first).to_owned(),
            "applies to https steps only, and this step's executor is not an https:// URL".into(),
        ));
    }
    let files = client_files(raw, base, default)?;
    files
        .client_config()
        .map_err(|e| (e.key.as_str().to_owned(), e.problem))?;
    Ok(Some(files))
}

/// Parses `"250ms"`, `"5s"`, `"2m"`; at most one day.
/// `[notify]`, checked; an error names its key.
fn notify_config(raw: RawNotify, base: &Path) -> Result<NotifyConfig, (String, String)> {
    let d = NotifyConfig::default();
    let key = |k: &str| format!("notify.{k}");
    ripen_notify::ssrf::Policy::new(&raw.allow_networks).map_err(|p| {
        // The policy's message names the key and the entry already.
        (key("allow_networks"), p)
    })?;
    let week_s = 7 * 86_400;
    let c = NotifyConfig {
        retry_for_ms: duration_ms_max(raw.retry_for.as_deref(), d.retry_for_ms, week_s)
            .map_err(|p| (key("retry_for"), p))?,
        initial_backoff_ms: duration_ms(raw.initial_backoff.as_deref(), d.initial_backoff_ms)
            .map_err(|p| (key("initial_backoff"), p))?,
        max_backoff_ms: duration_ms(raw.max_backoff.as_deref(), d.max_backoff_ms)
            .map_err(|p| (key("max_backoff"), p))?,
        attempt_timeout_ms: duration_ms(raw.timeout.as_deref(), d.attempt_timeout_ms)
            .map_err(|p| (key("timeout"), p))?,
        per_subscription: raw.per_subscription.unwrap_or(d.per_subscription),
        outbox_retention_ms: duration_ms_max(
            raw.outbox_retention.as_deref(),
            d.outbox_retention_ms,
            week_s,
        )
        .map_err(|p| (key("outbox_retention"), p))?,
        master_key_file: raw.master_key_file.map(|f| base.join(f)),
        stream_buffer: raw.stream_buffer.unwrap_or(d.stream_buffer),
        allow_networks: raw.allow_networks,
        email: match raw.email {
            Some(mut email) => {
                email.resolve_paths(base);
                // Its messages name their key (notify.email.KEY) already.
                email.validate().map_err(|p| {
                    let (k, p) = p.split_once(": ").unwrap_or(("notify.email", &p));
                    (k.to_owned(), p.to_owned())
                })?;
                Some(email)
            }
            None => None,
        },
    };
    if c.retry_for_ms == 0 {
        return Err((key("retry_for"), "must be more than zero".into()));
    }
    if c.attempt_timeout_ms == 0 {
        return Err((key("timeout"), "must be more than zero".into()));
    }
    if c.initial_backoff_ms > c.max_backoff_ms {
        return Err((
            key("initial_backoff"),
            "must not be longer than notify.max_backoff".into(),
        ));
    }
    if !(256..=65_536).contains(&c.stream_buffer) {
        return Err((key("stream_buffer"), "must be between 256 and 65536".into()));
    }
    if c.per_subscription == 0 || c.per_subscription > 256 {
        return Err((key("per_subscription"), "must be between 1 and 256".into()));
    }
    Ok(c)
}

fn duration_ms(value: Option<&str>, default_ms: u64) -> Result<u64, String> {
    duration_ms_max(value, default_ms, 86_400)
}

/// A duration of at most `max_s` seconds.
pub(crate) fn duration_ms_max(
    value: Option<&str>,
    default_ms: u64,
    max_s: u64,
) -> Result<u64, String> {
    let Some(v) = value else {
        return Ok(default_ms);
    };
    let d: Duration = humantime::parse_duration(v)
        .map_err(|e| format!("{v:?} is not a duration such as \"500ms\" or \"5s\": {e}"))?;
    if d > Duration::from_secs(max_s) {
        return Err(match max_s {
            86_400 => format!("{v:?} is longer than one day"),
            _ => format!("{v:?} is longer than {} days", max_s / 86_400),
        });
    }
    Ok(d.as_millis() as u64)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: Option<RawServer>,
    storage: Option<RawStorage>,
    engine: Option<RawEngine>,
    tls: Option<RawTls>,
    notify: Option<RawNotify>,
    auth: Option<RawAuth>,
    limits: Option<crate::limits::RawLimits>,
    retention: Option<crate::retention::RawRetention>,
    blobs: Option<crate::blobs::RawBlobs>,
    #[serde(default)]
    types: BTreeMap<String, RawType>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    open: Option<bool>,
    rate_per_key: Option<f64>,
    rate_per_tenant: Option<f64>,
    burst: Option<u32>,
}

/// The most requests per second a rate may name.
const RATE_MAX: f64 = 1e9;

fn auth_config(raw: RawAuth) -> Result<AuthConfig, (String, String)> {
    let rate = |key: &str, v: Option<f64>| match v {
        None => Ok(0.0),
        Some(r) if r.is_finite() && (0.0..=RATE_MAX).contains(&r) => Ok(r),
        Some(r) => Err((
            format!("auth.{key}"),
            format!("{r} is not a rate: give requests per second, 0 for no limit"),
        )),
    };
    Ok(AuthConfig {
        open: raw.open.unwrap_or(false),
        rate_per_key: rate("rate_per_key", raw.rate_per_key)?,
        rate_per_tenant: rate("rate_per_tenant", raw.rate_per_tenant)?,
        burst: raw.burst.unwrap_or(0),
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    #[serde(default)]
    allow_networks: Vec<String>,
    retry_for: Option<String>,
    initial_backoff: Option<String>,
    max_backoff: Option<String>,
    timeout: Option<String>,
    per_subscription: Option<u32>,
    outbox_retention: Option<String>,
    master_key_file: Option<PathBuf>,
    stream_buffer: Option<usize>,
    email: Option<ripen_notify::email::EmailConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

/// The TLS keys of `[tls]` and of a step.
#[derive(Default)]
struct RawTlsFiles {
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    body_limit_bytes: Option<usize>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    url: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    execute: Option<bool>,
    concurrency: Option<usize>,
    lease_grace: Option<String>,
    poll_interval: Option<String>,
    shutdown_grace: Option<String>,
    waiting_claims_max: Option<usize>,
    node: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawType {
    version: Option<u32>,
    schema: Option<PathBuf>,
    references: Option<BTreeMap<String, String>>,
    force: Option<bool>,
    #[serde(default)]
    steps: Vec<RawStep>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    #[serde(default)]
    needs: Vec<String>,
    critical: Option<bool>,
    http: Option<String>,
    worker: Option<String>,
    builtin: Option<BuiltinSpec>,
    timeout: Option<String>,
    retry: Option<RawRetry>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    /// A URL, or a table with one executor (`http`, `worker`, or
    /// `builtin = true` for the step's own connector) and optionally
    /// `timeout` and `retry`.
    compensate: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCompensate {
    http: Option<String>,
    worker: Option<String>,
    builtin: Option<bool>,
    timeout: Option<String>,
    retry: Option<RawRetry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<u32>,
    initial_backoff: Option<String>,
    max_backoff: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("ripen.toml"), Path::new("/tmp"))
    }

    const STEP: &str = "[[types.t.steps]]\nname = \"a\"\nhttp = \"http://127.0.0.1:9/a\"\n";

    #[test]
    fn defaults() {
        let c = parse(STEP).unwrap();
        assert_eq!(c.listen, DEFAULT_LISTEN);
        assert_eq!(c.body_limit_bytes, DEFAULT_BODY_LIMIT_BYTES);
        assert_eq!(
            c.storage,
            StorageUrl::Sqlite(PathBuf::from("/tmp/ripen.db"))
        );
        let t = c.type_config("t").unwrap();
        assert_eq!(t.version, 1);
        assert_eq!(t.pipeline.step(0).timeout_ms, DEFAULT_STEP_TIMEOUT_MS);
        assert!(t.pipeline.step(0).critical);
        assert_eq!(c.engine.shutdown_grace_ms, DEFAULT_SHUTDOWN_GRACE_MS);
    }

    #[test]
    fn references_name_defined_types() {
        let store = "[types.s]\nreferences = { m = \"t\", me = \"s\" }\n[[types.s.steps]]\nname = \"a\"\nhttp = \"http://127.0.0.1:9/a\"\n";
        let c = parse(&format!("{STEP}{store}")).unwrap();
        let s = c.type_config("s").unwrap();
        assert_eq!(
            s.references,
            vec![
                ("m".to_owned(), "t".to_owned()),
                ("me".to_owned(), "s".to_owned())
            ]
        );
        assert!(c.type_config("t").unwrap().references.is_empty());
        let e = parse(&format!("{STEP}{}", store.replace("\"t\"", "\"u\""))).unwrap_err();
        assert!(
            e.starts_with("ripen.toml: types.s.references.m: no entity type \"u\" is defined"),
            "{e}"
        );
    }

    #[test]
    fn shutdown_grace() {
        let c = parse(&format!("[engine]\nshutdown_grace = \"200ms\"\n{STEP}")).unwrap();
        assert_eq!(c.engine.shutdown_grace_ms, 200);
        let e = parse(&format!("[engine]\nshutdown_grace = \"a while\"\n{STEP}")).unwrap_err();
        assert!(
            e.starts_with("ripen.toml: engine.shutdown_grace: \"a while\" is not a duration"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_file_key_and_problem() {
        let cases = [
            (
                format!("{STEP}bogus = 1\n"),
                "ripen.toml:4: unknown field `bogus`",
            ),
            (
                format!("{STEP}needs = [\"zz\"]\n"),
                "ripen.toml: types.t.steps: step \"a\" needs \"zz\"",
            ),
            (
                format!("{STEP}{STEP}"),
                "ripen.toml: types.t.steps: step \"a\" is defined twice",
            ),
            (
                format!("{STEP}timeout = \"soon\"\n"),
                "ripen.toml: types.t.steps[0].timeout: \"soon\" is not a duration",
            ),
            (
                format!("{STEP}retry = {{ max_attempts = 0 }}\n"),
                "retry.max_attempts must be at least 1",
            ),
            (
                format!("[types.t]\nschema = \"missing.json\"\n{STEP}"),
                "ripen.toml: types.t.schema: cannot read /tmp/missing.json",
            ),
            (
                "[storage]\nurl = \"mysql://x\"\n".to_owned() + STEP,
                "ripen.toml: storage.url:",
            ),
            (
                "".to_owned(),
                "ripen.toml: types: no entity type is defined",
            ),
            (
                "[[types.t.steps]]\nname = \"a\"\nhttp = \"ftp://x\"\n".to_owned(),
                "ripen.toml: types.t.steps[0].http: \"ftp://x\" must start with http://",
            ),
        ];
        for (text, want) in cases {
            let got = parse(&text).unwrap_err();
            assert!(got.contains(want), "{got:?} should contain {want:?}");
        }
    }

    /// A CA, a client certificate it signed with that certificate's key, and
    /// another key, as PEM files in a fresh directory.
    fn tls_files() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let client_key = rcgen::KeyPair::generate().unwrap();
        let client = rcgen::CertificateParams::new(vec!["client".into()])
            .unwrap()
            .signed_by(&client_key, &ca, &ca_key)
            .unwrap();
        let other_key = rcgen::KeyPair::generate().unwrap();
        let dir_path = dir.path();
        std::fs::create_dir(dir_path.join("certs")).unwrap();
        for (name, text) in [
            ("certs/ca.pem", ca.pem()),
            ("certs/client.pem", client.pem()),
            ("certs/client.key", client_key.serialize_pem()),
            ("certs/other.key", other_key.serialize_pem()),
            ("certs/junk.pem", "no PEM here\n".to_owned()),
        ] {
            std::fs::write(dir_path.join(name), text).unwrap();
        }
        dir
    }

    const HTTPS_STEP: &str = "[[types.t.steps]]\nname = \"a\"\nhttp = \"https://localhost:9/a\"\n";

    #[test]
    fn the_api_serves_https_with_both_files_or_neither() {
        let dir = tls_files();
        let base = dir.path();
        let parse_in = |text: &str| Config::parse(text, Path::new("ripen.toml"), base);
        assert!(parse_in(HTTPS_STEP).unwrap().server_tls.is_none());
        let c = parse_in(&format!(
            "[server]\ntls_cert_file = \"certs/client.pem\"\ntls_key_file = \"certs/client.key\"\n{HTTPS_STEP}"
        ))
        .unwrap();
        let tls = c.server_tls.expect("https");
        assert_eq!(tls.cert_file, base.join("certs/client.pem"));
        assert_eq!(tls.key_file, base.join("certs/client.key"));
        for (server, key) in [
            (
                "tls_cert_file = \"certs/client.pem\"",
                "server.tls_key_file",
            ),
            (
                "tls_key_file = \"certs/client.key\"",
                "server.tls_cert_file",
            ),
            (
                "tls_cert_file = \"certs/junk.pem\"\ntls_key_file = \"certs/client.key\"",
                "server.tls_cert_file",
            ),
            (
                "tls_cert_file = \"certs/client.pem\"\ntls_key_file = \"certs/missing.key\"",
                "server.tls_key_file",
            ),
        ] {
            let e = parse_in(&format!("[server]\n{server}\n{HTTPS_STEP}")).unwrap_err();
            assert!(e.contains(key), "{server}: {e}");
        }
    }

    #[test]
    fn https_steps_and_tls_files() {
        let dir = tls_files();
        let base = dir.path();
        let parse_in = |text: &str| Config::parse(text, Path::new("ripen.toml"), base);

        // No [tls]: https steps trust the system's roots, no client certificate.
        let c = parse_in(HTTPS_STEP).unwrap();
        assert_eq!(c.tls, HttpTls::default());

        // [tls] paths are relative to the configuration's directory.
        let c = parse_in(&format!(
            "[tls]\nca_file = \"certs/ca.pem\"\nclient_cert = \"certs/client.pem\"\nclient_key = \"certs/client.key\"\n{HTTPS_STEP}"
        ))
        .unwrap();
        assert_eq!(c.tls.default.ca_file, Some(base.join("certs/ca.pem")));
        assert_eq!(
            c.tls.default.identity,
            Some((base.join("certs/client.pem"), base.join("certs/client.key")))
        );
        assert!(c.tls.steps.is_empty());

        // A step's own ca_file replaces the global one; the client
        // certificate it does not set comes from [tls].
        let c = parse_in(&format!(
            "[tls]\nclient_cert = \"certs/client.pem\"\nclient_key = \"certs/client.key\"\n{HTTPS_STEP}ca_file = \"certs/ca.pem\"\n"
        ))
        .unwrap();
        assert_eq!(c.tls.default.ca_file, None);
        let own = &c.tls.steps[&("t".to_owned(), "a".to_owned())];
        assert_eq!(own.ca_file, Some(base.join("certs/ca.pem")));
        assert_eq!(own.identity, c.tls.default.identity);
    }

    #[test]
    fn tls_errors_name_file_key_and_problem() {
        let dir = tls_files();
        let base = dir.path();
        let d = base.display();
        let cases = [
            (
                format!("[tls]\nca_file = \"certs/missing.pem\"\n{HTTPS_STEP}"),
                format!("ripen.toml: tls.ca_file: cannot read {d}/certs/missing.pem"),
            ),
            (
                format!("[tls]\nca_file = \"certs/junk.pem\"\n{HTTPS_STEP}"),
                format!("ripen.toml: tls.ca_file: {d}/certs/junk.pem holds no PEM certificate"),
            ),
            (
                format!("[tls]\nclient_cert = \"certs/client.pem\"\n{HTTPS_STEP}"),
                "ripen.toml: tls.client_key: client_cert is set, so client_key must be too"
                    .to_owned(),
            ),
            (
                format!("{HTTPS_STEP}client_key = \"certs/client.key\"\n"),
                "ripen.toml: types.t.steps[0].client_cert: client_key is set, so client_cert must be too"
                    .to_owned(),
            ),
            (
                format!("{HTTPS_STEP}ca_file = \"certs/client.key\"\n"),
                format!("ripen.toml: types.t.steps[0].ca_file: {d}/certs/client.key holds no PEM certificate"),
            ),
            (
                format!("{HTTPS_STEP}client_cert = \"certs/client.pem\"\nclient_key = \"certs/other.key\"\n"),
                format!("ripen.toml: types.t.steps[0].client_key: {d}/certs/other.key is not the key of the certificate in {d}/certs/client.pem"),
            ),
            (
                format!("{HTTPS_STEP}client_cert = \"certs/client.pem\"\nclient_key = \"certs/ca.pem\"\n"),
                format!("ripen.toml: types.t.steps[0].client_key: {d}/certs/ca.pem holds no PEM private key"),
            ),
            (
                format!("{STEP}ca_file = \"certs/ca.pem\"\n"),
                "ripen.toml: types.t.steps[0].ca_file: applies to https steps only".to_owned(),
            ),
            (
                format!("[tls]\nca = \"x\"\n{HTTPS_STEP}"),
                "ripen.toml:2: unknown field `ca`".to_owned(),
            ),
            (
                format!("[storage]\nurl = \"postgres://u@h/db?sslmode=verify-full&sslrootcert=certs/none.pem\"\n{HTTPS_STEP}"),
                "ripen.toml: storage.url: sslrootcert: cannot read certs/none.pem".to_owned(),
            ),
            (
                format!("[storage]\nurl = \"postgres://u@h/db?sslmode=allow\"\n{HTTPS_STEP}"),
                "ripen.toml: storage.url: sslmode: \"allow\" is not supported".to_owned(),
            ),
        ];
        for (text, want) in cases {
            let got = Config::parse(&text, Path::new("ripen.toml"), base).unwrap_err();
            assert!(got.starts_with(&want), "{got:?} should start with {want:?}");
        }
    }

    const KYC: &str = "[[types.t.steps]]\nname = \"kyc\"\nhttp = \"http://127.0.0.1:9/kyc\"\n";

    #[test]
    fn builtin_steps() {
        let c = parse(&format!(
            "{KYC}[[types.t.steps]]\nname = \"row\"\nneeds = [\"kyc\"]\n\
             builtin = {{ postgres_upsert = {{ url = \"postgres://u@h/db\", table = \"m\", \
             columns = {{ score = \"/outputs/kyc/score\", name = \"/payload/name\" }} }} }}\n\
             [[types.t.steps]]\nname = \"cache\"\n\
             [types.t.steps.builtin.redis_set]\nurl = \"redis://127.0.0.1:6379\"\nkey = \"t:{{id}}\"\n\
             value = \"json\"\npointer = \"/payload\"\n"
        ))
        .unwrap();
        let p = &c.type_config("t").unwrap().pipeline;
        assert_eq!(p.queue(1), "builtin");
        match &p.step(1).executor {
            Executor::Builtin { connector, config } => {
                assert_eq!(connector, "postgres_upsert");
                assert_eq!(
                    config,
                    r#"{"url":"postgres://u@h/db","table":"m","key":"id","columns":{"name":"/payload/name","score":"/outputs/kyc/score"},"pool_size":4}"#
                );
            }
            other => panic!("not builtin: {other:?}"),
        }
        assert!(
            matches!(&p.step(2).executor, Executor::Builtin { connector, .. } if connector == "redis_set")
        );
    }

    #[test]
    fn builtin_errors_name_file_key_and_problem() {
        let pg = |columns: &str, needs: &str| {
            format!(
                "{KYC}[[types.t.steps]]\nname = \"row\"\nneeds = [{needs}]\n\
                 builtin = {{ postgres_upsert = {{ url = \"postgres://u@h/db\", table = \"m\", columns = {{ {columns} }} }} }}\n"
            )
        };
        let cases = [
            (
                pg("score = \"outputs/kyc/score\"", "\"kyc\""),
                "ripen.toml: types.t.steps[1].builtin.postgres_upsert.columns.score: \"outputs/kyc/score\" is not a JSON pointer",
            ),
            (
                pg("score = \"/outputs/kyc/score\"", ""),
                "ripen.toml: types.t.steps[1].builtin.postgres_upsert.columns.score: \"/outputs/kyc/score\" reads the output of step \"kyc\", which step \"row\" does not need",
            ),
            (
                pg("score = \"/outputs/nope\"", "\"kyc\""),
                "which is not a step of this pipeline",
            ),
            (
                pg("name = \"/name\"", ""),
                "ripen.toml: types.t.steps[1].builtin.postgres_upsert.columns.name: \"/name\" points at nothing",
            ),
            (
                pg("name = \"/payload/name\", colour = 1", ""),
                "ripen.toml:7: invalid type: integer `1`, expected a string",
            ),
            (
                "[[types.t.steps]]\nname = \"c\"\nbuiltin = { redis_set = { url = \"redis://h\", key = \"static\", fields = { a = \"/id\" } } }\n".to_owned(),
                "ripen.toml: types.t.steps[0].builtin.redis_set.key: \"static\" has no {id}",
            ),
            (
                "[[types.t.steps]]\nname = \"c\"\nbuiltin = { mongo_insert = {} }\n".to_owned(),
                "unknown variant `mongo_insert`, expected `postgres_upsert` or `redis_set`",
            ),
            (
                "[[types.t.steps]]\nname = \"c\"\nhttp = \"http://h/c\"\nbuiltin = { redis_set = { url = \"redis://h\", key = \"{id}\", fields = { a = \"/id\" } } }\n".to_owned(),
                "ripen.toml: types.t.steps[0]: a step has one executor: http, worker or builtin, not two",
            ),
        ];
        for (text, want) in cases {
            let got = parse(&text).unwrap_err();
            assert!(got.contains(want), "{got:?} should contain {want:?}");
        }
    }

    #[test]
    fn cycles_are_refused() {
        let text = "[[types.t.steps]]\nname = \"a\"\nneeds = [\"b\"]\nhttp = \"http://h/a\"\n\
                    [[types.t.steps]]\nname = \"b\"\nneeds = [\"a\"]\nhttp = \"http://h/b\"\n";
        let got = parse(text).unwrap_err();
        assert!(got.contains("cycle"), "{got}");
    }
}
