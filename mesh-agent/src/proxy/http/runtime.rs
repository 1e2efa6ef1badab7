//! Per-service and per-endpoint runtime state of the L7 proxy (and of L4 service load
//! balancing): outstanding requests, outlier ejections, circuit breaker, retry budget, rate
//! limits. Keyed by service; rebuilt when a service's traffic policy changes.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, atomic::AtomicUsize},
    time::{Duration, Instant},
};

use tracing::warn;

use super::EndpointOutcome;
use crate::{
    resilience::{
        self, CircuitBreaker, CircuitLimits, EndpointStats, OutlierDetector, OutlierState,
        RateLimiters, RetryBudget,
    },
    service::{LoadBalancer, Service, ServiceIndex, TrafficPolicy},
};

/// Longest outlier ejection.
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// Retry budget: retries may add this fraction of the requests of the last window...
const RETRY_BUDGET_RATIO: f64 = 0.2;
/// ...plus this many per second, so quiet services can still retry.
const RETRY_BUDGET_MIN_PER_SEC: u32 = 10;
const RETRY_BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// All L7 runtime state of this agent.
#[derive(Default)]
pub struct L7Runtime {
    /// By namespace, then name: looked up with `&str`s, so a request allocates no key.
    services: Mutex<HashMap<String, HashMap<String, Arc<ServiceRuntime>>>>,
    rate_limits: Mutex<HashMap<RateLimitKey, Arc<RateLimiters<std::net::IpAddr>>>>,
}

/// A route rule's label and its limit (rate as `f64` bits): a changed limit starts afresh.
type RateLimitKey = (Arc<str>, u64, u32);

/// One endpoint as the balancer sees it.
pub struct Endpoint {
    pub addr: SocketAddr,
    pub stats: Arc<EndpointRuntime>,
}

pub struct EndpointRuntime {
    pub stats: Arc<EndpointStats>,
    outlier: OutlierState,
    /// `ip:port` as a URI authority, built once rather than per request.
    pub authority: Option<http::uri::Authority>,
}

pub struct ServiceRuntime {
    policy: TrafficPolicy,
    pub circuit: CircuitBreaker,
    pub budget: RetryBudget,
    outlier: Option<OutlierDetector>,
    round_robin: AtomicUsize,
    endpoints: Mutex<HashMap<SocketAddr, Arc<EndpointRuntime>>>,
    name: String,
    /// `name.namespace.svc.cluster.local`, as access logs and metrics name the backend.
    pub host: Arc<str>,
}

impl L7Runtime {
    /// The runtime of `service`, created on first use or when its traffic policy changed.
    pub fn service(&self, service: &Service) -> Arc<ServiceRuntime> {
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rt) = services
            .get(&service.namespace)
            .and_then(|names| names.get(&service.name))
            && rt.policy == service.traffic_policy
        {
            return rt.clone();
        }
        let rt = Arc::new(ServiceRuntime::new(service));
        services
            .entry(service.namespace.clone())
            .or_default()
            .insert(service.name.clone(), rt.clone());
        rt
    }

    /// Forgets what the current services no longer need: the runtimes of services that are
    /// gone and the state of endpoints that left their service. Pod addresses change with
    /// every rollout; without this the maps would keep every address a service ever had.
    pub fn prune(&self, current: &ServiceIndex) {
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        services.retain(|namespace, names| {
            names.retain(|name, rt| match current.by_name(namespace, name) {
                Some(service) => {
                    rt.retain_endpoints(current.endpoints(service));
                    true
                }
                None => false,
            });
            !names.is_empty()
        });
    }

    /// Takes a token from the bucket of (`route rule`, `endpoint`).
    pub fn rate_limit(
        &self,
        rule: &Arc<str>,
        endpoint: &SocketAddr,
        requests_per_second: f64,
        burst: u32,
        now: Instant,
    ) -> bool {
        let limiters = {
            let mut all = self.rate_limits.lock().unwrap_or_else(|p| p.into_inner());
            all.entry((rule.clone(), requests_per_second.to_bits(), burst))
                .or_insert_with(|| {
                    Arc::new(RateLimiters::new(
                        requests_per_second,
                        burst,
                        resilience::DEFAULT_MAX_KEYS,
                    ))
                })
                .clone()
        };
        limiters.try_take(&endpoint.ip(), now)
    }
}

