//! `redis_set`: writes one hash (or one JSON string) per entity into Redis,
//! over a minimal RESP2 client of its own.
//!
//! Hash mode sends `MULTI`, `HSET key field value …` for the fields whose
//! pointer finds a value, `HDEL key field …` for those that find nothing,
//! `PEXPIRE` when `ttl` is set, and `EXEC`: the mapped fields hold exactly
//! what the mapping says, other fields of the hash are left alone, and a
//! repeated attempt writes the same values again. JSON mode sends
//! `SET key json [PX ttl]`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use ripen_store::{Attempt, Outcome};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::{as_text, failure, parse_pointer, pick, StartCheck};

pub const CONNECTOR: &str = "redis_set";
const DEFAULT_POOL_SIZE: usize = 4;
const POOL_SIZE_MAX: usize = 32;
/// The longest a connection attempt may take, whatever the step's timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest reply accepted; Ripen's commands get tiny ones.
const REPLY_BYTES_MAX: usize = 1024 * 1024;

/// `builtin = { redis_set = { … } }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetSpec {
    /// `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`.
    pub url: String,
    /// The key template: `{id}` (required) and `{type}`; `{{` and `}}` are
    /// literal braces.
    pub key: String,
    #[serde(default)]
    pub value: ValueMode,
    /// Hash mode: field name → pointer into the step document.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// JSON mode: what to store; the whole step document when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pointer: Option<String>,
    /// An expiry set on every write, such as `"1h"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
}

