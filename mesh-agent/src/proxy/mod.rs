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
use tracing::{info, warn};

use crate::{
    identity::CertManager,
    inpod::PodNetns,
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
}

impl ProxyInputs {
    /// Swaps in a new snapshot and the tables derived from it.
    pub fn publish(&self, mesh: Mesh) {
        self.services
            .store(Arc::new(ServiceIndex::new(&mesh.services)));
        self.routes.store(Arc::new(RouteTable::new(&mesh.routes)));
        self.mesh.store(Arc::new(mesh));
    }
}

/// One enrolled pod as the data path sees it: who it is and how to open sockets in it.
pub struct PodContext {
    pub workload: Workload,
    pub netns: PodNetns,
    /// Upstream HTTP clients of this pod, created on its first L7 request.
    pub http_clients: std::sync::OnceLock<Arc<http::client::PodClients>>,
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
    fn as_str(self) -> &'static str {
        match self {
            Path::Local => "local",
            Path::Hbone => "hbone",
            Path::Passthrough => "passthrough",
        }
    }

    /// Istio's `connection_security_policy` vocabulary.
    fn security(self) -> &'static str {
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
}

/// Accepts connections on `listener` until the task is aborted (the pod is unenrolled),
/// handing each to `handle` on its own task.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    name: &'static str,
    pod: Arc<PodContext>,
    inputs: Arc<ProxyInputs>,
    handle: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr, Arc<PodContext>, Arc<ProxyInputs>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(handle(stream, peer, pod.clone(), inputs.clone()));
            }
            Err(e) => {
                // Out of fds or memory: back off instead of spinning; the backlog holds.
                warn!(pod = %pod.workload.key, listener = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One log line per relayed connection: who, to where, how, how much, how long, how it ended.
pub(crate) fn log_connection(
    direction: Direction,
    path: Path,
    peers: &Peers<'_>,
    outcome: &relay::Outcome,
) {
    let name = |w: Option<&Workload>| w.map(|w| w.key.to_string()).unwrap_or_default();
    let id = |i: Option<&Identity>| i.map(|i| i.to_string()).unwrap_or_default();
    info!(
        direction = direction.as_str(),
        path = path.as_str(),
        security = path.security(),
        src.addr = %peers.src,
        src.pod = %name(peers.src_pod),
        src.identity = %id(peers.src_identity),
        dst.original = %peers.original_dst,
        dst.pod = %name(peers.dst_pod),
        dst.identity = %id(peers.dst_identity),
        bytes_sent = outcome.client_to_upstream,
        bytes_received = outcome.upstream_to_client,
        duration_ms = outcome.duration.as_millis() as u64,
        error = outcome.error.as_deref().unwrap_or(""),
        "connection closed"
    );
}
