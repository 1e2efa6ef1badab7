//! The Kubernetes snapshot source (`mesh-agent run --kubernetes`): watches the API server and
//! builds the same [`Mesh`] snapshot the config file builds.
//!
//! What is watched, and why:
//!
//! | kind | scope | for |
//! |------|-------|-----|
//! | Namespace | label `trellis.dev/dataplane=enabled` | opt-in; unlabelling makes the watch report the namespace deleted, and its pods are unenrolled |
//! | Pod | `spec.nodeName=<this node>` | pods to enrol: UID (→ cgroup, netns), IP, service account, labels, opt-out label |
//! | Pod | `spec.nodeName!=<this node>` | every other node's pods: their IP, node and service account are the HBONE destination and the identity to verify; their labels select Service endpoints and policy targets. Trimmed to those fields before they are stored |
//! | Service | all | VIPs, ports, app protocols, selectors |
//! | EndpointSlice | all | Service endpoints: the ready addresses (so pods that are starting, failing readiness or terminating get no traffic, and selector-less Services work); the numbers behind named `targetPort`s |
//! | HTTPRoute (gateway.networking.k8s.io/v1) | all | GAMMA routes (Service parents) |
//! | AuthorizationPolicy (security.trellis.dev/v1) | all | authorization |
//!
//! Remote pods are needed because there is no control plane in between (ztunnel gets the same
//! facts from istiod): EndpointSlices carry pod addresses but neither service accounts nor
//! labels. The two pod watches split by field selector, so a pod whose `spec.nodeName` changes
//! leaves one watch (DELETED) and enters the other (ADDED).
//!
//! Snapshots: every watch event wakes the builder, which waits [`DEBOUNCE`] for the burst to
//! end (a relist is hundreds of events), builds from all stores at once, and hands the
//! snapshot on only when it differs from the last one. Local pods' netns and cgroup are
//! re-resolved every [`RESOLVE_INTERVAL`] too (a pod's processes can appear after it is
//! reported running, and a restarted container has new pids).
//!
//! Outages: watchers retry with backoff (250 ms doubling to 5 s, jittered) and the stores keep
//! what they had, so the last snapshot keeps serving. When the server is back a watch resumes
//! from the last resourceVersion seen (bookmarks keep that recent); if the server has compacted
//! that version away (410 Gone), the watcher lists again and the store is replaced at once.
pub mod build;
pub mod podns;
pub mod watch;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::watcher,
};
use tokio::sync::{Notify, mpsc};
use tracing::{error, info, warn};

use crate::{source::Update, state::Mesh};

/// The label of a namespace's opt-in and a pod's opt-out (the project's one prefix).
pub const DATAPLANE_LABEL: &str = "trellis.dev/dataplane";
/// Namespace label value: its pods are enrolled.
pub const DATAPLANE_ENABLED: &str = "enabled";
/// Pod label value: this pod is not enrolled even in an enrolled namespace.
pub const DATAPLANE_DISABLED: &str = "disabled";

/// How long the builder waits for a burst of events to end.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// How often local pods' netns and cgroup are checked again.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(2);
/// How often waiting for the first lists is logged.
const WAIT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// `run --kubernetes` options.
#[derive(clap::Args, Clone, Debug)]
pub struct KubeOptions {
    /// This node's name: its pods are those with this `spec.nodeName` (the DaemonSet sets
    /// NODE_NAME from the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// A kubeconfig file; default: the in-cluster service account.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The cgroup v2 directory kubelet's `kubepods` hierarchy is under.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub kubelet_cgroup_root: PathBuf,
    /// Where the container runtime bind-mounts pods' network namespaces.
    #[arg(long, default_value = "/var/run/netns")]
    pub netns_dir: PathBuf,
    /// SPIFFE trust domain of workload identities.
    #[arg(long, default_value = crate::config::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// The cluster CA (`mesh-agent ca`) to get workload certificates from, `host:port`;
    /// default: a local CA in --state-dir (every agent its own root).
    #[arg(long, requires = "ca_root_cert", conflicts_with = "config")]
    pub ca_addr: Option<String>,
    /// The mesh's root certificates (PEM): they verify the CA's endpoint and peers.
    #[arg(long)]
    pub ca_root_cert: Option<PathBuf>,
    /// The name the CA's certificate is for.
    #[arg(long, default_value = "trellis-ca.trellis-system.svc")]
    pub ca_server_name: String,
    /// The agent's service-account token, sent to the CA (a projected token, ideally with the
    /// CA's audience).
    #[arg(
        long,
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub ca_token_file: PathBuf,
}

