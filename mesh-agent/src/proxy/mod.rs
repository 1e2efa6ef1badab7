//! The data path: accept a captured connection in a pod, find where it was going, decide,
//! connect, relay bytes, log what happened.
//!
//! - [`outbound`]: connections an enrolled pod makes (in-pod listener 15001). Three paths:
//!   to an enrolled pod on this node (delivered in-process, policy checked), to an enrolled pod
//!   on another node (HBONE: HTTP/2 CONNECT over mTLS to its 15008), anywhere else
//!   (passthrough).
//! - [`inbound_hbone`]: HBONE connections from other nodes' agents (in-pod listener 15008).
//! - [`inbound_plain`]: plaintext connections to an enrolled pod from outside the mesh
//!   (in-pod listener 15006, steered there by `sk_lookup`).
//! - [`deliver`]: the last hop to the app and the authorization check before it.
//! - [`pool`]: pooled HBONE connections. [`relay`]: the byte pump.
pub mod coalesce;
pub mod deliver;
pub mod http;
pub mod inbound_hbone;
pub mod inbound_plain;
pub mod outbound;
pub mod pool;
pub mod relay;
pub mod upstream;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::{
    identity::CertManager,
    inpod::PodNetns,
    metrics::{ConnectionLabels, Metrics, Reporter},
    redirect::RedirectMaps,
    route::RouteTable,
    service::ServiceIndex,
    state::{Identity, Mesh, Workload},
    tls::TlsConfigs,
};

/// How long an upstream connect may take before the client's connection is closed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every listener needs, handed over as one bundle.
pub struct ProxyInputs {
    /// The live config snapshot.
    pub mesh: ArcSwap<Mesh>,
    /// Enrolled pods of this node by address, for delivering to them.
    pub local_pods: ArcSwap<HashMap<IpAddr, Arc<PodContext>>>,
    /// The eBPF maps the data path reads.
    pub maps: Arc<RedirectMaps>,
    /// Workload certificates held by this node.
    pub certs: Arc<CertManager>,
    /// rustls configs built from them.
    pub tls: TlsConfigs,
    /// Pooled HBONE connections to other nodes.
    pub pool: pool::HbonePool,
    /// Services by VIP and name (derived from the snapshot).
    pub services: ArcSwap<ServiceIndex>,
    /// HTTP routes by parent service (derived from the snapshot).
    pub routes: ArcSwap<RouteTable>,
    /// L7 runtime state: endpoint load, ejections, circuit breakers, budgets, rate limits.
    pub l7: http::runtime::L7Runtime,
    /// Istio-compatible metrics and agent health counters.
    pub metrics: Arc<Metrics>,
    /// Whether connections and requests are recorded (metrics) and access-logged.
    pub telemetry: bool,
    /// HTTP/1.1 requests that need no more than routing, filters, balancing and telemetry
    /// take the fast path (`http::fast_path`) instead of hyper.
    pub http1_fast_path: bool,
    /// h2c connections to ports whose routes need no retries take the HTTP/2 fast path
    /// (`http::h2_fast_path`) instead of hyper.
    pub h2_fast_path: bool,
    /// Set once a successor agent took over: finish what is open, nudge HTTP clients away.
    pub drain: crate::drain::Drain,
    /// Caps on open connections, per pod and for the node.
    pub limits: ConnectionLimits,
}

/// How many captured connections may be open at once. A connection over a limit is reset
/// at accept (the client sees a refusal at once, instead of waiting in a backlog), counted
/// in `trellis_connections_rejected_total` and logged at most once a second per listener.
/// The per-pod cap is what keeps one noisy pod from taking the node's whole share.
#[derive(Debug)]
pub struct ConnectionLimits {
    pub per_pod: u64,
    pub node: u64,
    /// Open connections over all pods (accepted and not yet finished).
    pub node_open: std::sync::atomic::AtomicU64,
}

impl ConnectionLimits {
    pub fn new(per_pod: u64, node: u64) -> Self {
        Self {
            per_pod,
            node,
            node_open: Default::default(),
        }
    }
}

/// Defaults: a pod rarely needs more than a few thousand concurrent connections, and a node
/// agent with ~110 pods stays well inside its file descriptor limit (two fds a connection).
impl Default for ConnectionLimits {
    fn default() -> Self {
        Self::new(8192, 65536)
    }
}

