//! Kubernetes Services in the config model: virtual IPs, ports and their application protocol,
//! the pods behind them, and an Istio `DestinationRule`-like traffic policy.
//!
//! ```yaml
//! services:
//!   - name: backend
//!     namespace: shop
//!     vips: [10.96.0.10]              # ClusterIPs; at least one
//!     selector: {app: backend}        # endpoints: pods of `shop` carrying all these labels
//!     endpoints: [10.61.0.7]          # optional: the endpoint addresses themselves (Kubernetes
//!                                     # mode: the ready addresses of the EndpointSlices);
//!                                     # when given, the selector does not pick endpoints
//!     ports:
//!       - name: http                  # required when the service has several ports
//!         port: 80
//!         targetPort: 8080            # optional, default = port (numbers only)
//!         protocol: TCP               # optional; only TCP
//!         appProtocol: http           # optional: http | http2 | kubernetes.io/h2c | grpc | tcp
//!     trafficPolicy:                  # optional
//!       loadBalancer: LEAST_REQUEST   # LEAST_REQUEST | ROUND_ROBIN | RANDOM (or Istio's {simple: ...})
//!       connectionPool: {maxConnections: 1024, maxPendingRequests: 1024, maxRequests: 1024}
//!       outlierDetection:             # absent = no outlier detection
//!         consecutive5xxErrors: 5     # 0 disables this trigger
//!         consecutiveConnectFailures: 5
//!         interval: 10s
//!         baseEjectionTime: 30s
//!         maxEjectionPercent: 50
//! ```
//!
//! Semantics:
//! - The application protocol of a port comes from `appProtocol` when given, else from the
//!   port name as Istio does (`http`/`http-*`, `http2`/`http2-*`, `grpc`/`grpc-*`,
//!   `tcp`/`tcp-*`), else it is [`AppProtocol::Unknown`] and is to be sniffed.
//! - Endpoints are the pods of the service's namespace whose labels include every selector
//!   label, on any node, enrolled or not (as Kubernetes EndpointSlices). A service without a
//!   selector has no endpoints (Kubernetes leaves those to be managed by hand).
//! - VIPs are stored canonical (IPv4-mapped IPv6 as IPv4); [`ServiceIndex::by_vip`]
//!   canonicalizes the address it is given, since dual-stack sockets report IPv4 peers mapped.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{ConfigError, is_dns_label, is_dns1035_label, parse_duration},
    state::Workload,
};

/// Where the services sit in the config file, for error paths.
const FIELD: &str = "services";

// ---------------------------------------------------------------------------------------------
// The file's shape.
// ---------------------------------------------------------------------------------------------

/// One entry of `services:` as written in the file.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileService {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub vips: Vec<String>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub endpoints: Option<Vec<String>>,
    #[serde(default)]
    pub ports: Vec<FileServicePort>,
    #[serde(default)]
    pub traffic_policy: Option<FileTrafficPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: i64,
    #[serde(default)]
    pub target_port: Option<FilePortValue>,
    /// Kubernetes' transport protocol; only `TCP`.
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

