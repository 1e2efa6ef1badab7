//! `cargo xtask bench`: pod-to-pod traffic directly and through the agent, side by side.
//!
//! One node (harness network namespaces), two pods `client` and `server`; the `meshbench`
//! server runs in the server pod and the `meshbench` client in the client pod, both release
//! builds, like the agent. Each scenario is one [`Row`]:
//!
//! - `pod-direct`: no agent running, pods not enrolled: veth to bridge to veth.
//! - `pod-agent`: the agent runs with both pods enrolled: the client app's connect is
//!   redirected (connect4) to the agent's outbound listener in the client pod, and the agent
//!   carries it to the server app (which path it takes, e.g. in-process delivery to a local
//!   pod or a second hop through the server pod's inbound listener, is the agent's business;
//!   the notes under the table count the agent's logged connections per direction and path,
//!   and the scenario fails if the agent relayed nothing).
//!
//! Measurements per scenario, each bounded by `--seconds` and a count:
//!
//! - request/response (`rps`, `p50_us`, `p99_us`): `--size` bytes (64) ping-pong on
//!   persistent connections. With the default `--connections 1` this is one connection, so
//!   the latency percentiles are unloaded round trips and `rps` is the single-connection rate
//!   (about 1 / mean latency, as in TOOLCHAIN.md's prototype table). With `--connections N`
//!   the N connections run concurrently, `rps` is their sum and the percentiles cover all.
//! - connection rate (`conn_per_s`): connect, send 64 B, read the 64 B echo, the server
//!   closes first (so TIME_WAIT stays on the server side), the client then closes; a tight
//!   loop on `--connections` threads.
//! - stream (`gbit_s`): one connection, the client writes for `--seconds` and half-closes,
//!   the server discards and answers with the byte count; rate = bytes the server read /
//!   time until its answer arrived.
//! - agent cost (`cpu_us_per_req`, `rss_kb`; null without an agent): the agent's
//!   utime+stime (/proc/PID/stat) over the request/response phase divided by the requests
//!   made, and its VmRSS after all phases.
//!
//! Results: a table on stdout and `target/bench/latest.json` (an array of [`Row`]s). To add
//! a scenario, write a function that sets it up and calls [`measure`], and list it in
//! [`SCENARIOS`]; ratios are printed against `pod-direct`.
use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader, Read as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_tests::{Agent, Node, Pod, agent};
use serde::Serialize;
use serde_json::Value;

use crate::{setup, util};

/// Port the meshbench server listens on in the server pod.
const SERVER_PORT: u16 = 7070;
/// How long the server may take to print `listening`.
const SERVER_START_DEADLINE: Duration = Duration::from_secs(10);
/// Slack on top of `--seconds` before a client run is killed as hung.
const CLIENT_SLACK: Duration = Duration::from_secs(45);
/// Above this share of the machine's CPU used by other processes, a scenario is flagged.
const NOISE_THRESHOLD: f64 = 0.10;
/// Name of the reference scenario the others are compared with.
const BASELINE: &str = "pod-direct";

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Seconds each measurement runs (request/response, connection rate, stream), per scenario.
    #[arg(long, default_value_t = 4.0)]
    pub seconds: f64,
    /// Concurrent connections (client threads) for request/response and connection rate.
    #[arg(long, default_value_t = 1)]
    pub connections: u32,
    /// Message size in bytes for request/response and connection rate.
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    /// Upper bound on requests per request/response phase.
    #[arg(long, default_value_t = 10_000_000)]
    pub max_requests: u64,
    /// Upper bound on connections per connection-rate phase.
    #[arg(long, default_value_t = 1_000_000)]
    pub max_connections: u64,
}

/// One line of the results: a scenario's figures (`None` where one does not apply).
#[derive(Serialize, Clone, Debug)]
pub struct Row {
    pub scenario: String,
    pub rps: Option<f64>,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub conn_per_s: Option<f64>,
    pub gbit_s: Option<f64>,
    pub cpu_us_per_req: Option<f64>,
    pub rss_kb: Option<u64>,
}