fn default_pool_size() -> usize {
    DEFAULT_POOL_SIZE
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueMode {
    /// A hash of the mapped fields (`HSET`).
    #[default]
    Hash,
    /// One JSON string (`SET`).
    Json,
}

impl SetSpec {
    pub(super) fn check(&self) -> Result<(), (String, String)> {
        RedisUrl::parse(&self.url).map_err(|p| (".url".to_owned(), p))?;
        KeyTemplate::parse(&self.key).map_err(|p| (".key".to_owned(), p))?;
        match self.value {
            ValueMode::Hash => {
                if self.fields.is_empty() {
                    return Err((
                        ".fields".into(),
                        "a hash needs at least one field, such as fields = { name = \"/payload/name\" }".into(),
                    ));
                }
                if self.pointer.is_some() {
                    return Err((
                        ".pointer".into(),
                        "pointer is for value = \"json\"; a hash takes fields".into(),
                    ));
                }
                for (field, pointer) in &self.fields {
                    if field.is_empty() {
                        return Err((".fields".into(), "a field name is empty".into()));
                    }
                    parse_pointer(pointer).map_err(|p| (format!(".fields.{field}"), p))?;
                }
            }
            ValueMode::Json => {
                if !self.fields.is_empty() {
                    return Err((
                        ".fields".into(),
                        "fields are for value = \"hash\"; JSON mode takes one pointer".into(),
                    ));
                }
                if let Some(pointer) = &self.pointer {
                    parse_pointer(pointer).map_err(|p| (".pointer".to_owned(), p))?;
                }
            }
        }
        if let Some(ttl) = &self.ttl {
            ttl_ms(ttl).map_err(|p| (".ttl".to_owned(), p))?;
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

fn ttl_ms(ttl: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(ttl)
        .map_err(|e| format!("{ttl:?} is not a duration such as \"1h\": {e}"))?;
    let ms = d.as_millis() as u64;
    if ms == 0 {
        return Err(format!("{ttl:?} must be at least 1ms"));
    }
    Ok(ms)
}

// ---------------------------------------------------------------------------
// The URL

/// Where and as whom to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisUrl {
    /// `host:port`, as `TcpStream::connect` takes it.
    pub addr: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub db: u32,
}

impl RedisUrl {
    pub fn parse(url: &str) -> Result<RedisUrl, String> {
        let rest = if let Some(rest) = url.strip_prefix("redis://") {
            rest
        } else if url.starts_with("rediss://") {
            return Err(format!(
                "{url:?}: TLS (rediss://) is not supported by this build yet; use redis://"
            ));
        } else {
            return Err(format!(
                "{url:?} is not a Redis URL such as \"redis://127.0.0.1:6379\""
            ));
        };
        if rest.contains('?') || rest.contains('#') {
            return Err(format!("{url:?}: a Redis URL takes no query"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => (None, None),
            Some(info) => {
                let (u, p) = match info.find(':') {
                    Some(i) => (&info[..i], Some(&info[i + 1..])),
                    None => (info, None),
                };
                let u = percent_decode(u).ok_or_else(|| format!("{url:?}: bad %-escape"))?;
                let p = p
                    .map(|p| percent_decode(p).ok_or_else(|| format!("{url:?}: bad %-escape")))
                    .transpose()?;
                match p {
                    // `redis://:secret@host`: a password for the default user.
                    Some(p) => ((!u.is_empty()).then_some(u), Some(p)),
                    // `redis://secret@host`, as other clients read it.
                    None => (None, (!u.is_empty()).then_some(u)),
                }
            }
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let end = v6
                .find(']')
                .ok_or_else(|| format!("{url:?}: unclosed '['"))?;
            let port = v6[end + 1..].strip_prefix(':');
            (&hostport[..end + 2], port)
        } else {
            match hostport.rfind(':') {
                Some(i) => (&hostport[..i], Some(&hostport[i + 1..])),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?} names no host"));
        }
        let port: u16 = match port {
            None => 6379,
            Some(p) => p
                .parse()
                .map_err(|_| format!("{url:?}: {p:?} is not a port"))?,
        };
        let db = if path.is_empty() {
            0
        } else {
            path.parse()
                .map_err(|_| format!("{url:?}: the path must be a database number, not {path:?}"))?
        };
        Ok(RedisUrl {
            addr: format!("{host}:{port}"),
            user,
            password,
            db,
        })
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

// ---------------------------------------------------------------------------
// Key templates

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Id,
    Type,
}

/// A key template: literal text with `{id}` and `{type}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyTemplate(Vec<Part>);

impl KeyTemplate {
    pub fn parse(template: &str) -> Result<KeyTemplate, String> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = template;
        while let Some(c) = rest.chars().next() {
            if let Some(r) = rest.strip_prefix("{{") {
                text.push('{');
                rest = r;
            } else if let Some(r) = rest.strip_prefix("}}") {
                text.push('}');
                rest = r;
            } else if c == '{' {
                let end = rest.find('}').ok_or_else(|| {
                    format!("{template:?}: unclosed '{{'; write {{{{ for a literal brace")
                })?;
                let part = match &rest[1..end] {
                    "id" => Part::Id,
                    "type" => Part::Type,
                    other => {
                        return Err(format!(
                            "{template:?}: unknown placeholder {{{other}}}; use {{id}} and {{type}}"
                        ))
                    }
                };
                if !text.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut text)));
                }
                parts.push(part);
                rest = &rest[end + 1..];
            } else if c == '}' {
                return Err(format!(
                    "{template:?}: a lone '}}'; write }}}} for a literal brace"
                ));
            } else {
                text.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        if !parts.contains(&Part::Id) {
            return Err(format!(
                "{template:?} has no {{id}}: every entity needs a key of its own, such as \"merchant:{{id}}\""
            ));
        }
        Ok(KeyTemplate(parts))
    }

    pub fn render(&self, id: &str, type_name: &str) -> String {
        let mut key = String::new();
        for part in &self.0 {
            match part {
                Part::Text(t) => key.push_str(t),
                Part::Id => key.push_str(id),
                Part::Type => key.push_str(type_name),
            }
        }
        key
    }
}

// ---------------------------------------------------------------------------
// RESP2

/// One reply of a Redis server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// Appends a command as a RESP array of bulk strings.
pub fn encode(args: &[&[u8]], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// Decodes one reply from the start of `buf`: `Ok(None)` when more bytes
/// are needed, else the reply and how many bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    decode_at(buf, 0, 0)
}

fn decode_at(buf: &[u8], at: usize, depth: usize) -> Result<Option<(Reply, usize)>, String> {
    if depth > 8 {
        return Err("a reply nests too deeply".into());
    }
    let Some(line_end) = find_crlf(buf, at) else {
        if buf.len() - at > REPLY_BYTES_MAX {
            return Err("a reply line is too long".into());
        }
        return Ok(None);
    };
    if line_end == at {
        return Err("an empty reply line".into());
    }
    let line = std::str::from_utf8(&buf[at + 1..line_end])
        .map_err(|_| "a reply line is not UTF-8".to_owned())?;
    let next = line_end + 2;
    let int = || {
        line.parse::<i64>()
            .map_err(|_| format!("{line:?} is not a number"))
    };
    match buf[at] {
        b'+' => Ok(Some((Reply::Status(line.to_owned()), next))),
        b'-' => Ok(Some((Reply::Error(line.to_owned()), next))),
        b':' => Ok(Some((Reply::Int(int()?), next))),
        b'$' => {
            let len = int()?;
            if len < 0 {
                return Ok(Some((Reply::Bulk(None), next)));
            }
            let len = len as usize;
            if len > REPLY_BYTES_MAX {
                return Err(format!("a reply of {len} bytes is too large"));
            }
            if buf.len() < next + len + 2 {
                return Ok(None);
            }
            if &buf[next + len..next + len + 2] != b"\r\n" {
                return Err("a bulk string does not end with CRLF".into());
            }
            Ok(Some((
                Reply::Bulk(Some(buf[next..next + len].to_vec())),
                next + len + 2,
            )))
        }
        b'*' => {
            let len = int()?;
            if len < 0 {
                return Ok(Some((Reply::Array(None), next)));
            }
            if len as usize > REPLY_BYTES_MAX {
                return Err(format!("an array of {len} items is too large"));
            }
            let mut items = Vec::with_capacity((len as usize).min(64));
            let mut pos = next;
            for _ in 0..len {
                match decode_at(buf, pos, depth + 1)? {
                    Some((item, end)) => {
                        items.push(item);
                        pos = end;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(Some(items)), pos)))
        }
        other => Err(format!("unknown reply type {:?}", other as char)),
    }
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| from + i)
}

/// Why a Redis call failed, and whether trying again may help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisError {
    pub reason: &'static str,
    pub detail: String,
    pub retryable: bool,
}

impl RedisError {
    fn io(reason: &'static str, e: impl std::fmt::Display) -> RedisError {
        RedisError {
            reason,
            detail: e.to_string(),
            retryable: true,
        }
    }

    /// Whether the connection that produced it is still usable.
    fn keeps_connection(&self) -> bool {
        self.reason != "connection lost" && self.reason != "protocol error"
    }
}

/// Classifies an error reply by its code (its first word).
pub fn classify_reply(message: &str) -> RedisError {
    let code = message.split_whitespace().next().unwrap_or_default();
    let (reason, retryable) = match code {
        "WRONGTYPE" => ("the key holds another type of value", false),
        "LOADING" => ("the server is loading its data", true),
        "BUSY" => ("the server is busy running a script", true),
        "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" | "NOREPLICAS" => {
            ("the server is not available", true)
        }
        "READONLY" => ("the server is a read-only replica", true),
        "OOM" => ("the server is out of memory", true),
        "NOAUTH" | "WRONGPASS" => ("authentication failed", false),
        "NOPERM" => ("permission denied", false),
        "ERR" if message.contains("max number of clients") => ("too many connections", true),
        _ => ("the server refused the command", false),
    };
    RedisError {
        reason,
        detail: message.to_owned(),
        retryable,
    }
}

// ---------------------------------------------------------------------------
// Connections

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(url: &RedisUrl) -> Result<Conn, RedisError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&url.addr))
            .await
            .map_err(|_| RedisError::io("cannot connect", "timed out"))?
            .map_err(|e| RedisError::io("cannot connect", e))?;
        let _ = stream.set_nodelay(true);
        let mut conn = Conn {
            stream,
            buf: Vec::with_capacity(512),
        };
        let mut setup: Vec<Vec<Vec<u8>>> = Vec::new();
        match (&url.user, &url.password) {
            (Some(u), Some(p)) => {
                setup.push(vec![b"AUTH".to_vec(), u.clone().into(), p.clone().into()])
            }
            (None, Some(p)) => setup.push(vec![b"AUTH".to_vec(), p.clone().into()]),
            _ => {}
        }
        if url.db != 0 {
            setup.push(vec![b"SELECT".to_vec(), url.db.to_string().into()]);
        }
        if !setup.is_empty() {
            for reply in conn.call(&setup).await? {
                if let Reply::Error(e) = reply {
                    return Err(classify_reply(&e));
                }
            }
        }
        Ok(conn)
    }

    /// Sends the commands in one write and reads one reply for each.
    async fn call(&mut self, commands: &[Vec<Vec<u8>>]) -> Result<Vec<Reply>, RedisError> {
        let mut out = Vec::new();
        for command in commands {
            let args: Vec<&[u8]> = command.iter().map(Vec::as_slice).collect();
            encode(&args, &mut out);
        }
        self.stream
            .write_all(&out)
            .await
            .map_err(|e| RedisError::io("connection lost", e))?;
        let mut replies = Vec::with_capacity(commands.len());
        while replies.len() < commands.len() {
            match decode(&self.buf) {
                Ok(Some((reply, used))) => {
                    self.buf.drain(..used);
                    replies.push(reply);
                }
                Ok(None) => {
                    let mut chunk = [0u8; 4096];
                    let n = self
                        .stream
                        .read(&mut chunk)
                        .await
                        .map_err(|e| RedisError::io("connection lost", e))?;
                    if n == 0 {
                        return Err(RedisError::io(
                            "connection lost",
                            "the server closed the connection",
                        ));
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                Err(e) => {
                    return Err(RedisError {
                        reason: "protocol error",
                        detail: e,
                        retryable: true,
                    })
                }
            }
        }
        Ok(replies)
    }
}

/// A few connections to one server, opened on demand.
struct Pool {
    url: RedisUrl,
    idle: Mutex<Vec<Conn>>,
    permits: Semaphore,
}

impl Pool {
    /// Runs `commands` on a pooled connection. A connection that failed is
    /// dropped; when a reused one turns out to be dead (the server
    /// restarted since), the commands run once more on a fresh one: they
    /// are idempotent.
    async fn call(&self, commands: &[Vec<Vec<u8>>]) -> Result<Vec<Reply>, RedisError> {
        let _permit = self.permits.acquire().await.map_err(|_| RedisError {
            reason: "the pool is closed",
            detail: String::new(),
            retryable: true,
        })?;
        let reused = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        if let Some(mut conn) = reused {
            match conn.call(commands).await {
                Ok(replies) => {
                    self.put_back(conn);
                    return Ok(replies);
                }
                Err(e) if e.reason != "connection lost" => return Err(e),
                Err(_) => {}
            }
        }
        let mut conn = Conn::open(&self.url).await?;
        let result = conn.call(commands).await;
        match &result {
            Err(e) if !e.keeps_connection() => {}
            _ => self.put_back(conn),
        }
        result
    }

    fn put_back(&self, conn: Conn) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
    }
}