/// A port as written: a number, or (as Kubernetes allows for `targetPort`) a string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum FilePortValue {
    Number(i64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileTrafficPolicy {
    #[serde(default)]
    pub load_balancer: Option<FileLoadBalancer>,
    #[serde(default)]
    pub connection_pool: Option<FileConnectionPool>,
    #[serde(default)]
    pub outlier_detection: Option<FileOutlierDetection>,
}

/// `LEAST_REQUEST`, or Istio's spelling `{simple: LEAST_REQUEST}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum FileLoadBalancer {
    Name(String),
    Simple(FileSimpleLoadBalancer),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileSimpleLoadBalancer {
    pub simple: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConnectionPool {
    #[serde(default)]
    pub max_connections: Option<i64>,
    #[serde(default)]
    pub max_pending_requests: Option<i64>,
    #[serde(default)]
    pub max_requests: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileOutlierDetection {
    #[serde(default, rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<i64>,
    #[serde(default)]
    pub consecutive_connect_failures: Option<i64>,
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub base_ejection_time: Option<String>,
    #[serde(default)]
    pub max_ejection_percent: Option<i64>,
}

// ---------------------------------------------------------------------------------------------
// The validated form.
// ---------------------------------------------------------------------------------------------

/// A validated Service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// Canonical addresses (IPv4-mapped IPv6 stored as IPv4), no duplicates.
    pub vips: Vec<IpAddr>,
    /// At least one; distinct numbers and names.
    pub ports: Vec<ServicePort>,
    /// Empty = no endpoints (a selector-less Service), unless `endpoints` lists them.
    pub selector: BTreeMap<String, String>,
    /// The endpoint addresses as listed (canonical, sorted, no duplicates); `None` = the pods
    /// the selector picks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<IpAddr>>,
    pub traffic_policy: TrafficPolicy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    /// Empty when the service's only port is unnamed.
    pub name: String,
    pub port: u16,
    pub target_port: u16,
    pub protocol: AppProtocol,
}

/// The application protocol spoken on a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1 (or HTTP/2 with prior knowledge, which sniffing tells apart).
    Http,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
    /// gRPC (HTTP/2).
    Grpc,
    /// Opaque TCP: relayed at L4, never parsed.
    Tcp,
    /// Not declared: to be sniffed.
    Unknown,
}

impl AppProtocol {
    /// Whether the port is declared HTTP of some version (gRPC included).
    pub fn is_http(self) -> bool {
        matches!(
            self,
            AppProtocol::Http | AppProtocol::Http2 | AppProtocol::Grpc
        )
    }

    /// From a Kubernetes `appProtocol` value; `None` if not one Trellis knows.
    pub fn from_app_protocol(value: &str) -> Option<Self> {
        if value == "kubernetes.io/h2c" {
            return Some(AppProtocol::Http2);
        }
        Some(match value.to_ascii_lowercase().as_str() {
            "http" => AppProtocol::Http,
            "http2" | "h2c" => AppProtocol::Http2,
            "grpc" => AppProtocol::Grpc,
            "tcp" => AppProtocol::Tcp,
            _ => return None,
        })
    }

    /// From a port name, as Istio's protocol selection: `<protocol>` or `<protocol>-<suffix>`.
    pub fn from_port_name(name: &str) -> Self {
        let prefix = name.split_once('-').map_or(name, |(p, _)| p);
        match prefix.to_ascii_lowercase().as_str() {
            "http" => AppProtocol::Http,
            "http2" => AppProtocol::Http2,
            "grpc" => AppProtocol::Grpc,
            "tcp" => AppProtocol::Tcp,
            _ => AppProtocol::Unknown,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TrafficPolicy {
    pub load_balancer: LoadBalancer,
    pub connection_pool: ConnectionPool,
    /// `None` = endpoints are never ejected.
    pub outlier_detection: Option<OutlierDetection>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LoadBalancer {
    /// Power of two choices: the less loaded of two random endpoints.
    #[default]
    LeastRequest,
    RoundRobin,
    Random,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConnectionPool {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
}

impl Default for ConnectionPool {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OutlierDetection {
    /// 0 = 5xx responses never eject.
    pub consecutive_5xx_errors: u32,
    /// 0 = connect failures never eject.
    pub consecutive_connect_failures: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    /// 0..=100
    pub max_ejection_percent: u8,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_5xx_errors: 5,
            consecutive_connect_failures: 5,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 50,
        }
    }
}

impl Service {
    /// The service port numbered `port`.
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// Whether `pod` is an endpoint of the service (same namespace, every selector label).
    pub fn selects(&self, pod: &Workload) -> bool {
        !self.selector.is_empty()
            && pod.key.namespace == self.namespace
            && self
                .selector
                .iter()
                .all(|(k, v)| pod.labels.get(k) == Some(v))
    }
}

/// The endpoints of `svc` among `pods`, sorted by pod key.
pub fn endpoints<'a>(svc: &Service, pods: impl Iterator<Item = &'a Workload>) -> Vec<&'a Workload> {
    let mut selected: Vec<&Workload> = pods.filter(|pod| svc.selects(pod)).collect();
    selected.sort_by(|a, b| a.key.cmp(&b.key));
    selected
}

// ---------------------------------------------------------------------------------------------
// Lookup.
// ---------------------------------------------------------------------------------------------

/// The services of a snapshot, indexed by VIP:port and by namespace/name. Lookups hash and do
/// not allocate.
#[derive(Clone, Debug, Default)]
pub struct ServiceIndex {
    services: Vec<Service>,
    /// namespace -> name -> index into `services`.
    names: HashMap<String, HashMap<String, usize>>,
    /// (VIP, port) -> (service, port) indices.
    vips: HashMap<(IpAddr, u16), (usize, usize)>,
    /// Endpoint addresses of each service (same order as `services`), selected once per
    /// snapshot rather than per request.
    endpoints: Vec<Vec<IpAddr>>,
}

impl ServiceIndex {
    /// Indexes `services`, with their endpoints selected among `pods`.
    pub fn new<'a>(services: &[Service], pods: impl Iterator<Item = &'a Workload> + Clone) -> Self {
        let mut index = ServiceIndex {
            services: services.to_vec(),
            endpoints: services
                .iter()
                .map(|svc| match &svc.endpoints {
                    Some(listed) => listed.clone(),
                    None => endpoints(svc, pods.clone()).iter().map(|w| w.ip).collect(),
                })
                .collect(),
            ..Default::default()
        };
        for (s, svc) in services.iter().enumerate() {
            index
                .names
                .entry(svc.namespace.clone())
                .or_default()
                .insert(svc.name.clone(), s);
            for vip in &svc.vips {
                for (p, port) in svc.ports.iter().enumerate() {
                    index.vips.insert((vip.to_canonical(), port.port), (s, p));
                }
            }
        }
        index
    }

    #[cfg(test)]
    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// The service and port a connection to `ip:port` is for.
    pub fn by_vip(&self, ip: IpAddr, port: u16) -> Option<(&Service, &ServicePort)> {
        let &(s, p) = self.vips.get(&(ip.to_canonical(), port))?;
        let svc = &self.services[s];
        Some((svc, &svc.ports[p]))
    }

    pub fn by_name(&self, namespace: &str, name: &str) -> Option<&Service> {
        let s = *self.names.get(namespace)?.get(name)?;
        Some(&self.services[s])
    }

    /// The endpoint addresses of `service` (sorted by pod), empty for an unknown service.
    pub fn endpoints(&self, service: &Service) -> &[IpAddr] {
        self.names
            .get(&service.namespace)
            .and_then(|names| names.get(&service.name))
            .map_or(&[], |&s| self.endpoints[s].as_slice())
    }
}

// ---------------------------------------------------------------------------------------------
// Validation.
// ---------------------------------------------------------------------------------------------

/// Validates the file's services. Errors name the field (`services[0].ports[1].targetPort`).
pub fn validate_services(file: Vec<FileService>) -> Result<Vec<Service>, ConfigError> {
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    let mut owner_of_vip_port: HashMap<(IpAddr, u16), (String, String)> = HashMap::new();
    let mut services = Vec::with_capacity(file.len());
    for (i, s) in file.into_iter().enumerate() {
        let at = format!("{FIELD}[{i}]");
        if !is_dns1035_label(&s.name) {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!(
                    "{:?} is not a DNS-1035 label (lower-case letters, digits, '-', starting with a letter)",
                    s.name
                ),
            ));
        }
        if !is_dns_label(&s.namespace) {
            return Err(ConfigError::new(
                format!("{at}.namespace"),
                format!(
                    "{:?} is not a DNS-1123 label (lower-case letters, digits, '-')",
                    s.namespace
                ),
            ));
        }
        if let Some(first) = seen.insert((s.namespace.clone(), s.name.clone()), i) {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!(
                    "service {}/{} is already defined at {FIELD}[{first}]",
                    s.namespace, s.name
                ),
            ));
        }
        if let Some(key) = s.selector.keys().find(|k| k.is_empty()) {
            return Err(ConfigError::new(
                format!("{at}.selector"),
                format!("label key {key:?} must not be empty"),
            ));
        }
        let ports = validate_ports(&s.ports, &at)?;
        let vips = validate_vips(&s.vips, &at)?;
        for (k, vip) in vips.iter().enumerate() {
            for port in &ports {
                let owner = (s.namespace.clone(), s.name.clone());
                if let Some((ns, name)) = owner_of_vip_port.insert((*vip, port.port), owner) {
                    return Err(ConfigError::new(
                        format!("{at}.vips[{k}]"),
                        format!(
                            "{} is already served by service {ns}/{name}",
                            std::net::SocketAddr::new(*vip, port.port)
                        ),
                    ));
                }
            }
        }
        let traffic_policy =
            validate_traffic_policy(s.traffic_policy, &format!("{at}.trafficPolicy"))?;
        services.push(Service {
            name: s.name,
            namespace: s.namespace,
            vips,
            ports,
            selector: s.selector,
            endpoints: validate_endpoints(s.endpoints.as_deref(), &at)?,
            traffic_policy,
        });
    }
    Ok(services)
}

