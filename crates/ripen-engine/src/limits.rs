//! `[limits]`: what one node accepts at once and how long it waits for a
//! client, so that slow, many or costly requests cost their senders and
//! never the node. docs/config.md lists every key with its default and
//! docs/security.md says what each one protects.

use std::time::Duration;

use serde::Deserialize;

/// The deepest nesting of arrays and objects a payload may have: what
/// serde_json accepts when it builds a value, so that every stored payload
/// can be parsed again by anyone who reads it.
pub const JSON_DEPTH_MAX: usize = 127;

pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_CONNECTIONS_MAX: usize = 1_024;
pub const DEFAULT_INTAKE_IN_FLIGHT_MAX: usize = 512;
pub const DEFAULT_STREAMS_MAX: usize = 1_000;
pub const DEFAULT_WRITE_QUEUE_MAX: usize = 4_096;
pub const DEFAULT_VALIDATION_THREADS: usize = 2;
pub const DEFAULT_VALIDATION_QUEUE_MAX: usize = 64;
pub const DEFAULT_VALIDATION_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_JSON_OBJECT_KEYS_MAX: usize = 10_000;
pub const DEFAULT_JSON_KEYS_TOTAL_MAX: usize = 100_000;
pub const DEFAULT_JSON_STRING_BYTES_MAX: usize = 1024 * 1024;
pub const DEFAULT_JSON_ARRAY_ITEMS_MAX: usize = 100_000;

/// The limits of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// A request head must arrive whole within this, or the connection is
    /// closed.
    pub header_timeout: Duration,
    /// A request body must arrive whole within this, or the request is
    /// answered 408.
    pub body_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after
    /// this.
    pub idle_timeout: Duration,
    /// Open connections; one more is answered 503 and closed.
    pub connections_max: usize,
    /// Submissions in flight at once; one more is answered 503.
    pub intake_in_flight_max: usize,
    /// Open event streams (`/v1/entities/{id}/events?follow` and
    /// `/v1/events`); one more is answered 503.
    pub streams_max: usize,
    /// Submissions waiting for the embedded store's writer; one more is
    /// answered 503.
    pub write_queue_max: usize,
    /// Threads that validate costly payloads against their schemas.
    pub validation_threads: usize,
    /// Validations waiting for a free validation thread; one more is
    /// answered 503.
    pub validation_queue_max: usize,
    /// The longest one validation may run before its request is refused.
    pub validation_timeout: Duration,
    /// The shape every JSON body must keep within.
    pub json: JsonLimits,
}

/// The shape of a JSON body: every limit is checked while the body is
/// read, before anything is built from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonLimits {
    /// Nesting of arrays and objects, at most [`JSON_DEPTH_MAX`].
    pub depth_max: usize,
    /// Keys of one object.
    pub object_keys_max: usize,
    /// Keys of all the objects of a body together.
    pub keys_total_max: usize,
    /// Bytes of one string (a value or a key), as decoded.
    pub string_bytes_max: usize,
    /// Items of one array.
    pub array_items_max: usize,
}

impl Default for JsonLimits {
    fn default() -> JsonLimits {
        JsonLimits {
            depth_max: JSON_DEPTH_MAX,
            object_keys_max: DEFAULT_JSON_OBJECT_KEYS_MAX,
            keys_total_max: DEFAULT_JSON_KEYS_TOTAL_MAX,
            string_bytes_max: DEFAULT_JSON_STRING_BYTES_MAX,
            array_items_max: DEFAULT_JSON_ARRAY_ITEMS_MAX,
        }
    }
}

/// Which JSON limit a body breached: its config key names it in answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonLimit {
    Depth,
    ObjectKeys,
    KeysTotal,
    StringBytes,
    ArrayItems,
}

