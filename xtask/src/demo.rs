//! `cargo xtask demo`: two nodes, six pods, one real agent per node, a little traffic, L7
//! routing, a live policy change, the agents' metrics and status, and the story of what
//! happened, told from the agents' own logs.
//!
//! - Node 1: `frontend` (shop/frontend) and `backend` (shop/backend) are enrolled in the mesh,
//!   `legacy` (shop/legacy) is listed but not enrolled, and `reviews-v1` and `reviews-v2`
//!   (shop/reviews, labelled `app: reviews` and `version: v1`/`v2`) are enrolled. Node 2,
//!   linked to node 1 by a veth (the "node network"): `payments` (billing/payments), enrolled.
//!   Each node runs its own agent; both use one state directory, so they share one local CA
//!   (one trust root). `backend`, `legacy` and `payments` run `peer-echo`, which answers with
//!   the client address it sees; the reviews pods run `http-backend`, which answers with its
//!   name.
//! - Traffic: frontend -> backend (same node: handed over inside the agent, one log line),
//!   legacy -> backend (captured on arrival, no identity), frontend -> legacy (captured on
//!   departure, plain TCP), frontend -> payments (HBONE: HTTP/2 CONNECT over mTLS, logged by
//!   both agents with the identities each side proved), then once more over the same pooled
//!   mTLS connection.
//! - Routing: node 1's config declares a Service `reviews` (a VIP, port 80, HTTP) and an
//!   HTTPRoute: `x-user: alice` goes to v2, everything else is split 80/20 between v1 and v2,
//!   with retries on 503. reviews-v2 fails its first request, so alice's request shows a retry;
//!   50 more requests show the split; the "http request" log lines say where each went.
//!   Port 81 of the same Service is declared `appProtocol: http2`, with a route to reviews-v1:
//!   three h2c requests from curl, and node 1's metrics show that the agent served their
//!   connections on its HTTP/2 fast path.
//! - A live policy change on node 2 (payments admits only shop/checkout) refuses
//!   frontend -> payments; node 2's "connection denied" line says who and why.
//! - A live config change unenrols frontend on node 1; a config with a typo is rejected and
//!   the last good one keeps serving.
//! - Metrics: an excerpt of both agents' Prometheus metrics (Istio's request and TCP
//!   counters, enrolled pods, certificate expiry), and `mesh-agent status` for node 1.
//! - Teardown: SIGTERM to both agents, servers stopped, nodes removed, and a `bpftool` check
//!   that none of either agent's `mesh_*` programs are left in the kernel.
//!
//! Every resource is owned by a drop guard, so a failure anywhere still cleans up; every wait
//! has a deadline.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Read as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use mesh_tests::{
    Agent, Node, Pod,
    agent::{AGENT_DEADLINE, config_doc, field, message, number},
    node::NodeLink,
    wait_until,
};
use serde_json::Value;

use crate::{setup, util};

/// The agents' data-plane workers (`--workers` default): HBONE pools are per worker.
const AGENT_WORKERS: usize = 2;
/// The port the demo servers listen on.
const APP_PORT: u16 = 8080;
/// The agents' HBONE port (mesh-common's `HBONE_PORT`), for the story.
const HBONE_PORT: u16 = 15008;
/// The trust domain `config_doc` writes.
const TRUST_DOMAIN: &str = "cluster.local";
/// The AuthorizationPolicy added on node 2, and the only principal it admits.
const POLICY_NAME: &str = "payments-allow-checkout";
const CHECKOUT: &str = "cluster.local/ns/shop/sa/checkout";
/// Width the story is wrapped to when stdout is not a terminal.
const DEFAULT_WIDTH: usize = 92;
/// Label column of the story's per-connection lines.
const LABEL: usize = 10;
/// How long a server may take to start listening.
const SERVER_DEADLINE: Duration = Duration::from_secs(10);
/// How often the build prints a heartbeat when its output is not a terminal.
const HEARTBEAT: Duration = Duration::from_secs(30);
/// The Service the routing part of the story calls, its VIP's last octet (an address of
/// node 1's subnet that no pod has) and the VIPs of its per-version Services.
const REVIEWS: &str = "reviews";
const REVIEWS_VIP: u8 = 200;
const REVIEWS_V1_VIP: u8 = 201;
const REVIEWS_V2_VIP: u8 = 202;
/// The HTTPRoute's weights for v1 and v2 when no rule matches a header.
const SPLIT: (u32, u32) = (80, 20);
/// Requests sent without the header to show the split.
const SPLIT_REQUESTS: u64 = 50;
/// The reviews Services' second port, declared `appProtocol: http2`, and the route on it.
const H2C_PORT: u16 = 81;
const H2C_ROUTE: &str = "reviews-h2c";
/// Requests curl sends to it, one connection each.
const H2C_REQUESTS: usize = 3;
/// Deadline for a client program in a pod (the split's requests) or `mesh-agent status`.
const CLIENT_DEADLINE: Duration = Duration::from_secs(30);

/// The programs the demo runs.
struct Programs {
    agent: PathBuf,
    peer_echo: PathBuf,
    http_backend: PathBuf,
}

pub fn run() -> anyhow::Result<()> {
    let root = util::workspace_root()?;
    let agent_bin = root.join("target/debug/mesh-agent");
    // SAFETY: no other threads exist yet, so nothing reads the environment concurrently.
    unsafe { std::env::set_var("MESH_AGENT_BIN", &agent_bin) };

    setup::run()?;
    // Fail before a long build if the machine cannot run the demo at all.
    mesh_tests::require_privileges()
        .context("the demo needs the same privileges as the end-to-end tests")?;
    build()?;
    let programs = Programs {
        agent: agent_bin,
        peer_echo: root.join("target/debug/peer-echo"),
        http_backend: root.join("target/debug/http-backend"),
    };
    for bin in [&programs.agent, &programs.peer_echo, &programs.http_backend] {
        if !bin.is_file() {
            bail!("{} is missing after the build", bin.display());
        }
    }
    // From here on, Ctrl-C must not skip the cleanup: the first one is only recorded (the
    // agents, the servers and curl, in the same process group, receive it and stop, so the
    // step in progress fails and the drop guards run); a second one ends the demo at once.
    // SAFETY: the handler only stores to an atomic and resets the disposition, both
    // async-signal-safe.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let result = Demo::new().run(&programs);
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted (Ctrl-C); the demo's nodes, pods, servers and agents have been removed");
    }
    result
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    // SAFETY: signal() is async-signal-safe.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
}

/// Builds the agent (with its eBPF programs) and the peer-echo and http-backend servers; only
/// the binaries the demo runs, so work in progress elsewhere in mesh-tests does not hold it up.
fn build() -> anyhow::Result<()> {
    util::step(
        "building mesh-agent with its eBPF programs, and the peer-echo and http-backend servers (a few minutes the first time)",
    );
    // Cargo draws its own progress bar on a terminal; when the output goes to a file or a CI
    // log it can stay silent for minutes, so say that it is still working.
    // SAFETY: isatty has no preconditions.
    let terminal = unsafe { libc::isatty(2) } == 1;
    let done = Arc::new(AtomicBool::new(false));
    let heartbeat = (!terminal).then(|| {
        let done = done.clone();
        thread::spawn(move || {
            let started = Instant::now();
            let mut next = HEARTBEAT;
            while !done.load(Ordering::Relaxed) {
                if started.elapsed() >= next {
                    util::step(&format!(
                        "still building ({} s so far)",
                        started.elapsed().as_secs()
                    ));
                    next += HEARTBEAT;
                }
                thread::park_timeout(Duration::from_millis(200));
            }
        })
    });
    let result = util::cargo(&[
        "build",
        "-p",
        "mesh-agent",
        "-p",
        "mesh-tests",
        "--bin",
        "mesh-agent",
        "--bin",
        "peer-echo",
        "--bin",
        "http-backend",
    ]);
    done.store(true, Ordering::Relaxed);
    if let Some(h) = heartbeat {
        h.thread().unpark();
        let _ = h.join();
    }
    result.context("building the agent and the demo servers")
}

/// A server running in a pod (`peer-echo http PORT`, `http-backend PORT --name NAME`) that
/// prints "listening" once it does; killed when dropped.
struct Server {
    child: Child,
}

impl Server {
    fn start(pod: &Pod, program: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let name = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut child = pod
            .command(program)?
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name} in pod {}", pod.name))?;
        let stdout = child.stdout.take().context("peer-echo stdout")?;
        let mut server = Self { child };
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if line.is_err() || tx.send(line.unwrap_or_default()).is_err() {
                    return;
                }
            }
        });
        let what = format!("{name} to listen on :{APP_PORT} in pod {}", pod.name);
        let ready = wait_until(&what, SERVER_DEADLINE, || match rx.try_recv() {
            Ok(line) if line.trim() == "listening" => Some(true),
            Ok(_) | Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => Some(false),
        })?;
        if !ready {
            let mut err = String::new();
            if let Some(mut stderr) = server.child.stderr.take() {
                let _ = server.child.wait();
                let _ = stderr.read_to_string(&mut err);
            }
            bail!(
                "{name} exited in pod {} before listening: {}",
                pod.name,
                err.trim()
            );
        }
        Ok(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory removed (with its contents) when dropped: the fleet's shared CA lives here.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("trellis-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One demo pod: the harness pod plus what the demo knows about it.
struct DemoPod {
    pod: Pod,
    /// "node 1" or "node 2", as the story calls them.
    node: &'static str,
    namespace: &'static str,
    service_account: &'static str,
    /// Whether the pod starts out enrolled.
    enrolled: bool,
    /// Its labels in the config, as YAML flow mappings' contents; `None` = `app: <name>`.
    labels: Option<&'static str>,
}

impl DemoPod {
    fn name(&self) -> &str {
        &self.pod.name
    }

    fn ip(&self) -> IpAddr {
        IpAddr::V4(self.pod.ip)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip(), APP_PORT)
    }

    /// `namespace/name`, as the agent logs pods.
    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name())
    }

    /// The SPIFFE identity the mesh gives the pod.
    fn identity(&self) -> String {
        format!(
            "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }

    /// The entry in its own node's config.
    fn entry(&self, enrolled: bool) -> String {
        let entry = self
            .pod
            .config_entry(self.namespace, self.service_account, enrolled);
        match self.labels {
            Some(labels) => entry.replace(
                &format!("labels: {{app: {}}}", self.name()),
                &format!("labels: {{{labels}}}"),
            ),
            None => entry,
        }
    }

    /// The entry in the other node's config: where it runs and who it is.
    fn remote_entry(&self, runs_on: &Node) -> String {
        self.pod
            .remote_config_entry(self.namespace, self.service_account, runs_on)
    }
}

/// One node's agent, as the story names it.
#[derive(Clone, Copy)]
struct Side<'a> {
    agent: &'a Agent,
    node: &'static str,
}

