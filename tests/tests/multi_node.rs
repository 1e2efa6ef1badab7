//! End-to-end tests across two nodes: two node namespaces linked by a veth, one agent per
//! node, pods talking over HBONE (HTTP/2 CONNECT over mTLS on 15008).
//!
//! Need root and a BPF-capable kernel, like every end-to-end test; they fail, not skip,
//! without them.
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use mesh_tests::{
    Agent, Background, Node, Pod,
    agent::{AGENT_DEADLINE, field, message, number},
    node::NodeLink,
    wait_until,
};
use serde_json::Value;

const PEER_ECHO: &str = env!("CARGO_BIN_EXE_peer-echo");
const APP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 7070;

struct TwoNodes {
    n1: Node,
    n2: Node,
    link: NodeLink,
    client: Pod,
    server: Pod,
    /// One local CA shared by both agents (a fleet with one trust root).
    fleet_ca: PathBuf,
}

fn two_nodes(name: &str) -> anyhow::Result<TwoNodes> {
    let mut n1 = Node::new()?;
    let mut n2 = Node::new()?;
    let link = n1.link(&n2)?;
    let client = n1.add_pod("client")?;
    let server = n2.add_pod("server")?;
    let fleet_ca =
        std::env::temp_dir().join(format!("trellis-{}-fleet-{name}", std::process::id()));
    std::fs::create_dir_all(&fleet_ca)?;
    Ok(TwoNodes {
        n1,
        n2,
        link,
        client,
        server,
        fleet_ca,
    })
}

impl TwoNodes {
    fn config_n1(&self, extra: &str) -> String {
        format!(
            "node: {}\npods:\n{}{}{extra}",
            self.n1.id,
            self.client.config_entry("shop", "frontend", true),
            self.server.remote_config_entry("shop", "backend", &self.n2)
        )
    }

    fn config_n2_as(&self, server_sa: &str, extra: &str) -> String {
        format!(
            "node: {}\npods:\n{}{}{extra}",
            self.n2.id,
            self.server.config_entry("shop", server_sa, true),
            self.client
                .remote_config_entry("shop", "frontend", &self.n1)
        )
    }

    fn config_n2(&self, extra: &str) -> String {
        self.config_n2_as("backend", extra)
    }

    /// Starts both agents on the fleet CA and waits until each has enrolled its pod.
    fn agents(&self, n1_extra: &str, n2_extra: &str) -> anyhow::Result<(Agent, Agent)> {
        let a1 = Agent::start_with_state_dir(
            &format!("{}-n1", self.n1.id),
            &self.config_n1(n1_extra),
            Some(&self.fleet_ca),
        )?;
        let a2 = Agent::start_with_state_dir(
            &format!("{}-n2", self.n2.id),
            &self.config_n2(n2_extra),
            Some(&self.fleet_ca),
        )?;
        Ok((a1, a2))
    }

    fn url(&self) -> String {
        format!("http://{}:{APP_PORT}/", self.server.ip)
    }
}

fn http_server(pod: &Pod, port: u16) -> anyhow::Result<Background> {
    let mut cmd = pod.command(PEER_ECHO)?;
    cmd.args(["http", &port.to_string()]);
    Background::spawn_ready(cmd, "listening")
}

fn is_connection(e: &Value, direction: &str) -> bool {
    message(e) == "connection closed" && field(e, "direction") == direction
}

fn seen_peer(body: &str) -> anyhow::Result<SocketAddr> {
    let peer = body
        .split_whitespace()
        .find_map(|w| w.strip_prefix("peer="))
        .with_context(|| format!("no peer= in {body:?}"))?;
    Ok(peer.parse()?)
}

/// curl that is expected to fail (connection refused, reset or closed before a reply).
fn curl_fails(pod: &Pod, url: &str) -> anyhow::Result<bool> {
    let out = pod
        .command("curl")?
        .args(["-sS", "--max-time", "20", "-o", "/dev/null", url])
        .output()?;
    Ok(!out.status.success())
}

