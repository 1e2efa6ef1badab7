//! The data path: accept a captured connection in a pod, find where it was going, connect
//! there, relay bytes, log what happened.
//!
//! - [`outbound`]: connections an enrolled pod makes (in-pod listener 15001).
//! - [`inbound`]: connections made to an enrolled pod (in-pod listener 15006).
//! - [`relay`]: the byte pump both use.
pub mod inbound;
pub mod outbound;
pub mod relay;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{inpod::PodNetns, redirect::RedirectMaps, state::{Mesh, Workload}};

/// How long an upstream connect may take before the client's connection is closed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every listener needs, handed over as one bundle.
pub struct ProxyInputs {
    /// The live config snapshot (for naming the pod at the other end in logs).
    pub mesh: ArcSwap<Mesh>,
    /// The eBPF maps the data path reads.
    pub maps: Arc<RedirectMaps>,
}

/// One enrolled pod as the data path sees it: who it is and how to open sockets in it.
pub struct PodContext {
    pub workload: Workload,
    pub netns: PodNetns,
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

/// Accepts connections on `listener` until the task is aborted (the pod is unenrolled),
/// handing each to `handle` on its own task.
pub async fn serve<F, Fut>(listener: TcpListener, direction: Direction, pod: Arc<PodContext>, inputs: Arc<ProxyInputs>, handle: F)
where
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
                warn!(pod = %pod.workload.key, direction = direction.as_str(), error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One log line per relayed connection: who, to where, how much, how long, how it ended.
pub(crate) fn log_connection(
    direction: Direction,
    pod: &PodContext,
    src: SocketAddr,
    original_dst: SocketAddr,
    inputs: &ProxyInputs,
    outcome: &relay::Outcome,
) {
    let mesh = inputs.mesh.load();
    let (src_pod, src_identity, dst_pod, dst_identity) = match direction {
        Direction::Outbound => {
            let dst = mesh.pod_by_ip(original_dst.ip());
            (
                pod.workload.key.to_string(),
                pod.workload.identity.to_string(),
                dst.map(|w| w.key.to_string()).unwrap_or_default(),
                dst.map(|w| w.identity.to_string()).unwrap_or_default(),
            )
        }
        Direction::Inbound => {
            let src_w = mesh.pod_by_ip(src.ip());
            (
                src_w.map(|w| w.key.to_string()).unwrap_or_default(),
                src_w.map(|w| w.identity.to_string()).unwrap_or_default(),
                pod.workload.key.to_string(),
                pod.workload.identity.to_string(),
            )
        }
    };
    info!(
        direction = direction.as_str(),
        src.addr = %src,
        src.pod = %src_pod,
        src.identity = %src_identity,
        dst.original = %original_dst,
        dst.pod = %dst_pod,
        dst.identity = %dst_identity,
        bytes_sent = outcome.client_to_upstream,
        bytes_received = outcome.upstream_to_client,
        duration_ms = outcome.duration.as_millis() as u64,
        error = outcome.error.as_deref().unwrap_or(""),
        "connection closed"
    );
}
