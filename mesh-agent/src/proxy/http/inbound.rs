//! Inbound L7: when a policy selecting the destination pod has HTTP rules (methods, paths,
//! hosts, headers), the inbound side parses HTTP on the connection and authorizes every
//! request; denied requests get 403. Without such rules the inbound side never parses HTTP.
use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use http::{Request, StatusCode, Uri, Version, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tracing::{debug, info, warn};

use super::{
    client::{Body, BoxError},
    local_response, strip_hop_by_hop,
};
use crate::{
    metrics::RequestHandles,
    policy::{self, ConnectionAttrs, RequestAttrs},
    proxy::{PodContext, ProxyInputs, coalesce::CoalescingIo, deliver},
    state::Identity,
};

/// Who is on the other end of an inbound connection.
#[derive(Clone)]
pub struct InboundPeer {
    pub addr: SocketAddr,
    /// Verified identity (HBONE), or `None` for plaintext.
    pub identity: Option<Identity>,
}

/// What one inbound connection's requests share, built once per connection.
struct InboundConnection {
    peer: InboundPeer,
    /// The peer's SPIFFE identity as logs write it ("" for plaintext).
    peer_identity_label: String,
    /// `127.0.0.1:<port>`: where requests go in the pod.
    app_authority: http::uri::Authority,
    /// Metric handles this connection's requests used, by (status, response flags): a
    /// request usually reuses one instead of building a dozen label strings.
    label_cache: std::sync::Mutex<Vec<(u16, &'static str, RequestHandles)>>,
}

/// Label sets kept per inbound connection; more distinct ones are built each time.
const LABEL_CACHE_SIZE: usize = 8;

/// Serves HTTP from `peer` to the app's `port` in `pod`, authorizing each request.
pub async fn serve<I>(
    io: I,
    pod: Arc<PodContext>,
    inputs: Arc<ProxyInputs>,
    peer: InboundPeer,
    port: u16,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connector = AppConnector {
        pod: pod.clone(),
        client: peer.addr,
        port,
    };
    let http1 = Client::builder(TokioExecutor::new()).build(connector.clone());
    let http2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(connector);
    let clients = Arc::new((http1, http2));
    let app_authority = match http::uri::Authority::try_from(format!("127.0.0.1:{port}")) {
        Ok(a) => a,
        Err(e) => {
            warn!(port, error = %e, "no app authority for this port; closing the connection");
            return;
        }
    };
    let connection = Arc::new(InboundConnection {
        peer_identity_label: peer
            .identity
            .as_ref()
            .map(|i| i.to_string())
            .unwrap_or_default(),
        peer,
        app_authority,
        label_cache: Default::default(),
    });
    let saw_h2 = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drain_inputs = inputs.clone();
    let service = hyper::service::service_fn({
        let saw_h2 = saw_h2.clone();
        move |req| {
            let (pod, inputs, connection, clients, saw_h2) = (
                pod.clone(),
                inputs.clone(),
                connection.clone(),
                clients.clone(),
                saw_h2.clone(),
            );
            async move {
                let version = req.version();
                let mut response = handle(req, &pod, &inputs, &connection, port, &clients).await;
                super::close_if_draining(&inputs, version, &saw_h2, &mut response);
                Ok::<_, Infallible>(response)
            }
        }
    });
    let builder = super::server_builder();
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(CoalescingIo::new(io)), service);
    if let Err(e) = drain_inputs
        .drain
        .run(conn, |conn| {
            if saw_h2.load(std::sync::atomic::Ordering::Relaxed) {
                conn.graceful_shutdown();
            }
        })
        .await
    {
        debug!(error = %e, "inbound HTTP connection ended with an error");
    }
}

type AppClient = Client<AppConnector, Body>;

async fn handle(
    req: Request<Incoming>,
    pod: &PodContext,
    inputs: &ProxyInputs,
    connection: &InboundConnection,
    port: u16,
    clients: &(AppClient, AppClient),
) -> http::Response<Body> {
    let peer = &connection.peer;
    let started = Instant::now();
    let mesh = inputs.mesh.load();
    let workload = mesh.pods.get(&pod.workload.key).unwrap_or(&pod.workload);
    let (mut parts, body) = req.into_parts();
    super::trace::ensure(&mut parts.headers, &mut fastrand::Rng::new());
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("")
        .to_string();
    let conn = ConnectionAttrs {
        src_identity: peer.identity.as_ref(),
        src_ip: peer.addr.ip(),
        dst_port: port,
    };
    let attrs = RequestAttrs {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        host: &host,
        headers: &parts.headers,
    };
    let decision = policy::evaluate_request(&mesh.policies, workload, &conn, &attrs);
    inputs
        .metrics
        .policy_decision(decision.is_allowed(), crate::metrics::Layer::L7);
    let method = parts.method.clone();
    let path = parts.uri.path().to_string();
    let log = |status: StatusCode, flags: &'static str| {
        if !inputs.telemetry {
            return;
        }
        record_request(inputs, connection, &mesh, workload, status, flags, started);
        info!(
            target: "access",
            direction = "inbound",
            method = method.as_str(),
            path = path.as_str(),
            authority = host.as_str(),
            status = status.as_u16(),
            response_flags = flags,
            src.addr = %peer.addr,
            src.identity = connection.peer_identity_label.as_str(),
            dst.pod = %workload.key,
            duration_ms = started.elapsed().as_millis() as u64,
            "http request"
        );
    };
    if let policy::Decision::Deny { policy, reason } = decision {
        warn!(
            src.addr = %peer.addr,
            src.identity = connection.peer_identity_label.as_str(),
            dst.pod = %workload.key,
            method = %method,
            path = %path,
            policy = %policy.as_deref().unwrap_or(""),
            reason = %reason,
            "request denied"
        );
        log(StatusCode::FORBIDDEN, "RBAC");
        return local_response(StatusCode::FORBIDDEN, "RBAC", "RBAC: access denied");
    }
    let http2 = parts.version == Version::HTTP_2;
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(http::uri::Scheme::HTTP);
    uri.authority = Some(connection.app_authority.clone());
    uri.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    match Uri::from_parts(uri) {
        Ok(uri) => parts.uri = uri,
        Err(_) => return local_response(StatusCode::BAD_REQUEST, "-", "bad request target"),
    }
    strip_hop_by_hop(&mut parts.headers, false);
    let request = Request::from_parts(parts, body.map_err(|e| Box::new(e) as BoxError).boxed());
    let client = if http2 { &clients.1 } else { &clients.0 };
    match client.request(request).await {
        Ok(response) => {
            let status = response.status();
            log(status, "-");
            let (mut rp, rb) = response.into_parts();
            strip_hop_by_hop(&mut rp.headers, false);
            http::Response::from_parts(rp, rb.map_err(|e| Box::new(e) as BoxError).boxed())
        }
        Err(e) => {
            log(StatusCode::SERVICE_UNAVAILABLE, "UF");
            local_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "UF",
                &format!("app error: {e}"),
            )
        }
    }
}

