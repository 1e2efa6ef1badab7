//! Upstream HTTP clients: one pooled hyper client per source pod and upstream protocol,
//! whose connector opens connections through the mesh (`proxy::upstream`): in-process to
//! pods of this node, HBONE to pods of other nodes, plain TCP elsewhere. The request URI's
//! authority is the endpoint `ip:port`; the pool keeps connections per endpoint.
//!
//! Circuit breaking on connections: the proxy sends each request inside a
//! [`DESTINATION`] scope naming the destination service's runtime, and a connection the
//! pool opens for it holds a [`ConnectionPermit`] of that destination's breaker for its
//! whole life (idle in the pool included, as Envoy counts them) and a [`PendingPermit`]
//! while it is being established. A request that needs a connection beyond either cap
//! fails at once with the breaker's overflow, answered 503 `UO`; unlike Envoy it does not
//! queue for a busy HTTP/1 connection to come free. As in Envoy, whose pools are per
//! worker, each pool (here: per source pod and worker) may always open its first
//! connection to an endpoint, so that a low cap cannot leave a pool with no way to reach an
//! endpoint at all: the cap can be exceeded by at most one connection per pool and endpoint.
use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use bytes::Bytes;
use http::Uri;
use http_body_util::combinators::BoxBody;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo, TokioTimer},
};

use super::runtime::ServiceRuntime;
use crate::{
    proxy::{
        PodContext, ProxyInputs,
        coalesce::CoalescingIo,
        upstream::{self, Authorization, UpstreamIo},
    },
    resilience::{ConnectionPermit, Overflow, PendingPermit},
};

tokio::task_local! {
    /// The destination service a request is being sent to, for the connections the pooled
    /// client opens on its behalf (see the module doc).
    pub static DESTINATION: Arc<ServiceRuntime>;
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;
pub type HttpClient = Client<MeshConnector, Body>;

/// Idle pooled upstream connections are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The source pod's HTTP/1.1 and HTTP/2 (h2c) clients.
pub struct PodClients {
    pub http1: HttpClient,
    pub http2: HttpClient,
    /// Opens connections for the HTTP/1.1 fast path (`fast_path`), which keeps its own.
    pub connector: MeshConnector,
    /// The fast path's upstream connections between downstream connections.
    pub idle_http1: IdleConnections,
}

impl PodClients {
    pub fn new(inputs: &Arc<ProxyInputs>, pod: &Arc<PodContext>) -> Self {
        // Weak references: the pod owns these clients, so a strong one would keep the pod
        // (and its netns thread) alive after it is unenrolled.
        let connector = MeshConnector {
            inputs: Arc::downgrade(inputs),
            pod: Arc::downgrade(pod),
            live: Arc::default(),
        };
        let mut http1 = Client::builder(TokioExecutor::new());
        http1
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(64);
        let mut http2 = Client::builder(TokioExecutor::new());
        http2
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .http2_only(true)
            .timer(TokioTimer::new());
        Self {
            http1: http1.build(connector.clone()),
            http2: http2.build(connector.clone()),
            connector,
            idle_http1: IdleConnections::default(),
        }
    }
}

/// Opens upstream connections from one source pod through the mesh.
#[derive(Clone)]
pub struct MeshConnector {
    inputs: Weak<ProxyInputs>,
    pod: Weak<PodContext>,
    /// Connections open or being opened by this connector's pools, per endpoint.
    live: Arc<Mutex<HashMap<SocketAddr, usize>>>,
}

impl tower_service::Service<Uri> for MeshConnector {
    type Response = TokioIo<CoalescingIo<Permitted<UpstreamIo>>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let Some(target) = uri
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        else {
            return Box::pin(async move {
                Err(format!("upstream URI {uri} has no ip:port authority").into())
            });
        };
        let opening = self.open(target);
        Box::pin(async move { Ok(TokioIo::new(CoalescingIo::new(opening.await?))) })
    }
}

impl MeshConnector {
    /// Opens a connection to `target` for a request to the destination in the
    /// [`DESTINATION`] scope. The permits are taken at once, in the calling task, where the
    /// scope is set (hyper may finish the connect in a background task).
    pub fn open(
        &self,
        target: SocketAddr,
    ) -> impl Future<Output = Result<Permitted<UpstreamIo>, BoxError>> + Send + 'static {
        let inputs = self.inputs.upgrade();
        let pod = self.pod.upgrade();
        let live = LiveConnection::new(&self.live, target);
        let permits = match DESTINATION.try_with(|rt| admit_connection(rt)) {
            Ok(Ok(permits)) => Ok(Some(permits)),
            Ok(Err(overflow)) if !live.is_first() => Err(overflow),
            // Over the cap but this pool's first connection to the endpoint (see the module
            // doc), or not sent on behalf of a destination service.
            _ => Ok(None),
        };
        async move {
            let (connection, _pending) = permits?.unzip();
            let (Some(inputs), Some(pod)) = (inputs, pod) else {
                return Err("the source pod is no longer enrolled".into());
            };
            let mesh = inputs.mesh.load();
            // The L7 proxy authorizes each request itself.
            let up =
                upstream::open(&inputs, &mesh, &pod, target, Authorization::PerRequest).await?;
            Ok(Permitted {
                io: up.io,
                _permit: connection,
                _live: live,
            })
        }
    }
}

