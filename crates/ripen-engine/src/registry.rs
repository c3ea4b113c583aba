//! The type registry at run time: every version of every entity type, read
//! from the store and built into schemas and pipelines, registered from
//! `ripen.toml` at start and from the API at run time.
//!
//! A version's [`Definition`] is its schema, its steps and its references in
//! one canonical JSON text; its digest says whether two registrations have
//! the same content. Registering checks the new schema against the latest
//! version's ([`crate::compat::check`]) and writes the next version through
//! [`Store::register_type`], which serializes concurrent registrations.
//!
//! The registry shares a [`Pipelines`] handle with the store: whenever it
//! reads the store's versions again it replaces what the store decides with.
//! Claims leave alone an entity whose pinned version this node cannot run and
//! report it; [`Registry::run`] hears of it, reads the registry again (another
//! node may have registered the version), and asks the store to fail the
//! entities that still cannot run, with the cause in their history.

pub mod seal;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use ripen_core::{Catalog, Executor, Pipeline, StepSpec};
use ripen_notify::seal::MasterKey;
use ripen_store::registry::{Known, Pipelines};
use ripen_store::{NewTypeVersion, Registered, Store, StoreError, TypeHead, TypeVersion};
use serde_json::{json, Map, Value};

use crate::compat::{self, Incompatibility};
use crate::config::{self, Config, TypeConfig};
use crate::executor::builtin::{self, BuiltinSpec};
use crate::schema::Schema;
use crate::time::Clock;
use crate::ConfigRefused;

/// How many times a registration starts over when another registration of
/// the same type came first.
const REGISTER_TRIES_MAX: usize = 16;
/// The most entities one call to the store fails.
const FAIL_BATCH_MAX: usize = 500;

/// The content of a type version, in canonical form: built from a validated
/// pipeline, so that the same content always gives the same text.
#[derive(Clone, Debug, PartialEq)]
pub struct Definition {
    /// The JSON Schema of payloads; `Value::Null` for none (any object).
    pub schema: Value,
    /// The steps in their JSON form (the keys of `[[types.T.steps]]`, with
    /// every default written out).
    pub steps: Vec<Value>,
    /// Payload field -> referenced entity type.
    pub references: BTreeMap<String, String>,
}

/// One problem with a version to register: where in the request body (a
/// JSON pointer such as `/steps/1/http`) and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub pointer: String,
    pub message: String,
}

impl Problem {
    fn new(pointer: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            pointer: pointer.into(),
            message: message.into(),
        }
    }
}

/// A definition with what it builds: its compiled schema and its pipeline.
#[derive(Debug)]
pub struct Built {
    pub definition: Definition,
    pub schema: Option<Arc<Schema>>,
    pub pipeline: Pipeline,
}

impl Definition {
    /// The definition of a configured type.
    pub fn of_config(t: &TypeConfig) -> Definition {
        Definition::of(
            t.schema
                .as_ref()
                .map_or(Value::Null, |s| s.source().clone()),
            &t.pipeline,
            t.references.iter().cloned().collect(),
        )
    }

    /// The canonical definition of a schema, a validated pipeline and
    /// references.
    pub fn of(schema: Value, pipeline: &Pipeline, references: BTreeMap<String, String>) -> Self {
        // The steps as defined; each one's compensation is part of it.
        let steps = pipeline.steps()[..pipeline.forward_len()]
            .iter()
            .map(|s| step_json(pipeline, s))
            .collect();
        Definition {
            schema: sorted(schema),
            steps,
            references,
        }
    }

