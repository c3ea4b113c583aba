//! `[blobs]`: large payloads in a blob store (see docs/blobs.md).
//!
//! A payload larger than `inline_max` is written to the blob store, synced,
//! before its entity is committed; the store's payload column then holds
//! the blob's reference (`sha256:HEX:LEN:KEY`, which no JSON text begins
//! with) instead of the JSON. Every reader goes through [`Payloads`]: an
//! attempt, a worker's task, `/data` and an email read the blob and check
//! it against the reference. A blob that is missing or changed is a step
//! error that no retry can mend, counted in `ripen_blob_errors_total` and
//! logged as a warning; a store that cannot be reached is an error the
//! step's retry policy handles.
//!
//! Blobs are keyed by their entity's id. The sweep ([`sweep`]) deletes the
//! blobs older than `orphan_grace` whose entity keeps no payload: the
//! orphans of a crash between a blob's write and its commit, of a refused
//! or replayed submission, and the blobs of pruned payloads and deleted
//! entities.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use prometheus::{IntCounter, IntCounterVec, Registry};
use ripen_blobs::{BlobError, BlobRef, BlobStore};
use ripen_store::{Attempt, EntityId, Store};
use serde::Deserialize;

/// What begins a payload column that holds a blob's reference.
pub const REF_PREFIX: &str = "sha256:";

pub const DEFAULT_INLINE_MAX: usize = 64 * 1024;
pub const DEFAULT_BODY_MAX: usize = 64 * 1024 * 1024;
/// The largest intake body a blob-backed node accepts.
pub const BODY_MAX_MAX: usize = 1024 * 1024 * 1024;
pub const DEFAULT_ORPHAN_GRACE_MS: u64 = 3_600_000;
/// An orphan is a blob whose commit may still be on its way: the grace
/// must be far longer than any submission takes.
pub const ORPHAN_GRACE_MIN_MS: u64 = 60_000;
pub const DEFAULT_SWEEP_INTERVAL_MS: u64 = 600_000;
/// Blobs a sweep looks at per store query.
const SWEEP_PAGE: usize = 1_000;
/// Blobs one sweep looks at, at most.
const SWEEP_MAX: usize = 1_000_000;

/// `[blobs]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobsConfig {
    /// `file:///absolute/dir` or `s3://bucket[/prefix]`.
    pub url: String,
    /// S3 only: the endpoint of an S3-compatible server.
    pub endpoint: Option<String>,
    /// S3 only: the region.
    pub region: Option<String>,
    /// Payloads larger than this many bytes go to the blob store.
    pub inline_max: usize,
    /// The largest submission body (the server's `body_limit_bytes` still
    /// bounds every other request).
    pub body_max: usize,
    pub orphan_grace_ms: u64,
    pub sweep_interval_ms: u64,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBlobs {
    dir: Option<String>,
    url: Option<String>,
    endpoint: Option<String>,
    region: Option<String>,
    inline_max: Option<usize>,
    body_max: Option<usize>,
    orphan_grace: Option<String>,
    sweep_interval: Option<String>,
}

impl RawBlobs {
    /// The configuration; a relative `dir` resolves against `base`. An
    /// error names its key.
    pub(crate) fn parse(self, base: &Path) -> Result<BlobsConfig, (String, String)> {
        let key = |k: &str| format!("blobs.{k}");
        let url = match (self.dir, self.url) {
            (Some(dir), None) => {
                if dir.is_empty() {
                    return Err((key("dir"), "must name a directory".into()));
                }
                let path = base.join(dir);
                let path = std::path::absolute(&path).unwrap_or(path);
                format!("file://{}", path.display())
            }
            (None, Some(url)) => {
                if !(url.starts_with("file:///") || url.starts_with("s3://")) {
                    return Err((
                        key("url"),
                        format!("{url:?} is neither file:///absolute/dir nor s3://bucket/prefix"),
                    ));
                }
                if url.starts_with("s3://") && !ripen_blobs::s3_supported() {
                    return Err((key("url"), ripen_blobs::NO_S3_SUPPORT.into()));
                }
                url
            }
            (None, None) => {
                return Err((
                    "blobs".into(),
                    "names no store: set dir = \"blobs\" or url = \"s3://bucket/prefix\"".into(),
                ))
            }
            (Some(_), Some(_)) => {
                return Err(("blobs".into(), "set dir or url, not both".into()));
            }
        };
        if !url.starts_with("s3://") {
            for (k, v) in [("endpoint", &self.endpoint), ("region", &self.region)] {
                if v.is_some() {
                    return Err((key(k), "only an s3:// store takes it".into()));
                }
            }
        }
        let inline_max = self.inline_max.unwrap_or(DEFAULT_INLINE_MAX);
        let body_max = self.body_max.unwrap_or(DEFAULT_BODY_MAX);
        if body_max == 0 || body_max > BODY_MAX_MAX {
            return Err((
                key("body_max"),
                format!("must be between 1 and {BODY_MAX_MAX}"),
            ));
        }
        if inline_max >= body_max {
            return Err((
                key("inline_max"),
                format!("must be less than blobs.body_max ({body_max})"),
            ));
        }
        let orphan_grace_ms = crate::config::duration_ms_max(
            self.orphan_grace.as_deref(),
            DEFAULT_ORPHAN_GRACE_MS,
            30 * 86_400,
        )
        .map_err(|p| (key("orphan_grace"), p))?;
        if orphan_grace_ms < ORPHAN_GRACE_MIN_MS {
            return Err((
                key("orphan_grace"),
                "must be at least one minute: a blob younger than it may belong to a submission still being committed".into(),
            ));
        }
        let sweep_interval_ms = crate::config::duration_ms_max(
            self.sweep_interval.as_deref(),
            DEFAULT_SWEEP_INTERVAL_MS,
            86_400,
        )
        .map_err(|p| (key("sweep_interval"), p))?;
        if sweep_interval_ms < 1_000 {
            return Err((key("sweep_interval"), "must be at least one second".into()));
        }
        Ok(BlobsConfig {
            url,
            endpoint: self.endpoint,
            region: self.region,
            inline_max,
            body_max,
            orphan_grace_ms,
            sweep_interval_ms,
        })
    }
}