// ---------------------------------------------------------------------------
// The connector

/// A prepared `redis_set` step.
pub struct Set {
    spec: SetSpec,
    template: KeyTemplate,
    ttl_ms: Option<u64>,
    pool: Pool,
}

impl Set {
    /// `spec` passed [`SetSpec::check`] when the configuration was parsed.
    pub fn new(spec: SetSpec) -> Set {
        let url = RedisUrl::parse(&spec.url).expect("checked at load");
        let template = KeyTemplate::parse(&spec.key).expect("checked at load");
        let ttl_ms = spec
            .ttl
            .as_deref()
            .map(|t| ttl_ms(t).expect("checked at load"));
        let pool = Pool {
            url,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(spec.pool_size),
        };
        Set {
            spec,
            template,
            ttl_ms,
            pool,
        }
    }

    /// Connects (with its credentials and database) and sends `PING`.
    pub(super) async fn start_check(&self) -> StartCheck {
        let ping = vec![vec![b"PING".to_vec()]];
        match tokio::time::timeout(super::START_CHECK_PATIENCE, self.pool.call(&ping)).await {
            Err(_) => StartCheck::Unreachable(format!("{}: timed out", self.pool.url.addr)),
            Ok(Ok(replies)) => match replies.first() {
                Some(Reply::Error(e)) => {
                    StartCheck::Refused((".url".into(), classify_reply(e).describe()))
                }
                _ => StartCheck::Passed,
            },
            Ok(Err(e)) if e.retryable => {
                StartCheck::Unreachable(format!("{}: {}", self.pool.url.addr, e.describe()))
            }
            Ok(Err(e)) => StartCheck::Refused((".url".into(), e.describe())),
        }
    }

