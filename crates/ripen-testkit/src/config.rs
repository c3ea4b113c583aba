//! A `ripen.toml` writer: the types, their HTTP and worker steps and the few server
//! settings that the tests, the demo and the bench vary, rendered into a
//! directory with one schema file per type that has a schema.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::downstream::Downstream;

/// One `[[types.T.steps]]` entry: an `http` step, or a `worker` step when
/// `worker` names a queue.
#[derive(Clone, Debug)]
pub struct Step {
    pub name: String,
    /// The downstream URL of an HTTP step; unused by a worker step.
    pub url: String,
    /// The worker queue that runs the step instead of `url`.
    pub worker: Option<String>,
    pub needs: Vec<String>,
    pub critical: bool,
    pub timeout: String,
    /// `None` leaves the server's default retry policy.
    pub max_attempts: Option<u32>,
    pub initial_backoff: Option<String>,
    pub max_backoff: Option<String>,
    /// The step's own `ca_file`, `client_cert` and `client_key`.
    pub tls: TlsFiles,
    /// The step's `compensate`, as TOML (a quoted URL or an inline table).
    pub compensate: Option<String>,
}

/// The TLS keys of `[tls]` or of a step: paths as written into the file
/// (relative ones resolve against the configuration's directory).
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    pub ca_file: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
}

impl TlsFiles {
    pub fn ca_file(mut self, path: impl Into<String>) -> TlsFiles {
        self.ca_file = Some(path.into());
        self
    }

    pub fn client(mut self, cert: impl Into<String>, key: impl Into<String>) -> TlsFiles {
        self.client_cert = Some(cert.into());
        self.client_key = Some(key.into());
        self
    }

    fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.client_cert.is_none() && self.client_key.is_none()
    }

    fn render(&self, out: &mut String) {
        for (key, value) in [
            ("ca_file", &self.ca_file),
            ("client_cert", &self.client_cert),
            ("client_key", &self.client_key),
        ] {
            if let Some(value) = value {
                let _ = writeln!(out, "{key} = {}", toml_str(value));
            }
        }
    }
}

impl Step {
    /// A critical step with small timeouts and backoffs, so that tests stay
    /// fast: 5 s timeout, 3 attempts, backoff from 10 ms up to 50 ms.
    pub fn http(name: &str, url: impl Into<String>) -> Step {
        Step {
            name: name.to_owned(),
            url: url.into(),
            worker: None,
            needs: Vec::new(),
            critical: true,
            timeout: "5s".to_owned(),
            max_attempts: Some(3),
            initial_backoff: Some("10ms".to_owned()),
            max_backoff: Some("50ms".to_owned()),
            tls: TlsFiles::default(),
            compensate: None,
        }
    }

    /// A step remote workers of `queue` run, with the small timeouts and
    /// backoffs of [`Step::http`].
    pub fn worker(name: &str, queue: &str) -> Step {
        Step {
            worker: Some(queue.to_owned()),
            ..Step::http(name, String::new())
        }
    }

    /// The step's own TLS settings.
    pub fn tls(mut self, tls: TlsFiles) -> Step {
        self.tls = tls;
        self
    }

    /// Undoes the step with an HTTP call to `url`, under the step's own
    /// timeout and retry policy.
    pub fn compensate(mut self, url: impl Into<String>) -> Step {
        self.compensate = Some(toml_str(&url.into()));
        self
    }

    /// Sets `compensate` to `toml` as written (an inline table).
    pub fn compensate_with(mut self, toml: &str) -> Step {
        self.compensate = Some(toml.to_owned());
        self
    }

