//! Built-in connectors: steps that write an entity into a store themselves,
//! with no service in between (`builtin = { postgres_upsert = { … } }`,
//! `builtin = { redis_set = { … } }`; see docs/config.md).
//!
//! A connector reads the *step document* of an attempt,
//! `{"id", "type", "version", "payload", "outputs": {step: output}}`, where
//! `outputs` holds only the steps this one needs, directly or through others
//! (so what a step reads never depends on which other steps happened to
//! finish first). Values are picked from it by JSON pointer (RFC 6901).
//!
//! Every write is keyed by the entity id, so an attempt that runs again (a
//! retry after a timeout, a lease that expired) rewrites the same row or key
//! with the same values and has no second effect.
//!
//! Checks happen in three places: [`BuiltinSpec::check`] (syntax, with no
//! I/O) and [`check_upstream`] (which outputs a step may read) when the
//! configuration is parsed; [`BuiltinExecutor::start`] (the table and its
//! columns, the Redis credentials) when the engine starts, before the server
//! listens.

pub mod postgres;
pub mod redis;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ripen_core::{Executor, Pipeline, StepSpec};
use ripen_store::{Attempt, Outcome};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{ExecutorKind, StepExecutor};
use crate::config::Config;

/// How long a starting node waits for a connector's store before it starts
/// anyway and lets the steps retry.
pub const START_CHECK_PATIENCE: Duration = Duration::from_secs(3);

/// The settings of one built-in step, as written under `builtin = { … }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum BuiltinSpec {
    PostgresUpsert(postgres::UpsertSpec),
    RedisSet(redis::SetSpec),
}

/// A problem with one key of a connector's settings: the key below
/// `types.T.steps[i]` (such as `.builtin.postgres_upsert.columns.score`) and
/// what is wrong.
pub type KeyProblem = (String, String);