    /// Reads a registration request's body (`{"schema", "steps",
    /// "references", "force"}`) and builds it; also returns `force`.
    pub fn from_request(body: &Value) -> Result<(Built, bool), Vec<Problem>> {
        let Some(object) = body.as_object() else {
            return Err(vec![Problem::new("", "the body must be a JSON object")]);
        };
        let mut problems = Vec::new();
        for key in object.keys() {
            if !matches!(key.as_str(), "schema" | "steps" | "references" | "force") {
                problems.push(Problem::new(
                    format!("/{}", escape(key)),
                    format!(
                        "unknown key {key:?}; the keys are schema, steps, references and force"
                    ),
                ));
            }
        }
        let force = match object.get("force") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                problems.push(Problem::new("/force", "must be true or false"));
                false
            }
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        let built = Definition::build_parts(
            object.get("schema").unwrap_or(&Value::Null),
            object.get("steps"),
            object.get("references"),
        )?;
        Ok((built, force))
    }

    /// Builds a stored definition again.
    pub fn from_stored(text: &str) -> Result<Built, String> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("the definition is not JSON: {e}"))?;
        Definition::build_parts(
            value.get("schema").unwrap_or(&Value::Null),
            value.get("steps"),
            value.get("references"),
        )
        .map_err(|problems| {
            problems
                .iter()
                .map(|p| format!("{}: {}", p.pointer, p.message))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }

    fn build_parts(
        schema: &Value,
        steps: Option<&Value>,
        references: Option<&Value>,
    ) -> Result<Built, Vec<Problem>> {
        let mut problems = Vec::new();
        let compiled = match schema {
            Value::Null => None,
            Value::Object(_) | Value::Bool(_) => match Schema::from_value(schema) {
                Ok(s) => Some(Arc::new(s)),
                Err(e) => {
                    problems.push(Problem::new("/schema", e));
                    None
                }
            },
            _ => {
                problems.push(Problem::new(
                    "/schema",
                    "a JSON Schema is an object or a boolean (or null for none)",
                ));
                None
            }
        };
        let mut declared = BTreeMap::new();
        match references {
            None | Some(Value::Null) => {}
            Some(Value::Object(r)) => {
                for (field, target) in r {
                    match target.as_str() {
                        Some(t) => {
                            declared.insert(field.clone(), t.to_owned());
                        }
                        None => problems.push(Problem::new(
                            format!(
                                "/references/{}",
                                field.replace('~', "~0").replace('/', "~1")
                            ),
                            "must be the name of an entity type",
                        )),
                    }
                }
                // The shape and the limits; the types named are checked
                // when the version is registered, against the registry.
                let targets: Vec<String> = declared.values().cloned().collect();
                if let Err((key, message)) = crate::deps::check_config(declared.clone(), &targets) {
                    let key = key.trim_start_matches('.').trim_matches('"').to_owned();
                    let pointer = match key.as_str() {
                        "" => "/references".to_owned(),
                        k => format!("/references/{k}"),
                    };
                    problems.push(Problem::new(pointer, message));
                }
            }
            Some(_) => problems.push(Problem::new(
                "/references",
                "must be an object of payload field -> entity type",
            )),
        }
        let mut defs = Vec::new();
        match steps {
            Some(Value::Array(steps)) if !steps.is_empty() => {
                for (i, step) in steps.iter().enumerate() {
                    match config::step_from_json(step) {
                        Ok(def) => defs.push(def),
                        Err((key, message)) => {
                            let key = key.trim_start_matches('.').replace('.', "/");
                            let pointer = match key.as_str() {
                                "" => format!("/steps/{i}"),
                                k => format!("/steps/{i}/{k}"),
                            };
                            problems.push(Problem::new(pointer, message));
                        }
                    }
                }
            }
            Some(Value::Array(_)) | None | Some(Value::Null) => {
                problems.push(Problem::new("/steps", "a version has one step or more"))
            }
            Some(_) => problems.push(Problem::new("/steps", "must be an array of steps")),
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let pipeline =
            Pipeline::new(defs).map_err(|e| vec![Problem::new("/steps", e.to_string())])?;
        for i in 0..pipeline.forward_len() {
            if let Err((key, message)) = builtin::check_upstream(&pipeline, i) {
                let key = key.trim_start_matches('.').replace('.', "/");
                problems.push(Problem::new(format!("/steps/{i}/{key}"), message));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let definition = Definition::of(schema.clone(), &pipeline, declared);
        Ok(Built {
            definition,
            schema: compiled,
            pipeline,
        })
    }

    /// The canonical text: object keys sorted, no spaces.
    pub fn canonical(&self) -> String {
        json!({
            "schema": self.schema,
            "steps": self.steps,
            "references": self.references,
        })
        .to_string()
    }

    /// The digest of the canonical text: `sha256:` and hex.
    pub fn digest(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, self.canonical().as_bytes());
        let mut out = String::with_capacity(7 + 64);
        out.push_str("sha256:");
        for b in d.as_ref() {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }
}

/// The payload fields a pipeline reads by name (JSON pointers into the
/// payload): the built-in connectors' `/payload/…` pointers and the
/// references' fields. HTTP and worker steps get the whole payload and name
/// no field.
pub fn reads(pipeline: &Pipeline, references: &BTreeMap<String, String>) -> Vec<String> {
    let mut out: Vec<String> = references
        .keys()
        .map(|f| format!("/{}", escape(f)))
        .collect();
    for step in pipeline.steps() {
        let Executor::Builtin { connector, config } = &step.executor else {
            continue;
        };
        let Ok(spec) = BuiltinSpec::from_executor(connector, config) else {
            continue;
        };
        for (_, pointer) in spec.pointers() {
            if let Some(rest) = pointer.strip_prefix("/payload") {
                if rest.is_empty() || rest.starts_with('/') {
                    out.push(rest.to_owned());
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// A step's JSON form, every default written out.
fn step_json(pipeline: &Pipeline, s: &StepSpec) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), json!(s.name));
    let needs: Vec<&str> = s
        .needs
        .iter()
        .map(|&j| pipeline.step(j).name.as_str())
        .collect();
    m.insert("needs".into(), json!(needs));
    m.insert("critical".into(), json!(s.critical));
    m.insert("timeout".into(), json!(format!("{}ms", s.timeout_ms)));
    m.insert(
        "retry".into(),
        json!({
            "max_attempts": s.retry.max_attempts,
            "initial_backoff": format!("{}ms", s.retry.initial_backoff_ms),
            "max_backoff": format!("{}ms", s.retry.max_backoff_ms),
        }),
    );
    match &s.executor {
        Executor::Http { url } => {
            m.insert("http".into(), json!(url));
        }
        Executor::Worker { queue } => {
            m.insert("worker".into(), json!(queue));
        }
        Executor::Builtin { connector, config } => {
            let settings = serde_json::from_str(config).unwrap_or(Value::Null);
            m.insert("builtin".into(), json!({ connector.as_str(): settings }));
        }
    }
    let compensation = pipeline
        .index_of(&s.name)
        .and_then(|i| pipeline.compensation(i))
        .map(|c| pipeline.step(c));
    if let Some(c) = compensation {
        let mut undo = Map::new();
        match &c.executor {
            Executor::Http { url } => {
                undo.insert("http".into(), json!(url));
            }
            Executor::Worker { queue } => {
                undo.insert("worker".into(), json!(queue));
            }
            // A built-in step is undone by its own connector.
            Executor::Builtin { .. } => {
                undo.insert("builtin".into(), json!(true));
            }
        }
        undo.insert("timeout".into(), json!(format!("{}ms", c.timeout_ms)));
        undo.insert(
            "retry".into(),
            json!({
                "max_attempts": c.retry.max_attempts,
                "initial_backoff": format!("{}ms", c.retry.initial_backoff_ms),
                "max_backoff": format!("{}ms", c.retry.max_backoff_ms),
            }),
        );
        m.insert("compensate".into(), Value::Object(undo));
    }
    sorted(Value::Object(m))
}

/// `value` with every object's keys in order, whatever serde_json's map is.
fn sorted(value: Value) -> Value {
    match value {
        Value::Object(m) => {
            let ordered: BTreeMap<String, Value> =
                m.into_iter().map(|(k, v)| (k, sorted(v))).collect();
            Value::Object(ordered.into_iter().collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// A JSON pointer segment (RFC 6901).
fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// One registered version, built.
#[derive(Debug)]
pub struct Version {
    pub type_name: String,
    pub version: u32,
    pub definition: Definition,
    pub schema: Option<Arc<Schema>>,
    pub pipeline: Arc<Pipeline>,
    /// The definition's references as intake reads them: payload field ->
    /// the type of the entity it names, by field.
    pub references: Vec<(String, String)>,
    pub digest: String,
    pub created_at_us: i64,
    /// Registered although the compatibility check refused it.
    pub forced: bool,
    /// What the check reported when it was forced (a JSON array).
    pub incompatibilities: Value,
}

impl Version {
    fn from_row(row: &TypeVersion, key: Option<&MasterKey>) -> Result<Version, String> {
        let text = seal::open(key, &row.type_name, &row.definition)?;
        let built = Definition::from_stored(&text)?;
        let references = built
            .definition
            .references
            .iter()
            .map(|(f, t)| (f.clone(), t.clone()))
            .collect();
        Ok(Version {
            type_name: row.type_name.clone(),
            version: row.version,
            references,
            definition: built.definition,
            schema: built.schema,
            pipeline: Arc::new(built.pipeline),
            digest: row.digest.clone(),
            created_at_us: row.created_at_us,
            forced: row.forced,
            incompatibilities: serde_json::from_str(&row.incompatibilities)
                .unwrap_or_else(|_| json!([])),
        })
    }
}

/// What a registration did.
#[derive(Debug, Clone)]
pub enum Registration {
    /// A new version was written.
    Created(Arc<Version>),
    /// The latest version has this content already.
    Unchanged(Arc<Version>),
}

impl Registration {
    pub fn version(&self) -> &Arc<Version> {
        match self {
            Registration::Created(v) | Registration::Unchanged(v) => v,
        }
    }
}

/// Why a version was not registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("the version is not valid")]
    Invalid(Vec<Problem>),
    #[error("the schema is not compatible with version {latest}")]
    Incompatible {
        latest: u32,
        incompatibilities: Vec<Incompatibility>,
    },
    #[error("type names are 1 to 64 characters of a-z, A-Z, 0-9, '_' and '-'")]
    BadName,
    #[error("other registrations of the type kept coming first; try again")]
    Contended,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the registry knows, replaced whole at each read of the store.
#[derive(Debug, Default)]
struct Snapshot {
    rows: BTreeMap<(String, u32), TypeVersion>,
    built: HashMap<(String, u32), Arc<Version>>,
    /// The latest version of each type, when it builds.
    latest: BTreeMap<String, Arc<Version>>,
    heads: Vec<TypeHead>,
}

/// The type registry of a node; see the module documentation.
pub struct Registry {
    store: Arc<dyn Store>,
    pipelines: Pipelines,
    clock: Arc<dyn Clock>,
    state: RwLock<Arc<Snapshot>>,
    /// One read of the store at a time.
    reading: tokio::sync::Mutex<()>,
    /// Called after each read of the store; see [`Registry::on_reload`].
    reloaded: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// Seals connector passwords at rest ([`seal`]); none: stored as given.
    key: Option<Arc<MasterKey>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// A registry on `store`, which decides with `pipelines`; it knows
    /// nothing until [`Registry::reload`].
    pub fn new(
        store: Arc<dyn Store>,
        pipelines: Pipelines,
        clock: Arc<dyn Clock>,
        key: Option<Arc<MasterKey>>,
    ) -> Registry {
        Registry {
            key,
            store,
            pipelines,
            clock,
            state: RwLock::default(),
            reading: tokio::sync::Mutex::new(()),
            reloaded: std::sync::OnceLock::new(),
        }
    }

    /// The master key, which also seals webhook secrets.
    pub fn master_key(&self) -> Option<Arc<MasterKey>> {
        self.key.clone()
    }

    /// Calls `f` after every later read of the store: what the engine
    /// wakes or teaches when new versions may have arrived. Set once.
    pub fn on_reload(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.reloaded.set(f);
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The latest version of a type, if it has one that builds: what intake
    /// validates against and pins new entities to.
    pub fn latest(&self, type_name: &str) -> Option<Arc<Version>> {
        self.snapshot().latest.get(type_name).cloned()
    }

    /// One version, if it builds on this node.
    pub fn version(&self, type_name: &str, version: u32) -> Option<Arc<Version>> {
        self.snapshot()
            .built
            .get(&(type_name.to_owned(), version))
            .cloned()
    }

    /// The pipeline of a type version this node can run.
    pub fn pipeline(&self, type_name: &str, version: u32) -> Option<Arc<Pipeline>> {
        self.pipelines.get(type_name, version)
    }

    /// The latest version of every type, by name.
    pub fn types(&self) -> Vec<Arc<Version>> {
        self.snapshot().latest.values().cloned().collect()
    }

    /// The names of the types new entities can be submitted to.
    pub fn type_names(&self) -> Vec<String> {
        self.snapshot().latest.keys().cloned().collect()
    }

    /// Every type with its latest version number and how many it has.
    pub fn heads(&self) -> Vec<TypeHead> {
        self.snapshot().heads.clone()
    }

    /// The versions of a type, oldest first, with the stored row of each and
    /// whether it builds here (`Err`: why not). Empty for an unknown type.
    pub fn versions(&self, type_name: &str) -> Vec<(TypeVersion, Result<Arc<Version>, String>)> {
        let snap = self.snapshot();
        snap.rows
            .range((type_name.to_owned(), 0)..=(type_name.to_owned(), u32::MAX))
            .map(|(key, row)| {
                let built = snap.built.get(key).cloned().ok_or_else(|| {
                    Version::from_row(row, self.key.as_deref())
                        .err()
                        .unwrap_or_else(|| "not built".into())
                });
                (row.clone(), built)
            })
            .collect()
    }

    /// How many pending entities of `tenant` each version of a type has.
    pub async fn live_entities(
        &self,
        tenant: &str,
        type_name: &str,
    ) -> Result<BTreeMap<u32, u64>, StoreError> {
        Ok(self
            .store
            .live_entities(tenant, type_name)
            .await?
            .into_iter()
            .collect())
    }

    /// Reads every version from the store again and hands the pipelines to
    /// the store. A stored version that does not build here is kept aside
    /// with why, so that its entities fail with that cause.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let _one = self.reading.lock().await;
        let rows = self.store.type_versions(None).await?;
        let old = self.snapshot();
        let mut snap = Snapshot {
            heads: ripen_store::registry::heads(&rows),
            ..Snapshot::default()
        };
        let mut known = Known::default();
        let mut catalog = Catalog::default();
        for row in rows {
            let key = (row.type_name.clone(), row.version);
            let reused = old.built.get(&key).filter(|v| v.digest == row.digest);
            let built = match reused {
                Some(v) => Ok(v.clone()),
                None => Version::from_row(&row, self.key.as_deref()).map(Arc::new),
            };
            match built {
                Ok(v) => {
                    catalog.insert(&v.type_name, v.version, Pipeline::clone(&v.pipeline));
                    snap.built.insert(key.clone(), v);
                }
                Err(why) => {
                    if !old.rows.contains_key(&key) {
                        tracing::warn!(r#type = %row.type_name, version = row.version, error = %why, "a registered type version does not build on this node; its entities fail");
                    }
                    known.broken.insert(key.clone(), why);
                }
            }
            snap.rows.insert(key, row);
        }
        for head in &snap.heads {
            let key = (head.type_name.clone(), head.latest_version);
            if let Some(v) = snap.built.get(&key) {
                snap.latest.insert(head.type_name.clone(), v.clone());
            }
        }
        known.catalog = catalog;
        self.pipelines.replace(known);
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(snap);
        if let Some(f) = self.reloaded.get() {
            f();
        }
        Ok(())
    }

    /// Registers `built` as the next version of `type_name`, checked
    /// against the latest one unless `force`; `number` asks for a version
    /// number (taken only if it is above the latest). The registry is read
    /// again before this returns, so the new version is served at once.
    /// Refuses references to types the registry does not have (a type may
    /// name itself). A configuration's types are checked against each other
    /// when it is read; this is for versions registered at run time.
    pub fn check_references(&self, type_name: &str, built: &Built) -> Result<(), RegisterError> {
        let unknown: Vec<Problem> = built
            .definition
            .references
            .iter()
            .filter(|(_, target)| *target != type_name && self.latest(target).is_none())
            .map(|(field, target)| {
                Problem::new(
                    format!(
                        "/references/{}",
                        field.replace('~', "~0").replace('/', "~1")
                    ),
                    format!("no entity type {target:?} is registered"),
                )
            })
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(RegisterError::Invalid(unknown))
        }
    }

    pub async fn register(
        &self,
        type_name: &str,
        built: &Built,
        force: bool,
        number: Option<u32>,
    ) -> Result<Registration, RegisterError> {
        if !config::valid_type_name(type_name) {
            return Err(RegisterError::BadName);
        }
        let definition = built.definition.canonical();
        let digest = built.definition.digest();
        let reads = reads(&built.pipeline, &built.definition.references);
        let mut number = number;
        for _ in 0..REGISTER_TRIES_MAX {
            let versions = self.store.type_versions(Some(type_name)).await?;
            let latest = versions.last();
            let mut incompatibilities = Vec::new();
            if let Some(l) = latest.filter(|l| l.digest != digest) {
                let old_schema = serde_json::from_str::<Value>(&l.definition)
                    .ok()
                    .and_then(|d| d.get("schema").cloned())
                    .unwrap_or(Value::Null);
                incompatibilities = compat::check(&old_schema, &built.definition.schema, &reads);
                if !incompatibilities.is_empty() && !force {
                    return Err(RegisterError::Incompatible {
                        latest: l.version,
                        incompatibilities,
                    });
                }
            }
            let forced = !incompatibilities.is_empty();
            let new = NewTypeVersion {
                type_name: type_name.to_owned(),
                definition: seal::seal(self.key.as_deref(), type_name, &definition)
                    .map_err(StoreError::Internal)?,
                digest: digest.clone(),
                forced,
                incompatibilities: serde_json::to_string(&incompatibilities)
                    .unwrap_or_else(|_| "[]".into()),
                after: latest.map(|l| l.version),
                version: number,
            };
            let outcome = self.store.register_type(new, self.clock.now_us()).await?;
            let (row, created) = match outcome {
                Registered::Created(row) => (row, true),
                Registered::Unchanged(row) => (row, false),
                Registered::Moved(_) => continue,
                Registered::Taken { .. } => {
                    number = None;
                    continue;
                }
            };
            self.reload().await?;
            let version = match self.version(&row.type_name, row.version) {
                Some(v) => v,
                None => Arc::new(Version::from_row(&row, self.key.as_deref()).map_err(|why| {
                    StoreError::Internal(format!("a registered version does not build: {why}"))
                })?),
            };
            return Ok(if created {
                Registration::Created(version)
            } else {
                Registration::Unchanged(version)
            });
        }
        Err(RegisterError::Contended)
    }

    /// Registers every type of `ripen.toml` (a type whose content is the
    /// latest version's keeps it; other content registers the next
    /// version), then reads the registry. An incompatible schema refuses
    /// the configuration unless the type says `force = true`.
    pub async fn register_config(&self, config: &Config) -> anyhow::Result<()> {
        let file = config.path.display();
        let mut refused = Vec::new();
        for t in &config.types {
            let built = Built {
                definition: Definition::of_config(t),
                schema: t.schema.clone(),
                pipeline: t.pipeline.clone(),
            };
            match self
                .register(&t.name, &built, t.force, Some(t.version))
                .await
            {
                Ok(Registration::Created(v)) => {
                    if v.version != t.version {
                        tracing::info!(r#type = %t.name, version = v.version, configured = t.version, "the type's content changed, so it is registered as a new version");
                    } else {
                        tracing::info!(r#type = %t.name, version = v.version, "registered a type version");
                    }
                    if v.forced {
                        tracing::warn!(r#type = %t.name, version = v.version, incompatibilities = %v.incompatibilities, "registered an incompatible version because the type says force = true");
                    }
                }
                Ok(Registration::Unchanged(_)) => {}
                Err(RegisterError::Incompatible {
                    latest,
                    incompatibilities,
                }) => {
                    let lines: Vec<String> = incompatibilities
                        .iter()
                        .map(|i| format!("  {} ({}): {}", i.pointer, i.rule, i.message))
                        .collect();
                    refused.push(format!(
                        "{file}: types.{}.schema: not compatible with the registered version {latest}; set force = true on the type to register it anyway:\n{}",
                        t.name,
                        lines.join("\n")
                    ));
                }
                Err(RegisterError::Store(e)) => {
                    return Err(
                        anyhow::anyhow!(e).context(format!("register the type {:?}", t.name))
                    )
                }
                Err(e) => return Err(anyhow::anyhow!("{file}: types.{}: {e}", t.name)),
            }
        }
        if !refused.is_empty() {
            return Err(ConfigRefused(refused.join("\n")).into());
        }
        self.reload()
            .await
            .map_err(|e| anyhow::anyhow!(e).context("read the type registry"))
    }

    /// Keeps the registry current and fails the entities this node cannot
    /// run: wakes when the store reports such an entity, or every `poll` to
    /// see whether another node registered a version. Never ends.
    pub async fn run(self: Arc<Self>, poll: Duration) {
        let mut failing_store = false;
        let mut reported = Reported::default();
        loop {
            tokio::select! {
                () = self.pipelines.missed() => {}
                () = tokio::time::sleep(poll) => {}
            }
            match self.store.type_heads().await {
                Ok(heads) if heads != self.snapshot().heads => {
                    if let Err(e) = self.reload().await {
                        tracing::warn!(error = %e, "cannot read the type registry; retrying");
                        continue;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if !failing_store {
                        tracing::warn!(error = %e, "cannot read the type registry; retrying");
                    }
                    failing_store = true;
                    continue;
                }
            }
            failing_store = false;
            let missed = self.pipelines.take_missed();
            for chunk in missed.chunks(FAIL_BATCH_MAX) {
                let ids = chunk.iter().map(|(id, _, _)| *id).collect();
                match self.store.fail_unrunnable(ids, self.clock.now_us()).await {
                    Ok(failed) => reported.log(&failed),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot fail the entities whose pipeline cannot run; they are tried again")
                    }
                }
            }
        }
    }
}

/// The type versions whose unrunnable entities were already reported, so
/// that the log says it once per type version and node (later batches at
/// debug), however the failures are spread over claims.
#[derive(Default)]
struct Reported(std::collections::HashSet<(String, u32)>);

impl Reported {
    /// One line per type version of the entities just failed.
    fn log(&mut self, failed: &[ripen_store::EntityRecord]) {
        let mut by_version: BTreeMap<(&str, u32), (usize, &str)> = BTreeMap::new();
        for r in failed {
            let cause = r
                .steps
                .iter()
                .find_map(|s| s.state.last_error.as_deref())
                .unwrap_or("");
            by_version
                .entry((r.type_name.as_str(), r.version))
                .or_insert((0, cause))
                .0 += 1;
        }
        for ((type_name, version), (count, cause)) in by_version {
            if self.0.insert((type_name.to_owned(), version)) {
                tracing::warn!(r#type = %type_name, version, count, cause = %cause, "failed entities whose pipeline cannot run; later ones of this version are logged at debug");
            } else {
                tracing::debug!(r#type = %type_name, version, count, "failed more entities whose pipeline cannot run");
            }
        }
    }
}

#[cfg(test)]
mod tests;
