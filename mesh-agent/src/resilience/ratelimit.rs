//! Local rate limiting: token buckets, alone or one per caller-chosen key.
//!
//! A bucket holds up to `burst` tokens and refills continuously at `rate_per_sec` (not in
//! Envoy's discrete fill intervals, so there is no once-per-interval stampede); a request
//! takes one token or is refused, and a refused request is answered 429 with the response
//! flag `RL` (Envoy's local rate limit). A new bucket starts full.
//!
//! [`RateLimiters`] keeps a bucket per key (a destination workload, a source identity, ...)
//! in bounded memory. When a shard is full, buckets that have refilled to `burst` go first:
//! a full bucket behaves exactly like a new one, so dropping it changes nothing. Only if that
//! is not enough are the least recently used buckets evicted; such a key then starts again
//! from a full bucket, a leniency accepted in exchange for a memory bound.
use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash, RandomState},
    sync::Mutex,
    time::Instant,
};

use http::StatusCode;

use super::lock;

/// Access-log response flag of a request refused by a local rate limit (Envoy's).
pub const RATE_LIMITED_FLAG: &str = "RL";
/// The status a refused request is answered with.
pub const RATE_LIMITED_STATUS: StatusCode = StatusCode::TOO_MANY_REQUESTS;
/// Default bound of [`RateLimiters`].
pub const DEFAULT_MAX_KEYS: usize = 10_000;

/// A bucket's shape: refill rate and capacity. Plain data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    rate_per_sec: f64,
    burst: f64,
}

impl RateLimit {
    /// `rate_per_sec` below 0 or NaN is 0 (the burst, then nothing); `burst` below 1 is 1,
    /// since a bucket that can never hold a token would refuse everything.
    pub fn new(rate_per_sec: f64, burst: u32) -> Self {
        // NaN compares false, so it is 0 too; infinity becomes a finite (still effectively
        // unlimited) rate, so that `0 s × rate` stays 0 rather than NaN.
        let rate_per_sec = if rate_per_sec > 0.0 {
            rate_per_sec.min(f64::MAX)
        } else {
            0.0
        };
        RateLimit {
            rate_per_sec,
            burst: f64::from(burst.max(1)),
        }
    }
}

/// Tokens of one bucket at the instant `last`. Callers hold a lock around it.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    /// When `tokens` was last brought up to date; `None` = never used (full).
    last: Option<Instant>,
}

impl Bucket {
    fn full(limit: RateLimit) -> Self {
        Bucket {
            tokens: limit.burst,
            last: None,
        }
    }

    /// Tokens at `now`. An instant older than `last` (another caller read the clock a little
    /// earlier) sees the tokens of `last`: time never runs backwards for a bucket.
    fn tokens_at(&self, limit: RateLimit, now: Instant) -> f64 {
        match self.last {
            None => limit.burst,
            Some(last) => {
                let elapsed = now.saturating_duration_since(last).as_secs_f64();
                (self.tokens + elapsed * limit.rate_per_sec).min(limit.burst)
            }
        }
    }

