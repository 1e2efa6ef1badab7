//! End-to-end tests of the L7 proxy: real clients (curl, h2load, Python http.client and a
//! grpcio client) in pods calling a Service VIP, the agent routing and shaping each request,
//! real backends (`http-backend`, a grpcio server) in other pods.
//!
//! Need root and a BPF-capable kernel, like every end-to-end test; they fail, not skip,
//! without them.
use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context as _, ensure};
use mesh_tests::{
    Agent, Background, Node, Pod,
    agent::{field, message, number},
};
use serde_json::Value;

const HTTP_BACKEND: &str = env!("CARGO_BIN_EXE_http-backend");
const GRPC_ECHO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/grpc_echo.py");
const APP_PORT: u16 = 8080;
const GRPC_PORT: u16 = 9090;

/// A node with a client pod and backend pods, and a config builder for its agent.
struct Shop {
    node: Node,
    client: Pod,
    backends: Vec<(Pod, BTreeMap<&'static str, &'static str>)>,
    vip: Ipv4Addr,
}

impl Shop {
    fn new(backends: &[(&str, &[(&'static str, &'static str)])]) -> anyhow::Result<Self> {
        let mut node = Node::new()?;
        let client = node.add_pod("client")?;
        let mut pods = Vec::new();
        for (name, labels) in backends {
            pods.push((node.add_pod(name)?, labels.iter().copied().collect()));
        }
        // An address of the node's own subnet that no pod has: the Service VIP.
        let vip = Ipv4Addr::new(node.subnet[0], node.subnet[1], node.subnet[2], 200);
        Ok(Self {
            node,
            client,
            backends: pods,
            vip,
        })
    }

    /// The agent config: the pods (backends labelled as given), then `extra` YAML.
    fn config(&self, extra: &str) -> String {
        let mut doc = format!("node: {}\npods:\n", self.node.id);
        doc.push_str(&self.client.config_entry("shop", "frontend", true));
        for (pod, labels) in &self.backends {
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            doc.push_str(&format!(
                "  - {{name: {}, namespace: shop, serviceAccount: backend, ip: {}, netns: {}, cgroup: {}, labels: {{{}}}}}\n",
                pod.name,
                pod.ip,
                pod.netns_path.display(),
                pod.cgroup.display(),
                labels.join(", ")
            ));
        }
        doc.push_str(extra);
        doc
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.vip)
    }
}

fn backend(pod: &Pod, name: &str, extra: &[&str]) -> anyhow::Result<Background> {
    let mut cmd = pod.command(HTTP_BACKEND)?;
    cmd.args([&APP_PORT.to_string(), "--name", name])
        .args(extra);
    Background::spawn_ready(cmd, "listening")
}

/// One Service `name` selecting `selector` on port 80 -> 8080, plus `more` YAML inside it.
fn service(name: &str, vip: &str, selector: &str, more: &str) -> String {
    format!(
        "  - name: {name}\n    namespace: shop\n    vips: [{vip}]\n    selector: {{{selector}}}\n    ports: [{{name: http, port: 80, targetPort: {APP_PORT}, appProtocol: http}}]\n{more}"
    )
}

/// curl from `pod`: (status, headers+body text).
/// The body of `GET path` from `addr` (the agent's metrics endpoint, on the host).
fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream =
        std::net::TcpStream::connect(addr).with_context(|| format!("connecting {addr}"))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("no end of head")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    Ok(body.to_string())
}

