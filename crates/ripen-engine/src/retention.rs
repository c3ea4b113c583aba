//! `[retention]`: how long what Ripen stored is kept once it is not needed,
//! and the pruner that removes it (see docs/retention.md).
//!
//! The pruner is a background task of its own, off the hot path: every
//! `interval` it asks the store for passes of at most `batch` rows each
//! ([`ripen_store::Store::prune`]) until a pass finds nothing more that is
//! due. Which rows are due is the store's SQL on the times given here.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounterVec, Registry};
use ripen_core::UnixMicros;
use ripen_store::{Prune, Pruned, Store};
use serde::Deserialize;

use crate::time::Clock;

/// The least a configuration may keep idempotency keys: a client that
/// retries a submission within a day is always answered by the entity its
/// first try created. `allow_short_periods = true` lifts it, for tests and
/// benchmarks.
pub const IDEMPOTENCY_KEYS_MIN_MS: u64 = 24 * 3_600_000;
/// The longest period a retention key may name: ten years.
const PERIOD_MAX_S: u64 = 10 * 366 * 86_400;

/// `[retention]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Raw payloads of settled entities are pruned this long after the
    /// entity last changed.
    pub payload_ms: u64,
    /// Idempotency keys are pruned this long after they were stored (at
    /// least [`IDEMPOTENCY_KEYS_MIN_MS`] unless `allow_short_periods`); a
    /// pruned key is free for reuse.
    pub idempotency_keys_ms: u64,
    /// Settled entities are deleted entirely this long after they last
    /// changed (at least `idempotency_keys`); `None`, the default, keeps
    /// them.
    pub entities_ms: Option<u64>,
    /// How often the pruner runs.
    pub interval_ms: u64,
    /// Rows per pass (one transaction).
    pub batch: u32,
    /// `allow_short_periods = true`: `idempotency_keys` may be shorter than
    /// a day (tests and benchmarks). A client retrying later than that
    /// creates a second entity, so the pruner warns when it starts.
    pub allow_short_periods: bool,
}

pub const DEFAULT_PAYLOAD_MS: u64 = 7 * 86_400_000;
pub const DEFAULT_INTERVAL_MS: u64 = 60_000;
pub const DEFAULT_BATCH: u32 = 500;

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            payload_ms: DEFAULT_PAYLOAD_MS,
            idempotency_keys_ms: IDEMPOTENCY_KEYS_MIN_MS,
            entities_ms: None,
            interval_ms: DEFAULT_INTERVAL_MS,
            batch: DEFAULT_BATCH,
            allow_short_periods: false,
        }
    }
}

impl Retention {
    /// Whether idempotency keys are kept less than a day, which only
    /// `allow_short_periods` permits: Guarantee 2 (a retry within a day
    /// finds its entity) no longer holds.
    pub fn keys_shorter_than_a_day(&self) -> bool {
        self.idempotency_keys_ms < IDEMPOTENCY_KEYS_MIN_MS
    }

    /// The pass due at `now_us`: each bound is `now_us` less its period.
    pub fn pass(&self, now_us: UnixMicros, dry_run: bool) -> Prune {
        let before = |ms: u64| now_us.saturating_sub((ms as i64).saturating_mul(1_000));
        Prune {
            payload_before_us: Some(before(self.payload_ms)),
            keys_before_us: Some(before(self.idempotency_keys_ms)),
            entities_before_us: self.entities_ms.map(before),
            limit: self.batch,
            dry_run,
        }
    }
}

/// `ripen_pruned_total{what}`: what the pruner removed.
#[derive(Clone)]
pub struct PruneMetrics(IntCounterVec);

impl PruneMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<PruneMetrics> {
        crate::metrics::labelled_counter(
            registry,
            "ripen_pruned_total",
            "What the retention pruner removed: raw payloads, idempotency keys, entities",
            "what",
            &["payload", "idempotency_key", "entity"],
        )
        .map(PruneMetrics)
    }

    fn add(&self, p: &Pruned) {
        let c = &self.0;
        c.with_label_values(&["payload"]).inc_by(p.payloads);
        c.with_label_values(&["idempotency_key"]).inc_by(p.keys);
        c.with_label_values(&["entity"]).inc_by(p.entities);
    }
}