impl JsonLimit {
    /// The key under `[limits]` that sets it.
    pub fn key(self) -> &'static str {
        match self {
            JsonLimit::Depth => "json_depth_max",
            JsonLimit::ObjectKeys => "json_object_keys_max",
            JsonLimit::KeysTotal => "json_keys_total_max",
            JsonLimit::StringBytes => "json_string_bytes_max",
            JsonLimit::ArrayItems => "json_array_items_max",
        }
    }

    /// What is counted, for messages.
    pub fn what(self) -> &'static str {
        match self {
            JsonLimit::Depth => "levels of nesting",
            JsonLimit::ObjectKeys => "keys in one object",
            JsonLimit::KeysTotal => "keys in all",
            JsonLimit::StringBytes => "bytes in one string",
            JsonLimit::ArrayItems => "items in one array",
        }
    }

    /// The value of this limit in `limits`.
    pub fn max(self, limits: &JsonLimits) -> usize {
        match self {
            JsonLimit::Depth => limits.depth_max,
            JsonLimit::ObjectKeys => limits.object_keys_max,
            JsonLimit::KeysTotal => limits.keys_total_max,
            JsonLimit::StringBytes => limits.string_bytes_max,
            JsonLimit::ArrayItems => limits.array_items_max,
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            connections_max: DEFAULT_CONNECTIONS_MAX,
            intake_in_flight_max: DEFAULT_INTAKE_IN_FLIGHT_MAX,
            streams_max: DEFAULT_STREAMS_MAX,
            write_queue_max: DEFAULT_WRITE_QUEUE_MAX,
            validation_threads: DEFAULT_VALIDATION_THREADS,
            validation_queue_max: DEFAULT_VALIDATION_QUEUE_MAX,
            validation_timeout: DEFAULT_VALIDATION_TIMEOUT,
            json: JsonLimits::default(),
        }
    }
}

/// `[limits]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    header_timeout: Option<String>,
    body_timeout: Option<String>,
    idle_timeout: Option<String>,
    connections_max: Option<i64>,
    intake_in_flight_max: Option<i64>,
    streams_max: Option<i64>,
    write_queue_max: Option<i64>,
    validation_threads: Option<i64>,
    validation_queue_max: Option<i64>,
    validation_timeout: Option<String>,
    json_depth_max: Option<i64>,
    json_object_keys_max: Option<i64>,
    json_keys_total_max: Option<i64>,
    json_string_bytes_max: Option<i64>,
    json_array_items_max: Option<i64>,
}

/// The longest timeout a configuration may set.
const TIMEOUT_MAX: Duration = Duration::from_secs(3_600);
/// The largest count a configuration may set.
const COUNT_MAX: i64 = 1 << 32;
/// The most validation threads.
const VALIDATION_THREADS_MAX: i64 = 256;

impl RawLimits {
    /// Checks every key; an error is `(key under [limits], problem)`.
    pub(crate) fn parse(self) -> Result<Limits, (String, String)> {
        let d = Limits::default();
        let key = |k: &str| format!("limits.{k}");
        let timeout = |k: &str, v: Option<String>, default: Duration| match v {
            None => Ok(default),
            Some(v) => parse_timeout(&v).map_err(|p| (key(k), p)),
        };
        let count = |k: &str, v: Option<i64>, default: usize, min: i64, max: i64| match v {
            None => Ok(default),
            Some(n) if (min..=max).contains(&n) => Ok(n as usize),
            Some(n) => Err((key(k), format!("{n} is not between {min} and {max}"))),
        };
        let depth = JSON_DEPTH_MAX as i64;
        Ok(Limits {
            header_timeout: timeout("header_timeout", self.header_timeout, d.header_timeout)?,
            body_timeout: timeout("body_timeout", self.body_timeout, d.body_timeout)?,
            idle_timeout: timeout("idle_timeout", self.idle_timeout, d.idle_timeout)?,
            connections_max: count(
                "connections_max",
                self.connections_max,
                d.connections_max,
                1,
                COUNT_MAX,
            )?,
            intake_in_flight_max: count(
                "intake_in_flight_max",
                self.intake_in_flight_max,
                d.intake_in_flight_max,
                1,
                COUNT_MAX,
            )?,
            streams_max: count("streams_max", self.streams_max, d.streams_max, 0, COUNT_MAX)?,
            write_queue_max: count(
                "write_queue_max",
                self.write_queue_max,
                d.write_queue_max,
                1,
                COUNT_MAX,
            )?,
            validation_threads: count(
                "validation_threads",
                self.validation_threads,
                d.validation_threads,
                1,
                VALIDATION_THREADS_MAX,
            )?,
            validation_queue_max: count(
                "validation_queue_max",
                self.validation_queue_max,
                d.validation_queue_max,
                0,
                COUNT_MAX,
            )?,
            validation_timeout: timeout(
                "validation_timeout",
                self.validation_timeout,
                d.validation_timeout,
            )?,
            json: JsonLimits {
                depth_max: count(
                    "json_depth_max",
                    self.json_depth_max,
                    JSON_DEPTH_MAX,
                    1,
                    depth,
                )?,
                object_keys_max: count(
                    "json_object_keys_max",
                    self.json_object_keys_max,
                    d.json.object_keys_max,
                    1,
                    COUNT_MAX,
                )?,
                keys_total_max: count(
                    "json_keys_total_max",
                    self.json_keys_total_max,
                    d.json.keys_total_max,
                    1,
                    COUNT_MAX,
                )?,
                string_bytes_max: count(
                    "json_string_bytes_max",
                    self.json_string_bytes_max,
                    d.json.string_bytes_max,
                    1,
                    COUNT_MAX,
                )?,
                array_items_max: count(
                    "json_array_items_max",
                    self.json_array_items_max,
                    d.json.array_items_max,
                    1,
                    COUNT_MAX,
                )?,
            },
        })
    }
}

