//! The clock, read in one place.
//!
//! Decisions that compare times across nodes (lease expiry above all) must use
//! one clock. With a shared database that clock is the database's: the engine
//! measures the offset between the local clock and the store's now and then
//! ([`track_store_clock`]), and [`now_us`] applies it. With an embedded store
//! the offset stays zero.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ripen_core::UnixMicros;
use ripen_store::Store;

/// Store clock minus local clock, in microseconds.
static STORE_OFFSET_US: AtomicI64 = AtomicI64::new(0);

/// How often the offset to the store's clock is measured again.
const CLOCK_REFRESH: Duration = Duration::from_secs(10);

/// The local wall clock.
pub fn local_now_us() -> UnixMicros {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Now, by the store's clock.
pub fn now_us() -> UnixMicros {
    local_now_us() + STORE_OFFSET_US.load(Ordering::Relaxed)
}

/// Measures the offset once: the store's clock against the midpoint of the
/// round trip.
pub async fn measure_store_clock(store: &dyn Store) -> Result<i64, ripen_store::StoreError> {
    let before = local_now_us();
    let theirs = store.clock_us().await?;
    let after = local_now_us();
    let offset = theirs - (before + (after - before) / 2);
    STORE_OFFSET_US.store(offset, Ordering::Relaxed);
    Ok(offset)
}

/// Keeps the offset fresh for as long as the store lives.
pub async fn track_store_clock(store: Arc<dyn Store>) {
    loop {
        tokio::time::sleep(CLOCK_REFRESH).await;
        if let Err(e) = measure_store_clock(store.as_ref()).await {
            tracing::debug!(error = %e, "measuring the store clock failed; keeping the last offset");
        }
    }
}

/// RFC 3339 with microseconds, in UTC: `2026-11-26T05:39:23.123456Z`.
pub fn rfc3339(us: UnixMicros) -> String {
    let t = UNIX_EPOCH + Duration::from_micros(us.max(0) as u64);
    humantime::format_rfc3339_micros(t).to_string()
}
