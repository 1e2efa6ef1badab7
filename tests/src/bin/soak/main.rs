//! `soak run`: minutes of mixed mesh traffic against two real agents, with config reloads and
//! certificate rotations, watching the agents' memory and file descriptors.
//! (`cargo xtask soak --minutes N` builds release binaries and runs this.)
//!
//! Topology (harness nodes, one agent per node, one CA shared by both):
//!
//! ```text
//!  node 1: client1  web1 (http-backend)  echo1 (peer-echo tcp)     agent 1
//!  node 2: client2  web2 (http-backend)  echo2 (peer-echo tcp)     agent 2
//! ```
//!
//! Every pod is enrolled. Service `web` (VIP, port 80, `appProtocol: http`) has an HTTPRoute
//! sending `/n1/...` to Service `web-n1` (pod web1) and `/n2/...` to `web-n2` (pod web2), so
//! every request goes through the client-side agent's L7 engine; requests from a client to
//! the other node's backend, and L4 echo connections to the other node's echo pod, cross the
//! node link over HBONE (mTLS). The same Services have a port 81 declared `appProtocol:
//! http2` (the same http-backend, which serves h2c too), with a second HTTPRoute doing the
//! same for it: nothing on it needs hyper, so the agents serve it on the HTTP/2 fast path
//! (checked at the end with `trellis_http2_connections_total{path}`). Each client pod runs
//! the load generator (`soak load`, see load.rs) against its own node's and the other
//! node's echo and web backends: new and long-lived L4 connections, keep-alive and
//! new-connection HTTP/1.1, long-lived and new h2c connections with concurrent streams,
//! every byte and every answer checked.
//!
//! During the run:
//! - every `--reload-seconds` both agents' config files are rewritten: usually a harmless
//!   change (the route's `x-soak-gen` request header gets the next generation number), every
//!   fourth time an invalid config (a bad pod IP, an unknown path match type, broken YAML),
//!   which must be rejected while traffic continues. Each rewrite waits for the agent's
//!   `trellis_config_reloads_total{result}` to count it;
//! - certificates live `--cert-lifetime` seconds and rotate at half life;
//! - every `--sample-seconds` (a minute) one line per agent: VmRSS, open fds, threads, the
//!   operations of its node's client so far, rotations and reloads so far.
//!
//! The run fails (exit status 1, reasons listed) when any operation failed or was lost, an
//! agent exited, a reload was not counted as expected, the last generation did not reach the
//! data path, an identity rotated fewer times than its lifetime implies, an agent served an
//! h2c connection on hyper or none on the fast path, or RSS or fds grew without bound (the
//! rule is in verdict.rs).
mod load;
mod verdict;

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, ExitCode, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use clap::{Parser, Subcommand};
use mesh_tests::{
    Agent, Background, Node, Pod,
    agent::{AGENT_DEADLINE, field, http_get, http2_connections, message, metric},
    wait_until,
};
use serde_json::{Value, json};

use verdict::Verdict;

const WEB_PORT: u16 = 8080;
/// The Service port declared `appProtocol: http2` (80 is the HTTP/1.1 one).
const H2C_PORT: u16 = 81;
const ECHO_PORT: u16 = 7070;
/// Host parts of the Service VIPs in node 1's subnet (no pod has them).
const VIP_WEB: u8 = 200;
const VIP_WEB_N1: u8 = 201;
const VIP_WEB_N2: u8 = 202;
/// Every this many reloads, an invalid config.
const INVALID_EVERY: u64 = 4;
/// No reload closer than this to the end: the last generation must have time to show.
const RELOAD_QUIET_END: Duration = Duration::from_secs(10);
/// How long the load generators may take to finish after the deadline.
const DRAIN_DEADLINE: Duration = Duration::from_secs(60);
/// A rotation happens every lifetime * ROTATE_AT.
const ROTATE_AT: f64 = 0.5;

