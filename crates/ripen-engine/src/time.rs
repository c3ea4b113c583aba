//! The wall clock, read in one place.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ripen_core::UnixMicros;

pub fn now_us() -> UnixMicros {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// RFC 3339 with microseconds, in UTC: `2026-11-26T05:39:23.123456Z`.
pub fn rfc3339(us: UnixMicros) -> String {
    let t = UNIX_EPOCH + Duration::from_micros(us.max(0) as u64);
    humantime::format_rfc3339_micros(t).to_string()
}