impl ProxyInputs {
    /// Swaps in a new snapshot and the tables derived from it.
    pub fn publish(&self, mesh: Mesh) {
        let services = ServiceIndex::new(&mesh.services, mesh.pods.values());
        self.l7.prune(&services);
        self.services.store(Arc::new(services));
        self.routes.store(Arc::new(RouteTable::new(&mesh.routes)));
        self.mesh.store(Arc::new(mesh));
    }
}

/// One enrolled pod as the data path sees it: who it is and how to open sockets in it.
pub struct PodContext {
    pub workload: Workload,
    pub netns: PodNetns,
    /// Connections this pod's listeners are serving right now.
    pub active_connections: std::sync::atomic::AtomicU64,
    /// Upstream HTTP clients of this pod, one set per worker (so that a request and its
    /// pooled upstream connection stay on one thread), created on first use.
    pub http_clients: Box<[std::sync::OnceLock<Arc<http::client::PodClients>>]>,
}

impl PodContext {
    pub fn new(workload: Workload, netns: PodNetns) -> Self {
        Self {
            workload,
            netns,
            active_connections: Default::default(),
            http_clients: (0..crate::workers::count())
                .map(|_| Default::default())
                .collect(),
        }
    }
}

/// Which way a relayed connection goes relative to the pod that captured it.
#[derive(Clone, Copy, Debug)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// How a connection travelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Both pods on this node: handed from one to the other inside the agent.
    Local,
    /// Over HBONE (mTLS) between nodes.
    Hbone,
    /// To or from something outside the mesh, as plain TCP.
    Passthrough,
}

impl Path {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Path::Local => "local",
            Path::Hbone => "hbone",
            Path::Passthrough => "passthrough",
        }
    }

    /// Istio's `connection_security_policy` vocabulary.
    pub(crate) fn security(self) -> &'static str {
        match self {
            Path::Hbone => "mutual_tls",
            Path::Local | Path::Passthrough => "none",
        }
    }
}

/// Who a connection was from and to, as far as the agent knows it for sure.
pub struct Peers<'a> {
    pub src: SocketAddr,
    /// Verified source identity (structural on this node, or from the peer's certificate).
    pub src_identity: Option<&'a Identity>,
    pub src_pod: Option<&'a Workload>,
    pub original_dst: SocketAddr,
    pub dst_identity: Option<&'a Identity>,
    pub dst_pod: Option<&'a Workload>,
    /// `name.ns.svc.cluster.local` when the connection was to a Service.
    pub service: Option<String>,
}

