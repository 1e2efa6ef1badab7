//! Inbound plaintext: a connection to an enrolled pod from outside the mesh, steered by
//! `sk_lookup` to the in-pod listener 15006. The accepted socket's local address is the
//! original destination. The client has no verified identity, so only policies that do not
//! ask for one can allow it.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::TcpStream;

use super::{
    Direction, Path, Peers, PodContext, ProxyInputs, deliver, http, log_connection, relay,
};

pub async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    inputs: Arc<ProxyInputs>,
) {
    let started = Instant::now();
    let Ok(original_dst) = client.local_addr() else {
        return;
    };
    let _ = client.set_nodelay(true);
    let mesh = inputs.mesh.load();
    let peers = Peers {
        src: peer,
        src_identity: None,
        src_pod: None,
        original_dst,
        dst_identity: Some(&pod.workload.identity),
        dst_pod: Some(&pod.workload),
        service: None,
    };
    let workload = mesh.pods.get(&pod.workload.key).unwrap_or(&pod.workload);
    if crate::policy::needs_http(&mesh.policies, workload) {
        // HTTP rules select this pod: authorize request by request.
        let peer = http::inbound::InboundPeer {
            addr: peer,
            identity: None,
        };
        http::inbound::serve(
            client,
            pod.clone(),
            inputs.clone(),
            peer,
            original_dst.port(),
        )
        .await;
        return;
    }
    if !deliver::authorize(
        &mesh,
        &inputs.metrics,
        &pod,
        None,
        peer,
        original_dst.port(),
    ) {
        return;
    }
    let outcome = match deliver::connect_to_app(&pod, peer, original_dst.port()).await {
        Ok(mut app) => relay::relay_tcp(&mut client, &mut app, started).await,
        Err(e) => relay::Outcome::failed(
            started,
            format!("connect to app port {}: {e}", original_dst.port()),
        ),
    };
    log_connection(
        &inputs,
        Direction::Inbound,
        Path::Passthrough,
        &peers,
        &outcome,
    );
}
