//! `mesh-agent status`: what the local agent is doing, read from its admin API.
//!
//! Table output: a readiness line, then one row per pod
//! (POD, NAMESPACE, IDENTITY, IP, NODE, ENROLLED, STATE, CONNS, CERT EXPIRES IN).
//! JSON output (`--output json`): `{"ready", "reason", "pods": [<as /pods> + "cert_expires_in_s"]}`,
//! `reason` being null when ready and `cert_expires_in_s` null when the node holds no
//! certificate for the pod's identity.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// Per request to the admin API, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How `status` prints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    #[default]
    Table,
    /// One JSON document for scripts.
    Json,
}

/// Queries the agent's admin API at `admin_addr` and prints its status to stdout.
pub async fn run(admin_addr: SocketAddr, output: Output) -> anyhow::Result<()> {
    let text = render(admin_addr, output).await?;
    print!("{text}");
    Ok(())
}

/// What [`run`] prints.
pub async fn render(admin_addr: SocketAddr, output: Output) -> anyhow::Result<String> {
    let report = fetch(admin_addr).await?;
    Ok(match output {
        Output::Table => format!(
            "{}\n\n{}",
            summary(&report),
            render_table(&report.pods, &report.certs)
        ),
        Output::Json => {
            let mut text = serde_json::to_string_pretty(&json_report(&report))
                .context("encoding the status as JSON")?;
            text.push('\n');
            text
        }
    })
}

struct Report {
    ready: bool,
    reason: Option<String>,
    pods: Value,
    certs: Value,
}

async fn fetch(addr: SocketAddr) -> anyhow::Result<Report> {
    let unreachable =
        |e: anyhow::Error| anyhow!("is the agent running? admin API at {addr}: {e:#}");
    let (status, body) = get(addr, "/ready").await.map_err(unreachable)?;
    let (ready, reason) = match status {
        StatusCode::OK => (true, None),
        StatusCode::SERVICE_UNAVAILABLE => (
            false,
            Some(String::from_utf8_lossy(&body).trim().to_string()),
        ),
        other => bail!("admin API at {addr}: GET /ready answered {other}"),
    };
    let pods = get_json(addr, "/pods").await.map_err(unreachable)?;
    let certs = get_json(addr, "/certs").await.map_err(unreachable)?;
    Ok(Report {
        ready,
        reason,
        pods,
        certs,
    })
}

async fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let (status, body) = get(addr, path).await?;
    if status != StatusCode::OK {
        bail!(
            "GET {path} answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    serde_json::from_slice(&body).with_context(|| format!("GET {path}: the answer is not JSON"))
}

/// One GET over a fresh HTTP/1.1 connection.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(StatusCode, Bytes)> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .context("connecting")?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake")?;
        let driver = tokio::spawn(conn);
        let req = Request::get(path)
            .header(header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .context("building the request")?;
        let res = sender
            .send_request(req)
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = res.status();
        let body = res
            .into_body()
            .collect()
            .await
            .with_context(|| format!("GET {path}: reading the body"))?
            .to_bytes();
        driver.abort();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow!("GET {path}: no answer within {REQUEST_TIMEOUT:?}"))?
}

/// `seconds_to_expiry` of the certificate held for `identity`, if any.
fn cert_expiry(certs: &Value, identity: &str) -> Option<f64> {
    certs
        .as_array()?
        .iter()
        .find(|c| c.get("identity").and_then(Value::as_str) == Some(identity))?
        .get("seconds_to_expiry")?
        .as_f64()
}

fn pods_of(pods: &Value) -> &[Value] {
    pods.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn field(pod: &Value, name: &str) -> String {
    match pod.get(name) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) if s.is_empty() => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => if *b { "yes" } else { "no" }.into(),
        Some(other) => other.to_string(),
    }
}

/// A duration until expiry, coarse: `1d23h`, `23h59m`, `59m30s`, `42s`, or `expired`.
pub fn format_expiry(seconds: f64) -> String {
    if !seconds.is_finite() || seconds <= 0.0 {
        return "expired".into();
    }
    let s = seconds.floor() as u64;
    let (d, h, m) = (s / 86_400, s % 86_400 / 3_600, s % 3_600 / 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{}s", s % 60)
    } else {
        format!("{s}s")
    }
}

fn summary(report: &Report) -> String {
    let pods = pods_of(&report.pods);
    let enrolled = pods
        .iter()
        .filter(|p| p.get("enrolled").and_then(Value::as_bool) == Some(true))
        .count();
    let certs = report.certs.as_array().map_or(0, Vec::len);
    let counts = format!(
        "{enrolled} of {} pods enrolled, {certs} certificate{} held",
        pods.len(),
        if certs == 1 { "" } else { "s" }
    );
    match (&report.ready, &report.reason) {
        (true, _) => format!("agent ready: {counts}"),
        (false, Some(reason)) if !reason.is_empty() => {
            format!("agent NOT READY ({reason}): {counts}")
        }
        (false, _) => format!("agent NOT READY: {counts}"),
    }
}

