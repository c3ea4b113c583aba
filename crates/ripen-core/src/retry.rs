//! Backoff computation: a pure function of the policy, the attempt number and
//! a jitter sample supplied by the caller.

use crate::pipeline::RetryPolicy;

/// The longest `Retry-After` Ripen honours, so that a downstream cannot park
/// a step for longer than an hour.
pub const RETRY_AFTER_MAX_MS: u64 = 3_600_000;

/// The delay before the next attempt, after `attempts` attempts have failed.
///
/// Exponential backoff with full jitter: a uniform draw in
/// `[0, min(max_backoff, initial_backoff * 2^(attempts-1))]`, where `jitter`
/// is the draw in `[0, 1)`. A `Retry-After` from the downstream is a lower
/// bound on the delay (capped at [`RETRY_AFTER_MAX_MS`]).
pub fn backoff_ms(
    policy: &RetryPolicy,
    attempts: u32,
    jitter: f64,
    retry_after_ms: Option<u64>,
) -> u64 {
    let exponent = attempts.saturating_sub(1).min(62);
    let ceiling = policy
        .initial_backoff_ms
        .saturating_mul(1u64 << exponent)
        .min(policy.max_backoff_ms);
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let drawn = (ceiling as f64 * jitter) as u64;
    let floor = retry_after_ms.unwrap_or(0).min(RETRY_AFTER_MAX_MS);
    drawn.min(ceiling).max(floor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 10,
            initial_backoff_ms: 100,
            max_backoff_ms: 1_000,
        }
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let p = policy();
        assert_eq!(backoff_ms(&p, 1, 0.999_999, None), 99);
        assert_eq!(backoff_ms(&p, 2, 0.999_999, None), 199);
        assert_eq!(backoff_ms(&p, 4, 0.999_999, None), 799);
        assert_eq!(backoff_ms(&p, 5, 0.999_999, None), 999);
        assert_eq!(backoff_ms(&p, 60, 0.999_999, None), 999);
        assert_eq!(backoff_ms(&p, u32::MAX, 0.5, None), 500);
    }

    #[test]
    fn full_jitter_can_be_zero() {
        assert_eq!(backoff_ms(&policy(), 3, 0.0, None), 0);
    }

    #[test]
    fn retry_after_is_a_floor_with_a_cap() {
        let p = policy();
        assert_eq!(backoff_ms(&p, 1, 0.0, Some(5_000)), 5_000);
        assert_eq!(backoff_ms(&p, 1, 0.0, Some(u64::MAX)), RETRY_AFTER_MAX_MS);
        assert_eq!(backoff_ms(&p, 1, 0.9, Some(1)), 90);
    }

    #[test]
    fn hostile_jitter_is_clamped() {
        let p = policy();
        assert_eq!(backoff_ms(&p, 1, f64::NAN, None), 0);
        assert_eq!(backoff_ms(&p, 1, 7.0, None), 100);
        assert_eq!(backoff_ms(&p, 1, -1.0, None), 0);
    }
}
