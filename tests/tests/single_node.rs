//! End-to-end tests on one node: real eBPF programs in this kernel, pods as network
//! namespaces + cgroups, the real agent binary, curl and python as clients.
//!
//! These need root and a BPF-capable kernel; without them they fail with a message saying
//! so (see `mesh_tests::require_privileges`), they are never skipped.
use std::{net::SocketAddr, path::Path};

use anyhow::{Context as _, ensure};
use mesh_tests::{
    Agent, Background, Node, Pod,
    agent::{config_doc, field, message, number},
};
use serde_json::Value;

const PEER_ECHO: &str = env!("CARGO_BIN_EXE_peer-echo");
const APP_PORT: u16 = 8080;

fn http_server(pod: &Pod, port: u16) -> anyhow::Result<Background> {
    let mut cmd = pod.command(PEER_ECHO)?;
    cmd.args(["http", &port.to_string()]);
    Background::spawn_ready(cmd, "listening")
}

fn is_connection(e: &Value) -> bool {
    message(e) == "connection closed"
}

fn connections<'a>(events: &'a [Value], direction: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| is_connection(e) && field(e, "direction") == direction)
        .collect()
}

/// The client address the server reported (`peer=IP:PORT ...`).
fn seen_peer(body: &str) -> anyhow::Result<SocketAddr> {
    let peer = body
        .split_whitespace()
        .find_map(|w| w.strip_prefix("peer="))
        .with_context(|| format!("no peer= in {body:?}"))?;
    Ok(peer.parse()?)
}

/// Programs attached to a cgroup, as bpftool lists them (one line per program).
fn cgroup_programs(cgroup: &Path) -> anyhow::Result<Vec<String>> {
    let out = mesh_tests::run(
        "bpftool",
        &["cgroup", "show", &cgroup.display().to_string()],
    )?;
    Ok(out
        .lines()
        .skip(1) // header
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect())
}

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

fn config(t: &TwoPods, client_enrolled: bool, server_enrolled: bool) -> String {
    config_doc(
        &t.node.id,
        &[
            t.client.config_entry("shop", "frontend", client_enrolled),
            t.server.config_entry("shop", "backend", server_enrolled),
        ],
    )
}

fn wait_enrolled(agent: &mut Agent, pod: &str) -> anyhow::Result<()> {
    let pod = format!("shop/{pod}");
    agent.wait_for_event(&format!("{pod} enrolled"), |e| {
        message(e) == "pod enrolled" && field(e, "pod") == pod
    })?;
    Ok(())
}

#[test]
fn pod_to_pod_through_the_agent_keeps_the_client_ip() -> anyhow::Result<()> {
    let t = two_pods()?;
    let _server = http_server(&t.server, APP_PORT)?;
    let mut agent = Agent::start("p2p", &config(&t, true, true))?;
    wait_enrolled(&mut agent, "client")?;
    wait_enrolled(&mut agent, "server")?;

    let (code, body) = t
        .client
        .curl(&format!("http://{}:{APP_PORT}/", t.server.ip))?;
    ensure!(code == 200, "status {code}");
    let peer = seen_peer(&body)?;
    ensure!(
        peer.ip() == t.client.ip,
        "server saw {peer}, expected the client pod {}",
        t.client.ip
    );

    let out = agent.wait_for_event("outbound connection log", |e| {
        is_connection(e) && field(e, "direction") == "outbound"
    })?;
    let original = format!("{}:{APP_PORT}", t.server.ip);
    ensure!(field(&out, "src.pod") == "shop/client", "{out}");
    ensure!(
        field(&out, "src.identity") == "spiffe://cluster.local/ns/shop/sa/frontend",
        "{out}"
    );
    ensure!(field(&out, "dst.original") == original, "{out}");
    ensure!(field(&out, "dst.pod") == "shop/server", "{out}");
    ensure!(
        number(&out, "bytes_received").unwrap_or(0) as usize > body.len(),
        "{out}"
    );
    ensure!(field(&out, "error").is_empty(), "{out}");

    // Both pods are on this node: the agent hands the connection over in-process (no second
    // capture), checks the server's policies with the client's structural identity, and
    // connects to the app as the client.
    ensure!(field(&out, "path") == "local", "{out}");
    ensure!(
        field(&out, "dst.identity") == "spiffe://cluster.local/ns/shop/sa/backend",
        "{out}"
    );
    ensure!(
        field(&out, "src.addr").starts_with(&format!("{}:", t.client.ip)),
        "{out}"
    );
    ensure!(
        connections(&agent.events(), "inbound").is_empty(),
        "same-node traffic was captured twice:\n{}",
        agent.log_text()
    );
    Ok(())
}

