//! Node telemetry: Istio-compatible traffic metrics plus the agent's own health, exposed in
//! the Prometheus/OpenMetrics text format.
//!
//! Traffic metrics carry Istio's names and labels (`istio_requests_total`,
//! `istio_tcp_sent_bytes_total`, `istio_request_duration_milliseconds`, ...), so the stock
//! Istio Grafana dashboards and Kiali read them unchanged. Agent health lives under
//! `trellis_`.
//!
//! # Label cardinality
//!
//! Every label value comes from a bounded set: workload and namespace names, SPIFFE
//! identities, service host names, a handful of protocol, status and flag values. Nothing
//! per-connection or per-request is ever a label: no IP addresses, ports, paths, hosts
//! from requests, request ids or user agents. `response_code` is the numeric HTTP status (at
//! most a few dozen values). The number of series therefore grows with the number of
//! (source workload, destination workload, service) pairs that actually talk, as in Istio.
//! Callers must keep it that way: unknown peers are `"unknown"`, never their address.
//!
//! # Exposition format
//!
//! [`Metrics::encode`] returns OpenMetrics 1.0 text (what `prometheus-client` writes:
//! counter families are declared without `_total`, samples carry it, the text ends with
//! `# EOF`); serve it as [`OPENMETRICS_CONTENT_TYPE`]. For scrapers that only speak the
//! classic Prometheus format 0.0.4, [`to_prometheus_text`] rewrites it (counter families
//! named with `_total`, no `# EOF`); serve that as [`PROMETHEUS_TEXT_CONTENT_TYPE`].
//!
//! # Cost
//!
//! Recording is a read-locked hash lookup per family (`Family::get_or_create` with the
//! caller's borrowed label set; the labels are cloned only the first time a series appears)
//! and an atomic add, or a short write lock for histograms.

use std::{fmt::Write as _, sync::atomic::AtomicU64, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Content type of [`Metrics::encode`]'s output.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of [`to_prometheus_text`]'s output.
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Istio's default buckets for `istio_request_duration_milliseconds`.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's buckets for `istio_request_bytes` and `istio_response_bytes`: 1 to 1e9, ×10.
pub const SIZE_BUCKETS_BYTES: [f64; 10] = [1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

/// Which side of the connection reports it (Istio's `reporter` label).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reporter {
    /// The agent of the client pod (outbound).
    Source,
    /// The agent of the server pod (inbound).
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// Where an authorization decision was taken.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Layer {
    L4,
    L7,
}

impl Layer {
    pub fn as_str(self) -> &'static str {
        match self {
            Layer::L4 => "l4",
            Layer::L7 => "l7",
        }
    }
}

impl EncodeLabelValue for Layer {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// The request metrics of one label set (see [`Metrics::request_handles`]).
#[derive(Clone)]
pub struct RequestHandles {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl RequestHandles {
    /// Records one request, like [`Metrics::request`].
    pub fn record(&self, duration: Duration, request_bytes: u64, response_bytes: u64) {
        self.requests.inc();
        self.duration.observe(duration.as_secs_f64() * 1000.0);
        self.request_bytes.observe(request_bytes as f64);
        self.response_bytes.observe(response_bytes as f64);
    }
}

/// Labels of Istio's TCP metrics.
///
/// Encoded with these fields plus four derived from them the way Istio does, which Kiali
/// groups by: `destination_service_name` and `destination_service_namespace` (the first two
/// labels of `destination_service` when it is `name.ns.svc...`, else `destination_service`
/// and `"unknown"`), and `source_canonical_service` / `destination_canonical_service` (the
/// workload name: Istio's fallback when a pod has no canonical-name or `app` label). They add
/// no cardinality.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ConnectionLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    /// `spiffe://...`, or `"unknown"`.
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    /// `name.ns.svc.cluster.local`, or `"unknown"`.
    pub destination_service: String,
    /// `"tcp"`.
    pub request_protocol: String,
    /// Envoy-style response flags, `"-"` for none.
    pub response_flags: String,
    /// `"mutual_tls"` or `"none"`.
    pub connection_security_policy: String,
}

/// Labels of Istio's HTTP metrics: those of [`ConnectionLabels`] plus `response_code`
/// (`request_protocol` is `"http"` or `"grpc"`).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct RequestLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub request_protocol: String,
    /// The numeric HTTP status, e.g. `"200"`.
    pub response_code: String,
    pub response_flags: String,
    pub connection_security_policy: String,
}

