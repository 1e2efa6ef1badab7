//! End-to-end tests of the agent's telemetry: Istio-compatible metrics scraped from the real
//! agent and parsed with the reference parsers of Python's `prometheus_client` (classic text
//! format 0.0.4 and OpenMetrics 1.0), the agent's own health metrics, the admin API and
//! `mesh-agent status`, and access-log filtering.
//!
//! Need root and a BPF-capable kernel, like every end-to-end test; they fail, not skip,
//! without them.
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use mesh_tests::{
    Agent, Background, Node, Pod,
    agent::{AGENT_DEADLINE, config_doc, field, message, number},
    wait_until,
};
use serde_json::{Value, json};

const PEER_ECHO: &str = env!("CARGO_BIN_EXE_peer-echo");
const HTTP_BACKEND: &str = env!("CARGO_BIN_EXE_http-backend");
const APP_PORT: u16 = 8080;
const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const BACKEND: &str = "spiffe://cluster.local/ns/shop/sa/backend";

// ---------------------------------------------------------------------------------------------
// Pods, servers, configs.
// ---------------------------------------------------------------------------------------------

fn http_server(pod: &Pod, port: u16) -> anyhow::Result<Background> {
    let mut cmd = pod.command(PEER_ECHO)?;
    cmd.args(["http", &port.to_string()]);
    Background::spawn_ready(cmd, "listening")
}

fn http_backend(pod: &Pod, name: &str) -> anyhow::Result<Background> {
    let mut cmd = pod.command(HTTP_BACKEND)?;
    cmd.args([&APP_PORT.to_string(), "--name", name]);
    Background::spawn_ready(cmd, "listening")
}

/// A node with a `client` pod (service account `frontend`) and a `server` pod (`backend`),
/// each labelled `app: <pod name>`.
struct TwoPods {
    node: Node,
    client: Pod,
    server: Pod,
}

fn two_pods() -> anyhow::Result<TwoPods> {
    let mut node = Node::new()?;
    let client = node.add_pod("client")?;
    let server = node.add_pod("server")?;
    Ok(TwoPods {
        node,
        client,
        server,
    })
}

impl TwoPods {
    /// Both pods enrolled, then `extra` pod entries and `tail` YAML.
    fn config(&self, extra_pods: &[String], tail: &str) -> String {
        let mut entries = vec![
            self.client.config_entry("shop", "frontend", true),
            self.server.config_entry("shop", "backend", true),
        ];
        entries.extend(extra_pods.iter().cloned());
        let mut doc = config_doc(&self.node.id, &entries);
        doc.push_str(tail);
        doc
    }

    fn url(&self) -> String {
        format!("http://{}:{APP_PORT}/", self.server.ip)
    }
}

fn wait_enrolled(agent: &mut Agent, pod: &str) -> anyhow::Result<()> {
    let pod = format!("shop/{pod}");
    agent.wait_for_event(&format!("{pod} enrolled"), |e| {
        message(e) == "pod enrolled" && field(e, "pod") == pod
    })?;
    Ok(())
}

fn is_connection(e: &Value, direction: &str) -> bool {
    message(e) == "connection closed" && field(e, "direction") == direction
}

/// Waits until the agent has logged exactly `n` connections closed in `direction` (fails on
/// more), and returns them.
fn wait_connections(agent: &Agent, direction: &str, n: usize) -> anyhow::Result<Vec<Value>> {
    let logs = wait_until(
        &format!("{n} {direction} connection logs"),
        AGENT_DEADLINE,
        || {
            let logs: Vec<Value> = agent
                .events()
                .into_iter()
                .filter(|e| is_connection(e, direction))
                .collect();
            (logs.len() >= n).then_some(logs)
        },
    )
    .with_context(|| format!("agent log:\n{}", agent.log_text()))?;
    ensure!(
        logs.len() == n,
        "{} {direction} connection logs, expected {n}:\n{}",
        logs.len(),
        agent.log_text()
    );
    Ok(logs)
}

/// Istio's `sent` (bytes back to the client) and `received` (bytes from the client) summed
/// over connection logs.
fn log_bytes(logs: &[Value]) -> (f64, f64) {
    let sum = |key: &str| {
        logs.iter()
            .map(|e| number(e, key).unwrap_or(0))
            .sum::<u64>() as f64
    };
    (sum("bytes_received"), sum("bytes_sent"))
}

/// curl that is expected to fail (the connection is closed before a reply).
fn curl_fails(pod: &Pod, url: &str) -> anyhow::Result<bool> {
    let out = pod
        .command("curl")?
        .args(["-sS", "--max-time", "20", "-o", "/dev/null", url])
        .output()?;
    Ok(!out.status.success())
}

/// A file removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Scraping with the reference parsers.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// `Accept: text/plain`: Prometheus text format 0.0.4, `prometheus_client.parser`.
    Prometheus,
    /// `Accept: application/openmetrics-text`: `prometheus_client.openmetrics.parser`.
    OpenMetrics,
}