#[derive(Parser)]
#[command(
    name = "soak",
    about = "Soak test of two Trellis agents under mixed load"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the nodes, start the agents, run the load and judge the result (needs root).
    Run(RunArgs),
    /// The load generator, run inside a client pod by `soak run`.
    Load(load::LoadArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Minutes of load.
    #[arg(long, conflicts_with = "seconds")]
    minutes: Option<u64>,
    /// Seconds of load (for short runs; default: 10 minutes).
    #[arg(long)]
    seconds: Option<u64>,
    /// Seconds between the RSS/fd samples (and progress lines).
    #[arg(long, default_value_t = 60)]
    sample_seconds: u64,
    /// Seconds between config rewrites.
    #[arg(long, default_value_t = 25)]
    reload_seconds: u64,
    /// Certificate lifetime in seconds (rotation at half life).
    #[arg(long, default_value_t = 30)]
    cert_lifetime: u64,
    /// Multiplies the rates of the new-connection load classes.
    #[arg(long, default_value_t = 1.0)]
    rate_scale: f64,
    /// The agents' RUST_LOG (access logs are part of what is soaked; `info,access=off`
    /// leaves them out).
    #[arg(long, default_value = "info")]
    agent_log: String,
    /// Also write the figures and the verdict as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => run(args),
        Cmd::Load(args) => load::run(args).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The two nodes, their pods and what the configs need to know.
struct Topology {
    nodes: [Node; 2],
    /// Per node: client, web, echo.
    pods: [[Pod; 3]; 2],
    vip: [Ipv4Addr; 3],
    cert_lifetime: u64,
}

const CLIENT: usize = 0;
const WEB: usize = 1;
const ECHO: usize = 2;

/// An invalid config of one of three kinds, by reload number.
#[derive(Clone, Copy, Debug)]
enum Invalid {
    BadPodIp,
    UnknownMatchType,
    BrokenYaml,
}

impl Invalid {
    fn nth(n: u64) -> Self {
        match n % 3 {
            0 => Invalid::BadPodIp,
            1 => Invalid::UnknownMatchType,
            _ => Invalid::BrokenYaml,
        }
    }
}

impl Topology {
    fn build(cert_lifetime: u64) -> anyhow::Result<Self> {
        let mut n1 = Node::new()?;
        let mut n2 = Node::new()?;
        n1.link(&n2).context("linking the nodes")?;
        let pods_of = |node: &mut Node, i: usize| -> anyhow::Result<[Pod; 3]> {
            Ok([
                node.add_pod(&format!("client{i}"))?,
                node.add_pod(&format!("web{i}"))?,
                node.add_pod(&format!("echo{i}"))?,
            ])
        };
        let p1 = pods_of(&mut n1, 1)?;
        let p2 = pods_of(&mut n2, 2)?;
        let s = n1.subnet;
        let vip = [VIP_WEB, VIP_WEB_N1, VIP_WEB_N2].map(|h| Ipv4Addr::new(s[0], s[1], s[2], h));
        Ok(Self {
            nodes: [n1, n2],
            pods: [p1, p2],
            vip,
            cert_lifetime,
        })
    }

    /// The config of node `n` (0 or 1) at `generation`, or an invalid one.
    fn config(&self, n: usize, generation: u64, invalid: Option<Invalid>) -> String {
        if let Some(Invalid::BrokenYaml) = invalid {
            return format!("# soak: broken on purpose\nnode: [{}\n", self.nodes[n].id);
        }
        let mut doc = format!(
            "# soak generation {generation}\nnode: {}\ntrustDomain: cluster.local\nidentity: {{certificateLifetime: {}s, rotateAt: {ROTATE_AT}}}\npods:\n",
            self.nodes[n].id, self.cert_lifetime
        );
        for (m, pods) in self.pods.iter().enumerate() {
            for (role, pod) in pods.iter().enumerate() {
                let (sa, labels) = match role {
                    CLIENT => ("frontend", "{app: client}".to_string()),
                    WEB => ("web", format!("{{app: web, instance: {}}}", pod.name)),
                    _ => ("echo", "{app: echo}".to_string()),
                };
                let ip = if matches!(invalid, Some(Invalid::BadPodIp)) && m == n && role == CLIENT {
                    "10.0.0.999".to_string()
                } else {
                    pod.ip.to_string()
                };
                let place = if m == n {
                    format!(
                        "netns: {}, cgroup: {}",
                        pod.netns_path.display(),
                        pod.cgroup.display()
                    )
                } else {
                    format!("node: {}", self.nodes[m].id)
                };
                doc.push_str(&format!(
                    "  - {{name: {}, namespace: shop, serviceAccount: {sa}, ip: {ip}, {place}, labels: {labels}}}\n",
                    pod.name
                ));
            }
        }
        let service = |name: &str, vip: Ipv4Addr, selector: &str| {
            format!(
                "  - name: {name}\n    namespace: shop\n    vips: [{vip}]\n    selector: {{{selector}}}\n    ports:\n      - {{name: http, port: 80, targetPort: {WEB_PORT}, appProtocol: http}}\n      - {{name: h2c, port: {H2C_PORT}, targetPort: {WEB_PORT}, appProtocol: http2}}\n"
            )
        };
        doc.push_str("services:\n");
        doc.push_str(&service("web", self.vip[0], "app: web"));
        doc.push_str(&service("web-n1", self.vip[1], "instance: web1"));
        doc.push_str(&service("web-n2", self.vip[2], "instance: web2"));
        let match_type = match invalid {
            Some(Invalid::UnknownMatchType) => "Sideways",
            _ => "PathPrefix",
        };
        doc.push_str("httpRoutes:\n");
        // The same rules for the HTTP/1.1 port and the HTTP/2 one (whose backends are the
        // Services' HTTP/2 ports, or the agent would send it to hyper).
        for (route, port) in [("web", 80), ("web-h2c", H2C_PORT)] {
            doc.push_str(&format!(
                "  - name: {route}\n    namespace: shop\n    parentRefs: [{{name: web, port: {port}}}]\n    rules:\n"
            ));
            for backend in ["n1", "n2"] {
                doc.push_str(&format!(
                    "      - matches: [{{path: {{type: {match_type}, value: /{backend}}}}}]\n        filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x-soak-gen, value: \"{generation}\"}}]}}}}]\n        backendRefs: [{{name: web-{backend}, port: {port}}}]\n"
                ));
            }
        }
        doc
    }

    /// The load generator's targets for the client on node `n`: its own node's echo and web
    /// backends ("local-*", the web one over HTTP/1.1 and h2c) and the other node's
    /// ("remote-*").
    fn load_targets(&self, n: usize) -> Vec<String> {
        let mut args = Vec::new();
        for (m, place) in [(n, "local"), (1 - n, "remote")] {
            args.push("--echo".to_string());
            args.push(format!(
                "{place}-echo={}:{ECHO_PORT}",
                self.pods[m][ECHO].ip
            ));
            args.push("--http".to_string());
            args.push(format!(
                "{place}-web={}:80,/n{},{}",
                self.vip[0],
                m + 1,
                self.pods[m][WEB].name
            ));
            args.push("--h2c".to_string());
            args.push(format!(
                "{place}-h2c={}:{H2C_PORT},/n{},{}",
                self.vip[0],
                m + 1,
                self.pods[m][WEB].name
            ));
        }
        args
    }
}

/// A load generator process in a client pod; killed on drop if still running.
struct LoadProcess {
    pod: String,
    child: Child,
    latest: Arc<Mutex<Option<Value>>>,
    last: Arc<Mutex<Option<Value>>>,
}

impl LoadProcess {
    fn start(pod: &Pod, seconds: u64, targets: &[String], rate_scale: f64) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the soak binary")?;
        let mut cmd = pod.command(exe)?;
        cmd.args(["load", "--seconds", &seconds.to_string()])
            .args(["--rate-scale", &rate_scale.to_string()])
            .args(targets)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting the load generator in {}", pod.name))?;
        let stdout = child.stdout.take().context("load generator stdout")?;
        let latest = Arc::new(Mutex::new(None));
        let last = Arc::new(Mutex::new(None));
        let (l, f) = (latest.clone(), last.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    eprintln!("soak: load generator said: {line}");
                    continue;
                };
                let slot = if v["final"] == true { &f } else { &l };
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
            }
        });
        Ok(Self {
            pod: pod.name.clone(),
            child,
            latest,
            last,
        })
    }

    fn latest(&self) -> Option<Value> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner()).clone();
        last.or_else(|| {
            self.latest
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        })
    }

    fn final_report(&self) -> Option<Value> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for LoadProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sums the counters of a load report: (attempted, ok, failed).
