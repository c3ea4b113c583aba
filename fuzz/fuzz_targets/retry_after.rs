//! `Retry-After` from a step's answer, as delay-seconds or an HTTP-date:
//! never a panic, and seconds read as seconds.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use ripen_engine::executor::http::retry_after_ms;

fuzz_target!(|data: &[u8]| {
    // The first eight bytes are the clock, the rest the header's value.
    let (clock, value) = data.split_at(data.len().min(8));
    let mut secs = [0u8; 8];
    secs[..clock.len()].copy_from_slice(clock);
    // Any time a clock may show: up to the year 9999.
    let now = UNIX_EPOCH + Duration::from_secs(u64::from_le_bytes(secs) % 253_402_300_800);
    let Ok(value) = std::str::from_utf8(value) else {
        return;
    };
    let ms = retry_after_ms(value, now);
    if let Ok(seconds) = value.trim().parse::<u64>() {
        assert_eq!(ms, Some(seconds.saturating_mul(1_000)));
    }
    if let Ok(at) = httpdate::parse_http_date(value.trim()) {
        let expected = at.duration_since(now).map_or(0, |d| d.as_millis() as u64);
        assert_eq!(ms, Some(expected));
    }
});