#[test]
fn the_app_sees_the_address_it_dialled() -> anyhow::Result<()> {
    let t = two_pods()?;
    let _server = http_server(&t.server, APP_PORT)?;
    let mut agent = Agent::start("peername", &config(&t, true, false))?;
    wait_enrolled(&mut agent, "client")?;
    // getpeername() on the app's socket must report the server, not the agent's listener.
    let script = format!(
        "import socket\ns = socket.create_connection(('{}', {APP_PORT}), timeout=20)\nprint('%s:%d' % s.getpeername())\ns.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\nprint(s.recv(4096).decode().split('\\r\\n')[0])\n",
        t.server.ip
    );
    let stdout = t.client.python(&script)?;
    let text = stdout;
    let mut lines = text.lines();
    ensure!(
        lines.next() == Some(format!("{}:{APP_PORT}", t.server.ip).as_str()),
        "getpeername said {text:?}"
    );
    ensure!(lines.next() == Some("HTTP/1.1 200 OK"), "reply {text:?}");
    agent.wait_for_event("outbound connection log", |e| {
        is_connection(e) && field(e, "direction") == "outbound"
    })?;
    Ok(())
}

#[test]
fn a_pod_that_is_not_enrolled_is_not_redirected() -> anyhow::Result<()> {
    let t = two_pods()?;
    let _server = http_server(&t.server, APP_PORT)?;
    let mut agent = Agent::start("unenrolled", &config(&t, false, true))?;
    wait_enrolled(&mut agent, "server")?;
    ensure!(
        cgroup_programs(&t.client.cgroup)?.is_empty(),
        "programs on the unenrolled pod's cgroup"
    );
    ensure!(
        !cgroup_programs(&t.server.cgroup)?.is_empty(),
        "no programs on the enrolled pod's cgroup"
    );

    let (code, body) = t
        .client
        .curl(&format!("http://{}:{APP_PORT}/", t.server.ip))?;
    ensure!(
        code == 200 && seen_peer(&body)?.ip() == t.client.ip,
        "{code} {body}"
    );
    // The server side is enrolled, so the inbound hop logs; wait for it, then check that
    // nothing was captured on the client side.
    agent.wait_for_event("inbound connection log", |e| {
        is_connection(e) && field(e, "direction") == "inbound"
    })?;
    let events = agent.events();
    ensure!(
        connections(&events, "outbound").is_empty(),
        "unenrolled pod was redirected:\n{}",
        agent.log_text()
    );
    Ok(())
}

