//! The clock, read in one place.
//!
//! The engine reads time only through a [`Clock`] it was given: the
//! scheduler, intake and the facade all hold the same one. Decisions that
//! compare times across nodes (lease expiry above all) must use one clock.
//! With a shared database that clock is the database's: [`StoreClock`]
//! measures the offset between the local clock and the store's now and then,
//! and applies it. With an embedded store the offset stays zero. Tests use a
//! [`ManualClock`], which moves only when told.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ripen_core::UnixMicros;
use ripen_store::{Store, StoreError};

/// How often the offset to the store's clock is measured again.
const CLOCK_REFRESH: Duration = Duration::from_secs(10);

/// Where the engine reads the time.
pub trait Clock: Send + Sync + 'static {
    /// Now, in Unix microseconds, by the clock leases expire by.
    fn now_us(&self) -> UnixMicros;
}

/// The local wall clock.
pub fn local_now_us() -> UnixMicros {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The local wall clock corrected by the measured offset to the store's clock.
#[derive(Debug, Default)]
pub struct StoreClock {
    /// Store clock minus local clock.
    offset_us: AtomicI64,
}

impl StoreClock {
    pub fn new() -> StoreClock {
        StoreClock::default()
    }

    /// Measures the offset once: the store's clock against the midpoint of
    /// the round trip. Returns the offset.
    pub async fn measure(&self, store: &dyn Store) -> Result<i64, StoreError> {
        let before = local_now_us();
        let theirs = store.clock_us().await?;
        let after = local_now_us();
        let offset = theirs - (before + (after - before) / 2);
        self.offset_us.store(offset, Ordering::Relaxed);
        Ok(offset)
    }

    /// Keeps the offset fresh for as long as the task runs.
    pub async fn track(self: Arc<Self>, store: Arc<dyn Store>) {
        loop {
            tokio::time::sleep(CLOCK_REFRESH).await;
            if let Err(e) = self.measure(store.as_ref()).await {
                tracing::debug!(error = %e, "measuring the store clock failed; keeping the last offset");
            }
        }
    }
}

impl Clock for StoreClock {
    fn now_us(&self) -> UnixMicros {
        local_now_us() + self.offset_us.load(Ordering::Relaxed)
    }
}

/// A clock that moves only when told, for tests.
#[derive(Debug)]
pub struct ManualClock {
    now_us: AtomicI64,
}

impl ManualClock {
    pub fn new(start_us: UnixMicros) -> ManualClock {
        ManualClock {
            now_us: AtomicI64::new(start_us),
        }
    }

    pub fn set(&self, now_us: UnixMicros) {
        self.now_us.store(now_us, Ordering::SeqCst);
    }

    pub fn advance(&self, by: Duration) {
        self.now_us
            .fetch_add(by.as_micros() as i64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_us(&self) -> UnixMicros {
        self.now_us.load(Ordering::SeqCst)
    }
}

/// RFC 3339 with microseconds, in UTC: `2026-11-26T05:39:23.123456Z`.
pub fn rfc3339(us: UnixMicros) -> String {
    let t = UNIX_EPOCH + Duration::from_micros(us.max(0) as u64);
    humantime::format_rfc3339_micros(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(1_000);
        assert_eq!(clock.now_us(), 1_000);
        clock.advance(Duration::from_millis(2));
        assert_eq!(clock.now_us(), 3_000);
        clock.set(10);
        assert_eq!(clock.now_us(), 10);
    }

    #[test]
    fn the_store_clock_starts_at_the_local_clock() {
        let before = local_now_us();
        let now = StoreClock::new().now_us();
        assert!(
            now >= before && now - before < 1_000_000,
            "{now} vs {before}"
        );
    }
}