    /// The commands that write `doc` under `key`.
    pub fn commands(&self, doc: &Value, key: &str) -> Vec<Vec<Vec<u8>>> {
        let key = key.as_bytes().to_vec();
        match self.spec.value {
            ValueMode::Json => {
                let value = match &self.spec.pointer {
                    None => Some(doc),
                    Some(p) => pick(doc, p),
                };
                let json = value.map_or_else(|| "null".to_owned(), Value::to_string);
                let mut set = vec![b"SET".to_vec(), key, json.into_bytes()];
                if let Some(ms) = self.ttl_ms {
                    set.push(b"PX".to_vec());
                    set.push(ms.to_string().into_bytes());
                }
                vec![set]
            }
            ValueMode::Hash => {
                let mut hset = vec![b"HSET".to_vec(), key.clone()];
                let mut hdel = vec![b"HDEL".to_vec(), key.clone()];
                for (field, pointer) in &self.spec.fields {
                    match pick(doc, pointer) {
                        Some(v) => {
                            hset.push(field.as_bytes().to_vec());
                            hset.push(as_text(v).into_bytes());
                        }
                        None => hdel.push(field.as_bytes().to_vec()),
                    }
                }
                let mut commands = vec![vec![b"MULTI".to_vec()]];
                if hset.len() > 2 {
                    commands.push(hset);
                }
                if hdel.len() > 2 {
                    commands.push(hdel);
                }
                if let Some(ms) = self.ttl_ms {
                    commands.push(vec![b"PEXPIRE".to_vec(), key, ms.to_string().into_bytes()]);
                }
                commands.push(vec![b"EXEC".to_vec()]);
                commands
            }
        }
    }