/// The kinds of "connection closed" line a connection can produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hop {
    /// Between two enrolled pods of one node: handed over inside the agent, one line.
    Local,
    /// From an enrolled pod to something outside the mesh.
    OutboundPassthrough,
    /// To an enrolled pod from a client outside the mesh.
    InboundPassthrough,
    /// To an enrolled pod on another node: the client side of the HBONE tunnel.
    HboneOut,
    /// From an enrolled pod on another node: the server side of the HBONE tunnel.
    HboneIn,
}

impl Hop {
    fn direction(self) -> &'static str {
        match self {
            Hop::Local | Hop::OutboundPassthrough | Hop::HboneOut => "outbound",
            Hop::InboundPassthrough | Hop::HboneIn => "inbound",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Hop::Local => "local",
            Hop::OutboundPassthrough | Hop::InboundPassthrough => "passthrough",
            Hop::HboneOut | Hop::HboneIn => "hbone",
        }
    }

    fn security(self) -> &'static str {
        match self {
            Hop::HboneOut | Hop::HboneIn => "mutual_tls",
            _ => "none",
        }
    }
}

/// One request the demo sends, and the log lines it should produce.
struct Exchange<'a> {
    title: &'a str,
    client: &'a DemoPod,
    server: &'a DemoPod,
    hops: Vec<(Side<'a>, Hop)>,
    /// Check everything, but leave the telling to the caller.
    quiet: bool,
}

/// What curl in a pod saw.
struct CurlResult {
    status: u16,
    body: String,
    /// The local end of curl's socket: 127.0.0.1 when connect() was steered to the agent.
    local: SocketAddr,
    seconds: f64,
    /// The HTTP version the answer came in: "1.1", "2".
    version: String,
}

/// Runs curl in `pod`; the inner error is curl's own message when the request failed.
fn curl(pod: &Pod, url: &str) -> anyhow::Result<Result<CurlResult, String>> {
    curl_with(pod, &[], url)
}

/// [`curl`] with extra arguments (`-H "x-user: alice"`).
fn curl_with(pod: &Pod, extra: &[&str], url: &str) -> anyhow::Result<Result<CurlResult, String>> {
    let out = pod
        .command("curl")?
        .args([
            "-sS",
            "--max-time",
            "20",
            "-w",
            "\n%{http_code} %{local_ip} %{local_port} %{time_total} %{http_version}",
        ])
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .context("running curl in the pod")?;
    if !out.status.success() {
        return Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text
        .rsplit_once('\n')
        .context("curl printed no status line")?;
    let parts: Vec<&str> = tail.split_whitespace().collect();
    let [status, ip, port, seconds, version] = parts[..] else {
        bail!("unexpected curl status line {tail:?}");
    };
    Ok(Ok(CurlResult {
        status: status.parse().context("curl's HTTP status")?,
        body: body.trim().to_string(),
        local: SocketAddr::new(
            ip.parse().context("curl's local_ip")?,
            port.parse().context("curl's local_port")?,
        ),
        seconds: seconds.parse().unwrap_or(0.0),
        version: version.to_string(),
    }))
}

/// Runs `cmd` to completion and returns its output; kills it and fails if it takes longer than
/// `deadline` or fails.
fn output_within(mut cmd: Command, what: &str, deadline: Duration) -> anyhow::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let status = wait_until(what, deadline, || child.try_wait().ok().flatten());
    let status = match status {
        Ok(status) => status,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    let out = Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// One sample of a Prometheus text exposition.
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Sample {
    fn label(&self, key: &str) -> &str {
        self.labels.get(key).map(String::as_str).unwrap_or("")
    }
}

/// Parses the sample lines of a Prometheus text exposition (comments skipped).
fn parse_metrics(text: &str) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || anyhow!("unexpected metrics line {line:?}");
        let (name, labels, rest) = match line.find(['{', ' ']) {
            Some(i) if line[i..].starts_with('{') => {
                let (labels, rest) = parse_labels(&line[i + 1..]).ok_or_else(bad)?;
                (&line[..i], labels, rest)
            }
            Some(i) => (&line[..i], BTreeMap::new(), &line[i..]),
            None => return Err(bad()),
        };
        let value = rest.split_whitespace().next().ok_or_else(bad)?;
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value: value.parse().map_err(|_| bad())?,
        });
    }
    Ok(samples)
}

/// `k="v",k2="v2"}rest` -> the labels and `rest`.
fn parse_labels(text: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim().to_string(), value);
        rest = &after[end + 1..];
    }
}

/// The sum of the `name` samples passing `keep`, grouped by the values of `by`.
fn sum_by(
    samples: &[Sample],
    name: &str,
    keep: impl Fn(&Sample) -> bool,
    by: &[&str],
) -> BTreeMap<Vec<String>, f64> {
    let mut sums = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == name && keep(s)) {
        let key = by.iter().map(|k| s.label(k).to_string()).collect();
        *sums.entry(key).or_insert(0.0) += s.value;
    }
    sums
}

/// One agent's Prometheus metrics: the URL scraped, the text and its samples.
fn scrape(side: Side<'_>) -> anyhow::Result<(String, String, Vec<Sample>)> {
    let addr = side.agent.metrics_addr()?;
    let url = format!("http://{addr}/metrics");
    let text = util::output(
        "curl",
        &["-s", "--max-time", "10", "-H", "Accept: text/plain", &url],
    )
    .with_context(|| format!("scraping {}'s metrics", side.node))?;
    let samples =
        parse_metrics(&text).with_context(|| format!("reading {}'s metrics", side.node))?;
    Ok((url, text, samples))
}

/// A `mesh_*` eBPF program in the kernel, as `bpftool prog show` lists it.
struct MeshProgram {
    id: u64,
    name: String,
    /// (pid, command) of the processes holding it, when bpftool can tell.
    holders: Vec<(u64, String)>,
}

/// The `mesh_*` programs in the kernel.
fn mesh_programs() -> anyhow::Result<Vec<MeshProgram>> {
    let text = util::output("bpftool", &["prog", "show", "--json"])?;
    let progs: Value = serde_json::from_str(&text).context("parsing `bpftool prog show --json`")?;
    Ok(progs
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|p| field(p, "name").starts_with("mesh_"))
        .map(|p| {
            let holders = p
                .get("pids")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|h| (number(h, "pid").unwrap_or(0), field(h, "comm").to_string()))
                .collect();
            MeshProgram {
                id: number(p, "id").unwrap_or(0),
                name: field(p, "name").to_string(),
                holders,
            }
        })
        .collect())
}

/// Whether the agent process is still running (it is our child: a zombie once it exited).
fn agent_alive(agent: &Agent) -> bool {
    let Some(pid) = agent.pid() else { return false };
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// The last lines of the agent's log, for error messages.
fn log_tail(agent: &Agent) -> String {
    let text = agent.log_text();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Starts an agent on the fleet's shared state directory and returns it with the ids of the
/// `mesh_*` programs it loaded: those its pid holds (bpftool shows holders when built with
/// that support), else those that appeared since it started.
fn start_agent(
    name: &str,
    config: &str,
    state_dir: &Path,
) -> anyhow::Result<(Agent, BTreeSet<u64>)> {
    let before: BTreeSet<u64> = mesh_programs()?.into_iter().map(|p| p.id).collect();
    let agent = Agent::start_with_state_dir(name, config, Some(state_dir))?;
    let pid = u64::from(agent.pid().context("the agent is not running")?);
    let ours = mesh_programs()?
        .into_iter()
        .filter(|p| {
            if p.holders.is_empty() {
                !before.contains(&p.id)
            } else {
                p.holders.iter().any(|(holder, _)| *holder == pid)
            }
        })
        .map(|p| p.id)
        .collect();
    Ok((agent, ours))
}

/// Waits until the events logged after `from` contain, for each predicate, a distinct match;
/// returns the matches in predicate order.
fn wait_for_new_events(
    agent: &Agent,
    from: usize,
    what: &str,
    wanted: &[&dyn Fn(&Value) -> bool],
) -> anyhow::Result<Vec<Value>> {
    let found = wait_until(what, AGENT_DEADLINE, || {
        let events = agent.events();
        let new = events.get(from..).unwrap_or_default();
        let mut used = BTreeSet::new();
        let mut out = Vec::new();
        for want in wanted {
            match new
                .iter()
                .enumerate()
                .find(|(i, e)| !used.contains(i) && want(e))
            {
                Some((i, e)) => {
                    used.insert(i);
                    out.push(e.clone());
                }
                None if !agent_alive(agent) => return Some(Err(anyhow!("the agent exited"))),
                None if INTERRUPTED.load(Ordering::SeqCst) => {
                    return Some(Err(anyhow!("interrupted")));
                }
                None => return None,
            }
        }
        Some(Ok(out))
    });
    match found {
        Ok(Ok(events)) => Ok(events),
        Ok(Err(e)) | Err(e) => Err(e.context(format!(
            "waiting for {what}; last agent log lines:\n{}",
            log_tail(agent)
        ))),
    }
}

/// Waits for one new event matching `wanted`.
fn wait_for_new_event(
    agent: &Agent,
    from: usize,
    what: &str,
    wanted: &dyn Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    wait_for_new_events(agent, from, what, &[wanted])?
        .pop()
        .context("no event")
}

/// Rewrites the agent's config and waits until it is applied; fails if it is rejected.
/// Returns the "config applied" event and how long the agent took to apply it.
fn apply_config(agent: &Agent, config: &str, what: &str) -> anyhow::Result<(Value, Duration)> {
    let before = agent.events().len();
    let written = Instant::now();
    agent.write_config(config)?;
    let event = wait_for_new_event(agent, before, what, &|e: &Value| {
        message(e) == "config applied" || message(e).starts_with("config rejected")
    })?;
    if message(&event) != "config applied" {
        bail!(
            "{what}: the agent rejected the config: {}: {}",
            field(&event, "field"),
            field(&event, "reason")
        );
    }
    Ok((event, written.elapsed()))
}

fn is_connection(e: &Value, direction: &str) -> bool {
    message(e) == "connection closed" && field(e, "direction") == direction
}

fn ip_of(addr: &str) -> Option<IpAddr> {
    addr.parse::<SocketAddr>().ok().map(|a| a.ip())
}

/// `shop/frontend` -> `frontend`; empty stays empty.
fn short(pod_key: &str) -> &str {
    pod_key.rsplit('/').next().unwrap_or(pod_key)
}

fn bytes(n: u64) -> String {
    if n < 10 * 1024 {
        format!("{n} B")
    } else {
        format!("{:.1} KiB", n as f64 / 1024.0)
    }
}

/// The terminal's width (within reason), else [`DEFAULT_WIDTH`].
fn width() -> usize {
    // SAFETY: TIOCGWINSZ fills the winsize it is given; isatty has no preconditions.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::isatty(1) == 1 && libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_col > 0 {
            return usize::from(ws.ws_col).clamp(72, 100);
        }
    }
    DEFAULT_WIDTH
}

