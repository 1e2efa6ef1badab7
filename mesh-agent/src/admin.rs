//! The node's admin API and Prometheus endpoint: two small HTTP/1.1 servers on their own
//! thread and their own current-thread tokio runtime, so scraping or inspecting the agent
//! never takes time from the data plane.
//!
//! Admin listener (default `127.0.0.1:15000`, local only):
//!
//! | path           | answer                                                      |
//! |----------------|-------------------------------------------------------------|
//! | `/healthz`     | 200 `ok` while the process serves                           |
//! | `/ready`       | 200 `ready`, or 503 with the reason                         |
//! | `/config_dump` | the live config snapshot (JSON)                             |
//! | `/pods`        | pods with enrolment state and active connections (JSON)     |
//! | `/certs`       | certificates held, validity and seconds to expiry (JSON)    |
//!
//! Metrics listener (default `0.0.0.0:15020`): `/metrics` (also at Istio's
//! `/stats/prometheus`), plus `/healthz` and `/ready` for kubelet probes (which cannot reach
//! the node's loopback). `/metrics` answers OpenMetrics 1.0 when the scraper accepts it (as
//! Prometheus does), else the classic text format 0.0.4.
//!
//! GET and HEAD only (other methods on a known path: 405); unknown paths: 404; malformed
//! requests: 400 from hyper's parser (431 for oversized headers). Each connection must send a
//! complete request head within [`HEADER_READ_TIMEOUT`] (idle keep-alive included), lives at
//! most [`MAX_CONNECTION_AGE`], and at most [`MAX_CONNECTIONS`] are served at once (more are
//! closed on accept).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, thread::JoinHandle, time::Duration};

use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};
use tracing::{debug, info, warn};

use crate::metrics;

/// How long a client may take to send a request head (and stay idle between requests).
pub const HEADER_READ_TIMEOUT: Duration = if cfg!(test) {
    Duration::from_secs(1)
} else {
    Duration::from_secs(10)
};
/// Connections are asked to close (gracefully) after this long.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(120);
/// Connections served at once, over both listeners.
pub const MAX_CONNECTIONS: usize = 64;
/// Request heads larger than this get 431.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// After a graceful close is asked, how long an in-flight response may still take.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// What the endpoints show, implemented by the agent over its live state. Called on the
/// admin thread; implementations may take locks but should not block for long.
pub trait AdminSource: Send + Sync + 'static {
    /// Ok when the eBPF programs are attached and every enrolled pod's certificate is loaded;
    /// otherwise why not.
    fn ready(&self) -> Result<(), String>;
    /// The live config snapshot.
    fn config_dump(&self) -> serde_json::Value;
    /// `[{pod, namespace, identity, ip, node, enrolled, state, connections_active}]`, `state`
    /// being `"enrolled"`, `"not enrolled"` or `"failed: <why>"`.
    fn pods(&self) -> serde_json::Value;
    /// `[{identity, not_before, not_after (RFC 3339), seconds_to_expiry}]`.
    fn certs(&self) -> serde_json::Value;
    /// [`metrics::Metrics::encode`] with the live eBPF counters and certificates.
    fn metrics_text(&self) -> String;
}

/// The running servers; dropping it stops them (and waits for the admin thread to exit).
pub struct AdminHandle {
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for AdminHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminHandle")
            .field("admin_addr", &self.admin_addr)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

impl Drop for AdminHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listener {
    Admin,
    Metrics,
}

/// Binds both listeners now (a bind error names the address), then serves them from a
/// dedicated `admin` thread. Port 0 binds an ephemeral port; the handle has the real ones.
pub fn spawn(
    admin_addr: SocketAddr,
    metrics_addr: SocketAddr,
    source: Arc<dyn AdminSource>,
) -> anyhow::Result<AdminHandle> {
    let admin =
        bind(admin_addr).with_context(|| format!("binding the admin API on {admin_addr}"))?;
    let metrics = bind(metrics_addr)
        .with_context(|| format!("binding the metrics endpoint on {metrics_addr}"))?;
    let admin_addr = admin.local_addr().context("admin listener address")?;
    let metrics_addr = metrics.local_addr().context("metrics listener address")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the admin runtime")?;
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                let (admin, metrics) =
                    match (TcpListener::from_std(admin), TcpListener::from_std(metrics)) {
                        (Ok(a), Ok(m)) => (a, m),
                        (Err(e), _) | (_, Err(e)) => {
                            warn!(error = %e, "admin listeners could not be registered");
                            return;
                        }
                    };
                let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
                tokio::select! {
                    _ = accept_loop(admin, Listener::Admin, source.clone(), slots.clone()) => {}
                    _ = accept_loop(metrics, Listener::Metrics, source, slots) => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime here drops every connection task.
        })
        .context("starting the admin thread")?;
    info!(admin = %admin_addr, metrics = %metrics_addr, "admin API and metrics listening");
    Ok(AdminHandle {
        admin_addr,
        metrics_addr,
        stop: Some(stop),
        thread: Some(thread),
    })
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    // std sets SO_REUSEADDR on Unix, so a restarted agent rebinds at once.
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

async fn accept_loop(
    listener: TcpListener,
    which: Listener,
    source: Arc<dyn AdminSource>,
    slots: Arc<Semaphore>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, listener = ?which, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "admin connection refused: too many connections");
            continue;
        };
        let source = source.clone();
        tokio::spawn(async move {
            let _slot = slot;
            serve_connection(stream, which, source).await;
        });
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    which: Listener,
    source: Arc<dyn AdminSource>,
) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req| {
        let source = source.clone();
        async move { Ok::<_, Infallible>(handle(req, which, &*source)) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                debug!(error = %e, "admin connection ended with an error");
            }
        }
        _ = tokio::time::sleep(MAX_CONNECTION_AGE) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
        }
    }
}

