//! Exponential backoff as a value: it answers "how long until the next
//! attempt" and never sleeps, so it is tested without a clock.

use std::time::Duration;

/// A small, seedable random source (SplitMix64). Seeded per registration so
/// that many registrations failing at once spread their retries, and seeded
/// explicitly in tests so that runs repeat.
#[derive(Debug, Clone)]
pub struct JitterRng {
    state: u64,
}

impl JitterRng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A duration uniformly in `[0, max]`.
    pub fn up_to(&mut self, max: Duration) -> Duration {
        let nanos = max.as_nanos().min(u64::MAX as u128) as u64;
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.next_u64() % (nanos + 1))
    }
}

/// Exponential backoff with additive jitter and a strict cap.
///
/// Attempt `n` (from 0) waits `min(cap, base * 2^n) + U[0, jitter]`, then the
/// sum is clamped to `cap`: the cap holds with the jitter included.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    jitter: Duration,
    attempt: u32,
    rng: JitterRng,
}

impl Backoff {
    /// A backoff with the given base, cap and jitter, drawing from `rng`.
    pub fn new(base: Duration, cap: Duration, jitter: Duration, rng: JitterRng) -> Self {
        Self {
            base,
            cap,
            jitter,
            attempt: 0,
            rng,
        }
    }

    /// The wait before the next attempt; each call counts one more attempt.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .base
            .checked_mul(1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(self.cap)
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        (exp + self.rng.up_to(self.jitter)).min(self.cap)
    }

    /// A fixed delay plus jitter (for `drain`'s `reconnect_after_ms`),
    /// clamped to the cap (a server's `u32::MAX` ms is 49 days); it does not
    /// count as an attempt.
    pub fn with_jitter(&mut self, delay: Duration) -> Duration {
        (delay.min(self.cap) + self.rng.up_to(self.jitter)).min(self.cap)
    }

    /// Attempts made since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Back to the first attempt (after a stream stayed healthy).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff(seed: u64) -> Backoff {
        Backoff::new(
            Duration::from_millis(500),
            Duration::from_secs(60),
            Duration::from_millis(500),
            JitterRng::new(seed),
        )
    }

    #[test]
    fn grows_exponentially_within_jitter() {
        let mut b = backoff(1);
        for n in 0..7u32 {
            let d = b.next_delay();
            let exp = Duration::from_millis(500) * 2u32.pow(n);
            assert!(d >= exp, "attempt {n}: {d:?} < {exp:?}");
            assert!(d <= exp + Duration::from_millis(500), "attempt {n}: {d:?}");
        }
    }

    #[test]
    fn a_fixed_delay_is_clamped_to_the_cap_too() {
        let mut b = backoff(3);
        assert_eq!(
            b.with_jitter(Duration::from_millis(u32::MAX as u64)),
            Duration::from_secs(60)
        );
        assert!(b.with_jitter(Duration::from_secs(1)) <= Duration::from_millis(1500));
        assert_eq!(b.attempt(), 0);
    }

    #[test]
    fn cap_is_strict_with_jitter() {
        for seed in 0..200 {
            let mut b = backoff(seed);
            for _ in 0..100 {
                assert!(b.next_delay() <= Duration::from_secs(60));
            }
        }
        // Deep into the sequence the delay sits at the cap, never above.
        let mut b = backoff(7);
        for _ in 0..40 {
            b.next_delay();
        }
        assert_eq!(b.next_delay(), Duration::from_secs(60));
    }

    #[test]
    fn jitter_covers_its_range() {
        let mut rng = JitterRng::new(42);
        let max = Duration::from_millis(500);
        let draws: Vec<_> = (0..2000).map(|_| rng.up_to(max)).collect();
        assert!(draws.iter().all(|d| *d <= max));
        assert!(draws.iter().any(|d| *d < Duration::from_millis(50)));
        assert!(draws.iter().any(|d| *d > Duration::from_millis(450)));
    }

    #[test]
    fn same_seed_same_sequence_and_reset_restarts() {
        let mut a = backoff(9);
        let mut b = backoff(9);
        let sa: Vec<_> = (0..10).map(|_| a.next_delay()).collect();
        let sb: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert_eq!(sa, sb);
        a.reset();
        assert_eq!(a.attempt(), 0);
        assert!(a.next_delay() <= Duration::from_secs(1));
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(
            Duration::from_secs(3600),
            Duration::from_secs(7200),
            Duration::ZERO,
            JitterRng::new(0),
        );
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(7200));
        }
    }
}
