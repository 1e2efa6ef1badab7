//! Opening a connection from an enrolled pod to a destination through the mesh: handed to
//! the app in-process if the destination is an enrolled pod of this node, over HBONE if it is
//! an enrolled pod of another node, plain TCP from the pod's netns otherwise. Shared by the
//! L4 relay and the L7 proxy's upstream connections.
use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{Path, PodContext, ProxyInputs, deliver, outbound::connect_from_pod, pool::Tunnel};
use crate::state::Mesh;

/// A byte stream to the destination, whichever way it goes.
pub enum UpstreamIo {
    Tcp(TcpStream),
    Tunnel(Box<Tunnel>),
}

/// An open upstream connection and how it travels.
pub struct Upstream {
    pub io: UpstreamIo,
    pub path: Path,
    /// The source address the destination sees, when known.
    pub source: Option<SocketAddr>,
}

/// Who authorizes the connection against the destination's policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Authorization {
    /// Here, once, at connection level (L4 rules).
    Connection,
    /// The caller, per request (the L7 proxy).
    PerRequest,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("denied by the destination's authorization policy")]
    Denied,
    #[error("{0:#}")]
    Connect(anyhow::Error),
}

/// Connects `src` to `dst` through the mesh (see module docs).
pub async fn open(
    inputs: &ProxyInputs,
    mesh: &Mesh,
    src: &PodContext,
    dst: SocketAddr,
    authz: Authorization,
) -> Result<Upstream, UpstreamError> {
    let src_addr = SocketAddr::new(src.workload.ip, 0);
    match mesh.pod_by_ip(dst.ip()).filter(|w| w.enrolled) {
        Some(dst_pod) if dst_pod.is_on(&mesh.node) => {
            let local = inputs.local_pods.load();
            let Some(dst_ctx) = local.get(&dst_pod.ip) else {
                // Listed as enrolled here but not (yet) enrolled: plain TCP.
                return passthrough(src, dst).await;
            };
            if authz == Authorization::Connection
                && !deliver::authorize(
                    mesh,
                    &inputs.metrics,
                    dst_ctx,
                    Some(&src.workload.identity),
                    src_addr,
                    dst.port(),
                )
            {
                return Err(UpstreamError::Denied);
            }
            let app = deliver::connect_to_app(dst_ctx, src_addr, dst.port())
                .await
                .map_err(|e| UpstreamError::Connect(anyhow::anyhow!("connect to {dst}: {e}")))?;
            let source = app.local_addr().ok();
            Ok(Upstream {
                io: UpstreamIo::Tcp(app),
                path: Path::Local,
                source,
            })
        }
        Some(dst_pod) => {
            let tunnel = inputs
                .pool
                .connect(inputs, src, dst_pod, dst)
                .await
                .map_err(|e| {
                    UpstreamError::Connect(
                        e.context(format!("HBONE to {dst} ({})", dst_pod.identity)),
                    )
                })?;
            Ok(Upstream {
                io: UpstreamIo::Tunnel(Box::new(tunnel)),
                path: Path::Hbone,
                source: Some(src_addr),
            })
        }
        None => passthrough(src, dst).await,
    }
}

async fn passthrough(src: &PodContext, dst: SocketAddr) -> Result<Upstream, UpstreamError> {
    let tcp = connect_from_pod(src, dst)
        .await
        .map_err(|e| UpstreamError::Connect(anyhow::anyhow!("connect to {dst}: {e}")))?;
    let source = tcp.local_addr().ok();
    Ok(Upstream {
        io: UpstreamIo::Tcp(tcp),
        path: Path::Passthrough,
        source,
    })
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tunnel(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tunnel(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tunnel(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tunnel(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tunnel(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Tcp(s) => s.is_write_vectored(),
            UpstreamIo::Tunnel(t) => t.is_write_vectored(),
        }
    }
}