    pub(super) async fn write(&self, doc: &Value, attempt: &Attempt, timeout_ms: u64) -> Outcome {
        let key = self
            .template
            .render(&attempt.entity_id.to_string(), &attempt.type_name);
        let commands = self.commands(doc, &key);
        self.send(&commands, key, timeout_ms, "key").await
    }

    /// The compensation: deletes the entity's key (`DEL`), which is
    /// idempotent like the write.
    pub(super) async fn undo(&self, attempt: &Attempt, timeout_ms: u64) -> Outcome {
        let key = self
            .template
            .render(&attempt.entity_id.to_string(), &attempt.type_name);
        let commands = vec![vec![b"DEL".to_vec(), key.as_bytes().to_vec()]];
        self.send(&commands, key, timeout_ms, "deleted").await
    }

    /// Sends `commands` for `key` within `timeout_ms`; the step succeeds
    /// with `{what: key}` when no reply is an error.
    async fn send(
        &self,
        commands: &[Vec<Vec<u8>>],
        key: String,
        timeout_ms: u64,
        what: &str,
    ) -> Outcome {
        let call = self.pool.call(commands);
        let result = match tokio::time::timeout(Duration::from_millis(timeout_ms), call).await {
            Err(_) => Err(RedisError {
                reason: "timed out",
                detail: format!("no answer within {timeout_ms} ms"),
                retryable: true,
            }),
            Ok(Err(e)) => Err(e),
            Ok(Ok(replies)) => first_error(&replies).map_or(Ok(()), Err),
        };
        match result {
            Ok(()) => Outcome::Succeeded {
                output: Some(serde_json::json!({ what: key }).to_string()),
            },
            Err(e) => failure(format!("{CONNECTOR} {key}: {}", e.describe()), e.retryable),
        }
    }
}

impl RedisError {
    pub fn describe(&self) -> String {
        if self.detail.is_empty() {
            self.reason.to_owned()
        } else {
            format!("{}: {}", self.reason, self.detail)
        }
    }
}

