//! Endpoint load and endpoint picking: power of two choices, round robin, random.
//!
//! Each endpoint has one shared [`EndpointStats`]: requests in flight (kept exact by the
//! [`Outstanding`] guard) and a moving average of latency. [`pick_p2c`] samples two
//! candidates and takes the one with fewer requests in flight, which keeps load nearly as
//! even as "least loaded of all" at O(1) cost, without the herd effect of every picker
//! choosing the same momentarily idle endpoint (Mitzenmacher; linkerd's and Envoy's default).
//!
//! Candidates are the endpoints a request may go to. The caller leaves out endpoints that
//! outlier detection has ejected; but if that leaves none, it passes them all ("panic mode",
//! as Envoy's load balancer does below its healthy-panic threshold): a degraded endpoint is
//! a better bet than a certain 503.
use std::{
    borrow::Borrow,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

/// How far each completed request moves the latency average toward its own latency.
const EWMA_WEIGHT: f64 = 0.2;

/// Load state of one endpoint, shared by every request task that may pick it.
#[derive(Debug, Default)]
pub struct EndpointStats {
    outstanding: AtomicUsize,
    /// `f64` bits of the latency average in nanoseconds; 0.0 until the first sample.
    ewma_nanos: AtomicU64,
}

/// A request in flight to an endpoint: counted from [`EndpointStats::start`] until dropped.
/// Owns a handle on the stats, so it may move between tasks or into a response body.
#[must_use = "the request counts as in flight only while the guard lives"]
#[derive(Debug)]
pub struct Outstanding {
    stats: Arc<EndpointStats>,
}

impl EndpointStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts a request in flight until the returned guard is dropped.
    pub fn start(self: &Arc<Self>) -> Outstanding {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        Outstanding {
            stats: Arc::clone(self),
        }
    }

    /// Requests in flight now.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Moving average of completed requests' latency; `None` before the first completion.
    pub fn latency(&self) -> Option<Duration> {
        let nanos = self.ewma();
        (nanos > 0.0).then(|| Duration::from_nanos(nanos as u64))
    }

    fn ewma(&self) -> f64 {
        f64::from_bits(self.ewma_nanos.load(Ordering::Relaxed))
    }

    fn record_latency(&self, latency: Duration) {
        let sample = latency.as_nanos() as f64;
        // A lost race only means one sample was folded into a slightly older average.
        let _ = self
            .ewma_nanos
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let old = f64::from_bits(bits);
                let new = if old > 0.0 {
                    old + EWMA_WEIGHT * (sample - old)
                } else {
                    sample
                };
                Some(new.to_bits())
            });
    }
}

impl Outstanding {
    /// Ends the request normally: folds `latency` (time to the response head, or to its end,
    /// the caller's choice) into the endpoint's average. Dropping the guard instead (failed
    /// or cancelled requests) only ends the count, so errors that return fast do not make a
    /// broken endpoint look quick.
    pub fn finish(self, latency: Duration) {
        self.stats.record_latency(latency);
    }