/// The sum of `istio_requests_total` over the destination reporter's series with `code`.
fn destination_requests(metrics: &str, code: &str) -> f64 {
    let code = format!("response_code=\"{code}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter(|l| l.contains("reporter=\"destination\"") && l.contains(&code))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn curl(pod: &Pod, args: &[&str]) -> anyhow::Result<(u16, String)> {
    let out = pod
        .command("curl")?
        .args(["-sS", "--max-time", "20", "-i", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .context("running curl")?;
    ensure!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').context("no status")?;
    Ok((code.trim().parse()?, body.to_string()))
}

/// The JSON body http-backend answered with.
fn json_body(response: &str) -> anyhow::Result<Value> {
    let start = response
        .find('{')
        .with_context(|| format!("no JSON in {response:?}"))?;
    Ok(serde_json::from_str(&response[start..])?)
}

/// Runs `n` requests on keep-alive connections from `pod` with Python's http.client and
/// returns how often each (status, x-backend) pair was seen, plus the count of slow ones.
fn python_requests(
    pod: &Pod,
    url_host: Ipv4Addr,
    path: &str,
    n: usize,
    slow_ms: u64,
) -> anyhow::Result<Value> {
    let script = format!(
        r#"
import http.client, json, time
counts, slow, begin = {{}}, 0, time.time()
conn = http.client.HTTPConnection("{url_host}", 80, timeout=20)
for i in range({n}):
    t = time.time()
    conn.request("GET", "{path}")
    r = conn.getresponse()
    r.read()
    if (time.time() - t) * 1000 >= {slow_ms}:
        slow += 1
    key = "%d %s" % (r.status, r.getheader("x-backend", "-"))
    counts[key] = counts.get(key, 0) + 1
    if r.getheader("connection", "").lower() == "close":
        conn.close()
        conn = http.client.HTTPConnection("{url_host}", 80, timeout=20)
print(json.dumps({{"counts": counts, "slow": slow, "elapsed_s": time.time() - begin}}))
"#
    );
    let stdout = pod.python(&script)?;
    Ok(serde_json::from_str(&stdout)?)
}

fn count(v: &Value, key: &str) -> u64 {
    v["counts"][key].as_u64().unwrap_or(0)
}

fn is_http_log(e: &Value) -> bool {
    message(e) == "http request"
}

#[test]
fn header_and_path_routing_with_rewrite_and_header_filters() -> anyhow::Result<()> {
    let shop = Shop::new(&[
        ("v1", &[("app", "backend"), ("version", "v1")]),
        ("v2", &[("app", "backend"), ("version", "v2")]),
    ])?;
    let _v1 = backend(&shop.backends[0].0, "v1", &[])?;
    let _v2 = backend(&shop.backends[1].0, "v2", &[])?;
    let vip = shop.vip.to_string();
    let extra = format!(
        "services:\n{}{}{}httpRoutes:\n  - name: backend\n    namespace: shop\n    parentRefs: [{{name: backend, port: 80}}]\n    rules:\n      - matches: [{{headers: [{{name: x-user, value: alice}}]}}]\n        backendRefs: [{{name: backend-v2, port: 80}}]\n      - matches: [{{path: {{type: PathPrefix, value: /legacy}}}}]\n        filters:\n          - {{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /modern}}}}}}\n          - {{type: RequestHeaderModifier, requestHeaderModifier: {{add: [{{name: x-routed, value: legacy}}]}}}}\n          - {{type: ResponseHeaderModifier, responseHeaderModifier: {{set: [{{name: x-served-by, value: mesh}}]}}}}\n        backendRefs: [{{name: backend-v1, port: 80}}]\n      - matches: [{{path: {{type: Exact, value: /old}}}}]\n        filters: [{{type: RequestRedirect, requestRedirect: {{path: {{type: ReplaceFullPath, replaceFullPath: /new}}, statusCode: 301}}}}]\n      - backendRefs: [{{name: backend-v1, port: 80}}]\n",
        service("backend", &vip, "app: backend", ""),
        service(
            "backend-v1",
            &format!(
                "{}.{}.{}.201",
                shop.node.subnet[0], shop.node.subnet[1], shop.node.subnet[2]
            ),
            "version: v1",
            ""
        ),
        service(
            "backend-v2",
            &format!(
                "{}.{}.{}.202",
                shop.node.subnet[0], shop.node.subnet[1], shop.node.subnet[2]
            ),
            "version: v2",
            ""
        ),
    );
    let mut agent = Agent::start("routing", &shop.config(&extra))?;

    let (code, resp) = curl(
        &shop.client,
        &["-H", "x-user: alice", &shop.url("/anything")],
    )?;
    ensure!(
        code == 200 && json_body(&resp)?["name"] == "v2",
        "header match: {code} {resp}"
    );
    let (code, resp) = curl(&shop.client, &[&shop.url("/anything")])?;
    ensure!(
        code == 200 && json_body(&resp)?["name"] == "v1",
        "default: {code} {resp}"
    );
    let (code, resp) = curl(&shop.client, &[&shop.url("/legacy/items?id=7")])?;
    let body = json_body(&resp)?;
    ensure!(
        code == 200 && body["path"] == "/modern/items" && body["query"] == "id=7",
        "rewrite: {resp}"
    );
    ensure!(
        body["headers"]["x-routed"] == "legacy",
        "request header filter: {resp}"
    );
    ensure!(
        resp.to_ascii_lowercase().contains("x-served-by: mesh"),
        "response header filter: {resp}"
    );
    ensure!(
        body["headers"]["x-request-id"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "no request id: {resp}"
    );
    ensure!(
        body["headers"]["traceparent"]
            .as_str()
            .is_some_and(|s| s.starts_with("00-")),
        "no traceparent: {resp}"
    );
    // The app's own trace context is passed through.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (_, resp) = curl(
        &shop.client,
        &[
            "-H",
            &format!("traceparent: {tp}"),
            "-H",
            "x-request-id: my-id",
            &shop.url("/"),
        ],
    )?;
    let body = json_body(&resp)?;
    ensure!(
        body["headers"]["traceparent"] == tp && body["headers"]["x-request-id"] == "my-id",
        "{resp}"
    );
    let (code, resp) = curl(&shop.client, &[&shop.url("/old")])?;
    ensure!(
        code == 301
            && resp
                .to_ascii_lowercase()
                .contains(&format!("location: http://{}/new", shop.vip)),
        "redirect: {code} {resp}"
    );
    // The server saw the client pod's own address.
    let (_, resp) = curl(&shop.client, &[&shop.url("/")])?;
    let peer = json_body(&resp)?["peer"].as_str().unwrap_or("").to_string();
    ensure!(
        peer.starts_with(&format!("{}:", shop.client.ip)),
        "backend saw {peer}"
    );
    let log = agent.wait_for_event("an access log line", |e| {
        is_http_log(e) && field(e, "path") == "/legacy/items"
    })?;
    ensure!(
        number(&log, "status") == Some(200)
            && field(&log, "dst.service").starts_with("shop/backend:80"),
        "{log}"
    );
    Ok(())
}

#[test]
fn a_90_10_split_holds_over_a_thousand_requests() -> anyhow::Result<()> {
    let shop = Shop::new(&[
        ("v1", &[("app", "backend"), ("version", "v1")]),
        ("v2", &[("app", "backend"), ("version", "v2")]),
    ])?;
    let _v1 = backend(&shop.backends[0].0, "v1", &[])?;
    let _v2 = backend(&shop.backends[1].0, "v2", &[])?;
    let s = shop.node.subnet;
    let extra = format!(
        "services:\n{}{}{}httpRoutes:\n  - name: split\n    namespace: shop\n    parentRefs: [{{name: backend}}]\n    rules:\n      - backendRefs: [{{name: backend-v1, port: 80, weight: 90}}, {{name: backend-v2, port: 80, weight: 10}}]\n",
        service("backend", &shop.vip.to_string(), "app: backend", ""),
        service(
            "backend-v1",
            &format!("{}.{}.{}.201", s[0], s[1], s[2]),
            "version: v1",
            ""
        ),
        service(
            "backend-v2",
            &format!("{}.{}.{}.202", s[0], s[1], s[2]),
            "version: v2",
            ""
        ),
    );
    let _agent = Agent::start("split", &shop.config(&extra))?;
    let n = 1000;
    let result = python_requests(&shop.client, shop.vip, "/", n, u64::MAX / 2)?;
    let (v1, v2) = (count(&result, "200 v1"), count(&result, "200 v2"));
    ensure!(v1 + v2 == n as u64, "not every request succeeded: {result}");
    // Binomial(1000, 0.1): sd = 9.5; allow five of them.
    ensure!(
        (53..=147).contains(&v2),
        "v2 got {v2} of {n} (expected about 100): {result}"
    );
    Ok(())
}

#[test]
fn retries_turn_a_flaky_backend_into_success_and_timeouts_fire() -> anyhow::Result<()> {
    let shop = Shop::new(&[("flaky", &[("app", "backend")])])?;
    let _b = backend(&shop.backends[0].0, "flaky", &["--fail-first", "2"])?;
    let extra = format!(
        "services:\n{}httpRoutes:\n  - name: resilient\n    namespace: shop\n    parentRefs: [{{name: backend}}]\n    rules:\n      - matches: [{{path: {{type: PathPrefix, value: /delay}}}}]\n        timeouts: {{request: 300ms}}\n      - retry: {{attempts: 3, codes: [503], backoff: 10ms}}\n",
        service("backend", &shop.vip.to_string(), "app: backend", "")
    );
    let mut agent = Agent::start("retry", &shop.config(&extra))?;
    // A POST: its body is sent again with each attempt. (From a file: curl's arguments
    // show up in failure messages.)
    let body = std::env::temp_dir().join(format!("trellis-retry-body-{}", std::process::id()));
    std::fs::write(&body, "b".repeat(20_000))?;
    let result = curl(
        &shop.client,
        &[
            "--data-binary",
            &format!("@{}", body.display()),
            &shop.url("/work"),
        ],
    );
    let _ = std::fs::remove_file(&body);
    let (code, resp) = result?;
    let answer = json_body(&resp)?;
    ensure!(
        code == 200 && answer["name"] == "flaky" && answer["body_bytes"] == 20_000,
        "retry: {code} {resp}"
    );
    let log = agent.wait_for_event("the retried request's log", |e| {
        is_http_log(e) && field(e, "path") == "/work"
    })?;
    ensure!(
        number(&log, "attempts") == Some(3),
        "expected 3 attempts: {log}"
    );

    let (code, resp) = curl(&shop.client, &[&shop.url("/delay/3000")])?;
    ensure!(code == 504, "timeout: {code} {resp}");
    ensure!(
        resp.to_ascii_lowercase()
            .contains("x-trellis-response-flags: ut"),
        "no UT flag: {resp}"
    );
    Ok(())
}

/// Each retry takes one retry from the service's budget (10 a second over a 10 s window,
/// plus a fifth of the requests): 30 requests to an endpoint that always fails, with 3
/// retries each, fit in it, so every request makes all 4 attempts, on the fast path and on
/// the hyper path alike. (Charging a retry twice would run the budget dry halfway.)
#[test]
fn the_retry_budget_charges_each_retry_once() -> anyhow::Result<()> {
    let shop = Shop::new(&[("failing", &[("app", "backend")])])?;
    let _b = backend(&shop.backends[0].0, "failing", &["--fail-first", "100000"])?;
    let extra = format!(
        "services:\n{}httpRoutes:\n  - name: retried\n    namespace: shop\n    parentRefs: [{{name: backend}}]\n    rules:\n      - retry: {{attempts: 3, codes: [503], backoff: 1ms}}\n",
        service("backend", &shop.vip.to_string(), "app: backend", "")
    );
    let requests = 30;
    let mut served_before = 0;
    for (name, env) in [
        ("budget-fast", &[][..]),
        ("budget-hyper", &[("TRELLIS_HTTP1_FAST_PATH", "off")][..]),
    ] {
        let mut agent = Agent::start_with_env(name, &shop.config(&extra), None, env)?;
        let script = format!(
            r#"
import http.client, json
conn = http.client.HTTPConnection("{vip}", 80, timeout=20)
statuses = []
for i in range({requests}):
    conn.request("GET", "/always-failing")
    r = conn.getresponse()
    r.read()
    statuses.append(r.status)
conn.request("GET", "/count")
print(json.dumps({{"statuses": statuses, "served": int(conn.getresponse().read())}}))
"#,
            vip = shop.vip
        );
        let r: Value = serde_json::from_str(&shop.client.python(&script)?)?;
        let served = r["served"].as_u64().context("served")? - served_before;
        served_before += served;
        ensure!(
            r["statuses"]
                .as_array()
                .is_some_and(|s| s.len() == requests && s.iter().all(|status| status == 503)),
            "{name}: {r}"
        );
        ensure!(
            served == 4 * requests as u64,
            "{name}: the backend served {served} attempts for {requests} requests, expected {}",
            4 * requests
        );
        agent.terminate()?;
    }
    Ok(())
}

#[test]
fn fault_injection_delays_and_aborts_the_configured_share() -> anyhow::Result<()> {
    let shop = Shop::new(&[("b", &[("app", "backend")])])?;
    let _b = backend(&shop.backends[0].0, "b", &[])?;
    let extra = format!(
        "services:\n{}httpRoutes:\n  - name: faults\n    namespace: shop\n    parentRefs: [{{name: backend}}]\n    rules:\n      - fault: {{delay: {{fixedDelay: 50ms, percentage: 30}}, abort: {{httpStatus: 503, percentage: 20}}}}\n",
        service("backend", &shop.vip.to_string(), "app: backend", "")
    );
    let _agent = Agent::start("faults", &shop.config(&extra))?;
    let n = 400;
    let result = python_requests(&shop.client, shop.vip, "/", n, 50)?;
    let aborted = count(&result, "503 -");
    let ok = count(&result, "200 b");
    let slow = result["slow"].as_u64().unwrap_or(0);
    ensure!(aborted + ok == n as u64, "unexpected answers: {result}");
    // Binomial(400, 0.2): sd 8; Binomial(400, 0.3): sd 9.2; five sd each way.
    ensure!(
        (40..=120).contains(&aborted),
        "aborted {aborted} of {n}, expected about 80: {result}"
    );
    ensure!(
        (74..=166).contains(&slow),
        "delayed {slow} of {n}, expected about 120: {result}"
    );
    Ok(())
}

#[test]
fn outlier_detection_ejects_a_failing_endpoint() -> anyhow::Result<()> {
    let shop = Shop::new(&[
        ("good", &[("app", "backend")]),
        ("bad", &[("app", "backend")]),
    ])?;
    let _good = backend(&shop.backends[0].0, "good", &[])?;
    let _bad = backend(&shop.backends[1].0, "bad", &["--fail-rate", "100"])?;
    let extra = format!(
        "services:\n{}",
        service(
            "backend",
            &shop.vip.to_string(),
            "app: backend",
            "    trafficPolicy: {loadBalancer: ROUND_ROBIN, outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 60s, maxEjectionPercent: 50}}\n"
        )
    );
    let mut agent = Agent::start("outlier", &shop.config(&extra))?;
    let first = python_requests(&shop.client, shop.vip, "/", 40, u64::MAX / 2)?;
    ensure!(
        count(&first, "503 bad") <= 3,
        "the bad endpoint kept getting traffic: {first}"
    );
    agent.wait_for_event("the ejection log", |e| {
        message(e) == "endpoint ejected by outlier detection"
    })?;
    let after = python_requests(&shop.client, shop.vip, "/", 100, u64::MAX / 2)?;
    ensure!(
        count(&after, "200 good") == 100,
        "traffic still reached the ejected endpoint: {after}"
    );
    Ok(())
}

#[test]
fn a_rate_limit_answers_429_beyond_its_burst() -> anyhow::Result<()> {
    let shop = Shop::new(&[("b", &[("app", "backend")])])?;
    let _b = backend(&shop.backends[0].0, "b", &[])?;
    let extra = format!(
        "services:\n{}httpRoutes:\n  - name: limited\n    namespace: shop\n    parentRefs: [{{name: backend}}]\n    rules:\n      - rateLimit: {{requestsPerSecond: 1, burst: 5}}\n",
        service("backend", &shop.vip.to_string(), "app: backend", "")
    );
    let _agent = Agent::start("ratelimit", &shop.config(&extra))?;
    let result = python_requests(&shop.client, shop.vip, "/", 20, u64::MAX / 2)?;
    let (ok, limited) = (count(&result, "200 b"), count(&result, "429 -"));
    ensure!(ok + limited == 20, "{result}");
    // The burst of 5, plus one token a second while the loop ran (however slow the machine).
    let refilled = result["elapsed_s"].as_f64().unwrap_or(0.0).ceil() as u64 + 1;
    ensure!(ok >= 5 && ok <= 5 + refilled && limited >= 1, "{result}");
    Ok(())
}

#[test]
fn l7_authorization_denies_with_403_and_allows_the_rest() -> anyhow::Result<()> {
    let shop = Shop::new(&[("b", &[("app", "backend")])])?;
    let _b = backend(&shop.backends[0].0, "b", &[])?;
    let policy = "authorizationPolicies:\n  - name: no-deletes\n    namespace: shop\n    selector: {matchLabels: {app: backend}}\n    action: DENY\n    rules:\n      - to: [{operation: {methods: [DELETE]}}]\n  - name: reads\n    namespace: shop\n    selector: {matchLabels: {app: backend}}\n    action: ALLOW\n    rules:\n      - from: [{source: {principals: [\"cluster.local/ns/shop/sa/frontend\"]}}]\n        to: [{operation: {paths: [\"/api/*\"]}}]\n";
    let extra = format!(
        "services:\n{}{policy}",
        service("backend", &shop.vip.to_string(), "app: backend", "")
    );
    let mut agent = Agent::start("l7authz", &shop.config(&extra))?;
    let (code, _) = curl(&shop.client, &[&shop.url("/api/items")])?;
    ensure!(code == 200, "allowed request got {code}");
    let (code, _) = curl(&shop.client, &["-X", "DELETE", &shop.url("/api/items")])?;
    ensure!(code == 403, "DELETE got {code}");
    let (code, _) = curl(&shop.client, &[&shop.url("/admin")])?;
    ensure!(code == 403, "a path outside the ALLOW got {code}");
    let denial = agent.wait_for_event("the denial log", |e| {
        message(e) == "request denied" && field(e, "method") == "DELETE"
    })?;
    ensure!(field(&denial, "policy") == "shop/no-deletes", "{denial}");
    // Non-mesh clients hitting the pod directly are checked by the inbound side.
    Ok(())
}

#[test]
fn grpc_streaming_h2load_and_websocket_pass_through() -> anyhow::Result<()> {
    let shop = Shop::new(&[("b", &[("app", "backend")])])?;
    let _b = backend(&shop.backends[0].0, "b", &[])?;
    let mut grpc = shop.backends[0].0.command("python3")?;
    grpc.args([GRPC_ECHO, "server", &GRPC_PORT.to_string()]);
    let _grpc = Background::spawn_ready(grpc, "listening")?;
    let vip = shop.vip.to_string();
    let extra = format!(
        "services:\n{}  - name: echo\n    namespace: shop\n    vips: [{vip}]\n    selector: {{app: backend}}\n    ports: [{{name: grpc, port: {GRPC_PORT}, targetPort: {GRPC_PORT}, appProtocol: grpc}}]\n",
        service(
            "backend",
            &format!(
                "{}.{}.{}.201",
                shop.node.subnet[0], shop.node.subnet[1], shop.node.subnet[2]
            ),
            "app: backend",
            ""
        )
    );
    let mut agent = Agent::start("grpc", &shop.config(&extra))?;

    let out = shop
        .client
        .command("python3")?
        .args([
            GRPC_ECHO,
            "client",
            &format!("{vip}:{GRPC_PORT}"),
            "--messages",
            "25",
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "grpc client: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        reply["ok"] == true && reply["stream_replies"] == 25 && reply["trailer"] == "done",
        "{reply}"
    );
    agent.wait_for_event("a gRPC access log", |e| {
        is_http_log(e) && field(e, "path").starts_with("/echo.Echo/")
    })?;
    // The gRPC port's connection took the HTTP/2 fast path (no route retries there).
    let (fast, _) = agent.http2_connections()?;
    ensure!(fast >= 1, "HTTP/2 fast path connections: {fast}");

    let backend_vip = format!(
        "{}.{}.{}.201",
        shop.node.subnet[0], shop.node.subnet[1], shop.node.subnet[2]
    );
    let out = shop
        .client
        .command("h2load")?
        .args(["-n", "200", "-c", "4", &format!("http://{backend_vip}/")])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text.contains("200 succeeded, 0 failed"), "h2load: {text}");

    let (code, resp) = curl(
        &shop.client,
        &[
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: websocket",
            "-H",
            "Sec-WebSocket-Version: 13",
            "-H",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "--max-time",
            "3",
            &format!("http://{backend_vip}/ws"),
        ],
    )
    .or_else(|e| {
        if e.to_string().contains("timed out") {
            Ok((101, String::new()))
        } else {
            Err(e)
        }
    })?;
    ensure!(code == 101, "websocket upgrade: {code} {resp}");
    Ok(())
}

#[test]
fn malformed_http_gets_4xx_or_a_close_and_others_are_unaffected() -> anyhow::Result<()> {
    let shop = Shop::new(&[("b", &[("app", "backend")])])?;
    let _b = backend(&shop.backends[0].0, "b", &[])?;
    let extra = format!(
        "services:\n{}",
        service("backend", &shop.vip.to_string(), "app: backend", "")
    );
    let _agent = Agent::start("badhttp", &shop.config(&extra))?;
    let script = format!(
        r#"
import socket, time, json
def exchange(raw, wait=5):
    s = socket.create_connection(("{vip}", 80), timeout=wait)
    s.sendall(raw)
    data, closed = b"", False
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                closed = True
                break
            data += chunk
    except socket.timeout:
        pass
    s.close()
    return data, closed
def send(raw, wait=5):
    return exchange(raw, wait)[0].split(b"\r\n")[0].decode(errors="replace")
out = {{}}
# A smuggling attempt: TE and CL disagree and a second request hides in the body. The agent
# must either refuse it or answer exactly one request and close the connection.
data, closed = exchange(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
out["cl_te"] = data.split(b"\r\n")[0].decode(errors="replace")
out["cl_te_responses"] = data.count(b"HTTP/1.1 ")
out["cl_te_closed"] = closed
out["cl_te_smuggled_seen"] = b"/smuggled" in data
out["double_cl"] = send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde")
out["bad_chunk"] = send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")
out["big_header"] = send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200000 + b"\r\n\r\n")
# slowloris: a head that never ends; meanwhile a normal request must work.
slow = socket.create_connection(("{vip}", 80), timeout=30)
slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
t = time.time()
c = socket.create_connection(("{vip}", 80), timeout=10)
c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
out["during_slowloris"] = c.recv(4096).split(b"\r\n")[0].decode()
slow.settimeout(30)
try:
    while slow.recv(4096): pass
    out["slowloris_closed_after_s"] = round(time.time() - t)
except socket.timeout:
    out["slowloris_closed_after_s"] = None
print(json.dumps(out))
"#,
        vip = shop.vip
    );
    let stdout = shop.client.python(&script)?;
    let r: Value = serde_json::from_str(&stdout)?;
    let status = |k: &str| r[k].as_str().unwrap_or("").to_string();
    // hyper drops Content-Length when Transfer-Encoding is present and closes the connection
    // after the one response (RFC 9112 §6.3): the hidden request is never served.
    ensure!(
        status("cl_te").contains(" 400 ")
            || (r["cl_te_responses"] == 1
                && r["cl_te_closed"] == true
                && r["cl_te_smuggled_seen"] == false),
        "smuggling attempt: {r}"
    );
    for key in ["double_cl", "bad_chunk"] {
        let line = status(key);
        // Either a 400 or the connection closed without any answer: never a 200.
        ensure!(
            line.is_empty() || line.contains(" 400 "),
            "{key}: {line:?} ({r})"
        );
    }
    let big = status("big_header");
    ensure!(
        big.is_empty() || big.contains(" 431 ") || big.contains(" 400 "),
        "big header: {big:?}"
    );
    ensure!(
        status("during_slowloris").contains(" 200 "),
        "a normal request during slowloris: {r}"
    );
    ensure!(
        r["slowloris_closed_after_s"]
            .as_u64()
            .is_some_and(|s| s <= 25),
        "the slowloris connection was never closed: {r}"
    );
    let (code, _) = curl(&shop.client, &[&shop.url("/")])?;
    ensure!(code == 200, "after the bad input: {code}");
    Ok(())
}

#[test]
fn across_two_nodes_routing_grpc_and_l7_authorization_work_over_hbone() -> anyhow::Result<()> {
    let mut n1 = Node::new()?;
    let mut n2 = Node::new()?;
    n1.link(&n2)?;
    let client = n1.add_pod("client")?;
    let v1 = n2.add_pod("v1")?;
    let v2 = n2.add_pod("v2")?;
    let _b1 = backend(&v1, "v1", &[])?;
    let _b2 = backend(&v2, "v2", &[])?;
    let mut grpc = v1.command("python3")?;
    grpc.args([GRPC_ECHO, "server", &GRPC_PORT.to_string()]);
    let _grpc = Background::spawn_ready(grpc, "listening")?;
    let s = n1.subnet;
    let vip = format!("{}.{}.{}.200", s[0], s[1], s[2]);
    let cluster = format!(
        "services:\n{}{}{}  - name: echo\n    namespace: shop\n    vips: [{vip}]\n    selector: {{version: v1}}\n    ports: [{{name: grpc, port: {GRPC_PORT}, targetPort: {GRPC_PORT}}}]\nhttpRoutes:\n  - name: by-user\n    namespace: shop\n    parentRefs: [{{name: backend, port: 80}}]\n    rules:\n      - matches: [{{headers: [{{name: x-user, value: bob}}]}}]\n        backendRefs: [{{name: backend-v2, port: 80}}]\n      - backendRefs: [{{name: backend-v1, port: 80}}]\nauthorizationPolicies:\n  - name: no-admin\n    namespace: shop\n    selector: {{matchLabels: {{app: backend}}}}\n    action: DENY\n    rules: [{{to: [{{operation: {{paths: [\"/admin*\"]}}}}]}}]\n",
        service("backend", &vip, "app: backend", ""),
        service(
            "backend-v1",
            &format!("{}.{}.{}.201", s[0], s[1], s[2]),
            "version: v1",
            ""
        ),
        service(
            "backend-v2",
            &format!("{}.{}.{}.202", s[0], s[1], s[2]),
            "version: v2",
            ""
        ),
    );
    let labels = |v: &str| format!("{{app: backend, version: {v}}}");
    let remote = |pod: &Pod, v: &str| {
        format!(
            "  - {{name: {}, namespace: shop, serviceAccount: backend, ip: {}, node: {}, labels: {}}}\n",
            pod.name,
            pod.ip,
            n2.id,
            labels(v)
        )
    };
    let local = |pod: &Pod, v: &str| {
        format!(
            "  - {{name: {}, namespace: shop, serviceAccount: backend, ip: {}, netns: {}, cgroup: {}, labels: {}}}\n",
            pod.name,
            pod.ip,
            pod.netns_path.display(),
            pod.cgroup.display(),
            labels(v)
        )
    };
    let c1 = format!(
        "node: {}\npods:\n{}{}{}{cluster}",
        n1.id,
        client.config_entry("shop", "frontend", true),
        remote(&v1, "v1"),
        remote(&v2, "v2")
    );
    let c2 = format!(
        "node: {}\npods:\n{}{}{}{cluster}",
        n2.id,
        client.remote_config_entry("shop", "frontend", &n1),
        local(&v1, "v1"),
        local(&v2, "v2")
    );
    let fleet_ca = std::env::temp_dir().join(format!("trellis-{}-fleet-l7", std::process::id()));
    std::fs::create_dir_all(&fleet_ca)?;
    let _a1 = Agent::start_with_state_dir(&format!("{}-n1", n1.id), &c1, Some(&fleet_ca))?;
    let mut a2 = Agent::start_with_state_dir(&format!("{}-n2", n2.id), &c2, Some(&fleet_ca))?;

    let url = |path: &str| format!("http://{vip}{path}");
    let (code, resp) = curl(&client, &["-H", "x-user: bob", &url("/")])?;
    ensure!(
        code == 200 && json_body(&resp)?["name"] == "v2",
        "header route across nodes: {code} {resp}"
    );
    let (code, resp) = curl(&client, &[&url("/")])?;
    let body = json_body(&resp)?;
    ensure!(
        code == 200 && body["name"] == "v1",
        "default route across nodes: {code} {resp}"
    );
    ensure!(
        body["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with(&format!("{}:", client.ip))),
        "backend saw {}",
        body["peer"]
    );
    // Node 2's agent parses the tunnelled HTTP because a policy with HTTP rules selects the pod.
    let (code, _) = curl(&client, &[&url("/admin/users")])?;
    ensure!(code == 403, "L7 deny across nodes: {code}");
    let denial = a2.wait_for_event("node 2's denial", |e| message(e) == "request denied")?;
    ensure!(
        field(&denial, "src.identity") == "spiffe://cluster.local/ns/shop/sa/frontend",
        "{denial}"
    );
    // An allowed and a denied request on one client connection: node 2's inbound side
    // reports each under its own status (it caches its metric label sets per connection).
    let out = client
        .command("curl")?
        .args([
            "-sS",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
        ])
        .args(["-w", "%{http_code}\n", &url("/"), &url("/admin/users")])
        .output()
        .context("running curl")?;
    let codes = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        codes.split_whitespace().eq(["200", "403"]),
        "two requests on one connection: {codes:?}"
    );
    let metrics = http_get(a2.metrics_addr()?, "/metrics")?;
    // The header route, the default route and this `/`; the earlier deny and this one.
    let (ok, denied) = (
        destination_requests(&metrics, "200"),
        destination_requests(&metrics, "403"),
    );
    ensure!(
        ok == 3.0 && denied == 2.0,
        "node 2 reported {ok} 200s and {denied} 403s as destination, expected 3 and 2:\n{metrics}"
    );

    let out = client
        .command("python3")?
        .args([
            GRPC_ECHO,
            "client",
            &format!("{vip}:{GRPC_PORT}"),
            "--messages",
            "10",
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "grpc across nodes: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        reply["ok"] == true && reply["stream_replies"] == 10 && reply["trailer"] == "done",
        "{reply}"
    );
    let _ = std::fs::remove_dir_all(&fleet_ca);
    Ok(())
}

#[test]
fn tcp_service_ports_are_balanced_per_connection() -> anyhow::Result<()> {
    let shop = Shop::new(&[
        ("one", &[("app", "backend")]),
        ("two", &[("app", "backend")]),
    ])?;
    let _one = backend(&shop.backends[0].0, "one", &[])?;
    let _two = backend(&shop.backends[1].0, "two", &[])?;
    let extra = format!(
        "services:\n  - name: backend\n    namespace: shop\n    vips: [{}]\n    selector: {{app: backend}}\n    ports: [{{name: tcp, port: 80, targetPort: {APP_PORT}, appProtocol: tcp}}]\n",
        shop.vip
    );
    let mut agent = Agent::start("l4lb", &shop.config(&extra))?;
    let mut seen = BTreeMap::new();
    for _ in 0..30 {
        let (code, resp) = curl(&shop.client, &[&shop.url("/")])?;
        ensure!(code == 200, "{code}");
        *seen
            .entry(
                json_body(&resp)?["name"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string(),
            )
            .or_insert(0) += 1;
    }
    ensure!(
        seen.get("one").copied().unwrap_or(0) > 0 && seen.get("two").copied().unwrap_or(0) > 0,
        "one endpoint never chosen: {seen:?}"
    );
    // Balanced at L4: connection logs, no HTTP request logs.
    agent.wait_for_event("a connection log", |e| message(e) == "connection closed")?;
    ensure!(
        agent.count_events(is_http_log) == 0,
        "a tcp port was proxied at L7"
    );
    Ok(())
}

/// An agent whose `backend` service (one pod) has `connectionPool: {pool}`.
fn agent_with_connection_pool(shop: &Shop, name: &str, pool: &str) -> anyhow::Result<Agent> {
    let extra = format!(
        "services:\n{}",
        service(
            "backend",
            &shop.vip.to_string(),
            "app: backend",
            &format!("    trafficPolicy: {{connectionPool: {pool}}}\n")
        )
    );
    Agent::start(name, &shop.config(&extra))
}

/// How a burst of requests was answered.
struct Burst {
    /// 200s.
    ok: usize,
    /// 503s flagged `UO`.
    shed: usize,
    /// Every (status, response flags).
    results: Vec<(u16, String)>,
}

/// `count` HTTP/1.1 requests to the backend at once, each answered after `delay_ms`, on
/// their own connections.
fn slow_requests_at_once(shop: &Shop, count: usize, delay_ms: u32) -> anyhow::Result<Burst> {
    let script = format!(
        r#"
import http.client, json, threading
results = []
def call():
    c = http.client.HTTPConnection("{vip}", 80, timeout=20)
    c.request("GET", "/delay/{delay_ms}")
    r = c.getresponse()
    r.read()
    results.append((r.status, r.getheader("x-trellis-response-flags", "-")))
threads = [threading.Thread(target=call) for _ in range({count})]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(results))
"#,
        vip = shop.vip
    );
    let stdout = shop.client.python(&script)?;
    let results: Vec<(u16, String)> = serde_json::from_str(&stdout)?;
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    let shed = results
        .iter()
        .filter(|(s, f)| *s == 503 && f == "UO")
        .count();
    Ok(Burst { ok, shed, results })
}

#[test]
fn the_circuit_breaker_sheds_excess_requests_with_503_uo() -> anyhow::Result<()> {
    let shop = Shop::new(&[("b", &[("app", "backend")])])?;
    let _b = backend(&shop.backends[0].0, "b", &[])?;
    let _agent = agent_with_connection_pool(&shop, "circuit", "{maxRequests: 2}")?;
    let Burst { ok, shed, results } = slow_requests_at_once(&shop, 6, 4000)?;
    ensure!(
        ok + shed == 6 && (1..=2).contains(&ok) && shed >= 4,
        "{results:?}"
    );
    Ok(())
}

#[test]
fn max_connections_caps_upstream_connections_with_503_uo() -> anyhow::Result<()> {
    let shop = Shop::new(&[("b", &[("app", "backend")])])?;
    let _b = backend(&shop.backends[0].0, "b", &[])?;
    let _agent = agent_with_connection_pool(&shop, "maxconn", "{maxConnections: 1}")?;
    // Five slow requests at once: the first takes the only upstream connection, the others
    // would each need another one. The agent's worker threads pool connections separately
    // and each may open its first one to an endpoint (as Envoy's workers do), so one or two
    // go through.
    let Burst { ok, shed, results } = slow_requests_at_once(&shop, 5, 3000)?;
    ensure!((1..=2).contains(&ok) && ok + shed == 5, "{results:?}");
    // The connections went back to their pools: sequential requests reuse them, none is
    // refused.
    let vip = shop.vip.to_string();
    for _ in 0..3 {
        let (status, text) = curl(&shop.client, &[&format!("http://{vip}/")])?;
        ensure!(status == 200, "after the burst: {status} {text}");
    }
    Ok(())
}

#[test]
fn an_undeclared_service_port_is_sniffed_http_or_left_l4() -> anyhow::Result<()> {
    let shop = Shop::new(&[("b", &[("app", "backend")])])?;
    let _b = backend(&shop.backends[0].0, "b", &[])?;
    // Port name "web": no protocol from the name or appProtocol, so the agent looks.
    let extra = format!(
        "services:\n  - name: backend\n    namespace: shop\n    vips: [{}]\n    selector: {{app: backend}}\n    ports: [{{name: web, port: 80, targetPort: {APP_PORT}}}]\n",
        shop.vip
    );
    let mut agent = Agent::start("sniff", &shop.config(&extra))?;
    let (code, _) = curl(&shop.client, &[&shop.url("/sniffed")])?;
    ensure!(code == 200, "{code}");
    agent.wait_for_event("the sniffed request's access log", |e| {
        is_http_log(e) && field(e, "path") == "/sniffed"
    })?;
    // Bytes that are not HTTP (a TLS ClientHello prefix) are relayed at L4.
    let script = format!(
        "import socket\ns = socket.create_connection(('{}', 80), timeout=20)\ns.sendall(b'\\x16\\x03\\x01\\x00\\x05hello')\ns.shutdown(socket.SHUT_WR)\nprint(len(s.recv(65536)) >= 0)\n",
        shop.vip
    );
    shop.client.python(&script)?;
    agent.wait_for_event("an L4 connection log", |e| {
        message(e) == "connection closed" && field(e, "direction") == "outbound"
    })?;
    Ok(())
}

const FRAMING_BACKEND: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/framing_backend.py");

/// The HTTP/1.1 fast path against a raw-socket backend: every response framing passes
/// through intact (chunked with extensions and trailers, 103 Early Hints, 1 MiB by length,
/// a body ending at the close, `Connection: close`), pipelined requests are answered in
/// order, hop-by-hop fields stay behind, a chunked request body hands the connection to
/// hyper mid-way and it keeps working, upstream connections outlive client ones, an
/// agent's own answer skips the body it did not forward, and an idle client connection is
/// closed.
#[test]
fn http1_responses_of_every_framing_pass_through_and_connections_hand_over_to_hyper()
-> anyhow::Result<()> {
    let shop = Shop::new(&[("b", &[("app", "backend")])])?;
    let mut raw = shop.backends[0].0.command("python3")?;
    raw.args([FRAMING_BACKEND, &APP_PORT.to_string()]);
    let _raw = Background::spawn_ready(raw, "listening")?;
    let extra = format!(
        "services:\n{}httpRoutes:\n  - name: framing\n    namespace: shop\n    parentRefs: [{{name: backend}}]\n    rules:\n      - matches: [{{path: {{type: PathPrefix, value: /aborted}}}}]\n        fault: {{abort: {{httpStatus: 503, percentage: 100}}}}\n      - matches: [{{path: {{type: PathPrefix, value: /}}}}]\n",
        service("backend", &shop.vip.to_string(), "app: backend", "")
    );
    let agent = Agent::start("framing", &shop.config(&extra))?;
    let script = format!(
        r#"
import socket, json
class Conn:
    def __init__(self):
        self.s = socket.create_connection(("{vip}", 80), timeout=10)
        self.buf = b""
    def fill(self):
        chunk = self.s.recv(65536)
        if not chunk:
            raise EOFError
        self.buf += chunk
    def line(self):
        while b"\r\n" not in self.buf:
            self.fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line
    def take(self, n):
        while len(self.buf) < n:
            self.fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out
    def closed(self):
        try:
            while True:
                self.fill()
        except EOFError:
            return True
        except socket.timeout:
            return False
    def fields(self):
        out = {{}}
        while True:
            line = self.line()
            if not line:
                return out
            name, value = line.decode().split(":", 1)
            out[name.strip().lower()] = value.strip()
    def response(self, head=False):
        status = int(self.line().split(b" ")[1])
        fields = self.fields()
        r = {{"status": status, "fields": fields, "body": b"", "trailers": {{}}}}
        if 100 <= status < 200 or head:
            return r
        if fields.get("transfer-encoding") == "chunked":
            while True:
                size = int(self.line().split(b";")[0], 16)
                if size == 0:
                    r["trailers"] = self.fields()
                    return r
                r["body"] += self.take(size)
                assert self.take(2) == b"\r\n"
        elif "content-length" in fields:
            r["body"] = self.take(int(fields["content-length"]))
        else:
            try:
                while True:
                    self.fill()
            except EOFError:
                pass
            r["body"], self.buf = self.buf, b""
        return r
out = {{}}
c = Conn()
c.s.sendall(b"GET /chunked HTTP/1.1\r\nHost: svc\r\n\r\nGET /hints HTTP/1.1\r\nHost: svc\r\n\r\nGET /big HTTP/1.1\r\nHost: svc\r\n\r\n")
r = c.response()
out["chunked"] = [r["status"], r["body"].decode(), r["trailers"].get("x-checksum")]
r = c.response()
out["hint"] = [r["status"], r["fields"].get("link")]
r = c.response()
out["hinted"] = [r["status"], r["body"].decode()]
r = c.response()
out["big"] = [r["status"], len(r["body"]), r["body"] == bytes(range(256)) * 4096]
body = b"x" * 100000
c.s.sendall(b"POST /echo HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, x-hop\r\nX-Hop: secret\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
r = c.response()
echo = json.loads(r["body"])
out["echo"] = [r["status"], echo["body_bytes"], [name for name, _ in echo["fields"]]]
c.s.sendall(b"POST /echo HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
r = c.response()
out["chunked_request"] = [r["status"], json.loads(r["body"])["body_bytes"]]
c.s.sendall(b"GET /chunked HTTP/1.1\r\nHost: svc\r\n\r\n")
r = c.response()
out["after_handover"] = [r["status"], r["body"].decode()]
c2 = Conn()
c2.s.sendall(b"GET /until-close HTTP/1.1\r\nHost: svc\r\n\r\n")
r = c2.response()
out["until_close"] = [r["status"], r["body"].decode()]
c3 = Conn()
c3.s.sendall(b"GET /closing HTTP/1.1\r\nHost: svc\r\n\r\n")
r = c3.response()
out["closing"] = [r["status"], r["body"].decode(), r["fields"].get("connection")]
c3.s.sendall(b"GET /echo HTTP/1.1\r\nHost: svc\r\n\r\n")
out["after_closing"] = c3.response()["status"]
c3.s.sendall(b"GET /echo HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
r = c3.response()
out["client_close"] = [r["status"], r["fields"].get("connection"), c3.closed()]
upstreams = set()
for _ in range(6):
    c = Conn()
    c.s.sendall(b"GET /echo HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
    upstreams.add(c.response()["fields"]["x-conn"])
    c.s.close()
out["upstreams_for_six"] = len(upstreams)
c4 = Conn()
c4.s.sendall(b"POST /aborted HTTP/1.1\r\nHost: svc\r\nContent-Length: 1000\r\n\r\n" + b"y" * 1000 + b"HEAD /big HTTP/1.1\r\nHost: svc\r\n\r\n")
r = c4.response()
out["aborted"] = [r["status"], r["fields"].get("x-trellis-response-flags")]
r = c4.response(head=True)
out["head"] = [r["status"], r["fields"].get("content-length")]
c4.s.sendall(b"GET /echo HTTP/1.1\r\nHost: svc\r\n\r\n")
out["after_head"] = c4.response()["status"]
import time
idle = Conn()
idle.s.settimeout(30)
idle.s.sendall(b"GET /echo HTTP/1.1\r\nHost: svc\r\n\r\n")
idle.response()
t = time.time()
out["idle_closed_after_s"] = round(time.time() - t) if idle.closed() else None
print(json.dumps(out))
"#,
        vip = shop.vip
    );
    let stdout = shop.client.python(&script)?;
    let r: Value = serde_json::from_str(&stdout)?;
    let is = |key: &str, expected: Value| -> anyhow::Result<()> {
        ensure!(r[key] == expected, "{key}: {} (all: {r})", r[key]);
        Ok(())
    };
    is("chunked", serde_json::json!([200, "hello, world", "42"]))?;
    is("hint", serde_json::json!([103, "</a.css>; rel=preload"]))?;
    is("hinted", serde_json::json!([200, "hinted"]))?;
    is("big", serde_json::json!([200, 1 << 20, true]))?;
    ensure!(r["echo"][0] == 200 && r["echo"][1] == 100_000, "echo: {r}");
    let sent: Vec<&str> = r["echo"][2]
        .as_array()
        .context("field names")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        sent.contains(&"x-request-id") && sent.contains(&"traceparent"),
        "no trace context upstream: {sent:?}"
    );
    ensure!(
        !sent
            .iter()
            .any(|n| ["x-hop", "connection", "keep-alive"].contains(n)),
        "hop-by-hop fields went upstream: {sent:?}"
    );
    is("chunked_request", serde_json::json!([200, 11]))?;
    is("after_handover", serde_json::json!([200, "hello, world"]))?;
    is("until_close", serde_json::json!([200, "body-until-close"]))?;
    // The upstream's `Connection: close` is its own hop: the client's connection stays.
    is("closing", serde_json::json!([200, "bye", null]))?;
    is("after_closing", serde_json::json!(200))?;
    is("client_close", serde_json::json!([200, "close", true]))?;
    // One idle upstream connection per worker at most, instead of one per client one.
    ensure!(
        r["upstreams_for_six"].as_u64().is_some_and(|n| n <= 2),
        "six client connections used {} upstream ones",
        r["upstreams_for_six"]
    );
    // An answer of the agent's own skips the request body it did not forward; a HEAD
    // response has no body whatever its length says.
    is("aborted", serde_json::json!([503, "FI"]))?;
    is("head", serde_json::json!([200, "1048576"]))?;
    is("after_head", serde_json::json!(200))?;
    // The one connection that went to hyper is counted, with its reason.
    let metrics = http_get(agent.metrics_addr()?, "/metrics")?;
    ensure!(
        metrics.contains("trellis_http1_handovers_total{reason=\"body\"} 1\n")
            && metrics.contains("trellis_http1_handovers_total{reason=\"upgrade\"} 0\n"),
        "handover metrics: {}",
        metrics
            .lines()
            .filter(|l| l.contains("handovers"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // An idle keep-alive connection is closed after the header read timeout (10 s), as
    // hyper closes its own.
    ensure!(
        r["idle_closed_after_s"]
            .as_u64()
            .is_some_and(|s| (5..=25).contains(&s)),
        "idle keep-alive connection: {}",
        r["idle_closed_after_s"]
    );
    // Log lines are written in batches: wait for both.
    mesh_tests::wait_until(
        "two access log lines for /chunked",
        std::time::Duration::from_secs(20),
        || {
            let logged = agent.count_events(|e| {
                is_http_log(e) && field(e, "path") == "/chunked" && number(e, "status") == Some(200)
            });
            (logged == 2).then_some(())
        },
    )
    .with_context(|| agent.log_text())?;
    Ok(())
}

/// Pipelined HTTP/1.1 load (h2load, 8 requests in flight per connection) through the fast
/// path: every request answered, in order, each counted once by the backend and logged
/// once by the agent.
#[test]
fn pipelined_http1_load_is_answered_in_full() -> anyhow::Result<()> {
    let shop = Shop::new(&[("b", &[("app", "backend")])])?;
    let _b = backend(&shop.backends[0].0, "b", &[])?;
    let extra = format!(
        "services:\n{}",
        service("backend", &shop.vip.to_string(), "app: backend", "")
    );
    let agent = Agent::start("pipelined", &shop.config(&extra))?;
    let requests = 4000;
    let out = shop
        .client
        .command("h2load")?
        .args([
            "--h1",
            "-n",
            &requests.to_string(),
            "-c",
            "4",
            "-m",
            "8",
            &shop.url("/pipelined"),
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains(&format!("{requests} succeeded, 0 failed"))
            && text.contains(&format!("status codes: {requests} 2xx")),
        "h2load: {text}"
    );
    let (_, response) = curl(&shop.client, &[&shop.url("/count")])?;
    let served = response.rsplit("\r\n\r\n").next().unwrap_or("");
    ensure!(
        served.trim().parse::<u64>().ok() == Some(requests),
        "the backend counted {served:?} requests, expected {requests}"
    );
    mesh_tests::wait_until(
        "an access log line per pipelined request",
        std::time::Duration::from_secs(20),
        || {
            let logged = agent.count_events(|e| {
                is_http_log(e)
                    && field(e, "path") == "/pipelined"
                    && number(e, "status") == Some(200)
            });
            (logged == requests as usize).then_some(())
        },
    )?;
    Ok(())
}
