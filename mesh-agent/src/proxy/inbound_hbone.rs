//! Inbound HBONE: mTLS HTTP/2 connections from other nodes' agents on the in-pod listener
//! 15008. The agent presents the pod's certificate, requires and verifies the peer's, and
//! serves `CONNECT <ip>:<port>` streams: each is authorized with the peer's verified identity
//! and delivered to the app in this pod as the original client.
//!
//! Refusals (each answered on the stream and logged; the connection and the agent go on):
//! not CONNECT → 405; an authority that is not `ip:port` → 400; a destination that is not
//! an enrolled pod of this node with the identity the listener proved → 404 (including pods
//! on other nodes); denied by policy → 403; app not
//! answering → 503; a header block over 16 KiB → 431. A TLS handshake that fails (garbage,
//! no or foreign certificate) closes the connection.
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode, Uri, body::Incoming, service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{
    Direction, Path, Peers, PodContext, ProxyInputs, coalesce::CoalescingIo, deliver,
    log_connection, relay,
};
use crate::{state::Identity, tls};

/// Largest header block the agent serves (counted as HTTP/2 does: name + value + 32 per
/// field); a larger one gets 431 and a log line.
pub const MAX_HEADER_BLOCK: usize = 16 * 1024;
/// Hard cap at the HTTP/2 layer, above which the codec refuses the stream by itself.
const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
/// A client must finish the TLS handshake within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    inputs: Arc<ProxyInputs>,
) {
    let _ = tcp.set_nodelay(true);
    let config = match inputs.tls.server(&pod.workload.identity) {
        Ok(c) => c,
        Err(e) => {
            warn!(pod = %pod.workload.key, error = %e, "no TLS config for the pod; refusing HBONE connection");
            return;
        }
    };
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            warn!(pod = %pod.workload.key, peer = %peer, error = %e, "HBONE TLS handshake failed");
            return;
        }
        Err(_) => {
            warn!(pod = %pod.workload.key, peer = %peer, "HBONE TLS handshake timed out");
            return;
        }
    };
    let peer_identity = match tls.get_ref().1.peer_certificates().map(tls::peer_identity) {
        Some(Ok(id)) => Arc::new(id),
        Some(Err(e)) => {
            warn!(pod = %pod.workload.key, peer = %peer, error = %e, "HBONE peer certificate has no usable identity");
            return;
        }
        None => {
            warn!(pod = %pod.workload.key, peer = %peer, "HBONE peer presented no certificate");
            return;
        }
    };
    let drain_inputs = inputs.clone();
    let service = service_fn(move |request| {
        serve_stream(
            request,
            peer,
            peer_identity.clone(),
            pod.clone(),
            inputs.clone(),
        )
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .serve_connection(TokioIo::new(CoalescingIo::new(tls)), service);
    // Draining: GOAWAY, so the peer's pool opens its next streams to the new agent.
    let result = drain_inputs
        .drain
        .run(conn, |conn| conn.graceful_shutdown())
        .await;
    if let Err(e) = result {
        debug!(peer = %peer, error = %e, "HBONE connection ended with an error");
    }
}

/// Why a stream's request is not a CONNECT this listener can serve, before any lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("the header block is too large")]
    HeaderBlockTooLarge,
    #[error("only CONNECT is served")]
    NotConnect,
    #[error("the CONNECT authority is not ip:port")]
    BadAuthority,
}

impl ConnectError {
    /// The status the stream is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            ConnectError::HeaderBlockTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ConnectError::NotConnect => StatusCode::METHOD_NOT_ALLOWED,
            ConnectError::BadAuthority => StatusCode::BAD_REQUEST,
        }
    }
}

/// The destination a HBONE stream asks for: its `CONNECT` authority as `ip:port`, checked in
/// the order the refusals are documented (header block size, method, authority). Pure, so
/// that it can be unit-tested and fuzzed without TLS or HTTP/2.
pub fn connect_target(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<SocketAddr, ConnectError> {
    // Counted as HTTP/2 counts a header list (RFC 9113 6.5.2), saturating so that no input
    // can overflow the sum.
    let header_block = headers.iter().fold(0usize, |sum, (n, v)| {
        sum.saturating_add(n.as_str().len() + v.len() + 32)
    });
    if header_block > MAX_HEADER_BLOCK {
        return Err(ConnectError::HeaderBlockTooLarge);
    }
    if method != Method::CONNECT {
        return Err(ConnectError::NotConnect);
    }
    uri.authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .ok_or(ConnectError::BadAuthority)
}

fn status(code: StatusCode) -> Result<Response<Empty<Bytes>>, std::convert::Infallible> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = code;
    Ok(response)
}