/// A row plus the notes printed under the table (not written to the JSON).
struct Measured {
    row: Row,
    notes: Vec<String>,
    /// Share of the machine's CPU that processes outside the pods and the agent used.
    others_share: f64,
}

/// What every scenario runs with.
struct Bench<'a> {
    args: &'a BenchArgs,
    node: &'a Node,
    meshbench: PathBuf,
    client: Pod,
    server: Pod,
    target: SocketAddr,
}

type ScenarioFn = fn(&Bench) -> anyhow::Result<Measured>;

/// The scenarios, in the order they run; the first is the baseline.
const SCENARIOS: &[(&str, ScenarioFn)] = &[(BASELINE, pod_direct), ("pod-agent", pod_agent)];

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if !(args.seconds > 0.0 && args.seconds <= 600.0) {
        bail!("--seconds must be in (0, 600]");
    }
    if args.connections == 0 || args.connections > 256 {
        bail!("--connections must be in 1..=256");
    }
    if args.size == 0 || args.size > 1 << 20 {
        bail!("--size must be in 1..=1048576");
    }
    setup::run()?;
    util::step("building release binaries (mesh-agent, meshbench)");
    util::cargo(&["build", "--release", "-p", "mesh-agent", "-p", "mesh-tests"])?;
    let root = util::workspace_root()?;
    let agent_bin = root.join("target/release/mesh-agent");
    let meshbench = root.join("target/release/meshbench");
    for bin in [&agent_bin, &meshbench] {
        if !bin.is_file() {
            bail!("{} is missing after the build", bin.display());
        }
    }
    // SAFETY: xtask has no other threads at this point; the harness reads it when starting
    // the agent.
    unsafe { std::env::set_var("MESH_AGENT_BIN", &agent_bin) };

    util::step("building a node with pods `client` and `server`");
    // Drop order (reverse of declaration): server process, then the node (its cgroups are
    // killed and namespaces deleted). Agents live and die inside their scenario.
    let mut node = Node::new()?;
    let client = node.add_pod("client")?;
    let server = node.add_pod("server")?;
    let _server_process = start_server(&server, &meshbench)?;
    let bench = Bench {
        args: &args,
        node: &node,
        meshbench,
        target: SocketAddr::new(server.ip.into(), SERVER_PORT),
        client,
        server,
    };

    let mut results = Vec::new();
    for (name, scenario) in SCENARIOS {
        util::step(&format!("scenario {name}"));
        let measured = scenario(&bench).with_context(|| format!("scenario {name}"))?;
        results.push(measured);
    }

    print_results(&args, &results);
    let noisy: Vec<&str> = results
        .iter()
        .filter(|m| m.others_share > NOISE_THRESHOLD)
        .map(|m| m.row.scenario.as_str())
        .collect();
    if !noisy.is_empty() {
        println!(
            "warning: other processes on this machine used more than {:.0}% of its CPU during {}: those figures are noisy",
            NOISE_THRESHOLD * 100.0,
            noisy.join(", ")
        );
    }
    let rows: Vec<Row> = results.iter().map(|m| m.row.clone()).collect();
    let out_dir = root.join("target/bench");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out = out_dir.join("latest.json");
    fs::write(&out, serde_json::to_string_pretty(&rows)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    println!("\nwrote {}", out.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Scenarios

/// Pod to pod with no agent running and nothing enrolled.
fn pod_direct(bench: &Bench) -> anyhow::Result<Measured> {
    probe(bench)?;
    measure(bench, BASELINE, None)
}

/// Both pods enrolled: every connection crosses the agent twice (outbound, then inbound).
fn pod_agent(bench: &Bench) -> anyhow::Result<Measured> {
    let config = agent::config_doc(
        &bench.node.id,
        &[
            bench.client.config_entry("default", "client", true),
            bench.server.config_entry("default", "server", true),
        ],
    );
    let mut agent = Agent::start("bench", &config)?;
    let pid = agent.pid().context("the agent is not running")?;
    let measured = probe(bench).and_then(|()| measure(bench, "pod-agent", Some(pid)));
    let mut measured = measured
        .map_err(|e| e.context(format!("agent log tail:\n{}", tail(&agent.log_text(), 20))))?;
    // Make sure the traffic really crossed the agent (a silent bypass would look great).
    let closed: Vec<Value> = agent
        .events()
        .into_iter()
        .filter(|e| agent::message(e) == "connection closed")
        .collect();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for e in &closed {
        let path = agent::field(e, "path");
        let kind = if path.is_empty() {
            agent::field(e, "direction").to_string()
        } else {
            format!("{} {path}", agent::field(e, "direction"))
        };
        *kinds.entry(kind).or_default() += 1;
    }
    let outbound: usize = kinds
        .iter()
        .filter(|(k, _)| k.starts_with("outbound"))
        .map(|(_, n)| n)
        .sum();
    if outbound == 0 {
        bail!(
            "the agent relayed no outbound connection: traffic bypassed it\nagent log tail:\n{}",
            tail(&agent.log_text(), 20)
        );
    }
    let failed = closed
        .iter()
        .filter(|e| !agent::field(e, "error").is_empty())
        .count();
    let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
    measured.notes.push(format!(
        "pod-agent: agent logged {}; {failed} closed with an error",
        kinds.join(", ")
    ));
    agent.terminate().context("stopping the agent")?;
    Ok(measured)
}

// ---------------------------------------------------------------------------------------
// Measurements

/// Runs the three measurements from the client pod to the server; with `agent_pid`, also
/// the agent's CPU per request and its memory.
fn measure(bench: &Bench, scenario: &str, agent_pid: Option<u32>) -> anyhow::Result<Measured> {
    let mut notes = Vec::new();
    // The pods' cgroups share a parent (the node's).
    let pods_cgroup = bench
        .client
        .cgroup
        .parent()
        .context("the client pod's cgroup has no parent")?;
    let start = CpuSnapshot::take(pods_cgroup, agent_pid)?;

    let cpu_before = agent_pid.map(cpu_ticks).transpose()?;
    let rr = request_response(bench)?;
    let cpu_after = agent_pid.map(cpu_ticks).transpose()?;
    let cpu_us_per_req = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) if rr.requests > 0 => Some(round(
            (after - before) as f64 * 1e6 / clock_ticks_per_second() / rr.requests as f64,
            2,
        )),
        _ => None,
    };
    notes.push(format!(
        "rr: {} requests on {} connection(s) in {:.2} s, max {:.0} µs",
        rr.requests, bench.args.connections, rr.seconds, rr.max_us
    ));

    let cpu_before = agent_pid.map(cpu_ticks).transpose()?;
    let conn = connection_rate(bench)?;
    let cpu_after = agent_pid.map(cpu_ticks).transpose()?;
    let agent_cpu_per_conn = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) => format!(
            ", agent CPU {:.0} µs/connection",
            (after - before) as f64 * 1e6 / clock_ticks_per_second() / conn.completed as f64
        ),
        _ => String::new(),
    };
    notes.push(format!(
        "conn: {} connections in {:.2} s, per connection p50 {:.0} µs p99 {:.0} µs max {:.0} µs, {} errors ({} EADDRNOTAVAIL){}{agent_cpu_per_conn}",
        conn.completed,
        conn.seconds,
        conn.p50_us,
        conn.p99_us,
        conn.max_us,
        conn.errors,
        conn.addr_not_available,
        conn.first_error.as_deref().map(|e| format!(", first: {e}")).unwrap_or_default()
    ));

    let stream = stream(bench)?;
    notes.push(format!(
        "stream: {:.2} GB in {:.2} s",
        stream.bytes as f64 / 1e9,
        stream.seconds
    ));

    let rss_kb = agent_pid.map(rss_kb).transpose()?;
    let others_share = start.others_share_since(&CpuSnapshot::take(pods_cgroup, agent_pid)?);
    notes.push(format!(
        "other processes used {:.0}% of the machine's CPU meanwhile",
        others_share * 100.0
    ));
    Ok(Measured {
        others_share,
        row: Row {
            scenario: scenario.to_string(),
            rps: Some(round(rr.rps, 1)),
            p50_us: Some(round(rr.p50_us, 1)),
            p99_us: Some(round(rr.p99_us, 1)),
            conn_per_s: Some(round(conn.conn_per_s, 1)),
            gbit_s: Some(round(stream.gbit_s, 2)),
            cpu_us_per_req,
            rss_kb,
        },
        notes: notes
            .into_iter()
            .map(|n| format!("{scenario}: {n}"))
            .collect(),
    })
}

