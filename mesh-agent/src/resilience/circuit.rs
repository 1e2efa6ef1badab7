//! Circuit breaking: hard caps on connections, queued requests and requests in flight to one
//! destination, shaped like Envoy's cluster circuit breakers (Istio's `connectionPool`).
//!
//! Unlike a retry budget, which shapes load gradually, a breaker is a wall: when a cap is
//! reached the request fails at once with 503 and the response flag `UO` ("upstream
//! overflow") instead of queueing behind a destination that is already saturated, so a slow
//! upstream cannot tie up the agent's memory and every caller's latency with it.
//!
//! Each admission is a permit that holds its slot until dropped, so no exit path (error,
//! cancellation, panic) can leak a slot. A request takes a [`PendingPermit`] while it waits
//! for a connection, a [`ConnectionPermit`] is held by each upstream connection for its
//! lifetime, and a [`RequestPermit`] by each request from dispatch to the end of its response.
//! Counts are atomics; acquiring is a compare-and-swap that never lets a count exceed its cap.
use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use http::StatusCode;

/// The caps of one destination. Plain data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitLimits {
    pub max_connections: usize,
    pub max_pending_requests: usize,
    pub max_requests: usize,
}

impl Default for CircuitLimits {
    /// Envoy's defaults: 1024 each.
    fn default() -> Self {
        CircuitLimits {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
        }
    }
}

/// Counts and caps for one destination; share it (by reference or `Arc`) among its requests.
#[derive(Debug)]
pub struct CircuitBreaker {
    limits: CircuitLimits,
    connections: Arc<AtomicUsize>,
    pending: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

/// Which cap refused an admission. Every kind maps to a 503 flagged `UO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Overflow {
    #[error("upstream overflow: {max} connections open")]
    Connections { max: usize },
    #[error("upstream overflow: {max} requests waiting for a connection")]
    PendingRequests { max: usize },
    #[error("upstream overflow: {max} requests in flight")]
    Requests { max: usize },
}

