//! Fault injection, shaped like Istio's `VirtualService` `fault` (delay and abort).
//!
//! Each fault applies to a percentage of requests, drawn independently: a request may be
//! delayed, aborted, both, or neither. When both are drawn the request is delayed first and
//! then aborted, without reaching the upstream (Envoy's fault filter does the same).
//! Percentages are in `[0, 100]` with fractions allowed (`0.1` = one request in a thousand);
//! 0 (or NaN) never fires, 100 or more always does.
use std::time::Duration;

use http::StatusCode;

/// Access-log response flag of a request delayed by fault injection (Envoy's).
pub const DELAY_INJECTED_FLAG: &str = "DI";
/// Access-log response flag of a request aborted by fault injection (Envoy's).
pub const ABORT_INJECTED_FLAG: &str = "FI";

/// The faults of one route. Plain data; decisions draw from the caller's rng.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultInjection {
    pub delay: Option<DelayFault>,
    pub abort: Option<AbortFault>,
}

/// Delay `percent` of requests by a fixed time before forwarding them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DelayFault {
    pub fixed: Duration,
    pub percent: f64,
}

/// Answer `percent` of requests with `status` instead of forwarding them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AbortFault {
    pub status: StatusCode,
    pub percent: f64,
}

/// What to do to one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultDecision {
    /// Wait this long before going on (forwarding, or answering with `abort`).
    pub delay: Option<Duration>,
    /// Answer with this status instead of forwarding.
    pub abort: Option<StatusCode>,
}

impl FaultInjection {
    /// Draws this request's faults: one draw for the delay, one for the abort.
    pub fn decide(&self, rng: &mut fastrand::Rng) -> FaultDecision {
        FaultDecision {
            delay: self.delay.filter(|d| hit(d.percent, rng)).map(|d| d.fixed),
            abort: self.abort.filter(|a| hit(a.percent, rng)).map(|a| a.status),
        }
    }
}

impl FaultDecision {
    /// No fault for this request.
    pub fn is_none(&self) -> bool {
        self.delay.is_none() && self.abort.is_none()
    }

    /// The access-log response flags this decision earns (Envoy's `DI`, `FI`), in that order.
    pub fn response_flags(&self) -> impl Iterator<Item = &'static str> {
        [
            self.delay.map(|_| DELAY_INJECTED_FLAG),
            self.abort.map(|_| ABORT_INJECTED_FLAG),
        ]
        .into_iter()
        .flatten()
    }
}

/// Whether a draw lands within `percent` of 100. `rng.f64()` is in `[0, 1)`, so 0 never hits
/// and 100 always does; NaN compares false and never hits.
fn hit(percent: f64, rng: &mut fastrand::Rng) -> bool {
    rng.f64() * 100.0 < percent
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRAWS: u32 = 10_000;

    fn faults(delay_pct: f64, abort_pct: f64) -> FaultInjection {
        FaultInjection {
            delay: Some(DelayFault {
                fixed: Duration::from_millis(500),
                percent: delay_pct,
            }),
            abort: Some(AbortFault {
                status: StatusCode::SERVICE_UNAVAILABLE,
                percent: abort_pct,
            }),
        }
    }

    /// (delayed, aborted, both) out of DRAWS seeded draws.
    fn count(f: &FaultInjection, seed: u64) -> (u32, u32, u32) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let (mut delayed, mut aborted, mut both) = (0, 0, 0);
        for _ in 0..DRAWS {
            let d = f.decide(&mut rng);
            delayed += u32::from(d.delay.is_some());
            aborted += u32::from(d.abort.is_some());
            both += u32::from(d.delay.is_some() && d.abort.is_some());
        }
        (delayed, aborted, both)
    }

    #[test]
    fn percentages_hold_over_many_draws() {
        for seed in [1, 2, 3] {
            let (delayed, aborted, both) = count(&faults(30.0, 10.0), seed);
            // Binomial standard deviations are ~46 and ~30; allow about 4 of them.
            assert!((2800..=3200).contains(&delayed), "delayed {delayed}");
            assert!((880..=1120).contains(&aborted), "aborted {aborted}");
            // Independent draws: both ≈ 30% × 10% = 3%.
            assert!((220..=380).contains(&both), "both {both}");
        }
    }

    #[test]
    fn fractional_percent() {
        let (delayed, ..) = count(&faults(0.5, 0.0), 11);
        assert!((25..=80).contains(&delayed), "delayed {delayed}");
    }

    #[test]
    fn zero_never_hundred_always() {
        assert_eq!(count(&faults(0.0, 100.0), 5), (0, DRAWS, 0));
        assert_eq!(count(&faults(100.0, 0.0), 6), (DRAWS, 0, 0));
        assert_eq!(count(&faults(100.0, 100.0), 7), (DRAWS, DRAWS, DRAWS));
        assert_eq!(count(&faults(f64::NAN, 250.0), 8), (0, DRAWS, 0));
    }

    #[test]
    fn no_faults_configured() {
        let mut rng = fastrand::Rng::with_seed(1);
        let d = FaultInjection::default().decide(&mut rng);
        assert!(d.is_none());
        assert_eq!(d.response_flags().count(), 0);
    }

    #[test]
    fn decision_carries_configured_values_and_flags() {
        let mut rng = fastrand::Rng::with_seed(1);
        let d = faults(100.0, 100.0).decide(&mut rng);
        assert_eq!(d.delay, Some(Duration::from_millis(500)));
        assert_eq!(d.abort, Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(d.response_flags().collect::<Vec<_>>(), ["DI", "FI"]);
    }
}