    fn try_take(&mut self, limit: RateLimit, now: Instant) -> bool {
        self.tokens = self.tokens_at(limit, now);
        self.last = Some(self.last.map_or(now, |last| last.max(now)));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One token bucket, shared by the requests it limits; `Send + Sync`, one short lock per take.
#[derive(Debug)]
pub struct TokenBucket {
    limit: RateLimit,
    bucket: Mutex<Bucket>,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens refilling at `rate_per_sec` (see [`RateLimit::new`]).
    pub fn new(rate_per_sec: f64, burst: u32) -> Self {
        let limit = RateLimit::new(rate_per_sec, burst);
        TokenBucket {
            limit,
            bucket: Mutex::new(Bucket::full(limit)),
        }
    }

    /// Takes a token if one is there at `now`.
    pub fn try_take(&self, now: Instant) -> bool {
        lock(&self.bucket).try_take(self.limit, now)
    }
}

/// Token buckets by key, all of one shape, at most `max_keys` of them.
///
/// Keys are spread over up to 16 independently locked shards (only when each still holds at
/// least 256 keys, so that small bounds stay exact), so that takes for different keys rarely
/// contend.
#[derive(Debug)]
pub struct RateLimiters<K> {
    limit: RateLimit,
    max_per_shard: usize,
    hasher: RandomState,
    shards: Box<[Mutex<HashMap<K, Entry>>]>,
}

#[derive(Debug)]
struct Entry {
    bucket: Bucket,
    last_used: Instant,
}

const MAX_SHARDS: usize = 16;
const MIN_KEYS_PER_SHARD: usize = 256;

impl<K: Hash + Eq + Clone> RateLimiters<K> {
    /// Buckets of `burst` tokens refilling at `rate_per_sec`, at most `max_keys` (at least 1)
    /// of them.
    pub fn new(rate_per_sec: f64, burst: u32, max_keys: usize) -> Self {
        let max_keys = max_keys.max(1);
        let shards = (max_keys / MIN_KEYS_PER_SHARD).clamp(1, MAX_SHARDS);
        RateLimiters {
            limit: RateLimit::new(rate_per_sec, burst),
            max_per_shard: max_keys / shards,
            hasher: RandomState::new(),
            shards: (0..shards).map(|_| Mutex::default()).collect(),
        }
    }

    /// Takes a token from `key`'s bucket if one is there at `now`; a key seen for the first
    /// time gets a full bucket.
    pub fn try_take(&self, key: &K, now: Instant) -> bool {
        let shard = &self.shards[self.hasher.hash_one(key) as usize % self.shards.len()];
        let mut map = lock(shard);
        if let Some(entry) = map.get_mut(key) {
            entry.last_used = entry.last_used.max(now);
            return entry.bucket.try_take(self.limit, now);
        }
        if map.len() >= self.max_per_shard {
            self.evict(&mut map, now);
        }
        let mut bucket = Bucket::full(self.limit);
        let allowed = bucket.try_take(self.limit, now);
        map.insert(
            key.clone(),
            Entry {
                bucket,
                last_used: now,
            },
        );
        allowed
    }

    /// Keys that have a bucket now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// No key has a bucket.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| lock(s).is_empty())
    }

    /// Makes room for at least one key: drops full buckets, then, if the shard is still
    /// full, the least recently used eighth (at least one), so that the O(n) pass runs once
    /// per many inserts rather than on each.
    fn evict(&self, map: &mut HashMap<K, Entry>, now: Instant) {
        let limit = self.limit;
        map.retain(|_, e| e.bucket.tokens_at(limit, now) < limit.burst);
        if map.len() < self.max_per_shard {
            return;
        }
        let excess = map.len() + 1 - self.max_per_shard;
        let count = (excess + self.max_per_shard / 8).min(map.len());
        let mut by_age: Vec<(Instant, K)> =
            map.iter().map(|(k, e)| (e.last_used, k.clone())).collect();
        by_age.select_nth_unstable_by_key(count - 1, |(used, _)| *used);
        for (_, key) in &by_age[..count] {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const SEC: Duration = Duration::from_secs(1);

    fn takes(bucket: &TokenBucket, now: Instant, tries: u32) -> u32 {
        (0..tries).filter(|_| bucket.try_take(now)).count() as u32
    }

    #[test]
    fn burst_then_rate() {
        // 4 tokens/s (250 ms each: exact in binary floating point), burst 3.
        let b = TokenBucket::new(4.0, 3);
        let t0 = Instant::now();
        assert_eq!(takes(&b, t0, 10), 3, "a new bucket is full");
        assert_eq!(takes(&b, t0 + 249 * MS, 10), 0);
        assert_eq!(takes(&b, t0 + 250 * MS, 10), 1);
        assert_eq!(takes(&b, t0 + SEC, 10), 3);
        // Idle for long: refilled to the burst, not beyond.
        assert_eq!(takes(&b, t0 + 100 * SEC, 10), 3);
    }

    #[test]
    fn refills_continuously_over_simulated_time() {
        let b = TokenBucket::new(4.0, 3);
        let t0 = Instant::now();
        // One attempt every 10 ms for 10 s: the burst plus 4 per second.
        let allowed = (1..=1000).filter(|i| b.try_take(t0 + i * 10 * MS)).count();
        assert!((42..=43).contains(&allowed), "{allowed}");
    }

    #[test]
    fn fractional_tokens_accumulate() {
        let b = TokenBucket::new(0.5, 1);
        let t0 = Instant::now();
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0 + SEC), "half a token is not a token");
        assert!(b.try_take(t0 + 2 * SEC));
    }

    #[test]
    fn zero_rate_is_burst_only_and_zero_burst_is_one() {
        let t0 = Instant::now();
        let b = TokenBucket::new(0.0, 2);
        assert_eq!(takes(&b, t0, 5), 2);
        assert_eq!(takes(&b, t0 + 3600 * SEC, 5), 0);
        let nan = TokenBucket::new(f64::NAN, 0);
        assert_eq!(takes(&nan, t0, 5), 1);
        let inf = TokenBucket::new(f64::INFINITY, 2);
        assert_eq!(takes(&inf, t0, 5), 2);
        assert_eq!(takes(&inf, t0 + MS, 5), 2);
    }

    #[test]
    fn earlier_instant_does_not_refill_or_rewind() {
        let b = TokenBucket::new(1.0, 1);
        let t0 = Instant::now();
        assert!(b.try_take(t0 + 10 * SEC));
        assert!(!b.try_take(t0), "an older clock reading earns nothing");
        assert!(!b.try_take(t0 + 10 * SEC + 500 * MS));
        assert!(
            b.try_take(t0 + 11 * SEC),
            "refill measured from the latest take"
        );
    }

    #[test]
    fn shared_bucket_never_overspends() {
        let b = Arc::new(TokenBucket::new(0.0, 100));
        let now = Instant::now();
        let allowed: u32 = (0..8)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || takes(&b, now, 50))
            })
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(allowed, 100);
    }

    #[test]
    fn keys_have_separate_buckets() {
        let limiters = RateLimiters::new(1.0, 2, 100);
        let t0 = Instant::now();
        assert!(limiters.try_take(&"a", t0));
        assert!(limiters.try_take(&"a", t0));
        assert!(!limiters.try_take(&"a", t0));
        assert!(limiters.try_take(&"b", t0), "b is not limited by a");
        assert!(limiters.try_take(&"a", t0 + SEC));
        assert_eq!(limiters.len(), 2);
    }

    #[test]
    fn bounded_number_of_keys() {
        for max in [1, 7, 100, DEFAULT_MAX_KEYS] {
            let limiters = RateLimiters::new(1.0, 1, max);
            let t0 = Instant::now();
            for i in 0..3 * max as u64 {
                assert!(limiters.try_take(&i, t0 + Duration::from_nanos(i)));
                assert!(limiters.len() <= max, "max {max}: {} keys", limiters.len());
            }
        }
    }

    #[test]
    fn least_recently_used_is_evicted() {
        // Rate so low that no bucket refills during the test: eviction must choose by age.
        let limiters = RateLimiters::new(0.001, 1, 4);
        let t0 = Instant::now();
        for (i, key) in ["k1", "k2", "k3", "k4"].iter().enumerate() {
            assert!(limiters.try_take(key, t0 + i as u32 * MS));
        }
        assert!(
            !limiters.try_take(&"k1", t0 + 10 * MS),
            "k1 used again: now newest"
        );
        assert!(
            limiters.try_take(&"k5", t0 + 11 * MS),
            "a new key gets a full bucket"
        );
        assert_eq!(limiters.len(), 4);
        assert!(
            !limiters.try_take(&"k1", t0 + 12 * MS),
            "k1 kept its empty bucket"
        );
        assert!(
            limiters.try_take(&"k2", t0 + 13 * MS),
            "k2 was evicted: full again"
        );
    }

    #[test]
    fn refilled_buckets_are_dropped_first() {
        let limiters = RateLimiters::new(10.0, 1, 4);
        let t0 = Instant::now();
        for key in 0..4 {
            assert!(limiters.try_take(&key, t0));
        }
        assert!(!limiters.try_take(&3, t0 + 50 * MS));
        // At t0 + 1 s every bucket has refilled: all four are as good as new and go.
        assert!(limiters.try_take(&4, t0 + SEC));
        assert_eq!(limiters.len(), 1);
    }

    #[test]
    fn sharded_map_is_shared_across_threads() {
        let limiters = Arc::new(RateLimiters::new(0.0, 10, DEFAULT_MAX_KEYS));
        let now = Instant::now();
        let allowed: usize = (0..8)
            .map(|_| {
                let limiters = limiters.clone();
                std::thread::spawn(move || {
                    (0..100u32)
                        .flat_map(|_| 0..20u32)
                        .filter(|key| limiters.try_take(key, now))
                        .count()
                })
            })
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(
            allowed,
            20 * 10,
            "10 tokens for each of 20 keys, never more"
        );
    }
}