    pub fn needs(mut self, needs: &[&str]) -> Step {
        self.needs = needs.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn non_critical(mut self) -> Step {
        self.critical = false;
        self
    }

    pub fn timeout(mut self, timeout: &str) -> Step {
        self.timeout = timeout.to_owned();
        self
    }

    pub fn attempts(mut self, max_attempts: u32) -> Step {
        self.max_attempts = Some(max_attempts);
        self
    }

    pub fn backoff(mut self, initial: &str, max: &str) -> Step {
        self.initial_backoff = Some(initial.to_owned());
        self.max_backoff = Some(max.to_owned());
        self
    }

    /// Leaves the whole retry policy to the server's defaults.
    pub fn default_retry(mut self) -> Step {
        self.max_attempts = None;
        self.initial_backoff = None;
        self.max_backoff = None;
        self
    }
}

/// One `[types.NAME]` table.
#[derive(Clone, Debug)]
pub struct TypeDef {
    pub name: String,
    pub schema: Option<Value>,
    pub steps: Vec<Step>,
    /// `references`: payload field -> referenced type.
    pub references: Vec<(String, String)>,
}

impl TypeDef {
    pub fn new(name: &str, steps: Vec<Step>) -> TypeDef {
        TypeDef {
            name: name.to_owned(),
            schema: None,
            steps,
            references: Vec::new(),
        }
    }

    /// Declares that payload `field` holds the id of an entity of
    /// `type_name` that this one depends on.
    pub fn references(mut self, field: &str, type_name: &str) -> TypeDef {
        self.references
            .push((field.to_owned(), type_name.to_owned()));
        self
    }

    /// A JSON Schema, written to `schemas/{name}.json` beside the config.
    pub fn schema(mut self, schema: Value) -> TypeDef {
        self.schema = Some(schema);
        self
    }

    /// Changes one step, which must exist.
    pub fn map_step(mut self, name: &str, f: impl FnOnce(Step) -> Step) -> TypeDef {
        let i = self
            .steps
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("no step {name} in type {}", self.name));
        let step = self.steps.remove(i);
        self.steps.insert(i, f(step));
        self
    }

    /// Changes every step.
    pub fn map_steps(mut self, f: impl Fn(Step) -> Step) -> TypeDef {
        self.steps = self.steps.into_iter().map(f).collect();
        self
    }
}

/// The path the downstream serves for one step of one type.
pub fn step_path(type_name: &str, step: &str) -> String {
    format!("/{type_name}/{step}")
}

/// The five-step pipeline of the performance targets: `a`; `b` and `c` after
/// `a`; `d` after `b` and `c`; `e`, non-critical, after `a`. Each step calls
/// `/{type}/{step}` on the downstream.
pub fn w5(type_name: &str, ds: &Downstream) -> TypeDef {
    let url = |step: &str| ds.url(&step_path(type_name, step));
    TypeDef::new(
        type_name,
        vec![
            Step::http("a", url("a")),
            Step::http("b", url("b")).needs(&["a"]),
            Step::http("c", url("c")).needs(&["a"]),
            Step::http("d", url("d")).needs(&["b", "c"]),
            Step::http("e", url("e")).needs(&["a"]).non_critical(),
        ],
    )
}

/// A one-step pipeline calling `/{type}/only`.
pub fn single(type_name: &str, ds: &Downstream) -> TypeDef {
    TypeDef::new(
        type_name,
        vec![Step::http("only", ds.url(&step_path(type_name, "only")))],
    )
}

/// A whole `ripen.toml`.
#[derive(Clone, Debug)]
pub struct Config {
    /// `[server] listen`; port 0 lets the server pick a free one.
    pub listen: String,
    pub types: Vec<TypeDef>,
    pub body_limit_bytes: Option<u64>,
    pub poll_interval: Option<String>,
    pub lease_grace: Option<String>,
    /// `[engine] execute`; `None` leaves the server's default (true).
    pub execute: Option<bool>,
    /// `[engine] node`: the name the node sends as `ripen-node` with its
    /// step calls, which [`crate::Downstream`] records as a path prefix.
    pub node: Option<String>,
    /// A comment written at the top of the file, for a human who opens it.
    pub comment: Option<String>,
    /// The `[tls]` table; written only when it sets something.
    pub tls: TlsFiles,
    /// `[notify]`, rendered as given (its keys, one `key = value` per line).
    pub notify: Vec<String>,
    /// More TOML tables, appended as given (e.g. `[notify.email]`).
    pub extra: Option<String>,
}

impl Default for Config {
    fn default() -> Config {
        Config::new()
    }
}

impl Config {
    /// A config for tests: a free port, a 100 ms poll interval and a 1 s
    /// lease grace, so that recoveries happen within a test's patience.
    pub fn new() -> Config {
        Config {
            poll_interval: Some("100ms".to_owned()),
            lease_grace: Some("1s".to_owned()),
            ..Config::bare()
        }
    }

