//! Outbound: a connection an enrolled pod made, redirected by `connect4` to the in-pod
//! listener 15001. The agent asks the eBPF map where it was going, then:
//!
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
    CONNECT_TIMEOUT, Direction, Path, Peers, PodContext, ProxyInputs, deliver, log_connection,
    relay,
};

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
    let mesh = inputs.mesh.load();
    let src_ip = pod.workload.ip;
    let dst_pod = mesh.pod_by_ip(original_dst.ip()).filter(|w| w.enrolled);
    let mut peers = Peers {
        src: SocketAddr::new(src_ip, peer.port()),
        src_identity: Some(&pod.workload.identity),
        src_pod: Some(&pod.workload),
        original_dst,
        dst_identity: dst_pod.map(|w| &w.identity),
        dst_pod,
    };

    let (path, outcome) =
        match dst_pod {
            Some(dst) if dst.is_on(&mesh.node) => {
                let local = inputs.local_pods.load();
                match local.get(&dst.ip) {
                    Some(dst_ctx) => {
                        if !deliver::authorize(
                            &mesh,
                            dst_ctx,
                            Some(&pod.workload.identity),
                            peers.src,
                            original_dst.port(),
                        ) {
                            return;
                        }
                        let outcome =
                            match deliver::connect_to_app(dst_ctx, peers.src, original_dst.port())
                                .await
                            {
                                Ok(mut app) => {
                                    if let Ok(addr) = app.local_addr() {
                                        peers.src = addr;
                                    }
                                    relay::relay_tcp(&mut client, &mut app, started).await
                                }
                                Err(e) => relay::Outcome::failed(
                                    started,
                                    format!("connect to {original_dst}: {e}"),
                                ),
                            };
                        (Path::Local, outcome)
                    }
                    // Listed as enrolled but not (yet) enrolled here: plain TCP.
                    None => (
                        Path::Passthrough,
                        passthrough(&mut client, &pod, original_dst, &mut peers, started).await,
                    ),
                }
            }
            Some(dst) => {
                let outcome = match inputs.pool.connect(&inputs, &pod, dst, original_dst).await {
                    Ok(mut tunnel) => relay::relay(&mut client, &mut tunnel, started).await,
                    Err(e) => relay::Outcome::failed(
                        started,
                        format!("HBONE to {original_dst} ({}): {e:#}", dst.identity),
                    ),
                };
                (Path::Hbone, outcome)
            }
            None => (
                Path::Passthrough,
                passthrough(&mut client, &pod, original_dst, &mut peers, started).await,
            ),
        };
    log_connection(Direction::Outbound, path, &peers, &outcome);
}

async fn passthrough(
    client: &mut TcpStream,
    pod: &PodContext,
    original_dst: SocketAddr,
    peers: &mut Peers<'_>,
    started: Instant,
) -> relay::Outcome {
    match connect_from_pod(pod, original_dst).await {
        Ok(mut upstream) => {
            if let Ok(addr) = upstream.local_addr() {
                peers.src = addr;
            }
            relay::relay_tcp(client, &mut upstream, started).await
        }
        Err(e) => relay::Outcome::failed(started, format!("connect to {original_dst}: {e}")),
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