    pub fn stats(&self) -> &Arc<EndpointStats> {
        &self.stats
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.stats.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Power of two choices: two distinct random candidates, the one with fewer requests in
/// flight wins; on a tie the lower latency average wins (an endpoint without samples counts
/// as fastest, so new endpoints get tried); on a full tie, a coin flip. `None` if empty.
pub fn pick_p2c<E: Borrow<EndpointStats>>(
    candidates: &[E],
    rng: &mut fastrand::Rng,
) -> Option<usize> {
    let n = candidates.len();
    match n {
        0 => return None,
        1 => return Some(0),
        _ => {}
    }
    let a = rng.usize(0..n);
    let mut b = rng.usize(0..n - 1);
    if b >= a {
        b += 1;
    }
    let (sa, sb) = (candidates[a].borrow(), candidates[b].borrow());
    let by_load = sa.outstanding().cmp(&sb.outstanding());
    let by_latency = sa.ewma().total_cmp(&sb.ewma());
    Some(match by_load.then(by_latency) {
        std::cmp::Ordering::Less => a,
        std::cmp::Ordering::Greater => b,
        std::cmp::Ordering::Equal if rng.bool() => a,
        std::cmp::Ordering::Equal => b,
    })
}

/// Round robin over `n` candidates with a counter shared by the pickers; `None` if `n` is 0.
/// When the candidate list changes (an ejection), the rotation shifts; that is harmless.
pub fn pick_round_robin(n: usize, next: &AtomicUsize) -> Option<usize> {
    (n > 0).then(|| next.fetch_add(1, Ordering::Relaxed) % n)
}

/// A uniformly random candidate; `None` if `n` is 0.
pub fn pick_random(n: usize, rng: &mut fastrand::Rng) -> Option<usize> {
    (n > 0).then(|| rng.usize(0..n))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn endpoints(n: usize) -> Vec<Arc<EndpointStats>> {
        (0..n).map(|_| Arc::new(EndpointStats::new())).collect()
    }

    #[test]
    fn guard_counts_until_dropped() {
        let e = Arc::new(EndpointStats::new());
        let g1 = e.start();
        let g2 = e.start();
        assert_eq!(e.outstanding(), 2);
        drop(g1);
        assert_eq!(e.outstanding(), 1);
        g2.finish(10 * MS);
        assert_eq!(e.outstanding(), 0);
    }

    #[test]
    fn dropped_guard_records_no_latency() {
        let e = Arc::new(EndpointStats::new());
        drop(e.start());
        assert_eq!(e.latency(), None);
    }

    #[test]
    fn latency_average_moves_toward_samples() {
        let e = Arc::new(EndpointStats::new());
        e.start().finish(100 * MS);
        assert_eq!(e.latency(), Some(100 * MS), "first sample taken as is");
        e.start().finish(200 * MS);
        assert_eq!(e.latency(), Some(120 * MS));
        for _ in 0..100 {
            e.start().finish(200 * MS);
        }
        let l = e.latency().unwrap();
        assert!(l > 199 * MS && l <= 200 * MS, "{l:?}");
    }

    #[test]
    fn guard_moves_across_threads() {
        let e = Arc::new(EndpointStats::new());
        let guards: Vec<_> = (0..8).map(|_| e.start()).collect();
        let handles: Vec<_> = guards
            .into_iter()
            .map(|g| std::thread::spawn(move || g.finish(MS)))
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(e.outstanding(), 0);
    }

    #[test]
    fn p2c_prefers_less_loaded() {
        let eps = endpoints(4);
        // Endpoint 0 is idle, the others carry 1, 5 and 10 requests.
        let _held: Vec<_> = [(1, 1), (2, 5), (3, 10)]
            .iter()
            .flat_map(|&(i, k)| (0..k).map(move |_| i))
            .map(|i| eps[i].start())
            .collect();
        let mut rng = fastrand::Rng::with_seed(1);
        let mut picks = [0u32; 4];
        for _ in 0..12_000 {
            picks[pick_p2c(&eps, &mut rng).unwrap()] += 1;
        }
        // Exact shares: an endpoint wins every pair with a more loaded one, so the k-th
        // least loaded of 4 wins (4-k)/6 of pairs: 1/2, 1/3, 1/6, 0.
        assert!((5700..=6300).contains(&picks[0]), "{picks:?}");
        assert!((3700..=4300).contains(&picks[1]), "{picks:?}");
        assert!((1700..=2300).contains(&picks[2]), "{picks:?}");
        assert_eq!(picks[3], 0, "the most loaded never wins a pair");
    }

    #[test]
    fn p2c_spreads_load_when_requests_stay_in_flight() {
        let eps = endpoints(5);
        let mut rng = fastrand::Rng::with_seed(2);
        // 100 requests that all stay in flight: P2C keeps the counts close together.
        let held: Vec<_> = (0..100)
            .map(|_| eps[pick_p2c(&eps, &mut rng).unwrap()].start())
            .collect();
        let counts: Vec<usize> = eps.iter().map(|e| e.outstanding()).collect();
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(max - min <= 3, "{counts:?}");
        drop(held);
        assert!(eps.iter().all(|e| e.outstanding() == 0));
    }

    #[test]
    fn p2c_breaks_load_ties_by_latency() {
        let eps = endpoints(2);
        eps[0].start().finish(50 * MS);
        eps[1].start().finish(5 * MS);
        let mut rng = fastrand::Rng::with_seed(3);
        assert!((0..100).all(|_| pick_p2c(&eps, &mut rng) == Some(1)));
        // Load outranks latency.
        let _busy = eps[1].start();
        assert!((0..100).all(|_| pick_p2c(&eps, &mut rng) == Some(0)));
    }

    #[test]
    fn p2c_full_tie_is_random() {
        let eps = endpoints(2);
        let mut rng = fastrand::Rng::with_seed(4);
        let zeros = (0..10_000)
            .filter(|_| pick_p2c(&eps, &mut rng) == Some(0))
            .count();
        assert!((4700..=5300).contains(&zeros), "{zeros}");
    }

    #[test]
    fn p2c_small_and_empty() {
        let mut rng = fastrand::Rng::with_seed(5);
        let none: [&EndpointStats; 0] = [];
        assert_eq!(pick_p2c(&none, &mut rng), None);
        let one = EndpointStats::new();
        assert_eq!(pick_p2c(&[&one], &mut rng), Some(0));
    }

    #[test]
    fn p2c_accepts_borrowed_candidates() {
        // The caller's filtered view (ejected endpoints left out) is a slice of references.
        let eps = endpoints(3);
        let _busy = eps[0].start();
        let healthy: Vec<&EndpointStats> = eps[..2].iter().map(|e| &**e).collect();
        let mut rng = fastrand::Rng::with_seed(6);
        assert!((0..50).all(|_| pick_p2c(&healthy, &mut rng) == Some(1)));
    }

    #[test]
    fn round_robin_cycles() {
        let next = AtomicUsize::new(0);
        let picks: Vec<_> = (0..7)
            .map(|_| pick_round_robin(3, &next).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(pick_round_robin(0, &next), None);
    }

    #[test]
    fn random_covers_all_and_handles_empty() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut seen = [false; 4];
        for _ in 0..200 {
            seen[pick_random(4, &mut rng).unwrap()] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(pick_random(0, &mut rng), None);
    }
}