fn validate_endpoints(
    values: Option<&[String]>,
    at: &str,
) -> Result<Option<Vec<IpAddr>>, ConfigError> {
    let Some(values) = values else {
        return Ok(None);
    };
    let mut ips = Vec::with_capacity(values.len());
    for (k, v) in values.iter().enumerate() {
        let ip: IpAddr = v.parse().map_err(|_| {
            ConfigError::new(
                format!("{at}.endpoints[{k}]"),
                format!("{v:?} is not an IP address"),
            )
        })?;
        ips.push(ip.to_canonical());
    }
    ips.sort();
    ips.dedup();
    Ok(Some(ips))
}

fn validate_vips(values: &[String], at: &str) -> Result<Vec<IpAddr>, ConfigError> {
    if values.is_empty() {
        return Err(ConfigError::new(
            format!("{at}.vips"),
            "must list at least one virtual IP",
        ));
    }
    let mut vips = Vec::with_capacity(values.len());
    for (k, value) in values.iter().enumerate() {
        let field = || format!("{at}.vips[{k}]");
        let ip = value
            .parse::<IpAddr>()
            .map_err(|_| ConfigError::new(field(), format!("{value:?} is not an IP address")))?
            .to_canonical();
        if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
            return Err(ConfigError::new(
                field(),
                format!("{ip} cannot be a virtual IP"),
            ));
        }
        if vips.contains(&ip) {
            return Err(ConfigError::new(field(), format!("{ip} is listed twice")));
        }
        vips.push(ip);
    }
    Ok(vips)
}

