//! When to try again: one pure function of the policy, the attempt count, the time and the
//! receiver's Retry-After. Being pure and fed from persisted counts and timestamps, it gives the
//! same schedule before and after a restart, and tests check it without any clock at all.

use crate::clock::Timestamp;
use crate::subscription::RetryPolicy;

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Try again at this time.
    RetryAt(Timestamp),
    /// Give up: too many attempts.
    AttemptsExhausted,
    /// Give up: the next attempt would start after the time to live.
    TtlExpired,
}

/// The delay before attempt `attempts + 1`, after `attempts` failures: `initial * multiplier^(n-1)`
/// capped at `delay_ms_max`, reduced by up to `jitter_percent` using `jitter_seed` (so the same
/// delivery always gets the same jitter), and never less than the receiver's Retry-After, which
/// itself is capped by `retry_after_ms_max`.
pub(crate) fn delay_ms(
    policy: &RetryPolicy,
    attempts: u32,
    retry_after_ms: Option<u64>,
    retry_after_ms_max: u64,
    jitter_seed: u64,
) -> u64 {
    let exponent = attempts.saturating_sub(1).min(64) as i32;
    let raw = policy.initial_delay_ms as f64 * policy.multiplier.max(1.0).powi(exponent);
    let capped = if raw.is_finite() {
        raw.min(policy.delay_ms_max as f64) as u64
    } else {
        policy.delay_ms_max
    };
    let jitter = u64::from(policy.jitter_percent.min(100));
    // A fixed mix of the seed (splitmix64's finaliser) picks the fraction.
    let mut z = jitter_seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // cut = capped * (jitter / 100) * (fraction in 0..=1000 / 1000), in u128 so it cannot overflow.
    let cut = (u128::from(capped) * u128::from(jitter) * u128::from(z % 1001) / 100_000) as u64;
    let backoff = capped - cut.min(capped);
    let asked = retry_after_ms
        .map(|r| r.min(retry_after_ms_max))
        .unwrap_or(0);
    backoff.max(asked)
}

/// The decision after `attempts` failed attempts of an event published at `published_at`.
pub(crate) fn next_after_failure(
    policy: &RetryPolicy,
    attempts: u32,
    published_at: Timestamp,
    now: Timestamp,
    retry_after_ms: Option<u64>,
    retry_after_ms_max: u64,
    jitter_seed: u64,
) -> Next {
    if attempts >= policy.attempts_max {
        return Next::AttemptsExhausted;
    }
    let at = now.plus_ms(delay_ms(
        policy,
        attempts,
        retry_after_ms,
        retry_after_ms_max,
        jitter_seed,
    ));
    if at.ms_since(published_at) > policy.ttl_ms {
        return Next::TtlExpired;
    }
    Next::RetryAt(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter_percent: u8) -> RetryPolicy {
        RetryPolicy {
            initial_delay_ms: 1000,
            multiplier: 2.0,
            delay_ms_max: 60_000,
            attempts_max: 5,
            ttl_ms: 100_000,
            jitter_percent,
        }
    }

    #[test]
    fn delays_grow_exponentially_up_to_the_cap() {
        let p = policy(0);
        let got: Vec<u64> = (1..=8).map(|n| delay_ms(&p, n, None, 300_000, 7)).collect();
        assert_eq!(
            got,
            [1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000]
        );
        assert_eq!(
            delay_ms(&p, 10_000, None, 300_000, 7),
            60_000,
            "huge attempt counts do not overflow"
        );
    }

    #[test]
    fn jitter_only_shortens_and_is_repeatable() {
        let p = policy(50);
        for seed in 0..200u64 {
            let d = delay_ms(&p, 3, None, 300_000, seed);
            assert!((2000..=4000).contains(&d), "seed {seed}: {d}");
            assert_eq!(d, delay_ms(&p, 3, None, 300_000, seed));
        }
        let distinct: std::collections::HashSet<u64> = (0..200u64)
            .map(|s| delay_ms(&p, 3, None, 300_000, s))
            .collect();
        assert!(
            distinct.len() > 50,
            "jitter spreads retries: {}",
            distinct.len()
        );
    }

    #[test]
    fn retry_after_wins_when_longer_but_is_capped() {
        let p = policy(0);
        assert_eq!(delay_ms(&p, 1, Some(30_000), 300_000, 1), 30_000);
        assert_eq!(delay_ms(&p, 1, Some(10), 300_000, 1), 1000);
        assert_eq!(delay_ms(&p, 1, Some(10_000_000), 300_000, 1), 300_000);
    }

    #[test]
    fn attempts_and_ttl_end_the_schedule() {
        let p = policy(0);
        let t0 = Timestamp(1_000_000);
        assert_eq!(
            next_after_failure(&p, 1, t0, t0, None, 0, 0),
            Next::RetryAt(Timestamp(1_001_000))
        );
        assert_eq!(
            next_after_failure(&p, 5, t0, t0, None, 0, 0),
            Next::AttemptsExhausted
        );
        assert_eq!(
            next_after_failure(&p, 4, t0, t0.plus_ms(95_000), None, 0, 0),
            Next::TtlExpired
        );
    }

    #[test]
    fn the_schedule_depends_only_on_persisted_facts() {
        // Same attempt count, publish time and failure time: same answer, before or after a restart.
        let p = policy(30);
        let t0 = Timestamp(5_000);
        let a = next_after_failure(&p, 2, t0, Timestamp(9_000), None, 0, 42);
        let b = next_after_failure(&p, 2, t0, Timestamp(9_000), None, 0, 42);
        assert_eq!(a, b);
    }
}