fn totals(report: &Value) -> (u64, u64, u64) {
    let mut t = (0, 0, 0);
    if let Some(classes) = report["classes"].as_object() {
        for c in classes.values() {
            t.0 += c["attempted"].as_u64().unwrap_or(0);
            t.1 += c["ok"].as_u64().unwrap_or(0);
            t.2 += c["failed"].as_u64().unwrap_or(0);
        }
    }
    t
}

/// Reads an agent's JSON log incrementally and counts what the soak checks.
#[derive(Default)]
struct LogTail {
    offset: u64,
    /// Rotations per identity.
    rotated: BTreeMap<String, u64>,
    hbone_established: u64,
    applied: u64,
    rejected: u64,
    /// WARN/ERROR events other than the expected rejections, by message.
    problems: BTreeMap<String, u64>,
    /// Access-log events carrying an error, by message and error (first 120 chars).
    access_errors: BTreeMap<String, u64>,
}

impl LogTail {
    fn poll(&mut self, path: &Path) -> anyhow::Result<()> {
        let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        // Only whole lines: the agent may be mid-write.
        let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
            return Ok(());
        };
        self.offset += end as u64 + 1;
        for line in buf[..end].split(|&b| b == b'\n') {
            let Ok(e) = serde_json::from_slice::<Value>(line) else {
                continue;
            };
            let msg = message(&e);
            match msg {
                "certificate rotated" => {
                    *self
                        .rotated
                        .entry(field(&e, "identity").to_string())
                        .or_default() += 1
                }
                "HBONE connection established" => self.hbone_established += 1,
                "config applied" => self.applied += 1,
                m if m.starts_with("config rejected") => self.rejected += 1,
                "connection closed" | "http request" => {
                    let err = field(&e, "error");
                    if !err.is_empty() {
                        let key: String = format!("{msg}: {err}").chars().take(120).collect();
                        *self.access_errors.entry(key).or_default() += 1;
                    }
                }
                _ => {
                    if matches!(field(&e, "level"), "WARN" | "ERROR") {
                        *self.problems.entry(msg.to_string()).or_default() += 1;
                    }
                }
            }
        }
        Ok(())
    }
}

