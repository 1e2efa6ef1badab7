//! Exponential back-off with full jitter between retry attempts.
//!
//! The ceiling for retry `n` (0 = the first retry) is `base * 2^n`, capped at `max`; the delay
//! is drawn uniformly from `[0, ceiling]` ("full jitter", as in the AWS architecture note
//! "Exponential Backoff and Jitter", and Envoy's retry back-off).
//!
//! Why full jitter rather than "ceiling plus a little noise": the retries worth worrying about
//! are correlated ones. When an endpoint hiccups, every request in flight to it fails within
//! the same millisecond; a fixed or lightly jittered schedule sends all their retries back
//! in synchronized waves, each as large as the original burst. Spreading each retry over the
//! whole interval flattens the waves into a near-uniform trickle, which is what an
//! overloaded or recovering upstream needs. The cost, a shorter mean delay (ceiling / 2), is
//! harmless: the retry budget, not the delay, is what bounds the extra load.
use std::time::Duration;

/// How long to wait before a retry. Plain data: `Copy`, no interior state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    /// Envoy's default retry back-off: 25 ms base, capped at 10 × base.
    pub const DEFAULT: Backoff = Backoff {
        base: Duration::from_millis(25),
        max: Duration::from_millis(250),
    };

    /// A back-off whose ceilings start at `base` and double up to `max`. A `max` below `base`
    /// caps every ceiling at `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff { base, max }
    }

    /// The delay before retry number `retry` (0 = the first retry): uniform in
    /// `[0, self.ceiling(retry)]`.
    pub fn delay(&self, retry: u32, rng: &mut fastrand::Rng) -> Duration {
        let ceiling = self.ceiling(retry);
        // Nanosecond resolution; a ceiling beyond u64 nanoseconds (584 years) is clamped.
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.u64(0..=nanos))
    }

    /// The upper bound of [`Backoff::delay`] for retry number `retry`: `base * 2^retry`,
    /// saturating, capped at `max`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry);
        self.base.saturating_mul(factor).min(self.max)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Backoff::new(10 * MS, 100 * MS);
        let ceilings: Vec<_> = (0..6).map(|n| b.ceiling(n)).collect();
        assert_eq!(
            ceilings,
            [10 * MS, 20 * MS, 40 * MS, 80 * MS, 100 * MS, 100 * MS]
        );
        // Huge retry counts saturate instead of overflowing.
        assert_eq!(b.ceiling(u32::MAX), 100 * MS);
    }

    #[test]
    fn max_below_base_caps_everything() {
        let b = Backoff::new(100 * MS, 10 * MS);
        assert_eq!(b.ceiling(0), 10 * MS);
        assert_eq!(b.ceiling(5), 10 * MS);
    }

    #[test]
    fn delays_stay_within_ceiling() {
        let b = Backoff::new(10 * MS, 1000 * MS);
        let mut rng = fastrand::Rng::with_seed(42);
        for retry in 0..12 {
            for _ in 0..1000 {
                let d = b.delay(retry, &mut rng);
                assert!(d <= b.ceiling(retry), "retry {retry}: {d:?}");
            }
        }
    }

    #[test]
    fn delays_are_jittered_across_the_whole_interval() {
        let b = Backoff::new(10 * MS, 10_000 * MS);
        let mut rng = fastrand::Rng::with_seed(7);
        let retry = 4; // ceiling 160 ms
        let ceiling = b.ceiling(retry);
        let samples: Vec<Duration> = (0..10_000).map(|_| b.delay(retry, &mut rng)).collect();
        let min = *samples.iter().min().unwrap();
        let max = *samples.iter().max().unwrap();
        let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
        // Full jitter: reaches both ends of [0, ceiling], mean near the middle.
        assert!(min < ceiling / 50, "min {min:?}");
        assert!(max > ceiling * 49 / 50, "max {max:?}");
        assert!(
            mean > ceiling * 45 / 100 && mean < ceiling * 55 / 100,
            "mean {mean:?}"
        );
    }

    #[test]
    fn mean_delay_grows_with_retries() {
        let b = Backoff::new(10 * MS, 10_000 * MS);
        let mut rng = fastrand::Rng::with_seed(3);
        let mean = |retry, rng: &mut fastrand::Rng| {
            (0..2000).map(|_| b.delay(retry, rng)).sum::<Duration>() / 2000
        };
        let means: Vec<Duration> = (0..6).map(|r| mean(r, &mut rng)).collect();
        for pair in means.windows(2) {
            assert!(pair[1] > pair[0], "{means:?}");
        }
    }

    #[test]
    fn zero_base_never_waits() {
        let b = Backoff::new(Duration::ZERO, 100 * MS);
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(b.delay(3, &mut rng), Duration::ZERO);
    }

    #[test]
    fn same_seed_same_delays() {
        let b = Backoff::default();
        let mut r1 = fastrand::Rng::with_seed(9);
        let mut r2 = fastrand::Rng::with_seed(9);
        for retry in 0..5 {
            assert_eq!(b.delay(retry, &mut r1), b.delay(retry, &mut r2));
        }
    }
}
