//! Pooled HBONE connections: one mTLS HTTP/2 connection per (source identity, destination
//! identity, destination node, data-plane worker) carries many CONNECT streams.
//!
//! Per worker, like the L7 pools: a relayed connection and the HBONE connection carrying it
//! then run on the same thread, so each message costs no wake-up of another thread.
//!
//! Wire format as Istio's ztunnel: TCP to `<destination pod IP>:15008`, TLS 1.3 with ALPN
//! `h2`, the source workload's certificate, the server verified against the destination
//! workload's SPIFFE identity; then one `CONNECT <ip>:<port>` stream per relayed connection.
//! A pooled connection that turns out broken is replaced, and the stream retried once on a
//! fresh connection, so a stale connection never fails a new stream. Once the source's
//! certificate rotates, new streams go on a new connection presenting the new certificate;
//! the old one closes when its last stream ends, so no connection outlives its certificate
//! by more than its longest stream.
use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, StatusCode, client::conn::http2::SendRequest, upgrade::Upgraded};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_common::HBONE_PORT;
use rustls_pki_types::ServerName;
use tracing::{debug, info};

use super::{PodContext, ProxyInputs, coalesce::CoalescingIo, outbound::connect_from_pod};
use crate::{
    identity::WorkloadCert,
    state::{Identity, Workload},
};

/// How long the TLS and HTTP/2 handshakes of a new pooled connection may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 PING interval and timeout that retire dead pooled connections.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A pooled connection no new stream used for this long is let go: it closes once its
/// last stream ends (hyper closes an HTTP/2 client connection when its senders are gone).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    src: Identity,
    dst: Identity,
    dst_node: String,
    worker: usize,
}

/// A pooled connection, when a stream was last opened on it, and the source certificate
/// current when it was made.
struct Pooled {
    sender: SendRequest<Empty<Bytes>>,
    last_used: std::time::Instant,
    cert: Arc<WorkloadCert>,
}

impl Pooled {
    /// Whether a new stream may use this connection: open, and made while `current` was
    /// already the source's certificate.
    fn reusable(&self, current: &Arc<WorkloadCert>) -> bool {
        !self.sender.is_closed() && Arc::ptr_eq(&self.cert, current)
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<Pooled>>>;

/// The HBONE client side of this node.
#[derive(Default)]
pub struct HbonePool {
    slots: std::sync::Mutex<HashMap<PoolKey, Slot>>,
}

/// A CONNECT stream: bytes written go to the destination app, and back.
pub type Tunnel = TokioIo<Upgraded>;

impl HbonePool {
    /// Opens a CONNECT stream from `src` (an enrolled pod of this node) to `original_dst`,
    /// which belongs to the enrolled pod `dst` on another node.
    pub async fn connect(
        &self,
        inputs: &ProxyInputs,
        src: &PodContext,
        dst: &Workload,
        original_dst: SocketAddr,
    ) -> anyhow::Result<Tunnel> {
        let key = PoolKey {
            src: src.workload.identity.clone(),
            dst: dst.identity.clone(),
            dst_node: dst.node.clone(),
            worker: crate::workers::current(),
        };
        let slot = self.slot(&key);
        for attempt in 0..2 {
            let sender = {
                let cert = inputs
                    .certs
                    .ensure(&key.src)
                    .context("no certificate for the source workload")?;
                let mut pooled = slot.lock().await;
                match pooled.as_mut() {
                    Some(p) if attempt == 0 && p.reusable(&cert) => {
                        p.last_used = std::time::Instant::now();
                        p.sender.clone()
                    }
                    _ => {
                        // Open but not reusable on a first attempt: made with an older
                        // certificate.
                        if attempt == 0 && pooled.as_ref().is_some_and(|p| !p.sender.is_closed()) {
                            info!(src.identity = %key.src, dst.identity = %key.dst, "source certificate rotated: new streams go on a new HBONE connection");
                        }
                        let fresh = establish(inputs, src, dst).await?;
                        *pooled = Some(Pooled {
                            sender: fresh.clone(),
                            last_used: std::time::Instant::now(),
                            cert,
                        });
                        fresh
                    }
                }
            };
            match open_stream(sender, original_dst).await {
                Ok(tunnel) => return Ok(tunnel),
                Err(StreamError::Connection(e)) if attempt == 0 => {
                    debug!(error = %e, "pooled HBONE connection is broken; retrying on a fresh one");
                    continue;
                }
                Err(StreamError::Connection(e) | StreamError::Refused(e)) => return Err(e),
            }
        }
        Err(anyhow!("no usable HBONE connection"))
    }

    fn slot(&self, key: &PoolKey) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(key.clone()).or_default().clone()
    }

    /// Lets go of pooled connections idle for longer than `idle` (and of closed ones), and
    /// forgets their slots, so neither connections nor slots pile up.
    pub fn close_idle(&self, idle: Duration) -> usize {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let before = slots.len();
        slots.retain(|_, slot| {
            // A slot being used right now is not idle.
            let Ok(mut pooled) = slot.try_lock() else {
                return true;
            };
            let keep = pooled
                .as_ref()
                .is_some_and(|p| !p.sender.is_closed() && p.last_used.elapsed() < idle);
            if !keep {
                *pooled = None;
            }
            keep
        });
        before - slots.len()
    }

    /// Drops pooled connections whose source identity is no longer held on this node.
    pub fn retain_sources(&self, held: &std::collections::HashSet<Identity>) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|k, _| held.contains(&k.src));
    }
}

