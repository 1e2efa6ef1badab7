//! End-to-end tests of the agent's life cycle: a restart that hands the pods over without
//! dropping a byte, and a crash that leaves the pods failing closed until an agent is back.
//!
//! Need root and a BPF-capable kernel, like every end-to-end test; they fail, not skip,
//! without them.
use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use mesh_tests::{
    Agent, Background, Node, Pod,
    agent::{field, message},
    wait_until,
};
use serde_json::Value;

const PEER_ECHO: &str = env!("CARGO_BIN_EXE_peer-echo");
const HTTP_BACKEND: &str = env!("CARGO_BIN_EXE_http-backend");
const RESTART_LOAD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/restart_load.py");
const ECHO_PORT: u16 = 9000;
const HTTP_PORT: u16 = 8080;
/// How long the client load of the restart test runs; the restart happens in its middle.
const LOAD_SECONDS: u64 = 12;

struct Setup {
    node: Node,
    client: Pod,
    server: Pod,
    vip: Ipv4Addr,
}

fn setup() -> anyhow::Result<Setup> {
    let mut node = Node::new()?;
    let client = node.add_pod("client")?;
    let server = node.add_pod("server")?;
    let vip = Ipv4Addr::new(node.subnet[0], node.subnet[1], node.subnet[2], 200);
    Ok(Setup {
        node,
        client,
        server,
        vip,
    })
}

/// Client and server enrolled (the server optionally not), and an HTTP Service in front of
/// the server so that the keep-alive client goes through the L7 engine.
fn config(s: &Setup, server_enrolled: bool) -> String {
    format!(
        "node: {}\npods:\n{}{}services:\n  - name: backend\n    namespace: shop\n    vips: [{}]\n    selector: {{app: server}}\n    ports: [{{name: http, port: 80, targetPort: {HTTP_PORT}, appProtocol: http}}]\n",
        s.node.id,
        s.client.config_entry("shop", "frontend", true),
        s.server.config_entry("shop", "backend", server_enrolled),
        s.vip
    )
}

fn servers(s: &Setup) -> anyhow::Result<(Background, Background)> {
    let mut echo = s.server.command(PEER_ECHO)?;
    echo.args(["tcp", &ECHO_PORT.to_string()]);
    let mut http = s.server.command(HTTP_BACKEND)?;
    http.args([&HTTP_PORT.to_string(), "--name", "server"]);
    Ok((
        Background::spawn_ready(echo, "listening")?,
        Background::spawn_ready(http, "listening")?,
    ))
}

/// The load script's counters (see tests/fixtures/restart_load.py).
fn read_progress(path: &Path) -> Option<Value> {
    serde_json::from_str(&fs::read_to_string(path).ok()?).ok()
}

fn count(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn errors(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|e| e.to_string()).collect())
        .unwrap_or_default()
}

fn wait_progress(path: &Path, what: &str, ready: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    wait_until(what, Duration::from_secs(60), || {
        read_progress(path).filter(|v| ready(v))
    })
}

fn wait_exit(child: &mut Child, deadline: Duration) -> anyhow::Result<()> {
    let status = wait_until("the load script to finish", deadline, || {
        child.try_wait().ok().flatten()
    })?;
    ensure!(status.success(), "load script failed: {status}");
    Ok(())
}