/// The pruner: every `interval`, passes until one removes less than a
/// batch. Between passes it yields, so that other commands reach the store.
pub async fn run(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    retention: Retention,
    metrics: PruneMetrics,
) {
    if retention.keys_shorter_than_a_day() {
        tracing::warn!(
            idempotency_keys = %humantime::format_duration(Duration::from_millis(
                retention.idempotency_keys_ms
            )),
            "retention.allow_short_periods: idempotency keys may expire before 24h, so a client \
             that retries later than retention.idempotency_keys creates a second entity; \
             meant for tests and benchmarks, not for production"
        );
    }
    let interval = Duration::from_millis(retention.interval_ms);
    loop {
        tokio::time::sleep(interval).await;
        loop {
            let pass = retention.pass(clock.now_us(), false);
            match store.prune(pass, clock.now_us()).await {
                Ok(p) => {
                    metrics.add(&p);
                    if p.total() > 0 {
                        tracing::debug!(
                            payloads = p.payloads,
                            keys = p.keys,
                            entities = p.entities,
                            "pruned"
                        );
                    }
                    let full = [p.payloads, p.keys, p.entities]
                        .iter()
                        .any(|&n| n >= u64::from(retention.batch));
                    if !full {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "prune what retention no longer keeps");
                    break;
                }
            }
        }
    }
}

/// `[retention]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRetention {
    payload: Option<String>,
    idempotency_keys: Option<String>,
    entities: Option<String>,
    interval: Option<String>,
    batch: Option<u32>,
    allow_short_periods: Option<bool>,
}

impl RawRetention {
    /// Validates the table; an error is `(key, problem)`.
    pub fn parse(self) -> Result<Retention, (String, String)> {
        let d = Retention::default();
        let key = |k: &str| format!("retention.{k}");
        let payload_ms = period(self.payload.as_deref(), d.payload_ms, PERIOD_MAX_S)
            .map_err(|p| (key("payload"), p))?;
        let idempotency_keys_ms = period(
            self.idempotency_keys.as_deref(),
            d.idempotency_keys_ms,
            PERIOD_MAX_S,
        )
        .map_err(|p| (key("idempotency_keys"), p))?;
        let allow_short_periods = self.allow_short_periods.unwrap_or(false);
        if idempotency_keys_ms < IDEMPOTENCY_KEYS_MIN_MS && !allow_short_periods {
            return Err((
                key("idempotency_keys"),
                format!(
                    "{:?} is shorter than the least of 24h: a client retrying within a day must find its key (retention.allow_short_periods = true lifts this, for tests and benchmarks only)",
                    self.idempotency_keys.unwrap_or_default()
                ),
            ));
        }
        if idempotency_keys_ms == 0 {
            return Err((key("idempotency_keys"), "must be more than zero".into()));
        }
        // A key always names an entity that exists: entities go no sooner
        // than their keys (a key is stored when its entity is created).
        let entities_ms = match self.entities.as_deref() {
            None => None,
            Some(v) => {
                let ms = period(Some(v), 0, PERIOD_MAX_S).map_err(|p| (key("entities"), p))?;
                if ms < idempotency_keys_ms {
                    return Err((
                        key("entities"),
                        format!("{v:?} is shorter than retention.idempotency_keys: an entity is kept at least as long as its key"),
                    ));
                }
                Some(ms)
            }
        };
        let interval_ms = period(self.interval.as_deref(), d.interval_ms, 86_400)
            .map_err(|p| (key("interval"), p))?;
        if interval_ms == 0 {
            return Err((key("interval"), "must be more than zero".into()));
        }
        let batch = self.batch.unwrap_or(d.batch);
        if !(1..=10_000).contains(&batch) {
            return Err((key("batch"), "must be between 1 and 10000".into()));
        }
        if payload_ms == 0 {
            return Err((key("payload"), "must be more than zero".into()));
        }
        Ok(Retention {
            payload_ms,
            idempotency_keys_ms,
            entities_ms,
            interval_ms,
            batch,
            allow_short_periods,
        })
    }
}