/// Writes one label, escaping the value as both text formats require (`\`, `"`, newline).
/// `prometheus-client` writes label values verbatim, so every label set of this module goes
/// through here.
fn label(encoder: &mut LabelSetEncoder, key: &str, value: &str) -> Result<(), std::fmt::Error> {
    use prometheus_client::encoding::EncodeLabel as _;
    (key, Escaped(value)).encode(encoder.encode_label())
}

struct Escaped<'a>(&'a str);

impl EncodeLabelValue for Escaped<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0;
        if !s.contains(['\\', '"', '\n']) {
            return encoder.write_str(s);
        }
        for c in s.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// `(destination_service_name, destination_service_namespace)` from a service host name.
fn service_name_namespace(host: &str) -> (&str, &str) {
    let mut parts = host.splitn(3, '.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(name), Some(ns), Some(rest))
            if !name.is_empty()
                && !ns.is_empty()
                && (rest == "svc" || rest.starts_with("svc.")) =>
        {
            (name, ns)
        }
        _ => (host, "unknown"),
    }
}

/// The labels both label sets share, in Istio's usual order.
#[allow(clippy::too_many_arguments)]
fn encode_common(
    encoder: &mut LabelSetEncoder,
    reporter: Reporter,
    source_workload: &str,
    source_workload_namespace: &str,
    source_principal: &str,
    destination_workload: &str,
    destination_workload_namespace: &str,
    destination_principal: &str,
    destination_service: &str,
    request_protocol: &str,
) -> Result<(), std::fmt::Error> {
    let (service_name, service_namespace) = service_name_namespace(destination_service);
    label(encoder, "reporter", reporter.as_str())?;
    label(encoder, "source_workload", source_workload)?;
    label(
        encoder,
        "source_workload_namespace",
        source_workload_namespace,
    )?;
    label(encoder, "source_principal", source_principal)?;
    label(encoder, "source_canonical_service", source_workload)?;
    label(encoder, "destination_workload", destination_workload)?;
    label(
        encoder,
        "destination_workload_namespace",
        destination_workload_namespace,
    )?;
    label(encoder, "destination_principal", destination_principal)?;
    label(
        encoder,
        "destination_canonical_service",
        destination_workload,
    )?;
    label(encoder, "destination_service", destination_service)?;
    label(encoder, "destination_service_name", service_name)?;
    label(encoder, "destination_service_namespace", service_namespace)?;
    label(encoder, "request_protocol", request_protocol)
}

impl EncodeLabelSet for ConnectionLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        encode_common(
            encoder,
            self.reporter,
            &self.source_workload,
            &self.source_workload_namespace,
            &self.source_principal,
            &self.destination_workload,
            &self.destination_workload_namespace,
            &self.destination_principal,
            &self.destination_service,
            &self.request_protocol,
        )?;
        label(encoder, "response_flags", &self.response_flags)?;
        label(
            encoder,
            "connection_security_policy",
            &self.connection_security_policy,
        )
    }
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        encode_common(
            encoder,
            self.reporter,
            &self.source_workload,
            &self.source_workload_namespace,
            &self.source_principal,
            &self.destination_workload,
            &self.destination_workload_namespace,
            &self.destination_principal,
            &self.destination_service,
            &self.request_protocol,
        )?;
        label(encoder, "response_code", &self.response_code)?;
        label(encoder, "response_flags", &self.response_flags)?;
        label(
            encoder,
            "connection_security_policy",
            &self.connection_security_policy,
        )
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct ReloadLabels {
    accepted: bool,
}

impl EncodeLabelSet for ReloadLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        label(
            encoder,
            "result",
            if self.accepted {
                "accepted"
            } else {
                "rejected"
            },
        )
    }
}

/// Why a captured connection was turned away before it was served.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RejectReason {
    /// The pod already has `--max-connections-per-pod` open.
    PodLimit,
    /// The node already has `--max-connections` open.
    NodeLimit,
}