struct RequestResponse {
    requests: u64,
    seconds: f64,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

/// Ping-pong of `--size` bytes on `--connections` persistent connections.
fn request_response(bench: &Bench) -> anyhow::Result<RequestResponse> {
    let v = run_client(bench, "rr", bench.args.max_requests, bench.args.seconds)?;
    let requests = u(&v, "requests")?;
    if requests == 0 || u(&v, "errors")? > 0 {
        bail!(
            "request/response failed after {requests} requests: {}",
            v["first_error"]
        );
    }
    Ok(RequestResponse {
        requests,
        seconds: f(&v, "seconds")?,
        rps: f(&v, "rps")?,
        p50_us: f(&v, "p50_us")?,
        p99_us: f(&v, "p99_us")?,
        max_us: f(&v, "max_us")?,
    })
}

struct ConnectionRate {
    completed: u64,
    seconds: f64,
    conn_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    errors: u64,
    addr_not_available: u64,
    first_error: Option<String>,
}

/// New connection per exchange; the server closes first.
fn connection_rate(bench: &Bench) -> anyhow::Result<ConnectionRate> {
    let v = run_client(
        bench,
        "conn",
        bench.args.max_connections,
        bench.args.seconds,
    )?;
    let completed = u(&v, "completed")?;
    if completed == 0 {
        bail!("no connection completed: {}", v["first_error"]);
    }
    Ok(ConnectionRate {
        completed,
        seconds: f(&v, "seconds")?,
        conn_per_s: f(&v, "conn_per_s")?,
        p50_us: f(&v, "p50_us")?,
        p99_us: f(&v, "p99_us")?,
        max_us: f(&v, "max_us")?,
        errors: u(&v, "errors")?,
        addr_not_available: u(&v, "addr_not_available")?,
        first_error: v["first_error"].as_str().map(str::to_string),
    })
}

struct Stream {
    bytes: u64,
    seconds: f64,
    gbit_s: f64,
}

/// One connection, bulk data one way.
fn stream(bench: &Bench) -> anyhow::Result<Stream> {
    let v = run_client(bench, "stream", u64::MAX, bench.args.seconds)?;
    if u(&v, "errors")? > 0 {
        bail!("stream failed: {}", v["first_error"]);
    }
    let (sent, received) = (u(&v, "bytes_sent")?, u(&v, "bytes_received")?);
    if sent != received {
        bail!("stream: the client sent {sent} bytes but the server read {received}");
    }
    Ok(Stream {
        bytes: received,
        seconds: f(&v, "seconds")?,
        gbit_s: f(&v, "gbit_s")?,
    })
}

/// A short request/response run that fails the scenario early and clearly if the server
/// cannot be reached; it also warms up whatever sits on the path.
fn probe(bench: &Bench) -> anyhow::Result<()> {
    let v =
        run_client(bench, "rr", 10_000, 0.3).context("probing the server from the client pod")?;
    if u(&v, "requests")? == 0 || u(&v, "errors")? > 0 {
        bail!(
            "the client pod cannot reach {}: {}",
            bench.target,
            v["first_error"]
        );
    }
    Ok(())
}

/// Runs `meshbench client MODE` in the client pod and returns its JSON result line.
fn run_client(bench: &Bench, mode: &str, max: u64, seconds: f64) -> anyhow::Result<Value> {
    let mut cmd = bench.client.command(&bench.meshbench)?;
    cmd.args(["client", mode, &bench.target.to_string()])
        .args(["--seconds", &seconds.to_string()])
        .args(["--connections", &bench.args.connections.to_string()])
        .args(["--size", &bench.args.size.to_string()]);
    if max != u64::MAX {
        cmd.args(["--max", &max.to_string()]);
    }
    let deadline = Duration::from_secs_f64(seconds) + CLIENT_SLACK;
    let (status, stdout, stderr) =
        run_with_deadline(cmd, deadline).with_context(|| format!("meshbench client {mode}"))?;
    if !status.success() {
        bail!(
            "meshbench client {mode} failed ({status}): {}",
            stderr.trim()
        );
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(line).with_context(|| {
        format!("meshbench client {mode} printed no JSON result: {stdout:?} {stderr:?}")
    })
}

// ---------------------------------------------------------------------------------------
// Processes

/// A child process killed (and reaped) when dropped.
struct Process {
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `meshbench server` in `pod` and waits for its `listening` line.
fn start_server(pod: &Pod, meshbench: &Path) -> anyhow::Result<Process> {
    let mut cmd = pod.command(meshbench)?;
    cmd.args(["server", &SERVER_PORT.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut process = Process {
        child: cmd.spawn().context("starting the meshbench server")?,
    };
    let stdout = process.child.stdout.take().context("server stdout")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + SERVER_START_DEADLINE;
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(line) if line.trim() == "listening" => return Ok(process),
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = process.child.wait().ok();
                bail!("the meshbench server exited before listening ({status:?})");
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Ok(Some(status)) = process.child.try_wait() {
            bail!("the meshbench server exited before listening ({status})");
        }
        if Instant::now() >= deadline {
            bail!(
                "the meshbench server did not print `listening` within {SERVER_START_DEADLINE:?}"
            );
        }
    }
}

/// Runs `cmd` to completion, killing it if it outlives `deadline`; returns its status and output.
fn run_with_deadline(
    mut cmd: Command,
    deadline: Duration,
) -> anyhow::Result<(std::process::ExitStatus, String, String)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut process = Process {
        child: cmd.spawn().context("starting the process")?,
    };
    let read_all = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = read_all(process.child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read_all(process.child.stderr.take().map(|p| Box::new(p) as _));
    let until = Instant::now() + deadline;
    let status = loop {
        if let Some(status) = process.child.try_wait()? {
            break status;
        }
        if Instant::now() >= until {
            // Dropping the guard kills it.
            drop(process);
            bail!("did not finish within {deadline:?}; killed");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    Ok((status, stdout, stderr))
}

/// A process's user + system CPU time so far, in clock ticks (all its threads).
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name (which may contain spaces) start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unexpected /proc/PID/stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .context("short /proc/PID/stat")?
            .parse()
            .context("parsing /proc/PID/stat")
    };
    Ok(field(11)? + field(12)?)
}

/// CPU time accounting over a scenario, to tell how much of the machine other processes
/// (outside the pods and the agent) took while it ran.
struct CpuSnapshot {
    at: Instant,
    machine_s: f64,
    pods_s: f64,
    agent_s: f64,
}

impl CpuSnapshot {
    fn take(pods_cgroup: &Path, agent_pid: Option<u32>) -> anyhow::Result<Self> {
        Ok(Self {
            at: Instant::now(),
            machine_s: machine_busy_seconds()?,
            pods_s: cgroup_cpu_seconds(pods_cgroup)?,
            agent_s: agent_pid.map(cpu_ticks).transpose()?.unwrap_or(0) as f64
                / clock_ticks_per_second(),
        })
    }

    /// Share of the machine's CPU capacity used by everything else since `self`.
    fn others_share_since(&self, now: &CpuSnapshot) -> f64 {
        let cpus = thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1) as f64;
        let capacity = now.at.duration_since(self.at).as_secs_f64() * cpus;
        let others = (now.machine_s - self.machine_s)
            - (now.pods_s - self.pods_s)
            - (now.agent_s - self.agent_s);
        if capacity > 0.0 {
            (others / capacity).max(0.0)
        } else {
            0.0
        }
    }
}

/// Busy CPU time of the whole machine (all CPUs) so far, in seconds, from /proc/stat.
fn machine_busy_seconds() -> anyhow::Result<f64> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: everything but idle and iowait.
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum();
    Ok(busy as f64 / clock_ticks_per_second())
}

/// CPU time used so far by everything in a cgroup v2 subtree, in seconds.
fn cgroup_cpu_seconds(dir: &Path) -> anyhow::Result<f64> {
    let path = dir.join("cpu.stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let usec: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no usage_usec in {}", path.display()))?;
    Ok(usec as f64 / 1e6)
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// A process's resident set size in kB.
fn rss_kb(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

// ---------------------------------------------------------------------------------------
// Output

fn print_results(args: &BenchArgs, results: &[Measured]) {
    println!();
    println!(
        "pod to pod, {} B messages, {} connection(s), {} s per measurement",
        args.size, args.connections, args.seconds
    );
    let header = [
        "scenario",
        "rps",
        "p50 µs",
        "p99 µs",
        "conn/s",
        "Gbit/s",
        "agent CPU µs/req",
        "agent RSS kB",
    ];
    let cells: Vec<[String; 8]> = results
        .iter()
        .map(|m| {
            let r = &m.row;
            [
                r.scenario.clone(),
                opt(r.rps, 0),
                opt(r.p50_us, 1),
                opt(r.p99_us, 1),
                opt(r.conn_per_s, 0),
                opt(r.gbit_s, 2),
                opt(r.cpu_us_per_req, 1),
                r.rss_kb
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .chain([header[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cols: Vec<String>| {
        let padded: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pad = widths[i].saturating_sub(c.chars().count());
                if i == 0 {
                    format!("{c}{}", " ".repeat(pad))
                } else {
                    format!("{}{c}", " ".repeat(pad))
                }
            })
            .collect();
        println!("{}", padded.join(" | "));
    };
    line(header.iter().map(|s| s.to_string()).collect());
    println!(
        "{}",
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-|-")
    );
    for c in &cells {
        line(c.to_vec());
    }

    if let Some(base) = results.iter().find(|m| m.row.scenario == BASELINE) {
        for m in results.iter().filter(|m| m.row.scenario != BASELINE) {
            println!(
                "{} / {BASELINE}: rps {}, conn/s {}, Gbit/s {}",
                m.row.scenario,
                ratio(m.row.rps, base.row.rps),
                ratio(m.row.conn_per_s, base.row.conn_per_s),
                ratio(m.row.gbit_s, base.row.gbit_s),
            );
        }
    }
    println!();
    for m in results {
        for n in &m.notes {
            println!("{n}");
        }
    }
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map(|v| format!("{v:.decimals$}"))
        .unwrap_or_else(|| "-".into())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

fn round(v: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (v * scale).round() / scale
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn u(v: &Value, key: &str) -> anyhow::Result<u64> {
    v.get(key)
        .and_then(Value::as_u64)
        .with_context(|| format!("no integer `{key}` in {v}"))
}

fn f(v: &Value, key: &str) -> anyhow::Result<f64> {
    v.get(key)
        .and_then(Value::as_f64)
        .with_context(|| format!("no number `{key}` in {v}"))
}
