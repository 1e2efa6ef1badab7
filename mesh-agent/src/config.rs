//! The standalone config file: its YAML shape, and its validation into a [`Mesh`] snapshot.
//!
//! ```yaml
//! node: node-1
//! trustDomain: cluster.local      # optional, default cluster.local
//! pods:
//!   - name: client
//!     namespace: default
//!     serviceAccount: client      # optional, default "default"
//!     ip: 10.61.0.2
//!     netns: /var/run/netns/client
//!     cgroup: /sys/fs/cgroup/unified/pods/client
//!     labels: {app: client}
//!     enrolled: true               # optional, default true
//!   - name: server                 # a pod on another node: no netns/cgroup needed;
//!     namespace: default           # traffic to it goes over HBONE (mTLS) when enrolled
//!     ip: 10.62.0.2
//!     node: node-2
//! identity:                        # optional; read at start-up
//!   certificateLifetime: 24h       # SVID lifetime (s, m, h suffixes)
//!   rotateAt: 0.5                  # rotate after this fraction of the lifetime
//!   ca:                            # optional: operator-provided signing CA (Istio plug-in
//!     certChain: /etc/trellis/ca-cert.pem   # CA style); default: a local CA in --state-dir
//!     key: /etc/trellis/ca-key.pem
//!     rootBundle: /etc/trellis/root-cert.pem
//! authorizationPolicies: []        # see policy.rs
//! ```
//!
//! Every error names the offending field (`pods[1].ip`, ...), so an operator can fix the file
//! while the agent keeps serving the last good snapshot.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use std::time::Duration;

use crate::state::{Identity, IdentitySettings, Mesh, PluginCa, PodKey, Workload};

pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Why a config was rejected. `field` is a path into the YAML document.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileConfig {
    node: String,
    #[serde(default)]
    trust_domain: Option<String>,
    #[serde(default)]
    pods: Vec<FilePod>,
    #[serde(default)]
    identity: Option<FileIdentity>,
    #[serde(default)]
    authorization_policies: Vec<crate::policy::FilePolicy>,
    #[serde(default)]
    services: Vec<crate::service::FileService>,
    #[serde(default)]
    http_routes: Vec<crate::route::FileHttpRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileIdentity {
    #[serde(default)]
    certificate_lifetime: Option<String>,
    #[serde(default)]
    rotate_at: Option<f64>,
    #[serde(default)]
    ca: Option<FileCa>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileCa {
    cert_chain: PathBuf,
    key: PathBuf,
    root_bundle: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FilePod {
    name: String,
    namespace: String,
    #[serde(default)]
    service_account: Option<String>,
    ip: String,
    /// The node the pod runs on; default: this node.
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    netns: Option<PathBuf>,
    #[serde(default)]
    cgroup: Option<PathBuf>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default = "default_true")]
    enrolled: bool,
}

fn default_true() -> bool {
    true
}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Mesh, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new("<file>", format!("cannot read {}: {e}", path.display())))?;
    parse(&text)
}

/// Parses and validates a config document.
pub fn parse(text: &str) -> Result<Mesh, ConfigError> {
    let file: FileConfig = serde_yaml::from_str(text).map_err(yaml_error)?;
    validate(file)
}

/// serde_yaml reports "pods[1].ip: invalid type ..." style messages; split off the path so the
/// field is reported on its own.
fn yaml_error(e: serde_yaml::Error) -> ConfigError {
    let text = e.to_string();
    match text.split_once(": ") {
        Some((field, rest)) if !field.contains(' ') => ConfigError::new(field, rest),
        _ => ConfigError::new("<document>", text),
    }
}

// Name and duration rules shared by every config section (pods, policies, services, routes).

/// Parses a duration as Gateway API writes them: one or more `<number><unit>` with unit `h`,
/// `m`, `s` or `ms` (`10s`, `500ms`, `2m`, `1h30m`; decimals accepted: `1.5s`). Zero is
/// returned as zero; callers decide whether it is allowed.
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let (number, tail) = rest.split_at(digits);
        let value: f64 = number.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let seconds = match unit {
            "ms" => value / 1000.0,
            "s" => value,
            "m" => value * 60.0,
            "h" => value * 3600.0,
            _ => return None,
        };
        total = total.checked_add(Duration::try_from_secs_f64(seconds).ok()?)?;
        rest = tail;
    }
    Some(total)
}