/// Why an HTTP/1.1 connection left the fast path for hyper (`proxy::http::fast_path`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum HandoverReason {
    /// A body that is not one plain `Content-Length`: chunked, `Expect`, conflicting or
    /// malformed lengths.
    Body,
    /// `Upgrade` (WebSocket and friends).
    Upgrade,
    /// Not HTTP/1.1: HTTP/1.0, or an HTTP/2 preface on an `http` port.
    Version,
    /// Not an origin-form target: `CONNECT`, absolute-form, `*`.
    Target,
    /// A head that does not parse, or lacks exactly one `Host`.
    Malformed,
    /// A head over 64 KiB or with too many fields.
    HeadSize,
    /// The chosen backend speaks HTTP/2.
    Http2Backend,
    /// The route names a backend that does not exist (hyper answers 500).
    RouteConfig,
}

impl HandoverReason {
    pub const ALL: [HandoverReason; 8] = [
        Self::Body,
        Self::Upgrade,
        Self::Version,
        Self::Target,
        Self::Malformed,
        Self::HeadSize,
        Self::Http2Backend,
        Self::RouteConfig,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Body => "body",
            Self::Upgrade => "upgrade",
            Self::Version => "version",
            Self::Target => "target",
            Self::Malformed => "malformed",
            Self::HeadSize => "head_size",
            Self::Http2Backend => "http2_backend",
            Self::RouteConfig => "route_config",
        }
    }
}

/// Which path served an h2c connection to a Service port declared (or sniffed) HTTP/2.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Http2Path {
    /// The frame-level forwarder (`proxy::http::h2_fast_path`).
    FastPath,
    /// hyper: the fast path is off, the port's routes retry or name HTTP/1 backends, or
    /// the client spoke HTTP/1.1.
    Hyper,
}

impl Http2Path {
    fn as_str(self) -> &'static str {
        match self {
            Self::FastPath => "fast_path",
            Self::Hyper => "hyper",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Http2PathLabels {
    path: Http2Path,
}

impl EncodeLabelSet for Http2PathLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        label(encoder, "path", self.path.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct HandoverLabels {
    reason: HandoverReason,
}

impl EncodeLabelSet for HandoverLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        label(encoder, "reason", self.reason.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct RejectLabels {
    reason: RejectReason,
}

impl EncodeLabelSet for RejectLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        label(
            encoder,
            "reason",
            match self.reason {
                RejectReason::PodLimit => "pod_limit",
                RejectReason::NodeLimit => "node_limit",
            },
        )
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct PolicyLabels {
    allowed: bool,
    layer: Layer,
}

impl EncodeLabelSet for PolicyLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        label(
            encoder,
            "action",
            if self.allowed { "allow" } else { "deny" },
        )?;
        label(encoder, "layer", self.layer.as_str())
    }
}

/// A one-label set for the scrape-time families (`event`, `identity`).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct OneLabel {
    key: &'static str,
    value: String,
}

impl EncodeLabelSet for OneLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        label(encoder, self.key, &self.value)
    }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS_BYTES)
}