/// The pods of `/pods` as an aligned table, with each pod's certificate expiry from `/certs`.
pub fn render_table(pods: &Value, certs: &Value) -> String {
    const HEADER: [&str; 9] = [
        "POD",
        "NAMESPACE",
        "IDENTITY",
        "IP",
        "NODE",
        "ENROLLED",
        "STATE",
        "CONNS",
        "CERT EXPIRES IN",
    ];
    let mut rows: Vec<Vec<String>> = vec![HEADER.iter().map(|h| h.to_string()).collect()];
    for pod in pods_of(pods) {
        let identity = pod.get("identity").and_then(Value::as_str).unwrap_or("");
        let expiry = cert_expiry(certs, identity).map_or_else(|| "-".to_string(), format_expiry);
        rows.push(vec![
            field(pod, "pod"),
            field(pod, "namespace"),
            field(pod, "identity"),
            field(pod, "ip"),
            field(pod, "node"),
            field(pod, "enrolled"),
            field(pod, "state"),
            field(pod, "connections_active"),
            expiry,
        ]);
    }
    let mut widths = [0usize; HEADER.len()];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            if i + 1 < row.len() {
                line.extend(std::iter::repeat_n(' ', widths[i] - cell.chars().count()));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn json_report(report: &Report) -> Value {
    let pods: Vec<Value> = pods_of(&report.pods)
        .iter()
        .map(|pod| {
            let mut pod = pod.clone();
            let identity = pod
                .get("identity")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let expires = cert_expiry(&report.certs, &identity).map(|s| s.floor() as i64);
            if let Value::Object(fields) = &mut pod {
                fields.insert("cert_expires_in_s".into(), json!(expires));
            }
            pod
        })
        .collect();
    json!({
        "ready": report.ready,
        "reason": report.reason,
        "pods": pods,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, atomic::Ordering};

    use super::*;
    use crate::admin::{self, AdminSource as _, tests::FakeSource};

    #[test]
    fn table_is_aligned() {
        let source = FakeSource::new(true);
        let table = render_table(&source.pods(), &source.certs());
        let expected = "\
POD       NAMESPACE  IDENTITY                                      IP         NODE    ENROLLED  STATE         CONNS  CERT EXPIRES IN
frontend  shop       spiffe://cluster.local/ns/shop/sa/frontend    10.61.0.2  node-1  yes       enrolled      3      23h59m
legacy    default    spiffe://cluster.local/ns/default/sa/default  10.61.0.9  node-1  no        not enrolled  0      -
";
        assert_eq!(table, expected, "\n{table}");
    }

    #[test]
    fn empty_and_odd_input() {
        assert_eq!(
            render_table(&json!([]), &json!([])),
            "POD  NAMESPACE  IDENTITY  IP  NODE  ENROLLED  STATE  CONNS  CERT EXPIRES IN\n"
        );
        // Missing fields show as "-", not a panic.
        let t = render_table(&json!([{"pod": "x"}]), &json!(null));
        assert!(t.lines().nth(1).unwrap().starts_with("x    -"), "{t}");
    }

    #[test]
    fn expiry_formatting() {
        assert_eq!(format_expiry(86_399.9), "23h59m");
        assert_eq!(format_expiry(2.0 * 86_400.0 + 3.0 * 3_600.0 + 5.0), "2d3h");
        assert_eq!(format_expiry(3_599.0), "59m59s");
        assert_eq!(format_expiry(42.5), "42s");
        assert_eq!(format_expiry(0.0), "expired");
        assert_eq!(format_expiry(-10.0), "expired");
    }

    fn serve(source: Arc<FakeSource>) -> admin::AdminHandle {
        let local = "127.0.0.1:0".parse().unwrap();
        admin::spawn(local, local, source).unwrap()
    }

    #[tokio::test]
    async fn status_against_the_admin_api() {
        let source = FakeSource::new(true);
        let h = serve(source.clone());
        let table = render(h.admin_addr, Output::Table).await.unwrap();
        let mut lines = table.lines();
        assert_eq!(
            lines.next(),
            Some("agent ready: 1 of 2 pods enrolled, 1 certificate held")
        );
        assert_eq!(lines.next(), Some(""));
        assert!(lines.next().unwrap().starts_with("POD "));
        assert!(table.contains("23h59m"));

        source.ready.store(false, Ordering::Relaxed);
        let text = render(h.admin_addr, Output::Json).await.unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["ready"], json!(false));
        assert_eq!(
            v["reason"],
            json!("certificate of shop/cart not loaded yet")
        );
        assert_eq!(v["pods"][0]["pod"], json!("frontend"));
        assert_eq!(v["pods"][0]["connections_active"], json!(3));
        assert_eq!(v["pods"][0]["cert_expires_in_s"], json!(86_370));
        assert_eq!(v["pods"][1]["cert_expires_in_s"], json!(null));

        let table = render(h.admin_addr, Output::Table).await.unwrap();
        assert!(
            table.starts_with(
                "agent NOT READY (certificate of shop/cart not loaded yet): 1 of 2 pods enrolled"
            ),
            "{table}"
        );
    }

    #[tokio::test]
    async fn unreachable_agent_is_explained() {
        // Bind then drop to get a port nobody listens on.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = render(addr, Output::Table).await.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "is the agent running? admin API at {addr}: connecting"
            )),
            "{err}"
        );
    }
}