/// A DNS-1123 label, as Kubernetes requires for namespaces and port names.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1035 label, as Kubernetes requires for Service names: a DNS-1123 label that starts
/// with a letter.
pub(crate) fn is_dns1035_label(s: &str) -> bool {
    is_dns_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

/// A DNS-1123 subdomain, as Kubernetes requires for most object names.
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn validate(file: FileConfig) -> Result<Mesh, ConfigError> {
    if file.node.trim().is_empty() {
        return Err(ConfigError::new("node", "must not be empty"));
    }
    let trust_domain = file
        .trust_domain
        .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_string());
    if trust_domain.is_empty()
        || !trust_domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
    {
        return Err(ConfigError::new(
            "trustDomain",
            format!("{trust_domain:?} is not a valid SPIFFE trust domain"),
        ));
    }

    let mut pods = BTreeMap::new();
    let mut owner_of_ip: HashMap<IpAddr, PodKey> = HashMap::new();
    let mut owner_of_netns: HashMap<PathBuf, PodKey> = HashMap::new();
    for (i, pod) in file.pods.into_iter().enumerate() {
        let at = |field: &str| format!("pods[{i}].{field}");
        for (field, value) in [("name", &pod.name), ("namespace", &pod.namespace)] {
            if !is_dns_label(value) {
                return Err(ConfigError::new(
                    at(field),
                    format!("{value:?} is not a DNS-1123 label (lower-case letters, digits, '-')"),
                ));
            }
        }
        let service_account = pod.service_account.unwrap_or_else(|| "default".to_string());
        if !is_dns_label(&service_account) {
            return Err(ConfigError::new(
                at("serviceAccount"),
                format!("{service_account:?} is not a DNS-1123 label"),
            ));
        }
        let ip: IpAddr = pod.ip.parse().map_err(|_| {
            ConfigError::new(at("ip"), format!("{:?} is not an IP address", pod.ip))
        })?;
        if !ip.is_ipv4() {
            return Err(ConfigError::new(
                at("ip"),
                "only IPv4 pod addresses are supported for now",
            ));
        }
        if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
            return Err(ConfigError::new(
                at("ip"),
                format!("{ip} cannot be a pod address"),
            ));
        }
        let key = PodKey {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
        };
        if pods.contains_key(&key) {
            return Err(ConfigError::new(
                at("name"),
                format!("pod {key} is listed twice"),
            ));
        }
        if let Some(other) = owner_of_ip.insert(ip, key.clone()) {
            return Err(ConfigError::new(
                at("ip"),
                format!("{ip} is already the address of pod {other}"),
            ));
        }
        let node = pod.node.unwrap_or_else(|| file.node.clone());
        if !is_dns_subdomain(&node) {
            return Err(ConfigError::new(
                at("node"),
                format!("{node:?} is not a node name"),
            ));
        }
        let local = node == file.node;
        let netns = pod.netns.unwrap_or_default();
        let cgroup = pod.cgroup.unwrap_or_default();
        if local && pod.enrolled {
            // Enrolled pods of this node must point at a real netns and cgroup; an
            // unenrolled or remote pod is only listed, so its paths are not touched.
            if !netns.is_file() {
                return Err(ConfigError::new(
                    at("netns"),
                    format!("{} is not a network namespace file", netns.display()),
                ));
            }
            if !cgroup.join("cgroup.procs").is_file() {
                return Err(ConfigError::new(
                    at("cgroup"),
                    format!("{} is not a cgroup v2 directory", cgroup.display()),
                ));
            }
            if let Some(other) = owner_of_netns.insert(netns.clone(), key.clone()) {
                return Err(ConfigError::new(
                    at("netns"),
                    format!("{} is already the netns of pod {other}", netns.display()),
                ));
            }
        }
        let identity = Identity {
            trust_domain: trust_domain.clone(),
            namespace: pod.namespace.clone(),
            service_account: service_account.clone(),
        };
        pods.insert(
            key.clone(),
            Workload {
                key,
                service_account,
                ip,
                node,
                netns,
                cgroup,
                labels: pod.labels,
                enrolled: pod.enrolled,
                identity,
            },
        );
    }
    let identity = validate_identity(file.identity)?;
    let policies = crate::policy::validate(file.authorization_policies)?;
    let services = crate::service::validate_services(file.services)?;
    let routes = crate::route::validate_routes(file.http_routes, &services)?;
    Ok(Mesh {
        node: file.node,
        trust_domain,
        pods,
        pod_by_ip: owner_of_ip,
        identity,
        policies,
        services,
        routes,
        passthrough_cgroups: Vec::new(),
    })
}