/// The node's metrics. Cheap to record into from any thread; share it as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    tcp_opened: Family<ConnectionLabels, Counter>,
    tcp_closed: Family<ConnectionLabels, Counter>,
    tcp_sent: Family<ConnectionLabels, Counter>,
    tcp_received: Family<ConnectionLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<RequestLabels>,
    request_bytes: HistogramFamily<RequestLabels>,
    response_bytes: HistogramFamily<RequestLabels>,
    enrolled_pods: Gauge,
    ebpf_links: Gauge,
    config_reloads: Family<ReloadLabels, Counter>,
    policy_decisions: Family<PolicyLabels, Counter>,
    connections_rejected: Family<RejectLabels, Counter>,
    http1_handovers: Family<HandoverLabels, Counter>,
    http2_connections: Family<Http2PathLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        // Counters are registered without `_total`: prometheus-client appends it to samples.
        let tcp_opened = Family::<ConnectionLabels, Counter>::default();
        registry.register(
            "istio_tcp_connections_opened",
            "Total TCP connections opened",
            tcp_opened.clone(),
        );
        let tcp_closed = Family::<ConnectionLabels, Counter>::default();
        registry.register(
            "istio_tcp_connections_closed",
            "Total TCP connections closed",
            tcp_closed.clone(),
        );
        let tcp_sent = Family::<ConnectionLabels, Counter>::default();
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client (response direction) on TCP connections, counted at close",
            tcp_sent.clone(),
        );
        let tcp_received = Family::<ConnectionLabels, Counter>::default();
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client (request direction) on TCP connections, counted at close",
            tcp_received.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("istio_requests", "Total HTTP requests", requests.clone());
        let request_duration: HistogramFamily<RequestLabels> =
            Family::new_with_constructor(duration_histogram);
        registry.register(
            "istio_request_duration_milliseconds",
            "HTTP request duration in milliseconds",
            request_duration.clone(),
        );
        let request_bytes: HistogramFamily<RequestLabels> =
            Family::new_with_constructor(size_histogram);
        registry.register(
            "istio_request_bytes",
            "HTTP request sizes in bytes (body)",
            request_bytes.clone(),
        );
        let response_bytes: HistogramFamily<RequestLabels> =
            Family::new_with_constructor(size_histogram);
        registry.register(
            "istio_response_bytes",
            "HTTP response sizes in bytes (body)",
            response_bytes.clone(),
        );
        let enrolled_pods = Gauge::default();
        registry.register(
            "trellis_enrolled_pods",
            "Pods of this node whose traffic the agent captures",
            enrolled_pods.clone(),
        );
        let ebpf_links = Gauge::default();
        registry.register(
            "trellis_ebpf_links_attached",
            "eBPF program links the agent holds attached",
            ebpf_links.clone(),
        );
        let config_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "trellis_config_reloads",
            "Config changes seen, by result",
            config_reloads.clone(),
        );
        let policy_decisions = Family::<PolicyLabels, Counter>::default();
        registry.register(
            "trellis_policy_decisions",
            "Authorization decisions, by action and layer",
            policy_decisions.clone(),
        );
        let connections_rejected = Family::<RejectLabels, Counter>::default();
        registry.register(
            "trellis_connections_rejected",
            "Captured connections reset at accept because a connection limit was reached",
            connections_rejected.clone(),
        );
        let http1_handovers = Family::<HandoverLabels, Counter>::default();
        registry.register(
            "trellis_http1_handovers",
            "HTTP/1.1 connections the fast path gave to hyper, by the reason of their first request that needed it",
            http1_handovers.clone(),
        );
        let http2_connections = Family::<Http2PathLabels, Counter>::default();
        registry.register(
            "trellis_http2_connections",
            "Connections to HTTP/2 (h2c, gRPC) Service ports, by the path that served them",
            http2_connections.clone(),
        );
        // Series with a small fixed label space start at 0, so rate() and increase() see the
        // first event.
        for path in [Http2Path::FastPath, Http2Path::Hyper] {
            let _ = http2_connections.get_or_create(&Http2PathLabels { path });
        }
        for reason in HandoverReason::ALL {
            let _ = http1_handovers.get_or_create(&HandoverLabels { reason });
        }
        for reason in [RejectReason::PodLimit, RejectReason::NodeLimit] {
            let _ = connections_rejected.get_or_create(&RejectLabels { reason });
        }
        for accepted in [true, false] {
            let _ = config_reloads.get_or_create(&ReloadLabels { accepted });
        }
        for allowed in [true, false] {
            for layer in [Layer::L4, Layer::L7] {
                let _ = policy_decisions.get_or_create(&PolicyLabels { allowed, layer });
            }
        }
        Self {
            registry,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            requests,
            request_duration,
            request_bytes,
            response_bytes,
            enrolled_pods,
            ebpf_links,
            config_reloads,
            policy_decisions,
            connections_rejected,
            http1_handovers,
            http2_connections,
        }
    }

    /// `trellis_http2_connections_total{path}`.
    pub fn http2_connection(&self, path: Http2Path) {
        self.http2_connections
            .get_or_create(&Http2PathLabels { path })
            .inc();
    }

    /// `trellis_http1_handovers_total{reason}`.
    pub fn http1_handover(&self, reason: HandoverReason) {
        self.http1_handovers
            .get_or_create(&HandoverLabels { reason })
            .inc();
    }

    /// `trellis_connections_rejected_total{reason}`.
    pub fn connection_rejected(&self, reason: RejectReason) {
        self.connections_rejected
            .get_or_create(&RejectLabels { reason })
            .inc();
    }

    /// A connection was opened: `istio_tcp_connections_opened_total`.
    pub fn tcp_opened(&self, l: &ConnectionLabels) {
        self.tcp_opened.get_or_create(l).inc();
    }

    /// A connection closed: `istio_tcp_connections_closed_total`, and its bytes, with Istio's
    /// meaning: `sent` = bytes sent to the client (downstream; the response direction) →
    /// `istio_tcp_sent_bytes_total`; `received` = bytes received from the client (the request
    /// direction) → `istio_tcp_received_bytes_total`. With `relay::Outcome` that is
    /// `sent = upstream_to_client`, `received = client_to_upstream`.
    pub fn tcp_closed(&self, l: &ConnectionLabels, sent: u64, received: u64) {
        self.tcp_closed.get_or_create(l).inc();
        self.tcp_sent.get_or_create(l).inc_by(sent);
        self.tcp_received.get_or_create(l).inc_by(received);
    }

    /// An HTTP request completed: `istio_requests_total`, and the
    /// `istio_request_duration_milliseconds`, `istio_request_bytes` and
    /// `istio_response_bytes` histograms.
    /// Handles to the request metrics of one label set, so that a caller recording many
    /// requests with the same labels skips the four label-set lookups.
    pub fn request_handles(&self, l: &RequestLabels) -> RequestHandles {
        RequestHandles {
            requests: self.requests.get_or_create(l).clone(),
            duration: self.request_duration.get_or_create(l).clone(),
            request_bytes: self.request_bytes.get_or_create(l).clone(),
            response_bytes: self.response_bytes.get_or_create(l).clone(),
        }
    }

    pub fn request(
        &self,
        l: &RequestLabels,
        duration: Duration,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        self.requests.get_or_create(l).inc();
        self.request_duration
            .get_or_create(l)
            .observe(duration.as_secs_f64() * 1000.0);
        self.request_bytes
            .get_or_create(l)
            .observe(request_bytes as f64);
        self.response_bytes
            .get_or_create(l)
            .observe(response_bytes as f64);
    }

    /// `trellis_enrolled_pods`.
    pub fn set_enrolled_pods(&self, n: i64) {
        self.enrolled_pods.set(n);
    }

    /// `trellis_ebpf_links_attached`.
    pub fn set_ebpf_links(&self, n: i64) {
        self.ebpf_links.set(n);
    }

    /// `trellis_config_reloads_total{result="accepted"|"rejected"}`.
    pub fn config_reload(&self, accepted: bool) {
        self.config_reloads
            .get_or_create(&ReloadLabels { accepted })
            .inc();
    }

    /// `trellis_policy_decisions_total{action="allow"|"deny",layer="l4"|"l7"}`.
    pub fn policy_decision(&self, allowed: bool, layer: Layer) {
        self.policy_decisions
            .get_or_create(&PolicyLabels { allowed, layer })
            .inc();
    }

    /// The OpenMetrics text exposition of everything recorded, plus point-in-time values read
    /// at scrape time:
    /// - `ebpf`: the eBPF counters `(name, value)` → `trellis_ebpf_events_total{event=name}`
    ///   (names starting with `unused` are placeholders and skipped);
    /// - `certs`: `(identity, seconds to expiry)` of the certificates held →
    ///   `trellis_certificates_held` and `trellis_certificate_expiry_seconds{identity}`
    ///   (negative once expired).
    pub fn encode(&self, ebpf: &[(&str, u64)], certs: &[(String, f64)]) -> String {
        let mut scrape = Registry::default();
        let events = Family::<OneLabel, Counter>::default();
        for (name, value) in ebpf.iter().filter(|(n, _)| !n.starts_with("unused")) {
            events
                .get_or_create(&OneLabel {
                    key: "event",
                    value: (*name).to_string(),
                })
                .inc_by(*value);
        }
        scrape.register(
            "trellis_ebpf_events",
            "Events counted by the eBPF programs since they were loaded",
            events,
        );
        let held = Gauge::<i64>::default();
        held.set(certs.len() as i64);
        scrape.register(
            "trellis_certificates_held",
            "Workload certificates this node holds",
            held,
        );
        let expiry = Family::<OneLabel, Gauge<f64, AtomicU64>>::default();
        for (identity, seconds) in certs {
            expiry
                .get_or_create(&OneLabel {
                    key: "identity",
                    value: identity.clone(),
                })
                .set(*seconds);
        }
        scrape.register(
            "trellis_certificate_expiry_seconds",
            "Seconds until each held workload certificate expires",
            expiry,
        );

        let mut text = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail; the encoder's only errors are the writer's.
        let _ = prometheus_client::encoding::text::encode_registry(&mut text, &self.registry);
        let _ = prometheus_client::encoding::text::encode_registry(&mut text, &scrape);
        let _ = prometheus_client::encoding::text::encode_eof(&mut text);
        text
    }
}

