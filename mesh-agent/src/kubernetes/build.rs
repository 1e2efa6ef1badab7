//! Kubernetes objects → the same validated [`Mesh`] snapshot the config file builds.
//!
//! The objects are translated into a config document of the standalone file's shape (its
//! sections are Kubernetes-shaped already) and validated by [`config::parse`], so both
//! sources share one set of rules and one set of error messages. What the mesh does not
//! handle is left out before validation, as Kubernetes allows it: pods without an address,
//! host-network and finished pods, headless and ExternalName Services, UDP/SCTP ports,
//! HTTPRoutes whose parents are Gateways rather than Services.
//!
//! One bad object must not freeze the whole node's view of the cluster (a typo in some
//! team's HTTPRoute would stop every new pod on the node from being enrolled). So an object
//! that validation rejects is set aside and the rest validated again; each is logged with
//! its kind, name and the field. A rejected AuthorizationPolicy is not dropped, which would
//! open what it denies: it is replaced by a policy that fails closed, as Istio does with
//! policies it cannot enforce: an ALLOW policy allows nothing, a DENY policy denies everything,
//! both for the workloads it selects.
use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::api::DynamicObject;
use serde_json::{Value, json};

use super::{DATAPLANE_DISABLED, DATAPLANE_ENABLED, DATAPLANE_LABEL, podns::PodPaths};
use crate::{
    config::{self, ConfigError},
    state::Mesh,
};

/// Everything a snapshot is built from: the reflectors' current contents.
pub struct Objects<'a> {
    pub node: &'a str,
    pub trust_domain: &'a str,
    /// Namespaces (at least the opted-in ones; others may be absent).
    pub namespaces: &'a [std::sync::Arc<Namespace>],
    /// Pods of every node (this node's included).
    pub pods: &'a [std::sync::Arc<Pod>],
    pub services: &'a [std::sync::Arc<Service>],
    pub endpoint_slices: &'a [std::sync::Arc<EndpointSlice>],
    pub http_routes: &'a [std::sync::Arc<DynamicObject>],
    pub policies: &'a [std::sync::Arc<DynamicObject>],
}

/// A built snapshot, and what was left out of it.
#[derive(Debug)]
pub struct Built {
    pub mesh: Mesh,
    /// Objects validation rejected (`Kind ns/name: field: reason`).
    pub rejected: Vec<String>,
    /// Local pods that should be enrolled but whose netns/cgroup were not found, and why.
    pub unresolved: BTreeMap<String, String>,
}

/// The sections of the config document, for mapping an error back to its object.
const SECTIONS: [&str; 4] = ["pods", "services", "httpRoutes", "authorizationPolicies"];

/// Builds the snapshot. `resolve` finds a local pod's netns and cgroup from its UID, for pods
/// to enrol; `cgroup_of` only its cgroup, for the other local pods (the start-up gate lets
/// them through once they are known to stay out of the mesh). Fails only when nothing can be
/// built (a node name or trust domain the file would refuse).
pub fn build(
    objects: &Objects<'_>,
    mut resolve: impl FnMut(&str) -> Result<PodPaths, String>,
    cgroup_of: impl Fn(&str) -> Option<std::path::PathBuf>,
) -> Result<Built, ConfigError> {
    let enabled: HashSet<&str> = objects
        .namespaces
        .iter()
        .filter(|ns| label(&ns.metadata.labels, DATAPLANE_LABEL) == Some(DATAPLANE_ENABLED))
        .filter(|ns| ns.metadata.deletion_timestamp.is_none())
        .filter_map(|ns| ns.metadata.name.as_deref())
        .collect();
    let mut unresolved = BTreeMap::new();
    let mut passthrough = Vec::new();
    let mut sections: BTreeMap<&str, Vec<(String, Value)>> = BTreeMap::new();
    sections.insert(
        "pods",
        pods(
            objects,
            &enabled,
            &mut resolve,
            &cgroup_of,
            &mut unresolved,
            &mut passthrough,
        ),
    );
    sections.insert("services", services(objects));
    sections.insert("httpRoutes", http_routes(objects));
    sections.insert("authorizationPolicies", policies(objects));

    let mut rejected = Vec::new();
    // Each round either succeeds or sets one object aside (or replaces one policy by its
    // fail-closed form, at most once each), so this ends.
    let total: usize = sections.values().map(Vec::len).sum();
    let mut replaced: HashSet<String> = HashSet::new();
    for _ in 0..=2 * total + 1 {
        let mut doc = json!({ "node": objects.node, "trustDomain": objects.trust_domain });
        for (name, entries) in &sections {
            doc[*name] = Value::Array(entries.iter().map(|(_, v)| v.clone()).collect());
        }
        let text = serde_yaml::to_string(&doc)
            .map_err(|e| ConfigError::new("<document>", format!("cannot encode: {e}")))?;
        let err = match config::parse(&text) {
            Ok(mut mesh) => {
                mesh.passthrough_cgroups = passthrough;
                return Ok(Built {
                    mesh,
                    rejected,
                    unresolved,
                });
            }
            Err(e) => e,
        };
        let Some((section, index)) = locate(&err.field) else {
            return Err(err);
        };
        let Some(entries) = sections.get_mut(section) else {
            return Err(err);
        };
        if index >= entries.len() {
            return Err(err);
        }
        let (origin, entry) = &entries[index];
        let within = err
            .field
            .split_once(']')
            .map_or("", |(_, rest)| rest.trim_start_matches('.'));
        let what = format!("{origin}: {within}: {}", err.message);
        if section == "authorizationPolicies" && replaced.insert(origin.clone()) {
            let fail_closed = fail_closed_policy(entry, within);
            rejected.push(format!("{what} (enforced as {})", fail_closed.1));
            entries[index].1 = fail_closed.0;
        } else {
            rejected.push(what);
            entries.remove(index);
        }
    }
    Err(ConfigError::new(
        "<document>",
        "too many objects rejected to build a snapshot",
    ))
}