#[test]
fn inbound_capture_from_a_client_outside_the_mesh() -> anyhow::Result<()> {
    let t = two_pods()?;
    let _server = http_server(&t.server, APP_PORT)?;
    let mut agent = Agent::start("inbound", &config(&t, false, true))?;
    wait_enrolled(&mut agent, "server")?;
    for _ in 0..3 {
        let (code, body) = t
            .client
            .curl(&format!("http://{}:{APP_PORT}/", t.server.ip))?;
        ensure!(code == 200, "status {code}");
        ensure!(seen_peer(&body)?.ip() == t.client.ip, "server saw {body}");
    }
    mesh_tests::wait_until(
        "three inbound connection logs",
        mesh_tests::agent::AGENT_DEADLINE,
        || (connections(&agent.events(), "inbound").len() >= 3).then_some(()),
    )?;
    let events = agent.events();
    for e in connections(&events, "inbound") {
        ensure!(
            field(e, "dst.original") == format!("{}:{APP_PORT}", t.server.ip),
            "{e}"
        );
        // A plaintext client from outside the mesh has no verified identity.
        ensure!(
            field(e, "src.identity").is_empty() && field(e, "path") == "passthrough",
            "{e}"
        );
        ensure!(
            field(e, "src.addr").starts_with(&format!("{}:", t.client.ip)),
            "{e}"
        );
        ensure!(
            field(e, "dst.identity") == "spiffe://cluster.local/ns/shop/sa/backend",
            "{e}"
        );
    }
    Ok(())
}

#[test]
fn enrol_and_unenrol_live_by_editing_the_config() -> anyhow::Result<()> {
    let t = two_pods()?;
    let _server = http_server(&t.server, APP_PORT)?;
    let mut agent = Agent::start("live", &config(&t, false, false))?;
    let url = format!("http://{}:{APP_PORT}/", t.server.ip);

    t.client.curl(&url)?;
    ensure!(
        cgroup_programs(&t.client.cgroup)?.is_empty(),
        "programs attached before enrolment"
    );

    agent.write_config(&config(&t, true, false))?;
    wait_enrolled(&mut agent, "client")?;
    ensure!(
        !cgroup_programs(&t.client.cgroup)?.is_empty(),
        "no programs after enrolment"
    );
    let (code, body) = t.client.curl(&url)?;
    ensure!(
        code == 200 && seen_peer(&body)?.ip() == t.client.ip,
        "{code} {body}"
    );
    agent.wait_for_event("outbound connection log", |e| {
        is_connection(e) && field(e, "direction") == "outbound"
    })?;

    agent.write_config(&config(&t, false, false))?;
    agent.wait_for_event("client unenrolled", |e| {
        message(e) == "pod unenrolled" && field(e, "pod") == "shop/client"
    })?;
    ensure!(
        cgroup_programs(&t.client.cgroup)?.is_empty(),
        "programs left after unenrolment"
    );
    let before = connections(&agent.events(), "outbound").len();
    let (code, _) = t.client.curl(&url)?;
    ensure!(code == 200, "status {code} after unenrolment");
    // A redirected connection would be logged by the time the agent has applied a later
    // config change; use one as a barrier instead of sleeping.
    let applied = agent.count_events(|e| message(e) == "config applied");
    agent.write_config(&config(&t, false, false).replace("node:", "# touched\nnode:"))?;
    mesh_tests::wait_until(
        "the touched config to be applied",
        mesh_tests::agent::AGENT_DEADLINE,
        || (agent.count_events(|e| message(e) == "config applied") > applied).then_some(()),
    )?;
    ensure!(
        connections(&agent.events(), "outbound").len() == before,
        "traffic was redirected after unenrolment:\n{}",
        agent.log_text()
    );
    Ok(())
}

