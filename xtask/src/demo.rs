//! `cargo xtask demo`: one node, three pods, the real agent, a little traffic, and the story
//! of what happened, told from the agent's own log.
//!
//! - `frontend` (shop/frontend) and `backend` (shop/backend) are enrolled in the mesh;
//!   `legacy` (shop/legacy) is listed but not enrolled. `backend` and `legacy` run
//!   `peer-echo`, which answers with the client address it sees.
//! - Traffic: frontend -> backend (captured at both ends), legacy -> backend (captured on
//!   arrival only), frontend -> legacy (captured on departure only).
//! - A live config change unenrols frontend; frontend -> backend is then captured on arrival
//!   only. A config with a typo is rejected and the last good one keeps serving.
//! - Teardown: SIGTERM to the agent, servers stopped, the node removed, and a `bpftool`
//!   check that none of the agent's `mesh_*` programs are left in the kernel.
//!
//! Every resource is owned by a drop guard, so a failure anywhere still cleans up; every wait
//! has a deadline.
use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Read as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    process::{Child, Stdio},
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
    wait_until,
};
use serde_json::Value;

use crate::{setup, util};

/// The port both demo servers listen on.
const APP_PORT: u16 = 8080;
/// Kubernetes-style namespace of all three pods.
const NAMESPACE: &str = "shop";
/// Node name in the agent's config.
const NODE_NAME: &str = "demo-node";
/// Width the story is wrapped to when stdout is not a terminal.
const DEFAULT_WIDTH: usize = 92;
/// Label column of the story's per-connection lines.
const LABEL: usize = 10;
/// How long a server may take to start listening.
const SERVER_DEADLINE: Duration = Duration::from_secs(10);
/// How often the build prints a heartbeat when its output is not a terminal.
const HEARTBEAT: Duration = Duration::from_secs(30);

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
    for bin in [&agent_bin, &root.join("target/debug/peer-echo")] {
        if !bin.is_file() {
            bail!("{} is missing after the build", bin.display());
        }
    }
    // From here on, Ctrl-C must not skip the cleanup: the first one is only recorded (the
    // agent, the servers and curl, in the same process group, receive it and stop, so the
    // step in progress fails and the drop guards run); a second one ends the demo at once.
    // SAFETY: the handler only stores to an atomic and resets the disposition, both
    // async-signal-safe.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let result = Demo::new().run(&root.join("target/debug/peer-echo"));
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted (Ctrl-C); the demo's node, pods, servers and agent have been removed");
    }
    result
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    // SAFETY: signal() is async-signal-safe.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
}