/// A duration of at most `max_s` seconds, in milliseconds.
fn period(value: Option<&str>, default_ms: u64, max_s: u64) -> Result<u64, String> {
    let Some(v) = value else {
        return Ok(default_ms);
    };
    let d: Duration = humantime::parse_duration(v)
        .map_err(|e| format!("{v:?} is not a duration such as \"7d\" or \"24h\": {e}"))?;
    if d > Duration::from_secs(max_s) {
        return Err(format!("{v:?} is longer than {max_s} seconds"));
    }
    Ok(d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Retention, (String, String)> {
        toml::from_str::<RawRetention>(text).expect("toml").parse()
    }

    #[test]
    fn the_defaults_keep_payloads_a_week_and_keys_a_day() {
        let r = parse("").expect("defaults");
        assert_eq!(r, Retention::default());
        assert_eq!(r.payload_ms, 7 * 86_400_000);
        assert_eq!(r.idempotency_keys_ms, 86_400_000);
    }

    #[test]
    fn keys_are_kept_at_least_a_day() {
        let (key, problem) = parse("idempotency_keys = \"23h\"").expect_err("too short");
        assert_eq!(key, "retention.idempotency_keys");
        assert!(problem.contains("24h"), "{problem}");
        assert_eq!(
            parse("idempotency_keys = \"48h\"")
                .expect("two days")
                .idempotency_keys_ms,
            2 * 86_400_000
        );
    }

    #[test]
    fn short_key_periods_are_refused_without_the_flag() {
        let text = "idempotency_keys = \"20s\"\nentities = \"30s\"";
        let (key, problem) = parse(text).expect_err("too short");
        assert_eq!(key, "retention.idempotency_keys");
        assert!(
            problem.starts_with("\"20s\" is shorter than the least of 24h"),
            "{problem}"
        );
        let (key, _) = parse(&format!("{text}\nallow_short_periods = false")).expect_err("off");
        assert_eq!(key, "retention.idempotency_keys");
    }

    #[test]
    fn short_key_periods_are_accepted_with_the_flag() {
        let r = parse(
            "payload = \"10s\"\nidempotency_keys = \"20s\"\nentities = \"30s\"\nallow_short_periods = true",
        )
        .expect("short periods allowed");
        assert_eq!(
            (r.payload_ms, r.idempotency_keys_ms, r.entities_ms),
            (10_000, 20_000, Some(30_000))
        );
        assert!(r.allow_short_periods && r.keys_shorter_than_a_day());
        assert!(!parse("").expect("defaults").keys_shorter_than_a_day());
        // The other bounds hold still: entities no sooner than their keys,
        // no zero key period, nothing past ten years.
        let (key, problem) =
            parse("idempotency_keys = \"20s\"\nentities = \"10s\"\nallow_short_periods = true")
                .expect_err("entities below the keys");
        assert_eq!(key, "retention.entities");
        assert!(problem.contains("idempotency_keys"), "{problem}");
        assert_eq!(
            parse("idempotency_keys = \"0s\"\nallow_short_periods = true")
                .expect_err("zero")
                .0,
            "retention.idempotency_keys"
        );
        assert_eq!(
            parse("idempotency_keys = \"11years\"\nallow_short_periods = true")
                .expect_err("too long")
                .0,
            "retention.idempotency_keys"
        );
    }

    #[test]
    fn entities_are_kept_at_least_as_long_as_keys() {
        assert_eq!(parse("").expect("defaults").entities_ms, None);
        let (key, problem) = parse("entities = \"12h\"").expect_err("below the keys");
        assert_eq!(key, "retention.entities");
        assert!(problem.contains("idempotency_keys"), "{problem}");
        let r = parse("entities = \"90d\"").expect("90 days");
        assert_eq!(r.entities_ms, Some(90 * 86_400_000));
        assert_eq!(
            r.pass(100 * 86_400_000_000, false).entities_before_us,
            Some(10 * 86_400_000_000)
        );
    }

    #[test]
    fn payloads_may_be_short_but_not_zero() {
        let r = parse("payload = \"2s\"\ninterval = \"200ms\"\nbatch = 3").expect("short");
        assert_eq!((r.payload_ms, r.interval_ms, r.batch), (2_000, 200, 3));
        assert_eq!(
            parse("payload = \"0s\"").expect_err("zero").0,
            "retention.payload"
        );
        assert_eq!(parse("batch = 0").expect_err("zero").0, "retention.batch");
        assert_eq!(
            parse("interval = \"soon\"").expect_err("bad").0,
            "retention.interval"
        );
    }
}