#[test]
fn restart_hands_over_without_dropping_a_byte() -> anyhow::Result<()> {
    let s = setup()?;
    let _servers = servers(&s)?;
    let old = Agent::start("handover", &config(&s, true))?;

    let progress = old.dir().join("load-progress.json");
    let output = old.dir().join("load-output.json");
    let mut load = s
        .client
        .command("python3")?
        .arg(RESTART_LOAD)
        .args([&s.server.ip.to_string(), &ECHO_PORT.to_string()])
        .args([&s.vip.to_string(), "80", &LOAD_SECONDS.to_string()])
        .arg(&progress)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&output)?)
        .spawn()
        .context("starting the load script in the client pod")?;

    // Restart only once every kind of traffic is flowing through the old agent.
    let before = wait_progress(&progress, "load flowing through the old agent", |v| {
        count(v, "http_ok") >= 20
            && count(v, "connect_ok") >= 10
            && count(v, "stream_verified") > 1 << 20
    })?;

    let mut new = old.start_successor()?;
    let mut old = old;
    old.wait_for_event("the old agent to hand over", |e| {
        message(e) == "handed over to the new agent; draining open connections"
    })?;
    // New connections keep succeeding after the handover (now through the new agent).
    wait_progress(&progress, "new connections after the handover", |v| {
        count(v, "connect_ok") >= count(&before, "connect_ok") + 20
    })?;

    wait_exit(&mut load, Duration::from_secs(LOAD_SECONDS + 90))?;
    let result: Value =
        serde_json::from_str(&fs::read_to_string(&output)?).context("the load script's summary")?;
    for key in ["stream_errors", "http_errors", "connect_errors"] {
        ensure!(
            errors(&result, key).is_empty(),
            "{key}: {:?}\n{result}",
            errors(&result, key)
        );
    }
    let (sent, verified) = (
        count(&result, "stream_sent"),
        count(&result, "stream_verified"),
    );
    ensure!(
        sent > 4 << 20 && verified == sent,
        "the long-lived stream lost bytes: sent {sent}, verified {verified}"
    );
    ensure!(
        count(&result, "http_closes") >= 1,
        "the keep-alive client was never asked to reconnect: {result}"
    );

    // The old agent drains its last connection (the stream) and exits by itself.
    let status = old.wait_exit(Duration::from_secs(90))?;
    ensure!(
        status.success(),
        "old agent exited with {status}\n{}",
        old.log_text()
    );
    ensure!(
        old.count_events(|e| message(e) == "drained: no connections left") == 1,
        "old agent did not drain cleanly:\n{}",
        old.log_text()
    );

    // The new agent adopted the pinned links and serves both kinds of traffic.
    let adopted = new.count_events(|e| {
        message(e) == "pod enrolled" && e.get("adopted_links") == Some(&Value::Bool(true))
    });
    ensure!(
        adopted == 2,
        "new agent adopted {adopted} pods' links\n{}",
        new.log_text()
    );
    new.wait_for_event("a connection through the new agent", |e| {
        message(e) == "connection closed"
            && field(e, "dst.original").ends_with(&format!(":{ECHO_PORT}"))
    })?;
    new.wait_for_event("an HTTP request through the new agent", |e| {
        message(e) == "http request"
    })?;
    let (code, _) = s.client.curl(&format!("http://{}/after", s.vip))?;
    ensure!(code == 200, "after the handover: status {code}");

    new.terminate()?;
    ensure!(
        !new.pin_dir.exists(),
        "SIGTERM left pins in {}",
        new.pin_dir.display()
    );
    Ok(())
}

/// Dials `ip:port` from `pod` with a 3 s timeout and reports how it went and how long it took:
/// `ok`, `refused` or `timeout`, then the seconds.
fn dial(
    pod_command: std::process::Command,
    ip: Ipv4Addr,
    port: u16,
) -> anyhow::Result<(String, f64)> {
    let script = format!(
        "import socket, time\nt = time.time()\ntry:\n    socket.create_connection(('{ip}', {port}), timeout=3).close(); r = 'ok'\nexcept ConnectionRefusedError:\n    r = 'refused'\nexcept socket.timeout:\n    r = 'timeout'\nprint(r, time.time() - t)\n"
    );
    let mut cmd = pod_command;
    let out = cmd
        .args(["-c", &script])
        .output()
        .context("running python3")?;
    ensure!(
        out.status.success(),
        "dial failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (verdict, secs) = text.trim().split_once(' ').context("dial output")?;
    Ok((verdict.to_string(), secs.parse()?))
}

/// A python3 command in the node's namespace: outside every pod and outside the mesh.
fn node_python(node: &Node) -> std::process::Command {
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &node.netns, "python3"]);
    cmd
}

