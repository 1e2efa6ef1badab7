//! Outlier detection: take an endpoint out of load balancing after consecutive failures, and
//! put it back after a while. Passive health checking, shaped like Istio's `outlierDetection`
//! (Envoy's consecutive-5xx and, split out, consecutive local-origin failures).
//!
//! - An endpoint is ejected after `consecutive_5xx` 5xx responses in a row, or after
//!   `consecutive_connect_failures` failed connection attempts in a row (counted separately, as
//!   Envoy's `split_external_local_origin_errors`: an endpoint that is not listening at all
//!   and one that answers with errors are different failures). A threshold of 0 disables that
//!   kind of ejection, as in Istio.
//! - A success resets both counts. A 5xx resets the connect-failure count (the connection
//!   worked); a connect failure leaves the 5xx count alone (no response was seen).
//! - Ejection lasts `base_ejection × n`, capped at `max_ejection` (Envoy's default: 300 s, or
//!   `base_ejection` if longer), where `n` counts recent ejections: an endpoint that keeps
//!   failing as soon as it returns stays out longer each time. `n` is forgiven one step for
//!   each `base_ejection` the endpoint then spends in the pool without being ejected (Envoy
//!   decrements its multiplier the same way), so an old incident does not lengthen the next.
//! - An ejected endpoint returns by itself at `ejected_until`; no timer is needed, the check
//!   [`OutlierState::is_ejected`] compares with `now`. Outcomes reported while it is ejected
//!   (requests that were already in flight) are ignored, so they neither extend the ejection
//!   nor count against the endpoint on its return.
//! - `max_ejection_percent` caps the share of a pool that may be ejected, as current Envoy
//!   does: an ejection is allowed when, counting it, at most `max_ejection_percent` of the
//!   pool would be ejected, and one endpoint may always be ejected (so with the default 10% a
//!   pool of three can still shed its one bad endpoint). An endpoint refused by the cap keeps
//!   its count, and its next failure tries again. The caller counts the pool's ejected
//!   endpoints; concurrent ejections of different endpoints may overshoot the cap by the
//!   number of racing tasks, until the next one returns.
use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use http::StatusCode;

use super::lock;

/// Outlier detection settings of one destination. Plain data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierDetector {
    /// 5xx responses in a row that eject an endpoint; 0 = never.
    pub consecutive_5xx: u32,
    /// Failed connection attempts in a row that eject an endpoint; 0 = never.
    pub consecutive_connect_failures: u32,
    /// How long the first ejection lasts; later ones last a multiple of it.
    pub base_ejection: Duration,
    /// Upper bound of an ejection (raised to `base_ejection` if below it).
    pub max_ejection: Duration,
    /// Largest share of a pool (0–100) that may be ejected; one endpoint always may.
    pub max_ejection_percent: u8,
}

impl Default for OutlierDetector {
    /// Istio's and Envoy's defaults.
    fn default() -> Self {
        OutlierDetector {
            consecutive_5xx: 5,
            consecutive_connect_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

/// How a request to an endpoint ended, as outlier detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response below 500 (a 4xx is the client's fault, not the endpoint's).
    Success,
    /// A 5xx response from the endpoint.
    Http5xx,
    /// No connection: refused, reset during the handshake, or timed out.
    ConnectFailure,
}

impl Outcome {
    /// The outcome of a request that got a response with `status`.
    pub fn from_status(status: StatusCode) -> Self {
        if status.is_server_error() {
            Outcome::Http5xx
        } else {
            Outcome::Success
        }
    }
}

/// Why an endpoint was ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EjectionReason {
    Consecutive5xx,
    ConsecutiveConnectFailures,
}

/// An ejection that [`OutlierDetector::record`] just decided, for the caller to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    pub reason: EjectionReason,
    /// How long it lasts.
    pub duration: Duration,
    /// When the endpoint returns to the pool.
    pub until: Instant,
    /// The multiplier `duration` was computed with (recent ejections, this one included).
    pub times_ejected: u32,
}

/// Outlier state of one endpoint, shared by every request task that uses it.
#[derive(Debug, Default)]
pub struct OutlierState {
    /// False = certainly not ejected, so checking healthy endpoints on every pick costs one
    /// atomic load. Set (and cleared) only under `inner`'s lock.
    maybe_ejected: AtomicBool,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    consecutive_5xx: u32,
    consecutive_connect_failures: u32,
    times_ejected: u32,
    /// End of the current or most recent ejection.
    ejected_until: Option<Instant>,
}