/// `pods[3].ip` → ("pods", 3).
fn locate(field: &str) -> Option<(&'static str, usize)> {
    let (head, rest) = field.split_once('[')?;
    let section = SECTIONS.into_iter().find(|s| *s == head)?;
    let index = rest.split_once(']')?.0.parse().ok()?;
    Some((section, index))
}

/// The fail-closed stand-in for a policy that cannot be enforced as written, and its name.
fn fail_closed_policy(entry: &Value, bad_field: &str) -> (Value, &'static str) {
    let mut policy = json!({ "name": entry["name"], "namespace": entry["namespace"] });
    // A selector that is itself the problem cannot narrow the policy down: then it applies to
    // the whole namespace.
    if !bad_field.starts_with("selector")
        && let Some(s) = entry.get("selector")
    {
        policy["selector"] = s.clone();
    }
    if entry["action"] == "ALLOW" || entry.get("action").is_none_or(Value::is_null) {
        policy["action"] = json!("ALLOW");
        policy["rules"] = json!([]);
        (policy, "allow-nothing")
    } else {
        policy["action"] = json!("DENY");
        policy["rules"] = json!([{}]);
        (policy, "deny-everything")
    }
}

fn label<'a>(labels: &'a Option<BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels.as_ref()?.get(key).map(String::as_str)
}