fn pod_pin_dirs(agent: &Agent) -> Vec<PathBuf> {
    fs::read_dir(agent.pin_dir.join("pods"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[test]
fn a_crashed_agent_fails_closed_and_a_new_one_restores_service() -> anyhow::Result<()> {
    let s = setup()?;
    let _servers = servers(&s)?;
    let mut agent = Agent::start("crash", &config(&s, true))?;
    let (code, _) = s
        .client
        .curl(&format!("http://{}:{HTTP_PORT}/", s.server.ip))?;
    ensure!(code == 200, "through the agent: status {code}");
    ensure!(pod_pin_dirs(&agent).len() == 2, "expected two pods' pins");

    agent.kill()?;

    // Outbound: refused at once, never sent around the mesh to the (listening) server.
    let (verdict, secs) = dial(s.client.command("python3")?, s.server.ip, HTTP_PORT)?;
    ensure!(
        verdict == "refused",
        "client → server with no agent: {verdict}"
    );
    ensure!(secs < 1.0, "refusal took {secs:.3} s");
    let (verdict, _) = dial(s.client.command("python3")?, s.server.ip, ECHO_PORT)?;
    ensure!(
        verdict == "refused",
        "client → echo with no agent: {verdict}"
    );
    // Inbound from outside the mesh: sk_lookup drops the SYN (the kernel answers with a
    // reset); it never reaches the listening app.
    let (verdict, _) = dial(node_python(&s.node), s.server.ip, HTTP_PORT)?;
    ensure!(
        verdict == "refused",
        "node → server with no agent: {verdict}"
    );

    // While no agent ran, the server left the mesh; a new agent re-enrols from its config
    // alone: it adopts the client's pins and removes the server's.
    let config_path = agent.config_path.clone();
    let tmp = config_path.with_extension("tmp");
    fs::write(&tmp, config(&s, false))?;
    fs::rename(&tmp, &config_path)?;
    let mut fresh = agent.start_successor()?;
    let adopted = fresh.count_events(|e| {
        message(e) == "pod enrolled" && e.get("adopted_links") == Some(&Value::Bool(true))
    });
    ensure!(
        adopted == 1,
        "fresh agent adopted {adopted} pods\n{}",
        fresh.log_text()
    );
    ensure!(
        pod_pin_dirs(&fresh).len() == 1,
        "stale pins left: {:?}",
        pod_pin_dirs(&fresh)
    );

    let (code, body) = s
        .client
        .curl(&format!("http://{}:{HTTP_PORT}/again", s.server.ip))?;
    ensure!(code == 200, "after the restart: status {code} {body}");
    fresh.wait_for_event("the restored connection in the new agent's log", |e| {
        message(e) == "connection closed" && field(e, "src.pod") == "shop/client"
    })?;
    // The server is no longer captured: reachable from outside the mesh directly.
    let (verdict, _) = dial(node_python(&s.node), s.server.ip, HTTP_PORT)?;
    ensure!(verdict == "ok", "node → unenrolled server: {verdict}");
    Ok(())
}

/// Opens `held` echo connections from the pod and keeps them, then tries one more, then
/// frees one and tries again. Prints `<held ok> <extra verdict> <after-free verdict>`.
const NOISY_POD: &str = r#"
import socket, sys, time
ip, port, held = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def echo(s, msg):
    s.sendall(msg)
    got = b""
    while len(got) < len(msg):
        d = s.recv(64)
        if not d:
            return "eof"
        got += d
    return "ok" if got == msg else "garbled"
def attempt():
    try:
        s = socket.create_connection((ip, port), timeout=3)
        s.settimeout(3)
        return s, echo(s, b"extra\n")
    except ConnectionResetError:
        return None, "reset"
    except ConnectionRefusedError:
        return None, "refused"
    except socket.timeout:
        return None, "timeout"
conns = []
for i in range(held):
    s = socket.create_connection((ip, port), timeout=5)
    s.settimeout(5)
    assert echo(s, b"held %d\n" % i) == "ok"
    conns.append(s)
_, extra = attempt()
conns.pop().close()
deadline = time.time() + 10
while True:
    s, after = attempt()
    if after == "ok" or time.time() > deadline:
        break
    time.sleep(0.1)
print(len(conns) + 1, extra, after)
"#;

fn metrics_text(agent: &Agent) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(agent.metrics_addr()?)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

#[test]
fn a_pod_over_its_connection_limit_is_reset_and_other_pods_are_unaffected() -> anyhow::Result<()> {
    let mut s = setup()?;
    let quiet = s.node.add_pod("quiet")?;
    let _servers = servers(&s)?;
    let mut doc = config(&s, true);
    doc = doc.replacen(
        "services:",
        &format!("{}services:", quiet.config_entry("shop", "quiet", true)),
        1,
    );
    let mut agent = Agent::start_with_env(
        "limits",
        &doc,
        None,
        &[("TRELLIS_MAX_CONNECTIONS_PER_POD", "5")],
    )?;

    // The noisy pod holds its 5 connections while the quiet one's keep working.
    let mut noisy = s
        .client
        .command("python3")?
        .args([
            "-c",
            NOISY_POD,
            &s.server.ip.to_string(),
            &ECHO_PORT.to_string(),
            "5",
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    let quiet_ok = quiet.python(&format!(
        "import socket\nfor i in range(8):\n    s = socket.create_connection(('{}', {ECHO_PORT}), timeout=5)\n    s.sendall(b'q')\n    assert s.recv(1) == b'q'\n    s.close()\nprint('ok')",
        s.server.ip
    ))?;
    ensure!(quiet_ok.trim() == "ok", "quiet pod: {quiet_ok}");
    let out = wait_until("the noisy pod's script", Duration::from_secs(60), || {
        noisy.try_wait().ok().flatten()
    })
    .and_then(|_| {
        let mut text = String::new();
        use std::io::Read as _;
        noisy
            .stdout
            .take()
            .context("stdout")?
            .read_to_string(&mut text)?;
        Ok(text)
    })?;
    let fields: Vec<&str> = out.split_whitespace().collect();
    ensure!(
        fields.len() == 3 && fields[0] == "5",
        "noisy pod output: {out:?}"
    );
    ensure!(
        fields[1] == "reset" || fields[1] == "eof",
        "the 6th connection was not turned away: {out:?}"
    );
    ensure!(
        fields[2] == "ok",
        "after freeing one, a new connection failed: {out:?}"
    );

    let metrics = metrics_text(&agent)?;
    let rejected = metrics
        .lines()
        .find(|l| l.starts_with("trellis_connections_rejected_total{reason=\"pod_limit\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .context("no pod_limit rejection series")?;
    ensure!(rejected >= 1.0, "rejections counted: {rejected}");
    // Log lines are written in batches: wait for it rather than read once.
    agent.wait_for_event("the log line for the rejection", |e| {
        message(e) == "connection limit reached; resetting new connections"
    })?;
    Ok(())
}

/// An app that dials from its first millisecond: connect attempts every 20 ms until one
/// succeeds (at most 60 s). Writes the attempts so far to PROGRESS; prints them as JSON.
const EAGER_APP: &str = r#"
import json, os, socket, sys, time
ip, port, progress = sys.argv[1], int(sys.argv[2]), sys.argv[3]
attempts = []
deadline = time.time() + 60
while time.time() < deadline:
    t = time.time()
    try:
        socket.create_connection((ip, port), timeout=5).close()
        attempts.append([t, "ok"])
        break
    except Exception as e:
        attempts.append([t, type(e).__name__])
    with open(progress + ".tmp", "w") as f:
        json.dump(attempts, f)
    os.replace(progress + ".tmp", progress)
    time.sleep(0.02)
print(json.dumps(attempts))
"#;

#[test]
fn a_new_pod_cannot_connect_around_the_mesh_before_the_agent_decides() -> anyhow::Result<()> {
    let mut s = setup()?;
    let outsider = s.node.add_pod("outsider")?;
    let _servers = servers(&s)?;
    let base = config(&s, true);
    let with_outsider = |enrolled: bool| {
        base.replacen(
            "services:",
            &format!(
                "{}services:",
                outsider.config_entry("shop", "outsider", enrolled)
            ),
            1,
        )
    };
    // The outsider is a known pod left out of the mesh: the gate lets it through.
    let gate = s.node.cgroup_dir().display().to_string();
    let mut agent = Agent::start_with_env(
        "gate",
        &with_outsider(false),
        None,
        &[("TRELLIS_GATE_CGROUP", gate.as_str())],
    )?;
    agent.wait_for_event("the gate", |e| {
        message(e) == "start-up gate attached: undecided pods cannot connect"
    })?;
    let (code, _) = outsider.curl(&format!("http://{}:{HTTP_PORT}/", s.server.ip))?;
    ensure!(code == 200, "a decided, unmeshed pod: status {code}");

    // A pod the agent has not heard of starts and dials at once.
    let late = s.node.add_pod("late")?;
    let progress = agent.dir().join("eager-progress.json");
    let mut app = late
        .command("python3")?
        .args([
            "-c",
            EAGER_APP,
            &s.server.ip.to_string(),
            &HTTP_PORT.to_string(),
        ])
        .arg(&progress)
        .stdout(Stdio::piped())
        .spawn()?;
    wait_until(
        "the late pod's first refused attempts",
        Duration::from_secs(30),
        || {
            let text = fs::read_to_string(&progress).ok()?;
            let attempts: Vec<Value> = serde_json::from_str(&text).ok()?;
            (attempts.len() >= 3).then_some(())
        },
    )?;
    // Now the agent learns about it and enrols it.
    let doc = with_outsider(false).replacen(
        "services:",
        &format!("{}services:", late.config_entry("shop", "late", true)),
        1,
    );
    agent.write_config(&doc)?;
    agent.wait_for_event("the late pod enrolled", |e| {
        message(e) == "pod enrolled" && field(e, "pod") == "shop/late"
    })?;
    let out = wait_until("the late pod's app", Duration::from_secs(60), || {
        app.try_wait().ok().flatten()
    })
    .and_then(|_| {
        use std::io::Read as _;
        let mut text = String::new();
        app.stdout
            .take()
            .context("stdout")?
            .read_to_string(&mut text)?;
        Ok(text)
    })?;
    let attempts: Vec<(f64, String)> =
        serde_json::from_str(out.trim()).with_context(|| format!("app output {out:?}"))?;
    let (_, last) = attempts.last().context("no attempts")?;
    ensure!(last == "ok", "the app never got through: {attempts:?}");
    ensure!(
        attempts[..attempts.len() - 1]
            .iter()
            .all(|(_, r)| r == "PermissionError"),
        "before enrolment every attempt must be refused by the gate: {attempts:?}"
    );
    ensure!(attempts.len() >= 4, "{attempts:?}");
    // The successful connection went through the mesh.
    agent.wait_for_event("the late pod's connection through the agent", |e| {
        message(e) == "connection closed" && field(e, "src.pod") == "shop/late"
    })?;
    Ok(())
}
