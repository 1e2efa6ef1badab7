//! Inbound: a connection to an enrolled pod, steered by `sk_lookup` to the in-pod listener.
//! The accepted socket's local address is the original destination. The agent connects to
//! the app on `127.0.0.1:<port>` from the client's own address (IP_TRANSPARENT), so the app
//! sees the real client; `sk_lookup` leaves loopback destinations alone, which is what keeps
//! the agent's own hop from being captured again.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use socket2::Domain;
use tokio::net::{TcpSocket, TcpStream};

use super::{CONNECT_TIMEOUT, Direction, PodContext, ProxyInputs, log_connection, relay};

pub async fn handle(mut client: TcpStream, peer: SocketAddr, pod: Arc<PodContext>, inputs: Arc<ProxyInputs>) {
    let started = Instant::now();
    let original_dst = match client.local_addr() {
        Ok(addr) => addr,
        Err(_) => return,
    };
    let _ = client.set_nodelay(true);
    let mut upstream = match connect_to_app(&pod, peer, original_dst.port()).await {
        Ok(s) => s,
        Err(e) => {
            let outcome = relay::Outcome {
                duration: started.elapsed(),
                error: Some(format!("connect to app port {}: {e}", original_dst.port())),
                ..Default::default()
            };
            log_connection(Direction::Inbound, &pod, peer, original_dst, &inputs, &outcome);
            return;
        }
    };
    let outcome = relay::relay(&mut client, &mut upstream, started).await;
    log_connection(Direction::Inbound, &pod, peer, original_dst, &inputs, &outcome);
}

async fn connect_to_app(pod: &PodContext, client: SocketAddr, port: u16) -> std::io::Result<TcpStream> {
    let socket = pod.netns.socket(Domain::IPV4).await?;
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
    use std::os::fd::AsRawFd;
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