/// Counts one connection of a connector to an endpoint, from the connect on, until dropped.
struct LiveConnection {
    live: Arc<Mutex<HashMap<SocketAddr, usize>>>,
    endpoint: SocketAddr,
    first: bool,
}

impl LiveConnection {
    fn new(live: &Arc<Mutex<HashMap<SocketAddr, usize>>>, endpoint: SocketAddr) -> Self {
        let mut counts = live.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(endpoint).or_insert(0);
        *count += 1;
        Self {
            live: live.clone(),
            endpoint,
            first: *count == 1,
        }
    }

    /// No other connection to the endpoint was open or opening when this one started.
    fn is_first(&self) -> bool {
        self.first
    }
}

impl Drop for LiveConnection {
    fn drop(&mut self) {
        let mut counts = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.endpoint) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.endpoint);
            }
        }
    }
}

/// The permits a new connection to `destination` needs: one for its life, one while it is
/// being established.
fn admit_connection(
    destination: &ServiceRuntime,
) -> Result<(ConnectionPermit, PendingPermit), Overflow> {
    let connection = destination.circuit.try_connection()?;
    let pending = destination.circuit.try_pending()?;
    Ok((connection, pending))
}

/// The circuit breaker's overflow that `error` is, or is caused by.
pub fn overflow_in<'e>(error: &'e (dyn std::error::Error + 'static)) -> Option<&'e Overflow> {
    std::iter::successors(Some(error), |e| e.source()).find_map(|e| e.downcast_ref())
}

/// A connection that holds its destination's connection permit until it is dropped.
pub struct Permitted<T> {
    io: T,
    _permit: Option<ConnectionPermit>,
    _live: LiveConnection,
}

impl<T: AsyncRead + Unpin> AsyncRead for Permitted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Permitted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// An upstream HTTP/1.1 connection of the fast path, holding its connection permit.
pub type Http1Connection = Permitted<UpstreamIo>;

/// Most idle fast-path connections kept per source pod and worker.
const MAX_IDLE_HTTP1: usize = 64;

/// Idle upstream HTTP/1.1 connections of the fast path, kept between downstream
/// connections so that a client opening one connection per request (curl, many HTTP
/// libraries) does not open one upstream too. Expired ones are dropped whenever the list
/// is used and by the agent's periodic reaper; each holds its destination's connection
/// permit while it waits, as the pooled client's idle connections do.
#[derive(Default)]
pub struct IdleConnections {
    idle: Mutex<Vec<IdleConnection>>,
}

struct IdleConnection {
    endpoint: SocketAddr,
    since: std::time::Instant,
    io: Http1Connection,
}

impl IdleConnections {
    /// The most recently parked connection to `endpoint` that is still open.
    pub fn take(&self, endpoint: SocketAddr) -> Option<Http1Connection> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        drop_expired(&mut idle);
        while let Some(at) = idle.iter().rposition(|c| c.endpoint == endpoint) {
            // `remove`, not `swap_remove`: the list stays oldest first.
            let mut conn = idle.remove(at);
            if still_idle(&mut conn.io) {
                return Some(conn.io);
            }
        }
        None
    }

    /// Closes the connections idle for longer than the pool's idle timeout (the agent's
    /// reaper calls this, so that a pod that went quiet lets them and their permits go);
    /// returns how many.
    pub fn close_expired(&self) -> usize {
        drop_expired(&mut self.idle.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Parks a connection that finished its last response cleanly.
    pub fn put(&self, endpoint: SocketAddr, io: Http1Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() >= MAX_IDLE_HTTP1 {
            // The oldest goes: it is the likeliest to have been closed by the server.
            idle.remove(0);
        }
        idle.push(IdleConnection {
            endpoint,
            since: std::time::Instant::now(),
            io,
        });
    }
}

/// Drops the connections idle for longer than the pool's idle timeout; returns how many.
fn drop_expired(idle: &mut Vec<IdleConnection>) -> usize {
    let before = idle.len();
    let now = std::time::Instant::now();
    idle.retain(|c| now.duration_since(c.since) < POOL_IDLE_TIMEOUT);
    before - idle.len()
}

/// Whether an idle connection has neither been closed by the server nor received bytes
/// nobody asked for: one read attempt that must not be ready.
fn still_idle<T: AsyncRead + Unpin>(io: &mut T) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    matches!(Pin::new(io).poll_read(&mut cx, &mut buf), Poll::Pending)
}