impl BuiltinSpec {
    /// The connector's name, as in the configuration.
    pub fn connector(&self) -> &'static str {
        match self {
            BuiltinSpec::PostgresUpsert(_) => postgres::CONNECTOR,
            BuiltinSpec::RedisSet(_) => redis::CONNECTOR,
        }
    }

    /// The core's executor: the connector's name and its settings as
    /// canonical JSON (maps are sorted, defaults are filled in).
    pub fn executor(&self) -> Executor {
        let config = match self {
            BuiltinSpec::PostgresUpsert(s) => serde_json::to_string(s),
            BuiltinSpec::RedisSet(s) => serde_json::to_string(s),
        }
        .expect("connector settings serialize");
        Executor::Builtin {
            connector: self.connector().to_owned(),
            config,
        }
    }

    /// The settings an [`Executor::Builtin`] carries.
    pub fn from_executor(connector: &str, config: &str) -> Result<BuiltinSpec, String> {
        let settings: Value = serde_json::from_str(config)
            .map_err(|e| format!("the {connector} settings are not JSON: {e}"))?;
        let mut tagged = Map::new();
        tagged.insert(connector.to_owned(), settings);
        serde_json::from_value(Value::Object(tagged))
            .map_err(|e| format!("the {connector} settings do not parse: {e}"))
    }

    /// The checks that need no I/O: URLs, names, templates, pointer syntax.
    pub fn check(&self) -> Result<(), KeyProblem> {
        let prefix = format!(".builtin.{}", self.connector());
        match self {
            BuiltinSpec::PostgresUpsert(s) => s.check(),
            BuiltinSpec::RedisSet(s) => s.check(),
        }
        .map_err(|(key, problem)| (format!("{prefix}{key}"), problem))
    }

    /// Every pointer the settings hold, with its key (below `.builtin.NAME`).
    pub fn pointers(&self) -> Vec<(String, &str)> {
        match self {
            BuiltinSpec::PostgresUpsert(s) => s
                .columns
                .iter()
                .map(|(c, p)| (format!(".columns.{c}"), p.as_str()))
                .collect(),
            BuiltinSpec::RedisSet(s) => {
                let mut all: Vec<(String, &str)> = s
                    .fields
                    .iter()
                    .map(|(f, p)| (format!(".fields.{f}"), p.as_str()))
                    .collect();
                if let Some(p) = &s.pointer {
                    all.push((".pointer".to_owned(), p.as_str()));
                }
                all
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Pointers and the step document

/// The top-level members of the step document.
pub const DOCUMENT_MEMBERS: [&str; 5] = ["id", "type", "version", "payload", "outputs"];

/// Checks the syntax of a JSON pointer (RFC 6901) into the step document and
/// returns its reference tokens, unescaped. `""` is the whole document.
pub fn parse_pointer(pointer: &str) -> Result<Vec<String>, String> {
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = pointer.strip_prefix('/') else {
        return Err(format!(
            "{pointer:?} is not a JSON pointer: it must start with '/', as in \"/payload/name\""
        ));
    };
    let mut tokens = Vec::new();
    for raw in rest.split('/') {
        let mut token = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c != '~' {
                token.push(c);
                continue;
            }
            match chars.next() {
                Some('0') => token.push('~'),
                Some('1') => token.push('/'),
                _ => {
                    return Err(format!(
                        "{pointer:?} is not a JSON pointer: '~' must be followed by 0 or 1"
                    ))
                }
            }
        }
        tokens.push(token);
    }
    if !DOCUMENT_MEMBERS.contains(&tokens[0].as_str()) {
        return Err(format!(
            "{pointer:?} points at nothing: the step document has only {}",
            DOCUMENT_MEMBERS.join(", ")
        ));
    }
    Ok(tokens)
}

/// Checks the pointers of a built-in step `i` of `pipeline`: a pointer into
/// `/outputs/x` must name a step this one needs, directly or through others.
/// Returns the key and the problem of the first one that does not.
pub fn check_upstream(pipeline: &Pipeline, i: usize) -> Result<(), KeyProblem> {
    let step = pipeline.step(i);
    let Executor::Builtin { connector, config } = &step.executor else {
        return Ok(());
    };
    let spec = BuiltinSpec::from_executor(connector, config)
        .map_err(|p| (format!(".builtin.{connector}"), p))?;
    let upstream = upstream_names(pipeline, i);
    for (key, pointer) in spec.pointers() {
        let tokens = parse_pointer(pointer).map_err(|p| (key.clone(), p))?;
        if tokens.first().map(String::as_str) != Some("outputs") {
            continue;
        }
        if let Some(name) = tokens.get(1) {
            if !upstream.contains(name) {
                let problem = if pipeline.index_of(name).is_some() {
                    format!(
                        "{pointer:?} reads the output of step {name:?}, which step {:?} does not need; add it to `needs`",
                        step.name
                    )
                } else {
                    format!("{pointer:?} reads the output of step {name:?}, which is not a step of this pipeline")
                };
                return Err((format!(".builtin.{connector}{key}"), problem));
            }
        }
    }
    Ok(())
}

/// The names of the steps step `i` needs, directly or through others.
fn upstream_names(pipeline: &Pipeline, i: usize) -> BTreeSet<String> {
    pipeline
        .upstream(i)
        .into_iter()
        .map(|j| pipeline.step(j).name.clone())
        .collect()
}

/// The step document of an attempt: `{"id", "type", "version", "payload",
/// "outputs"}`, with the outputs of the `upstream` steps only.
pub fn document(attempt: &Attempt, upstream: &BTreeSet<String>) -> Result<Value, String> {
    let payload: Value = serde_json::from_str(&attempt.payload)
        .map_err(|e| format!("the stored payload is not JSON: {e}"))?;
    let mut outputs = Map::new();
    for (name, raw) in &attempt.outputs {
        if upstream.contains(name) {
            let output: Value = serde_json::from_str(raw)
                .map_err(|e| format!("the stored output of step {name:?} is not JSON: {e}"))?;
            outputs.insert(name.clone(), output);
        }
    }
    let mut doc = Map::new();
    doc.insert("id".into(), Value::String(attempt.entity_id.to_string()));
    doc.insert("type".into(), Value::String(attempt.type_name.clone()));
    doc.insert("version".into(), Value::from(attempt.version));
    doc.insert("payload".into(), payload);
    doc.insert("outputs".into(), Value::Object(outputs));
    Ok(Value::Object(doc))
}

/// What a pointer finds in the document; `None` when it finds nothing (or
/// `null`).
pub fn pick<'a>(doc: &'a Value, pointer: &str) -> Option<&'a Value> {
    doc.pointer(pointer).filter(|v| !v.is_null())
}