/// Whether a stored payload column holds a blob's reference.
pub fn is_blob(stored: &str) -> bool {
    stored.starts_with(REF_PREFIX)
}

/// Where every payload is written and read: in the store's column, or in
/// the blob store for those larger than `inline_max`.
#[derive(Clone)]
pub struct Payloads {
    blobs: Option<Arc<dyn BlobStore>>,
    inline_max: usize,
    errors: Option<IntCounterVec>,
}

impl std::fmt::Debug for Payloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payloads")
            .field("blobs", &self.blobs)
            .field("inline_max", &self.inline_max)
            .finish()
    }
}

/// Why a stored payload cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadReadError {
    /// The blob is missing or changed: nothing will mend it.
    #[error("the payload cannot be read: {0}")]
    Lost(BlobError),
    /// The blob store cannot be reached, or this node has none.
    #[error("the payload cannot be read now: {0}")]
    Unavailable(String),
}

impl PayloadReadError {
    pub fn is_transient(&self) -> bool {
        matches!(self, PayloadReadError::Unavailable(_))
    }
}

impl Default for Payloads {
    fn default() -> Payloads {
        Payloads::inline()
    }
}

impl Payloads {
    /// Every payload inline: a node with no `[blobs]`.
    pub fn inline() -> Payloads {
        Payloads {
            blobs: None,
            inline_max: usize::MAX,
            errors: None,
        }
    }

    /// The payloads of `config`, with `ripen_blob_errors_total` in
    /// `registry`.
    pub fn open(config: &BlobsConfig, registry: &Registry) -> anyhow::Result<Payloads> {
        let store = open_store(config).map_err(|e| anyhow::anyhow!("blobs: {e}"))?;
        Ok(Payloads::with_store(
            store,
            config.inline_max,
            Some(registry),
        )?)
    }

    /// Payloads above `inline_max` bytes in `store`.
    pub fn with_store(
        store: Arc<dyn BlobStore>,
        inline_max: usize,
        registry: Option<&Registry>,
    ) -> prometheus::Result<Payloads> {
        let errors = match registry {
            Some(registry) => Some(crate::metrics::labelled_counter(
                registry,
                "ripen_blob_errors_total",
                "Payload blobs that could not be read: missing, corrupt (checksum or length differ), unavailable (the store did not answer)",
                "kind",
                &["missing", "corrupt", "unavailable"],
            )?),
            None => None,
        };
        Ok(Payloads {
            blobs: Some(store),
            inline_max,
            errors,
        })
    }

    /// The blob store, if this node has one.
    pub fn store(&self) -> Option<&Arc<dyn BlobStore>> {
        self.blobs.as_ref()
    }

    /// What the store's payload column keeps for the submitted `body` of
    /// entity `id`: the JSON itself, or the reference of the blob it was
    /// written to (and synced) here.
    pub async fn keep(&self, id: EntityId, body: Bytes) -> Result<String, BlobError> {
        match &self.blobs {
            Some(blobs) if body.len() > self.inline_max => {
                let blob = blobs.put(&id.to_string(), body).await?;
                Ok(blob.to_string())
            }
            // Intake checked it is UTF-8.
            _ => Ok(String::from_utf8_lossy(&body).into_owned()),
        }
    }

    /// Deletes the blob a refused or replayed submission wrote, if any;
    /// the sweep deletes what this leaves.
    pub async fn discard(&self, stored: &str, id: EntityId) {
        if let (Some(blobs), true) = (&self.blobs, is_blob(stored)) {
            if let Err(e) = blobs.delete(&id.to_string()).await {
                tracing::debug!(entity_id = %id, error = %e, "delete the blob of a submission that created nothing; the sweep will");
            }
        }
    }

