//! Outbound: a connection an enrolled pod made, redirected by `connect4` to the in-pod
//! listener 15001. The agent asks the eBPF map where it was going, then:
//!
//! - a Service VIP: HTTP ports (declared, or sniffed when undeclared) go to the L7 proxy
//!   (routing, retries, load balancing per request); other ports are load-balanced per
//!   connection over the service's endpoints;
//! - an enrolled pod on this node: checks that pod's policies with the source's structural
//!   identity and hands the connection to its app directly (no TLS needed on one node);
//! - an enrolled pod on another node: HBONE to that pod's 15008 over a pooled mTLS
//!   connection carrying the source workload's certificate;
//! - anything else: connects there from inside the source pod's netns (plain passthrough),
//!   so the packets leave with the pod's own address.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use socket2::Domain;
use tokio::net::{TcpSocket, TcpStream};
use tracing::warn;

use super::{
    CONNECT_TIMEOUT, Direction, Path, Peers, PodContext, ProxyInputs, http, log_connection, relay,
    upstream::{self, Authorization, UpstreamError},
};
use crate::service::AppProtocol;

pub async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    inputs: Arc<ProxyInputs>,
) {
    let started = Instant::now();
    let Some(original_dst) = inputs
        .maps
        .original_dst(pod.netns.netns_cookie(), peer.port())
    else {
        // Only a connect the app aimed at 127.0.0.1:15001 itself lands here.
        warn!(pod = %pod.workload.key, client = %peer, "no original destination recorded for connection; closing it");
        return;
    };
    let _ = client.set_nodelay(true);
    let mesh = inputs.mesh.load_full();

    // A Service VIP: L7 for HTTP ports, per-connection load balancing for the rest.
    let mut target = original_dst;
    let mut service_name = None;
    let services = inputs.services.load();
    if let Some((service, port)) = services.by_vip(original_dst.ip(), original_dst.port()) {
        service_name = Some(format!(
            "{}.{}.svc.cluster.local",
            service.name, service.namespace
        ));
        let protocol = match port.protocol {
            AppProtocol::Unknown => http::detect::sniff(&client).await,
            declared => declared,
        };
        if protocol.is_http() {
            http::serve_outbound(
                client,
                pod,
                inputs.clone(),
                service.clone(),
                port.clone(),
                protocol,
                original_dst,
            )
            .await;
            return;
        }
        match http::pick_l4_endpoint(&inputs, &services, service, port) {
            Some(endpoint) => target = endpoint,
            None => {
                let outcome = relay::Outcome::failed(
                    started,
                    format!(
                        "service {}/{} has no endpoints",
                        service.namespace, service.name
                    ),
                );
                let peers = peers_for(&pod, &mesh, peer, original_dst);
                log_connection(
                    &inputs,
                    Direction::Outbound,
                    Path::Passthrough,
                    &peers,
                    &outcome,
                );
                return;
            }
        }
    }

    let mut peers = peers_for(&pod, &mesh, peer, original_dst);
    peers.service = service_name;
    let dst_pod = mesh.pod_by_ip(target.ip()).filter(|w| w.enrolled);
    peers.dst_pod = dst_pod;
    peers.dst_identity = dst_pod.map(|w| &w.identity);
    let (path, outcome) =
        match upstream::open(&inputs, &mesh, &pod, target, Authorization::Connection).await {
            Ok(mut up) => {
                if let Some(source) = up.source {
                    peers.src = source;
                }
                let outcome = match &mut up.io {
                    upstream::UpstreamIo::Tcp(tcp) => {
                        relay::relay_tcp(&mut client, tcp, started).await
                    }
                    upstream::UpstreamIo::Tunnel(tunnel) => {
                        relay::relay(&mut client, tunnel.as_mut(), started).await
                    }
                };
                (up.path, outcome)
            }
            // Logged with the policy that decided it; the client's connection just closes.
            Err(UpstreamError::Denied) => return,
            Err(UpstreamError::Connect(e)) => {
                let path = match dst_pod {
                    Some(w) if !w.is_on(&mesh.node) => Path::Hbone,
                    Some(_) => Path::Local,
                    None => Path::Passthrough,
                };
                (path, relay::Outcome::failed(started, format!("{e:#}")))
            }
        };
    log_connection(&inputs, Direction::Outbound, path, &peers, &outcome);
}

fn peers_for<'a>(
    pod: &'a PodContext,
    mesh: &'a crate::state::Mesh,
    peer: SocketAddr,
    original_dst: SocketAddr,
) -> Peers<'a> {
    let dst_pod = mesh.pod_by_ip(original_dst.ip()).filter(|w| w.enrolled);
    Peers {
        src: SocketAddr::new(pod.workload.ip, peer.port()),
        src_identity: Some(&pod.workload.identity),
        src_pod: Some(&pod.workload),
        original_dst,
        dst_identity: dst_pod.map(|w| &w.identity),
        dst_pod,
        service: None,
    }
}

/// A TCP connection to `dst` from a socket inside the pod's network namespace.
pub(crate) async fn connect_from_pod(
    pod: &PodContext,
    dst: SocketAddr,
) -> std::io::Result<TcpStream> {
    let socket = pod.netns.socket(Domain::for_address(dst)).await?;
    socket.set_tcp_nodelay(true)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}