/// The first error among the replies, inside `EXEC`'s array too. An
/// `EXECABORT` names the error of the command that was refused, which comes
/// earlier, so that one is reported.
fn first_error(replies: &[Reply]) -> Option<RedisError> {
    for reply in replies {
        match reply {
            Reply::Error(e) => return Some(classify_reply(e)),
            Reply::Array(Some(items)) => {
                if let Some(e) = first_error(items) {
                    return Some(e);
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp_encoding() {
        let mut out = Vec::new();
        encode(&[b"HSET", b"k", b"f", b"a b\r\n"], &mut out);
        assert_eq!(
            out,
            b"*4\r\n$4\r\nHSET\r\n$1\r\nk\r\n$1\r\nf\r\n$5\r\na b\r\n\r\n".to_vec()
        );
        out.clear();
        encode(&[b"SET", b"k", b""], &mut out);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n".to_vec());
    }

    #[test]
    fn resp_decoding() {
        let cases: Vec<(&[u8], Reply)> = vec![
            (b"+OK\r\n", Reply::Status("OK".into())),
            (
                b"-WRONGTYPE Operation against a key\r\n",
                Reply::Error("WRONGTYPE Operation against a key".into()),
            ),
            (b":42\r\n", Reply::Int(42)),
            (b":-1\r\n", Reply::Int(-1)),
            (b"$5\r\nhe\r\no\r\n", Reply::Bulk(Some(b"he\r\no".to_vec()))),
            (b"$0\r\n\r\n", Reply::Bulk(Some(Vec::new()))),
            (b"$-1\r\n", Reply::Bulk(None)),
            (b"*-1\r\n", Reply::Array(None)),
            (b"*0\r\n", Reply::Array(Some(Vec::new()))),
            (
                b"*3\r\n:1\r\n-ERR x\r\n*1\r\n$1\r\na\r\n",
                Reply::Array(Some(vec![
                    Reply::Int(1),
                    Reply::Error("ERR x".into()),
                    Reply::Array(Some(vec![Reply::Bulk(Some(b"a".to_vec()))])),
                ])),
            ),
        ];
        for (bytes, want) in cases {
            let (got, used) = decode(bytes).unwrap().unwrap();
            assert_eq!(got, want);
            assert_eq!(used, bytes.len());
            // Every proper prefix asks for more bytes.
            for cut in 0..bytes.len() {
                assert_eq!(decode(&bytes[..cut]), Ok(None), "{:?}", &bytes[..cut]);
            }
        }
        // Two replies in one buffer: the first, then the rest.
        let (r, used) = decode(b"+QUEUED\r\n:1\r\n").unwrap().unwrap();
        assert_eq!((r, used), (Reply::Status("QUEUED".into()), 9));
        assert!(decode(b"?x\r\n").is_err());
        assert!(decode(b":x\r\n").is_err());
        assert!(decode(b"$1\r\nab\r\n").is_err());
    }

    #[test]
    fn reply_errors_are_classified() {
        let retryable = [
            "LOADING Redis is loading the dataset in memory",
            "BUSY Redis is busy running a script",
            "ERR max number of clients reached",
            "READONLY You can't write against a read only replica.",
            "OOM command not allowed when used memory > 'maxmemory'.",
            "TRYAGAIN Multiple keys request during rehashing of slot",
        ];
        for m in retryable {
            assert!(classify_reply(m).retryable, "{m}");
        }
        let for_good = [
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            "NOAUTH Authentication required.",
            "WRONGPASS invalid username-password pair or user is disabled.",
            "ERR unknown command 'HSET'",
        ];
        for m in for_good {
            assert!(!classify_reply(m).retryable, "{m}");
        }
        assert_eq!(
            classify_reply("WRONGTYPE Operation").describe(),
            "the key holds another type of value: WRONGTYPE Operation"
        );
        assert_eq!(
            classify_reply("ERR max number of clients reached").reason,
            "too many connections"
        );
        let exec = [
            Reply::Status("OK".into()),
            Reply::Status("QUEUED".into()),
            Reply::Array(Some(vec![Reply::Error("WRONGTYPE Operation".into())])),
        ];
        assert_eq!(
            first_error(&exec).map(|e| e.reason),
            Some("the key holds another type of value")
        );
        assert_eq!(first_error(&[Reply::Status("OK".into())]), None);
    }

    #[test]
    fn urls() {
        let u = RedisUrl::parse("redis://127.0.0.1:6380").unwrap();
        assert_eq!(
            u,
            RedisUrl {
                addr: "127.0.0.1:6380".into(),
                user: None,
                password: None,
                db: 0
            }
        );
        let u = RedisUrl::parse("redis://app:p%40ss@cache.local/3").unwrap();
        assert_eq!(u.addr, "cache.local:6379");
        assert_eq!(u.user.as_deref(), Some("app"));
        assert_eq!(u.password.as_deref(), Some("p@ss"));
        assert_eq!(u.db, 3);
        let u = RedisUrl::parse("redis://:secret@[::1]:7000").unwrap();
        assert_eq!(u.addr, "[::1]:7000");
        assert_eq!((u.user, u.password.as_deref()), (None, Some("secret")));
        for (bad, want) in [
            ("http://x", "is not a Redis URL"),
            ("rediss://x", "TLS"),
            ("redis://", "names no host"),
            ("redis://h:port", "is not a port"),
            ("redis://h/zero", "database number"),
            ("redis://h?db=1", "no query"),
        ] {
            let e = RedisUrl::parse(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn key_templates() {
        let t = KeyTemplate::parse("{type}:{id}").unwrap();
        assert_eq!(t.render("0193", "merchant"), "merchant:0193");
        let t = KeyTemplate::parse("m:{id}:{{x}}").unwrap();
        assert_eq!(t.render("7", "t"), "m:7:{x}");
        let t = KeyTemplate::parse("{id}").unwrap();
        assert_eq!(t.render("7", "t"), "7");
        for (bad, want) in [
            ("merchant:{type}", "has no {id}"),
            ("m:{ID}", "unknown placeholder {ID}"),
            ("m:{id", "unclosed"),
            ("m:}{id}", "lone"),
        ] {
            let e = KeyTemplate::parse(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    fn spec(value: ValueMode) -> SetSpec {
        SetSpec {
            url: "redis://127.0.0.1:6379".into(),
            key: "m:{id}".into(),
            value,
            fields: BTreeMap::new(),
            pointer: None,
            ttl: None,
            pool_size: 2,
        }
    }

    fn strings(commands: &[Vec<Vec<u8>>]) -> Vec<Vec<String>> {
        commands
            .iter()
            .map(|c| {
                c.iter()
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn hash_commands_set_what_is_found_and_delete_what_is_not() {
        let mut s = spec(ValueMode::Hash);
        s.fields.insert("name".into(), "/payload/name".into());
        s.fields.insert("score".into(), "/outputs/kyc/score".into());
        s.fields.insert("gone".into(), "/payload/missing".into());
        s.ttl = Some("1m".into());
        assert_eq!(s.check(), Ok(()));
        let set = Set::new(s);
        let doc =
            serde_json::json!({"payload": {"name": "Ada"}, "outputs": {"kyc": {"score": 0.5}}});
        assert_eq!(
            strings(&set.commands(&doc, "m:1")),
            [
                vec!["MULTI"],
                vec!["HSET", "m:1", "name", "Ada", "score", "0.5"],
                vec!["HDEL", "m:1", "gone"],
                vec!["PEXPIRE", "m:1", "60000"],
                vec!["EXEC"],
            ]
        );
    }

    #[test]
    fn json_commands_store_the_document_or_a_pointer() {
        let doc = serde_json::json!({"id": "1", "payload": {"a": [1, 2]}});
        let set = Set::new(spec(ValueMode::Json));
        assert_eq!(
            strings(&set.commands(&doc, "k")),
            [vec!["SET".to_owned(), "k".into(), doc.to_string()]]
        );
        let mut s = spec(ValueMode::Json);
        s.pointer = Some("/payload".into());
        s.ttl = Some("2s".into());
        let set = Set::new(s);
        assert_eq!(
            strings(&set.commands(&doc, "k")),
            [vec!["SET", "k", r#"{"a":[1,2]}"#, "PX", "2000"]]
        );
    }

    #[test]
    fn settings_are_checked() {
        let mut s = spec(ValueMode::Hash);
        assert_eq!(s.check().unwrap_err().0, ".fields");
        s.fields.insert("n".into(), "payload/n".into());
        assert_eq!(s.check().unwrap_err().0, ".fields.n");
        s.fields.insert("n".into(), "/payload/n".into());
        assert_eq!(s.check(), Ok(()));
        s.key = "static".into();
        assert_eq!(s.check().unwrap_err().0, ".key");
        let mut j = spec(ValueMode::Json);
        j.pointer = Some("/nope".into());
        assert_eq!(j.check().unwrap_err().0, ".pointer");
        j.pointer = None;
        j.ttl = Some("0s".into());
        assert_eq!(j.check().unwrap_err().0, ".ttl");
        j.ttl = None;
        j.pool_size = 0;
        assert_eq!(j.check().unwrap_err().0, ".pool_size");
    }
}