/// Rewrites [`Metrics::encode`]'s OpenMetrics text as Prometheus text format 0.0.4, for
/// scrapers that do not ask for OpenMetrics: counter families are declared under their
/// sample name (`# TYPE istio_requests_total counter`), `# UNIT` and `# EOF` are dropped.
/// Samples are the same lines in both formats.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut lines = openmetrics.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            // prometheus-client writes HELP then TYPE for every family.
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let counter = lines
                .peek()
                .and_then(|next| next.strip_prefix("# TYPE "))
                .is_some_and(|t| t.split_once(' ') == Some((name, "counter")));
            let suffix = if counter && !name.ends_with("_total") {
                "_total"
            } else {
                ""
            };
            let _ = writeln!(out, "# HELP {name}{suffix} {help}");
            if counter {
                lines.next();
                let _ = writeln!(out, "# TYPE {name}{suffix} counter");
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn_labels() -> ConnectionLabels {
        ConnectionLabels {
            reporter: Reporter::Source,
            source_workload: "frontend".into(),
            source_workload_namespace: "shop".into(),
            source_principal: "spiffe://cluster.local/ns/shop/sa/frontend".into(),
            destination_workload: "cart".into(),
            destination_workload_namespace: "shop".into(),
            destination_principal: "spiffe://cluster.local/ns/shop/sa/cart".into(),
            destination_service: "cart.shop.svc.cluster.local".into(),
            request_protocol: "tcp".into(),
            response_flags: "-".into(),
            connection_security_policy: "mutual_tls".into(),
        }
    }

    fn req_labels(code: &str) -> RequestLabels {
        let c = conn_labels();
        RequestLabels {
            reporter: c.reporter,
            source_workload: c.source_workload,
            source_workload_namespace: c.source_workload_namespace,
            source_principal: c.source_principal,
            destination_workload: c.destination_workload,
            destination_workload_namespace: c.destination_workload_namespace,
            destination_principal: c.destination_principal,
            destination_service: c.destination_service,
            request_protocol: "http".into(),
            response_code: code.into(),
            response_flags: "-".into(),
            connection_security_policy: "mutual_tls".into(),
        }
    }

    const CONN: &str = "reporter=\"source\",source_workload=\"frontend\",source_workload_namespace=\"shop\",source_principal=\"spiffe://cluster.local/ns/shop/sa/frontend\",source_canonical_service=\"frontend\",destination_workload=\"cart\",destination_workload_namespace=\"shop\",destination_principal=\"spiffe://cluster.local/ns/shop/sa/cart\",destination_canonical_service=\"cart\",destination_service=\"cart.shop.svc.cluster.local\",destination_service_name=\"cart\",destination_service_namespace=\"shop\"";

    /// A sample recording used by the tests here (and by the Python check in the report).
    pub(crate) fn sample() -> String {
        let m = Metrics::new();
        let c = conn_labels();
        m.tcp_opened(&c);
        m.tcp_opened(&c);
        m.tcp_closed(&c, 300, 100);
        m.tcp_closed(&c, 200, 50);
        m.request(&req_labels("200"), Duration::from_millis(3), 10, 2000);
        m.request(&req_labels("200"), Duration::from_micros(700), 0, 5);
        m.request(&req_labels("503"), Duration::from_secs(2), 0, 19);
        m.set_enrolled_pods(3);
        m.set_ebpf_links(12);
        m.config_reload(true);
        m.config_reload(true);
        m.config_reload(false);
        m.policy_decision(true, Layer::L4);
        m.policy_decision(false, Layer::L7);
        m.encode(
            &[
                ("outbound_redirected", 7),
                ("inbound_steered", 4),
                ("unused6", 0),
            ],
            &[("spiffe://cluster.local/ns/shop/sa/cart".into(), 86399.5)],
        )
    }

    fn has_line(text: &str, line: &str) {
        assert!(
            text.lines().any(|l| l == line),
            "missing line\n  {line}\nin\n{text}"
        );
    }

    #[test]
    fn tcp_metrics_have_istio_names_labels_and_values() {
        let t = sample();
        has_line(&t, "# TYPE istio_tcp_connections_opened counter");
        has_line(
            &t,
            &format!(
                "istio_tcp_connections_opened_total{{{CONN},request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"mutual_tls\"}} 2"
            ),
        );
        has_line(
            &t,
            &format!(
                "istio_tcp_connections_closed_total{{{CONN},request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"mutual_tls\"}} 2"
            ),
        );
        has_line(
            &t,
            &format!(
                "istio_tcp_sent_bytes_total{{{CONN},request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"mutual_tls\"}} 500"
            ),
        );
        has_line(
            &t,
            &format!(
                "istio_tcp_received_bytes_total{{{CONN},request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"mutual_tls\"}} 150"
            ),
        );
        assert!(t.ends_with("# EOF\n"));
    }

    #[test]
    fn request_metrics_and_histogram_buckets() {
        let t = sample();
        let ok = format!(
            "{CONN},request_protocol=\"http\",response_code=\"200\",response_flags=\"-\",connection_security_policy=\"mutual_tls\""
        );
        let err = format!(
            "{CONN},request_protocol=\"http\",response_code=\"503\",response_flags=\"-\",connection_security_policy=\"mutual_tls\""
        );
        has_line(&t, "# TYPE istio_requests counter");
        has_line(&t, &format!("istio_requests_total{{{ok}}} 2"));
        has_line(&t, &format!("istio_requests_total{{{err}}} 1"));
        has_line(&t, "# TYPE istio_request_duration_milliseconds histogram");
        has_line(
            &t,
            &format!("istio_request_duration_milliseconds_count{{{ok}}} 2"),
        );
        has_line(
            &t,
            &format!("istio_request_duration_milliseconds_sum{{{ok}}} 3.7"),
        );
        // 0.7 ms and 3 ms: cumulative counts per Istio bucket.
        for (le, n) in [
            ("0.5", 0),
            ("1.0", 1),
            ("5.0", 2),
            ("10.0", 2),
            ("3600000.0", 2),
            ("+Inf", 2),
        ] {
            has_line(
                &t,
                &format!("istio_request_duration_milliseconds_bucket{{le=\"{le}\",{ok}}} {n}"),
            );
        }
        let les: Vec<&str> = t
            .lines()
            .filter(|l| {
                l.starts_with("istio_request_duration_milliseconds_bucket{") && l.contains(&ok)
            })
            .map(|l| l.rsplit_once("le=\"").unwrap().1.split('"').next().unwrap())
            .collect();
        assert_eq!(les.len(), DURATION_BUCKETS_MS.len() + 1);
        assert_eq!(les.last(), Some(&"+Inf"));
        // 2 s lands in the 2500 ms bucket, not the 1000 ms one.
        has_line(
            &t,
            &format!("istio_request_duration_milliseconds_bucket{{le=\"1000.0\",{err}}} 0"),
        );
        has_line(
            &t,
            &format!("istio_request_duration_milliseconds_bucket{{le=\"2500.0\",{err}}} 1"),
        );
        // Sizes: request bodies 10 and 0, response bodies 2000 and 5.
        has_line(&t, "# TYPE istio_request_bytes histogram");
        has_line(&t, &format!("istio_request_bytes_sum{{{ok}}} 10.0"));
        has_line(
            &t,
            &format!("istio_request_bytes_bucket{{le=\"1.0\",{ok}}} 1"),
        );
        has_line(
            &t,
            &format!("istio_request_bytes_bucket{{le=\"10.0\",{ok}}} 2"),
        );
        has_line(
            &t,
            &format!("istio_response_bytes_bucket{{le=\"1000.0\",{ok}}} 1"),
        );
        has_line(
            &t,
            &format!("istio_response_bytes_bucket{{le=\"10000.0\",{ok}}} 2"),
        );
        has_line(
            &t,
            &format!("istio_response_bytes_bucket{{le=\"1000000000.0\",{ok}}} 2"),
        );
        let size_les = t
            .lines()
            .filter(|l| l.starts_with("istio_response_bytes_bucket{") && l.contains(&ok))
            .count();
        assert_eq!(size_les, SIZE_BUCKETS_BYTES.len() + 1);
    }

    #[test]
    fn agent_health_metrics() {
        let t = sample();
        has_line(&t, "trellis_enrolled_pods 3");
        has_line(&t, "trellis_ebpf_links_attached 12");
        has_line(&t, "trellis_config_reloads_total{result=\"accepted\"} 2");
        has_line(&t, "trellis_config_reloads_total{result=\"rejected\"} 1");
        has_line(
            &t,
            "trellis_policy_decisions_total{action=\"allow\",layer=\"l4\"} 1",
        );
        has_line(
            &t,
            "trellis_policy_decisions_total{action=\"deny\",layer=\"l7\"} 1",
        );
        // Pre-created at zero.
        has_line(
            &t,
            "trellis_policy_decisions_total{action=\"deny\",layer=\"l4\"} 0",
        );
        has_line(
            &t,
            "trellis_ebpf_events_total{event=\"outbound_redirected\"} 7",
        );
        has_line(&t, "trellis_ebpf_events_total{event=\"inbound_steered\"} 4");
        assert!(!t.contains("unused6"));
        has_line(&t, "trellis_certificates_held 1");
        has_line(
            &t,
            "trellis_certificate_expiry_seconds{identity=\"spiffe://cluster.local/ns/shop/sa/cart\"} 86399.5",
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        let mut c = conn_labels();
        c.source_workload = "we\"ird\\na\nme".into();
        m.tcp_opened(&c);
        let t = m.encode(&[], &[]);
        assert!(t.contains(r#"source_workload="we\"ird\\na\nme""#), "{t}");
        assert_eq!(
            t.lines()
                .filter(|l| l.starts_with("istio_tcp_connections_opened_total"))
                .count(),
            1
        );
    }

    #[test]
    fn service_name_and_namespace_derivation() {
        assert_eq!(
            service_name_namespace("cart.shop.svc.cluster.local"),
            ("cart", "shop")
        );
        assert_eq!(service_name_namespace("cart.shop.svc"), ("cart", "shop"));
        assert_eq!(service_name_namespace("unknown"), ("unknown", "unknown"));
        assert_eq!(
            service_name_namespace("example.com"),
            ("example.com", "unknown")
        );
        assert_eq!(service_name_namespace("a.b.svcx"), ("a.b.svcx", "unknown"));
    }

    #[test]
    fn classic_text_format_names_counters_with_total() {
        let t = to_prometheus_text(&sample());
        has_line(&t, "# TYPE istio_requests_total counter");
        has_line(&t, "# HELP istio_requests_total Total HTTP requests.");
        has_line(&t, "# TYPE istio_request_duration_milliseconds histogram");
        has_line(&t, "# TYPE trellis_enrolled_pods gauge");
        has_line(&t, "trellis_config_reloads_total{result=\"rejected\"} 1");
        assert!(!t.contains("# EOF"));
        assert!(!t.contains("# TYPE istio_requests counter"));
    }

    #[test]
    fn empty_metrics_encode() {
        let t = Metrics::new().encode(&[], &[]);
        has_line(&t, "trellis_certificates_held 0");
        has_line(&t, "trellis_enrolled_pods 0");
        // Families without series are left out altogether.
        assert!(!t.contains("istio_"));
    }

    /// Feeds the text to the reference Python parsers when they are installed
    /// (`python3 -m pip install prometheus_client`); skipped otherwise.
    #[test]
    fn python_parsers_accept_the_text() {
        let script = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om
from prometheus_client.parser import text_string_to_metric_families as classic
text = sys.stdin.read()
om_text, prom_text = text.split("\n=====\n")
for parse, t in ((om, om_text), (classic, prom_text)):
    fams = {f.name: f for f in parse(t)}
    assert fams["istio_requests"].type == "counter", fams["istio_requests"]
    assert fams["istio_tcp_sent_bytes"].type == "counter"
    assert fams["istio_request_duration_milliseconds"].type == "histogram"
    assert fams["trellis_ebpf_events"].type == "counter"
    assert fams["trellis_certificate_expiry_seconds"].type == "gauge"
    total = sum(s.value for s in fams["istio_requests"].samples if s.name == "istio_requests_total")
    assert total == 3, total
print("ok")
"#;
        let have = std::process::Command::new("python3")
            .args(["-c", "import prometheus_client"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !have {
            eprintln!("python3 prometheus_client not installed; skipping");
            return;
        }
        let om = sample();
        let input = format!("{om}\n=====\n{}", to_prometheus_text(&om));
        let mut child = std::process::Command::new("python3")
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "python parser failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