fn pods(
    objects: &Objects<'_>,
    enabled: &HashSet<&str>,
    resolve: &mut impl FnMut(&str) -> Result<PodPaths, String>,
    cgroup_of: &impl Fn(&str) -> Option<std::path::PathBuf>,
    unresolved: &mut BTreeMap<String, String>,
    passthrough: &mut Vec<std::path::PathBuf>,
) -> Vec<(String, Value)> {
    // Running pods first, so that when a finished pod's address was handed to a new one the
    // new one owns it.
    let mut pods: Vec<&Pod> = objects.pods.iter().map(|p| p.as_ref()).collect();
    pods.sort_by_key(|p| {
        let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        (
            !running,
            p.metadata.namespace.clone(),
            p.metadata.name.clone(),
        )
    });
    let mut owners: HashSet<IpAddr> = HashSet::new();
    let mut out = Vec::new();
    for pod in pods {
        let (Some(name), Some(namespace)) = (&pod.metadata.name, &pod.metadata.namespace) else {
            continue;
        };
        let Some(spec) = &pod.spec else { continue };
        let Some(node) = spec.node_name.as_deref().filter(|n| !n.is_empty()) else {
            continue; // not scheduled yet
        };
        let uid = pod.metadata.uid.as_deref().unwrap_or("");
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("");
        if phase == "Succeeded" || phase == "Failed" {
            continue;
        }
        if spec.host_network == Some(true) {
            // The node's address, not the pod's: never captured, but let through the gate.
            if node == objects.node {
                passthrough.extend(cgroup_of(uid));
            }
            continue;
        }
        let Some(ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse::<IpAddr>().ok())
            .filter(IpAddr::is_ipv4)
        else {
            continue; // no (IPv4) address yet
        };
        if !owners.insert(ip) {
            continue;
        }
        let origin = format!("Pod {namespace}/{name}");
        let opted_out = label(&pod.metadata.labels, DATAPLANE_LABEL) == Some(DATAPLANE_DISABLED);
        let mut enrolled = enabled.contains(namespace.as_str()) && !opted_out;
        let mut entry = json!({
            "name": name,
            "namespace": namespace,
            "serviceAccount": spec.service_account_name.as_deref().filter(|s| !s.is_empty()).unwrap_or("default"),
            "ip": ip.to_string(),
            "node": node,
            "labels": pod.metadata.labels.clone().unwrap_or_default(),
        });
        if node == objects.node && enrolled {
            match resolve(uid) {
                Ok(paths) => {
                    entry["netns"] = json!(paths.netns);
                    entry["cgroup"] = json!(paths.cgroup);
                }
                Err(why) => {
                    // Listed without a cgroup: the start-up gate keeps it from connecting
                    // until it can be enrolled (fail closed).
                    unresolved.insert(format!("{namespace}/{name}"), why);
                    enrolled = false;
                }
            }
        } else if node == objects.node
            && let Some(cgroup) = cgroup_of(uid)
        {
            // Out of the mesh: its cgroup lets the start-up gate know it may connect.
            entry["cgroup"] = json!(cgroup);
        }
        entry["enrolled"] = json!(enrolled);
        out.push((origin, entry));
    }
    out
}

fn services(objects: &Objects<'_>) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for svc in objects.services {
        let (Some(name), Some(namespace)) = (&svc.metadata.name, &svc.metadata.namespace) else {
            continue;
        };
        let Some(spec) = &svc.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let mut ips: Vec<&str> = spec
            .cluster_ips
            .iter()
            .flatten()
            .map(String::as_str)
            .collect();
        if ips.is_empty() {
            ips.extend(spec.cluster_ip.as_deref());
        }
        let vips: Vec<&str> = ips
            .into_iter()
            .filter(|ip| ip.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv4()))
            .collect();
        if vips.is_empty() {
            continue; // headless: clients connect to pods directly
        }
        let slices: Vec<&EndpointSlice> = objects
            .endpoint_slices
            .iter()
            .map(|s| s.as_ref())
            .filter(|s| {
                s.metadata.namespace.as_deref() == Some(namespace.as_str())
                    && label(&s.metadata.labels, "kubernetes.io/service-name")
                        == Some(name.as_str())
            })
            .collect();
        let mut ports = Vec::new();
        for p in spec.ports.iter().flatten() {
            if p.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let target = match &p.target_port {
                None => p.port,
                Some(IntOrString::Int(n)) => *n,
                // A named target port: the number is the pod's container port of that name,
                // which the EndpointSlice controller has resolved for this service port.
                Some(IntOrString::String(_)) => {
                    match named_target_port(&slices, p.name.as_deref().unwrap_or("")) {
                        Some(n) => n,
                        None => continue,
                    }
                }
            };
            let mut port = json!({ "port": p.port, "targetPort": target, "protocol": "TCP" });
            if let Some(n) = p.name.as_deref().filter(|n| !n.is_empty()) {
                port["name"] = json!(n);
            }
            if let Some(a) = &p.app_protocol {
                port["appProtocol"] = json!(a);
            }
            ports.push(port);
        }
        if ports.is_empty() {
            continue;
        }
        out.push((
            format!("Service {namespace}/{name}"),
            json!({
                "name": name,
                "namespace": namespace,
                "vips": vips,
                "selector": spec.selector.clone().unwrap_or_default(),
                "endpoints": ready_addresses(&slices),
                "ports": ports,
            }),
        ));
    }
    out
}

/// The ready IPv4 endpoint addresses of a Service's EndpointSlices: what kube-proxy would
/// send to. Pods that are starting, failing their readiness probe or terminating are not
/// among them; Services without a selector get theirs from hand-made slices.
fn ready_addresses(slices: &[&EndpointSlice]) -> Vec<String> {
    let mut ips: Vec<String> = slices
        .iter()
        .filter(|s| s.address_type == "IPv4")
        .flat_map(|s| s.endpoints.iter())
        // The API: an unset `ready` means ready.
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| e.addresses.iter().cloned())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