/// One agent under soak.
struct Soaked {
    name: String,
    agent: Agent,
    pid: u32,
    metrics: SocketAddr,
    admin: SocketAddr,
    log: LogTail,
    samples: Vec<Sample>,
}

#[derive(Clone, Debug)]
struct Sample {
    at_s: u64,
    rss_kib: u64,
    fds: u64,
    threads: u64,
    ok: u64,
    failed: u64,
}

fn proc_status(pid: u32, key: &str) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (did the agent exit?)"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

fn open_fds(pid: u32) -> anyhow::Result<u64> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .count() as u64)
}

impl Soaked {
    /// Fails with the end of its log if the agent has exited (the harness owns the child,
    /// so /proc says whether it still runs; an unreaped exit shows as a zombie).
    fn ensure_running(&self) -> anyhow::Result<()> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        let running = stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'));
        ensure!(
            running,
            "{} (pid {}) exited during the soak:\n{}",
            self.name,
            self.pid,
            tail(&self.agent.log_text(), 20)
        );
        Ok(())
    }

    fn reloads(&self) -> anyhow::Result<(u64, u64)> {
        let (status, text) = http_get(self.metrics, "/metrics")?;
        ensure!(status == 200, "{}: /metrics answered {status}", self.name);
        let get = |result: &str| {
            metric(
                &text,
                &format!("trellis_config_reloads_total{{result=\"{result}\"}}"),
            )
            .map(|v| v as u64)
            .with_context(|| format!("{}: no reload counter for {result}", self.name))
        };
        Ok((get("accepted")?, get("rejected")?))
    }

    /// HTTP/2 connections served so far: (on the fast path, on hyper).
    fn http2_connections(&self) -> anyhow::Result<(u64, u64)> {
        let (status, text) = http_get(self.metrics, "/metrics")?;
        ensure!(status == 200, "{}: /metrics answered {status}", self.name);
        Ok(http2_connections(&text))
    }

    fn sample(&mut self, at_s: u64, client: Option<&Value>) -> anyhow::Result<Sample> {
        let (_, ok, failed) = client.map(totals).unwrap_or_default();
        let s = Sample {
            at_s,
            rss_kib: proc_status(self.pid, "VmRSS:")?,
            fds: open_fds(self.pid)?,
            threads: proc_status(self.pid, "Threads:")?,
            ok,
            failed,
        };
        self.samples.push(s.clone());
        Ok(s)
    }
}