impl OutlierDetector {
    /// Records how a request to the endpoint of `state` ended, and ejects the endpoint if that
    /// makes a threshold and the pool's cap allows it. `currently_ejected` is how many of the
    /// pool's `pool_size` endpoints are ejected now (this one is not: outcomes of an ejected
    /// endpoint are ignored).
    pub fn record(
        &self,
        state: &OutlierState,
        outcome: Outcome,
        now: Instant,
        currently_ejected: usize,
        pool_size: usize,
    ) -> Option<Ejection> {
        let mut inner = lock(&state.inner);
        if inner.ejected_until.is_some_and(|until| now < until) {
            return None;
        }
        let reason = match outcome {
            Outcome::Success => {
                inner.consecutive_5xx = 0;
                inner.consecutive_connect_failures = 0;
                return None;
            }
            Outcome::Http5xx => {
                inner.consecutive_connect_failures = 0;
                inner.consecutive_5xx = inner.consecutive_5xx.saturating_add(1);
                if !reached(inner.consecutive_5xx, self.consecutive_5xx) {
                    return None;
                }
                EjectionReason::Consecutive5xx
            }
            Outcome::ConnectFailure => {
                inner.consecutive_connect_failures =
                    inner.consecutive_connect_failures.saturating_add(1);
                if !reached(
                    inner.consecutive_connect_failures,
                    self.consecutive_connect_failures,
                ) {
                    return None;
                }
                EjectionReason::ConsecutiveConnectFailures
            }
        };
        if !self.may_eject(currently_ejected, pool_size) {
            return None;
        }

        // Forgive one step of the multiplier per `base_ejection` spent back in the pool.
        if let Some(returned) = inner.ejected_until {
            let healthy = now.saturating_duration_since(returned);
            let forgiven = healthy.as_nanos() / self.base_ejection.as_nanos().max(1);
            let forgiven = u32::try_from(forgiven).unwrap_or(u32::MAX);
            inner.times_ejected = inner.times_ejected.saturating_sub(forgiven);
        }
        inner.times_ejected = inner.times_ejected.saturating_add(1);
        let duration = self
            .base_ejection
            .saturating_mul(inner.times_ejected)
            .min(self.max_ejection.max(self.base_ejection));
        let until = now + duration;
        inner.ejected_until = Some(until);
        inner.consecutive_5xx = 0;
        inner.consecutive_connect_failures = 0;
        state.maybe_ejected.store(true, Ordering::Release);
        Some(Ejection {
            reason,
            duration,
            until,
            times_ejected: inner.times_ejected,
        })
    }

    /// Whether the cap allows one more ejection in a pool of `pool_size` with
    /// `currently_ejected` already out.
    fn may_eject(&self, currently_ejected: usize, pool_size: usize) -> bool {
        let after = (currently_ejected + 1) as u128;
        currently_ejected == 0
            || after * 100 <= u128::from(self.max_ejection_percent) * pool_size as u128
    }
}

/// Whether `count` has reached a `threshold`, 0 meaning disabled.
fn reached(count: u32, threshold: u32) -> bool {
    threshold > 0 && count >= threshold
}