fn named_target_port(slices: &[&EndpointSlice], port_name: &str) -> Option<i32> {
    slices
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .find(|p| p.name.as_deref().unwrap_or("") == port_name)
        .and_then(|p| p.port)
}

/// Name, namespace and spec of a custom object, merged into one config entry.
fn spec_entry(o: &DynamicObject) -> Option<(String, String, Value)> {
    let name = o.metadata.name.clone()?;
    let namespace = o.metadata.namespace.clone()?;
    let mut entry = match o.data.get("spec") {
        Some(Value::Object(spec)) => Value::Object(spec.clone()),
        _ => json!({}),
    };
    entry["name"] = json!(name);
    entry["namespace"] = json!(namespace);
    Some((name, namespace, entry))
}

fn http_routes(objects: &Objects<'_>) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for route in objects.http_routes {
        let Some((name, namespace, mut entry)) = spec_entry(route) else {
            continue;
        };
        // GAMMA: only Service parents concern the mesh; Gateway parents (the API's default
        // group and kind) are a gateway's business.
        let parents: Vec<Value> = entry["parentRefs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| {
                let group = p["group"].as_str().unwrap_or("gateway.networking.k8s.io");
                let kind = p["kind"].as_str().unwrap_or("Gateway");
                (group.is_empty() || group == "core") && kind == "Service"
            })
            .cloned()
            .collect();
        if parents.is_empty() {
            continue;
        }
        entry["parentRefs"] = Value::Array(parents);
        out.push((format!("HTTPRoute {namespace}/{name}"), entry));
    }
    out
}