/// A value as the text a store keeps: a string as it is, a number or a
/// boolean as JSON, an object or an array as JSON text.
pub fn as_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------
// The executor

/// What the start-time check of a connector found.
pub enum StartCheck {
    Passed,
    /// The store could not be reached; the check runs again at the first
    /// connection, and the steps retry until then.
    Unreachable(String),
    /// The settings do not fit the store: the node must not start.
    Refused(KeyProblem),
}

enum Connector {
    Postgres(Box<postgres::Upsert>),
    Redis(Box<redis::Set>),
}

impl Connector {
    async fn start_check(&self) -> StartCheck {
        match self {
            Connector::Postgres(c) => c.start_check().await,
            Connector::Redis(c) => c.start_check().await,
        }
    }

    async fn write(&self, doc: &Value, attempt: &Attempt, timeout_ms: u64) -> Outcome {
        match self {
            Connector::Postgres(c) => c.write(doc, attempt, timeout_ms).await,
            Connector::Redis(c) => c.write(doc, attempt, timeout_ms).await,
        }
    }

    /// Undoes the write for the entity: its row or key is deleted.
    async fn undo(&self, attempt: &Attempt, timeout_ms: u64) -> Outcome {
        match self {
            Connector::Postgres(c) => c.undo(attempt, timeout_ms).await,
            Connector::Redis(c) => c.undo(attempt, timeout_ms).await,
        }
    }
}

struct Prepared {
    connector: Connector,
    /// The steps whose outputs the step document holds.
    upstream: BTreeSet<String>,
}

/// Runs every built-in step of the configuration, each with its own
/// connector (and connection pool), prepared when the engine starts.
pub struct BuiltinExecutor {
    /// By type, step name and settings, whatever the version: the registry
    /// may number the configured content otherwise than `ripen.toml` does,
    /// and entities of older versions with the same step keep running.
    by_settings: HashMap<(String, String, String), Arc<Prepared>>,
}

/// A configuration that the engine refused at start: the message names the
/// file, the key and the problem, like a configuration error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigRefused(pub String);

impl BuiltinExecutor {
    /// Prepares a connector for every built-in step of `config` and checks it
    /// against its store: a missing table or column refuses the
    /// configuration. A store that cannot be reached within
    /// [`START_CHECK_PATIENCE`] is logged, and checked at its first
    /// connection. `None` when no step is built-in.
    pub async fn start(config: &Config) -> Result<Option<BuiltinExecutor>, ConfigRefused> {
        let file = config.path.display().to_string();
        let mut by_settings = HashMap::new();
        let mut checks = tokio::task::JoinSet::new();
        for t in &config.types {
            for (i, step) in t.pipeline.steps().iter().enumerate() {
                let Executor::Builtin { connector, config } = &step.executor else {
                    continue;
                };
                let key = format!("types.{}.steps[{i}]", t.name);
                let spec = BuiltinSpec::from_executor(connector, config)
                    .map_err(|p| ConfigRefused(format!("{file}: {key}.builtin: {p}")))?;
                // Where the messages about this connector's keys point.
                let base = format!("{file}: {key}.builtin.{connector}");
                let connector = match spec {
                    BuiltinSpec::PostgresUpsert(s) => Connector::Postgres(Box::new(
                        postgres::Upsert::new(s, base.clone(), step.timeout_ms),
                    )),
                    BuiltinSpec::RedisSet(s) => Connector::Redis(Box::new(redis::Set::new(s))),
                };
                let prepared = Arc::new(Prepared {
                    connector,
                    upstream: upstream_names(&t.pipeline, i),
                });
                by_settings.insert(
                    (t.name.clone(), step.name.clone(), config.clone()),
                    prepared.clone(),
                );
                checks.spawn(async move { (base, prepared.connector.start_check().await) });
            }
        }
        if by_settings.is_empty() {
            return Ok(None);
        }
        let mut refused = Vec::new();
        while let Some(done) = checks.join_next().await {
            let (where_, check) = done.map_err(|e| ConfigRefused(format!("{file}: {e}")))?;
            match check {
                StartCheck::Passed => {}
                StartCheck::Unreachable(e) => tracing::warn!(
                    step = %where_,
                    error = %e,
                    "a built-in connector's store is not reachable; starting anyway, its steps retry until it is"
                ),
                StartCheck::Refused((k, p)) => refused.push(format!("{where_}{k}: {p}")),
            }
        }
        if !refused.is_empty() {
            refused.sort();
            return Err(ConfigRefused(refused.join("\n")));
        }
        Ok(Some(BuiltinExecutor { by_settings }))
    }
}

