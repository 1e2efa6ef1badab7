//! Outbound: a connection an enrolled pod made, redirected by `connect4` to the in-pod
//! listener. The agent asks the eBPF map where it was going and connects there from inside
//! the pod's network namespace, so the packets leave with the pod's own source address.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use socket2::Domain;
use tokio::net::{TcpSocket, TcpStream};
use tracing::warn;

use super::{CONNECT_TIMEOUT, Direction, PodContext, ProxyInputs, log_connection, relay};

pub async fn handle(mut client: TcpStream, peer: SocketAddr, pod: Arc<PodContext>, inputs: Arc<ProxyInputs>) {
    let started = Instant::now();
    let Some(original_dst) = inputs.maps.original_dst(pod.netns.netns_cookie(), peer.port()) else {
        // Only a connect the app aimed at 127.0.0.1:15001 itself lands here.
        warn!(pod = %pod.workload.key, client = %peer, "no original destination recorded for connection; closing it");
        return;
    };
    let _ = client.set_nodelay(true);
    let mut upstream = match connect_from_pod(&pod, original_dst).await {
        Ok(s) => s,
        Err(e) => {
            let outcome = relay::Outcome {
                duration: started.elapsed(),
                error: Some(format!("connect to {original_dst}: {e}")),
                ..Default::default()
            };
            log_connection(Direction::Outbound, &pod, pod_source(&pod, peer), original_dst, &inputs, &outcome);
            return;
        }
    };
    let outcome = relay::relay(&mut client, &mut upstream, started).await;
    log_connection(Direction::Outbound, &pod, pod_source(&pod, peer), original_dst, &inputs, &outcome);
}

/// The app's socket talks to 127.0.0.1:15001; report it by the pod's address instead.
fn pod_source(pod: &PodContext, peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(pod.workload.ip, peer.port())
}

async fn connect_from_pod(pod: &PodContext, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = pod.netns.socket(Domain::for_address(dst)).await?;
    socket.set_tcp_nodelay(true)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    Ok(stream)
}