    /// A config that leaves every engine setting to the server's defaults,
    /// as an operator's would: what the demo and the bench measure.
    pub fn bare() -> Config {
        Config {
            listen: "127.0.0.1:0".to_owned(),
            types: Vec::new(),
            body_limit_bytes: None,
            poll_interval: None,
            lease_grace: None,
            execute: None,
            node: None,
            comment: None,
            tls: TlsFiles::default(),
            notify: Vec::new(),
            extra: None,
        }
    }

    pub fn with_type(mut self, t: TypeDef) -> Config {
        self.types.push(t);
        self
    }

    pub fn listen(mut self, addr: &str) -> Config {
        self.listen = addr.to_owned();
        self
    }

    pub fn body_limit(mut self, bytes: u64) -> Config {
        self.body_limit_bytes = Some(bytes);
        self
    }

    pub fn lease_grace(mut self, grace: &str) -> Config {
        self.lease_grace = Some(grace.to_owned());
        self
    }

    pub fn poll_interval(mut self, interval: &str) -> Config {
        self.poll_interval = Some(interval.to_owned());
        self
    }

    /// `[engine] node`: the node's name in the `ripen-node` header.
    pub fn node(mut self, name: &str) -> Config {
        self.node = Some(name.to_owned());
        self
    }

    /// `[engine] execute`: `false` makes an intake-only node.
    pub fn execute(mut self, execute: bool) -> Config {
        self.execute = Some(execute);
        self
    }

    /// The `[tls]` table of https steps.
    pub fn tls(mut self, tls: TlsFiles) -> Config {
        self.tls = tls;
        self
    }

    /// Adds one `key = value` line to `[notify]`.
    pub fn notify(mut self, line: &str) -> Config {
        self.notify.push(line.to_owned());
        self
    }

    /// Appends TOML tables after everything else.
    pub fn extra(mut self, toml: &str) -> Config {
        self.extra = Some(toml.to_owned());
        self
    }

    pub fn comment(mut self, comment: &str) -> Config {
        self.comment = Some(comment.to_owned());
        self
    }