impl Overflow {
    /// Envoy's access-log response flag for an upstream overflow.
    pub fn response_flag(&self) -> &'static str {
        "UO"
    }

    /// The status to answer the downstream with.
    pub fn status(&self) -> StatusCode {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// A slot held in one of the breaker's counts until dropped.
#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn acquire(count: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(Arc::clone(count)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request in flight; frees its slot when dropped.
#[must_use = "the slot is freed as soon as the permit is dropped"]
#[derive(Debug)]
pub struct RequestPermit {
    _slot: Slot,
}

/// A request waiting for a connection; frees its slot when dropped.
#[must_use = "the slot is freed as soon as the permit is dropped"]
#[derive(Debug)]
pub struct PendingPermit {
    _slot: Slot,
}

/// An open upstream connection; frees its slot when dropped.
#[must_use = "the slot is freed as soon as the permit is dropped"]
#[derive(Debug)]
pub struct ConnectionPermit {
    _slot: Slot,
}

impl CircuitBreaker {
    pub fn new(limits: CircuitLimits) -> Self {
        CircuitBreaker {
            limits,
            connections: Arc::default(),
            pending: Arc::default(),
            requests: Arc::default(),
        }
    }

    /// A breaker with new caps that shares this one's counts, for a configuration change:
    /// permits held under the old caps keep counting against the new ones. Lowering a cap
    /// below the current count refuses new admissions until enough permits are dropped.
    pub fn with_limits(&self, limits: CircuitLimits) -> Self {
        CircuitBreaker {
            limits,
            connections: Arc::clone(&self.connections),
            pending: Arc::clone(&self.pending),
            requests: Arc::clone(&self.requests),
        }
    }

    pub fn limits(&self) -> CircuitLimits {
        self.limits
    }

    /// Admits one more request in flight, or says the cap is reached.
    pub fn try_request(&self) -> Result<RequestPermit, Overflow> {
        let max = self.limits.max_requests;
        Slot::acquire(&self.requests, max)
            .map(|_slot| RequestPermit { _slot })
            .ok_or(Overflow::Requests { max })
    }

    /// Admits one more request waiting for a connection, or says the cap is reached.
    pub fn try_pending(&self) -> Result<PendingPermit, Overflow> {
        let max = self.limits.max_pending_requests;
        Slot::acquire(&self.pending, max)
            .map(|_slot| PendingPermit { _slot })
            .ok_or(Overflow::PendingRequests { max })
    }

    /// Admits one more upstream connection, or says the cap is reached.
    pub fn try_connection(&self) -> Result<ConnectionPermit, Overflow> {
        let max = self.limits.max_connections;
        Slot::acquire(&self.connections, max)
            .map(|_slot| ConnectionPermit { _slot })
            .ok_or(Overflow::Connections { max })
    }

    /// Requests in flight now.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Acquire)
    }

    /// Requests waiting for a connection now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Upstream connections open now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(connections: usize, pending: usize, requests: usize) -> CircuitBreaker {
        CircuitBreaker::new(CircuitLimits {
            max_connections: connections,
            max_pending_requests: pending,
            max_requests: requests,
        })
    }

    #[test]
    fn requests_capped_and_released_on_drop() {
        let cb = breaker(10, 10, 2);
        let a = cb.try_request().unwrap();
        let b = cb.try_request().unwrap();
        assert_eq!(cb.requests(), 2);
        let err = cb.try_request().unwrap_err();
        assert_eq!(err, Overflow::Requests { max: 2 });
        assert_eq!(cb.requests(), 2, "a refusal takes no slot");
        drop(a);
        assert_eq!(cb.requests(), 1);
        let _c = cb
            .try_request()
            .expect("the dropped permit's slot is free again");
        drop(b);
    }

    #[test]
    fn each_limit_is_separate() {
        let cb = breaker(1, 2, 3);
        let _conn = cb.try_connection().unwrap();
        assert_eq!(
            cb.try_connection().unwrap_err(),
            Overflow::Connections { max: 1 }
        );
        let _p: Vec<_> = (0..2).map(|_| cb.try_pending().unwrap()).collect();
        assert_eq!(
            cb.try_pending().unwrap_err(),
            Overflow::PendingRequests { max: 2 }
        );
        // Requests are unaffected by the other two being full.
        let _r: Vec<_> = (0..3).map(|_| cb.try_request().unwrap()).collect();
        assert!(cb.try_request().is_err());
        assert_eq!((cb.connections(), cb.pending(), cb.requests()), (1, 2, 3));
    }

    #[test]
    fn all_permits_release_on_drop() {
        let cb = breaker(1, 1, 1);
        {
            let _c = cb.try_connection().unwrap();
            let _p = cb.try_pending().unwrap();
            let _r = cb.try_request().unwrap();
        }
        assert_eq!((cb.connections(), cb.pending(), cb.requests()), (0, 0, 0));
    }

    #[test]
    fn zero_cap_refuses_everything() {
        let cb = breaker(0, 0, 0);
        assert!(cb.try_connection().is_err());
        assert!(cb.try_pending().is_err());
        assert!(cb.try_request().is_err());
    }

    #[test]
    fn overflow_maps_to_503_uo() {
        for o in [
            Overflow::Connections { max: 1 },
            Overflow::PendingRequests { max: 1 },
            Overflow::Requests { max: 1 },
        ] {
            assert_eq!(o.response_flag(), "UO");
            assert_eq!(o.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
        assert_eq!(
            Overflow::Requests { max: 7 }.to_string(),
            "upstream overflow: 7 requests in flight"
        );
    }

    #[test]
    fn new_limits_share_counts() {
        let old = breaker(10, 10, 3);
        let held: Vec<_> = (0..3).map(|_| old.try_request().unwrap()).collect();
        let new = old.with_limits(CircuitLimits {
            max_requests: 4,
            ..old.limits()
        });
        assert_eq!(new.requests(), 3);
        let _one_more = new.try_request().unwrap();
        assert!(new.try_request().is_err());
        drop(held);
        assert_eq!(new.requests(), 1);
    }

    #[test]
    fn never_exceeds_cap_under_contention() {
        let cb = Arc::new(breaker(10, 10, 5));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let cb = cb.clone();
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        if let Ok(p) = cb.try_request() {
                            assert!(cb.requests() <= 5);
                            drop(p);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(cb.requests(), 0);
    }

    #[test]
    fn permits_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CircuitBreaker>();
        assert_send_sync::<RequestPermit>();
        assert_send_sync::<PendingPermit>();
        assert_send_sync::<ConnectionPermit>();
    }
}