async fn serve_stream(
    mut request: Request<Incoming>,
    peer: SocketAddr,
    peer_identity: Arc<Identity>,
    pod: Arc<PodContext>,
    inputs: Arc<ProxyInputs>,
) -> Result<Response<Empty<Bytes>>, std::convert::Infallible> {
    let started = Instant::now();
    let refuse = |code: StatusCode, why: &str| {
        warn!(pod = %pod.workload.key, peer = %peer, src.identity = %peer_identity, uri = %request.uri(), status = code.as_u16(), "HBONE request refused: {why}");
        status(code)
    };
    let target = match connect_target(request.method(), request.uri(), request.headers()) {
        Ok(target) => target,
        Err(e) => return refuse(e.status(), &e.to_string()),
    };
    // The pooled connection a client uses for a (source, destination identity, node) may
    // have been opened to another pod of that identity on this node: serve any enrolled pod
    // here whose identity this listener proved, nothing else.
    let local = inputs.local_pods.load();
    let Some(dst) = local
        .get(&target.ip())
        .filter(|d| d.workload.identity == pod.workload.identity)
        .cloned()
    else {
        return refuse(
            StatusCode::NOT_FOUND,
            "the destination is not an enrolled pod of this node with the identity this connection proved",
        );
    };
    drop(local);
    let pod = dst;
    let mesh = inputs.mesh.load();
    let workload = mesh.pods.get(&pod.workload.key).unwrap_or(&pod.workload);
    if crate::policy::needs_http(&mesh.policies, workload) {
        // HTTP rules select this pod: parse the tunnelled stream and authorize each request.
        let on_upgrade = hyper::upgrade::on(&mut request);
        let inbound_peer = super::http::inbound::InboundPeer {
            addr: peer,
            identity: Some((*peer_identity).clone()),
        };
        let inputs = inputs.clone();
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    super::http::inbound::serve(
                        TokioIo::new(upgraded),
                        pod,
                        inputs,
                        inbound_peer,
                        target.port(),
                    )
                    .await
                }
                Err(e) => debug!(error = %e, "CONNECT stream failed before use"),
            }
        });
        return status(StatusCode::OK);
    }
    if !deliver::authorize(
        &mesh,
        &inputs.metrics,
        &pod,
        Some(&peer_identity),
        peer,
        target.port(),
    ) {
        return status(StatusCode::FORBIDDEN);
    }
    let app = match deliver::connect_to_app(&pod, peer, target.port()).await {
        Ok(app) => app,
        Err(e) => {
            let outcome = relay::Outcome::failed(
                started,
                format!("connect to app port {}: {e}", target.port()),
            );
            log_connection(
                &inputs,
                Direction::Inbound,
                Path::Hbone,
                &hbone_peers(peer, &peer_identity, target, &pod, &mesh),
                &outcome,
            );
            return status(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let mut app = app;
        let outcome = match on_upgrade.await {
            Ok(upgraded) => relay::relay(&mut TokioIo::new(upgraded), &mut app, started).await,
            Err(e) => relay::Outcome::failed(started, format!("CONNECT stream: {e}")),
        };
        let mesh = inputs.mesh.load();
        log_connection(
            &inputs,
            Direction::Inbound,
            Path::Hbone,
            &hbone_peers(peer, &peer_identity, target, &pod, &mesh),
            &outcome,
        );
    });
    status(StatusCode::OK)
}

fn hbone_peers<'a>(
    peer: SocketAddr,
    identity: &'a Identity,
    target: SocketAddr,
    pod: &'a PodContext,
    mesh: &'a crate::state::Mesh,
) -> Peers<'a> {
    Peers {
        src: peer,
        src_identity: Some(identity),
        src_pod: mesh
            .pod_by_ip(peer.ip())
            .filter(|w| w.identity == *identity),
        original_dst: target,
        dst_identity: Some(&pod.workload.identity),
        dst_pod: Some(&pod.workload),
        service: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Result<SocketAddr, ConnectError> {
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.append(
                http::header::HeaderName::from_bytes(n.as_bytes()).expect("name"),
                http::HeaderValue::from_str(v).expect("value"),
            );
        }
        let method = Method::from_bytes(method.as_bytes()).expect("method");
        connect_target(&method, &uri.parse().expect("uri"), &map)
    }

    #[test]
    fn connect_to_ip_port_is_served() {
        assert_eq!(
            target("CONNECT", "10.1.0.2:8080", &[]),
            Ok("10.1.0.2:8080".parse().expect("addr"))
        );
        assert_eq!(
            target("CONNECT", "[fd00::2]:80", &[("baggage", "k=v")]),
            Ok("[fd00::2]:80".parse().expect("addr"))
        );
    }

    #[test]
    fn refusals_come_in_the_documented_order() {
        assert_eq!(
            target("GET", "10.1.0.2:80", &[]),
            Err(ConnectError::NotConnect)
        );
        assert_eq!(
            target("CONNECT", "backend.shop:80", &[]),
            Err(ConnectError::BadAuthority)
        );
        assert_eq!(
            target("CONNECT", "10.1.0.2", &[]),
            Err(ConnectError::BadAuthority)
        );
        assert_eq!(
            target("CONNECT", "/path", &[]),
            Err(ConnectError::BadAuthority)
        );
        assert_eq!(
            target("CONNECT", "user@10.1.0.2:80", &[]),
            Err(ConnectError::BadAuthority)
        );
        // The size check comes first, even for a method that would be refused anyway.
        let big = "x".repeat(MAX_HEADER_BLOCK);
        assert_eq!(
            target("GET", "10.1.0.2:80", &[("x-big", &big)]),
            Err(ConnectError::HeaderBlockTooLarge)
        );
        assert_eq!(
            ConnectError::HeaderBlockTooLarge.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        assert_eq!(
            ConnectError::NotConnect.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(ConnectError::BadAuthority.status(), StatusCode::BAD_REQUEST);
    }
}