#[async_trait]
impl StepExecutor for BuiltinExecutor {
    async fn run(&self, step: &StepSpec, attempt: &Attempt) -> Outcome {
        let Executor::Builtin { connector, config } = &step.executor else {
            return failed(format!(
                "the builtin executor was handed a {} step",
                ExecutorKind::of(&step.executor).as_str()
            ));
        };
        let key = (attempt.type_name.clone(), step.name.clone(), config.clone());
        let Some(prepared) = self.by_settings.get(&key) else {
            return failed(format!(
                "{connector}: step {:?} of {} version {} has no connector on this node",
                step.name, attempt.type_name, attempt.version
            ));
        };
        if step.compensates.is_some() {
            return prepared.connector.undo(attempt, step.timeout_ms).await;
        }
        let doc = match document(attempt, &prepared.upstream) {
            Ok(doc) => doc,
            Err(e) => return failed(format!("{connector}: {e}")),
        };
        prepared
            .connector
            .write(&doc, attempt, step.timeout_ms)
            .await
    }
}

/// A failure that trying again would not mend.
fn failed(error: String) -> Outcome {
    Outcome::Failed {
        error,
        retryable: false,
        retry_after_ms: None,
    }
}

/// A failure with its retryability.
fn failure(error: String, retryable: bool) -> Outcome {
    Outcome::Failed {
        error,
        retryable,
        retry_after_ms: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ripen_core::{RetryPolicy, StepDef};
    use ripen_store::EntityId;

    #[test]
    fn pointer_syntax() {
        assert_eq!(parse_pointer("").unwrap(), Vec::<String>::new());
        assert_eq!(parse_pointer("/payload/name").unwrap(), ["payload", "name"]);
        assert_eq!(
            parse_pointer("/payload/a~1b/c~0d/").unwrap(),
            ["payload", "a/b", "c~d", ""]
        );
        let e = parse_pointer("payload/name").unwrap_err();
        assert!(e.contains("must start with '/'"), "{e}");
        let e = parse_pointer("/payload/a~2").unwrap_err();
        assert!(e.contains("'~' must be followed by 0 or 1"), "{e}");
        let e = parse_pointer("/payload/a~").unwrap_err();
        assert!(e.contains("'~' must be followed by 0 or 1"), "{e}");
        let e = parse_pointer("/name").unwrap_err();
        assert!(
            e.contains("the step document has only id, type, version, payload, outputs"),
            "{e}"
        );
    }

    fn attempt() -> Attempt {
        Attempt {
            entity_id: "0193c5b2-0000-7000-8000-000000000001".parse().unwrap(),
            type_name: "merchant".into(),
            version: 2,
            step: 2,
            step_name: "index".into(),
            attempt: 1,
            epoch: 1,
            lease_expires_at_us: 0,
            payload: r#"{"name":"Ada","tags":["a","b"],"a/b":{"c~d":7},"none":null}"#.into(),
            outputs: vec![
                ("kyc".into(), r#"{"score":0.93,"ok":true}"#.into()),
                ("other".into(), r#"{"late":1}"#.into()),
            ],
        }
    }

    #[test]
    fn the_document_holds_the_upstream_outputs_only() {
        let upstream = BTreeSet::from(["kyc".to_owned()]);
        let doc = document(&attempt(), &upstream).unwrap();
        assert_eq!(
            doc,
            serde_json::json!({
                "id": "0193c5b2-0000-7000-8000-000000000001",
                "type": "merchant",
                "version": 2,
                "payload": {"name": "Ada", "tags": ["a", "b"], "a/b": {"c~d": 7}, "none": null},
                "outputs": {"kyc": {"score": 0.93, "ok": true}}
            })
        );
        let text = |p: &str| pick(&doc, p).map(as_text);
        assert_eq!(text("/payload/name").as_deref(), Some("Ada"));
        assert_eq!(text("/outputs/kyc/score").as_deref(), Some("0.93"));
        assert_eq!(text("/outputs/kyc/ok").as_deref(), Some("true"));
        assert_eq!(text("/payload/tags").as_deref(), Some(r#"["a","b"]"#));
        assert_eq!(text("/payload/tags/1").as_deref(), Some("b"));
        assert_eq!(text("/payload/a~1b/c~0d").as_deref(), Some("7"));
        assert_eq!(text("/version").as_deref(), Some("2"));
        assert_eq!(text("/payload/none"), None, "null is nothing");
        assert_eq!(text("/payload/missing"), None);
        assert_eq!(text("/outputs/other"), None, "not upstream");
    }

    fn step(name: &str, needs: &[&str], executor: Executor) -> StepDef {
        StepDef {
            name: name.into(),
            needs: needs.iter().map(|s| s.to_string()).collect(),
            critical: true,
            timeout_ms: 1_000,
            retry: RetryPolicy::default(),
            executor,
            compensate: None,
        }
    }

    fn redis_hash(fields: &[(&str, &str)]) -> Executor {
        BuiltinSpec::RedisSet(redis::SetSpec {
            url: "redis://127.0.0.1:6379".into(),
            key: "m:{id}".into(),
            value: redis::ValueMode::Hash,
            fields: fields
                .iter()
                .map(|(f, p)| (f.to_string(), p.to_string()))
                .collect(),
            pointer: None,
            ttl: None,
            pool_size: 2,
        })
        .executor()
    }

    #[test]
    fn pointers_into_outputs_must_name_upstream_steps() {
        let http = || Executor::Http {
            url: "http://127.0.0.1:9/x".into(),
        };
        let pipeline = Pipeline::new(vec![
            step("kyc", &[], http()),
            step("enrich", &["kyc"], http()),
            step("side", &[], http()),
            step(
                "good",
                &["enrich"],
                redis_hash(&[("s", "/outputs/kyc/score"), ("e", "/outputs/enrich")]),
            ),
            step("bad", &["enrich"], redis_hash(&[("s", "/outputs/side/x")])),
            step("worse", &[], redis_hash(&[("s", "/outputs/nope")])),
        ])
        .unwrap();
        assert_eq!(check_upstream(&pipeline, 3), Ok(()));
        let (key, problem) = check_upstream(&pipeline, 4).unwrap_err();
        assert_eq!(key, ".builtin.redis_set.fields.s");
        assert!(
            problem.contains("step \"side\", which step \"bad\" does not need"),
            "{problem}"
        );
        let (_, problem) = check_upstream(&pipeline, 5).unwrap_err();
        assert!(problem.contains("not a step of this pipeline"), "{problem}");
    }

    #[test]
    fn settings_survive_the_core_executor() {
        let executor = redis_hash(&[("b", "/payload/b"), ("a", "/payload/a")]);
        let Executor::Builtin { connector, config } = &executor else {
            panic!("not builtin: {executor:?}");
        };
        assert_eq!(connector, "redis_set");
        // Canonical: sorted maps.
        assert!(
            config.contains(r#""fields":{"a":"/payload/a","b":"/payload/b"}"#),
            "{config}"
        );
        let spec = BuiltinSpec::from_executor(connector, config).unwrap();
        assert_eq!(spec.executor(), executor);
    }

    #[tokio::test]
    async fn an_unprepared_step_fails_for_good() {
        let executor = BuiltinExecutor {
            by_settings: HashMap::new(),
        };
        let spec = StepSpec {
            name: "index".into(),
            needs: Vec::new(),
            critical: true,
            timeout_ms: 1_000,
            retry: RetryPolicy::default(),
            executor: redis_hash(&[("a", "/payload/a")]),
            compensates: None,
        };
        let mut a = attempt();
        a.entity_id = EntityId::new_v7();
        match executor.run(&spec, &a).await {
            Outcome::Failed {
                error, retryable, ..
            } => {
                assert!(!retryable);
                assert!(error.contains("has no connector on this node"), "{error}");
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }
}