#[test]
fn a_bad_config_is_rejected_and_traffic_keeps_flowing() -> anyhow::Result<()> {
    let t = two_pods()?;
    let _server = http_server(&t.server, APP_PORT)?;
    let good = config(&t, true, true);
    let mut agent = Agent::start("badconfig", &good)?;
    wait_enrolled(&mut agent, "client")?;
    let url = format!("http://{}:{APP_PORT}/", t.server.ip);

    let bad_ip = good.replacen(&format!("ip: {}", t.server.ip), "ip: 10.0.0.999", 1);
    agent.write_config(&bad_ip)?;
    let rejected = agent.wait_for_event("rejection of the bad ip", |e| {
        message(e).starts_with("config rejected")
    })?;
    ensure!(field(&rejected, "field") == "pods[1].ip", "{rejected}");

    let not_yaml = "node: [unclosed\n";
    agent.write_config(not_yaml)?;
    mesh_tests::wait_until(
        "rejection of broken YAML",
        mesh_tests::agent::AGENT_DEADLINE,
        || (agent.count_events(|e| message(e).starts_with("config rejected")) >= 2).then_some(()),
    )?;

    // Still serving the last good config: both pods enrolled, traffic relayed.
    let (code, body) = t.client.curl(&url)?;
    ensure!(
        code == 200 && seen_peer(&body)?.ip() == t.client.ip,
        "{code} {body}"
    );
    agent.wait_for_event("outbound connection after rejection", |e| {
        is_connection(e) && field(e, "direction") == "outbound"
    })?;
    ensure!(
        agent.count_events(|e| message(e) == "pod unenrolled") == 0,
        "a rejected config unenrolled pods"
    );

    // And a good config is taken again afterwards.
    agent.write_config(&config(&t, false, true))?;
    agent.wait_for_event("client unenrolled", |e| {
        message(e) == "pod unenrolled" && field(e, "pod") == "shop/client"
    })?;
    Ok(())
}

#[test]
fn loopback_and_dns_are_never_captured() -> anyhow::Result<()> {
    let t = two_pods()?;
    let _local = http_server(&t.client, 9090)?;
    let _dns_port = http_server(&t.server, 53)?;
    let mut agent = Agent::start("exclusions", &config(&t, true, true))?;
    wait_enrolled(&mut agent, "client")?;
    wait_enrolled(&mut agent, "server")?;
    let (code, body) = t.client.curl("http://127.0.0.1:9090/")?;
    ensure!(
        code == 200 && seen_peer(&body)?.ip().is_loopback(),
        "{code} {body}"
    );
    let (code, body) = t.client.curl(&format!("http://{}:53/", t.server.ip))?;
    ensure!(
        code == 200 && seen_peer(&body)?.ip() == t.client.ip,
        "{code} {body}"
    );
    // Barrier: a captured connection to port 53 would be logged before a later one is.
    let _app = http_server(&t.server, APP_PORT)?;
    t.client
        .curl(&format!("http://{}:{APP_PORT}/", t.server.ip))?;
    mesh_tests::wait_until(
        "the barrier connection's logs",
        mesh_tests::agent::AGENT_DEADLINE,
        || (!connections(&agent.events(), "outbound").is_empty()).then_some(()),
    )?;
    let events = agent.events();
    for e in events.iter().filter(|e| is_connection(e)) {
        let dst = field(e, "dst.original");
        ensure!(
            dst.ends_with(&format!(":{APP_PORT}")),
            "an excluded connection was captured: {e}"
        );
    }
    Ok(())
}