/// The cluster CA client `--ca-addr` asks for, if any.
pub fn cluster_ca_issuer(
    options: &KubeOptions,
) -> anyhow::Result<Option<Arc<dyn crate::identity::Issuer>>> {
    let Some(addr) = &options.ca_addr else {
        return Ok(None);
    };
    let root = options
        .ca_root_cert
        .as_deref()
        .context("--ca-addr needs --ca-root-cert")?;
    let client = crate::identity::remote::ClusterCaClient::new(
        addr,
        &options.ca_server_name,
        root,
        &options.ca_token_file,
    )
    .with_context(|| format!("the cluster CA at {addr}"))?;
    Ok(Some(Arc::new(client)))
}

/// The reflectors' stores.
struct Stores {
    namespaces: watch::Watched<Namespace>,
    local_pods: watch::Watched<Pod>,
    remote_pods: watch::Watched<Pod>,
    services: watch::Watched<Service>,
    endpoint_slices: watch::Watched<EndpointSlice>,
    http_routes: watch::Watched<DynamicObject>,
    policies: watch::Watched<DynamicObject>,
}

impl Stores {
    fn settled(&self) -> Vec<(&'static str, bool)> {
        use std::sync::atomic::Ordering::Acquire;
        vec![
            ("namespaces", self.namespaces.settled.load(Acquire)),
            ("pods (this node)", self.local_pods.settled.load(Acquire)),
            ("pods (other nodes)", self.remote_pods.settled.load(Acquire)),
            ("services", self.services.settled.load(Acquire)),
            ("endpointslices", self.endpoint_slices.settled.load(Acquire)),
            ("httproutes", self.http_routes.settled.load(Acquire)),
            ("authorizationpolicies", self.policies.settled.load(Acquire)),
        ]
    }
}

pub fn http_route_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
        "httproutes",
    )
}

pub fn authorization_policy_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("security.trellis.dev", "v1", "AuthorizationPolicy"),
        "authorizationpolicies",
    )
}

/// A Kubernetes client from a kubeconfig file, or the in-cluster service account when none
/// is given. The agent's watchers and the cluster CA both use it.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster()
            .context("no --kubeconfig/KUBECONFIG and not running in a pod (in-cluster config)")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

fn strip_meta(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
}

/// Keeps what the snapshot needs of a pod on another node.
fn strip_remote_pod(pod: &mut Pod) {
    strip_meta(&mut pod.metadata);
    if let Some(spec) = &mut pod.spec {
        *spec = k8s_openapi::api::core::v1::PodSpec {
            node_name: spec.node_name.take(),
            service_account_name: spec.service_account_name.take(),
            host_network: spec.host_network,
            ..Default::default()
        };
    }
    if let Some(status) = &mut pod.status {
        *status = k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase.take(),
            pod_ip: status.pod_ip.take(),
            host_ip: status.host_ip.take(),
            ..Default::default()
        };
    }
}

fn strip_local_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
}

fn strip_namespace(ns: &mut Namespace) {
    strip_meta(&mut ns.metadata);
}

fn strip_service(svc: &mut Service) {
    strip_meta(&mut svc.metadata);
    svc.status = None;
}

fn strip_endpoint_slice(slice: &mut EndpointSlice) {
    strip_meta(&mut slice.metadata);
    for e in &mut slice.endpoints {
        e.hints = None;
        e.deprecated_topology = None;
    }
}

fn strip_dynamic(o: &mut DynamicObject) {
    strip_meta(&mut o.metadata);
    if let Some(map) = o.data.as_object_mut() {
        map.remove("status");
    }
}