fn run(args: RunArgs) -> anyhow::Result<bool> {
    let seconds = match (args.minutes, args.seconds) {
        (Some(m), _) => m * 60,
        (None, Some(s)) => s,
        (None, None) => 600,
    };
    ensure!(
        (10..=24 * 3600).contains(&seconds),
        "the soak must last 10 s to 24 h"
    );
    ensure!(
        args.sample_seconds >= 5 && args.sample_seconds <= seconds,
        "--sample-seconds must be in 5..=duration"
    );
    ensure!(args.reload_seconds >= 3, "--reload-seconds must be >= 3");
    ensure!(args.cert_lifetime >= 4, "--cert-lifetime must be >= 4");
    mesh_tests::require_privileges()?;
    let agent_bin = mesh_tests::agent_binary()?;
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("the soak binary has no directory")?
        .to_path_buf();
    let http_backend = bin_dir.join("http-backend");
    let peer_echo = bin_dir.join("peer-echo");
    for bin in [&http_backend, &peer_echo] {
        ensure!(
            bin.is_file(),
            "{} is missing: build the mesh-tests binaries",
            bin.display()
        );
    }
    let samples_planned = (seconds / args.sample_seconds) as usize;
    println!(
        "soak: {seconds} s of load, a sample every {} s, a config rewrite every {} s (every {INVALID_EVERY}th invalid), certificates of {} s rotated at half life",
        args.sample_seconds, args.reload_seconds, args.cert_lifetime
    );
    println!("soak: agent binary {}", agent_bin.display());

    let topo = Topology::build(args.cert_lifetime)?;
    let mut servers = Vec::new();
    for pods in &topo.pods {
        let mut web = pods[WEB].command(&http_backend)?;
        web.args([&WEB_PORT.to_string(), "--name", &pods[WEB].name]);
        servers.push(Background::spawn_ready(web, "listening").context("starting http-backend")?);
        let mut echo = pods[ECHO].command(&peer_echo)?;
        echo.args(["tcp", &ECHO_PORT.to_string()]);
        servers.push(Background::spawn_ready(echo, "listening").context("starting peer-echo")?);
    }
    let fleet_ca = std::env::temp_dir().join(format!("trellis-{}-soak-fleet", std::process::id()));
    fs::create_dir_all(&fleet_ca).with_context(|| format!("creating {}", fleet_ca.display()))?;
    let mut generation = 1;
    let mut agents = Vec::new();
    for n in 0..2 {
        let name = format!("soak-n{}", n + 1);
        let mut agent = Agent::start_with_env(
            &name,
            &topo.config(n, generation, None),
            Some(&fleet_ca),
            &[("RUST_LOG", args.agent_log.as_str())],
        )
        .with_context(|| format!("starting agent {}", n + 1))?;
        for pod in &topo.pods[n] {
            let key = format!("shop/{}", pod.name);
            agent.wait_for_event(&format!("{key} enrolled"), |e| {
                message(e) == "pod enrolled" && field(e, "pod") == key
            })?;
        }
        let pid = agent.pid().context("the agent is not running")?;
        agents.push(Soaked {
            name: format!("node{} agent", n + 1),
            pid,
            metrics: agent.metrics_addr()?,
            admin: agent.admin_addr()?,
            agent,
            log: LogTail::default(),
            samples: Vec::new(),
        });
    }
    preflight(&topo)?;

    let mut loads = (0..2)
        .map(|n| {
            LoadProcess::start(
                &topo.pods[n][CLIENT],
                seconds,
                &topo.load_targets(n),
                args.rate_scale,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut failures: Vec<String> = Vec::new();
    let mut reloads = Reloads::default();
    let mut next_reload = start + Duration::from_secs(args.reload_seconds);
    let mut next_sample = 1u64;
    let mut baseline_reloads = Vec::new();
    for a in &agents {
        baseline_reloads.push(a.reloads()?);
    }

    // The main loop: reloads on their schedule, samples on theirs, until the last sample.
    while (next_sample as usize) <= samples_planned {
        let sample_at = start + Duration::from_secs(next_sample * args.sample_seconds);
        let now = Instant::now();
        if now >= sample_at {
            let at_s = next_sample * args.sample_seconds;
            for (n, a) in agents.iter_mut().enumerate() {
                a.log.poll(&a.agent.log_path)?;
                let s = a.sample(at_s, loads[n].latest().as_ref())?;
                println!(
                    "[soak] {} {:>4} s  {:<12} pid {:<7} rss {:>7.1} MiB  fds {:>4}  threads {:>3} | client{} ok {:>8} failed {:>4} | rotations {:>4} | reloads {} applied / {} rejected",
                    unit_label(args.sample_seconds, next_sample),
                    at_s,
                    a.name,
                    a.pid,
                    s.rss_kib as f64 / 1024.0,
                    s.fds,
                    s.threads,
                    n + 1,
                    s.ok,
                    s.failed,
                    a.log.rotated.values().sum::<u64>(),
                    a.log.applied,
                    a.log.rejected,
                );
            }
            next_sample += 1;
            continue;
        }
        if now >= next_reload {
            if now + RELOAD_QUIET_END < end {
                reloads.step(&topo, &agents, &mut generation, &mut failures)?;
            }
            next_reload += Duration::from_secs(args.reload_seconds);
            continue;
        }
        for l in &mut loads {
            if let Some(status) = l.exited() {
                bail!("the load generator in {} exited early ({status})", l.pod);
            }
        }
        for a in &mut agents {
            a.ensure_running()?;
            a.log.poll(&a.agent.log_path)?;
        }
        let wake = sample_at.min(next_reload);
        std::thread::sleep(
            wake.saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1)),
        );
    }

    // The generators stop at the deadline and finish what they started.
    let drain = end.saturating_duration_since(Instant::now()) + DRAIN_DEADLINE;
    let reports = wait_until("the load generators' final reports", drain, || {
        let all: Vec<Value> = loads.iter().filter_map(LoadProcess::final_report).collect();
        (all.len() == loads.len()).then_some(all)
    })
    .context("a load generator did not finish")?;
    for a in &mut agents {
        a.log.poll(&a.agent.log_path)?;
    }

    let summary = judge(
        &args,
        seconds,
        &topo,
        &mut agents,
        &reports,
        &reloads,
        generation,
        &baseline_reloads,
        &mut failures,
    )?;

    // A clean shutdown is part of the verdict too.
    for a in &mut agents {
        match a.agent.terminate() {
            Ok(status) if status.success() => {}
            Ok(status) => failures.push(format!("{} exited with {status} on SIGTERM", a.name)),
            Err(e) => failures.push(format!("{} did not exit on SIGTERM: {e:#}", a.name)),
        }
    }
    let _ = fs::remove_dir_all(&fleet_ca);
    println!();
    if failures.is_empty() {
        println!("soak: PASS");
    } else {
        println!("soak: FAIL");
        for f in &failures {
            println!("  - {f}");
        }
    }
    if let Some(path) = &args.json {
        let mut summary = summary;
        summary["pass"] = json!(failures.is_empty());
        summary["failures"] = json!(failures);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        fs::write(path, serde_json::to_string_pretty(&summary)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        println!("soak: wrote {}", path.display());
    }
    drop(servers);
    Ok(failures.is_empty())
}

fn unit_label(sample_seconds: u64, n: u64) -> String {
    if sample_seconds == 60 {
        format!("minute {n:>3}")
    } else {
        format!("sample {n:>3}")
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Every client reaches every backend before the load starts (fails fast on a broken setup).
fn preflight(topo: &Topology) -> anyhow::Result<()> {
    for n in 0..2 {
        let client = &topo.pods[n][CLIENT];
        for m in 0..2 {
            let url = format!("http://{}/n{}/preflight", topo.vip[0], m + 1);
            let want = &topo.pods[m][WEB].name;
            wait_until(
                &format!("{url} from {}", client.name),
                AGENT_DEADLINE,
                || {
                    let (code, body) = client.curl(&url).ok()?;
                    let v: Value = serde_json::from_str(&body).ok()?;
                    (code == 200 && v["name"] == want.as_str()).then_some(())
                },
            )?;
            let url = format!("http://{}:{H2C_PORT}/n{}/preflight", topo.vip[0], m + 1);
            wait_until(
                &format!("{url} (h2c) from {}", client.name),
                AGENT_DEADLINE,
                || {
                    let body = curl_h2c(client, &url)?;
                    let v: Value = serde_json::from_str(&body).ok()?;
                    (v["name"] == want.as_str() && v["version"] == "HTTP/2.0").then_some(())
                },
            )?;
            let echo = topo.pods[m][ECHO].ip;
            let script = format!(
                "import socket\ns = socket.create_connection(('{echo}', {ECHO_PORT}), timeout=10)\ns.sendall(b'preflight')\ns.shutdown(socket.SHUT_WR)\ndata = b''\nwhile True:\n    c = s.recv(100)\n    if not c: break\n    data += c\nassert data == b'preflight', data\nprint('ok')\n"
            );
            wait_until(
                &format!("echo {echo} from {}", client.name),
                AGENT_DEADLINE,
                || client.python(&script).ok().filter(|o| o.trim() == "ok"),
            )?;
        }
    }
    Ok(())
}

/// The body of a 200 to a GET of `url` over h2c (prior knowledge) from `pod`.
fn curl_h2c(pod: &Pod, url: &str) -> Option<String> {
    let out = pod
        .command("curl")
        .ok()?
        .args([
            "-sS",
            "--fail",
            "--max-time",
            "20",
            "--http2-prior-knowledge",
            url,
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Config rewrites: what was written and whether each agent counted it.
#[derive(Default)]
struct Reloads {
    count: u64,
    good: u64,
    bad: u64,
    /// Milliseconds until both agents counted it, per rewrite.
    latencies_ms: Vec<u64>,
}

impl Reloads {
    fn step(
        &mut self,
        topo: &Topology,
        agents: &[Soaked],
        generation: &mut u64,
        failures: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        self.count += 1;
        let invalid = self
            .count
            .is_multiple_of(INVALID_EVERY)
            .then(|| Invalid::nth(self.bad));
        if invalid.is_none() {
            *generation += 1;
        }
        let before: Vec<(u64, u64)> = agents
            .iter()
            .map(Soaked::reloads)
            .collect::<anyhow::Result<_>>()?;
        let t = Instant::now();
        for (n, a) in agents.iter().enumerate() {
            a.agent
                .write_config(&topo.config(n, *generation, invalid))
                .with_context(|| format!("rewriting {}'s config", a.name))?;
        }
        for (a, (acc, rej)) in agents.iter().zip(&before) {
            let what = match invalid {
                Some(kind) => format!("{} to reject the invalid config ({kind:?})", a.name),
                None => format!("{} to apply generation {generation}", a.name),
            };
            let counted = wait_until(&what, AGENT_DEADLINE, || {
                let (acc2, rej2) = a.reloads().ok()?;
                (acc2 > *acc || rej2 > *rej).then_some((acc2 - acc, rej2 - rej))
            });
            match (counted, invalid) {
                (Ok((0, 1)), Some(_)) | (Ok((1, 0)), None) => {}
                (Ok((accepted, rejected)), _) => failures.push(format!(
                    "{what}: counted {accepted} accepted and {rejected} rejected"
                )),
                (Err(e), _) => failures.push(format!("{e:#}")),
            }
        }
        self.latencies_ms.push(t.elapsed().as_millis() as u64);
        match invalid {
            Some(kind) => {
                self.bad += 1;
                println!(
                    "[soak] config rewrite {}: invalid ({kind:?}), rejected",
                    self.count
                );
            }
            None => {
                self.good += 1;
                println!(
                    "[soak] config rewrite {}: generation {generation} applied",
                    self.count
                );
            }
        }
        Ok(())
    }
}

/// Checks everything after the run, prints the summary, and returns it as JSON.
#[allow(clippy::too_many_arguments)]
fn judge(
    args: &RunArgs,
    seconds: u64,
    topo: &Topology,
    agents: &mut [Soaked],
    reports: &[Value],
    reloads: &Reloads,
    generation: u64,
    baseline_reloads: &[(u64, u64)],
    failures: &mut Vec<String>,
) -> anyhow::Result<Value> {
    println!(
        "\n== traffic (per client pod and class: attempted / ok / failed, bytes sent / verified)"
    );
    let mut grand = (0, 0, 0);
    let mut classes_json = serde_json::Map::new();
    for (n, r) in reports.iter().enumerate() {
        let client = &topo.pods[n][CLIENT].name;
        let classes = r["classes"]
            .as_object()
            .context("a report without classes")?;
        for (name, c) in classes {
            let g = |k: &str| c[k].as_u64().unwrap_or(0);
            println!(
                "  {client:<8} {name:<28} {:>8} / {:>8} / {:>4}   {:>11} / {:>11} B   reconnects {}",
                g("attempted"),
                g("ok"),
                g("failed"),
                g("bytes_sent"),
                g("bytes_verified"),
                g("reconnects")
            );
            if g("attempted") != g("ok") + g("failed") {
                failures.push(format!(
                    "{client} {name}: {} attempted but {} ok + {} failed: operations unaccounted for",
                    g("attempted"),
                    g("ok"),
                    g("failed")
                ));
            }
            if g("bytes_sent") != g("bytes_verified") {
                failures.push(format!(
                    "{client} {name}: {} bytes sent, {} verified",
                    g("bytes_sent"),
                    g("bytes_verified")
                ));
            }
            if g("attempted") == 0 {
                failures.push(format!("{client} {name}: no operations at all"));
            }
            classes_json.insert(format!("{client} {name}"), c.clone());
        }
        let (a, o, f) = totals(r);
        grand = (grand.0 + a, grand.1 + o, grand.2 + f);
        if f > 0 {
            failures.push(format!("{client}: {f} of {a} operations failed"));
            let listed = r["failures"].as_array().cloned().unwrap_or_default();
            println!("  {client}: failures (first {}):", listed.len());
            for l in &listed {
                println!("    {}", l.as_str().unwrap_or(""));
            }
        }
        let seen = r["max_gen"].as_u64().unwrap_or(0);
        if seen != generation {
            failures.push(format!(
                "{client}: the last generation seen in answers is {seen}, the last applied {generation}"
            ));
        }
    }
    println!(
        "  total: {} attempted, {} ok, {} failed ({:.0} operations/s)",
        grand.0,
        grand.1,
        grand.2,
        grand.0 as f64 / seconds as f64
    );

    println!("\n== config rewrites");
    println!(
        "  {} rewrites: {} good (last generation {generation}), {} invalid; both agents counted each within {} ms (max)",
        reloads.count,
        reloads.good,
        reloads.bad,
        reloads.latencies_ms.iter().max().copied().unwrap_or(0)
    );
    if reloads.good == 0 || reloads.bad == 0 {
        failures.push(format!(
            "the run was too short for both a good ({}) and an invalid ({}) config rewrite",
            reloads.good, reloads.bad
        ));
    }
    let mut agents_json = Vec::new();
    for (a, (acc0, rej0)) in agents.iter().zip(baseline_reloads) {
        let (acc, rej) = a.reloads()?;
        let (acc, rej) = (acc - acc0, rej - rej0);
        println!(
            "  {}: metrics count {acc} accepted, {rej} rejected; log: {} applied, {} rejected",
            a.name, a.log.applied, a.log.rejected
        );
        if acc != reloads.good || rej != reloads.bad {
            failures.push(format!(
                "{}: counted {acc} accepted / {rej} rejected reloads, expected {} / {}",
                a.name, reloads.good, reloads.bad
            ));
        }
        agents_json.push(json!({"name": a.name, "reloads_accepted": acc, "reloads_rejected": rej}));
    }

    println!("\n== HTTP/2 connections (h2c load; each agent serves its own node's client)");
    for (a, j) in agents.iter().zip(agents_json.iter_mut()) {
        let (fast, hyper) = a.http2_connections()?;
        println!("  {}: {fast} on the fast path, {hyper} on hyper", a.name);
        // Nothing on the h2c port needs hyper: a connection there means the agent chose
        // the wrong path, and the soak would not be soaking the fast path.
        if fast == 0 || hyper > 0 {
            failures.push(format!(
                "{}: {fast} HTTP/2 connections on the fast path and {hyper} on hyper, expected all on the fast path",
                a.name
            ));
        }
        j["http2_connections"] = json!({"fast_path": fast, "hyper": hyper});
    }

    println!(
        "\n== certificates (lifetime {} s, rotated at half life)",
        args.cert_lifetime
    );
    let period = args.cert_lifetime as f64 * ROTATE_AT;
    // The run lasts `seconds` plus set-up; at least one rotation per period of the load
    // alone, minus one for phase.
    let expected = ((seconds as f64 / period).floor() as u64).saturating_sub(1);
    for (a, j) in agents.iter().zip(agents_json.iter_mut()) {
        let (status, body) = http_get(a.admin, "/certs")?;
        ensure!(status == 200, "{}: /certs answered {status}", a.name);
        let certs: Value = serde_json::from_str(&body).context("/certs JSON")?;
        let certs = certs.as_array().context("/certs is not an array")?;
        let mut per_identity = serde_json::Map::new();
        for c in certs {
            let id = c["identity"].as_str().unwrap_or("?").to_string();
            let n = a.log.rotated.get(&id).copied().unwrap_or(0);
            let expiry = c["seconds_to_expiry"].as_f64().unwrap_or(-1.0);
            println!(
                "  {}: {id} rotated {n} times (expected at least {expected}); now expires in {expiry:.1} s",
                a.name
            );
            if n < expected {
                failures.push(format!(
                    "{}: {id} rotated {n} times, expected at least {expected}",
                    a.name
                ));
            }
            if !(expiry > 0.0 && expiry <= args.cert_lifetime as f64) {
                failures.push(format!(
                    "{}: {id} expires in {expiry} s: not a current certificate",
                    a.name
                ));
            }
            per_identity.insert(id, json!(n));
        }
        if certs.len() != 3 {
            failures.push(format!(
                "{}: holds {} certificates, expected 3 (frontend, web, echo)",
                a.name,
                certs.len()
            ));
        }
        j["rotations"] = Value::Object(per_identity);
        j["hbone_connections_established"] = json!(a.log.hbone_established);
    }

    println!("\n== agent resources (per sample: RSS MiB / open fds / threads)");
    let warmup = verdict::warmup_for(agents[0].samples.len());
    for (a, j) in agents.iter().zip(agents_json.iter_mut()) {
        let series: Vec<String> = a
            .samples
            .iter()
            .map(|s| {
                format!(
                    "{}s {:.1}/{}/{}",
                    s.at_s,
                    s.rss_kib as f64 / 1024.0,
                    s.fds,
                    s.threads
                )
            })
            .collect();
        println!("  {}: {}", a.name, series.join("  "));
        let rss: Vec<f64> = a.samples.iter().map(|s| s.rss_kib as f64).collect();
        let fds: Vec<f64> = a.samples.iter().map(|s| s.fds as f64).collect();
        for (what, v) in [
            ("RSS (KiB)", verdict::judge(&rss, warmup, verdict::RSS_KIB)),
            ("open fds", verdict::judge(&fds, warmup, verdict::FDS)),
        ] {
            println!("    {what}: {}", v.text());
            if v.failed() {
                failures.push(format!(
                    "{} {what} grows without bound: {}",
                    a.name,
                    v.text()
                ));
            }
            j[if what == "open fds" {
                "fds_verdict"
            } else {
                "rss_verdict"
            }] = json!(v.text());
            if let Verdict::NotJudged(_) = v {
                j["growth_judged"] = json!(false);
            }
        }
        j["samples"] = json!(
            a.samples
                .iter()
                .map(|s| json!({"at_s": s.at_s, "rss_kib": s.rss_kib, "fds": s.fds, "threads": s.threads, "client_ok": s.ok, "client_failed": s.failed}))
                .collect::<Vec<_>>()
        );
        println!(
            "    HBONE connections established: {}; access-log errors: {}; other warnings/errors: {}",
            a.log.hbone_established,
            a.log.access_errors.values().sum::<u64>(),
            a.log.problems.values().sum::<u64>()
        );
        for (m, n) in a.log.access_errors.iter().chain(&a.log.problems) {
            println!("      {n} x {m}");
        }
        j["access_log_errors"] = json!(a.log.access_errors);
        j["warnings"] = json!(a.log.problems);
    }
    println!(
        "  rule: after {warmup} warm-up sample(s), the last value must stay within baseline +{:.0}% +{:.0} MiB (RSS) / +{:.0}% +{:.0} (fds), and must not rise in every interval (>= {} intervals) by more than {:.0} MiB / {:.0} fds",
        verdict::RSS_KIB.pct * 100.0,
        verdict::RSS_KIB.slack / 1024.0,
        verdict::FDS.pct * 100.0,
        verdict::FDS.slack,
        verdict::MIN_RISING_INTERVALS,
        verdict::RSS_KIB.min_rise / 1024.0,
        verdict::FDS.min_rise
    );
    Ok(json!({
        "seconds": seconds,
        "sample_seconds": args.sample_seconds,
        "cert_lifetime_s": args.cert_lifetime,
        "operations": {"attempted": grand.0, "ok": grand.1, "failed": grand.2},
        "classes": classes_json,
        "reloads": {"good": reloads.good, "invalid": reloads.bad, "last_generation": generation},
        "agents": agents_json,
    }))
}