type Body = Full<Bytes>;

fn handle(req: Request<Incoming>, which: Listener, source: &dyn AdminSource) -> Response<Body> {
    let path = req.uri().path();
    let known = match which {
        Listener::Admin => matches!(
            path,
            "/healthz" | "/ready" | "/config_dump" | "/pods" | "/certs"
        ),
        Listener::Metrics => matches!(
            path,
            "/metrics" | "/stats/prometheus" | "/healthz" | "/ready"
        ),
    };
    if !known {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut res = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        res.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return res;
    }
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/ready" => match source.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        },
        "/config_dump" => json(&source.config_dump()),
        "/pods" => json(&source.pods()),
        "/certs" => json(&source.certs()),
        _ => {
            // /metrics, /stats/prometheus
            let openmetrics = req
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/openmetrics-text"));
            let body = source.metrics_text();
            let (body, content_type) = if openmetrics {
                (body, metrics::OPENMETRICS_CONTENT_TYPE)
            } else {
                (
                    metrics::to_prometheus_text(&body),
                    metrics::PROMETHEUS_TEXT_CONTENT_TYPE,
                )
            };
            response(StatusCode::OK, content_type, body.into_bytes())
        }
    }
}

fn response(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    response(
        status,
        "text/plain; charset=utf-8",
        body.into().into_bytes(),
    )
}