/// Accepts connections on `listener` (this worker's dup of a pod listener) until the task
/// is aborted (the pod is unenrolled or handed to a successor), handing each to `handle` on
/// its own task.
pub async fn serve<F, Fut>(
    listener: std::net::TcpListener,
    name: &'static str,
    worker: usize,
    pod: Arc<PodContext>,
    inputs: Arc<ProxyInputs>,
    handle: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr, Arc<PodContext>, Arc<ProxyInputs>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use std::sync::atomic::Ordering::Relaxed;
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            error!(pod = %pod.workload.key, listener = name, worker, error = %e, "cannot register the listener with this worker; it does not accept here");
            return;
        }
    };
    let mut last_reject_log: Option<std::time::Instant> = None;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let limits = &inputs.limits;
                let reason = if pod.active_connections.load(Relaxed) >= limits.per_pod {
                    Some(crate::metrics::RejectReason::PodLimit)
                } else if limits.node_open.load(Relaxed) >= limits.node {
                    Some(crate::metrics::RejectReason::NodeLimit)
                } else {
                    None
                };
                if let Some(reason) = reason {
                    reject(stream, reason, &inputs);
                    if last_reject_log.is_none_or(|t| t.elapsed() >= REJECT_LOG_INTERVAL) {
                        last_reject_log = Some(std::time::Instant::now());
                        warn!(pod = %pod.workload.key, listener = name, peer = %peer, ?reason, per_pod = limits.per_pod, node = limits.node, "connection limit reached; resetting new connections");
                    }
                    continue;
                }
                // Counted before the task starts, so a burst cannot overshoot the limits.
                pod.active_connections.fetch_add(1, Relaxed);
                limits.node_open.fetch_add(1, Relaxed);
                let work = handle(stream, peer, pod.clone(), inputs.clone());
                let pod = pod.clone();
                let inputs = inputs.clone();
                tokio::spawn(async move {
                    work.await;
                    pod.active_connections.fetch_sub(1, Relaxed);
                    inputs.limits.node_open.fetch_sub(1, Relaxed);
                });
            }
            Err(e) => {
                // Out of fds or memory: back off instead of spinning; the backlog holds.
                warn!(pod = %pod.workload.key, listener = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Log lines about rejected connections: at most one per listener per interval.
const REJECT_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Resets a connection over a limit: RST (linger 0) tells the client at once.
fn reject(
    stream: tokio::net::TcpStream,
    reason: crate::metrics::RejectReason,
    inputs: &ProxyInputs,
) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
    inputs.metrics.connection_rejected(reason);
}

/// The workload name metrics use: the pod's `app` label, else its name (bounded: no IPs).
pub(crate) fn workload_name(w: &Workload) -> String {
    w.labels
        .get("app")
        .cloned()
        .unwrap_or_else(|| w.key.name.clone())
}

/// Istio's TCP labels for one reporter.
fn connection_labels(
    reporter: Reporter,
    path: Path,
    peers: &Peers<'_>,
    flags: &str,
) -> ConnectionLabels {
    let unknown = || "unknown".to_string();
    ConnectionLabels {
        reporter,
        source_workload: peers.src_pod.map(workload_name).unwrap_or_else(unknown),
        source_workload_namespace: peers
            .src_pod
            .map(|w| w.key.namespace.clone())
            .unwrap_or_else(unknown),
        source_principal: peers
            .src_identity
            .map(|i| i.to_string())
            .unwrap_or_else(unknown),
        destination_workload: peers.dst_pod.map(workload_name).unwrap_or_else(unknown),
        destination_workload_namespace: peers
            .dst_pod
            .map(|w| w.key.namespace.clone())
            .unwrap_or_else(unknown),
        destination_principal: peers
            .dst_identity
            .map(|i| i.to_string())
            .unwrap_or_else(unknown),
        destination_service: peers.service.clone().unwrap_or_else(unknown),
        request_protocol: "tcp".to_string(),
        response_flags: flags.to_string(),
        connection_security_policy: path.security().to_string(),
    }
}

/// Which reporters a connection is counted for: the agent is the source side of what it
/// captured outbound, the destination side of what it captured inbound, and both when it
/// handed a connection between two pods of its node.
pub(crate) fn reporters(direction: Direction, path: Path) -> &'static [Reporter] {
    match (direction, path) {
        (Direction::Outbound, Path::Local) => &[Reporter::Source, Reporter::Destination],
        (Direction::Outbound, _) => &[Reporter::Source],
        (Direction::Inbound, _) => &[Reporter::Destination],
    }
}

/// Records a finished connection: Istio TCP metrics, and one access log line (target
/// `access`, so `RUST_LOG=access=off` silences them): who, to where, how, how much, how long,
/// how it ended.
pub(crate) fn log_connection(
    inputs: &ProxyInputs,
    direction: Direction,
    path: Path,
    peers: &Peers<'_>,
    outcome: &relay::Outcome,
) {
    if !inputs.telemetry {
        return;
    }
    let flags = if outcome.error.is_some()
        && outcome.client_to_upstream == 0
        && outcome.upstream_to_client == 0
    {
        "UF"
    } else {
        "-"
    };
    for &reporter in reporters(direction, path) {
        let labels = connection_labels(reporter, path, peers, flags);
        inputs.metrics.tcp_opened(&labels);
        // Istio's point of view: "sent" is what went back to the client.
        inputs.metrics.tcp_closed(
            &labels,
            outcome.upstream_to_client,
            outcome.client_to_upstream,
        );
    }
    let name = |w: Option<&Workload>| w.map(|w| w.key.to_string()).unwrap_or_default();
    let id = |i: Option<&Identity>| i.map(|i| i.to_string()).unwrap_or_default();
    info!(
        target: "access",
        direction = direction.as_str(),
        path = path.as_str(),
        security = path.security(),
        src.addr = %peers.src,
        src.pod = %name(peers.src_pod),
        src.identity = %id(peers.src_identity),
        dst.original = %peers.original_dst,
        dst.pod = %name(peers.dst_pod),
        dst.identity = %id(peers.dst_identity),
        dst.service = %peers.service.as_deref().unwrap_or(""),
        bytes_sent = outcome.client_to_upstream,
        bytes_received = outcome.upstream_to_client,
        duration_ms = outcome.duration.as_millis() as u64,
        error = outcome.error.as_deref().unwrap_or(""),
        "connection closed"
    );
}