/// A timeout: a humantime duration from 1 ms to one hour.
fn parse_timeout(v: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(v)
        .map_err(|e| format!("{v:?} is not a duration such as \"500ms\" or \"10s\": {e}"))?;
    if d < Duration::from_millis(1) {
        return Err(format!("{v:?} is shorter than 1ms"));
    }
    if d > TIMEOUT_MAX {
        return Err(format!("{v:?} is longer than one hour"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Limits, (String, String)> {
        toml::from_str::<RawLimits>(text)
            .map_err(|e| (String::new(), e.to_string()))?
            .parse()
    }

    #[test]
    fn defaults() {
        assert_eq!(parse("").unwrap(), Limits::default());
        let d = Limits::default();
        assert_eq!(d.header_timeout, Duration::from_secs(10));
        assert_eq!(d.body_timeout, Duration::from_secs(30));
        assert_eq!(d.idle_timeout, Duration::from_secs(60));
        assert_eq!(d.connections_max, 1_024);
        assert_eq!(d.validation_threads, 2);
        assert_eq!(d.json.depth_max, 127);
        assert_eq!(d.json.string_bytes_max, 1024 * 1024);
    }

    #[test]
    fn keys_are_read() {
        let l = parse(
            "header_timeout = \"1s\"\nbody_timeout = \"250ms\"\nconnections_max = 3\njson_object_keys_max = 5\nvalidation_threads = 4\n",
        )
        .unwrap();
        assert_eq!(l.header_timeout, Duration::from_secs(1));
        assert_eq!(l.body_timeout, Duration::from_millis(250));
        assert_eq!(l.connections_max, 3);
        assert_eq!(l.json.object_keys_max, 5);
        assert_eq!(l.validation_threads, 4);
    }

    #[test]
    fn errors_name_the_key() {
        for (text, key) in [
            ("header_timeout = \"soon\"", "limits.header_timeout"),
            ("idle_timeout = \"2h\"", "limits.idle_timeout"),
            ("body_timeout = \"0s\"", "limits.body_timeout"),
            ("connections_max = 0", "limits.connections_max"),
            ("json_depth_max = 128", "limits.json_depth_max"),
            ("validation_threads = 0", "limits.validation_threads"),
            ("json_string_bytes_max = -1", "limits.json_string_bytes_max"),
        ] {
            let (k, problem) = parse(text).unwrap_err();
            assert_eq!(k, key, "{text}: {problem}");
        }
    }

    #[test]
    fn every_json_limit_names_its_key() {
        let l = JsonLimits::default();
        for (limit, key, max) in [
            (JsonLimit::Depth, "json_depth_max", 127),
            (JsonLimit::ObjectKeys, "json_object_keys_max", 10_000),
            (JsonLimit::KeysTotal, "json_keys_total_max", 100_000),
            (JsonLimit::StringBytes, "json_string_bytes_max", 1 << 20),
            (JsonLimit::ArrayItems, "json_array_items_max", 100_000),
        ] {
            assert_eq!(limit.key(), key);
            assert_eq!(limit.max(&l), max);
        }
    }
}