fn validate_identity(file: Option<FileIdentity>) -> Result<IdentitySettings, ConfigError> {
    let mut settings = IdentitySettings::default();
    let Some(file) = file else {
        return Ok(settings);
    };
    if let Some(text) = file.certificate_lifetime {
        settings.certificate_lifetime = parse_duration(&text)
            .filter(|d| *d >= Duration::from_secs(2))
            .ok_or_else(|| {
                ConfigError::new(
                    "identity.certificateLifetime",
                    format!("{text:?} is not a duration of at least 2s (like 90s, 15m, 24h)"),
                )
            })?;
    }
    if let Some(fraction) = file.rotate_at {
        if !(0.1..=0.9).contains(&fraction) {
            return Err(ConfigError::new(
                "identity.rotateAt",
                format!("{fraction} is not a fraction between 0.1 and 0.9 of the lifetime"),
            ));
        }
        settings.rotate_at = fraction;
    }
    if let Some(ca) = file.ca {
        for (field, path) in [
            ("certChain", &ca.cert_chain),
            ("key", &ca.key),
            ("rootBundle", &ca.root_bundle),
        ] {
            if !path.is_file() {
                return Err(ConfigError::new(
                    format!("identity.ca.{field}"),
                    format!("{} is not a file", path.display()),
                ));
            }
        }
        settings.ca = Some(PluginCa {
            cert_chain: ca.cert_chain,
            key: ca.key,
            root_bundle: ca.root_bundle,
        });
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(pods: &str) -> String {
        format!("node: n1\npods:\n{pods}")
    }

    fn unenrolled(name: &str, ip: &str) -> String {
        format!(
            "  - name: {name}\n    namespace: default\n    ip: {ip}\n    netns: /nonexistent\n    cgroup: /nonexistent\n    enrolled: false\n"
        )
    }

    #[test]
    fn parses_a_minimal_file_with_defaults() {
        let mesh = parse(&doc(&unenrolled("a", "10.0.0.2"))).expect("valid");
        assert_eq!(mesh.node, "n1");
        assert_eq!(mesh.trust_domain, "cluster.local");
        let pod = mesh.pods.values().next().expect("one pod");
        assert_eq!(pod.service_account, "default");
        assert_eq!(
            pod.identity.to_string(),
            "spiffe://cluster.local/ns/default/sa/default"
        );
        assert!(!pod.enrolled);
    }

    #[test]
    fn bad_ip_names_the_field() {
        let err = parse(&doc(&unenrolled("a", "10.0.0.300"))).unwrap_err();
        assert_eq!(err.field, "pods[0].ip");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let text = doc(&unenrolled("a", "10.0.0.2")).replace("enrolled: false", "enrolled: maybe");
        let err = parse(&text).unwrap_err();
        assert!(err.field.starts_with("pods[0]"), "field was {}", err.field);
    }

    #[test]
    fn unknown_field_is_rejected() {
        let text = doc(&unenrolled("a", "10.0.0.2")).replace("enrolled:", "enroled:");
        let err = parse(&text).unwrap_err();
        assert!(err.to_string().contains("enroled"), "{err}");
    }

    #[test]
    fn duplicate_ip_is_rejected() {
        let text = doc(&(unenrolled("a", "10.0.0.2") + &unenrolled("b", "10.0.0.2")));
        let err = parse(&text).unwrap_err();
        assert_eq!(err.field, "pods[1].ip");
        assert!(err.message.contains("default/a"));
    }

    #[test]
    fn duplicate_pod_is_rejected() {
        let text = doc(&(unenrolled("a", "10.0.0.2") + &unenrolled("a", "10.0.0.3")));
        assert_eq!(parse(&text).unwrap_err().field, "pods[1].name");
    }

    #[test]
    fn enrolled_pod_needs_a_real_netns() {
        let text = doc(&unenrolled("a", "10.0.0.2")).replace("enrolled: false", "enrolled: true");
        assert_eq!(parse(&text).unwrap_err().field, "pods[0].netns");
    }

    #[test]
    fn bad_names_are_rejected() {
        let err = parse(&doc(&unenrolled("Not_A_Label", "10.0.0.2"))).unwrap_err();
        assert_eq!(err.field, "pods[0].name");
        let err = parse("node: ''\n").unwrap_err();
        assert_eq!(err.field, "node");
        let err = parse("node: n\ntrustDomain: 'a b'\n").unwrap_err();
        assert_eq!(err.field, "trustDomain");
    }

    #[test]
    fn missing_node_is_reported() {
        let err = parse("pods: []\n").unwrap_err();
        assert!(err.to_string().contains("node"), "{err}");
    }

    #[test]
    fn identity_settings_are_validated() {
        let mesh =
            parse("node: n\nidentity: {certificateLifetime: 90s, rotateAt: 0.5}\n").expect("valid");
        assert_eq!(mesh.identity.certificate_lifetime, Duration::from_secs(90));
        let err = parse("node: n\nidentity: {certificateLifetime: soon}\n").unwrap_err();
        assert_eq!(err.field, "identity.certificateLifetime");
        let err = parse("node: n\nidentity: {rotateAt: 1.5}\n").unwrap_err();
        assert_eq!(err.field, "identity.rotateAt");
        let err =
            parse("node: n\nidentity: {ca: {certChain: /nope, key: /nope, rootBundle: /nope}}\n")
                .unwrap_err();
        assert_eq!(err.field, "identity.ca.certChain");
        assert_eq!(parse_duration("24h"), Some(Duration::from_secs(86400)));
        assert_eq!(parse_duration("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("soon"), None);
    }

    #[test]
    fn remote_pods_need_no_netns() {
        let text = "node: n1\npods:\n  - {name: b, namespace: shop, ip: 10.0.1.2, node: n2}\n";
        let mesh = parse(text).expect("valid");
        let pod = mesh.pods.values().next().expect("pod");
        assert_eq!(pod.node, "n2");
        assert!(pod.enrolled);
        assert!(!pod.is_on(&mesh.node));
    }

    #[test]
    fn ipv6_pods_are_refused_for_now() {
        let err = parse(&doc(&unenrolled("a", "fd00::2"))).unwrap_err();
        assert_eq!(err.field, "pods[0].ip");
    }
}