impl ServiceRuntime {
    fn new(service: &Service) -> Self {
        let pool = &service.traffic_policy.connection_pool;
        Self {
            policy: service.traffic_policy.clone(),
            circuit: CircuitBreaker::new(CircuitLimits {
                max_connections: pool.max_connections as usize,
                max_pending_requests: pool.max_pending_requests as usize,
                max_requests: pool.max_requests as usize,
            }),
            budget: RetryBudget::new(
                RETRY_BUDGET_RATIO,
                RETRY_BUDGET_MIN_PER_SEC,
                RETRY_BUDGET_WINDOW,
            ),
            outlier: service
                .traffic_policy
                .outlier_detection
                .as_ref()
                .map(|o| OutlierDetector {
                    consecutive_5xx: o.consecutive_5xx_errors,
                    consecutive_connect_failures: o.consecutive_connect_failures,
                    base_ejection: o.base_ejection_time,
                    max_ejection: MAX_EJECTION,
                    max_ejection_percent: o.max_ejection_percent,
                }),
            round_robin: AtomicUsize::new(0),
            endpoints: Mutex::new(HashMap::new()),
            name: format!("{}/{}", service.namespace, service.name),
            host: format!("{}.{}.svc.cluster.local", service.name, service.namespace).into(),
        }
    }

    /// Drops the state of endpoints whose address is not in `current`.
    fn retain_endpoints(&self, current: &[IpAddr]) {
        let current: std::collections::HashSet<IpAddr> = current.iter().copied().collect();
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        endpoints.retain(|addr, _| current.contains(&addr.ip()));
    }