fn validate_ports(values: &[FileServicePort], at: &str) -> Result<Vec<ServicePort>, ConfigError> {
    if values.is_empty() {
        return Err(ConfigError::new(
            format!("{at}.ports"),
            "must list at least one port",
        ));
    }
    let mut ports: Vec<ServicePort> = Vec::with_capacity(values.len());
    for (p, fp) in values.iter().enumerate() {
        let at = format!("{at}.ports[{p}]");
        let name = match &fp.name {
            Some(name) => {
                if !is_dns_label(name) {
                    return Err(ConfigError::new(
                        format!("{at}.name"),
                        format!("{name:?} is not a DNS-1123 label"),
                    ));
                }
                if ports.iter().any(|other| &other.name == name) {
                    return Err(ConfigError::new(
                        format!("{at}.name"),
                        format!("port name {name:?} is used twice"),
                    ));
                }
                name.clone()
            }
            None if values.len() > 1 => {
                return Err(ConfigError::new(
                    format!("{at}.name"),
                    "is required when the service has more than one port",
                ));
            }
            None => String::new(),
        };
        let port = port_number(fp.port)
            .ok_or_else(|| ConfigError::new(format!("{at}.port"), not_a_port(fp.port)))?;
        if ports.iter().any(|other| other.port == port) {
            return Err(ConfigError::new(
                format!("{at}.port"),
                format!("port {port} is listed twice"),
            ));
        }
        let target_port = match &fp.target_port {
            None => port,
            Some(FilePortValue::Number(n)) => port_number(*n)
                .ok_or_else(|| ConfigError::new(format!("{at}.targetPort"), not_a_port(*n)))?,
            Some(FilePortValue::Text(text)) => text
                .parse::<i64>()
                .ok()
                .filter(|_| text.bytes().all(|b| b.is_ascii_digit()))
                .and_then(port_number)
                .ok_or_else(|| {
                    ConfigError::new(
                        format!("{at}.targetPort"),
                        format!(
                            "{text:?} is not a port number (1-65535); named target ports are not supported"
                        ),
                    )
                })?,
        };
        match fp.protocol.as_deref() {
            None | Some("TCP") => {}
            Some(other) => {
                return Err(ConfigError::new(
                    format!("{at}.protocol"),
                    format!("{other:?}: only TCP services are supported"),
                ));
            }
        }
        let protocol = match &fp.app_protocol {
            Some(value) => AppProtocol::from_app_protocol(value).ok_or_else(|| {
                ConfigError::new(
                    format!("{at}.appProtocol"),
                    format!(
                        "{value:?} is not a supported application protocol (http, http2, kubernetes.io/h2c, grpc, tcp)"
                    ),
                )
            })?,
            None => AppProtocol::from_port_name(&name),
        };
        ports.push(ServicePort {
            name,
            port,
            target_port,
            protocol,
        });
    }
    Ok(ports)
}

fn validate_traffic_policy(
    file: Option<FileTrafficPolicy>,
    at: &str,
) -> Result<TrafficPolicy, ConfigError> {
    let mut policy = TrafficPolicy::default();
    let Some(file) = file else {
        return Ok(policy);
    };
    if let Some(lb) = file.load_balancer {
        let (name, field) = match &lb {
            FileLoadBalancer::Name(name) => (name.as_str(), format!("{at}.loadBalancer")),
            FileLoadBalancer::Simple(s) => (s.simple.as_str(), format!("{at}.loadBalancer.simple")),
        };
        policy.load_balancer = match name {
            // LEAST_CONN is Istio's deprecated name of LEAST_REQUEST.
            "LEAST_REQUEST" | "LEAST_CONN" => LoadBalancer::LeastRequest,
            "ROUND_ROBIN" => LoadBalancer::RoundRobin,
            "RANDOM" => LoadBalancer::Random,
            other => {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "{other:?} is not a load balancer (LEAST_REQUEST, ROUND_ROBIN, RANDOM)"
                    ),
                ));
            }
        };
    }
    if let Some(pool) = file.connection_pool {
        let at = format!("{at}.connectionPool");
        let defaults = ConnectionPool::default();
        let limit = |value: Option<i64>, field: &str, default: u32| match value {
            None => Ok(default),
            Some(n) => u32::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
                ConfigError::new(
                    format!("{at}.{field}"),
                    format!("{n} is not a limit (1 to {})", u32::MAX),
                )
            }),
        };
        policy.connection_pool = ConnectionPool {
            max_connections: limit(
                pool.max_connections,
                "maxConnections",
                defaults.max_connections,
            )?,
            max_pending_requests: limit(
                pool.max_pending_requests,
                "maxPendingRequests",
                defaults.max_pending_requests,
            )?,
            max_requests: limit(pool.max_requests, "maxRequests", defaults.max_requests)?,
        };
    }
    if let Some(od) = file.outlier_detection {
        let at = format!("{at}.outlierDetection");
        let defaults = OutlierDetection::default();
        let count = |value: Option<i64>, field: &str, default: u32| match value {
            None => Ok(default),
            Some(n) => u32::try_from(n).map_err(|_| {
                ConfigError::new(
                    format!("{at}.{field}"),
                    format!("{n} is not a count (0 disables)"),
                )
            }),
        };
        let duration = |value: &Option<String>, field: &str, default: Duration| match value {
            None => Ok(default),
            Some(text) => parse_duration(text)
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    ConfigError::new(
                        format!("{at}.{field}"),
                        format!("{text:?} is not a positive duration (like 500ms, 10s, 2m, 1h)"),
                    )
                }),
        };
        let max_ejection_percent = match od.max_ejection_percent {
            None => defaults.max_ejection_percent,
            Some(n) => u8::try_from(n).ok().filter(|n| *n <= 100).ok_or_else(|| {
                ConfigError::new(
                    format!("{at}.maxEjectionPercent"),
                    format!("{n} is not a percentage (0-100)"),
                )
            })?,
        };
        policy.outlier_detection = Some(OutlierDetection {
            consecutive_5xx_errors: count(
                od.consecutive_5xx_errors,
                "consecutive5xxErrors",
                defaults.consecutive_5xx_errors,
            )?,
            consecutive_connect_failures: count(
                od.consecutive_connect_failures,
                "consecutiveConnectFailures",
                defaults.consecutive_connect_failures,
            )?,
            interval: duration(&od.interval, "interval", defaults.interval)?,
            base_ejection_time: duration(
                &od.base_ejection_time,
                "baseEjectionTime",
                defaults.base_ejection_time,
            )?,
            max_ejection_percent,
        });
    }
    Ok(policy)
}