/// Connects, waits for the first complete view of the cluster and builds the first snapshot;
/// then keeps sending new ones. Fails on bad options or an unusable kubeconfig; an API server
/// that cannot be reached yet is waited for.
pub async fn start(options: KubeOptions) -> anyhow::Result<(Mesh, mpsc::Receiver<Update>)> {
    let Some(node) = options.node_name.clone().filter(|n| !n.is_empty()) else {
        bail!("--kubernetes needs this node's name: --node-name or NODE_NAME");
    };
    let client = client(options.kubeconfig.as_deref()).await?;
    let changed = Arc::new(Notify::new());
    let all = || watcher::Config::default();
    let stores = Stores {
        namespaces: watch::spawn(
            "namespaces",
            Api::all(client.clone()),
            all().labels(&format!("{DATAPLANE_LABEL}={DATAPLANE_ENABLED}")),
            (),
            strip_namespace,
            changed.clone(),
        ),
        local_pods: watch::spawn(
            "pods (this node)",
            Api::all(client.clone()),
            all().fields(&format!("spec.nodeName={node}")),
            (),
            strip_local_pod,
            changed.clone(),
        ),
        remote_pods: watch::spawn(
            "pods (other nodes)",
            Api::all(client.clone()),
            all().fields(&format!("spec.nodeName!={node}")),
            (),
            strip_remote_pod,
            changed.clone(),
        ),
        services: watch::spawn(
            "services",
            Api::all(client.clone()),
            all(),
            (),
            strip_service,
            changed.clone(),
        ),
        endpoint_slices: watch::spawn(
            "endpointslices",
            Api::all(client.clone()),
            all(),
            (),
            strip_endpoint_slice,
            changed.clone(),
        ),
        http_routes: watch::spawn(
            "httproutes",
            Api::all_with(client.clone(), &http_route_resource()),
            all(),
            http_route_resource(),
            strip_dynamic,
            changed.clone(),
        ),
        policies: watch::spawn(
            "authorizationpolicies",
            Api::all_with(client.clone(), &authorization_policy_resource()),
            all(),
            authorization_policy_resource(),
            strip_dynamic,
            changed.clone(),
        ),
    };
    let started = tokio::time::Instant::now();
    let mut next_log = started + WAIT_LOG_INTERVAL;
    loop {
        let pending: Vec<&str> = stores
            .settled()
            .into_iter()
            .filter(|(_, ok)| !ok)
            .map(|(what, _)| what)
            .collect();
        if pending.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= next_log {
            warn!(waiting_for = %pending.join(", "), waited_s = started.elapsed().as_secs(), "still waiting for the first lists from the Kubernetes API");
            next_log += WAIT_LOG_INTERVAL;
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), changed.notified()).await;
    }
    let mut builder = Builder {
        node,
        trust_domain: options.trust_domain.clone(),
        stores,
        resolver: podns::PodResolver::new(
            options.kubelet_cgroup_root.clone(),
            options.netns_dir.clone(),
        ),
        last_rejected: Vec::new(),
        last_unresolved: Default::default(),
    };
    let first = builder
        .build()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("building the first snapshot from the Kubernetes API")?;
    info!(
        pods = first.pods.len(),
        services = first.services.len(),
        "first snapshot from the Kubernetes API"
    );
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(builder.run(first.clone(), changed, tx));
    Ok((first, rx))
}

struct Builder {
    node: String,
    trust_domain: String,
    stores: Stores,
    resolver: podns::PodResolver,
    last_rejected: Vec<String>,
    last_unresolved: std::collections::BTreeMap<String, String>,
}

impl Builder {
    fn build(&mut self) -> Result<Mesh, crate::config::ConfigError> {
        let namespaces = self.stores.namespaces.store.state();
        let mut pods = self.stores.local_pods.store.state();
        pods.extend(self.stores.remote_pods.store.state());
        let services = self.stores.services.store.state();
        let endpoint_slices = self.stores.endpoint_slices.store.state();
        let http_routes = self.stores.http_routes.store.state();
        let policies = self.stores.policies.store.state();
        let objects = build::Objects {
            node: &self.node,
            trust_domain: &self.trust_domain,
            namespaces: &namespaces,
            pods: &pods,
            services: &services,
            endpoint_slices: &endpoint_slices,
            http_routes: &http_routes,
            policies: &policies,
        };
        let resolver = std::cell::RefCell::new(&mut self.resolver);
        let built = build::build(
            &objects,
            |uid| resolver.borrow_mut().resolve(uid),
            |uid| resolver.borrow().cgroup_of(uid),
        )?;
        let uids = self
            .stores
            .local_pods
            .store
            .state()
            .iter()
            .filter_map(|p| p.metadata.uid.clone())
            .collect();
        self.resolver.retain(&uids);
        // Log what changed only, not every rebuild.
        if built.rejected != self.last_rejected {
            for r in built
                .rejected
                .iter()
                .filter(|r| !self.last_rejected.contains(r))
            {
                error!(rejected = %r, "Kubernetes object rejected; the rest of the snapshot is applied");
            }
            self.last_rejected = built.rejected.clone();
        }
        if built.unresolved != self.last_unresolved {
            for (pod, why) in &built.unresolved {
                if self.last_unresolved.get(pod) != Some(why) {
                    info!(pod = %pod, reason = %why, "pod not enrolled yet: its netns/cgroup is not found");
                }
            }
            self.last_unresolved = built.unresolved.clone();
        }
        Ok(built.mesh)
    }

    async fn run(mut self, mut last: Mesh, changed: Arc<Notify>, tx: mpsc::Sender<Update>) {
        let mut last_error: Option<String> = None;
        let mut resolve = tokio::time::interval(RESOLVE_INTERVAL);
        resolve.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = changed.notified() => tokio::time::sleep(DEBOUNCE).await,
                _ = resolve.tick() => {}
            }
            let update = match self.build() {
                Ok(mesh) if mesh == last => continue,
                Ok(mesh) => {
                    last = mesh.clone();
                    last_error = None;
                    Update::Apply(Box::new(mesh))
                }
                Err(e) if last_error.as_deref() == Some(&e.to_string()) => continue,
                Err(e) => {
                    last_error = Some(e.to_string());
                    Update::Rejected(e)
                }
            };
            if tx.send(update).await.is_err() {
                return; // the agent is shutting down
            }
        }
    }
}