#[test]
fn cross_node_pod_to_pod_goes_over_mtls_through_both_agents() -> anyhow::Result<()> {
    let t = two_nodes("basic")?;
    let _server = http_server(&t.server, APP_PORT)?;
    let (mut a1, mut a2) = t.agents("", "")?;

    for _ in 0..3 {
        let (code, body) = t.client.curl(&t.url())?;
        ensure!(code == 200, "status {code}");
        ensure!(seen_peer(&body)?.ip() == t.client.ip, "server saw {body}");
    }
    let out = a1.wait_for_event("outbound HBONE log", |e| is_connection(e, "outbound"))?;
    ensure!(
        field(&out, "path") == "hbone" && field(&out, "security") == "mutual_tls",
        "{out}"
    );
    ensure!(
        field(&out, "dst.identity") == "spiffe://cluster.local/ns/shop/sa/backend",
        "{out}"
    );
    ensure!(field(&out, "error").is_empty(), "{out}");
    let inb = a2.wait_for_event("inbound HBONE log", |e| is_connection(e, "inbound"))?;
    ensure!(field(&inb, "path") == "hbone", "{inb}");
    ensure!(
        field(&inb, "src.identity") == "spiffe://cluster.local/ns/shop/sa/frontend",
        "{inb}"
    );
    ensure!(
        field(&inb, "dst.original") == format!("{}:{APP_PORT}", t.server.ip),
        "{inb}"
    );
    // Three connections, one pooled mTLS connection (per data-plane worker).
    wait_until("three inbound logs", AGENT_DEADLINE, || {
        (a2.count_events(|e| is_connection(e, "inbound")) >= 3).then_some(())
    })?;
    // Node 1 logs the pooled connection before the connections that used it.
    wait_until("three outbound logs", AGENT_DEADLINE, || {
        (a1.count_events(|e| is_connection(e, "outbound")) >= 3).then_some(())
    })?;
    one_pooled_connection_per_worker(&a1)
        .with_context(|| format!("three streams to one pod:\n{}", a1.log_text()))?;
    Ok(())
}

#[test]
fn the_node_link_carries_only_tls() -> anyhow::Result<()> {
    let t = two_nodes("capture")?;
    let _server = http_server(&t.server, APP_PORT)?;
    let (_a1, _a2) = t.agents("", "")?;
    let pcap = std::env::temp_dir().join(format!("trellis-{}-link.pcap", std::process::id()));
    let mut tcpdump = Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.n1.netns,
            "tcpdump",
            "-Z",
            "root",
            "-i",
            &t.link.interface,
            "-U",
            "-s",
            "0",
            "-w",
        ])
        .arg(&pcap)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting tcpdump")?;
    let stderr = tcpdump.stderr.take().context("tcpdump stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("listening on") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(AGENT_DEADLINE)
        .context("tcpdump did not start")?;

    let marker = "PLAINTEXT-MARKER-7f3a9c";
    let out = t
        .client
        .command("curl")?
        .args([
            "-sS",
            "--max-time",
            "20",
            "-d",
            &marker.repeat(20),
            &format!("{}{marker}", t.url()),
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("peer="),
        "unexpected reply"
    );

    // tcpdump writes packets a little after they cross the link: wait until the capture
    // holds the exchange (handshake + request + reply) and has stopped growing.
    let mut last = 0;
    wait_until("tcpdump to write the exchange", AGENT_DEADLINE, || {
        let size = std::fs::metadata(&pcap).map(|m| m.len()).unwrap_or(0);
        let settled = size > 3000 && size == last;
        last = size;
        std::thread::sleep(Duration::from_millis(100));
        settled.then_some(())
    })?;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tcpdump.id() as i32, libc::SIGINT) };
    let _ = tcpdump.wait();
    let bytes = std::fs::read(&pcap).context("reading the capture")?;
    let summary = mesh_tests::run("tcpdump", &["-nn", "-r", &pcap.display().to_string()]);
    let _ = std::fs::remove_file(&pcap);
    let summary = summary?;
    ensure!(
        bytes.len() > 200,
        "the capture is empty ({} bytes)",
        bytes.len()
    );
    ensure!(
        !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the plaintext payload crossed the node link"
    );
    // Every TCP segment on the link is to or from the HBONE port.
    let tcp_lines: Vec<&str> = summary.lines().filter(|l| l.contains(" IP ")).collect();
    ensure!(!tcp_lines.is_empty(), "no IP packets captured:\n{summary}");
    for line in &tcp_lines {
        ensure!(
            line.contains(".15008"),
            "non-HBONE packet on the node link: {line}"
        );
    }
    Ok(())
}