/// Ids of the BPF programs (`kind` = "prog") or maps ("map") the process `pid` holds open,
/// read from its fdinfo (exact even while other tests' agents run).
fn bpf_objects_of(pid: u32, kind: &str) -> anyhow::Result<Vec<u64>> {
    let key = format!("{kind}_id:");
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(info) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        if let Some(id) = info.lines().find_map(|l| l.strip_prefix(&key)) {
            ids.push(id.trim().parse()?);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

fn bpf_ids(kind: &str) -> anyhow::Result<Vec<u64>> {
    let out = mesh_tests::run("bpftool", &["-j", kind, "show"])?;
    let list: Vec<Value> = serde_json::from_str(&out).context("bpftool json")?;
    Ok(list
        .iter()
        .filter_map(|o| o.get("id").and_then(Value::as_u64))
        .collect())
}

#[test]
fn sigterm_detaches_everything() -> anyhow::Result<()> {
    let t = two_pods()?;
    let _server = http_server(&t.server, APP_PORT)?;
    let mut agent = Agent::start("sigterm", &config(&t, true, true))?;
    wait_enrolled(&mut agent, "client")?;
    wait_enrolled(&mut agent, "server")?;
    t.client
        .curl(&format!("http://{}:{APP_PORT}/", t.server.ip))?;

    let pid = agent.pid().context("agent pid")?;
    let progs = bpf_objects_of(pid, "prog")?;
    let maps = bpf_objects_of(pid, "map")?;
    let names = mesh_tests::run("bpftool", &["prog", "show"])?;
    ensure!(
        progs.len() >= 6,
        "expected the agent's 6 programs, bpftool shows {progs:?}:\n{names}"
    );
    ensure!(!maps.is_empty(), "no maps held by the agent");
    ensure!(!cgroup_programs(&t.client.cgroup)?.is_empty());

    let status = agent.terminate()?;
    ensure!(
        status.success(),
        "agent exited with {status}:\n{}",
        agent.log_text()
    );

    // The kernel frees programs and maps asynchronously after their last reference goes.
    mesh_tests::wait_until(
        "the agent's programs and maps to be freed",
        mesh_tests::agent::AGENT_DEADLINE,
        || {
            let live_progs = bpf_ids("prog").ok()?;
            let live_maps = bpf_ids("map").ok()?;
            let gone = progs.iter().all(|id| !live_progs.contains(id))
                && maps.iter().all(|id| !live_maps.contains(id));
            gone.then_some(())
        },
    )
    .with_context(|| format!("programs {progs:?} or maps {maps:?} still exist"))?;
    for pod in [&t.client, &t.server] {
        ensure!(
            cgroup_programs(&pod.cgroup)?.is_empty(),
            "programs still on {}'s cgroup",
            pod.name
        );
        let links = mesh_tests::run("bpftool", &["-j", "link", "show"])?;
        let netns_ino =
            std::fs::metadata(&pod.netns_path).map(|m| std::os::unix::fs::MetadataExt::ino(&m))?;
        ensure!(
            !links.contains(&format!("\"netns_ino\":{netns_ino}")),
            "sk_lookup link left on {}",
            pod.name
        );
        let listeners = mesh_tests::run("ip", &["netns", "exec", &pod.netns, "ss", "-Htln"])?;
        ensure!(
            !listeners.contains(":15001") && !listeners.contains(":15006"),
            "listeners left in {}: {listeners}",
            pod.name
        );
        let rules = mesh_tests::run("ip", &["-n", &pod.netns, "rule", "show"])?;
        ensure!(
            !rules.contains("15006"),
            "reply rule left in {}: {rules}",
            pod.name
        );
    }
    // The pods talk directly again.
    let (code, body) = t
        .client
        .curl(&format!("http://{}:{APP_PORT}/", t.server.ip))?;
    ensure!(
        code == 200 && seen_peer(&body)?.ip() == t.client.ip,
        "{code} {body}"
    );
    Ok(())
}

#[test]
fn a_dual_stack_socket_dialling_an_ipv4_pod_is_captured() -> anyhow::Result<()> {
    let t = two_pods()?;
    let _server = http_server(&t.server, APP_PORT)?;
    let mut agent = Agent::start("dualstack", &config(&t, true, true))?;
    wait_enrolled(&mut agent, "client")?;
    let script = format!(
        "import socket\ns = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\ns.settimeout(20)\ns.connect(('::ffff:{ip}', {APP_PORT}))\nprint('%s:%d' % s.getpeername()[:2])\ns.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\nprint(s.recv(4096).decode().split('\\r\\n')[-1].strip())\n",
        ip = t.server.ip
    );
    let stdout = t.client.python(&script)?;
    let text = stdout;
    let mut lines = text.lines();
    ensure!(
        lines.next() == Some(format!("::ffff:{}:{APP_PORT}", t.server.ip).as_str()),
        "getpeername said {text:?}"
    );
    let body = lines.next().unwrap_or("");
    ensure!(seen_peer(body)?.ip() == t.client.ip, "server saw {body:?}");
    let out = agent.wait_for_event("outbound connection log", |e| {
        is_connection(e) && field(e, "direction") == "outbound"
    })?;
    ensure!(
        field(&out, "dst.original") == format!("{}:{APP_PORT}", t.server.ip),
        "{out}"
    );
    Ok(())
}
