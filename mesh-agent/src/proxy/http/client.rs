//! Upstream HTTP clients: one pooled hyper client per source pod and upstream protocol,
//! whose connector opens connections through the mesh (`proxy::upstream`): in-process to
//! pods of this node, HBONE to pods of other nodes, plain TCP elsewhere. The request URI's
//! authority is the endpoint `ip:port`; the pool keeps connections per endpoint.
use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Weak},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::Uri;
use http_body_util::combinators::BoxBody;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo, TokioTimer},
};

use super::coalesce::CoalescingIo;
use crate::proxy::{
    PodContext, ProxyInputs,
    upstream::{self, Authorization, UpstreamIo},
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;
pub type HttpClient = Client<MeshConnector, Body>;

/// Idle pooled upstream connections are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The source pod's HTTP/1.1 and HTTP/2 (h2c) clients.
pub struct PodClients {
    pub http1: HttpClient,
    pub http2: HttpClient,
}

impl PodClients {
    pub fn new(inputs: &Arc<ProxyInputs>, pod: &Arc<PodContext>) -> Self {
        // Weak references: the pod owns these clients, so a strong one would keep the pod
        // (and its netns thread) alive after it is unenrolled.
        let connector = MeshConnector {
            inputs: Arc::downgrade(inputs),
            pod: Arc::downgrade(pod),
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
            http2: http2.build(connector),
        }
    }
}

/// Opens upstream connections from one source pod through the mesh.
#[derive(Clone)]
pub struct MeshConnector {
    inputs: Weak<ProxyInputs>,
    pod: Weak<PodContext>,
}

impl tower_service::Service<Uri> for MeshConnector {
    type Response = TokioIo<CoalescingIo<UpstreamIo>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let inputs = self.inputs.upgrade();
        let pod = self.pod.upgrade();
        Box::pin(async move {
            let (Some(inputs), Some(pod)) = (inputs, pod) else {
                return Err("the source pod is no longer enrolled".into());
            };
            let target: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| format!("upstream URI {uri} has no ip:port authority"))?;
            let mesh = inputs.mesh.load();
            // The L7 proxy authorizes each request itself.
            let up =
                upstream::open(&inputs, &mesh, &pod, target, Authorization::PerRequest).await?;
            Ok(TokioIo::new(CoalescingIo::new(up.io)))
        })
    }
}