enum StreamError {
    /// The pooled connection failed: worth one retry on a new connection.
    Connection(anyhow::Error),
    /// The peer answered and refused: final.
    Refused(anyhow::Error),
}

async fn open_stream(
    mut sender: SendRequest<Empty<Bytes>>,
    target: SocketAddr,
) -> Result<Tunnel, StreamError> {
    sender
        .ready()
        .await
        .map_err(|e| StreamError::Connection(anyhow!(e).context("HBONE connection not ready")))?;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| StreamError::Refused(anyhow!(e)))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| StreamError::Connection(anyhow!(e).context("sending CONNECT")))?;
    if response.status() != StatusCode::OK {
        return Err(StreamError::Refused(anyhow!(
            "peer answered CONNECT {target} with {}",
            response.status()
        )));
    }
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(|e| StreamError::Refused(anyhow!(e).context("CONNECT stream")))?;
    Ok(TokioIo::new(upgraded))
}

/// A new mTLS HTTP/2 connection from `src`'s netns to `dst`'s HBONE port, presenting
/// `src`'s current certificate.
async fn establish(
    inputs: &ProxyInputs,
    src: &PodContext,
    dst: &Workload,
) -> anyhow::Result<SendRequest<Empty<Bytes>>> {
    let addr = SocketAddr::new(dst.ip, HBONE_PORT);
    let local = &src.workload.identity;
    let config = inputs.tls.client(local, &dst.identity)?;
    let work = async {
        let tcp = connect_from_pod(src, addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let server_name = ServerName::IpAddress(dst.ip.into());
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(server_name, tcp)
            .await
            .with_context(|| format!("mTLS handshake with {addr} (expecting {})", dst.identity))?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .handshake(TokioIo::new(CoalescingIo::new(tls)))
            .await
            .context("HTTP/2 handshake")?;
        let label = format!("{local} -> {} ({addr})", dst.identity);
        tokio::spawn(async move {
            match connection.await {
                Ok(()) => debug!(connection = %label, "HBONE connection closed"),
                Err(e) => debug!(connection = %label, error = %e, "HBONE connection ended"),
            }
        });
        Ok::<_, anyhow::Error>(sender)
    };
    let sender = match tokio::time::timeout(HANDSHAKE_TIMEOUT, work).await {
        Ok(result) => result?,
        Err(_) => bail!("HBONE handshake with {addr} timed out"),
    };
    info!(src.identity = %local, dst.identity = %dst.identity, peer = %addr, worker = crate::workers::current(), "HBONE connection established");
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> Identity {
        Identity {
            trust_domain: "cluster.local".into(),
            namespace: "shop".into(),
            service_account: sa.into(),
        }
    }

    #[test]
    fn close_idle_forgets_empty_slots_but_not_busy_ones() {
        let pool = HbonePool::default();
        let key = |dst: &str| PoolKey {
            src: id("a"),
            dst: id(dst),
            dst_node: "n2".into(),
            worker: 0,
        };
        let _empty = pool.slot(&key("b"));
        let busy = pool.slot(&key("c"));
        let guard = busy.try_lock().expect("unlocked");
        assert_eq!(pool.close_idle(POOL_IDLE_TIMEOUT), 1);
        drop(guard);
        // The busy slot stayed; once free and still empty, it goes too.
        assert_eq!(pool.close_idle(POOL_IDLE_TIMEOUT), 1);
        assert!(pool.slots.lock().unwrap().is_empty());
    }
}
