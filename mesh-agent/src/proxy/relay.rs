//! Copies bytes both ways between a client and an upstream connection.
//!
//! One read and one write per chunk and direction: tokio marks a socket not-ready after a
//! short read, so a request/response exchange costs no extra `read` returning EAGAIN. Each
//! side's EOF is passed on as a write shutdown (half-close), and the first error ends both
//! directions.
use std::time::{Duration, Instant};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

/// Size of each direction's copy buffer.
const BUFFER_SIZE: usize = 32 * 1024;

/// How a relayed connection ended.
#[derive(Debug, Default)]
pub struct Outcome {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    pub duration: Duration,
    /// The first I/O error, if the connection did not end with a clean close on both sides.
    pub error: Option<String>,
}

impl Outcome {
    /// A connection that ended before any byte was relayed.
    pub fn failed(started: Instant, error: String) -> Self {
        Self {
            duration: started.elapsed(),
            error: Some(error),
            ..Default::default()
        }
    }
}

/// Relays between two TCP streams until both directions have seen EOF, or either fails.
pub async fn relay_tcp(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    started: Instant,
) -> Outcome {
    let (mut client_rx, mut client_tx) = client.split();
    let (mut upstream_rx, mut upstream_tx) = upstream.split();
    pump_both(
        &mut client_rx,
        &mut client_tx,
        &mut upstream_rx,
        &mut upstream_tx,
        started,
    )
    .await
}

/// Relays between any two byte streams (e.g. a TCP client and an HBONE tunnel).
pub async fn relay<A, B>(client: &mut A, upstream: &mut B, started: Instant) -> Outcome
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut upstream_rx, mut upstream_tx) = tokio::io::split(upstream);
    pump_both(
        &mut client_rx,
        &mut client_tx,
        &mut upstream_rx,
        &mut upstream_tx,
        started,
    )
    .await
}

async fn pump_both<CR, CW, UR, UW>(
    client_rx: &mut CR,
    client_tx: &mut CW,
    upstream_rx: &mut UR,
    upstream_tx: &mut UW,
    started: Instant,
) -> Outcome
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    let mut sent = 0u64;
    let mut received = 0u64;
    let result = tokio::try_join!(
        pump(client_rx, upstream_tx, &mut sent),
        pump(upstream_rx, client_tx, &mut received),
    );
    Outcome {
        client_to_upstream: sent,
        upstream_to_client: received,
        duration: started.elapsed(),
        error: result.err().map(|e| e.to_string()),
    }
}

async fn pump<R, W>(from: &mut R, to: &mut W, copied: &mut u64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER_SIZE];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // Pass the half-close on; the peer may already be gone, which is fine.
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        *copied += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A pair of connected loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    #[tokio::test]
    async fn relays_both_ways_with_half_close_and_counts_bytes() {
        let (mut app, mut client_side) = pair().await;
        let (mut upstream_side, mut server) = pair().await;
        let relay = tokio::spawn(async move {
            relay_tcp(&mut client_side, &mut upstream_side, Instant::now()).await
        });
        app.write_all(b"ping-0123456789").await.expect("write");
        app.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        server
            .read_to_end(&mut got)
            .await
            .expect("server reads to EOF");
        assert_eq!(got, b"ping-0123456789");
        server
            .write_all(&[7u8; 100_000])
            .await
            .expect("server writes");
        drop(server);
        let mut back = Vec::new();
        app.read_to_end(&mut back).await.expect("app reads to EOF");
        assert_eq!(back.len(), 100_000);
        let outcome = relay.await.expect("relay task");
        assert_eq!(outcome.client_to_upstream, 15);
        assert_eq!(outcome.upstream_to_client, 100_000);
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
    }
}