/// Prints `text` wrapped to the [`width`], with `label` in a column of its own.
fn say(label: &str, text: &str) {
    let width = width();
    let indent = 3 + LABEL;
    let mut line = String::new();
    let mut label = label;
    let flush = |line: &mut String, label: &mut &str| {
        println!("   {:<LABEL$}{line}", *label);
        line.clear();
        *label = "";
    };
    for word in text.split_whitespace() {
        if !line.is_empty() && indent + line.len() + 1 + word.len() > width {
            flush(&mut line, &mut label);
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        flush(&mut line, &mut label);
    }
}

/// Prints a paragraph wrapped to the [`width`] with a small indent.
fn para(text: &str) {
    let width = width();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && 1 + line.len() + 1 + word.len() > width {
            println!(" {line}");
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        println!(" {line}");
    }
}

fn header(title: &str) {
    println!();
    println!("{title}");
    println!("{}", "-".repeat(title.len()));
}

/// Node 1's Services and HTTPRoute for the routing part of the story.
struct Routing {
    /// What node 1's config carries.
    config: String,
    /// What the story shows of it: the per-version Services summed up in a comment.
    shown: String,
}

impl Routing {
    /// `vip(octet)`: the address of node 1's subnet ending in `octet`.
    fn yaml(vip: impl Fn(u8) -> Ipv4Addr) -> Self {
        let service = |name: &str, octet: u8, selector: &str| {
            format!(
                "  - name: {name}\n    namespace: shop\n    vips: [{}]\n    selector: {{{selector}}}\n    ports:\n      - {{name: http, port: 80, targetPort: {APP_PORT}, appProtocol: http}}\n      - {{name: http2, port: {H2C_PORT}, targetPort: {APP_PORT}, appProtocol: http2}}\n",
                vip(octet)
            )
        };
        let reviews = service(REVIEWS, REVIEWS_VIP, "app: reviews");
        let versions = service("reviews-v1", REVIEWS_V1_VIP, "app: reviews, version: v1")
            + &service("reviews-v2", REVIEWS_V2_VIP, "app: reviews, version: v2");
        let (w1, w2) = SPLIT;
        let route = format!(
            "httpRoutes:\n  - name: {REVIEWS}\n    namespace: shop\n    parentRefs: [{{name: {REVIEWS}, port: 80}}]\n    rules:\n      - matches: [{{headers: [{{name: x-user, value: alice}}]}}]\n        backendRefs: [{{name: reviews-v2, port: 80}}]\n        retry: {{attempts: 2, codes: [503]}}\n      - backendRefs:\n          - {{name: reviews-v1, port: 80, weight: {w1}}}\n          - {{name: reviews-v2, port: 80, weight: {w2}}}\n        retry: {{attempts: 2, codes: [503]}}\n  - name: {H2C_ROUTE}\n    namespace: shop\n    parentRefs: [{{name: {REVIEWS}, port: {H2C_PORT}}}]\n    rules: [{{backendRefs: [{{name: reviews-v1, port: {H2C_PORT}}}]}}]\n"
        );
        Self {
            config: format!("services:\n{reviews}{versions}{route}"),
            shown: format!(
                "services:\n{reviews}  # and reviews-v1 ({}), reviews-v2 ({}) alike,\n  # selecting {{app: reviews, version: v1}} and {{..., version: v2}}\n{route}",
                vip(REVIEWS_V1_VIP),
                vip(REVIEWS_V2_VIP),
            ),
        }
    }
}

/// Collects what did not go as the mesh promises; the demo fails at the end if any.
struct Demo {
    problems: Vec<String>,
    connections: usize,
    /// Whether the story has said why servers see themselves as 127.0.0.1.
    loopback_explained: bool,
}

impl Demo {
    fn new() -> Self {
        Self {
            problems: Vec::new(),
            connections: 0,
            loopback_explained: false,
        }
    }

    fn check(&mut self, ok: bool, problem: impl FnOnce() -> String) {
        if !ok {
            let p = problem();
            say("!!", &format!("unexpected: {p}"));
            self.problems.push(p);
        }
    }

    fn run(mut self, programs: &Programs) -> anyhow::Result<()> {
        util::step(
            "creating two linked nodes (network namespaces with a bridge each) and six pods",
        );
        let mut n1 = Node::new()?;
        let mut n2 = Node::new()?;
        let link = n1.link(&n2)?;
        let pod = |node: &mut Node, label, name, namespace, service_account, enrolled| {
            Ok::<_, anyhow::Error>(DemoPod {
                pod: node.add_pod(name)?,
                node: label,
                namespace,
                service_account,
                enrolled,
                labels: None,
            })
        };
        let frontend = pod(&mut n1, "node 1", "frontend", "shop", "frontend", true)?;
        let backend = pod(&mut n1, "node 1", "backend", "shop", "backend", true)?;
        let legacy = pod(&mut n1, "node 1", "legacy", "shop", "legacy", false)?;
        let reviews_v1 = DemoPod {
            labels: Some("app: reviews, version: v1"),
            ..pod(&mut n1, "node 1", "reviews-v1", "shop", REVIEWS, true)?
        };
        let reviews_v2 = DemoPod {
            labels: Some("app: reviews, version: v2"),
            ..pod(&mut n1, "node 1", "reviews-v2", "shop", REVIEWS, true)?
        };
        let payments = pod(&mut n2, "node 2", "payments", "billing", "payments", true)?;
        util::step(&format!(
            "starting peer-echo HTTP servers on :{APP_PORT} in backend, legacy and payments, and http-backend in reviews-v1 and reviews-v2"
        ));
        let port = APP_PORT.to_string();
        let peer_echo = |p: &DemoPod| Server::start(&p.pod, &programs.peer_echo, &["http", &port]);
        let backend_server = peer_echo(&backend)?;
        let legacy_server = peer_echo(&legacy)?;
        let payments_server = peer_echo(&payments)?;
        let reviews_v1_server = Server::start(
            &reviews_v1.pod,
            &programs.http_backend,
            &[&port, "--name", reviews_v1.name()],
        )?;
        // v2 answers its first request with 503, so the route's retry policy has work to do.
        let reviews_v2_server = Server::start(
            &reviews_v2.pod,
            &programs.http_backend,
            &[&port, "--name", reviews_v2.name(), "--fail-first", "1"],
        )?;

        // Each agent's config lists its own pods and, for routing, the other node's; node 1's
        // also declares the reviews Services and their HTTPRoute.
        let vip = |octet: u8| Ipv4Addr::new(n1.subnet[0], n1.subnet[1], n1.subnet[2], octet);
        let routing = Routing::yaml(vip);
        let config1 = |frontend_entry: String| {
            config_doc(
                &n1.id,
                &[
                    frontend_entry,
                    backend.entry(true),
                    legacy.entry(false),
                    reviews_v1.entry(true),
                    reviews_v2.entry(true),
                    payments.remote_entry(&n2),
                ],
            ) + &routing.config
        };
        let config2 = |policies: &str| {
            config_doc(
                &n2.id,
                &[
                    payments.entry(true),
                    frontend.remote_entry(&n1),
                    backend.remote_entry(&n1),
                ],
            ) + policies
        };
        let fleet = TempDir::new("demo-fleet-ca")?;
        util::step("starting one mesh-agent per node, both on one state directory (one shared CA)");
        let (mut a1, ours1) = start_agent("demo-node1", &config1(frontend.entry(true)), &fleet.0)?;
        let (mut a2, ours2) = start_agent("demo-node2", &config2(""), &fleet.0)?;
        let ours: BTreeSet<u64> = ours1.union(&ours2).copied().collect();
        let s1 = Side {
            agent: &a1,
            node: "node 1",
        };
        let s2 = Side {
            agent: &a2,
            node: "node 2",
        };

        self.introduce(
            [&n1, &n2],
            &link,
            &[
                &frontend,
                &backend,
                &legacy,
                &reviews_v1,
                &reviews_v2,
                &payments,
            ],
            [(s1, ours1.len()), (s2, ours2.len())],
            &fleet.0,
        )?;

        header("Traffic");
        para(
            "Each request is one TCP connection. The agents log one \"connection closed\" line per connection they carry: which way it went (outbound from the pod that called, or inbound to the pod called), its path (local, hbone or passthrough), its security, and who was at each end. Here is what those lines say.",
        );
        self.exchange(Exchange {
            title: "frontend -> backend    (same node, both in the mesh)",
            client: &frontend,
            server: &backend,
            hops: vec![(s1, Hop::Local)],
            quiet: false,
        })?;
        self.exchange(Exchange {
            title: "legacy -> backend      (a client outside the mesh)",
            client: &legacy,
            server: &backend,
            hops: vec![(s1, Hop::InboundPassthrough)],
            quiet: false,
        })?;
        self.exchange(Exchange {
            title: "frontend -> legacy     (a destination outside the mesh)",
            client: &frontend,
            server: &legacy,
            hops: vec![(s1, Hop::OutboundPassthrough)],
            quiet: false,
        })?;
        // Long after the first connection ended: the same-node handover must not have been
        // captured a second time on arrival at backend.
        let twice = a1
            .events()
            .iter()
            .filter(|e| {
                is_connection(e, "inbound") && ip_of(field(e, "src.addr")) == Some(frontend.ip())
            })
            .count();
        self.check(twice == 0, || {
            format!("{twice} connection(s) from frontend were also captured on arrival at node 1")
        });
        self.exchange(Exchange {
            title: "frontend -> payments   (another node: HBONE over mutual TLS)",
            client: &frontend,
            server: &payments,
            hops: vec![(s1, Hop::HboneOut), (s2, Hop::HboneIn)],
            quiet: false,
        })?;
        let established = |a: &Agent| -> Vec<Value> {
            a.events()
                .into_iter()
                .filter(|e| message(e) == "HBONE connection established")
                .collect()
        };
        let tunnels = established(&a1);
        if let Some(t) = tunnels.first() {
            say(
                "tunnel",
                &format!(
                    "node 1 logged \"HBONE connection established\": {} -> {}, to {} (payments' HBONE port), dialled from inside frontend's pod",
                    field(t, "src.identity"),
                    field(t, "dst.identity"),
                    field(t, "peer"),
                ),
            );
        }
        self.check(
            tunnels.len() == 1
                && field(&tunnels[0], "src.identity") == frontend.identity()
                && field(&tunnels[0], "dst.identity") == payments.identity(),
            || {
                format!(
                    "node 1 logged {} \"HBONE connection established\" line(s) for frontend -> payments, expected one",
                    tunnels.len()
                )
            },
        );
        self.exchange(Exchange {
            title: "frontend -> payments   again",
            client: &frontend,
            server: &payments,
            hops: vec![(s1, Hop::HboneOut), (s2, Hop::HboneIn)],
            quiet: true,
        })?;
        let tunnels_after = established(&a1).len();
        say(
            "pool",
            &format!(
                "HTTP 200 again, logged by both agents over HBONE; node 1 logged \"HBONE connection established\" {} in all: {}",
                times(tunnels_after),
                if tunnels_after == 1 {
                    "the second connection was one more HTTP/2 CONNECT stream on the pooled mTLS connection, no new handshake"
                } else {
                    "the other data-plane worker accepted the second connection, and each worker pools its own HBONE connection (so a relay and its tunnel share a thread)"
                },
            ),
        );
        // Pools are per data-plane worker (2 by default); which worker accepts a
        // connection is up to the kernel.
        self.check(tunnels_after <= AGENT_WORKERS, || {
            format!(
                "frontend -> payments opened {tunnels_after} HBONE connections for two requests, more than one per worker ({AGENT_WORKERS})"
            )
        });

        self.routing(
            s1,
            &frontend,
            [&reviews_v1, &reviews_v2],
            vip(REVIEWS_VIP),
            &routing.shown,
        )?;
        self.h2c(s1, &frontend, &reviews_v1, vip(REVIEWS_VIP))?;

        header("A live policy change on node 2: payments admits checkout only");
        let policy = format!(
            "authorizationPolicies:\n  - name: {POLICY_NAME}\n    namespace: billing\n    selector: {{matchLabels: {{app: payments}}}}\n    action: ALLOW\n    rules:\n      - from: [{{source: {{principals: [\"{CHECKOUT}\"]}}}}]\n"
        );
        para(&format!(
            "The demo appends an AuthorizationPolicy, in Istio's shape, to node 2's config ({}):",
            a2.config_path.display()
        ));
        println!();
        for line in policy.lines() {
            println!("      {line}");
        }
        println!();
        let (applied, took) = apply_config(&a2, &config2(&policy), "node 2 to apply the policy")?;
        para(&format!(
            "Node 2's agent, which watches the file, logged \"config applied\" {} ms later ({} pods, {} enrolled); nothing restarted. payments now has an ALLOW policy, so only the callers it names get in, and frontend is shop/frontend, not shop/checkout:",
            took.as_millis(),
            number(&applied, "pods").unwrap_or(0),
            number(&applied, "enrolled").unwrap_or(0),
        ));
        self.refused(
            "frontend -> payments   (after the policy change)",
            &frontend,
            &payments,
            s1,
            s2,
        )?;

        header("A live config change: frontend leaves the mesh");
        let before = a1.events().len();
        let written = Instant::now();
        a1.write_config(&config1(frontend.entry(false)))?;
        let [unenrolled, applied] = <[Value; 2]>::try_from(wait_for_new_events(
            &a1,
            before,
            "node 1's agent to unenrol frontend",
            &[
                &|e: &Value| message(e) == "pod unenrolled" && short(field(e, "pod")) == "frontend",
                &|e: &Value| message(e) == "config applied",
            ],
        )?)
        .map_err(|_| anyhow!("expected two events"))?;
        para(&format!(
            "The demo rewrote node 1's config ({}) with frontend's `enrolled: false`. Node 1's agent logged \"pod unenrolled\" for {} {} ms later and then \"config applied\" ({} pods, {} enrolled): frontend's eBPF programs are detached; no restart, nothing else disturbed. frontend is now a client from outside the mesh:",
            a1.config_path.display(),
            field(&unenrolled, "pod"),
            written.elapsed().as_millis(),
            number(&applied, "pods").unwrap_or(0),
            number(&applied, "enrolled").unwrap_or(0),
        ));
        let unenrol_index = a1.events().len();
        self.exchange(Exchange {
            title: "frontend -> backend again   (frontend no longer enrolled)",
            client: &frontend,
            server: &backend,
            hops: vec![(s1, Hop::InboundPassthrough)],
            quiet: false,
        })?;

        header("A bad config is rejected");
        let typo = frontend
            .entry(false)
            .replace("enrolled: false", "enrolled: ture");
        let before = a1.events().len();
        a1.write_config(&config1(typo))?;
        let rejected = wait_for_new_event(
            &a1,
            before,
            "node 1's agent to reject the bad config",
            &|e: &Value| message(e) == "config rejected; still serving the last good config",
        )?;
        para(&format!(
            "Someone tries to put frontend back but types `enrolled: ture`. Node 1's agent logs \"config rejected; still serving the last good config\" and names the field: {} ({}). Traffic is unaffected:",
            field(&rejected, "field"),
            field(&rejected, "reason"),
        ));
        self.exchange(Exchange {
            title: "frontend -> backend once more   (last good config still in force)",
            client: &frontend,
            server: &backend,
            hops: vec![(s1, Hop::InboundPassthrough)],
            quiet: false,
        })?;
        // Long after those connections ended: the log must hold no outbound capture for
        // frontend since it was unenrolled.
        let late = a1
            .events()
            .get(unenrol_index..)
            .unwrap_or_default()
            .iter()
            .filter(|e| is_connection(e, "outbound") && short(field(e, "src.pod")) == "frontend")
            .count();
        self.check(late == 0, || {
            format!(
                "{late} outbound connection(s) from frontend were captured after it was unenrolled"
            )
        });

        self.metrics([s1, s2])?;
        self.status(
            &programs.agent,
            s1,
            &[&frontend, &backend, &legacy, &reviews_v1, &reviews_v2],
        )?;

        header("Teardown");
        util::step("stopping both agents (SIGTERM)");
        for (node, agent) in [("node 1", &mut a1), ("node 2", &mut a2)] {
            let status = agent.terminate()?;
            let stopped = agent.count_events(|e| message(e) == "all pods detached") > 0;
            say(
                node,
                &match (status.success(), stopped) {
                    (true, true) => {
                        "the agent stopped cleanly after logging \"all pods detached\" (links unpinned, maps removed)"
                            .to_string()
                    }
                    (_, true) => format!(
                        "the agent logged \"all pods detached\" but exited with {status}"
                    ),
                    (_, false) => {
                        format!("the agent exited with {status} without logging \"all pods detached\"")
                    }
                },
            );
            self.check(status.success() && stopped, || {
                format!("{node}'s agent did not stop cleanly ({status})")
            });
        }
        util::step("stopping the servers and removing both nodes (namespaces, veths, cgroups)");
        drop(backend_server);
        drop(legacy_server);
        drop(payments_server);
        drop(reviews_v1_server);
        drop(reviews_v2_server);
        let namespaces = [n1.netns.clone(), n2.netns.clone()];
        drop(n1);
        drop(n2);
        let left: Vec<&String> = namespaces
            .iter()
            .filter(|ns| Path::new("/var/run/netns").join(ns).exists())
            .collect();
        say(
            "nodes",
            &if left.is_empty() {
                "removed: their network namespaces, veths and cgroups are gone".to_string()
            } else {
                format!("still there: {left:?}")
            },
        );
        self.check(left.is_empty(), || {
            format!("network namespace(s) {left:?} still exist")
        });
        drop(a1);
        drop(a2);
        drop(fleet);

        if !self.problems.is_empty() {
            header("Not as expected");
            for p in &self.problems {
                say("-", p);
            }
        }
        println!();
        // Freeing programs is asynchronous in the kernel: wait for ours to go.
        let left = wait_until(
            "the agents' eBPF programs to be freed",
            AGENT_DEADLINE,
            || {
                let progs = mesh_programs().ok()?;
                progs.iter().all(|p| !ours.contains(&p.id)).then_some(progs)
            },
        );
        match left {
            Ok(progs) if progs.is_empty() => {
                println!("bpftool prog show: no mesh_* program is left in the kernel");
            }
            Ok(progs) => {
                let holders: BTreeSet<String> = progs
                    .iter()
                    .flat_map(|p| {
                        p.holders
                            .iter()
                            .map(|(pid, comm)| format!("{comm} pid {pid}"))
                    })
                    .collect();
                let holders = if holders.is_empty() {
                    "no process".to_string()
                } else {
                    holders.into_iter().collect::<Vec<_>>().join(", ")
                };
                println!(
                    "bpftool prog show: none of this demo's {} mesh_* programs is left ({} other mesh_* programs belong to {holders}, not to this demo)",
                    ours.len(),
                    progs.len()
                );
            }
            Err(e) => {
                let remaining = mesh_programs().unwrap_or_default();
                let names: Vec<String> = remaining
                    .iter()
                    .filter(|p| ours.contains(&p.id))
                    .map(|p| format!("{} (id {})", p.name, p.id))
                    .collect();
                println!(
                    "bpftool prog show: the agents' programs are still loaded: {}",
                    names.join(", ")
                );
                return Err(e.context("the agents' eBPF programs outlived them"));
            }
        }
        if !self.problems.is_empty() {
            bail!(
                "the demo ran, but {} thing(s) were not as expected (see above)",
                self.problems.len()
            );
        }
        Ok(())
    }

    fn introduce(
        &mut self,
        nodes: [&Node; 2],
        link: &NodeLink,
        pods: &[&DemoPod],
        sides: [(Side<'_>, usize); 2],
        state_dir: &Path,
    ) -> anyhow::Result<()> {
        let side = |node: &str| {
            sides
                .iter()
                .map(|(s, _)| *s)
                .find(|s| s.node == node)
                .context("no agent for the node")
        };
        header("The demo nodes");
        para(&format!(
            "Two nodes, each a network namespace with a bridge br0 (node 1: {}/24, node 2: {}/24), joined by a veth, the \"node network\" ({} <-> {}), with routes to each other's pods. Each pod is a network namespace plus a cgroup. backend, legacy and payments run peer-echo, an HTTP server on :{APP_PORT} that answers with the client address it sees; reviews-v1 and reviews-v2, two versions of one app, run http-backend, an HTTP server on :{APP_PORT} that answers with its name.",
            nodes[0].gateway(),
            nodes[1].gateway(),
            link.a,
            link.b,
        ));
        println!();
        println!(
            "   {:<12}{:<8}{:<15}{:<6}identity (its agent's \"pod enrolled\" log)",
            "pod", "node", "address", "mesh"
        );
        for p in pods {
            let events = side(p.node)?.agent.events();
            let enrolled = events
                .iter()
                .find(|e| message(e) == "pod enrolled" && field(e, "pod") == p.key());
            let (mesh, identity) = match enrolled {
                Some(e) => ("yes", field(e, "identity").to_string()),
                None => ("no", "-".to_string()),
            };
            println!(
                "   {:<12}{:<8}{:<15}{:<6}{}",
                p.name(),
                p.node,
                p.pod.ip,
                mesh,
                identity
            );
            self.check(enrolled.is_some() == p.enrolled, || {
                format!(
                    "{} is {}enrolled",
                    p.name(),
                    if p.enrolled { "not " } else { "" }
                )
            });
            if p.enrolled {
                self.check(identity == p.identity(), || {
                    format!("{} was enrolled as {identity}", p.name())
                });
                let issued = events
                    .iter()
                    .filter(|e| {
                        message(e) == "certificate issued" && field(e, "identity") == p.identity()
                    })
                    .count();
                self.check(issued == 1, || {
                    format!(
                        "{}'s agent issued {issued} certificates for {}",
                        p.node,
                        p.identity()
                    )
                });
            }
        }
        println!();
        para(&format!(
            "Each node runs its own mesh-agent. Both were started with --state-dir {}, where the local CA keeps its root: one CA signs both agents' certificates, so each trusts the other's, like a fleet with one trust root.",
            state_dir.display()
        ));
        println!();
        for (s, programs) in sides {
            let events = s.agent.events();
            let enrolled: Vec<&str> = events
                .iter()
                .filter(|e| message(e) == "pod enrolled")
                .map(|e| short(field(e, "pod")))
                .collect();
            let links: u64 = events
                .iter()
                .filter(|e| message(e) == "pod enrolled")
                .filter_map(|e| number(e, "bpf_links"))
                .sum();
            let issued: Vec<String> = events
                .iter()
                .filter(|e| message(e) == "certificate issued")
                .map(|e| {
                    let id = field(e, "identity");
                    id.strip_prefix(&format!("spiffe://{TRUST_DOMAIN}/"))
                        .unwrap_or(id)
                        .to_string()
                })
                .collect();
            let ready = events.iter().find(|e| message(e) == "agent ready");
            let known = ready.and_then(|e| number(e, "pods")).unwrap_or(0);
            let ca = if events
                .iter()
                .any(|e| message(e) == "created a local root CA")
            {
                "created the local root CA in that directory"
            } else {
                "found the CA node 1's agent had created there and loaded it"
            };
            say(
                s.node,
                &format!(
                    "mesh-agent (pid {}) loaded {programs} eBPF programs and attached them to {} ({links} BPF links); its \"agent ready\" line counts {} enrolled of the {known} pods in its config. It {ca}, and logged \"certificate issued\" for {}.",
                    s.agent.pid().unwrap_or(0),
                    and_list(&enrolled),
                    ready.and_then(|e| number(e, "enrolled")).unwrap_or(0),
                    and_list(&issued.iter().map(String::as_str).collect::<Vec<_>>()),
                ),
            );
        }
        let second_ca = sides[1]
            .0
            .agent
            .count_events(|e| message(e) == "created a local root CA");
        self.check(second_ca == 0, || {
            "node 2's agent created its own CA instead of sharing node 1's".to_string()
        });

        header("How connections travel");
        for line in [
            "   node 1                                            node 2",
            "   +--------------------------------------------+    +-------------------------------+",
            "   |  frontend pod           backend pod        |    |  payments pod                 |",
            "   |    curl                   peer-echo :8080  |    |    peer-echo :8080            |",
            "   |     | connect()            ^ sees          |    |     ^ sees frontend's IP      |",
            "   |     v eBPF connect4 hook   | frontend's IP |    |     |                         |",
            "   |    mesh-agent              |               |    |    mesh-agent, HBONE side     |",
            "   |     |  same node: handed --+               |    |     ^ verifies the client's   |",
            "   |     |  over inside the agent: no TLS,      |    |     | certificate, checks     |",
            "   |     |  backend's policies checked          |    |     | payments' policies      |",
            "   +-----|--------------------------------------+    +-----|-------------------------+",
            "         | other node: HBONE, an HTTP/2 CONNECT stream     |",
            "         +======== over mTLS, across the node link ========+ to payments:15008",
        ] {
            println!("{line}");
        }
        println!();
        para(
            "Each agent is one process per node; its \"sides\" are listening sockets it opened inside each enrolled pod's network namespace. Between two pods of one node, the agent hands the connection from one to the other itself. To a pod on another node, it opens an mTLS connection from the client's pod to the server pod's HBONE port, where the other agent checks the certificate and the policies. A pod outside the mesh has no such sockets and no eBPF programs: its traffic goes straight through.",
        );
        Ok(())
    }

    /// Sends one request and tells what the agents and the server saw.
    fn exchange(&mut self, x: Exchange<'_>) -> anyhow::Result<Vec<Value>> {
        self.connections += 1;
        println!();
        println!(" {}. {}", self.connections, x.title);
        let url = format!("http://{}/", x.server.addr());
        let befores: Vec<usize> = x.hops.iter().map(|(s, _)| s.agent.events().len()).collect();
        let got = curl(&x.client.pod, &url)
            .with_context(|| format!("sending {}", x.name()))?
            .map_err(|e| anyhow!("{}: curl in {} failed: {e}", x.name(), x.client.name()))?;
        let steered = x.hops.iter().any(|(_, h)| h.direction() == "outbound");
        let redirected = got.local.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST);
        if !x.quiet {
            say(
                "curl",
                &format!(
                    "in {}: GET {url} -> HTTP {} in {}; its socket's local end: {}, {}",
                    x.client.name(),
                    got.status,
                    millis((got.seconds * 1000.0) as u64),
                    got.local,
                    if redirected {
                        "so connect() was steered to the agent"
                    } else {
                        "a direct connection"
                    },
                ),
            );
        }
        self.check(got.status == 200, || {
            format!("{} got HTTP {}", x.name(), got.status)
        });
        self.check(redirected == steered, || {
            format!(
                "curl in {} was {}redirected to the agent",
                x.client.name(),
                if redirected { "" } else { "not " }
            )
        });

        let client_ip = x.client.ip();
        let server_addr = x.server.addr().to_string();
        let mut events = Vec::new();
        for ((side, hop), before) in x.hops.iter().zip(befores) {
            let direction = hop.direction();
            let e = wait_for_new_event(
                side.agent,
                before,
                &format!("{}'s log line for {}", side.node, x.name()),
                &|e: &Value| {
                    is_connection(e, direction)
                        && field(e, "dst.original") == server_addr
                        && ip_of(field(e, "src.addr")) == Some(client_ip)
                },
            )?;
            if !x.quiet {
                say(side.node, &describe(&x, *hop, &e));
            }
            self.check_hop(&x, side.node, *hop, &e);
            events.push(e);
        }

        // peer-echo's answer: "peer=IP:PORT local=IP:PORT".
        let addr = |key: &str| {
            got.body
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|a| a.parse::<SocketAddr>().ok())
        };
        match (addr("peer="), addr("local=")) {
            (Some(peer), Some(local)) => {
                let real = peer.ip() == client_ip;
                if !x.quiet {
                    say(
                        "server",
                        &format!(
                            "peer-echo in {} saw the client as {peer}{}{}",
                            x.server.name(),
                            if !real {
                                format!(", not {} address {client_ip}!", poss(x.client.name()))
                            } else if x.client.node != x.server.node {
                                format!(": {} real address, across nodes", poss(x.client.name()))
                            } else {
                                format!(": {} real address", poss(x.client.name()))
                            },
                            if local.ip().is_loopback() && !self.loopback_explained {
                                format!(
                                    " (and itself as {local}: the agent hands connections to the app over the pod's loopback)"
                                )
                            } else {
                                String::new()
                            },
                        ),
                    );
                    self.loopback_explained |= local.ip().is_loopback();
                }
                self.check(real, || {
                    format!(
                        "{} saw {} instead of {client_ip}",
                        x.server.name(),
                        peer.ip()
                    )
                });
            }
            _ => {
                say("server", &format!("answered {:?}", got.body));
                self.check(false, || {
                    format!("unexpected answer from {}: {:?}", x.server.name(), got.body)
                });
            }
        }
        Ok(events)
    }

    /// What every "connection closed" line of `hop` must say.
    fn check_hop(&mut self, x: &Exchange<'_>, node: &str, hop: Hop, e: &Value) {
        let src_identity = if hop == Hop::InboundPassthrough {
            String::new()
        } else {
            x.client.identity()
        };
        let dst_identity = if hop == Hop::OutboundPassthrough {
            String::new()
        } else {
            x.server.identity()
        };
        for (name, want) in [
            ("path", hop.path()),
            ("security", hop.security()),
            ("src.identity", src_identity.as_str()),
            ("dst.identity", dst_identity.as_str()),
            ("error", ""),
        ] {
            let got = field(e, name);
            self.check(got == want, || {
                format!(
                    "{node}'s {} line for {} has {name} {got:?}, expected {want:?}",
                    hop.direction(),
                    x.name()
                )
            });
        }
    }

    /// Sends one request that a policy must refuse, and tells what each agent logged.
    fn refused(
        &mut self,
        title: &str,
        client: &DemoPod,
        server: &DemoPod,
        src: Side<'_>,
        dst: Side<'_>,
    ) -> anyhow::Result<()> {
        self.connections += 1;
        println!();
        println!(" {}. {title}", self.connections);
        let name = title.split("  ").next().unwrap_or(title).trim();
        let url = format!("http://{}/", server.addr());
        let src_before = src.agent.events().len();
        let dst_before = dst.agent.events().len();
        match curl(&client.pod, &url).with_context(|| format!("sending {name}"))? {
            Ok(got) => {
                say(
                    "curl",
                    &format!(
                        "in {}: GET {url} -> HTTP {}: {}",
                        client.name(),
                        got.status,
                        got.body
                    ),
                );
                bail!("the policy on {} did not stop {name}", dst.node);
            }
            Err(error) => say(
                "curl",
                &format!(
                    "in {}: GET {url} -> no HTTP answer ({error})",
                    client.name()
                ),
            ),
        }
        let server_key = server.key();
        let denial = wait_for_new_event(
            dst.agent,
            dst_before,
            &format!("{}'s \"connection denied\" line", dst.node),
            &|e: &Value| message(e) == "connection denied" && field(e, "dst.pod") == server_key,
        )?;
        let server_addr = server.addr().to_string();
        let client_ip = client.ip();
        let out = wait_for_new_event(
            src.agent,
            src_before,
            &format!("{}'s outbound line for {name}", src.node),
            &|e: &Value| {
                is_connection(e, "outbound")
                    && field(e, "dst.original") == server_addr
                    && ip_of(field(e, "src.addr")) == Some(client_ip)
            },
        )?;

        let policy = field(&denial, "policy");
        let reason = field(&denial, "reason");
        let why = if policy.is_empty() {
            format!(
                "The line names no policy, as none denied it outright; its reason: {reason} (the one ALLOW policy is billing/{POLICY_NAME}, which admits {CHECKOUT} only)"
            )
        } else {
            format!("Policy {policy} decided it: {reason}")
        };
        say(
            dst.node,
            &format!(
                "logged \"connection denied\": {}, the identity {} certificate proved (from {}), may not reach {} on port {}. {why}. The agent answered the HBONE stream with 403 Forbidden; {} app never saw the connection.",
                field(&denial, "src.identity"),
                poss(client.name()),
                field(&denial, "src.addr"),
                field(&denial, "dst.pod"),
                number(&denial, "dst.port").unwrap_or(0),
                poss(server.name()),
            ),
        );
        say(
            src.node,
            &format!(
                "its outbound line (path {}, security {}) ends with the refusal: \"{}\". So the agent closed {} connection without an answer, which is what curl reports.",
                field(&out, "path"),
                field(&out, "security"),
                field(&out, "error"),
                poss(client.name()),
            ),
        );
        let want_identity = client.identity();
        self.check(field(&denial, "src.identity") == want_identity, || {
            format!(
                "the denial names {:?}, expected {want_identity}",
                field(&denial, "src.identity")
            )
        });
        self.check(
            number(&denial, "dst.port") == Some(u64::from(APP_PORT)),
            || format!("the denial names port {:?}", number(&denial, "dst.port")),
        );
        self.check(
            field(&out, "path") == "hbone" && field(&out, "error").contains("403"),
            || {
                format!(
                    "{}'s outbound line for {name} has path {:?} and error {:?}, expected hbone and a 403",
                    src.node,
                    field(&out, "path"),
                    field(&out, "error")
                )
            },
        );
        Ok(())
    }

    /// The routing part of the story: one request as alice, then the split.
    fn routing(
        &mut self,
        side: Side<'_>,
        client: &DemoPod,
        [v1, v2]: [&DemoPod; 2],
        vip: Ipv4Addr,
        shown: &str,
    ) -> anyhow::Result<()> {
        let agent = side.agent;
        let (w1, w2) = SPLIT;
        header("Routing: one Service, two versions");
        para(&format!(
            "Node 1's config ({}) also declares Services, in Kubernetes' shape, and HTTPRoutes, in Gateway API's: shop/{REVIEWS} at the virtual IP {vip}, port 80, speaking HTTP, whose endpoints are the pods labelled app: {REVIEWS} (reviews-v1 and reviews-v2), a Service per version, and a route that sends alice to v2, splits everyone else {w1}/{w2} between v1 and v2, and retries on 503 (port {H2C_PORT} and its route come after that):",
            agent.config_path.display()
        ));
        println!();
        for line in shown.lines() {
            println!("      {line}");
        }
        println!();
        para(&format!(
            "No pod has the address {vip}. A connection to it from an enrolled pod is steered to node 1's agent like any other, and since the port speaks HTTP the agent's L7 proxy serves it: for each request it picks a rule of the route, a backend Service (by weight), and an endpoint of that Service. reviews-v2 was started to answer its very first request with 503."
        ));
        let url = format!("http://{vip}/");
        let service = format!("shop/{REVIEWS}:80");
        let backend_host = |p: &DemoPod| format!("{}.{}.svc.{TRUST_DOMAIN}", p.name(), p.namespace);
        let rule_of = |route: &str| route.rsplit_once('#').map(|(_, i)| i.to_string());

        // 1. As alice.
        self.connections += 1;
        println!();
        println!(
            " {}. frontend -> reviews as alice   (header x-user: alice)",
            self.connections
        );
        let before = agent.events().len();
        let got = curl_with(&client.pod, &["-H", "x-user: alice"], &url)
            .context("sending alice's request")?
            .map_err(|e| anyhow!("alice's request: curl in {} failed: {e}", client.name()))?;
        let body: Value = serde_json::from_str(&got.body).unwrap_or(Value::Null);
        let answered = field(&body, "name").to_string();
        say(
            "curl",
            &format!(
                "in {}: GET {url} with x-user: alice -> HTTP {} in {}, answered by {}",
                client.name(),
                got.status,
                millis((got.seconds * 1000.0) as u64),
                if answered.is_empty() {
                    "an unknown server".to_string()
                } else {
                    format!("{answered} (http-backend answers with its name)")
                },
            ),
        );
        self.check(got.status == 200 && answered == v2.name(), || {
            format!(
                "alice's request got HTTP {} from {answered:?}, expected 200 from {}",
                got.status,
                v2.name()
            )
        });
        let request_id = body
            .pointer("/headers/x-request-id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        self.check(!request_id.is_empty(), || {
            format!("{} received no x-request-id header", v2.name())
        });
        let log = wait_for_new_event(
            agent,
            before,
            &format!("{}'s \"http request\" line for alice's request", side.node),
            &|e: &Value| {
                message(e) == "http request"
                    && field(e, "dst.service") == service
                    && (request_id.is_empty() || field(e, "request_id") == request_id)
            },
        )?;
        let attempts = number(&log, "attempts").unwrap_or(0);
        let upstream = field(&log, "upstream");
        say(
            side.node,
            &format!(
                "logged \"http request\": {} {} from {} to Service {}; route {}{}, backend {}, upstream endpoint {upstream}{}; {} {}: {}, then HTTP {} (response flags {}) after {} in all; request id {}{}.",
                field(&log, "method"),
                field(&log, "path"),
                field(&log, "src.pod"),
                field(&log, "dst.service"),
                field(&log, "route"),
                match rule_of(field(&log, "route")).as_deref() {
                    Some("0") => " (its first rule: the x-user: alice match)",
                    Some("1") => " (its second rule: the split)",
                    _ => "",
                },
                field(&log, "backend"),
                if upstream == v2.addr().to_string() {
                    format!(" ({} pod)", poss(v2.name()))
                } else {
                    String::new()
                },
                attempts,
                if attempts == 1 { "attempt" } else { "attempts" },
                if attempts == 2 {
                    format!(
                        "the first got {} deliberate 503 and the rule's retry policy (up to 2 more tries on 503) sent the request again",
                        poss(v2.name())
                    )
                } else {
                    "no retry".to_string()
                },
                number(&log, "status").unwrap_or(0),
                field(&log, "response_flags"),
                millis(number(&log, "duration_ms").unwrap_or(0)),
                field(&log, "request_id"),
                if field(&log, "request_id") == request_id {
                    format!(", the x-request-id header {} received too", v2.name())
                } else {
                    String::new()
                },
            ),
        );
        let checks = [
            (
                "route",
                rule_of(field(&log, "route")).unwrap_or_default(),
                "0".to_string(),
            ),
            (
                "backend",
                field(&log, "backend").to_string(),
                backend_host(v2),
            ),
            ("upstream", upstream.to_string(), v2.addr().to_string()),
            ("attempts", attempts.to_string(), "2".to_string()),
            (
                "status",
                number(&log, "status").unwrap_or(0).to_string(),
                "200".to_string(),
            ),
            (
                "request_id",
                field(&log, "request_id").to_string(),
                request_id.clone(),
            ),
        ];
        for (name, got, want) in checks {
            let name = if name == "route" { "route rule" } else { name };
            self.check(got == want, || {
                format!("alice's \"http request\" line has {name} {got:?}, expected {want:?}")
            });
        }
        let peer = field(&body, "peer")
            .parse::<SocketAddr>()
            .ok()
            .map(|a| a.to_string())
            .unwrap_or_default();
        say(
            "server",
            &format!(
                "{} saw the client as {peer}{}",
                v2.name(),
                if ip_of(&peer) == Some(client.ip()) {
                    format!(
                        ": {} real address, although frontend called the VIP",
                        poss(client.name())
                    )
                } else {
                    String::new()
                }
            ),
        );
        self.check(ip_of(&peer) == Some(client.ip()), || {
            format!(
                "{} saw the client as {peer:?}, not {}",
                v2.name(),
                client.ip()
            )
        });

        // 2. The split.
        self.connections += 1;
        println!();
        println!(
            " {}. frontend -> reviews, {SPLIT_REQUESTS} requests   (no header, one keep-alive connection)",
            self.connections
        );
        let before = agent.events().len();
        let script = format!(
            r#"
import http.client, json, time
counts, connections, begin = {{}}, 1, time.time()
conn = http.client.HTTPConnection("{vip}", 80, timeout=10)
for i in range({SPLIT_REQUESTS}):
    conn.request("GET", "/")
    r = conn.getresponse()
    r.read()
    key = "%d %s" % (r.status, r.getheader("x-backend", "-"))
    counts[key] = counts.get(key, 0) + 1
    if r.getheader("connection", "").lower() == "close":
        conn.close()
        conn = http.client.HTTPConnection("{vip}", 80, timeout=10)
        connections += 1
print(json.dumps({{"counts": counts, "connections": connections, "seconds": time.time() - begin}}))
"#
        );
        let mut python = client.pod.command("python3")?;
        python.args(["-c", &script]);
        let out = output_within(
            python,
            &format!(
                "{SPLIT_REQUESTS} requests from python3 in {}",
                client.name()
            ),
            CLIENT_DEADLINE,
        )?;
        let result: Value =
            serde_json::from_slice(&out.stdout).context("reading the python client's counts")?;
        let count = |key: &str| result["counts"][key].as_u64().unwrap_or(0);
        let (n1, n2) = (
            count(&format!("200 {}", v1.name())),
            count(&format!("200 {}", v2.name())),
        );
        let other: Vec<String> = result["counts"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| {
                        **k != format!("200 {}", v1.name()) && **k != format!("200 {}", v2.name())
                    })
                    .map(|(k, v)| format!("{v} x {k}"))
                    .collect()
            })
            .unwrap_or_default();
        let connections = result["connections"].as_u64().unwrap_or(0);
        let share = |k: u64| (k * 100 + SPLIT_REQUESTS / 2) / SPLIT_REQUESTS;
        say(
            "python",
            &format!(
                "in {}: {SPLIT_REQUESTS} GETs of {url} with http.client, on {} keep-alive connection{}, without the header, in {}: {}{} answered by {} and {n2} by {}, {}% and {}%: about {w1}/{w2}, as the weights say (each request is a weighted draw, so the counts vary a little from run to run)",
                client.name(),
                connections,
                if connections == 1 { "" } else { "s" },
                millis((result["seconds"].as_f64().unwrap_or(0.0) * 1000.0) as u64),
                if other.is_empty() {
                    "all HTTP 200; ".to_string()
                } else {
                    format!("unexpected answers: {}; ", other.join(", "))
                },
                n1,
                v1.name(),
                v2.name(),
                share(n1),
                share(n2),
            ),
        );
        self.check(other.is_empty() && n1 + n2 == SPLIT_REQUESTS, || {
            format!(
                "of {SPLIT_REQUESTS} requests without the header, {n1} + {n2} got HTTP 200 from {} and {}",
                v1.name(),
                v2.name()
            )
        });
        // Binomial(50, 0.2): mean 10, sd 2.8; four of them either way.
        self.check((2..=21).contains(&n2), || {
            format!(
                "{} answered {n2} of {SPLIT_REQUESTS} requests, far from {w2}%",
                v2.name()
            )
        });
        let what = format!(
            "{}'s {SPLIT_REQUESTS} \"http request\" lines for the split",
            side.node
        );
        let logs = wait_until(&what, AGENT_DEADLINE, || {
            let events = agent.events();
            let lines: Vec<Value> = events
                .get(before..)
                .unwrap_or_default()
                .iter()
                .filter(|e| message(e) == "http request" && field(e, "dst.service") == service)
                .cloned()
                .collect();
            (lines.len() as u64 >= SPLIT_REQUESTS).then_some(lines)
        })
        .with_context(|| format!("last agent log lines:\n{}", log_tail(agent)))?;
        let mut by_backend: BTreeMap<String, u64> = BTreeMap::new();
        let mut routes = BTreeSet::new();
        let mut attempts = BTreeSet::new();
        for e in &logs {
            *by_backend
                .entry(field(e, "backend").to_string())
                .or_default() += 1;
            routes.insert(field(e, "route").to_string());
            attempts.insert(number(e, "attempts").unwrap_or(0));
        }
        let logged = |p: &DemoPod| by_backend.get(&backend_host(p)).copied().unwrap_or(0);
        say(
            side.node,
            &format!(
                "logged {} \"http request\" lines for them, {} {} (the split rule), backend {} {} times and {} {} times: the same counts the client saw; {}",
                logs.len(),
                if routes.len() == 1 {
                    "all with route"
                } else {
                    "routes"
                },
                routes.iter().cloned().collect::<Vec<_>>().join(" and "),
                backend_host(v1),
                logged(v1),
                backend_host(v2),
                logged(v2),
                if attempts.len() == 1 && attempts.contains(&1) {
                    "one attempt each: nothing to retry".to_string()
                } else {
                    format!("attempts {attempts:?}")
                },
            ),
        );
        let want_route = format!("shop/{REVIEWS}#1");
        self.check(
            logs.len() as u64 == SPLIT_REQUESTS
                && logged(v1) == n1
                && logged(v2) == n2
                && routes.len() == 1
                && routes.contains(&want_route),
            || {
                format!(
                    "node 1's log has {} lines for the split ({by_backend:?}, routes {routes:?}), the client counted {n1} and {n2}",
                    logs.len()
                )
            },
        );
        Ok(())
    }

    /// h2c to the reviews Service's HTTP/2 port: curl's requests on one connection, what
    /// reviews-v1 and node 1's log saw, and node 1's HTTP/2 connection counts.
    fn h2c(
        &mut self,
        side: Side<'_>,
        client: &DemoPod,
        v1: &DemoPod,
        vip: Ipv4Addr,
    ) -> anyhow::Result<()> {
        let agent = side.agent;
        println!();
        para(&format!(
            "Port {H2C_PORT} of shop/{REVIEWS} is declared appProtocol: http2, and its route {H2C_ROUTE} sends everything to {} port {H2C_PORT}, HTTP/2 too. h2c (HTTP/2 without TLS, as gRPC speaks it inside a cluster) on such a port takes the agent's HTTP/2 fast path: the agent forwards the connection frame by frame itself instead of handing it to hyper.",
            poss(v1.name())
        ));
        self.connections += 1;
        println!();
        println!(
            " {}. frontend -> reviews over h2c, {H2C_REQUESTS} requests   (port {H2C_PORT}, appProtocol: http2)",
            self.connections
        );
        let h2_connections = |samples: &[Sample], path: &str| {
            sum_by(
                samples,
                "trellis_http2_connections_total",
                |_| true,
                &["path"],
            )
            .get(&vec![path.to_string()])
            .copied()
            .unwrap_or(0.0)
        };
        let (_, _, before_metrics) = scrape(side)?;
        let before = agent.events().len();
        let url = format!("http://{vip}:{H2C_PORT}/");
        // One curl per request: curl 7.88 (Debian 12's) breaks a prior-knowledge connection
        // it reuses ("Error in the HTTP2 framing layer", curl/curl#10634, fixed in 8.0).
        let mut answers = Vec::new();
        for _ in 0..H2C_REQUESTS {
            let got = curl_with(&client.pod, &["--http2-prior-knowledge"], &url)
                .context("sending an h2c request")?
                .map_err(|e| anyhow!("h2c request: curl in {} failed: {e}", client.name()))?;
            let body: Value = serde_json::from_str(&got.body).unwrap_or(Value::Null);
            answers.push((got, body));
        }
        let ports: BTreeSet<u16> = answers.iter().map(|(got, _)| got.local.port()).collect();
        let opened = ports.len();
        let h2_curl = answers
            .iter()
            .all(|(got, _)| got.version == "2" && got.status == 200);
        let h2_server = answers
            .iter()
            .all(|(_, b)| field(b, "version") == "HTTP/2.0");
        let by_v1 = answers.iter().all(|(_, b)| {
            field(b, "name") == v1.name() && ip_of(field(b, "peer")) == Some(client.ip())
        });
        say(
            "curl",
            &format!(
                "in {}: GET {url} with --http2-prior-knowledge, {}, one connection each: {}; {}",
                client.name(),
                times(H2C_REQUESTS),
                if h2_curl {
                    "HTTP 200 each time, and curl's %{http_version} said 2".to_string()
                } else {
                    let seen: Vec<String> = answers
                        .iter()
                        .map(|(got, _)| format!("HTTP/{} {}", got.version, got.status))
                        .collect();
                    format!("got {}", seen.join(", "))
                },
                if h2_server && by_v1 {
                    format!(
                        "{} answered each and saw an HTTP/2.0 request from {} real address: HTTP/2 end to end",
                        v1.name(),
                        poss(client.name())
                    )
                } else {
                    format!(
                        "the answers were not all HTTP/2.0 requests seen by {}",
                        v1.name()
                    )
                },
            ),
        );
        self.check(h2_curl && opened == H2C_REQUESTS, || {
            format!(
                "curl's {H2C_REQUESTS} h2c requests to {url} came back as {:?} on {opened} connection(s), expected HTTP/2 200s on {H2C_REQUESTS}",
                answers
                    .iter()
                    .map(|(got, _)| format!("HTTP/{} {}", got.version, got.status))
                    .collect::<Vec<_>>()
            )
        });
        self.check(h2_server && by_v1, || {
            format!(
                "the h2c requests reached {:?}, expected HTTP/2.0 requests from {} at {}",
                answers.iter().map(|(got, _)| &got.body).collect::<Vec<_>>(),
                client.ip(),
                v1.name()
            )
        });

        let service = format!("shop/{REVIEWS}:{H2C_PORT}");
        let ids: Vec<String> = answers
            .iter()
            .map(|(_, b)| {
                b.pointer("/headers/x-request-id")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        let wanted: Vec<_> = ids
            .iter()
            .map(|id| {
                let service = service.as_str();
                move |e: &Value| {
                    message(e) == "http request"
                        && field(e, "dst.service") == service
                        && (id.is_empty() || field(e, "request_id") == id.as_str())
                }
            })
            .collect();
        let wanted: Vec<&dyn Fn(&Value) -> bool> = wanted.iter().map(|w| w as _).collect();
        let logs = wait_for_new_events(
            agent,
            before,
            &format!(
                "{}'s \"http request\" lines for the h2c requests",
                side.node
            ),
            &wanted,
        )?;
        let route = format!("shop/{H2C_ROUTE}#0");
        let backend = format!("{}.{}.svc.{TRUST_DOMAIN}", v1.name(), v1.namespace);
        let upstream = v1.addr().to_string();
        let as_expected = |e: &Value| {
            field(e, "route") == route
                && field(e, "backend") == backend
                && field(e, "upstream") == upstream
                && number(e, "status") == Some(200)
        };
        let first = &logs[0];
        say(
            side.node,
            &format!(
                "logged an \"http request\" line for each, to Service {service}: {} route {}, backend {}, upstream endpoint {} ({} pod), HTTP {}{}",
                if logs.iter().all(as_expected) {
                    "all with"
                } else {
                    "the first with"
                },
                field(first, "route"),
                field(first, "backend"),
                field(first, "upstream"),
                poss(v1.name()),
                number(first, "status").unwrap_or(0),
                if ids.iter().all(|id| !id.is_empty()) {
                    format!(
                        "; their request ids are the x-request-id headers {} received",
                        v1.name()
                    )
                } else {
                    String::new()
                },
            ),
        );
        self.check(
            logs.iter().all(as_expected) && ids.iter().all(|id| !id.is_empty()),
            || {
                format!(
                    "node 1's h2c \"http request\" lines are {logs:?}, expected route {route}, backend {backend}, upstream {upstream}, HTTP 200 and request ids {ids:?}"
                )
            },
        );

        let (_, _, after_metrics) = scrape(side)?;
        let delta = |path: &str| {
            h2_connections(&after_metrics, path) - h2_connections(&before_metrics, path)
        };
        let (fast, hyper) = (delta("fast_path"), delta("hyper"));
        say(
            "metrics",
            &format!(
                "on {}, trellis_http2_connections_total{{path=\"fast_path\"}} went up by {fast} and {{path=\"hyper\"}} by {hyper}{}",
                side.node,
                if fast == opened as f64 && hyper == 0.0 {
                    format!(
                        ": the agent forwarded each of the {opened} connections frame by frame itself, none went through hyper"
                    )
                } else {
                    String::new()
                },
            ),
        );
        self.check(fast == opened as f64 && hyper == 0.0, || {
            format!(
                "trellis_http2_connections_total on {} went up by {fast} on the fast path and {hyper} on hyper, expected {opened} and 0",
                side.node
            )
        });
        Ok(())
    }

    /// An excerpt of both agents' metrics, explained.
    fn metrics(&mut self, sides: [Side<'_>; 2]) -> anyhow::Result<()> {
        header("What the agents counted: metrics");
        let mut scraped = Vec::new();
        for side in sides {
            let (url, text, samples) = scrape(side)?;
            scraped.push((side, url, text.lines().count(), samples));
        }
        let [(s1, url1, lines1, m1), (s2, _, _, m2)] =
            <[_; 2]>::try_from(scraped).map_err(|_| anyhow!("expected two scrapes"))?;
        para(&format!(
            "Each agent serves Prometheus metrics on its metrics address, with Istio's names and labels so that Istio's dashboards read them unchanged, and its own health under trellis_*. `curl -s -H 'Accept: text/plain' {url1}` got node 1's: {lines1} lines, {} samples; node 2's the same way. An excerpt, each number a sum over the labels not shown:",
            m1.len()
        ));

        // Requests.
        let requests = sum_by(
            &m1,
            "istio_requests_total",
            |s| s.label("reporter") == "source",
            &["destination_service", "response_code"],
        );
        let as_destination: f64 = sum_by(
            &m1,
            "istio_requests_total",
            |s| s.label("reporter") == "destination",
            &[],
        )
        .values()
        .sum();
        let total: f64 = requests.values().sum();
        println!();
        println!("   istio_requests_total on node 1, reporter source:");
        println!(
            "     {:<38}{:<16}{:>8}",
            "destination_service", "response_code", "requests"
        );
        for (key, n) in &requests {
            println!("     {:<38}{:<16}{:>8}", key[0], key[1], n);
        }
        say(
            "means",
            &format!(
                "one per HTTP request the L7 proxy served, by the backend Service it picked and the status the client got: alice's, the {SPLIT_REQUESTS} others and the {H2C_REQUESTS} over h2c (alice's retried 503 is not a request of its own). {}",
                if as_destination == total {
                    "Node 1 counted each once more with reporter destination, since it also delivered them to the reviews pods."
                } else {
                    ""
                }
            ),
        );
        let expected = SPLIT_REQUESTS + 1 + H2C_REQUESTS as u64;
        self.check(
            total == expected as f64 && requests.keys().all(|k| k[1] == "200"),
            || format!("node 1 counted requests {requests:?}, expected {expected} with code 200"),
        );

        // TCP connections.
        println!();
        println!(
            "   istio_tcp_connections_opened_total, by agent, reporter and connection_security_policy:"
        );
        println!(
            "     {:<10}{:<15}{:<30}{:>11}",
            "agent", "reporter", "connection_security_policy", "connections"
        );
        let mut mtls = Vec::new();
        for (side, samples) in [(s1, &m1), (s2, &m2)] {
            let tcp = sum_by(
                samples,
                "istio_tcp_connections_opened_total",
                |_| true,
                &["reporter", "connection_security_policy"],
            );
            let mut rows: Vec<_> = tcp.iter().collect();
            rows.sort_by_key(|(key, _)| (key[0] != "source", key[1] != "none"));
            for (key, n) in rows {
                println!(
                    "     {:<10}{:<15}{:<30}{:>11}",
                    side.node, key[0], key[1], n
                );
                if key[1] == "mutual_tls" {
                    mtls.push((side.node, key[0].clone(), *n));
                }
            }
        }
        let mtls_text: Vec<String> = mtls
            .iter()
            .map(|(node, reporter, n)| format!("{node} counted {n} as their {reporter}"))
            .collect();
        let mtls_of = |node: &str, reporter: &str| {
            mtls.iter()
                .find(|(n, r, _)| *n == node && r == reporter)
                .map(|(_, _, v)| *v)
                .unwrap_or(0.0)
        };
        say(
            "means",
            &format!(
                "TCP connections each agent relayed, counted once they closed. Only those from frontend to payments crossed nodes, so only they are mutual_tls, and both agents counted them: {}{}. The rest stayed on node 1 or had a pod outside the mesh at one end: none. (The connections to the reviews VIP were served as HTTP and are counted per request, above.)",
                and_list(&mtls_text.iter().map(String::as_str).collect::<Vec<_>>()),
                if mtls_of("node 1", "source") == mtls_of("node 2", "destination") + 1.0 {
                    "; node 1's count includes the one the policy refused, which node 2 turned away before delivering anything"
                } else {
                    ""
                },
            ),
        );
        self.check(
            mtls_of("node 1", "source") >= 2.0 && mtls_of("node 2", "destination") >= 2.0,
            || format!("the mutual_tls connection counts are {mtls:?}"),
        );

        // Enrolled pods.
        let gauge = |samples: &[Sample], name: &str| {
            samples.iter().find(|s| s.name == name).map(|s| s.value)
        };
        let enrolled = gauge(&m1, "trellis_enrolled_pods");
        let events = s1.agent.events();
        let mut now_enrolled: BTreeMap<String, bool> = BTreeMap::new();
        for e in &events {
            match message(e) {
                "pod enrolled" => now_enrolled.insert(short(field(e, "pod")).to_string(), true),
                "pod unenrolled" => now_enrolled.insert(short(field(e, "pod")).to_string(), false),
                _ => None,
            };
        }
        let (inside, left): (Vec<&str>, Vec<&str>) = {
            let inside = now_enrolled
                .iter()
                .filter(|(_, v)| **v)
                .map(|(k, _)| k.as_str())
                .collect();
            let left = now_enrolled
                .iter()
                .filter(|(_, v)| !**v)
                .map(|(k, _)| k.as_str())
                .collect();
            (inside, left)
        };
        println!();
        println!(
            "   trellis_enrolled_pods on node 1: {}",
            enrolled
                .map(|v| v.to_string())
                .unwrap_or_else(|| "absent".into())
        );
        say(
            "means",
            &format!(
                "the pods node 1's agent has in the mesh now: {}{}",
                and_list(&inside),
                if left.is_empty() {
                    String::new()
                } else {
                    format!(" ({} left it above)", and_list(&left))
                }
            ),
        );
        self.check(enrolled == Some(inside.len() as f64), || {
            format!(
                "trellis_enrolled_pods is {enrolled:?}, but node 1's log has {} enrolled",
                inside.len()
            )
        });

        // Certificates.
        println!();
        println!("   trellis_certificate_expiry_seconds on node 1:");
        println!("     {:<46}{:>12}", "identity", "seconds");
        let mut expiries: Vec<&Sample> = m1
            .iter()
            .filter(|s| s.name == "trellis_certificate_expiry_seconds")
            .collect();
        expiries.sort_by(|a, b| a.label("identity").cmp(b.label("identity")));
        for s in &expiries {
            println!(
                "     {:<46}{:>12.0}  ({})",
                s.label("identity"),
                s.value,
                hours(s.value)
            );
        }
        say(
            "means",
            &format!(
                "how long until each workload certificate node 1 holds expires: one per identity, so reviews-v1 and reviews-v2 share the one of shop/sa/{REVIEWS}; the agent issues a fresh one when half of its lifetime has passed (the default rotation point)."
            ),
        );
        self.check(
            !expiries.is_empty() && expiries.iter().all(|s| s.value > 0.0),
            || "node 1 reports no certificate that is still valid".to_string(),
        );
        Ok(())
    }

    /// `mesh-agent status` for one node, printed as it comes.
    fn status(
        &mut self,
        agent_bin: &Path,
        side: Side<'_>,
        pods: &[&DemoPod],
    ) -> anyhow::Result<()> {
        let admin = side.agent.admin_addr()?;
        header("mesh-agent status");
        para(&format!(
            "For people at the node, `mesh-agent status --admin-addr {admin}` asks {}'s admin API and prints its pods:",
            side.node
        ));
        println!();
        let mut cmd = Command::new(agent_bin);
        cmd.args(["status", "--admin-addr", &admin.to_string()]);
        let out = output_within(cmd, "mesh-agent status", CLIENT_DEADLINE)?;
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines() {
            if line.is_empty() {
                println!();
            } else {
                println!("   {line}");
            }
        }
        let missing: Vec<&str> = pods
            .iter()
            .map(|p| p.name())
            .filter(|name| {
                !text
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(name))
            })
            .collect();
        self.check(missing.is_empty(), || {
            format!("`mesh-agent status` does not list {}", and_list(&missing))
        });
        Ok(())
    }
}

impl Exchange<'_> {
    /// The title without its parenthetical note, for messages.
    fn name(&self) -> &str {
        self.title.split("  ").next().unwrap_or(self.title).trim()
    }
}