    /// Writes the schema files into `dir` and returns the TOML text, on the
    /// given storage URL (a SQLite file, or a PostgreSQL database that other
    /// servers may share).
    pub fn render_on(&self, dir: &Path, storage_url: &str) -> std::io::Result<String> {
        let mut out = String::new();
        if let Some(comment) = &self.comment {
            for line in comment.lines() {
                let _ = writeln!(out, "# {line}");
            }
            out.push('\n');
        }
        let _ = writeln!(out, "[server]\nlisten = {}", toml_str(&self.listen));
        if let Some(limit) = self.body_limit_bytes {
            let _ = writeln!(out, "body_limit_bytes = {limit}");
        }
        let _ = writeln!(out, "\n[storage]\nurl = {}", toml_str(storage_url));
        if self.poll_interval.is_some()
            || self.lease_grace.is_some()
            || self.execute.is_some()
            || self.node.is_some()
        {
            out.push_str("\n[engine]\n");
            if let Some(node) = &self.node {
                let _ = writeln!(out, "node = {}", toml_str(node));
            }
            if let Some(execute) = self.execute {
                let _ = writeln!(out, "execute = {execute}");
            }
            if let Some(p) = &self.poll_interval {
                let _ = writeln!(out, "poll_interval = {}", toml_str(p));
            }
            if let Some(g) = &self.lease_grace {
                let _ = writeln!(out, "lease_grace = {}", toml_str(g));
            }
        }
        if !self.tls.is_empty() {
            out.push_str("\n[tls]\n");
            self.tls.render(&mut out);
        }
        if !self.notify.is_empty() {
            out.push_str("\n[notify]\n");
            for line in &self.notify {
                let _ = writeln!(out, "{line}");
            }
        }
        for t in &self.types {
            let _ = writeln!(out, "\n[types.{}]", t.name);
            if let Some(schema) = &t.schema {
                std::fs::create_dir_all(dir.join("schemas"))?;
                let rel = format!("schemas/{}.json", t.name);
                std::fs::write(dir.join(&rel), serde_json::to_vec_pretty(schema)?)?;
                let _ = writeln!(out, "schema = {}", toml_str(&rel));
            }
            if !t.references.is_empty() {
                let refs: Vec<String> = t
                    .references
                    .iter()
                    .map(|(field, target)| format!("{} = {}", toml_str(field), toml_str(target)))
                    .collect();
                let _ = writeln!(out, "references = {{ {} }}", refs.join(", "));
            }
            for s in &t.steps {
                let _ = writeln!(out, "\n[[types.{}.steps]]", t.name);
                let _ = writeln!(out, "name = {}", toml_str(&s.name));
                match &s.worker {
                    Some(queue) => {
                        let _ = writeln!(out, "worker = {}", toml_str(queue));
                    }
                    None => {
                        let _ = writeln!(out, "http = {}", toml_str(&s.url));
                    }
                }
                let needs: Vec<String> = s.needs.iter().map(|n| toml_str(n)).collect();
                let _ = writeln!(out, "needs = [{}]", needs.join(", "));
                let _ = writeln!(out, "critical = {}", s.critical);
                let _ = writeln!(out, "timeout = {}", toml_str(&s.timeout));
                let mut retry = Vec::new();
                if let Some(n) = s.max_attempts {
                    retry.push(format!("max_attempts = {n}"));
                }
                if let Some(b) = &s.initial_backoff {
                    retry.push(format!("initial_backoff = {}", toml_str(b)));
                }
                if let Some(b) = &s.max_backoff {
                    retry.push(format!("max_backoff = {}", toml_str(b)));
                }
                if !retry.is_empty() {
                    let _ = writeln!(out, "retry = {{ {} }}", retry.join(", "));
                }
                if let Some(c) = &s.compensate {
                    let _ = writeln!(out, "compensate = {c}");
                }
                s.tls.render(&mut out);
            }
        }
        if let Some(extra) = &self.extra {
            let _ = writeln!(out, "\n{extra}");
        }
        Ok(out)
    }

    /// Writes `ripen.toml` and the schema files into `dir`; returns the
    /// config's path.
    pub fn write(&self, dir: &Path, storage_url: &str) -> std::io::Result<PathBuf> {
        let text = self.render_on(dir, storage_url)?;
        let path = dir.join("ripen.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

/// The storage URL of a SQLite database file `ripen.db` in `dir`.
pub fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("ripen.db").display())
}

/// A TOML basic string; JSON string escapes are valid TOML escapes.
pub fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_renders_its_settings_steps_and_schema() {
        let dir = crate::TempDir::new("ripen-testkit-config-").unwrap();
        let t = TypeDef::new(
            "shop",
            vec![
                Step::http("a", "http://127.0.0.1:9/a"),
                Step::http("b", "http://127.0.0.1:9/b")
                    .needs(&["a"])
                    .non_critical()
                    .default_retry(),
                Step::worker("c", "billing").needs(&["a"]).timeout("1s"),
            ],
        )
        .schema(serde_json::json!({"type": "object"}));
        let text = Config::bare()
            .execute(false)
            .comment("written by a test")
            .with_type(t)
            .render_on(dir.path(), "sqlite://x.db")
            .unwrap();
        assert!(text.starts_with("# written by a test\n\n[server]\nlisten = \"127.0.0.1:0\"\n"));
        assert!(text.contains("[engine]\nexecute = false\n"));
        assert!(!text.contains("poll_interval"));
        assert!(text.contains("schema = \"schemas/shop.json\""));
        assert!(text.contains(
            "name = \"a\"\nhttp = \"http://127.0.0.1:9/a\"\nneeds = []\ncritical = true\ntimeout = \"5s\"\nretry = { max_attempts = 3, initial_backoff = \"10ms\", max_backoff = \"50ms\" }\n"
        ));
        assert!(text.contains("needs = [\"a\"]\ncritical = false\ntimeout = \"5s\"\n\n"));
        assert!(text.contains("name = \"c\"\nworker = \"billing\"\nneeds = [\"a\"]\ncritical = true\ntimeout = \"1s\"\n"));
        assert!(dir.path().join("schemas/shop.json").is_file());
    }
}