/// Istio's request metrics for one inbound request, as the destination reporter.
fn record_request(
    inputs: &ProxyInputs,
    connection: &InboundConnection,
    mesh: &crate::state::Mesh,
    workload: &crate::state::Workload,
    status: StatusCode,
    flags: &'static str,
    started: Instant,
) {
    let code = status.as_u16();
    let mut cache = connection
        .label_cache
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let handles = match cache.iter().find(|(c, f, _)| *c == code && *f == flags) {
        Some((_, _, handles)) => handles.clone(),
        None => {
            let peer = &connection.peer;
            let unknown = || "unknown".to_string();
            let src = peer
                .identity
                .as_ref()
                .and_then(|id| mesh.pod_by_ip(peer.addr.ip()).filter(|w| w.identity == *id));
            let labels = crate::metrics::RequestLabels {
                reporter: crate::metrics::Reporter::Destination,
                source_workload: src.map(crate::proxy::workload_name).unwrap_or_else(unknown),
                source_workload_namespace: src
                    .map(|w| w.key.namespace.clone())
                    .unwrap_or_else(unknown),
                source_principal: peer
                    .identity
                    .as_ref()
                    .map(|i| i.to_string())
                    .unwrap_or_else(unknown),
                destination_workload: crate::proxy::workload_name(workload),
                destination_workload_namespace: workload.key.namespace.clone(),
                destination_principal: workload.identity.to_string(),
                destination_service: "unknown".to_string(),
                request_protocol: "http".to_string(),
                response_code: status.as_u16().to_string(),
                response_flags: flags.to_string(),
                connection_security_policy: if peer.identity.is_some() {
                    "mutual_tls"
                } else {
                    "none"
                }
                .to_string(),
            };
            let handles = inputs.metrics.request_handles(&labels);
            if cache.len() >= LABEL_CACHE_SIZE {
                cache.remove(0);
            }
            cache.push((code, flags, handles.clone()));
            handles
        }
    };
    drop(cache);
    handles.record(started.elapsed(), 0, 0);
}

/// Connects to the app in the pod as the client.
#[derive(Clone)]
struct AppConnector {
    pod: Arc<PodContext>,
    client: SocketAddr,
    port: u16,
}

impl tower_service::Service<Uri> for AppConnector {
    type Response = TokioIo<CoalescingIo<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = deliver::connect_to_app(&this.pod, this.client, this.port).await?;
            Ok(TokioIo::new(CoalescingIo::new(tcp)))
        })
    }
}