/// A "connection closed" line in plain English.
fn describe(x: &Exchange<'_>, hop: Hop, e: &Value) -> String {
    let client = x.client.name();
    let server = x.server.name();
    let (clients, servers) = (poss(client), poss(server));
    match hop {
        Hop::Local => format!(
            "outbound, path local: both pods are on this node, so the agent checked {servers} policies for {clients} identity ({}) and handed the connection straight to {servers} app, from {clients} address: {}. No TLS inside one node (security {}), one log line, no second capture at {servers} end.",
            field(e, "src.identity"),
            traffic(e),
            field(e, "security"),
        ),
        Hop::OutboundPassthrough => format!(
            "outbound, path passthrough: {} is {server}, which is not in the mesh (no identity to verify), so the agent connected there as plain TCP from {clients} own address and relayed {}",
            field(e, "dst.original"),
            traffic(e),
        ),
        Hop::InboundPassthrough => format!(
            "inbound, path passthrough: {servers} sk_lookup hook steered the connection from {} ({client}, outside the mesh) to the agent. Plain TCP proves no identity, so the line's source identity is empty; {servers} policies allowed it and the agent relayed {} to the app on :{APP_PORT}",
            ip_of(field(e, "src.addr"))
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
            traffic(e),
        ),
        Hop::HboneOut => format!(
            "outbound, path hbone, security {}: {client} presented its certificate ({}) and {server} had to prove {}; the connection rode an HTTP/2 CONNECT stream to {}:{HBONE_PORT} on {}: {}",
            field(e, "security"),
            field(e, "src.identity"),
            field(e, "dst.identity"),
            x.server.pod.ip,
            x.server.node,
            traffic(e),
        ),
        Hop::HboneIn => format!(
            "inbound, path hbone: the caller's certificate proved {} ({}); {servers} policies allowed it, and the agent delivered {} to the app on :{APP_PORT}, from {clients} own address",
            field(e, "src.identity"),
            match field(e, "src.pod") {
                "" => "a pod this node does not know".to_string(),
                pod => format!("{pod} on {}", x.client.node),
            },
            traffic(e),
        ),
    }
}

