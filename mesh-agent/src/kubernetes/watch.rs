//! Watching one kind of object: a kube-runtime watcher (list, then watch from the list's
//! resourceVersion, bookmarks, relist on 410 Gone) feeding a reflector store, with
//! reconnection backoff; every change wakes the snapshot builder.
use std::{
    fmt::Debug,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures_util::StreamExt as _;
use kube::{
    Resource,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        utils::Backoff,
        watcher::{self, Event},
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

/// First and longest pause between attempts to reach the API server again.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Exponential backoff with jitter (0.5x to 1x the step), reset after a success.
pub struct WatchBackoff {
    next: Duration,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: BACKOFF_MIN }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let step = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        Some(step.mul_f64(0.5 + fastrand::f64() / 2.0))
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// A watched kind's store and whether its first list is in (or the API lacks the kind).
pub struct Watched<K: Resource + 'static>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    pub store: Store<K>,
    pub settled: Arc<AtomicBool>,
}

/// Starts watching `api` with `config` into a new store; `strip` trims each object before it is
/// stored (memory: only what the snapshot needs is kept). `changed` is notified on every change.
pub fn spawn<K>(
    what: &'static str,
    api: kube::Api<K>,
    config: watcher::Config,
    dyntype: K::DynamicType,
    strip: fn(&mut K),
    changed: Arc<Notify>,
) -> Watched<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let writer = reflector::store::Writer::new(dyntype);
    let store = writer.as_reader();
    let settled = Arc::new(AtomicBool::new(false));
    let flag = settled.clone();
    let stream = watcher::watcher(api, config)
        .modify(strip)
        .backoff(WatchBackoff::default())
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(item) = stream.next().await {
            match item {
                Ok(event) => {
                    if failing {
                        info!(resource = what, "watching again");
                        failing = false;
                    }
                    if let Event::InitDone = event {
                        debug!(resource = what, "listed");
                        flag.store(true, Ordering::Release);
                    }
                    changed.notify_one();
                }
                Err(e) => {
                    if is_not_found(&e) {
                        // The kind is not installed (no Gateway API CRDs, say): nothing of it
                        // exists, which must not hold the snapshot back. Keep trying, in case
                        // it is installed later.
                        if !flag.swap(true, Ordering::AcqRel) {
                            warn!(
                                resource = what,
                                "the API server does not serve this kind; treating it as empty"
                            );
                            changed.notify_one();
                        }
                    } else if !failing {
                        warn!(resource = what, error = %e, "watch failed; retrying with backoff, serving the last snapshot meanwhile");
                    } else {
                        debug!(resource = what, error = %e, "watch still failing");
                    }
                    failing = true;
                }
            }
        }
    });
    Watched { store, settled }
}

fn is_not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s.code == 404,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_bound_and_resets() {
        let mut b = WatchBackoff::default();
        let first = b.next().expect("a step");
        assert!(first <= BACKOFF_MIN && first >= BACKOFF_MIN / 2);
        for _ in 0..20 {
            assert!(b.next().expect("a step") <= BACKOFF_MAX);
        }
        assert!(b.next().expect("a step") >= BACKOFF_MAX / 2);
        b.reset();
        assert!(b.next().expect("a step") <= BACKOFF_MIN);
    }
}