    /// Endpoints this runtime keeps state for.
    #[cfg(test)]
    fn tracked_endpoints(&self) -> usize {
        self.endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    fn endpoint(&self, addr: SocketAddr) -> Arc<EndpointRuntime> {
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        endpoints
            .entry(addr)
            .or_insert_with(|| {
                Arc::new(EndpointRuntime {
                    stats: Arc::new(EndpointStats::default()),
                    outlier: OutlierState::new(),
                    authority: http::uri::Authority::try_from(addr.to_string()).ok(),
                })
            })
            .clone()
    }

    /// Picks an endpoint among `endpoints` (at `port`), skipping ejected ones unless all are
    /// ejected (then all are candidates, like Envoy's panic mode).
    pub fn pick(
        &self,
        endpoints: &[IpAddr],
        port: u16,
        rng: &mut fastrand::Rng,
    ) -> Option<Endpoint> {
        if endpoints.is_empty() {
            return None;
        }
        let now = Instant::now();
        if self.policy.load_balancer == LoadBalancer::LeastRequest
            && let Some(chosen) = self.pick_p2c_sampled(endpoints, port, rng, now)
        {
            return Some(chosen);
        }
        let all: Vec<Endpoint> = endpoints
            .iter()
            .map(|&ip| {
                let addr = SocketAddr::new(ip, port);
                Endpoint {
                    addr,
                    stats: self.endpoint(addr),
                }
            })
            .collect();
        let healthy: Vec<&Endpoint> = match &self.outlier {
            Some(_) => all
                .iter()
                .filter(|e| !e.stats.outlier.is_ejected(now))
                .collect(),
            None => all.iter().collect(),
        };
        let candidates: Vec<&Endpoint> = if healthy.is_empty() {
            all.iter().collect()
        } else {
            healthy
        };
        let index = match self.policy.load_balancer {
            LoadBalancer::LeastRequest => {
                let stats: Vec<&EndpointStats> =
                    candidates.iter().map(|e| e.stats.stats.as_ref()).collect();
                resilience::pick_p2c(&stats, rng)?
            }
            LoadBalancer::RoundRobin => {
                resilience::pick_round_robin(candidates.len(), &self.round_robin)?
            }
            LoadBalancer::Random => resilience::pick_random(candidates.len(), rng)?,
        };
        let chosen = candidates.get(index)?;
        Some(Endpoint {
            addr: chosen.addr,
            stats: chosen.stats.clone(),
        })
    }

    /// Power of two choices without visiting every endpoint: two distinct endpoints drawn at
    /// random, an ejected draw redrawn (rejection sampling keeps the choice uniform over the
    /// healthy ones). `None` when a few draws find no two healthy ones; the caller then scans
    /// them all.
    fn pick_p2c_sampled(
        &self,
        endpoints: &[IpAddr],
        port: u16,
        rng: &mut fastrand::Rng,
        now: Instant,
    ) -> Option<Endpoint> {
        const DRAWS: usize = 4;
        let n = endpoints.len();
        // `other`: an index not to draw (the first choice), skipped rather than redrawn.
        let mut draw = |other: Option<usize>| {
            (0..DRAWS).find_map(|_| {
                let i = match other {
                    None => rng.usize(0..n),
                    Some(o) => {
                        let i = rng.usize(0..n - 1);
                        if i >= o { i + 1 } else { i }
                    }
                };
                let addr = SocketAddr::new(endpoints[i], port);
                let stats = self.endpoint(addr);
                let ejected = self.outlier.is_some() && stats.outlier.is_ejected(now);
                (!ejected).then_some((i, Endpoint { addr, stats }))
            })
        };
        let (first_index, first) = draw(None)?;
        if n == 1 {
            return Some(first);
        }
        let (_, second) = draw(Some(first_index))?;
        let pair = [first.stats.stats.as_ref(), second.stats.stats.as_ref()];
        match resilience::pick_p2c(&pair, rng)? {
            0 => Some(first),
            _ => Some(second),
        }
    }

    /// Feeds an attempt's outcome to outlier detection.
    pub fn record(&self, endpoint: &Endpoint, outcome: EndpointOutcome, pool_size: usize) {
        let Some(detector) = &self.outlier else {
            return;
        };
        let now = Instant::now();
        let ejected_now = {
            let endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
            endpoints
                .values()
                .filter(|e| e.outlier.is_ejected(now))
                .count()
        };
        let outcome = match outcome {
            EndpointOutcome::Success => resilience::Outcome::Success,
            EndpointOutcome::Http5xx => resilience::Outcome::Http5xx,
            EndpointOutcome::ConnectFailure => resilience::Outcome::ConnectFailure,
        };
        if let Some(ejection) = detector.record(
            &endpoint.stats.outlier,
            outcome,
            now,
            ejected_now,
            pool_size,
        ) {
            warn!(service = %self.name, endpoint = %endpoint.addr, ejection = ?ejection, "endpoint ejected by outlier detection");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services(endpoints: &[&str]) -> Vec<Service> {
        let yaml = format!(
            "- name: web\n  namespace: shop\n  vips: [10.96.0.1]\n  endpoints: [{}]\n  ports: [{{port: 80, appProtocol: http}}]\n",
            endpoints.join(", ")
        );
        let file: Vec<crate::service::FileService> =
            serde_yaml::from_str(&yaml).expect("well-formed YAML");
        crate::service::validate_services(file).expect("valid")
    }

    #[test]
    fn prune_forgets_departed_endpoints_and_services() {
        let l7 = L7Runtime::default();
        let before = services(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        let index = ServiceIndex::new(&before, std::iter::empty());
        let rt = l7.service(&before[0]);
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..200 {
            rt.pick(index.endpoints(&before[0]), 80, &mut rng)
                .expect("an endpoint");
        }
        assert_eq!(rt.tracked_endpoints(), 3, "every endpoint was picked");

        // A rollout replaced two of them.
        let after = services(&["10.0.0.1", "10.0.0.9"]);
        l7.prune(&ServiceIndex::new(&after, std::iter::empty()));
        assert_eq!(rt.tracked_endpoints(), 1, "only 10.0.0.1 is left");
        assert!(
            Arc::ptr_eq(&rt, &l7.service(&after[0])),
            "the runtime is kept"
        );

        // The service is deleted.
        l7.prune(&ServiceIndex::new(&[], std::iter::empty()));
        assert!(
            !Arc::ptr_eq(&rt, &l7.service(&after[0])),
            "the runtime was dropped"
        );
    }
}