#[test]
fn a_peer_presenting_the_wrong_identity_is_refused() -> anyhow::Result<()> {
    let t = two_nodes("impostor")?;
    let _server = http_server(&t.server, APP_PORT)?;
    // Node 1 expects the server pod to be shop/backend; node 2 runs it as shop/impostor.
    let mut a1 = Agent::start_with_state_dir(
        &format!("{}-n1", t.n1.id),
        &t.config_n1(""),
        Some(&t.fleet_ca),
    )?;
    let _a2 = Agent::start_with_state_dir(
        &format!("{}-n2", t.n2.id),
        &t.config_n2_as("impostor", ""),
        Some(&t.fleet_ca),
    )?;
    ensure!(
        curl_fails(&t.client, &t.url())?,
        "a connection to an impostor succeeded"
    );
    let out = a1.wait_for_event("the refused connection's log", |e| {
        is_connection(e, "outbound")
    })?;
    let error = field(&out, "error");
    ensure!(
        error.contains("sa/backend"),
        "the error does not name the expected identity: {out}"
    );
    Ok(())
}

#[test]
fn a_certificate_from_another_ca_is_refused() -> anyhow::Result<()> {
    let t = two_nodes("foreignca")?;
    let _server = http_server(&t.server, APP_PORT)?;
    let mut a1 = Agent::start_with_state_dir(
        &format!("{}-n1", t.n1.id),
        &t.config_n1(""),
        Some(&t.fleet_ca),
    )?;
    // Node 2 has its own local CA: neither side trusts the other.
    let mut a2 = Agent::start(&format!("{}-n2", t.n2.id), &t.config_n2(""))?;
    ensure!(
        curl_fails(&t.client, &t.url())?,
        "a connection across trust roots succeeded"
    );
    a1.wait_for_event("the refused outbound log", |e| {
        is_connection(e, "outbound") && !field(e, "error").is_empty()
    })?;
    a2.wait_for_event("the server side's handshake failure", |e| {
        message(e) == "HBONE TLS handshake failed"
    })?;
    ensure!(
        a2.count_events(|e| is_connection(e, "inbound")) == 0,
        "node 2 relayed a connection"
    );
    Ok(())
}

fn policy(action: &str, from: &str, to_port: u16) -> String {
    format!(
        "authorizationPolicies:\n  - name: backend-{lower}\n    namespace: shop\n    selector: {{matchLabels: {{app: server}}}}\n    action: {action}\n    rules:\n      - from: [{{source: {from}}}]\n        to: [{{operation: {{ports: [\"{to_port}\"]}}}}]\n",
        lower = action.to_lowercase()
    )
}

#[test]
fn allow_and_deny_policies_take_effect_live() -> anyhow::Result<()> {
    let t = two_nodes("policy")?;
    let _server = http_server(&t.server, APP_PORT)?;
    let (_a1, mut a2) = t.agents("", "")?;
    let url = t.url();
    let applied = |a: &Agent| a.count_events(|e| message(e) == "config applied");

    let cases: [(&str, String, bool); 5] = [
        (
            "allow by principal",
            policy(
                "ALLOW",
                "{principals: [\"cluster.local/ns/shop/sa/frontend\"]}",
                APP_PORT,
            ),
            true,
        ),
        (
            "allow another principal only",
            policy(
                "ALLOW",
                "{principals: [\"cluster.local/ns/shop/sa/admin\"]}",
                APP_PORT,
            ),
            false,
        ),
        (
            "allow by namespace, other port",
            policy("ALLOW", "{namespaces: [\"shop\"]}", 9999),
            false,
        ),
        (
            "deny by namespace",
            policy("DENY", "{namespaces: [\"shop\"]}", APP_PORT),
            false,
        ),
        (
            "deny another namespace",
            policy("DENY", "{namespaces: [\"billing\"]}", APP_PORT),
            true,
        ),
    ];
    for (what, extra, allowed) in cases {
        let before = applied(&a2);
        a2.write_config(&t.config_n2(&extra))?;
        wait_until(&format!("config '{what}' applied"), AGENT_DEADLINE, || {
            (applied(&a2) > before).then_some(())
        })?;
        let denials = a2.count_events(|e| message(e) == "connection denied");
        if allowed {
            let (code, _) = t
                .client
                .curl(&url)
                .with_context(|| format!("case '{what}'"))?;
            ensure!(code == 200, "case '{what}': status {code}");
        } else {
            ensure!(
                curl_fails(&t.client, &url)?,
                "case '{what}': the connection was allowed"
            );
            // Logs reach the file in batches: wait for the new denial.
            wait_until(
                &format!("a new denial for '{what}'"),
                AGENT_DEADLINE,
                || (a2.count_events(|e| message(e) == "connection denied") > denials).then_some(()),
            )
            .with_context(|| format!("case '{what}': no new denial"))?;
            let denial = a2.wait_for_event(&format!("denial log for '{what}'"), |e| {
                message(e) == "connection denied"
            })?;
            ensure!(
                field(&denial, "src.identity") == "spiffe://cluster.local/ns/shop/sa/frontend",
                "{denial}"
            );
        }
    }
    Ok(())
}