/// Fetches the URL with the format's Accept header and prints the parsed families as JSON.
const SCRAPE_PY: &str = r#"
import json, sys, urllib.request
url, fmt = sys.argv[1], sys.argv[2]
if fmt == "openmetrics":
    accept = "application/openmetrics-text; version=1.0.0"
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
else:
    accept = "text/plain"
    from prometheus_client.parser import text_string_to_metric_families
req = urllib.request.Request(url, headers={"Accept": accept})
with urllib.request.urlopen(req, timeout=10) as r:
    content_type = r.headers.get("Content-Type", "")
    text = r.read().decode("utf-8")
families = []
for f in text_string_to_metric_families(text):
    families.append({
        "name": f.name,
        "type": f.type,
        "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples],
    })
print(json.dumps({"content_type": content_type, "families": families, "text": text}))
"#;

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

struct Scrape {
    content_type: String,
    /// Family name -> type, as the parser reports them.
    families: BTreeMap<String, String>,
    samples: Vec<Sample>,
    text: String,
}

impl Scrape {
    /// Samples named `name` carrying every label of `with`.
    fn matching(&self, name: &str, with: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && with
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.matching(name, with).iter().map(|s| s.value).sum()
    }

    /// The value of the one sample named `name` with `with`; fails on none or several.
    fn one(&self, name: &str, with: &[(&str, &str)]) -> anyhow::Result<&Sample> {
        match self.matching(name, with).as_slice() {
            [one] => Ok(one),
            many => bail!(
                "{} samples {name}{with:?}, expected one: {many:#?}\n{}",
                many.len(),
                self.text
            ),
        }
    }

    fn value(&self, name: &str, with: &[(&str, &str)]) -> anyhow::Result<f64> {
        Ok(self.one(name, with)?.value)
    }

    fn family_type(&self, name: &str) -> Option<&str> {
        self.families.get(name).map(String::as_str)
    }
}