/// "frontend's", "payments'".
fn poss(name: &str) -> String {
    if name.ends_with('s') {
        format!("{name}'")
    } else {
        format!("{name}'s")
    }
}

/// "a", "a and b", "a, b and c"; "nothing" when empty.
fn and_list(items: &[&str]) -> String {
    match items {
        [] => "nothing".to_string(),
        [one] => one.to_string(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

fn times(n: usize) -> String {
    match n {
        1 => "once".to_string(),
        2 => "twice".to_string(),
        n => format!("{n} times"),
    }
}

/// "23 h 59 min".
fn hours(seconds: f64) -> String {
    let minutes = (seconds.max(0.0) / 60.0) as u64;
    format!("{} h {} min", minutes / 60, minutes % 60)
}

fn millis(ms: u64) -> String {
    if ms == 0 {
        "under 1 ms".to_string()
    } else {
        format!("{ms} ms")
    }
}

/// "79 B up / 127 B down in 1 ms", plus the error if the relay ended with one.
fn traffic(e: &Value) -> String {
    let mut text = format!(
        "{} up / {} down in {}",
        bytes(number(e, "bytes_sent").unwrap_or(0)),
        bytes(number(e, "bytes_received").unwrap_or(0)),
        millis(number(e, "duration_ms").unwrap_or(0)),
    );
    let err = field(e, "error");
    if !err.is_empty() {
        text.push_str(&format!("; it ended with an error: {err}"));
    }
    text
}
