//! The typed snapshot of what this node's agent serves: the node, its workloads (pods) and
//! which of them are enrolled. Sources (today the YAML file, later Kubernetes) build a
//! [`Mesh`]; the agent validates it as a whole and swaps it in atomically.
use std::{collections::BTreeMap, fmt, net::IpAddr, path::PathBuf};

use serde::Serialize;

/// Everything the agent knows about the mesh on this node, at one instant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mesh {
    /// Name of the node this agent serves.
    pub node: String,
    /// SPIFFE trust domain of the workload identities.
    pub trust_domain: String,
    /// Pods of the mesh, keyed by [`PodKey`]: this node's and (for routing) other nodes'.
    #[serde(serialize_with = "pods_as_list")]
    pub pods: BTreeMap<PodKey, Workload>,
    /// Certificate settings (applied at start-up).
    pub identity: IdentitySettings,
    /// Which pod owns each address (derived from `pods`; addresses are unique, validated).
    #[serde(skip)]
    pub pod_by_ip: std::collections::HashMap<IpAddr, PodKey>,
    /// L4 and L7 authorization policies.
    pub policies: Vec<crate::policy::AuthorizationPolicy>,
    /// Services (VIPs, ports, endpoints by selector, traffic policy).
    pub services: Vec<crate::service::Service>,
    /// HTTP routes attached to services.
    pub routes: Vec<crate::route::HttpRoute>,
    /// Cgroups of this node's pods that are not in `pods` because the mesh can never capture
    /// them (Kubernetes host-network pods: the node's address is not theirs), but that the
    /// start-up gate must let through. Empty from the config file.
    pub passthrough_cgroups: Vec<PathBuf>,
}

/// JSON map keys must be strings: pods are dumped as a list (each carries its key).
fn pods_as_list<S: serde::Serializer>(
    pods: &BTreeMap<PodKey, Workload>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(pods.values())
}

/// How workload certificates are issued and rotated.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IdentitySettings {
    pub certificate_lifetime: std::time::Duration,
    /// Fraction of the lifetime after which a certificate is re-issued.
    pub rotate_at: f64,
    /// An operator-provided signing CA; `None` means the local CA in the state directory.
    pub ca: Option<PluginCa>,
}

impl Eq for IdentitySettings {}

impl Default for IdentitySettings {
    fn default() -> Self {
        Self {
            certificate_lifetime: std::time::Duration::from_secs(24 * 3600),
            rotate_at: 0.5,
            ca: None,
        }
    }
}

/// Files of an operator-provided signing CA (as Istio's plug-in CA certs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PluginCa {
    pub cert_chain: PathBuf,
    pub key: PathBuf,
    pub root_bundle: PathBuf,
}

impl Mesh {
    /// The enrolled pods of this node.
    pub fn enrolled_here(&self) -> impl Iterator<Item = &Workload> {
        self.pods
            .values()
            .filter(|w| w.enrolled && w.node == self.node)
    }

    /// The pod that owns `ip`, if any (any node). Called per connection and request: an
    /// index lookup, not a scan of every pod of the cluster.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.pods.get(self.pod_by_ip.get(&ip)?)
    }
}

/// `namespace/name`: a pod's unique name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One pod on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub key: PodKey,
    pub service_account: String,
    pub ip: IpAddr,
    /// The node the pod runs on.
    pub node: String,
    /// The pod's network namespace (a bind-mounted nsfs file or `/proc/PID/ns/net`); empty
    /// for pods on other nodes.
    pub netns: PathBuf,
    /// The pod's cgroup v2 directory; empty for pods on other nodes.
    pub cgroup: PathBuf,
    pub labels: BTreeMap<String, String>,
    /// Whether the mesh captures this pod's traffic.
    pub enrolled: bool,
    /// The workload's SPIFFE identity.
    pub identity: Identity,
}

impl Workload {
    /// Whether the pod runs on `node`.
    pub fn is_on(&self, node: &str) -> bool {
        self.node == node
    }

    /// True when enrolling `other` instead of `self` needs the pod re-plumbed (new netns,
    /// cgroup or address); label or identity changes do not.
    pub fn plumbing_differs(&self, other: &Workload) -> bool {
        self.netns != other.netns || self.cgroup != other.cgroup || self.ip != other.ip
    }
}

/// A SPIFFE workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(into = "String")]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl From<Identity> for String {
    fn from(id: Identity) -> String {
        id.to_string()
    }
}
