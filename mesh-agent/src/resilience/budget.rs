//! A retry budget: retries may add at most a fixed fraction of load, however many requests fail.
//!
//! Per-request retry limits ("up to 3 retries") multiply load exactly when the upstream can
//! least afford it: if everything fails, every request becomes four. A budget bounds the total
//! instead. This is Finagle's `RetryBudget` (also linkerd's and tower's `TpsBudget`):
//!
//! - every original request [deposits](RetryBudget::deposit) `ratio` of a retry;
//! - every retry [withdraws](RetryBudget::try_withdraw) one whole retry, or is refused;
//! - deposits and withdrawals count only while they are younger than `ttl`;
//! - a reserve of `min_retries_per_sec × ttl` retries is always available, so a service with
//!   little traffic (where `ratio` of almost nothing is nothing) can still retry. The reserve
//!   is a per-window allowance, as in Finagle: it may be spent in a burst.
//!
//! So within any `ttl` window: retries ≤ `ratio` × requests + `min_retries_per_sec` × `ttl`.
//!
//! The window is [`BUCKETS`] buckets of `ttl / BUCKETS` each (memory is constant); an entry
//! expires when its bucket is reused, that is between `ttl × (BUCKETS-1)/BUCKETS` and `ttl`
//! after it was made. The buckets sit behind one mutex whose critical sections are a few
//! integer operations and never span an await.
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use super::lock;

/// Number of buckets in the sliding window.
pub const BUCKETS: usize = 10;
/// Shortest accepted `ttl` (as Finagle); shorter ones are raised to it.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// Longest accepted `ttl` (as Finagle); longer ones are lowered to it.
pub const MAX_TTL: Duration = Duration::from_secs(60);
/// Largest accepted `ratio` (as Finagle): 1000 retries per request.
pub const MAX_RATIO: f64 = 1000.0;

/// One retry, in the fixed-point units the buckets count in (so that a `ratio` of 0.2 is an
/// exact 200 units per request instead of a float that drifts).
const RETRY: i64 = 1000;

/// A shared retry budget (for one route or destination); `Send + Sync`.
#[derive(Debug)]
pub struct RetryBudget {
    /// Units each original request adds: `ratio × RETRY`.
    deposit: i64,
    /// Units always available: `min_retries_per_sec × ttl × RETRY`.
    reserve: i64,
    bucket_width: Duration,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// The first instant the budget saw; bucket boundaries are measured from it.
    origin: Option<Instant>,
    /// Which `bucket_width` slice since `origin` `buckets[head]` holds.
    head_tick: u64,
    head: usize,
    buckets: [i64; BUCKETS],
}

impl RetryBudget {
    /// A budget allowing retries of up to `ratio` (e.g. 0.2) of the requests of the last
    /// `ttl` (e.g. 10 s), plus `min_retries_per_sec` (e.g. 10) per second of `ttl`.
    ///
    /// `ratio` is clamped to `[0, MAX_RATIO]` (NaN = 0) and `ttl` to `[MIN_TTL, MAX_TTL]`.
    pub fn new(ratio: f64, min_retries_per_sec: u32, ttl: Duration) -> Self {
        let ratio = if ratio.is_nan() {
            0.0
        } else {
            ratio.clamp(0.0, MAX_RATIO)
        };
        let ttl = ttl.clamp(MIN_TTL, MAX_TTL);
        // Both products are far inside i64: at most 1000 × 1000 and 2^32 × 60 × 1000.
        let deposit = (ratio * RETRY as f64).round() as i64;
        let reserve = (f64::from(min_retries_per_sec) * ttl.as_secs_f64() * RETRY as f64) as i64;
        RetryBudget {
            deposit,
            reserve,
            bucket_width: ttl / BUCKETS as u32,
            window: Mutex::new(Window {
                origin: None,
                head_tick: 0,
                head: 0,
                buckets: [0; BUCKETS],
            }),
        }
    }

    /// Records an original request (not a retry): it earns `ratio` of a retry.
    pub fn deposit(&self, now: Instant) {
        let mut window = lock(&self.window);
        window.advance(now, self.bucket_width);
        let head = window.head;
        window.buckets[head] += self.deposit;
    }

    /// Takes one retry from the budget; `false` (and nothing taken) when it is spent.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let mut window = lock(&self.window);
        window.advance(now, self.bucket_width);
        if window.sum() + self.reserve < RETRY {
            return false;
        }
        let head = window.head;
        window.buckets[head] -= RETRY;
        true
    }

    /// How many retries [`RetryBudget::try_withdraw`] would allow right now (for metrics).
    pub fn available(&self, now: Instant) -> u64 {
        let mut window = lock(&self.window);
        window.advance(now, self.bucket_width);
        u64::try_from((window.sum() + self.reserve) / RETRY).unwrap_or(0)
    }
}

impl Window {
    /// Moves the head to the bucket of `now`, clearing the buckets it passes. An instant
    /// older than the head (callers on other threads read the clock a little earlier) counts
    /// in the head bucket.
    fn advance(&mut self, now: Instant, width: Duration) {
        let origin = *self.origin.get_or_insert(now);
        let elapsed = now.saturating_duration_since(origin).as_nanos();
        let tick = u64::try_from(elapsed / width.as_nanos()).unwrap_or(u64::MAX);
        if tick <= self.head_tick {
            return;
        }
        let steps = (tick - self.head_tick).min(BUCKETS as u64);
        for _ in 0..steps {
            self.head = (self.head + 1) % BUCKETS;
            self.buckets[self.head] = 0;
        }
        self.head_tick = tick;
    }

