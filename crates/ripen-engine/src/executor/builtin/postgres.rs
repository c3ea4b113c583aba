//! `postgres_upsert`: one row per entity in a table of the user's
//! PostgreSQL database, keyed by the entity id.
//!
//! The statement is `INSERT … ON CONFLICT (key) DO UPDATE SET … WHERE the
//! row differs`, so a repeated attempt finds the row already holding these
//! values and writes nothing. Values are sent in PostgreSQL's text format,
//! and the server parses each as its column's type: a string `"42"` and a
//! number `42` both fill an integer column, and a value that does not parse
//! (`"abc"` into an integer) fails the step for good (SQLSTATE class 22).
//!
//! The table is checked once, at the first connection (at engine start when
//! the database is reachable then): it must exist, hold every mapped column
//! and the key column (uuid or text, with a unique index or primary key on
//! it alone).

use std::collections::BTreeMap;
use std::error::Error as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use ripen_store::{Attempt, Outcome};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{OnceCell, Semaphore};
use tokio_postgres::types::{Format, IsNull, ToSql, Type};
use tokio_postgres::{Client, NoTls, Statement};

use super::{as_text, failure, parse_pointer, pick, StartCheck};

pub const CONNECTOR: &str = "postgres_upsert";
const DEFAULT_KEY: &str = "id";
const DEFAULT_POOL_SIZE: usize = 4;
const POOL_SIZE_MAX: usize = 32;
/// The longest a connection attempt may take, whatever the step's timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `builtin = { postgres_upsert = { … } }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpsertSpec {
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?…]`.
    pub url: String,
    /// `TABLE` or `SCHEMA.TABLE`, as the catalog spells them.
    pub table: String,
    /// The column that holds the entity id.
    #[serde(default = "default_key")]
    pub key: String,
    /// Column → pointer into the step document.
    pub columns: BTreeMap<String, String>,
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
}

fn default_key() -> String {
    DEFAULT_KEY.to_owned()
}

fn default_pool_size() -> usize {
    DEFAULT_POOL_SIZE
}

impl UpsertSpec {
    pub(super) fn check(&self) -> Result<(), (String, String)> {
        let config = parse_url(&self.url).map_err(|p| (".url".to_owned(), p))?;
        if config.get_hosts().is_empty() {
            return Err((".url".into(), format!("{:?} names no host", self.url)));
        }
        if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            return Err((
                ".url".into(),
                "sslmode=require: TLS is not supported by this build yet".into(),
            ));
        }
        table_name(&self.table).map_err(|p| (".table".to_owned(), p))?;
        if self.key.is_empty() {
            return Err((".key".into(), "the key column name is empty".into()));
        }
        if self.columns.is_empty() {
            return Err((
                ".columns".into(),
                "map at least one column, such as columns = { name = \"/payload/name\" }".into(),
            ));
        }
        for (column, pointer) in &self.columns {
            let key = format!(".columns.{column}");
            if column.is_empty() {
                return Err((".columns".into(), "a column name is empty".into()));
            }
            if column == &self.key {
                return Err((
                    key,
                    format!(
                        "{column:?} is the key column, which always holds the entity id; do not map it"
                    ),
                ));
            }
            parse_pointer(pointer).map_err(|p| (key, p))?;
        }
        if self.pool_size == 0 || self.pool_size > POOL_SIZE_MAX {
            return Err((
                ".pool_size".into(),
                format!("must be between 1 and {POOL_SIZE_MAX}"),
            ));
        }
        Ok(())
    }
}

fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(format!(
            "{url:?} is not a PostgreSQL URL such as \"postgres://USER@HOST:5432/DB\""
        ));
    }
    url.parse::<tokio_postgres::Config>()
        .map_err(|e| format!("{url:?} is not a PostgreSQL URL: {e}"))
}

/// `[schema, ]table` of a table setting.
fn table_name(table: &str) -> Result<Vec<&str>, String> {
    let parts: Vec<&str> = table.split('.').collect();
    if parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(format!(
            "{table:?} is not a table name: use TABLE or SCHEMA.TABLE"
        ));
    }
    Ok(parts)
}

/// An identifier, quoted for SQL.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The text of the entity id, or of a value, sent in the text format: the
/// server parses it as the parameter's type (its column's).
#[derive(Debug)]
struct Text(Option<String>);

impl ToSql for Text {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            None => Ok(IsNull::Yes),
            Some(s) => {
                out.extend_from_slice(s.as_bytes());
                Ok(IsNull::No)
            }
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    tokio_postgres::types::to_sql_checked!();
}

/// What the check of the table found: the statement and how to fill it.
#[derive(Debug)]
struct Shape {
    sql: String,
    /// In parameter order after the key: the pointer, and whether the
    /// column is json/jsonb (a JSON string is then sent as JSON text).
    columns: Vec<(String, bool)>,
}

/// Why the connector failed, and whether trying again may help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub reason: &'static str,
    pub detail: String,
    pub retryable: bool,
}

impl PgError {
    pub fn describe(&self) -> String {
        format!("{}: {}", self.reason, self.detail)
    }
}

/// Classifies a SQLSTATE: the reason a message gives, and whether the
/// failure may pass. 08 connection, 40 rollback (serialization, deadlock),
/// 53 resources (too many connections), 57 operator intervention (a
/// statement timeout, a shutdown), 58 system errors and 55P03 (lock not
/// available) pass; 23 constraint violations, 22 data exceptions and
/// everything else do not.
pub fn classify_sqlstate(code: &str) -> (&'static str, bool) {
    match code {
        "53300" => return ("too many connections", true),
        "40001" => return ("serialization failure", true),
        "40P01" => return ("deadlock detected", true),
        "57014" => return ("statement timed out", true),
        "55P03" => return ("lock not available", true),
        "42501" => return ("permission denied", false),
        "42703" => return ("the table has no such column", false),
        "42P01" => return ("the table does not exist", false),
        _ => {}
    }
    match code.get(..2).unwrap_or_default() {
        "08" => ("connection lost", true),
        "40" => ("transaction rolled back", true),
        "53" => ("the database is out of resources", true),
        "57" => ("the database is shutting down or starting", true),
        "58" => ("system error in the database", true),
        "23" => ("constraint violation", false),
        "22" => ("a value does not fit its column", false),
        "28" => ("authentication failed", false),
        "42" => ("the statement does not fit the table", false),
        _ => ("database error", false),
    }
}

/// Classifies a driver error. Errors without a SQLSTATE are about the
/// connection (refused, closed, cut): they pass.
fn classify(e: &tokio_postgres::Error, connecting: bool) -> PgError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        let (reason, retryable) = classify_sqlstate(code);
        let mut detail = format!("{} (SQLSTATE {code})", db.message());
        if let Some(more) = db.detail() {
            detail.push_str(": ");
            detail.push_str(more);
        }
        return PgError {
            reason,
            detail,
            retryable,
        };
    }
    let mut detail = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        detail.push_str(": ");
        detail.push_str(&inner.to_string());
        source = inner.source();
    }
    PgError {
        reason: if connecting {
            "cannot connect"
        } else {
            "connection lost"
        },
        detail,
        retryable: true,
    }
}

struct Conn {
    client: Client,
    statement: Option<Statement>,
}

/// A few connections to the user's database, opened on demand.
struct Pool {
    config: tokio_postgres::Config,
    idle: Mutex<Vec<Conn>>,
    permits: Semaphore,
}

impl Pool {
    async fn get(&self) -> Result<(Conn, tokio::sync::SemaphorePermit<'_>), PgError> {
        let permit = self.permits.acquire().await.map_err(|_| PgError {
            reason: "the pool is closed",
            detail: String::new(),
            retryable: true,
        })?;
        loop {
            let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match idle {
                // The server went away since (a restart, an idle timeout).
                Some(conn) if conn.client.is_closed() => continue,
                Some(conn) => return Ok((conn, permit)),
                None => break,
            }
        }
        let (client, connection) = self
            .config
            .connect(NoTls)
            .await
            .map_err(|e| classify(&e, true))?;
        // The connection task ends when the client is dropped or the server
        // goes away; the client then reports itself closed.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "a postgres_upsert connection ended");
            }
        });
        Ok((
            Conn {
                client,
                statement: None,
            },
            permit,
        ))
    }

    fn put_back(&self, conn: Conn) {
        if !conn.client.is_closed() {
            self.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(conn);
        }
    }
}

/// A prepared `postgres_upsert` step.
pub struct Upsert {
    spec: UpsertSpec,
    /// `"schema"."table"` or `"table"`.
    table: String,
    pool: Pool,
    /// The result of the table check, once a connection ran it.
    shape: OnceCell<Result<Arc<Shape>, (String, String)>>,
    /// `FILE: types.T.steps[i].builtin.postgres_upsert`, for messages.
    base: String,
}

impl Upsert {
    /// `spec` passed [`UpsertSpec::check`] when the configuration was parsed.
    /// Each connection has the step's timeout as its `statement_timeout`.
    pub fn new(spec: UpsertSpec, base: String, timeout_ms: u64) -> Upsert {
        let mut config = parse_url(&spec.url).expect("checked at load");
        config.connect_timeout(CONNECT_TIMEOUT.min(Duration::from_millis(timeout_ms)));
        let options = format!("-c statement_timeout={timeout_ms}");
        let options = match config.get_options() {
            Some(theirs) if !theirs.is_empty() => format!("{theirs} {options}"),
            _ => options,
        };
        config.options(options);
        if config.get_application_name().is_none() {
            config.application_name("ripen");
        }
        let table = table_name(&spec.table)
            .expect("checked at load")
            .into_iter()
            .map(ident)
            .collect::<Vec<_>>()
            .join(".");
        let pool = Pool {
            config,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(spec.pool_size),
        };
        Upsert {
            spec,
            table,
            pool,
            shape: OnceCell::new(),
            base,
        }
    }

    pub(super) async fn start_check(&self) -> StartCheck {
        match tokio::time::timeout(super::START_CHECK_PATIENCE, self.shape()).await {
            Err(_) => StartCheck::Unreachable("timed out".into()),
            Ok(Ok(Ok(_))) => StartCheck::Passed,
            Ok(Ok(Err(problem))) => StartCheck::Refused(problem.clone()),
            Ok(Err(e)) if e.retryable => StartCheck::Unreachable(e.describe()),
            Ok(Err(e)) => StartCheck::Refused((".url".into(), e.describe())),
        }
    }

    /// The checked shape of the table, checking it on first use. A
    /// connection failure leaves it to be checked next time.
    async fn shape(&self) -> Result<&Result<Arc<Shape>, (String, String)>, PgError> {
        self.shape
            .get_or_try_init(|| async {
                let (conn, _permit) = self.pool.get().await?;
                let checked = self.check_table(&conn.client).await;
                self.pool.put_back(conn);
                checked
            })
            .await
    }

    /// Reads the table's columns from the catalog.
    async fn check_table(
        &self,
        client: &Client,
    ) -> Result<Result<Arc<Shape>, (String, String)>, PgError> {
        let db = self
            .pool
            .config
            .get_dbname()
            .unwrap_or("(default)")
            .to_owned();
        let oid: Option<i64> = client
            .query_one("SELECT to_regclass($1)::oid::int8", &[&self.table])
            .await
            .map_err(|e| classify(&e, false))?
            .get(0);
        let Some(oid) = oid else {
            return Ok(Err((
                ".table".into(),
                format!(
                    "the table {} does not exist in the database {db:?}",
                    self.table
                ),
            )));
        };
        let rows = client
            .query(
                "SELECT a.attname::text, t.typname::text, format_type(a.atttypid, a.atttypmod), \
                   EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid \
                     AND i.indisunique AND i.indnkeyatts = 1 AND i.indpred IS NULL \
                     AND i.indkey[0] = a.attnum) \
                 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
                 WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped",
                &[&oid],
            )
            .await
            .map_err(|e| classify(&e, false))?;
        let columns: BTreeMap<String, (String, String, bool)> = rows
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
            .collect();
        let table = &self.table;
        let key = &self.spec.key;
        match columns.get(key) {
            None => {
                return Ok(Err((
                    ".key".into(),
                    format!("the table {table} has no column {key:?} to hold the entity id"),
                )))
            }
            Some((typname, shown, unique)) => {
                if !matches!(typname.as_str(), "uuid" | "text" | "varchar") {
                    return Ok(Err((
                        ".key".into(),
                        format!(
                            "the key column {key:?} of {table} is {shown}; it holds the entity id, so it must be uuid or text"
                        ),
                    )));
                }
                if !unique {
                    return Ok(Err((
                        ".key".into(),
                        format!(
                            "the key column {key:?} of {table} has no primary key or unique index of its own, which the upsert needs"
                        ),
                    )));
                }
            }
        }
        let mut shape_columns = Vec::new();
        for (column, pointer) in &self.spec.columns {
            let Some((typname, _, _)) = columns.get(column) else {
                return Ok(Err((
                    format!(".columns.{column}"),
                    format!("the table {table} has no column {column:?}"),
                )));
            };
            shape_columns.push((
                pointer.clone(),
                matches!(typname.as_str(), "json" | "jsonb"),
            ));
        }
        Ok(Ok(Arc::new(Shape {
            sql: self.statement(),
            columns: shape_columns,
        })))
    }

    /// `INSERT … ON CONFLICT (key) DO UPDATE SET … WHERE the row differs`.
    fn statement(&self) -> String {
        let key = ident(&self.spec.key);
        let names: Vec<String> = self.spec.columns.keys().map(|c| ident(c)).collect();
        let params: Vec<String> = (1..=names.len() + 1).map(|i| format!("${i}")).collect();
        let set: Vec<String> = names
            .iter()
            .map(|c| format!("{c} = EXCLUDED.{c}"))
            .collect();
        let old: Vec<String> = names.iter().map(|c| format!("t.{c}::text")).collect();
        let new: Vec<String> = names
            .iter()
            .map(|c| format!("EXCLUDED.{c}::text"))
            .collect();
        format!(
            "INSERT INTO {table} AS t ({key}, {names}) VALUES ({params}) \
             ON CONFLICT ({key}) DO UPDATE SET {set} \
             WHERE ROW({old}) IS DISTINCT FROM ROW({new})",
            table = self.table,
            names = names.join(", "),
            params = params.join(", "),
            set = set.join(", "),
            old = old.join(", "),
            new = new.join(", "),
        )
    }

    pub(super) async fn write(&self, doc: &Value, attempt: &Attempt, timeout_ms: u64) -> Outcome {
        let result = within(timeout_ms, self.upsert(doc, attempt)).await;
        self.outcome(result, "upserted")
    }

    /// The compensation: deletes the entity's row, which is idempotent
    /// like the upsert.
    pub(super) async fn undo(&self, attempt: &Attempt, timeout_ms: u64) -> Outcome {
        let result = within(timeout_ms, self.delete(attempt)).await;
        self.outcome(result, "deleted")
    }

    /// A statement's result as the step's: the rows it touched, as
    /// `{what: n}`, or the failure.
    fn outcome(&self, result: Result<u64, PgError>, what: &str) -> Outcome {
        match result {
            Ok(rows) => Outcome::Succeeded {
                output: Some(serde_json::json!({ what: rows }).to_string()),
            },
            Err(e) => failure(
                format!("{CONNECTOR} {}: {}", self.spec.table, e.describe()),
                e.retryable,
            ),
        }
    }

    async fn delete(&self, attempt: &Attempt) -> Result<u64, PgError> {
        let sql = format!(
            "DELETE FROM {} WHERE {}::text = $1",
            self.table,
            ident(&self.spec.key)
        );
        let id = Text(Some(attempt.entity_id.to_string()));
        let (conn, _permit) = self.pool.get().await?;
        let deleted = conn
            .client
            .execute(sql.as_str(), &[&id])
            .await
            .map_err(|e| classify(&e, false));
        self.pool.put_back(conn);
        deleted
    }

    /// Writes the row; the number of rows written (0 when it already held
    /// these values).
    async fn upsert(&self, doc: &Value, attempt: &Attempt) -> Result<u64, PgError> {
        let shape = match self.shape().await? {
            Ok(shape) => shape.clone(),
            Err((key, problem)) => {
                return Err(PgError {
                    reason: "the table does not fit the configuration",
                    detail: format!("{}{key}: {problem}", self.base),
                    retryable: false,
                })
            }
        };
        let mut params = vec![Text(Some(attempt.entity_id.to_string()))];
        for (pointer, json) in &shape.columns {
            let value = pick(doc, pointer).map(|v| if *json { v.to_string() } else { as_text(v) });
            params.push(Text(value));
        }
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        let (mut conn, _permit) = self.pool.get().await?;
        let statement = match &conn.statement {
            Some(s) => s.clone(),
            None => {
                let s = conn
                    .client
                    .prepare(&shape.sql)
                    .await
                    .map_err(|e| classify(&e, false))?;
                conn.statement = Some(s.clone());
                s
            }
        };
        let written = conn
            .client
            .execute(&statement, &refs)
            .await
            .map_err(|e| classify(&e, false));
        self.pool.put_back(conn);
        written
    }
}

/// `run`, or a retryable timeout once `timeout_ms` passed.
async fn within<T>(
    timeout_ms: u64,
    run: impl std::future::Future<Output = Result<T, PgError>>,
) -> Result<T, PgError> {
    match tokio::time::timeout(Duration::from_millis(timeout_ms), run).await {
        Ok(result) => result,
        Err(_) => Err(PgError {
            reason: "timed out",
            detail: format!("no answer within {timeout_ms} ms"),
            retryable: true,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> UpsertSpec {
        UpsertSpec {
            url: "postgres://app@127.0.0.1:5432/shop".into(),
            table: "public.merchants".into(),
            key: "id".into(),
            columns: BTreeMap::from([
                ("name".into(), "/payload/name".into()),
                ("score".into(), "/outputs/kyc/score".into()),
            ]),
            pool_size: 2,
        }
    }

    #[test]
    fn the_statement_upserts_only_what_differs() {
        let u = Upsert::new(spec(), String::new(), 1_000);
        assert_eq!(
            u.statement(),
            "INSERT INTO \"public\".\"merchants\" AS t (\"id\", \"name\", \"score\") VALUES ($1, $2, $3) \
             ON CONFLICT (\"id\") DO UPDATE SET \"name\" = EXCLUDED.\"name\", \"score\" = EXCLUDED.\"score\" \
             WHERE ROW(t.\"name\"::text, t.\"score\"::text) IS DISTINCT FROM ROW(EXCLUDED.\"name\"::text, EXCLUDED.\"score\"::text)"
        );
        assert_eq!(
            u.pool.config.get_options(),
            Some("-c statement_timeout=1000")
        );
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
    }

    #[test]
    fn settings_are_checked() {
        assert_eq!(spec().check(), Ok(()));
        type Change = Box<dyn Fn(&mut UpsertSpec)>;
        let cases: Vec<(Change, &str, &str)> = vec![
            (
                Box::new(|s| s.url = "mysql://x".into()),
                ".url",
                "is not a PostgreSQL URL",
            ),
            (
                Box::new(|s| s.url = "postgres://h/db?sslmode=require".into()),
                ".url",
                "TLS",
            ),
            (
                Box::new(|s| s.table = "a.b.c".into()),
                ".table",
                "TABLE or SCHEMA.TABLE",
            ),
            (
                Box::new(|s| s.columns.clear()),
                ".columns",
                "at least one column",
            ),
            (
                Box::new(|s| {
                    s.columns.insert("id".into(), "/id".into());
                }),
                ".columns.id",
                "is the key column",
            ),
            (
                Box::new(|s| {
                    s.columns.insert("x".into(), "/payload/a~9".into());
                }),
                ".columns.x",
                "'~' must be followed by 0 or 1",
            ),
            (
                Box::new(|s| s.pool_size = 99),
                ".pool_size",
                "between 1 and 32",
            ),
        ];
        for (change, key, problem) in cases {
            let mut s = spec();
            change(&mut s);
            let (k, p) = s.check().unwrap_err();
            assert_eq!(k, key);
            assert!(p.contains(problem), "{key}: {p}");
        }
    }

    #[test]
    fn sqlstates_are_classified() {
        for code in [
            "08006", "08001", "53300", "53100", "40001", "40P01", "57014", "57P01", "55P03",
        ] {
            assert!(classify_sqlstate(code).1, "{code} passes");
        }
        for code in [
            "23505", "23514", "23502", "22P02", "22003", "42501", "42703", "28P01", "XX000",
        ] {
            assert!(!classify_sqlstate(code).1, "{code} does not pass");
        }
        assert_eq!(classify_sqlstate("23514").0, "constraint violation");
        assert_eq!(classify_sqlstate("53300").0, "too many connections");
        assert_eq!(
            classify_sqlstate("22P02").0,
            "a value does not fit its column"
        );
    }
}