/// Builds the agent (with its eBPF programs) and the test binaries (peer-echo).
fn build() -> anyhow::Result<()> {
    util::step(
        "building mesh-agent with its eBPF programs, and the peer-echo server (a few minutes the first time)",
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
    let result = util::cargo(&["build", "-p", "mesh-agent", "-p", "mesh-tests"]);
    done.store(true, Ordering::Relaxed);
    if let Some(h) = heartbeat {
        h.thread().unpark();
        let _ = h.join();
    }
    result.context("building the agent and the demo servers")
}

/// A `peer-echo http` server running in a pod; killed when dropped.
struct Server {
    child: Child,
}

impl Server {
    fn start(pod: &Pod, program: &Path) -> anyhow::Result<Self> {
        let mut child = pod
            .command(program)?
            .args(["http", &APP_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting peer-echo in pod {}", pod.name))?;
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
        let what = format!("peer-echo to listen on :{APP_PORT} in pod {}", pod.name);
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
                "peer-echo exited in pod {} before listening: {}",
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

/// One demo pod: the harness pod plus what the demo knows about it.
struct DemoPod {
    pod: Pod,
    service_account: &'static str,
}

impl DemoPod {
    fn name(&self) -> &str {
        &self.pod.name
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.pod.ip), APP_PORT)
    }

    fn entry(&self, enrolled: bool) -> String {
        self.pod
            .config_entry(NAMESPACE, self.service_account, enrolled)
    }
}

/// What curl in a pod saw.
struct CurlResult {
    status: u16,
    body: String,
    /// The local end of curl's socket: 127.0.0.1 when connect() was steered to the agent.
    local: SocketAddr,
    seconds: f64,
}

fn curl(pod: &Pod, url: &str) -> anyhow::Result<CurlResult> {
    let out = pod
        .command("curl")?
        .args([
            "-sS",
            "--max-time",
            "20",
            "-w",
            "\n%{http_code} %{local_ip} %{local_port} %{time_total}",
            url,
        ])
        .stdin(Stdio::null())
        .output()
        .context("running curl in the pod")?;
    if !out.status.success() {
        bail!(
            "curl {url} from pod {} failed: {}",
            pod.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text
        .rsplit_once('\n')
        .context("curl printed no status line")?;
    let parts: Vec<&str> = tail.split_whitespace().collect();
    let [status, ip, port, seconds] = parts[..] else {
        bail!("unexpected curl status line {tail:?}");
    };
    Ok(CurlResult {
        status: status.parse().context("curl's HTTP status")?,
        body: body.trim().to_string(),
        local: SocketAddr::new(
            ip.parse().context("curl's local_ip")?,
            port.parse().context("curl's local_port")?,
        ),
        seconds: seconds.parse().unwrap_or(0.0),
    })
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

/// Collects what did not go as the mesh promises; the demo fails at the end if any.
struct Demo {
    problems: Vec<String>,
    connections: usize,
    /// Whether the story has said why servers see themselves as 127.0.0.1.
    loopback_explained: bool,
}

/// One request the demo sends, and which of the agent's sides should catch it.
struct Exchange<'a> {
    title: &'a str,
    client: &'a DemoPod,
    server: &'a DemoPod,
    outbound_captured: bool,
    inbound_captured: bool,
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

    fn run(mut self, peer_echo: &Path) -> anyhow::Result<()> {
        util::step("creating the demo node: a network namespace with a bridge, and three pods");
        let mut node = Node::new()?;
        let frontend = DemoPod {
            pod: node.add_pod("frontend")?,
            service_account: "frontend",
        };
        let backend = DemoPod {
            pod: node.add_pod("backend")?,
            service_account: "backend",
        };
        let legacy = DemoPod {
            pod: node.add_pod("legacy")?,
            service_account: "legacy",
        };
        util::step(&format!(
            "starting peer-echo HTTP servers on :{APP_PORT} in backend and legacy"
        ));
        let backend_server = Server::start(&backend.pod, peer_echo)?;
        let legacy_server = Server::start(&legacy.pod, peer_echo)?;

        let config = |frontend_entry: String| {
            config_doc(
                NODE_NAME,
                &[frontend_entry, backend.entry(true), legacy.entry(false)],
            )
        };
        let programs_before: BTreeSet<u64> = mesh_programs()?.into_iter().map(|p| p.id).collect();
        util::step("starting mesh-agent with frontend and backend enrolled");
        let mut agent = Agent::start("demo", &config(frontend.entry(true)))?;
        let agent_pid = agent.pid().context("the agent is not running")?;
        // The programs this agent loaded: held by its pid (bpftool shows holders when built
        // with that support), else whatever appeared since it started.
        let ours: BTreeSet<u64> = mesh_programs()?
            .into_iter()
            .filter(|p| {
                if p.holders.is_empty() {
                    !programs_before.contains(&p.id)
                } else {
                    p.holders
                        .iter()
                        .any(|(pid, _)| *pid == u64::from(agent_pid))
                }
            })
            .map(|p| p.id)
            .collect();

        self.introduce(
            &node,
            [&frontend, &backend, &legacy],
            &agent,
            agent_pid,
            ours.len(),
        );

        header("Traffic");
        para(
            "Each request is one TCP connection. For each, the agent logs one \"connection closed\" line per side that caught it; here is what those lines say.",
        );
        self.exchange(
            &agent,
            Exchange {
                title: "frontend -> backend   (both pods in the mesh)",
                client: &frontend,
                server: &backend,
                outbound_captured: true,
                inbound_captured: true,
            },
        )?;
        self.exchange(
            &agent,
            Exchange {
                title: "legacy -> backend     (a client outside the mesh)",
                client: &legacy,
                server: &backend,
                outbound_captured: false,
                inbound_captured: true,
            },
        )?;
        self.exchange(
            &agent,
            Exchange {
                title: "frontend -> legacy    (a destination outside the mesh)",
                client: &frontend,
                server: &legacy,
                outbound_captured: true,
                inbound_captured: false,
            },
        )?;

        header("A live config change: frontend leaves the mesh");
        let before = agent.events().len();
        let written = Instant::now();
        agent.write_config(&config(frontend.entry(false)))?;
        let [unenrolled, applied] = <[Value; 2]>::try_from(wait_for_new_events(
            &agent,
            before,
            "the agent to unenrol frontend",
            &[
                &|e: &Value| message(e) == "pod unenrolled" && short(field(e, "pod")) == "frontend",
                &|e: &Value| message(e) == "config applied",
            ],
        )?)
        .map_err(|_| anyhow!("expected two events"))?;
        para(&format!(
            "The demo rewrote {} with frontend's `enrolled: false`. The agent, which watches the file, logged \"pod unenrolled\" for {} {} ms later and then \"config applied\" ({} pods, {} enrolled): frontend's eBPF programs are detached; no restart, nothing else disturbed.",
            agent.config_path.display(),
            field(&unenrolled, "pod"),
            written.elapsed().as_millis(),
            number(&applied, "pods").unwrap_or(0),
            number(&applied, "enrolled").unwrap_or(0),
        ));
        let unenrol_index = agent.events().len();
        self.exchange(
            &agent,
            Exchange {
                title: "frontend -> backend again   (frontend no longer enrolled)",
                client: &frontend,
                server: &backend,
                outbound_captured: false,
                inbound_captured: true,
            },
        )?;

        header("A bad config is rejected");
        let typo = frontend
            .entry(false)
            .replace("enrolled: false", "enrolled: ture");
        let before = agent.events().len();
        agent.write_config(&config(typo))?;
        let [rejected] = <[Value; 1]>::try_from(wait_for_new_events(
            &agent,
            before,
            "the agent to reject the bad config",
            &[&|e: &Value| message(e) == "config rejected; still serving the last good config"],
        )?)
        .map_err(|_| anyhow!("expected one event"))?;
        para(&format!(
            "Someone tries to put frontend back but types `enrolled: ture`. The agent logs \"config rejected; still serving the last good config\" and names the field: {} ({}). Traffic is unaffected:",
            field(&rejected, "field"),
            field(&rejected, "reason"),
        ));
        self.exchange(
            &agent,
            Exchange {
                title: "frontend -> backend once more   (last good config still in force)",
                client: &frontend,
                server: &backend,
                outbound_captured: false,
                inbound_captured: true,
            },
        )?;
        // Long after those connections ended: the log must hold no outbound capture for
        // frontend since it was unenrolled.
        let late = agent
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

        header("Teardown");
        util::step("stopping the agent (SIGTERM)");
        let status = agent.terminate()?;
        let stopped =
            agent.count_events(|e| message(e) == "agent stopped; all programs detached") > 0;
        say(
            "agent",
            &match (status.success(), stopped) {
                (true, true) => {
                    "stopped cleanly after logging \"agent stopped; all programs detached\""
                        .to_string()
                }
                (_, true) => format!(
                    "logged \"agent stopped; all programs detached\" but exited with {status}"
                ),
                (_, false) => format!("exited with {status} without logging \"agent stopped\""),
            },
        );
        self.check(status.success() && stopped, || {
            format!("the agent did not stop cleanly ({status})")
        });
        util::step("stopping the servers and removing the node (namespaces, veths, cgroups)");
        drop(backend_server);
        drop(legacy_server);
        let netns = node.netns.clone();
        drop(node);
        let gone = !Path::new("/var/run/netns").join(&netns).exists();
        say(
            "node",
            if gone {
                "removed: its network namespaces, veths and cgroups are gone"
            } else {
                "its namespace is still there"
            },
        );
        self.check(gone, || format!("network namespace {netns} still exists"));
        drop(agent);

        if !self.problems.is_empty() {
            header("Not as expected");
            for p in &self.problems {
                say("-", p);
            }
        }
        println!();
        // Freeing programs is asynchronous in the kernel: wait for ours to go.
        let left = wait_until(
            "the agent's eBPF programs to be freed",
            AGENT_DEADLINE,
            || {
                let progs = mesh_programs().ok()?;
                progs.iter().all(|p| !ours.contains(&p.id)).then_some(progs)
            },
        );
        let result = match left {
            Ok(progs) if progs.is_empty() => {
                println!("bpftool prog show: no mesh_* program is left in the kernel");
                Ok(())
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
                Ok(())
            }
            Err(e) => {
                let remaining = mesh_programs().unwrap_or_default();
                let names: Vec<String> = remaining
                    .iter()
                    .filter(|p| ours.contains(&p.id))
                    .map(|p| format!("{} (id {})", p.name, p.id))
                    .collect();
                println!(
                    "bpftool prog show: the agent's programs are still loaded: {}",
                    names.join(", ")
                );
                Err(e.context("the agent's eBPF programs outlived it"))
            }
        };
        result?;
        if !self.problems.is_empty() {
            bail!(
                "the demo ran, but {} thing(s) were not as expected (see above)",
                self.problems.len()
            );
        }
        Ok(())
    }

    fn introduce(
        &self,
        node: &Node,
        pods: [&DemoPod; 3],
        agent: &Agent,
        agent_pid: u32,
        programs: usize,
    ) {
        let events = agent.events();
        let enrolled: Vec<&Value> = events
            .iter()
            .filter(|e| message(e) == "pod enrolled")
            .collect();
        let ready = events.iter().find(|e| message(e) == "agent ready");

        header("The demo node");
        para(&format!(
            "One node (network namespace {}, bridge br0 {}/24) with three pods, each a network namespace plus a cgroup. backend and legacy run peer-echo, an HTTP server on :{APP_PORT} that answers with the client address it sees.",
            node.netns,
            node.gateway(),
        ));
        println!();
        println!(
            "   {:<10}{:<15}{:<9}identity (agent's \"pod enrolled\" log)",
            "pod", "address", "mesh"
        );
        for p in pods {
            let event = enrolled.iter().find(|e| short(field(e, "pod")) == p.name());
            let (mesh, identity) = match event {
                Some(e) => ("yes", field(e, "identity").to_string()),
                None => ("no", "-".to_string()),
            };
            println!("   {:<10}{:<15}{:<9}{}", p.name(), p.pod.ip, mesh, identity);
        }
        println!();
        let links: u64 = enrolled.iter().filter_map(|e| number(e, "bpf_links")).sum();
        para(&format!(
            "mesh-agent (pid {agent_pid}) loaded {programs} eBPF programs, attached them to the enrolled pods ({links} BPF links) and logged \"agent ready\": {} of {} pods enrolled.",
            ready.and_then(|e| number(e, "enrolled")).unwrap_or(0),
            ready.and_then(|e| number(e, "pods")).unwrap_or(0),
        ));

        header("How a connection between two enrolled pods travels");
        for line in [
            "        frontend pod                                backend pod",
            "   +-----------------------------+           +-----------------------------+",
            "   |  curl                       |           |  peer-echo :8080            |",
            "   |    | connect(backend:8080)  |           |    ^  sees frontend's IP    |",
            "   |    v  eBPF connect4 hook    |           |    |                        |",
            "   |  agent, outbound side       |           |  agent, inbound side        |",
            "   |    |  dials backend from    |           |    ^  eBPF sk_lookup hook   |",
            "   |    |  frontend's own IP     |           |    |                        |",
            "   +----|------------------------+           +----|------------------------+",
            "        +------------------ bridge br0 -------------+",
        ] {
            println!("{line}");
        }
        println!();
        para(
            "The agent is one process on the node; its \"sides\" are listening sockets it opened inside each enrolled pod's network namespace. A pod outside the mesh has no such sockets and no eBPF programs: its traffic goes straight through.",
        );
    }

    /// Sends one request and tells what the agent and the server saw.
    fn exchange(&mut self, agent: &Agent, x: Exchange<'_>) -> anyhow::Result<()> {
        self.connections += 1;
        println!();
        println!(" {}. {}", self.connections, x.title);
        let url = format!("http://{}/", x.server.addr());
        let before = agent.events().len();
        let got = curl(&x.client.pod, &url).with_context(|| format!("sending {}", x.title))?;
        let redirected = got.local.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST);
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
        self.check(got.status == 200, || {
            format!("{} got HTTP {}", x.title, got.status)
        });
        self.check(redirected == x.outbound_captured, || {
            format!(
                "curl in {} was {}redirected to the agent",
                x.client.name(),
                if redirected { "" } else { "not " }
            )
        });

        // The log lines to expect: outbound from curl's own port, inbound at the server.
        let client_src = SocketAddr::new(IpAddr::V4(x.client.pod.ip), got.local.port()).to_string();
        let server_addr = x.server.addr().to_string();
        let client_ip = IpAddr::V4(x.client.pod.ip);
        let outbound =
            |e: &Value| is_connection(e, "outbound") && field(e, "src.addr") == client_src;
        let inbound = |e: &Value| {
            is_connection(e, "inbound")
                && field(e, "dst.original") == server_addr
                && ip_of(field(e, "src.addr")) == Some(client_ip)
        };
        let mut wanted: Vec<&dyn Fn(&Value) -> bool> = Vec::new();
        if x.outbound_captured {
            wanted.push(&outbound);
        }
        if x.inbound_captured {
            wanted.push(&inbound);
        }
        let events = wait_for_new_events(
            agent,
            before,
            &format!("the agent's log lines for {}", x.title),
            &wanted,
        )?;
        let mut events = events.into_iter();
        if x.outbound_captured {
            let e = events.next().context("outbound event")?;
            let dst = match short(field(&e, "dst.pod")) {
                "" => "no pod the agent knows".to_string(),
                pod if x.inbound_captured => pod.to_string(),
                pod => format!("{pod}, outside the mesh"),
            };
            say(
                "outbound",
                &format!(
                    "{} ({}) connected to {} ({dst}); the agent's outbound side in {}'s pod caught it and relayed {}",
                    short(field(&e, "src.pod")),
                    field(&e, "src.identity"),
                    field(&e, "dst.original"),
                    x.client.name(),
                    traffic(&e),
                ),
            );
            self.check(field(&e, "error").is_empty(), || {
                format!(
                    "outbound relay for {} ended with {}",
                    x.title,
                    field(&e, "error")
                )
            });
        } else {
            say(
                "outbound",
                &format!(
                    "not caught: {} is not enrolled, its connect() went straight out",
                    x.client.name()
                ),
            );
        }
        if x.inbound_captured {
            let e = events.next().context("inbound event")?;
            let src_ip = ip_of(field(&e, "src.addr"))
                .map(|ip| ip.to_string())
                .unwrap_or_default();
            let from = match short(field(&e, "src.pod")) {
                "" => format!("{src_ip}, no pod the agent knows"),
                pod if x.outbound_captured => format!("{src_ip}, {pod}"),
                pod => format!("{src_ip}, {pod}, not enrolled"),
            };
            say(
                "inbound",
                &format!(
                    "{}'s inbound side caught it{} (from {from}) and relayed {} to the app on :{APP_PORT}",
                    x.server.name(),
                    if x.outbound_captured { " again" } else { "" },
                    traffic(&e),
                ),
            );
            self.check(field(&e, "error").is_empty(), || {
                format!(
                    "inbound relay for {} ended with {}",
                    x.title,
                    field(&e, "error")
                )
            });
        } else {
            say(
                "inbound",
                &format!(
                    "not caught: {} is not enrolled, the connection went straight to the app",
                    x.server.name()
                ),
            );
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
                say(
                    "server",
                    &format!(
                        "peer-echo in {} saw the client as {peer}{}{}",
                        x.server.name(),
                        if real {
                            format!(": {}'s real address", x.client.name())
                        } else {
                            format!(", not {}'s address {client_ip}!", x.client.name())
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
        Ok(())
    }
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