fn scrape(addr: SocketAddr, format: Format) -> anyhow::Result<Scrape> {
    let out = std::process::Command::new("python3")
        .args(["-c", SCRAPE_PY])
        .arg(format!("http://{addr}/metrics"))
        .arg(match format {
            Format::Prometheus => "prometheus",
            Format::OpenMetrics => "openmetrics",
        })
        .output()
        .context("running python3")?;
    ensure!(
        out.status.success(),
        "scraping or parsing {addr} ({format:?}) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).context("scrape JSON")?;
    let mut families = BTreeMap::new();
    let mut samples = Vec::new();
    for f in v["families"].as_array().context("families")? {
        families.insert(
            f["name"].as_str().unwrap_or("").to_string(),
            f["type"].as_str().unwrap_or("").to_string(),
        );
        for s in f["samples"].as_array().context("samples")? {
            samples.push(Sample {
                name: s["name"].as_str().unwrap_or("").to_string(),
                labels: serde_json::from_value(s["labels"].clone())?,
                value: s["value"].as_f64().context("sample value")?,
            });
        }
    }
    Ok(Scrape {
        content_type: v["content_type"].as_str().unwrap_or("").to_string(),
        families,
        samples,
        text: v["text"].as_str().unwrap_or("").to_string(),
    })
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Istio's full label set for traffic from `src` (workload, principal) to `dst` in namespace
/// `shop`, plus `extra` (`response_code` for requests).
fn istio_labels(
    reporter: &str,
    src: (&str, &str),
    dst: (&str, &str),
    service: &str,
    protocol: &str,
    security: &str,
    extra: &[(&str, &str)],
) -> BTreeMap<String, String> {
    let (service_name, service_ns) = match service.split('.').collect::<Vec<_>>().as_slice() {
        [name, ns, "svc", ..] => (name.to_string(), ns.to_string()),
        _ => (service.to_string(), "unknown".to_string()),
    };
    let mut l = labels(&[
        ("reporter", reporter),
        ("source_workload", src.0),
        ("source_workload_namespace", "shop"),
        ("source_principal", src.1),
        ("source_canonical_service", src.0),
        ("destination_workload", dst.0),
        ("destination_workload_namespace", "shop"),
        ("destination_principal", dst.1),
        ("destination_canonical_service", dst.0),
        ("destination_service", service),
        ("destination_service_name", &service_name),
        ("destination_service_namespace", &service_ns),
        ("request_protocol", protocol),
        ("response_flags", "-"),
        ("connection_security_policy", security),
    ]);
    l.extend(labels(extra));
    l
}

/// Asserts the four TCP families for `reporter`: one series with exactly `expected` labels,
/// `n` connections opened and closed, and the given byte counts.
fn check_tcp(
    s: &Scrape,
    reporter: &str,
    expected: &BTreeMap<String, String>,
    n: usize,
    (sent, received): (f64, f64),
) -> anyhow::Result<()> {
    for (name, value) in [
        ("istio_tcp_connections_opened_total", n as f64),
        ("istio_tcp_connections_closed_total", n as f64),
        ("istio_tcp_sent_bytes_total", sent),
        ("istio_tcp_received_bytes_total", received),
    ] {
        let sample = s.one(name, &[("reporter", reporter)])?;
        ensure!(
            &sample.labels == expected,
            "{name}{{reporter={reporter}}} labels:\n  got      {:?}\n  expected {expected:?}",
            sample.labels
        );
        ensure!(
            sample.value == value,
            "{name}{{reporter={reporter}}} = {}, expected {value}\n{}",
            sample.value,
            s.text
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The admin API.
// ---------------------------------------------------------------------------------------------

/// GET over a fresh HTTP/1.1 connection: (status, content type, body).
fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String, String)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8(buf).context("answer is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no header end in {text:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    Ok((status, content_type, body.to_string()))
}

fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let (status, content_type, body) = http_get(addr, path)?;
    ensure!(status == 200, "GET {path}: {status} {body}");
    ensure!(
        content_type == "application/json",
        "GET {path}: {content_type}"
    );
    serde_json::from_str(&body).with_context(|| format!("GET {path}: {body}"))
}

/// `mesh-agent status --admin-addr ADDR [extra...]`'s stdout.
fn status_cli(addr: SocketAddr, extra: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(mesh_tests::agent_binary()?)
        .args(["status", "--admin-addr", &addr.to_string()])
        .args(extra)
        .output()
        .context("running mesh-agent status")?;
    ensure!(
        out.status.success(),
        "mesh-agent status {extra:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

#[test]
fn tcp_metrics_count_each_local_connection_for_both_reporters() -> anyhow::Result<()> {
    const N: usize = 3;
    let t = two_pods()?;
    let _server = http_server(&t.server, APP_PORT)?;
    let mut agent = Agent::start("tcp-metrics", &t.config(&[], ""))?;
    wait_enrolled(&mut agent, "client")?;
    wait_enrolled(&mut agent, "server")?;
    for _ in 0..N {
        let (code, _) = t.client.curl(&t.url())?;
        ensure!(code == 200, "status {code}");
    }
    // Metrics are recorded before the connection's log line is written.
    let logs = wait_connections(&agent, "outbound", N)?;
    for e in &logs {
        ensure!(field(e, "path") == "local", "{e}");
    }
    let bytes = log_bytes(&logs);
    ensure!(bytes.0 > 0.0 && bytes.1 > 0.0, "no bytes logged: {logs:?}");

    let s = scrape(agent.metrics_addr()?, Format::Prometheus)?;
    ensure!(
        s.content_type == "text/plain; version=0.0.4; charset=utf-8",
        "content type {}",
        s.content_type
    );
    for family in [
        "istio_tcp_connections_opened",
        "istio_tcp_connections_closed",
        "istio_tcp_sent_bytes",
        "istio_tcp_received_bytes",
    ] {
        ensure!(
            s.family_type(family) == Some("counter"),
            "{family}: {:?}",
            s.families
        );
    }
    // One handover between two pods of the node: both sides are this agent's to report.
    for reporter in ["source", "destination"] {
        let expected = istio_labels(
            reporter,
            ("client", FRONTEND),
            ("server", BACKEND),
            "unknown",
            "tcp",
            "none",
            &[],
        );
        check_tcp(&s, reporter, &expected, N, bytes)?;
    }
    ensure!(
        s.matching("istio_tcp_connections_opened_total", &[]).len() == 2,
        "unexpected series:\n{}",
        s.text
    );
    Ok(())
}

#[test]
fn http_request_metrics_by_status_code_in_both_formats() -> anyhow::Result<()> {
    const PATHS: [&str; 6] = ["/", "/a", "/status/404", "/b/c", "/status/404", "/"];
    let not_found = PATHS
        .iter()
        .filter(|p| p.starts_with("/status/404"))
        .count();
    let k = PATHS.len();
    let mut node = Node::new()?;
    let client = node.add_pod("client")?;
    let backend = node.add_pod("backend")?;
    let vip = Ipv4Addr::new(node.subnet[0], node.subnet[1], node.subnet[2], 200);
    let _backend = http_backend(&backend, "backend")?;
    let mut config = config_doc(
        &node.id,
        &[
            client.config_entry("shop", "frontend", true),
            backend.config_entry("shop", "backend", true),
        ],
    );
    config.push_str(&format!(
        "services:\n  - name: backend\n    namespace: shop\n    vips: [{vip}]\n    selector: {{app: backend}}\n    ports: [{{name: http, port: 80, targetPort: {APP_PORT}, appProtocol: http}}]\n"
    ));
    let mut agent = Agent::start("http-metrics", &config)?;
    wait_enrolled(&mut agent, "client")?;
    wait_enrolled(&mut agent, "backend")?;
    for path in PATHS {
        let (code, _) = client.curl(&format!("http://{vip}{path}"))?;
        let expected = if path.starts_with("/status/404") {
            404
        } else {
            200
        };
        ensure!(code == expected, "{path}: status {code}");
    }
    wait_until(&format!("{k} request logs"), AGENT_DEADLINE, || {
        (agent.count_events(|e| message(e) == "http request") >= k).then_some(())
    })
    .with_context(|| agent.log_text())?;

    let service = "backend.shop.svc.cluster.local";
    for format in [Format::Prometheus, Format::OpenMetrics] {
        let s = scrape(agent.metrics_addr()?, format)?;
        let (requests_family, content_type) = match format {
            Format::Prometheus => (
                "istio_requests_total",
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            Format::OpenMetrics => (
                "istio_requests",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
        };
        ensure!(
            s.content_type == content_type,
            "{format:?}: content type {}",
            s.content_type
        );
        if format == Format::OpenMetrics {
            ensure!(
                s.family_type(requests_family) == Some("counter"),
                "{format:?}: {:?}",
                s.families
            );
        } else {
            // The classic parser names counter families with or without `_total`, depending
            // on its version.
            ensure!(
                [requests_family, "istio_requests"]
                    .iter()
                    .any(|f| s.family_type(f) == Some("counter")),
                "{format:?}: {:?}",
                s.families
            );
        }
        ensure!(
            s.family_type("istio_request_duration_milliseconds") == Some("histogram"),
            "{format:?}: {:?}",
            s.families
        );
        // The source reports every request; the destination too, as this agent delivered
        // them to a pod of its own node.
        for reporter in ["source", "destination"] {
            for (code, n) in [("200", k - not_found), ("404", not_found)] {
                let sample = s.one(
                    "istio_requests_total",
                    &[("reporter", reporter), ("response_code", code)],
                )?;
                let expected = istio_labels(
                    reporter,
                    ("client", FRONTEND),
                    ("backend", BACKEND),
                    service,
                    "http",
                    "none",
                    &[("response_code", code)],
                );
                ensure!(
                    sample.labels == expected,
                    "{format:?} istio_requests_total labels:\n  got      {:?}\n  expected {expected:?}",
                    sample.labels
                );
                ensure!(
                    sample.value == n as f64,
                    "{format:?} {reporter} {code}: {} requests, expected {n}",
                    sample.value
                );
            }
            let with = [("reporter", reporter)];
            ensure!(
                s.matching("istio_requests_total", &with).len() == 2,
                "{format:?}: unexpected series\n{}",
                s.text
            );
            let count = s.sum("istio_request_duration_milliseconds_count", &with);
            ensure!(count == k as f64, "{format:?} {reporter}: _count {count}");
            let inf = s.sum(
                "istio_request_duration_milliseconds_bucket",
                &[("reporter", reporter), ("le", "+Inf")],
            );
            ensure!(inf == k as f64, "{format:?} {reporter}: +Inf bucket {inf}");
            // Istio's 19 duration buckets plus +Inf, per series.
            let buckets = s
                .matching(
                    "istio_request_duration_milliseconds_bucket",
                    &[("reporter", reporter), ("response_code", "200")],
                )
                .len();
            ensure!(buckets == 20, "{format:?}: {buckets} buckets");
            let sizes = s.sum("istio_response_bytes_count", &with);
            ensure!(
                sizes == k as f64,
                "{format:?} {reporter}: response sizes {sizes}"
            );
        }
    }
    Ok(())
}

struct TwoNodes {
    n1: Node,
    n2: Node,
    client: Pod,
    server: Pod,
    fleet_ca: PathBuf,
}

fn two_nodes(name: &str) -> anyhow::Result<TwoNodes> {
    let mut n1 = Node::new()?;
    let mut n2 = Node::new()?;
    n1.link(&n2)?;
    let client = n1.add_pod("client")?;
    let server = n2.add_pod("server")?;
    let fleet_ca =
        std::env::temp_dir().join(format!("trellis-{}-fleet-{name}", std::process::id()));
    std::fs::create_dir_all(&fleet_ca)?;
    Ok(TwoNodes {
        n1,
        n2,
        client,
        server,
        fleet_ca,
    })
}

#[test]
fn cross_node_tcp_is_reported_by_each_side_as_mutual_tls() -> anyhow::Result<()> {
    const N: usize = 3;
    let t = two_nodes("telemetry")?;
    let _server = http_server(&t.server, APP_PORT)?;
    let c1 = format!(
        "node: {}\npods:\n{}{}",
        t.n1.id,
        t.client.config_entry("shop", "frontend", true),
        t.server.remote_config_entry("shop", "backend", &t.n2)
    );
    let c2 = format!(
        "node: {}\npods:\n{}{}",
        t.n2.id,
        t.server.config_entry("shop", "backend", true),
        t.client.remote_config_entry("shop", "frontend", &t.n1)
    );
    let a1 = Agent::start_with_state_dir(&format!("{}-n1", t.n1.id), &c1, Some(&t.fleet_ca))?;
    let a2 = Agent::start_with_state_dir(&format!("{}-n2", t.n2.id), &c2, Some(&t.fleet_ca))?;
    let url = format!("http://{}:{APP_PORT}/", t.server.ip);
    for _ in 0..N {
        let (code, _) = t.client.curl(&url)?;
        ensure!(code == 200, "status {code}");
    }
    let out = wait_connections(&a1, "outbound", N)?;
    let inb = wait_connections(&a2, "inbound", N)?;
    for e in out.iter().chain(&inb) {
        ensure!(field(e, "path") == "hbone", "{e}");
    }
    let (b1, b2) = (log_bytes(&out), log_bytes(&inb));
    ensure!(
        b1 == b2,
        "the two sides relayed different byte counts: {b1:?} {b2:?}"
    );

    let s1 = scrape(a1.metrics_addr()?, Format::Prometheus)?;
    let s2 = scrape(a2.metrics_addr()?, Format::Prometheus)?;
    let expected = |reporter| {
        istio_labels(
            reporter,
            ("client", FRONTEND),
            ("server", BACKEND),
            "unknown",
            "tcp",
            "mutual_tls",
            &[],
        )
    };
    check_tcp(&s1, "source", &expected("source"), N, b1)?;
    check_tcp(&s2, "destination", &expected("destination"), N, b2)?;
    // Each side reports only its own half.
    ensure!(
        s1.matching(
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination")]
        )
        .is_empty(),
        "node 1 reported as destination:\n{}",
        s1.text
    );
    ensure!(
        s2.matching(
            "istio_tcp_connections_opened_total",
            &[("reporter", "source")]
        )
        .is_empty(),
        "node 2 reported as source:\n{}",
        s2.text
    );
    Ok(())
}

#[test]
fn agent_health_metrics_follow_enrolment_reloads_policy_and_traffic() -> anyhow::Result<()> {
    let mut t = two_pods()?;
    let idle = t.node.add_pod("idle")?;
    let _server = http_server(&t.server, APP_PORT)?;
    let idle_off = idle.config_entry("shop", "idle", false);
    let mut agent = Agent::start("health", &t.config(&[idle_off], ""))?;
    wait_enrolled(&mut agent, "client")?;
    wait_enrolled(&mut agent, "server")?;
    let metrics = agent.metrics_addr()?;
    let idle_id = "spiffe://cluster.local/ns/shop/sa/idle";

    let s = scrape(metrics, Format::Prometheus)?;
    ensure!(s.value("trellis_enrolled_pods", &[])? == 2.0, "{}", s.text);
    ensure!(
        s.value("trellis_ebpf_links_attached", &[])? > 0.0,
        "{}",
        s.text
    );
    for result in ["accepted", "rejected"] {
        ensure!(
            s.value("trellis_config_reloads_total", &[("result", result)])? == 0.0,
            "{}",
            s.text
        );
    }
    ensure!(
        s.value("trellis_certificates_held", &[])? == 2.0,
        "{}",
        s.text
    );
    let expiries = s.matching("trellis_certificate_expiry_seconds", &[]);
    let mut identities: Vec<&str> = expiries
        .iter()
        .map(|e| e.labels.get("identity").map(String::as_str).unwrap_or(""))
        .collect();
    identities.sort_unstable();
    ensure!(identities == [BACKEND, FRONTEND], "{}", s.text);
    for e in &expiries {
        ensure!(
            e.value > 86_000.0 && e.value <= 86_400.0,
            "24 h certificates: {e:?}"
        );
    }

    // Traffic: captured by the eBPF programs, allowed at L4.
    let (code, _) = t.client.curl(&t.url())?;
    ensure!(code == 200, "status {code}");
    wait_connections(&agent, "outbound", 1)?;
    let s = scrape(metrics, Format::Prometheus)?;
    ensure!(
        s.value(
            "trellis_ebpf_events_total",
            &[("event", "outbound_redirected")]
        )? > 0.0,
        "{}",
        s.text
    );
    let decisions = |s: &Scrape, action| {
        s.value(
            "trellis_policy_decisions_total",
            &[("action", action), ("layer", "l4")],
        )
    };
    ensure!(decisions(&s, "allow")? == 1.0, "{}", s.text);
    ensure!(decisions(&s, "deny")? == 0.0, "{}", s.text);

    // A good config: the idle pod enrolled, a policy denying the client.
    let deny = "authorizationPolicies:\n  - name: deny-shop\n    namespace: shop\n    selector: {matchLabels: {app: server}}\n    action: DENY\n    rules:\n      - from: [{source: {namespaces: [\"shop\"]}}]\n        to: [{operation: {ports: [\"8080\"]}}]\n";
    let idle_on = idle.config_entry("shop", "idle", true);
    agent.write_config(&t.config(&[idle_on], deny))?;
    agent.wait_for_event("config applied", |e| message(e) == "config applied")?;
    let s = scrape(metrics, Format::Prometheus)?;
    ensure!(
        s.value("trellis_config_reloads_total", &[("result", "accepted")])? == 1.0,
        "{}",
        s.text
    );
    ensure!(
        s.value("trellis_config_reloads_total", &[("result", "rejected")])? == 0.0,
        "{}",
        s.text
    );
    ensure!(s.value("trellis_enrolled_pods", &[])? == 3.0, "{}", s.text);
    ensure!(
        s.value("trellis_certificates_held", &[])? == 3.0,
        "{}",
        s.text
    );
    ensure!(
        s.one(
            "trellis_certificate_expiry_seconds",
            &[("identity", idle_id)]
        )
        .is_ok(),
        "{}",
        s.text
    );

    ensure!(
        curl_fails(&t.client, &t.url())?,
        "the denied connection went through"
    );
    agent.wait_for_event("the denial", |e| message(e) == "connection denied")?;
    let s = scrape(metrics, Format::Prometheus)?;
    ensure!(decisions(&s, "deny")? == 1.0, "{}", s.text);
    ensure!(decisions(&s, "allow")? == 1.0, "{}", s.text);

    // A bad config is rejected and counted; the good one stays.
    agent.write_config("node: [unclosed\n")?;
    agent.wait_for_event("config rejected", |e| {
        message(e).starts_with("config rejected")
    })?;
    let s = scrape(metrics, Format::Prometheus)?;
    ensure!(
        s.value("trellis_config_reloads_total", &[("result", "rejected")])? == 1.0,
        "{}",
        s.text
    );
    ensure!(
        s.value("trellis_config_reloads_total", &[("result", "accepted")])? == 1.0,
        "{}",
        s.text
    );
    ensure!(s.value("trellis_enrolled_pods", &[])? == 3.0, "{}", s.text);
    Ok(())
}

#[test]
fn admin_api_and_status_cli_show_the_live_state() -> anyhow::Result<()> {
    let mut t = two_pods()?;
    let idle = t.node.add_pod("idle")?;
    // Passes validation (a regular file) but is no network namespace: enrolment fails.
    let broken = t.node.add_pod("broken")?;
    let not_netns =
        TempFile(std::env::temp_dir().join(format!("trellis-notnetns-{}", std::process::id())));
    std::fs::write(&not_netns.0, "not a namespace")?;
    let broken_entry = format!(
        "  - {{name: broken, namespace: shop, serviceAccount: broken, ip: {}, netns: {}, cgroup: {}, labels: {{app: broken}}, enrolled: true}}\n",
        broken.ip,
        not_netns.0.display(),
        broken.cgroup.display()
    );
    let far_ip = Ipv4Addr::new(t.node.subnet[0], t.node.subnet[1], t.node.subnet[2], 250);
    let far = format!(
        "  - {{name: far, namespace: shop, serviceAccount: far, ip: {far_ip}, node: elsewhere, enrolled: true}}\n"
    );
    let vip = Ipv4Addr::new(t.node.subnet[0], t.node.subnet[1], t.node.subnet[2], 200);
    let tail = format!(
        "authorizationPolicies:\n  - name: allow-frontend\n    namespace: shop\n    selector: {{matchLabels: {{app: server}}}}\n    action: ALLOW\n    rules:\n      - from: [{{source: {{principals: [\"cluster.local/ns/shop/sa/frontend\"]}}}}]\n        to: [{{operation: {{ports: [\"{APP_PORT}\"]}}}}]\nservices:\n  - name: backend\n    namespace: shop\n    vips: [{vip}]\n    selector: {{app: server}}\n    ports: [{{name: http, port: 80, targetPort: {APP_PORT}, appProtocol: http}}]\n"
    );
    let idle_entry = idle.config_entry("shop", "idle", false);
    let config = t.config(&[idle_entry.clone(), broken_entry, far.clone()], &tail);
    let mut agent = Agent::start("admin", &config)?;
    wait_enrolled(&mut agent, "client")?;
    wait_enrolled(&mut agent, "server")?;
    let admin = agent.admin_addr()?;

    let (status, _, body) = http_get(admin, "/healthz")?;
    ensure!(
        status == 200 && body == "ok\n",
        "/healthz: {status} {body:?}"
    );
    let (status, _, reason) = http_get(admin, "/ready")?;
    ensure!(
        status == 503 && reason.contains("shop/broken"),
        "/ready with a pod that failed to enrol: {status} {reason:?}"
    );
    let reason = reason.trim().to_string();

    // /config_dump: the snapshot the file described.
    let dump = get_json(admin, "/config_dump")?;
    ensure!(
        dump.is_object(),
        "/config_dump answered {dump} instead of the snapshot"
    );
    ensure!(dump["node"] == json!(t.node.id), "{dump:#}");
    ensure!(dump["trust_domain"] == "cluster.local", "{dump:#}");
    let dumped_pods = dump_pods(&dump)?;
    let expected_pods: BTreeMap<String, (String, bool)> = [
        ("client", t.client.ip, true),
        ("server", t.server.ip, true),
        ("idle", idle.ip, false),
        ("broken", broken.ip, true),
        ("far", far_ip, true),
    ]
    .into_iter()
    .map(|(name, ip, enrolled)| (name.to_string(), (ip.to_string(), enrolled)))
    .collect();
    ensure!(
        dumped_pods == expected_pods,
        "config_dump pods:\n  got      {dumped_pods:?}\n  expected {expected_pods:?}"
    );
    let policies = dump["policies"].as_array().context("policies")?;
    ensure!(policies.len() == 1, "{dump:#}");
    let p = &policies[0];
    ensure!(
        p["name"] == "allow-frontend"
            && p["namespace"] == "shop"
            && p["action"] == "ALLOW"
            && p["selector"] == json!({"app": "server"}),
        "{p:#}"
    );
    ensure!(
        p["rules"][0]["to"][0]["ports"] == json!([APP_PORT]),
        "{p:#}"
    );
    ensure!(
        p["rules"][0]["from"][0]["principals"]
            .to_string()
            .contains("cluster.local/ns/shop/sa/frontend"),
        "{p:#}"
    );
    let services = dump["services"].as_array().context("services")?;
    ensure!(services.len() == 1, "{dump:#}");
    let svc = &services[0];
    ensure!(
        svc["name"] == "backend"
            && svc["namespace"] == "shop"
            && svc["vips"] == json!([vip.to_string()])
            && svc["selector"] == json!({"app": "server"}),
        "{svc:#}"
    );
    ensure!(
        svc["ports"]
            == json!([{"name": "http", "port": 80, "target_port": APP_PORT, "protocol": "http"}]),
        "{svc:#}"
    );

    // /pods: this node's pods only, with their enrolment state.
    let pods = get_json(admin, "/pods")?;
    let by_name = pods_by_name(&pods)?;
    ensure!(
        by_name.keys().map(String::as_str).collect::<Vec<_>>()
            == ["broken", "client", "idle", "server"],
        "{pods:#}"
    );
    for (name, sa, ip, enrolled, state) in [
        ("client", "frontend", t.client.ip, true, "enrolled"),
        ("server", "backend", t.server.ip, true, "enrolled"),
        ("idle", "idle", idle.ip, false, "not enrolled"),
        ("broken", "broken", broken.ip, false, "failed: "),
    ] {
        let p = &by_name[name];
        ensure!(
            p["namespace"] == "shop"
                && p["identity"] == format!("spiffe://cluster.local/ns/shop/sa/{sa}")
                && p["ip"] == ip.to_string()
                && p["node"] == json!(t.node.id)
                && p["enrolled"] == enrolled
                && p["connections_active"] == 0,
            "{p:#}"
        );
        let got = p["state"].as_str().unwrap_or("");
        ensure!(
            if state.ends_with(' ') {
                got.starts_with(state) && got.len() > state.len()
            } else {
                got == state
            },
            "{name}: state {got:?}"
        );
    }

    // /certs: one per identity enrolled here, valid now for 24 h.
    let certs = get_json(admin, "/certs")?;
    let certs = certs.as_array().context("certs")?;
    let ids: Vec<&str> = certs
        .iter()
        .map(|c| c["identity"].as_str().unwrap_or(""))
        .collect();
    ensure!(ids == [BACKEND, FRONTEND], "{certs:?}");
    for c in certs {
        let expiry = c["seconds_to_expiry"]
            .as_f64()
            .context("seconds_to_expiry")?;
        ensure!(expiry > 86_000.0 && expiry <= 86_400.0, "{c}");
        for key in ["not_before", "not_after"] {
            let t = c[key].as_str().unwrap_or("");
            ensure!(
                t.len() == 20 && t.ends_with('Z') && t.as_bytes()[10] == b'T',
                "{key} {t:?} is not RFC 3339"
            );
        }
    }

    // `mesh-agent status --output json` says what /pods and /ready say.
    let report: Value = serde_json::from_str(&status_cli(admin, &["--output", "json"])?)?;
    ensure!(
        report["ready"] == false && report["reason"] == json!(reason),
        "{report:#}"
    );
    let mut reported = report["pods"].as_array().context("pods")?.clone();
    for p in &mut reported {
        let expires = p
            .as_object_mut()
            .context("pod")?
            .remove("cert_expires_in_s")
            .context("cert_expires_in_s")?;
        let name = p["pod"].as_str().unwrap_or("");
        if matches!(name, "client" | "server") {
            ensure!(
                expires.as_i64().is_some_and(|s| s > 86_000 && s <= 86_400),
                "{name}: {expires}"
            );
        } else {
            ensure!(expires.is_null(), "{name}: {expires}");
        }
    }
    let pods_now = get_json(admin, "/pods")?;
    ensure!(
        Value::Array(reported) == pods_now,
        "status --output json disagrees with /pods:\n{report:#}\n{pods_now:#}"
    );

    // The table lists every pod with its identity.
    let table = status_cli(admin, &[])?;
    let mut lines = table.lines();
    let summary = lines.next().unwrap_or("");
    ensure!(
        summary.starts_with("agent NOT READY") && summary.contains("2 of 4 pods enrolled"),
        "{table}"
    );
    for (name, sa) in [
        ("client", "frontend"),
        ("server", "backend"),
        ("idle", "idle"),
        ("broken", "broken"),
    ] {
        let identity = format!("spiffe://cluster.local/ns/shop/sa/{sa}");
        ensure!(
            table.lines().any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.first() == Some(&name) && cols.contains(&identity.as_str())
            }),
            "no row for {name} with {identity}:\n{table}"
        );
    }
    ensure!(
        !table.contains("far"),
        "a pod of another node listed:\n{table}"
    );

    // Without the broken pod the agent becomes ready.
    agent.write_config(&t.config(&[idle_entry, far], &tail))?;
    wait_until("/ready to answer 200", AGENT_DEADLINE, || {
        http_get(admin, "/ready")
            .ok()
            .filter(|(status, _, _)| *status == 200)
    })
    .with_context(|| agent.log_text())?;
    let (_, _, body) = http_get(admin, "/ready")?;
    ensure!(body == "ready\n", "{body:?}");
    let report: Value = serde_json::from_str(&status_cli(admin, &["--output", "json"])?)?;
    ensure!(
        report["ready"] == true && report["reason"].is_null(),
        "{report:#}"
    );
    ensure!(
        pods_by_name(&get_json(admin, "/pods")?)?
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            == ["client", "idle", "server"],
        "broken pod still listed"
    );
    ensure!(
        status_cli(admin, &[])?.starts_with("agent ready: 2 of 3 pods enrolled"),
        "table summary"
    );
    Ok(())
}

/// `/config_dump`'s pods as name -> (ip, enrolled), whether the snapshot lists them as an
/// array or a map.
fn dump_pods(dump: &Value) -> anyhow::Result<BTreeMap<String, (String, bool)>> {
    let pods: Vec<&Value> = match &dump["pods"] {
        Value::Array(list) => list.iter().collect(),
        Value::Object(map) => map.values().collect(),
        other => bail!("config_dump has no pods: {other}\n{dump:#}"),
    };
    pods.into_iter()
        .map(|w| {
            let name = w["key"]["name"]
                .as_str()
                .or_else(|| w["name"].as_str())
                .with_context(|| format!("pod without a name: {w}"))?;
            Ok((
                name.to_string(),
                (
                    w["ip"].as_str().unwrap_or("").to_string(),
                    w["enrolled"].as_bool().context("enrolled")?,
                ),
            ))
        })
        .collect()
}

fn pods_by_name(pods: &Value) -> anyhow::Result<BTreeMap<String, Value>> {
    pods.as_array()
        .context("/pods is not an array")?
        .iter()
        .map(|p| {
            Ok((
                p["pod"].as_str().context("pod name")?.to_string(),
                p.clone(),
            ))
        })
        .collect()
}

#[test]
fn access_logs_can_be_switched_off_while_metrics_keep_counting() -> anyhow::Result<()> {
    const N: usize = 2;
    let t = two_pods()?;
    let _server = http_server(&t.server, APP_PORT)?;
    let mut agent = Agent::start_with_env(
        "quiet",
        &t.config(&[], ""),
        None,
        &[("RUST_LOG", "info,access=off")],
    )?;
    wait_enrolled(&mut agent, "client")?;
    wait_enrolled(&mut agent, "server")?;
    for _ in 0..N {
        let (code, _) = t.client.curl(&t.url())?;
        ensure!(code == 200, "status {code}");
    }
    // The metrics are written together with the (filtered) log line: once they count every
    // connection, any log line would be in the file too.
    let metrics = agent.metrics_addr()?;
    wait_until("the connections to be counted", AGENT_DEADLINE, || {
        let s = scrape(metrics, Format::Prometheus).ok()?;
        (s.sum(
            "istio_tcp_connections_closed_total",
            &[("reporter", "source")],
        ) == N as f64)
            .then_some(())
    })?;
    // Barrier: a line logged after the connections' own.
    agent.write_config(&t.config(&[], "# touched\n"))?;
    agent.wait_for_event("config applied", |e| message(e) == "config applied")?;
    let events = agent.events();
    let access: Vec<&Value> = events
        .iter()
        .filter(|e| matches!(message(e), "connection closed" | "http request"))
        .collect();
    ensure!(
        access.is_empty(),
        "access log lines with access=off: {access:?}"
    );
    // Everything else still logs.
    ensure!(
        events.iter().any(|e| message(e) == "pod enrolled"),
        "{}",
        agent.log_text()
    );
    Ok(())
}