impl OutlierState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the endpoint is out of load balancing at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        if !self.maybe_ejected.load(Ordering::Acquire) {
            return false;
        }
        let inner = lock(&self.inner);
        let ejected = inner.ejected_until.is_some_and(|until| now < until);
        if !ejected {
            // Back in the pool: later checks take the fast path again. (A caller whose `now`
            // is a little older than another's may see it ejected a moment longer; harmless.)
            self.maybe_ejected.store(false, Ordering::Release);
        }
        ejected
    }

    /// When the current or most recent ejection ends (for logs and admin output).
    pub fn ejected_until(&self) -> Option<Instant> {
        lock(&self.inner).ejected_until
    }

    /// 5xx responses in a row so far.
    pub fn consecutive_5xx(&self) -> u32 {
        lock(&self.inner).consecutive_5xx
    }

    /// Failed connection attempts in a row so far.
    pub fn consecutive_connect_failures(&self) -> u32 {
        lock(&self.inner).consecutive_connect_failures
    }

    /// The ejection multiplier: recent ejections, less those forgiven.
    pub fn times_ejected(&self) -> u32 {
        lock(&self.inner).times_ejected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn detector() -> OutlierDetector {
        OutlierDetector {
            consecutive_5xx: 3,
            consecutive_connect_failures: 2,
            base_ejection: 10 * SEC,
            max_ejection: 300 * SEC,
            max_ejection_percent: 100,
        }
    }

    /// Records `outcome` `n` times at `now` in a pool of 10 with nothing else ejected.
    fn repeat(
        d: &OutlierDetector,
        s: &OutlierState,
        outcome: Outcome,
        n: u32,
        now: Instant,
    ) -> Option<Ejection> {
        let mut last = None;
        for _ in 0..n {
            last = d.record(s, outcome, now, 0, 10);
        }
        last
    }

    #[test]
    fn ejects_after_consecutive_5xx() {
        let (d, s, t0) = (detector(), OutlierState::new(), Instant::now());
        assert_eq!(repeat(&d, &s, Outcome::Http5xx, 2, t0), None);
        assert!(!s.is_ejected(t0));
        let e = d
            .record(&s, Outcome::Http5xx, t0, 0, 10)
            .expect("third 5xx ejects");
        assert_eq!(e.reason, EjectionReason::Consecutive5xx);
        assert_eq!(e.duration, 10 * SEC);
        assert_eq!(e.until, t0 + 10 * SEC);
        assert_eq!(e.times_ejected, 1);
        assert!(s.is_ejected(t0));
        assert_eq!(s.consecutive_5xx(), 0, "counts restart at ejection");
    }

    #[test]
    fn success_resets_the_count() {
        let (d, s, t0) = (detector(), OutlierState::new(), Instant::now());
        repeat(&d, &s, Outcome::Http5xx, 2, t0);
        d.record(&s, Outcome::Success, t0, 0, 10);
        assert_eq!(s.consecutive_5xx(), 0);
        assert_eq!(repeat(&d, &s, Outcome::Http5xx, 2, t0), None);
        assert!(!s.is_ejected(t0));
    }

    #[test]
    fn from_status_classifies_5xx_only() {
        assert_eq!(Outcome::from_status(StatusCode::OK), Outcome::Success);
        assert_eq!(
            Outcome::from_status(StatusCode::NOT_FOUND),
            Outcome::Success
        );
        assert_eq!(
            Outcome::from_status(StatusCode::BAD_GATEWAY),
            Outcome::Http5xx
        );
    }

    #[test]
    fn connect_failures_counted_separately() {
        let (d, s, t0) = (detector(), OutlierState::new(), Instant::now());
        // 5xx, connect failure, 5xx: neither streak reaches its threshold...
        d.record(&s, Outcome::Http5xx, t0, 0, 10);
        d.record(&s, Outcome::ConnectFailure, t0, 0, 10);
        assert_eq!(s.consecutive_5xx(), 1, "a connect failure saw no response");
        assert_eq!(s.consecutive_connect_failures(), 1);
        d.record(&s, Outcome::Http5xx, t0, 0, 10);
        assert_eq!(s.consecutive_5xx(), 2);
        assert_eq!(s.consecutive_connect_failures(), 0, "the connection worked");
        assert!(!s.is_ejected(t0));
        // ...until two connect failures in a row (threshold 2, below the 5xx one).
        assert_eq!(d.record(&s, Outcome::ConnectFailure, t0, 0, 10), None);
        let e = d.record(&s, Outcome::ConnectFailure, t0, 0, 10).unwrap();
        assert_eq!(e.reason, EjectionReason::ConsecutiveConnectFailures);
        assert!(s.is_ejected(t0));
    }

    #[test]
    fn zero_threshold_disables() {
        let d = OutlierDetector {
            consecutive_5xx: 0,
            consecutive_connect_failures: 0,
            ..detector()
        };
        let (s, t0) = (OutlierState::new(), Instant::now());
        assert_eq!(repeat(&d, &s, Outcome::Http5xx, 100, t0), None);
        assert_eq!(repeat(&d, &s, Outcome::ConnectFailure, 100, t0), None);
        assert!(!s.is_ejected(t0));
    }

    #[test]
    fn returns_after_ejection_and_ignores_outcomes_meanwhile() {
        let (d, s, t0) = (detector(), OutlierState::new(), Instant::now());
        repeat(&d, &s, Outcome::Http5xx, 3, t0).unwrap();
        assert!(s.is_ejected(t0 + 9 * SEC));
        // In-flight requests failing during the ejection neither extend nor re-eject.
        assert_eq!(repeat(&d, &s, Outcome::Http5xx, 10, t0 + SEC), None);
        assert_eq!(s.consecutive_5xx(), 0);
        assert!(
            !s.is_ejected(t0 + 10 * SEC),
            "back exactly at ejected_until"
        );
        assert!(!s.is_ejected(t0 + 11 * SEC));
        assert_eq!(s.ejected_until(), Some(t0 + 10 * SEC));
    }

    #[test]
    fn repeated_ejections_last_longer_up_to_the_cap() {
        let d = OutlierDetector {
            max_ejection: 35 * SEC,
            ..detector()
        };
        let s = OutlierState::new();
        let mut now = Instant::now();
        let mut durations = Vec::new();
        for _ in 0..5 {
            // Fails again as soon as it is back.
            let e = repeat(&d, &s, Outcome::Http5xx, 3, now).unwrap();
            durations.push(e.duration.as_secs());
            now = e.until;
        }
        assert_eq!(durations, [10, 20, 30, 35, 35]);
    }

    #[test]
    fn max_ejection_below_base_is_raised_to_base() {
        let d = OutlierDetector {
            max_ejection: SEC,
            ..detector()
        };
        let (s, t0) = (OutlierState::new(), Instant::now());
        assert_eq!(
            repeat(&d, &s, Outcome::Http5xx, 3, t0).unwrap().duration,
            10 * SEC
        );
    }

    #[test]
    fn healthy_time_forgives_earlier_ejections() {
        let (d, s, t0) = (detector(), OutlierState::new(), Instant::now());
        let e1 = repeat(&d, &s, Outcome::Http5xx, 3, t0).unwrap();
        let e2 = repeat(&d, &s, Outcome::Http5xx, 3, e1.until).unwrap();
        assert_eq!(e2.times_ejected, 2);
        // One base_ejection healthy: one step forgiven, so 2 - 1 + 1.
        let e3 = repeat(&d, &s, Outcome::Http5xx, 3, e2.until + 10 * SEC).unwrap();
        assert_eq!((e3.times_ejected, e3.duration), (2, 20 * SEC));
        // A long healthy stretch forgives everything.
        let e4 = repeat(&d, &s, Outcome::Http5xx, 3, e3.until + 3600 * SEC).unwrap();
        assert_eq!((e4.times_ejected, e4.duration), (1, 10 * SEC));
    }

    #[test]
    fn max_ejection_percent_respected() {
        let d = OutlierDetector {
            max_ejection_percent: 20,
            ..detector()
        };
        let t0 = Instant::now();
        let fail = |s: &OutlierState, ejected, pool| {
            let mut last = None;
            for _ in 0..3 {
                last = d.record(s, Outcome::Http5xx, t0, ejected, pool);
            }
            last
        };
        // Pool of 10: 2 may be out (20%), not a third.
        assert!(fail(&OutlierState::new(), 0, 10).is_some());
        assert!(fail(&OutlierState::new(), 1, 10).is_some());
        let third = OutlierState::new();
        assert!(fail(&third, 2, 10).is_none());
        assert!(!third.is_ejected(t0));
        // Refused, it keeps its count: once there is room, its next failure ejects it.
        assert_eq!(third.consecutive_5xx(), 3);
        assert!(d.record(&third, Outcome::Http5xx, t0, 1, 10).is_some());
        // Pool of 3: 20% is less than one endpoint, yet one may always be ejected.
        assert!(fail(&OutlierState::new(), 0, 3).is_some());
        assert!(fail(&OutlierState::new(), 1, 3).is_none());
    }

    #[test]
    fn zero_percent_still_ejects_one_like_envoy() {
        let d = OutlierDetector {
            max_ejection_percent: 0,
            ..detector()
        };
        let (s, t0) = (OutlierState::new(), Instant::now());
        assert!(repeat(&d, &s, Outcome::Http5xx, 3, t0).is_some());
        let other = OutlierState::new();
        assert!(d.record(&other, Outcome::Http5xx, t0, 1, 10).is_none());
    }

    #[test]
    fn shared_state_ejects_once_under_concurrency() {
        let d = detector();
        let s = std::sync::Arc::new(OutlierState::new());
        let t0 = Instant::now();
        let ejections: usize = (0..8)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .filter(|_| d.record(&s, Outcome::Http5xx, t0, 0, 10).is_some())
                        .count()
                })
            })
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(ejections, 1, "failures during the ejection are ignored");
        assert!(s.is_ejected(t0));
    }
}