fn json(value: &serde_json::Value) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            response(StatusCode::OK, "application/json", body)
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding JSON: {e}\n"),
        ),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
        sync::atomic::{AtomicBool, Ordering},
    };

    use serde_json::json;

    use super::*;

    /// An [`AdminSource`] with canned answers.
    pub(crate) struct FakeSource {
        pub ready: AtomicBool,
    }

    impl FakeSource {
        pub(crate) fn new(ready: bool) -> Arc<Self> {
            Arc::new(Self {
                ready: AtomicBool::new(ready),
            })
        }
    }

    impl AdminSource for FakeSource {
        fn ready(&self) -> Result<(), String> {
            if self.ready.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("certificate of shop/cart not loaded yet".into())
            }
        }
        fn config_dump(&self) -> serde_json::Value {
            json!({"node": "node-1", "trust_domain": "cluster.local"})
        }
        fn pods(&self) -> serde_json::Value {
            json!([
                {"pod": "frontend", "namespace": "shop", "identity": "spiffe://cluster.local/ns/shop/sa/frontend",
                 "ip": "10.61.0.2", "node": "node-1", "enrolled": true, "state": "enrolled", "connections_active": 3},
                {"pod": "legacy", "namespace": "default", "identity": "spiffe://cluster.local/ns/default/sa/default",
                 "ip": "10.61.0.9", "node": "node-1", "enrolled": false, "state": "not enrolled", "connections_active": 0},
            ])
        }
        fn certs(&self) -> serde_json::Value {
            json!([
                {"identity": "spiffe://cluster.local/ns/shop/sa/frontend", "not_before": "2025-01-01T00:00:00Z",
                 "not_after": "2025-01-02T00:00:00Z", "seconds_to_expiry": 86_370.0},
            ])
        }
        fn metrics_text(&self) -> String {
            let m = metrics::Metrics::new();
            m.set_enrolled_pods(1);
            m.config_reload(true);
            m.encode(&[("outbound_redirected", 5)], &[])
        }
    }

    /// Sends `raw` and reads until the server closes: (status, head, body).
    pub(crate) fn exchange(addr: SocketAddr, raw: &[u8]) -> (u16, String, String) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(raw).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, head.to_ascii_lowercase(), body.to_string())
    }

    fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        exchange(
            addr,
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
    }

    fn start(ready: bool) -> (AdminHandle, Arc<FakeSource>) {
        let source = FakeSource::new(ready);
        let local = "127.0.0.1:0".parse().unwrap();
        (spawn(local, local, source.clone()).unwrap(), source)
    }

    #[test]
    fn admin_endpoints() {
        let (h, source) = start(true);
        let a = h.admin_addr;
        let (status, _, body) = get(a, "/healthz");
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        let (status, _, body) = get(a, "/ready");
        assert_eq!((status, body.as_str()), (200, "ready\n"));
        source.ready.store(false, Ordering::Relaxed);
        let (status, _, body) = get(a, "/ready");
        assert_eq!(status, 503);
        assert_eq!(body, "certificate of shop/cart not loaded yet\n");
        for (path, expected) in [
            ("/config_dump", source.config_dump()),
            ("/pods", source.pods()),
            ("/certs", source.certs()),
        ] {
            let (status, head, body) = get(a, path);
            assert_eq!(status, 200, "{path}");
            assert!(
                head.contains("content-type: application/json"),
                "{path}: {head}"
            );
            let got: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(got, expected, "{path}");
        }
        // Query strings are ignored; metrics are not served on the admin port.
        assert_eq!(get(a, "/pods?x=1").0, 200);
        assert_eq!(get(a, "/metrics").0, 404);
        assert_eq!(get(a, "/").0, 404);
    }

    #[test]
    fn metrics_endpoint_negotiates_the_format() {
        let (h, _) = start(true);
        let m = h.metrics_addr;
        let (status, head, body) = exchange(
            m,
            b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\naccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\r\n",
        );
        assert_eq!(status, 200);
        assert!(
            head.contains(
                "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"
            )
        );
        assert!(body.contains("\ntrellis_enrolled_pods 1\n"), "{body}");
        assert!(body.contains("trellis_ebpf_events_total{event=\"outbound_redirected\"} 5"));
        assert!(body.ends_with("# EOF\n"));

        let (status, head, body) = get(m, "/metrics");
        assert_eq!(status, 200);
        assert!(head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"));
        assert!(body.contains("# TYPE trellis_config_reloads_total counter\n"));
        assert!(!body.contains("# EOF"));

        assert_eq!(get(m, "/stats/prometheus").0, 200);
        assert_eq!(get(m, "/healthz").0, 200);
        assert_eq!(get(m, "/ready").0, 200);
        // The admin endpoints stay on the local admin port.
        assert_eq!(get(m, "/pods").0, 404);
        assert_eq!(get(m, "/config_dump").0, 404);
    }

    #[test]
    fn wrong_method_unknown_path_and_malformed_requests() {
        let (h, _) = start(true);
        let (status, head, _) = exchange(
            h.admin_addr,
            b"POST /pods HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}",
        );
        assert_eq!(status, 405);
        assert!(head.contains("allow: get, head"));
        assert_eq!(
            exchange(
                h.metrics_addr,
                b"DELETE /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
            )
            .0,
            405
        );
        assert_eq!(
            exchange(
                h.admin_addr,
                b"POST /nope HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
            )
            .0,
            404
        );
        // HEAD is GET without the body.
        let (status, _, body) = exchange(
            h.admin_addr,
            b"HEAD /pods HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        );
        assert_eq!((status, body.as_str()), (200, ""));

        for garbage in [
            &b"this is not http\r\n\r\n"[..],
            b"GET /pods HTTP/1.1\r\nbad header line\r\n\r\n",
            b"GET /pods HTTP/9.9\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        ] {
            let (status, _, _) = exchange(h.admin_addr, garbage);
            assert_eq!(status, 400, "{:?}", String::from_utf8_lossy(garbage));
        }
        let huge = format!(
            "GET /pods HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        );
        let (status, _, _) = exchange(h.admin_addr, huge.as_bytes());
        assert_eq!(status, 431);
        // Still serving afterwards.
        assert_eq!(get(h.admin_addr, "/healthz").0, 200);
    }

    #[test]
    fn keep_alive_serves_several_requests() {
        let (h, _) = start(true);
        let mut s = TcpStream::connect(h.admin_addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).unwrap();
        assert_eq!(buf.matches("HTTP/1.1 200 OK").count(), 2, "{buf}");
    }

    #[test]
    fn a_silent_connection_is_closed_after_the_header_timeout() {
        let (h, _) = start(true);
        let mut s = TcpStream::connect(h.admin_addr).unwrap();
        s.set_read_timeout(Some(HEADER_READ_TIMEOUT + Duration::from_secs(5)))
            .unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
        let started = std::time::Instant::now();
        let mut buf = Vec::new();
        let res = s.read_to_end(&mut buf);
        assert!(res.is_ok(), "connection not closed by the server: {res:?}");
        let waited = started.elapsed();
        assert!(
            waited >= HEADER_READ_TIMEOUT - Duration::from_millis(200),
            "{waited:?}"
        );
        assert!(
            waited < HEADER_READ_TIMEOUT + Duration::from_secs(4),
            "{waited:?}"
        );
    }

    #[test]
    fn bind_errors_name_the_address_and_drop_stops_the_servers() {
        let (h, _) = start(true);
        let taken = h.admin_addr;
        let err = spawn(taken, "127.0.0.1:0".parse().unwrap(), FakeSource::new(true)).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&taken.to_string()) && msg.contains("admin API"),
            "{msg}"
        );
        let metrics = h.metrics_addr;
        drop(h);
        assert!(TcpStream::connect(taken).is_err());
        assert!(TcpStream::connect(metrics).is_err());
    }
}