fn policies(objects: &Objects<'_>) -> Vec<(String, Value)> {
    objects
        .policies
        .iter()
        .filter_map(|p| spec_entry(p))
        .map(|(name, namespace, entry)| (format!("AuthorizationPolicy {namespace}/{name}"), entry))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, sync::Arc};

    use super::*;

    fn arc<T: serde::de::DeserializeOwned>(v: Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).expect("a valid object"))
    }

    fn ns(name: &str, enabled: bool) -> Arc<Namespace> {
        let labels = if enabled {
            json!({ "trellis.dev/dataplane": "enabled" })
        } else {
            json!({})
        };
        arc(json!({ "metadata": { "name": name, "labels": labels } }))
    }

    fn pod(ns: &str, name: &str, node: &str, ip: &str, labels: Value) -> Arc<Pod> {
        arc(json!({
            "metadata": { "name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": labels },
            "spec": { "nodeName": node, "serviceAccountName": "sa-".to_string() + name, "containers": [] },
            "status": { "phase": "Running", "podIP": ip },
        }))
    }

    fn dynamic(v: Value) -> Arc<DynamicObject> {
        arc(v)
    }

    fn empty<T>() -> Vec<Arc<T>> {
        Vec::new()
    }

    struct Fixture {
        namespaces: Vec<Arc<Namespace>>,
        pods: Vec<Arc<Pod>>,
        services: Vec<Arc<Service>>,
        slices: Vec<Arc<EndpointSlice>>,
        routes: Vec<Arc<DynamicObject>>,
        policies: Vec<Arc<DynamicObject>>,
        /// Stands in for a pod's cgroup directory (validation checks `cgroup.procs` exists).
        cgroup: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let cgroup = tempfile::tempdir().expect("tempdir");
            std::fs::write(cgroup.path().join("cgroup.procs"), "").expect("write");
            Self {
                cgroup,
                namespaces: vec![ns("shop", true), ns("legacy", false)],
                pods: vec![
                    pod("shop", "web", "n1", "10.1.0.2", json!({ "app": "web" })),
                    pod("shop", "db", "n2", "10.2.0.2", json!({ "app": "db" })),
                    pod("legacy", "old", "n1", "10.1.0.3", json!({})),
                    pod(
                        "shop",
                        "out",
                        "n1",
                        "10.1.0.4",
                        json!({ "trellis.dev/dataplane": "disabled" }),
                    ),
                ],
                services: empty(),
                slices: empty(),
                routes: empty(),
                policies: empty(),
            }
        }

        fn build(&self) -> Result<Built, ConfigError> {
            let objects = Objects {
                node: "n1",
                trust_domain: "cluster.local",
                namespaces: &self.namespaces,
                pods: &self.pods,
                services: &self.services,
                endpoint_slices: &self.slices,
                http_routes: &self.routes,
                policies: &self.policies,
            };
            // Any existing netns and cgroup files serve: validation checks they exist.
            let cgroup = self.cgroup.path().to_path_buf();
            let cgroup_of = move |uid: &str| {
                ["uid-old", "uid-hostnet"]
                    .contains(&uid)
                    .then(|| cgroup.clone())
            };
            build(
                &objects,
                |uid| {
                    if uid == "uid-web" {
                        Ok(PodPaths::for_test(
                            PathBuf::from("/proc/self/ns/net"),
                            self.cgroup.path().to_path_buf(),
                        ))
                    } else {
                        Err("no kubelet cgroup".into())
                    }
                },
                cgroup_of,
            )
        }
    }

    #[test]
    fn namespaces_opt_in_and_pods_opt_out() {
        let f = Fixture::new();
        let built = f.build().expect("builds");
        let m = &built.mesh;
        let get = |name: &str| {
            m.pods
                .values()
                .find(|w| w.key.name == name)
                .unwrap_or_else(|| panic!("pod {name}"))
        };
        assert!(get("web").enrolled);
        assert_eq!(get("web").netns, PathBuf::from("/proc/self/ns/net"));
        assert_eq!(
            get("web").identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/sa-web"
        );
        // Remote pods are known (identity, HBONE destination) without netns.
        assert!(get("db").enrolled);
        assert_eq!(get("db").node, "n2");
        assert!(!get("old").enrolled, "namespace not opted in");
        assert!(!get("out").enrolled, "pod opted out");
        assert!(built.unresolved.is_empty());
        // A local pod out of the mesh carries its cgroup (the start-up gate lets it through);
        // a remote one has none.
        assert_eq!(get("old").cgroup, f.cgroup.path());
        assert!(get("db").cgroup.as_os_str().is_empty());
    }

    #[test]
    fn an_unresolved_local_pod_is_listed_but_not_enrolled() {
        let mut f = Fixture::new();
        f.pods.push(pod(
            "shop",
            "new",
            "n1",
            "10.1.0.9",
            json!({ "app": "web" }),
        ));
        let built = f.build().expect("builds");
        let new = built
            .mesh
            .pods
            .values()
            .find(|w| w.key.name == "new")
            .expect("listed");
        assert!(!new.enrolled);
        assert!(
            new.cgroup.as_os_str().is_empty(),
            "stays gated until it can be enrolled"
        );
        assert!(built.unresolved["shop/new"].contains("no kubelet cgroup"));
    }

    #[test]
    fn pods_without_address_or_finished_or_on_the_host_network_are_left_out() {
        let mut f = Fixture::new();
        f.pods.push(arc(json!({
            "metadata": { "name": "pending", "namespace": "shop" },
            "spec": { "nodeName": "n2", "containers": [] },
        })));
        f.pods.push(arc(json!({
            "metadata": { "name": "hostnet", "namespace": "shop", "uid": "uid-hostnet" },
            "spec": { "nodeName": "n1", "hostNetwork": true, "containers": [] },
            "status": { "phase": "Running", "podIP": "192.168.0.1" },
        })));
        // A finished pod still holding the address a running pod now has.
        f.pods.push(arc(json!({
            "metadata": { "name": "done", "namespace": "shop" },
            "spec": { "nodeName": "n2", "containers": [] },
            "status": { "phase": "Succeeded", "podIP": "10.2.0.2" },
        })));
        let built = f.build().expect("builds");
        let names: Vec<&str> = built
            .mesh
            .pods
            .values()
            .map(|w| w.key.name.as_str())
            .collect();
        assert_eq!(names, ["old", "db", "out", "web"]);
        // The local host-network pod is let through the start-up gate.
        assert_eq!(built.mesh.passthrough_cgroups, [f.cgroup.path()]);
    }

    #[test]
    fn services_keep_tcp_ports_and_resolve_named_target_ports() {
        let mut f = Fixture::new();
        f.services.push(arc(json!({
            "metadata": { "name": "web", "namespace": "shop" },
            "spec": {
                "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "selector": { "app": "web" },
                "ports": [
                    { "name": "http", "port": 80, "targetPort": "http-alt", "protocol": "TCP", "appProtocol": "http" },
                    { "name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP" },
                ],
            },
        })));
        f.services.push(arc(json!({
            "metadata": { "name": "headless", "namespace": "shop" },
            "spec": { "clusterIP": "None", "ports": [{ "port": 80 }] },
        })));
        f.slices.push(arc(json!({
            "metadata": { "name": "web-abc", "namespace": "shop", "labels": { "kubernetes.io/service-name": "web" } },
            "addressType": "IPv4",
            "endpoints": [
                { "addresses": ["10.1.0.2"], "conditions": { "ready": true } },
                { "addresses": ["10.2.0.2"] },
                { "addresses": ["10.1.0.9"], "conditions": { "ready": false, "serving": true } },
            ],
            "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        })));
        let built = f.build().expect("builds");
        assert_eq!(built.mesh.services.len(), 1);
        let svc = &built.mesh.services[0];
        assert_eq!(svc.ports.len(), 1);
        assert_eq!((svc.ports[0].port, svc.ports[0].target_port), (80, 8080));
        // Endpoints are the slices' ready addresses (unset = ready), not the selector's pods.
        let ips: Vec<String> = svc
            .endpoints
            .iter()
            .flatten()
            .map(|ip| ip.to_string())
            .collect();
        assert_eq!(ips, ["10.1.0.2", "10.2.0.2"]);
    }

    #[test]
    fn a_bad_route_is_set_aside_and_gateway_routes_ignored() {
        let mut f = Fixture::new();
        f.services.push(arc(json!({
            "metadata": { "name": "web", "namespace": "shop" },
            "spec": { "clusterIP": "10.96.0.10", "selector": { "app": "web" }, "ports": [{ "name": "http", "port": 80 }] },
        })));
        let route = |name: &str, parent: Value, path: &str| {
            dynamic(json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": { "name": name, "namespace": "shop" },
                "spec": { "parentRefs": [parent], "rules": [{ "matches": [{ "path": { "type": "PathPrefix", "value": path } }] }] },
            }))
        };
        let svc = json!({ "group": "", "kind": "Service", "name": "web" });
        f.routes.push(route("good", svc.clone(), "/api"));
        f.routes.push(route("bad", svc, "no-slash"));
        f.routes
            .push(route("gw", json!({ "name": "ingress" }), "/whatever"));
        let built = f.build().expect("builds");
        assert_eq!(built.mesh.routes.len(), 1);
        assert_eq!(built.rejected.len(), 1);
        assert!(
            built.rejected[0].starts_with("HTTPRoute shop/bad: rules[0]"),
            "{:?}",
            built.rejected
        );
    }

    #[test]
    fn a_bad_policy_fails_closed() {
        let mut f = Fixture::new();
        let policy = |name: &str, action: &str, spec_extra: Value| {
            let mut spec =
                json!({ "action": action, "selector": { "matchLabels": { "app": "web" } } });
            for (k, v) in spec_extra.as_object().into_iter().flatten() {
                spec[k] = v.clone();
            }
            dynamic(json!({
                "apiVersion": "security.trellis.dev/v1", "kind": "AuthorizationPolicy",
                "metadata": { "name": name, "namespace": "shop" },
                "spec": spec,
            }))
        };
        f.policies.push(policy(
            "deny-bad",
            "DENY",
            json!({ "rules": [{ "from": [{ "source": { "ipBlocks": ["fish"] } }] }] }),
        ));
        f.policies.push(policy(
            "allow-bad",
            "ALLOW",
            json!({ "rules": [{ "to": [{ "operation": { "methods": ["get"] } }] }] }),
        ));
        let built = f.build().expect("builds");
        assert_eq!(built.rejected.len(), 2, "{:?}", built.rejected);
        let by_name = |n: &str| {
            built
                .mesh
                .policies
                .iter()
                .find(|p| p.name == n)
                .unwrap_or_else(|| panic!("policy {n}"))
        };
        let deny = by_name("deny-bad");
        assert_eq!(deny.action, crate::policy::Action::Deny);
        assert_eq!(deny.rules.len(), 1, "one rule matching everything");
        let allow = by_name("allow-bad");
        assert_eq!(allow.action, crate::policy::Action::Allow);
        assert!(allow.rules.is_empty(), "allow-nothing");
        assert!(built.rejected[0].contains("deny-everything"));
    }

    #[test]
    fn errors_are_located_in_their_section() {
        assert_eq!(locate("pods[3].ip"), Some(("pods", 3)));
        assert_eq!(
            locate("authorizationPolicies[0].rules[1]"),
            Some(("authorizationPolicies", 0))
        );
        assert_eq!(locate("node"), None);
    }
}