fn port_number(n: i64) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

fn not_a_port(n: i64) -> String {
    format!("{n} is not a port number (1-65535)")
}

/// The index of the first key equal to an earlier one, if any.
pub(crate) fn first_duplicate<K: std::hash::Hash + Eq>(
    keys: impl IntoIterator<Item = K>,
) -> Option<usize> {
    let mut seen = HashSet::new();
    keys.into_iter().position(|k| !seen.insert(k))
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, path::PathBuf};

    use super::*;
    use crate::state::{Identity, PodKey};

    #[derive(Deserialize)]
    struct Doc {
        services: Vec<FileService>,
    }

    fn parse(yaml: &str) -> Result<Vec<Service>, ConfigError> {
        let doc: Doc = serde_yaml::from_str(yaml).expect("well-formed YAML");
        validate_services(doc.services)
    }

    fn parse_ok(yaml: &str) -> Vec<Service> {
        parse(yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    fn field_of(yaml: &str) -> String {
        match parse(yaml) {
            Ok(_) => panic!("accepted:\n{yaml}"),
            Err(e) => {
                assert!(!e.message.is_empty());
                e.field
            }
        }
    }

    const EXAMPLE: &str = "
services:
  - name: backend
    namespace: shop
    vips: [10.96.0.10]
    selector: {app: backend}
    ports:
      - {name: http, port: 80, targetPort: 8080, appProtocol: http}
      - {name: grpc-api, port: 9090}
      - {name: metrics, port: 9100}
    trafficPolicy:
      loadBalancer: ROUND_ROBIN
      connectionPool: {maxConnections: 10, maxPendingRequests: 20, maxRequests: 30}
      outlierDetection: {consecutive5xxErrors: 3, consecutiveConnectFailures: 0, interval: 500ms, baseEjectionTime: 2m, maxEjectionPercent: 100}
  - name: db
    namespace: shop
    vips: [10.96.0.11, 'fd00::11']
    ports:
      - port: 5432
";

    #[test]
    fn parses_the_example() {
        let services = parse_ok(EXAMPLE);
        assert_eq!(services.len(), 2);
        let backend = &services[0];
        assert_eq!(backend.name, "backend");
        assert_eq!(backend.vips, vec![IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))]);
        assert_eq!(
            backend.ports[0],
            ServicePort {
                name: "http".into(),
                port: 80,
                target_port: 8080,
                protocol: AppProtocol::Http
            }
        );
        assert_eq!(backend.ports[1].target_port, 9090);
        assert_eq!(backend.ports[1].protocol, AppProtocol::Grpc);
        assert_eq!(backend.ports[2].protocol, AppProtocol::Unknown);
        assert_eq!(
            backend.traffic_policy,
            TrafficPolicy {
                load_balancer: LoadBalancer::RoundRobin,
                connection_pool: ConnectionPool {
                    max_connections: 10,
                    max_pending_requests: 20,
                    max_requests: 30
                },
                outlier_detection: Some(OutlierDetection {
                    consecutive_5xx_errors: 3,
                    consecutive_connect_failures: 0,
                    interval: Duration::from_millis(500),
                    base_ejection_time: Duration::from_secs(120),
                    max_ejection_percent: 100,
                }),
            }
        );
        let db = &services[1];
        assert_eq!(db.ports[0].name, "");
        assert_eq!(db.ports[0].target_port, 5432);
        assert_eq!(db.traffic_policy, TrafficPolicy::default());
        assert_eq!(db.traffic_policy.load_balancer, LoadBalancer::LeastRequest);
        assert_eq!(db.traffic_policy.connection_pool.max_requests, 1024);
        assert!(db.selector.is_empty());
        // The validated form serializes (for the admin API / debugging).
        let json = serde_json::to_value(backend).expect("serializes");
        assert_eq!(json["traffic_policy"]["load_balancer"], "ROUND_ROBIN");
        assert_eq!(json["ports"][0]["protocol"], "http");
    }

    #[test]
    fn defaults_of_partial_traffic_policy() {
        let services = parse_ok(
            "services:\n- {name: a, namespace: s, vips: [10.0.0.1], ports: [{port: 80}], trafficPolicy: {loadBalancer: {simple: RANDOM}, outlierDetection: {}, connectionPool: {maxRequests: 5}}}\n",
        );
        let policy = &services[0].traffic_policy;
        assert_eq!(policy.load_balancer, LoadBalancer::Random);
        assert_eq!(policy.outlier_detection, Some(OutlierDetection::default()));
        assert_eq!(
            policy.connection_pool,
            ConnectionPool {
                max_requests: 5,
                ..ConnectionPool::default()
            }
        );
    }

    #[test]
    fn protocol_from_app_protocol_and_port_name() {
        for (value, expect) in [
            ("http", AppProtocol::Http),
            ("HTTP", AppProtocol::Http),
            ("http2", AppProtocol::Http2),
            ("kubernetes.io/h2c", AppProtocol::Http2),
            ("grpc", AppProtocol::Grpc),
            ("tcp", AppProtocol::Tcp),
        ] {
            assert_eq!(
                AppProtocol::from_app_protocol(value),
                Some(expect),
                "{value}"
            );
        }
        for value in ["https", "kubernetes.io/ws", "mongo", ""] {
            assert_eq!(AppProtocol::from_app_protocol(value), None, "{value}");
        }
        for (name, expect) in [
            ("http", AppProtocol::Http),
            ("http-web", AppProtocol::Http),
            ("http2", AppProtocol::Http2),
            ("http2-x", AppProtocol::Http2),
            ("grpc", AppProtocol::Grpc),
            ("grpc-web", AppProtocol::Grpc),
            ("tcp-db", AppProtocol::Tcp),
            ("https", AppProtocol::Unknown),
            ("httpx", AppProtocol::Unknown),
            ("web-http", AppProtocol::Unknown),
            ("", AppProtocol::Unknown),
        ] {
            assert_eq!(AppProtocol::from_port_name(name), expect, "{name}");
        }
        // appProtocol wins over the name.
        let services = parse_ok(
            "services:\n- {name: a, namespace: s, vips: [10.0.0.1], ports: [{name: http, port: 80, appProtocol: tcp}]}\n",
        );
        assert_eq!(services[0].ports[0].protocol, AppProtocol::Tcp);
        assert!(AppProtocol::Grpc.is_http() && AppProtocol::Http2.is_http());
        assert!(!AppProtocol::Tcp.is_http() && !AppProtocol::Unknown.is_http());
    }

    #[test]
    fn validation_errors_name_the_field() {
        let svc = |body: &str| format!("services:\n- {{name: a, namespace: s, {body}}}\n");
        let ok = "vips: [10.0.0.1], ports: [{port: 80}]";
        parse_ok(&svc(ok));
        let cases: &[(&str, &str)] = &[
            (
                "vips: [10.0.0.1], ports: [{port: 0}]",
                "services[0].ports[0].port",
            ),
            (
                "vips: [10.0.0.1], ports: [{port: 65536}]",
                "services[0].ports[0].port",
            ),
            (
                "vips: [10.0.0.1], ports: [{name: a, port: 80}, {name: b, port: 81, targetPort: 0}]",
                "services[0].ports[1].targetPort",
            ),
            (
                "vips: [10.0.0.1], ports: [{port: 80, targetPort: web}]",
                "services[0].ports[0].targetPort",
            ),
            (
                "vips: [10.0.0.1], ports: [{name: a, port: 80}, {name: b, port: 80}]",
                "services[0].ports[1].port",
            ),
            (
                "vips: [10.0.0.1], ports: [{name: a, port: 80}, {name: a, port: 81}]",
                "services[0].ports[1].name",
            ),
            (
                "vips: [10.0.0.1], ports: [{name: a, port: 80}, {port: 81}]",
                "services[0].ports[1].name",
            ),
            (
                "vips: [10.0.0.1], ports: [{port: 80, appProtocol: https}]",
                "services[0].ports[0].appProtocol",
            ),
            (
                "vips: [10.0.0.1], ports: [{port: 80, protocol: UDP}]",
                "services[0].ports[0].protocol",
            ),
            ("vips: [10.0.0.1], ports: []", "services[0].ports"),
            ("ports: [{port: 80}]", "services[0].vips"),
            (
                "vips: [10.0.0.1, 10.0.0.999], ports: [{port: 80}]",
                "services[0].vips[1]",
            ),
            (
                "vips: [127.0.0.1], ports: [{port: 80}]",
                "services[0].vips[0]",
            ),
            (
                "vips: [10.0.0.1, '::ffff:10.0.0.1'], ports: [{port: 80}]",
                "services[0].vips[1]",
            ),
            (
                "vips: [10.0.0.1], ports: [{port: 80}], selector: {'': x}",
                "services[0].selector",
            ),
            (
                "vips: [10.0.0.1], ports: [{port: 80}], trafficPolicy: {loadBalancer: FASTEST}",
                "services[0].trafficPolicy.loadBalancer",
            ),
            (
                "vips: [10.0.0.1], ports: [{port: 80}], trafficPolicy: {loadBalancer: {simple: X}}",
                "services[0].trafficPolicy.loadBalancer.simple",
            ),
            (
                "vips: [10.0.0.1], ports: [{port: 80}], trafficPolicy: {connectionPool: {maxConnections: 0}}",
                "services[0].trafficPolicy.connectionPool.maxConnections",
            ),
            (
                "vips: [10.0.0.1], ports: [{port: 80}], trafficPolicy: {outlierDetection: {interval: 10}}",
                "services[0].trafficPolicy.outlierDetection.interval",
            ),
            (
                "vips: [10.0.0.1], ports: [{port: 80}], trafficPolicy: {outlierDetection: {baseEjectionTime: 0s}}",
                "services[0].trafficPolicy.outlierDetection.baseEjectionTime",
            ),
            (
                "vips: [10.0.0.1], ports: [{port: 80}], trafficPolicy: {outlierDetection: {maxEjectionPercent: 101}}",
                "services[0].trafficPolicy.outlierDetection.maxEjectionPercent",
            ),
            (
                "vips: [10.0.0.1], ports: [{port: 80}], trafficPolicy: {outlierDetection: {consecutive5xxErrors: -1}}",
                "services[0].trafficPolicy.outlierDetection.consecutive5xxErrors",
            ),
        ];
        for (body, field) in cases {
            assert_eq!(field_of(&svc(body)), *field, "{body}");
        }
        assert_eq!(
            field_of(
                "services:\n- {name: 1a, namespace: s, vips: [10.0.0.1], ports: [{port: 80}]}\n"
            ),
            "services[0].name"
        );
        assert_eq!(
            field_of(
                "services:\n- {name: a, namespace: S, vips: [10.0.0.1], ports: [{port: 80}]}\n"
            ),
            "services[0].namespace"
        );
    }

    #[test]
    fn duplicates_across_services() {
        let err = parse(
            "services:\n\
             - {name: a, namespace: s, vips: [10.0.0.1], ports: [{port: 80}]}\n\
             - {name: a, namespace: s, vips: [10.0.0.2], ports: [{port: 80}]}\n",
        )
        .unwrap_err();
        assert_eq!(err.field, "services[1].name");
        assert!(err.message.contains("services[0]"), "{err}");
        // Same name in another namespace is fine; the same VIP on another port too.
        parse_ok(
            "services:\n\
             - {name: a, namespace: s, vips: [10.0.0.1], ports: [{port: 80}]}\n\
             - {name: a, namespace: t, vips: [10.0.0.1], ports: [{port: 81}]}\n",
        );
        let err = parse(
            "services:\n\
             - {name: a, namespace: s, vips: [10.0.0.1], ports: [{port: 80}]}\n\
             - {name: b, namespace: s, vips: [10.0.0.2, 10.0.0.1], ports: [{name: x, port: 81}, {name: y, port: 80}]}\n",
        )
        .unwrap_err();
        assert_eq!(err.field, "services[1].vips[1]");
        assert!(
            err.message.contains("10.0.0.1:80") && err.message.contains("s/a"),
            "{err}"
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let doc: Result<Doc, _> = serde_yaml::from_str(
            "services:\n- {name: a, namespace: s, vips: [10.0.0.1], ports: [{port: 80}], clusterIP: 10.0.0.1}\n",
        );
        assert!(doc.is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        for bad in ["", "10", "s", "10x", "-1s", "1..5s", "10 s", "ms"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            key: PodKey {
                namespace: ns.into(),
                name: name.into(),
            },
            service_account: "default".into(),
            ip: IpAddr::V4(Ipv4Addr::new(10, 61, 0, 9)),
            node: "n2".into(),
            netns: PathBuf::new(),
            cgroup: PathBuf::new(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            enrolled: false,
            identity: Identity {
                trust_domain: "cluster.local".into(),
                namespace: ns.into(),
                service_account: "default".into(),
            },
        }
    }

    #[test]
    fn endpoints_are_selected_and_sorted() {
        let services = parse_ok(EXAMPLE);
        let pods = [
            pod("shop", "c", &[("app", "backend"), ("v", "1")]),
            pod("shop", "a", &[("app", "backend")]),
            pod("pay", "b", &[("app", "backend")]),
            pod("shop", "d", &[("app", "frontend")]),
            pod("shop", "e", &[]),
        ];
        let eps = endpoints(&services[0], pods.iter());
        let names: Vec<&str> = eps.iter().map(|w| w.key.name.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        // No selector: no endpoints.
        assert!(endpoints(&services[1], pods.iter()).is_empty());
    }

    #[test]
    fn index_lookups() {
        let services = parse_ok(EXAMPLE);
        let index = ServiceIndex::new(&services, std::iter::empty());
        let (svc, port) = index
            .by_vip("10.96.0.10".parse().unwrap(), 9090)
            .expect("found");
        assert_eq!(
            (svc.name.as_str(), port.name.as_str()),
            ("backend", "grpc-api")
        );
        // IPv4-mapped addresses (from dual-stack sockets) find IPv4 VIPs.
        let (svc, _) = index
            .by_vip("::ffff:10.96.0.11".parse().unwrap(), 5432)
            .expect("mapped");
        assert_eq!(svc.name, "db");
        assert!(index.by_vip("fd00::11".parse().unwrap(), 5432).is_some());
        assert!(index.by_vip("10.96.0.10".parse().unwrap(), 5432).is_none());
        assert!(index.by_vip("10.96.0.12".parse().unwrap(), 80).is_none());
        assert_eq!(index.by_name("shop", "db").map(|s| s.vips.len()), Some(2));
        assert!(index.by_name("pay", "db").is_none());
        assert!(index.by_name("shop", "nope").is_none());
        assert_eq!(index.services().len(), 2);
        assert_eq!(services[0].port(80).map(|p| p.target_port), Some(8080));
    }

    #[test]
    fn names_helpers() {
        assert!(is_dns1035_label("a-1"));
        assert!(!is_dns1035_label("1a"));
        assert!(crate::config::is_dns_subdomain("a.b-c"));
        assert!(!crate::config::is_dns_subdomain("a..b"));
        assert_eq!(first_duplicate(["a", "b", "a"]), Some(2));
        assert_eq!(first_duplicate(["a", "b"]), None);
    }

    #[test]
    fn the_index_selects_endpoints_once_per_snapshot() {
        let text = "node: n1\npods:\n  - {name: b, namespace: shop, ip: 10.0.0.3, node: n2, labels: {app: web}}\n  - {name: a, namespace: shop, ip: 10.0.0.2, node: n2, labels: {app: web}}\n  - {name: c, namespace: other, ip: 10.0.0.4, node: n2, labels: {app: web}}\nservices:\n  - {name: web, namespace: shop, vips: [10.96.0.1], selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}\n";
        let mesh = crate::config::parse(text).expect("valid");
        let index = ServiceIndex::new(&mesh.services, mesh.pods.values());
        let (svc, _) = index
            .by_vip("10.96.0.1".parse().expect("ip"), 80)
            .expect("vip");
        let ips: Vec<String> = index
            .endpoints(svc)
            .iter()
            .map(|ip| ip.to_string())
            .collect();
        assert_eq!(ips, ["10.0.0.2", "10.0.0.3"]);
    }

    #[test]
    fn listed_endpoints_replace_the_selector() {
        let text = "node: n1\npods:\n  - {name: a, namespace: shop, ip: 10.0.0.2, node: n2, labels: {app: web}}\nservices:\n  - {name: web, namespace: shop, vips: [10.96.0.1], selector: {app: web}, endpoints: [10.0.0.9, 10.0.0.8, 10.0.0.9], ports: [{port: 80}]}\n  - {name: manual, namespace: shop, vips: [10.96.0.2], endpoints: [], ports: [{port: 80}]}\n";
        let mesh = crate::config::parse(text).expect("valid");
        let index = ServiceIndex::new(&mesh.services, mesh.pods.values());
        let web = index.by_name("shop", "web").expect("web");
        let ips: Vec<String> = index
            .endpoints(web)
            .iter()
            .map(|ip| ip.to_string())
            .collect();
        assert_eq!(ips, ["10.0.0.8", "10.0.0.9"], "listed, not selected");
        let manual = index.by_name("shop", "manual").expect("manual");
        assert!(index.endpoints(manual).is_empty());
        let bad = text.replace("10.0.0.8", "ten");
        let err = crate::config::parse(&bad).unwrap_err();
        assert_eq!(err.field, "services[0].endpoints[1]");
    }
}