    /// The JSON of a stored payload column.
    pub async fn read<'a>(
        &self,
        id: EntityId,
        stored: &'a str,
    ) -> Result<Cow<'a, str>, PayloadReadError> {
        if !is_blob(stored) {
            return Ok(Cow::Borrowed(stored));
        }
        let Some(blobs) = &self.blobs else {
            return Err(PayloadReadError::Unavailable(
                "the payload is in a blob store, and this node has no [blobs] configured".into(),
            ));
        };
        let result = match stored.parse::<BlobRef>() {
            Ok(blob) => blobs.get(&blob).await.and_then(|bytes| {
                String::from_utf8(bytes.into()).map_err(|_| BlobError::Corrupt {
                    key: blob.key.clone(),
                    why: "it is not UTF-8".into(),
                })
            }),
            Err(e) => Err(e),
        };
        result.map(Cow::Owned).map_err(|e| {
            let kind = match &e {
                BlobError::Missing { .. } => "missing",
                BlobError::Unavailable(_) => "unavailable",
                _ => "corrupt",
            };
            if let Some(errors) = &self.errors {
                errors.with_label_values(&[kind]).inc();
            }
            if e.is_transient() {
                tracing::info!(entity_id = %id, error = %e, "the blob store did not answer a payload read");
                PayloadReadError::Unavailable(e.to_string())
            } else {
                tracing::warn!(entity_id = %id, error = %e, "a payload blob is lost: the entity's steps cannot run; restore the blob or submit the entity again");
                PayloadReadError::Lost(e)
            }
        })
    }

    /// `attempt` with its payload read from the blob store when it is
    /// there.
    pub async fn attempt<'a>(
        &self,
        attempt: &'a Attempt,
    ) -> Result<Cow<'a, Attempt>, PayloadReadError> {
        if !is_blob(&attempt.payload) {
            return Ok(Cow::Borrowed(attempt));
        }
        let payload = self
            .read(attempt.entity_id, &attempt.payload)
            .await?
            .into_owned();
        Ok(Cow::Owned(Attempt {
            payload,
            ..attempt.clone()
        }))
    }
}

fn open_store(config: &BlobsConfig) -> Result<Arc<dyn BlobStore>, String> {
    ripen_blobs::open(&ripen_blobs::Options {
        url: config.url.clone(),
        endpoint: config.endpoint.clone(),
        region: config.region.clone(),
    })
}

/// `ripen_blobs_swept_total`: blobs the sweep deleted.
#[derive(Clone)]
pub struct SweepMetrics(IntCounter);

impl SweepMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<SweepMetrics> {
        let c = IntCounter::new(
            "ripen_blobs_swept_total",
            "Blobs the sweep deleted: orphans, and the blobs of pruned payloads and deleted entities",
        )?;
        registry.register(Box::new(c.clone()))?;
        Ok(SweepMetrics(c))
    }
}

/// One sweep: deletes every blob older than `grace` whose entity keeps no
/// payload in `store`. Keys that are not entity ids are left alone.
/// Returns how many blobs it deleted.
pub async fn sweep(
    blobs: &dyn BlobStore,
    store: &dyn Store,
    grace: Duration,
) -> Result<u64, String> {
    let before = SystemTime::now()
        .checked_sub(grace)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let keys = blobs
        .older_than(before, SWEEP_MAX)
        .await
        .map_err(|e| format!("list the blobs: {e}"))?;
    let mut deleted = 0;
    for page in keys.chunks(SWEEP_PAGE) {
        let ids: Vec<EntityId> = page.iter().filter_map(|k| k.parse().ok()).collect();
        let kept = store
            .payloads_kept(ids.clone())
            .await
            .map_err(|e| format!("ask the store which payloads it keeps: {e}"))?;
        let kept: std::collections::HashSet<EntityId> = kept.into_iter().collect();
        for id in ids.into_iter().filter(|id| !kept.contains(id)) {
            match blobs.delete(&id.to_string()).await {
                Ok(()) => deleted += 1,
                Err(e) => return Err(format!("delete the blob {id}: {e}")),
            }
        }
        tokio::task::yield_now().await;
    }
    Ok(deleted)
}

/// The sweep, every `sweep_interval`, for as long as the node runs.
pub async fn run_sweep(
    blobs: Arc<dyn BlobStore>,
    store: Arc<dyn Store>,
    config: BlobsConfig,
    metrics: SweepMetrics,
) {
    let grace = Duration::from_millis(config.orphan_grace_ms);
    loop {
        tokio::time::sleep(Duration::from_millis(config.sweep_interval_ms)).await;
        match sweep(blobs.as_ref(), store.as_ref(), grace).await {
            Ok(n) => {
                metrics.0.inc_by(n);
                if n > 0 {
                    tracing::info!(deleted = n, "swept blobs no payload names");
                }
            }
            Err(e) => tracing::warn!(error = %e, "sweep the blob store; trying again later"),
        }
    }
}

#[cfg(test)]
mod tests;