#[test]
fn certificates_rotate_under_live_traffic() -> anyhow::Result<()> {
    let t = two_nodes("rotation")?;
    let _server = http_server(&t.server, APP_PORT)?;
    let mut echo = t.server.command(PEER_ECHO)?;
    echo.args(["tcp", &ECHO_PORT.to_string()]);
    let _echo = Background::spawn_ready(echo, "listening")?;
    // 4 s certificates, rotated at half life: several rotations during the test.
    let identity = "identity: {certificateLifetime: 4s, rotateAt: 0.5}\n";
    let (a1, a2) = t.agents(identity, identity)?;

    // A long-lived connection exchanging a message every 100 ms for 7 s.
    let script = format!(
        "import socket, time\ns = socket.create_connection(('{ip}', {ECHO_PORT}), timeout=20)\nend = time.time() + 7\nn = 0\nwhile time.time() < end:\n    msg = b'ping-%06d' % n\n    s.sendall(msg)\n    got = b''\n    while len(got) < len(msg):\n        chunk = s.recv(64)\n        if not chunk: raise SystemExit('closed after %d messages' % n)\n        got += chunk\n    assert got == msg, (got, msg)\n    n += 1\n    time.sleep(0.1)\nprint('ok', n)\n",
        ip = t.server.ip
    );
    let long_lived = t
        .client
        .command("python3")?
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // New connections meanwhile, across rotations.
    let mut fresh = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < deadline {
        let (code, _) = t.client.curl(&t.url())?;
        ensure!(code == 200, "a new connection failed during rotation");
        fresh += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = long_lived.wait_with_output()?;
    ensure!(
        out.status.success(),
        "the long-lived connection broke: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        String::from_utf8_lossy(&out.stdout).starts_with("ok "),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for (name, agent) in [("node 1", &a1), ("node 2", &a2)] {
        let rotated = |a: &Agent| a.count_events(|e| message(e) == "certificate rotated");
        wait_until(&format!("{name}'s rotation logs"), AGENT_DEADLINE, || {
            (rotated(agent) >= 2).then_some(())
        })
        .with_context(|| {
            format!(
                "{name} rotated {} times in 7 s of 4 s certificates:\n{}",
                rotated(agent),
                agent.log_text()
            )
        })?;
    }
    ensure!(fresh >= 5, "only {fresh} new connections were tried");
    // New streams after a rotation go on a new HBONE connection that presents the new
    // certificate, instead of on the pooled one made with the old.
    wait_until(
        "node 1 retiring a pooled connection",
        AGENT_DEADLINE,
        || {
            (a1.count_events(|e| message(e).starts_with("source certificate rotated")) >= 1)
                .then_some(())
        },
    )
    .with_context(|| format!("node 1's log:\n{}", a1.log_text()))?;
    let established = a1.count_events(|e| message(e) == "HBONE connection established");
    ensure!(
        established >= 2,
        "node 1 made {established} HBONE connection(s) across its rotations"
    );
    Ok(())
}

const HBONE_PROBE: &str = env!("CARGO_BIN_EXE_hbone-probe");

fn probe(pod: &Pod, args: &[&str]) -> anyhow::Result<String> {
    let out = pod.command(HBONE_PROBE)?.args(args).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn bad_hbone_input_is_refused_and_the_agent_keeps_serving() -> anyhow::Result<()> {
    let t = two_nodes("badinput")?;
    let _server = http_server(&t.server, APP_PORT)?;
    let (_a1, mut a2) = t.agents("", "")?;
    let target = format!("{}:15008", t.server.ip);
    let ca_dir = t.fleet_ca.display().to_string();
    let frontend = "spiffe://cluster.local/ns/shop/sa/frontend";
    let refused = |a: &Agent| a.count_events(|e| message(e).starts_with("HBONE request refused"));

    // Not TLS at all.
    ensure!(
        probe(&t.client, &["garbage", &target])? == "closed",
        "the agent kept a garbage connection open"
    );
    a2.wait_for_event("the handshake failure log", |e| {
        message(e) == "HBONE TLS handshake failed"
    })?;

    // A valid identity asking for a pod that is not on this node.
    let elsewhere = format!("{}:{APP_PORT}", t.client.ip);
    let out = probe(
        &t.client,
        &[
            "connect",
            &target,
            &elsewhere,
            "--ca-dir",
            &ca_dir,
            "--identity",
            frontend,
        ],
    )?;
    ensure!(out == "status=404", "CONNECT to a pod elsewhere: {out}");
    wait_until("the refusal log", AGENT_DEADLINE, || {
        (refused(&a2) == 1).then_some(())
    })
    .with_context(|| format!("no refusal logged:\n{}", a2.log_text()))?;

    // An oversized header block.
    let here = format!("{}:{APP_PORT}", t.server.ip);
    let out = probe(
        &t.client,
        &[
            "connect",
            &target,
            &here,
            "--ca-dir",
            &ca_dir,
            "--identity",
            frontend,
            "--header-bytes",
            "32768",
        ],
    )?;
    ensure!(out == "status=431", "oversized headers: {out}");
    wait_until("the oversized header refusal log", AGENT_DEADLINE, || {
        (refused(&a2) == 2).then_some(())
    })
    .context("no refusal logged for the oversized header block")?;

    // The same request with normal headers is served, and so is ordinary mesh traffic.
    let out = probe(
        &t.client,
        &[
            "connect",
            &target,
            &here,
            "--ca-dir",
            &ca_dir,
            "--identity",
            frontend,
        ],
    )?;
    ensure!(out == "status=200", "a well-formed CONNECT: {out}");
    let (code, body) = t.client.curl(&t.url())?;
    ensure!(
        code == 200 && seen_peer(&body)?.ip() == t.client.ip,
        "{code} {body}"
    );
    Ok(())
}

#[test]
fn pods_sharing_an_identity_on_another_node_share_one_pooled_connection() -> anyhow::Result<()> {
    let mut t = two_nodes("sharedid")?;
    let replica = t.n2.add_pod("replica")?;
    let _server = http_server(&t.server, APP_PORT)?;
    let _replica = http_server(&replica, APP_PORT)?;
    let n1 = format!(
        "{}{}",
        t.config_n1(""),
        replica.remote_config_entry("shop", "backend", &t.n2)
    );
    let n2 = format!(
        "{}{}",
        t.config_n2(""),
        replica.config_entry("shop", "backend", true)
    );
    let a1 = Agent::start_with_state_dir(&format!("{}-n1", t.n1.id), &n1, Some(&t.fleet_ca))?;
    let _a2 = Agent::start_with_state_dir(&format!("{}-n2", t.n2.id), &n2, Some(&t.fleet_ca))?;
    for pod in [&t.server, &replica, &t.server, &replica] {
        let (code, body) = t.client.curl(&format!("http://{}:{APP_PORT}/", pod.ip))?;
        ensure!(code == 200, "status {code} from {}", pod.name);
        ensure!(
            body.contains(&format!("local=127.0.0.1:{APP_PORT}"))
                && seen_peer(&body)?.ip() == t.client.ip,
            "{body}"
        );
    }
    wait_until("four outbound logs", AGENT_DEADLINE, || {
        (a1.count_events(|e| is_connection(e, "outbound") && field(e, "error").is_empty()) >= 4)
            .then_some(())
    })?;
    one_pooled_connection_per_worker(&a1)
        .context("four streams for one (source, destination identity, node)")?;
    Ok(())
}

/// For one (source, destination identity, node), `agent` made at most one pooled HBONE
/// connection on each data-plane worker (the pools are per worker), and at least one.
fn one_pooled_connection_per_worker(agent: &Agent) -> anyhow::Result<()> {
    let workers: Vec<u64> = agent
        .events()
        .iter()
        .filter(|e| message(e) == "HBONE connection established")
        .map(|e| number(e, "worker").context("no worker in the connection's log line"))
        .collect::<anyhow::Result<_>>()?;
    let distinct: std::collections::BTreeSet<u64> = workers.iter().copied().collect();
    ensure!(
        !workers.is_empty() && distinct.len() == workers.len(),
        "pooled HBONE connections made on workers {workers:?}: want one per worker at most"
    );
    Ok(())
}

const HTTP_BACKEND: &str = env!("CARGO_BIN_EXE_http-backend");
const RESTART_LOAD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/restart_load.py");

/// The destination node's agent is replaced while a client on the other node streams, keeps
/// an HTTP connection alive and opens new connections through HBONE: the old agent's HBONE
/// connections get a GOAWAY, the source agent's pool moves new streams to the new agent,
/// and nothing in flight is lost.
#[test]
fn restarting_the_destination_agent_loses_nothing_across_nodes() -> anyhow::Result<()> {
    let t = two_nodes("handover")?;
    let mut echo = t.server.command(PEER_ECHO)?;
    echo.args(["tcp", &ECHO_PORT.to_string()]);
    let _echo = Background::spawn_ready(echo, "listening")?;
    let mut http = t.server.command(HTTP_BACKEND)?;
    http.args([&APP_PORT.to_string(), "--name", "server"]);
    let _http = Background::spawn_ready(http, "listening")?;
    let (a1, old) = t.agents("", "")?;

    let progress = a1.dir().join("cross-load-progress.json");
    let output = a1.dir().join("cross-load-output.json");
    let seconds = 12;
    let mut load = t
        .client
        .command("python3")?
        .arg(RESTART_LOAD)
        .args([&t.server.ip.to_string(), &ECHO_PORT.to_string()])
        .args([
            &t.server.ip.to_string(),
            &APP_PORT.to_string(),
            &seconds.to_string(),
        ])
        .arg(&progress)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&output)?)
        .spawn()
        .context("starting the load script")?;
    let read = || -> Option<Value> {
        serde_json::from_str(&std::fs::read_to_string(&progress).ok()?).ok()
    };
    let count = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let before = wait_until("load flowing across the nodes", AGENT_DEADLINE, || {
        read().filter(|v| count(v, "http_ok") >= 20 && count(v, "connect_ok") >= 10)
    })?;

    let mut new = old.start_successor()?;
    let mut old = old;
    old.wait_for_event("the old agent to hand over", |e| {
        message(e) == "handed over to the new agent; draining open connections"
    })?;
    wait_until("new connections after the handover", AGENT_DEADLINE, || {
        read().filter(|v| count(v, "connect_ok") >= count(&before, "connect_ok") + 20)
    })?;
    let status = wait_until("the load script", Duration::from_secs(seconds + 90), || {
        load.try_wait().ok().flatten()
    })?;
    ensure!(status.success(), "load script failed: {status}");
    let result: Value = serde_json::from_str(&std::fs::read_to_string(&output)?)?;
    for key in ["stream_errors", "http_errors", "connect_errors"] {
        let errors = result
            .get(key)
            .and_then(Value::as_array)
            .map(Vec::len)
            .unwrap_or(1);
        ensure!(errors == 0, "{key}: {result}");
    }
    let (sent, verified) = (
        count(&result, "stream_sent"),
        count(&result, "stream_verified"),
    );
    ensure!(
        sent > 4 << 20 && verified == sent,
        "the stream lost bytes: sent {sent}, verified {verified}"
    );
    // The old agent finishes its last streams and exits by itself; the new one served the
    // connections opened after the handover.
    let status = old.wait_exit(Duration::from_secs(90))?;
    ensure!(status.success(), "old agent: {status}\n{}", old.log_text());
    new.wait_for_event("an inbound connection through the new agent", |e| {
        is_connection(e, "inbound") && field(e, "dst.original").ends_with(&format!(":{ECHO_PORT}"))
    })?;
    drop(a1);
    Ok(())
}
