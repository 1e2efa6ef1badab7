//! The last hop: authorize a connection to an enrolled pod of this node, then connect to its
//! app as the client.
//!
//! The agent connects to the app on `127.0.0.1:<port>` from the client's own address
//! (IP_TRANSPARENT), so the app sees the real client; `sk_lookup` leaves loopback
//! destinations alone, which keeps this hop from being captured again (and a client cannot
//! forge it). The pod's reply route (see `inpod`) brings the app's answers back.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
};

use socket2::Domain;
use tokio::net::{TcpSocket, TcpStream};
use tracing::warn;

use super::{CONNECT_TIMEOUT, PodContext};
use crate::{
    metrics::{Layer, Metrics},
    policy::{self, ConnectionAttrs, Decision},
    state::{Identity, Mesh},
};

/// Evaluates the authorization policies of the destination pod for this connection. A
/// denial is logged with the policy that decided it.
pub fn authorize(
    mesh: &Mesh,
    metrics: &Metrics,
    dst: &PodContext,
    src_identity: Option<&Identity>,
    src: SocketAddr,
    dst_port: u16,
) -> bool {
    // The live snapshot's copy of the workload carries its current labels.
    let workload = mesh.pods.get(&dst.workload.key).unwrap_or(&dst.workload);
    let attrs = ConnectionAttrs {
        src_identity,
        src_ip: src.ip(),
        dst_port,
    };
    let decision = policy::evaluate(&mesh.policies, workload, &attrs);
    metrics.policy_decision(decision.is_allowed(), Layer::L4);
    match decision {
        Decision::Allow { .. } => true,
        Decision::Deny { policy, reason } => {
            warn!(
                src.addr = %src,
                src.identity = %src_identity.map(|i| i.to_string()).unwrap_or_default(),
                dst.pod = %workload.key,
                dst.port = dst_port,
                policy = %policy.unwrap_or_default(),
                reason = %reason,
                "connection denied"
            );
            false
        }
    }
}

/// Connects to `port` of the app in `dst`, speaking as `client`.
pub async fn connect_to_app(
    dst: &PodContext,
    client: SocketAddr,
    port: u16,
) -> std::io::Result<TcpStream> {
    let socket = dst.netns.socket(Domain::IPV4).await?;
    socket.set_tcp_nodelay(true)?;
    if !client.ip().is_loopback() {
        // Speak as the client: bind its address (port chosen at connect time).
        socket.set_ip_transparent_v4(true)?;
        set_bind_address_no_port(&socket)?;
        socket.bind(&SocketAddr::new(client.ip(), 0).into())?;
    }
    let socket = TcpSocket::from_std_stream(socket.into());
    let app = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(app))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Defers the source port choice to connect(), so ports are shared across destinations.
fn set_bind_address_no_port(socket: &socket2::Socket) -> std::io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: valid fd, option value of the advertised size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
