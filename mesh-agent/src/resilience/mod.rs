//! Resiliency primitives for L7 traffic: small, synchronous, deterministic pieces that the
//! HTTP proxy composes. None of them does I/O, sleeps or reads the clock: time comes in as a
//! `now: Instant` (or a `Duration`) and randomness as a `fastrand::Rng`, so tests replay
//! exactly. State shared by request tasks is `Send + Sync` and kept in atomics or behind
//! mutexes held for a few instructions, never across an await.
//!
//! Where each piece acts in a request's life:
//!
//! 1. **Admission.** [`RateLimiters`] / [`TokenBucket`]: a request over its local rate limit
//!    is answered 429, flag `RL`.
//! 2. **Faults.** `route::Fault::sample` on the matched route: wait the injected delay,
//!    then answer with the injected status (flags `DI`, `FI`), or go on.
//! 3. **Retry accounting.** [`RetryBudget::deposit`] once per original request, so that the
//!    budget grows with real traffic only.
//! 4. **Endpoint choice.** Candidates are the destination's endpoints whose
//!    [`OutlierState::is_ejected`] is false, or all of them if none is left (panic mode);
//!    [`pick_p2c`] (default), [`pick_round_robin`] or [`pick_random`] picks one.
//! 5. **Circuit breaking.** [`CircuitBreaker`]: a [`PendingPermit`] while waiting for a
//!    connection, a [`ConnectionPermit`] per upstream connection, a [`RequestPermit`] per
//!    request in flight; an [`Overflow`] is answered 503, flag `UO`.
//! 6. **Attempt.** [`EndpointStats::start`] counts the request on its endpoint; the guard's
//!    [`Outstanding::finish`] records its latency.
//! 7. **Outcome.** [`OutlierDetector::record`] with [`Outcome::from_status`] (or
//!    `ConnectFailure`) may eject the endpoint.
//! 8. **Retry decision.** attempt → outcome → retriable per the route's policy? →
//!    [`RetryBudget::try_withdraw`] (refused: return this outcome) → wait
//!    [`Backoff::delay`] → back to 4, preferring another endpoint.

mod backoff;
mod balancer;
mod budget;
mod circuit;
mod outlier;
mod ratelimit;

use std::sync::{Mutex, MutexGuard};

// The module's interface.
pub use self::{
    backoff::Backoff,
    balancer::{EndpointStats, Outstanding, pick_p2c, pick_random, pick_round_robin},
    budget::RetryBudget,
    circuit::{
        CircuitBreaker, CircuitLimits, ConnectionPermit, Overflow, PendingPermit, RequestPermit,
    },
    outlier::{Ejection, EjectionReason, Outcome, OutlierDetector, OutlierState},
    ratelimit::{
        DEFAULT_MAX_KEYS, RATE_LIMITED_FLAG, RATE_LIMITED_STATUS, RateLimit, RateLimiters,
        TokenBucket,
    },
};

/// Locks `mutex` even if a panicking thread poisoned it: every critical section in this
/// module leaves its data consistent at each step, so the data stays usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