    fn sum(&self) -> i64 {
        self.buckets.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    fn drain(budget: &RetryBudget, now: Instant) -> u32 {
        let mut n = 0;
        while budget.try_withdraw(now) {
            n += 1;
            assert!(n < 1_000_000, "budget never ran out");
        }
        n
    }

    #[test]
    fn min_retries_available_without_traffic() {
        let budget = RetryBudget::new(0.2, 10, 10 * SEC);
        let t0 = Instant::now();
        // No request at all: the reserve still allows 10/s over the 10 s window.
        for i in 0..10 {
            assert!(
                budget.try_withdraw(t0 + i * 100 * MS),
                "retry {i} of the first second"
            );
        }
        assert_eq!(budget.available(t0 + SEC), 90);
        assert_eq!(drain(&budget, t0 + SEC), 90);
        assert!(!budget.try_withdraw(t0 + 2 * SEC));
    }

    #[test]
    fn retries_limited_to_ratio_of_requests() {
        let budget = RetryBudget::new(0.2, 0, 10 * SEC);
        let t0 = Instant::now();
        assert!(
            !budget.try_withdraw(t0),
            "no requests, no reserve: no retries"
        );
        for _ in 0..1000 {
            budget.deposit(t0);
        }
        assert_eq!(drain(&budget, t0), 200);
    }

    #[test]
    fn ratio_and_reserve_add_up() {
        let budget = RetryBudget::new(0.2, 10, 10 * SEC);
        let t0 = Instant::now();
        for _ in 0..1000 {
            budget.deposit(t0);
        }
        assert_eq!(drain(&budget, t0), 200 + 100);
    }

    #[test]
    fn deposits_expire_after_ttl() {
        let budget = RetryBudget::new(0.5, 0, 10 * SEC);
        let t0 = Instant::now();
        for _ in 0..100 {
            budget.deposit(t0);
        }
        assert_eq!(budget.available(t0 + 5 * SEC), 50);
        assert_eq!(
            budget.available(t0 + 10 * SEC),
            0,
            "expired with the window"
        );
        assert!(!budget.try_withdraw(t0 + 11 * SEC));
    }

    #[test]
    fn withdrawals_expire_and_reserve_refills() {
        let budget = RetryBudget::new(0.2, 1, 10 * SEC);
        let t0 = Instant::now();
        assert_eq!(drain(&budget, t0), 10);
        assert!(!budget.try_withdraw(t0 + 5 * SEC));
        assert_eq!(drain(&budget, t0 + 10 * SEC), 10);
    }

    #[test]
    fn window_slides_bucket_by_bucket() {
        let budget = RetryBudget::new(1.0, 0, 10 * SEC);
        let t0 = Instant::now();
        for s in 0..10 {
            budget.deposit(t0 + s * SEC);
        }
        assert_eq!(budget.available(t0 + 9 * SEC), 10);
        // Each further second expires the oldest one-second bucket.
        assert_eq!(budget.available(t0 + 10 * SEC), 9);
        assert_eq!(budget.available(t0 + 15 * SEC), 4);
        // A gap longer than the window clears everything at once.
        assert_eq!(budget.available(t0 + 1000 * SEC), 0);
    }

    #[test]
    fn steady_failure_retries_about_ratio_of_requests() {
        // 100 requests/s for 60 s, every one of them failing and asking for a retry.
        let budget = RetryBudget::new(0.2, 0, 10 * SEC);
        let t0 = Instant::now();
        let (mut requests, mut retries) = (0u32, 0u32);
        for tick in 0..6000 {
            let now = t0 + tick * 10 * MS;
            budget.deposit(now);
            requests += 1;
            if budget.try_withdraw(now) {
                retries += 1;
            }
        }
        let share = f64::from(retries) / f64::from(requests);
        assert!(
            (0.18..=0.24).contains(&share),
            "retried {share:.3} of requests"
        );
    }

    #[test]
    fn clock_read_slightly_earlier_by_another_thread_counts_in_head() {
        let budget = RetryBudget::new(1.0, 0, 10 * SEC);
        let t0 = Instant::now();
        budget.deposit(t0 + 5 * SEC);
        budget.deposit(t0 + 4 * SEC); // older than the head: not lost
        budget.deposit(t0); // the origin is t0 + 5 s; earlier instants count too
        assert_eq!(budget.available(t0 + 5 * SEC), 3);
    }

    #[test]
    fn parameters_are_clamped() {
        let t0 = Instant::now();
        let nan = RetryBudget::new(f64::NAN, 0, Duration::ZERO);
        nan.deposit(t0);
        assert!(!nan.try_withdraw(t0));
        // ttl raised to 1 s: 5/s of reserve is 5 retries.
        assert_eq!(RetryBudget::new(0.0, 5, Duration::ZERO).available(t0), 5);
        // ttl lowered to 60 s.
        assert_eq!(RetryBudget::new(0.0, 1, 3600 * SEC).available(t0), 60);
    }

    #[test]
    fn shared_across_threads() {
        let budget = std::sync::Arc::new(RetryBudget::new(0.0, 10, 10 * SEC));
        let now = Instant::now();
        let allowed: u32 = (0..4)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || (0..100).filter(|_| budget.try_withdraw(now)).count())
            })
            .map(|h| h.join().unwrap() as u32)
            .sum();
        assert_eq!(allowed, 100, "exactly the reserve, never more");
    }
}
