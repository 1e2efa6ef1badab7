//! `cargo xtask bench`: pod-to-pod traffic directly and through the agents, on one node and
//! across two nodes, side by side.
//!
//! Two harness nodes (network namespaces) linked by a veth (the "node network"): node 1 has
//! pods `client` and `server`, node 2 has pod `remote`. The `meshbench` server runs in
//! `server` and `remote`, the `meshbench` client in `client`, all release builds, like the
//! agent. Each scenario is one [`Row`]:
//!
//! - `pod-direct`: client to server on node 1, no agent running, pods not enrolled: veth to
//!   bridge to veth.
//! - `pod-agent`: the same pods, node 1's agent running with both enrolled: the client app's
//!   connect is redirected (connect4) to the agent's outbound listener in the client pod,
//!   and the agent carries it to the server app (which path it takes, e.g. in-process
//!   delivery to a local pod or a second hop through the server pod's inbound listener, is
//!   the agent's business; the notes under the table count the agent's logged connections
//!   per direction and path, and the scenario fails if the agent relayed nothing).
//! - `cross-node-direct`: client (node 1) to remote (node 2), no agent running: veth,
//!   bridge, node link, bridge, veth.
//! - `cross-node-mtls`: the same pods, both enrolled, one agent per node sharing one CA
//!   (each node's config lists its own pod as local and the other node's pod as remote):
//!   client -> agent 1 (outbound) -> HBONE (HTTP/2 CONNECT over mTLS, pooled) over the node
//!   link -> agent 2 (inbound, port 15008) -> remote app. The scenario fails unless agent 1
//!   logged an outbound `path=hbone` connection for every connection the connection-rate
//!   phase completed (and agent 2 inbound ones).
//!
//! L7 scenarios, on node 1 with two more pods, `backend` (runs `http-backend`, never enrolled)
//! and `haproxy`; h2load in `client` sends `GET /` (a ~0.5 kB JSON answer):
//!
//! - `l7-direct`: client to backend:8080, no proxy.
//! - `l7-haproxy`: client to haproxy:80 in its own pod (`mode http`, one frontend, one
//!   server = the backend, `http-reuse always`, no logging, `nbthread` [`HAPROXY_THREADS`] =
//!   2, the same thread budget as the agent's 2 data-plane workers), then to the backend. The
//!   probe checks that the backend saw the request come from the haproxy pod.
//! - `l7-agent`: the client pod enrolled, a Service VIP ([`VIP_HOST`] in node 1's subnet) port
//!   80 (`appProtocol: http`) selecting the backend, one HTTPRoute rule (`PathPrefix /`):
//!   client -> agent's L7 proxy -> backend (not enrolled: one proxy hop, like haproxy). The
//!   scenario fails unless the agent logged an outbound `http request` event for every
//!   request h2load completed.
//! - `l7-*-h2c`: the same with h2c (prior knowledge) from the client, and HTTP/2 from the
//!   proxy to the backend too (haproxy `proto h2` on the bind and the server line; the
//!   Service port `appProtocol: http2`). A probe checks the HTTP version the backend saw.
//! - `l7-agent-opaque`, `l7-agent-h2c-opaque`: `l7-agent`'s and `l7-agent-h2c`'s traffic with
//!   the Service port declared `appProtocol: tcp` and no route: the agent relays the bytes
//!   (L4). Not competitors but the floor: what the agent's sockets and wake-ups cost for this
//!   load, under any HTTP handling it does; the gap to the L7 row is the HTTP layer's cost.
//! - `l7-agent-hyper`, `l7-agent-h2c-hyper`: `l7-agent` and `l7-agent-h2c` with the agent's
//!   fast paths off (`TRELLIS_HTTP1_FAST_PATH=off`, `TRELLIS_H2_FAST_PATH=off`): every
//!   request through hyper, the fast paths' baseline. `l7-agent-h2c` fails unless the agent
//!   counted its connections on the HTTP/2 fast path.
//!
//! Load: `h2load -t 1 -c --l7-connections (4) -m M -D --seconds`, M = 1 with `--h1` (no
//! pipelining) and `--h2-streams` (10) for h2c. h2load ignores `-n` in this timed mode, so a
//! run is bounded by `-D`, by a 10 s inactivity timeout (`-N`) and by a kill after `--seconds`
//! plus [`CLIENT_SLACK`]. `rps` is h2load's; `p50_us`/`p99_us` come from its `--log-file`
//! (one duration per request); `cpu_us_per_req` is the proxy process's utime+stime over the
//! run divided by the requests completed (`cpu_user_us_per_req` its utime part), `rss_kb` its
//! VmRSS after the run (all null for direct). A run fails unless every request completed with a 2xx, and unless the backend's
//! own request counter grew by at least as many. The L7 target (agent req/s >= 1.0x
//! haproxy's, CPU per request <= 1.0x) is reported for HTTP/1.1 and h2c, informational only.
//!
//! Measurements per pod-to-pod scenario, each bounded by `--seconds` and a count:
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
//! - agent cost (`cpu_us_per_req`, `rss_kb`; null without an agent): the agents'
//!   utime+stime (/proc/PID/stat) over the request/response phase divided by the requests
//!   made, and their VmRSS after all phases. With two agents (`cross-node-mtls`) both are
//!   SUMMED: CPU of agent 1 + agent 2 per request, RSS of agent 1 + agent 2.
//!
//! Results: a table on stdout and `target/bench/latest.json` (an array of [`Row`]s). To add
//! a scenario, write a function that sets it up and calls [`measure`], and list it in
//! [`SCENARIOS`] with the scenario it is compared with; ratio lines are printed for each
//! such pair, and the cross-node target (mTLS round-trip rate at least
//! [`CROSS_NODE_RPS_TARGET`] times direct) is reported, informational only.
use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader, Read as _},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_tests::{Agent, Background, Node, Pod, agent};
use serde::Serialize;
use serde_json::Value;

use crate::{setup, util};

/// Port the meshbench servers listen on in the server pods.
const SERVER_PORT: u16 = 7070;
/// How long a server may take to print `listening`.
const SERVER_START_DEADLINE: Duration = Duration::from_secs(10);
/// Slack on top of `--seconds` before a client run is killed as hung.
const CLIENT_SLACK: Duration = Duration::from_secs(45);
/// Above this share of the machine's CPU used by other processes, a scenario is flagged.
const NOISE_THRESHOLD: f64 = 0.10;
/// How long an agent may take to log the connections a scenario made.
const LOG_DEADLINE: Duration = Duration::from_secs(10);
/// The target: cross-node mTLS round-trip rate at least this times direct.
const CROSS_NODE_RPS_TARGET: f64 = 0.4;

const POD_DIRECT: &str = "pod-direct";
const POD_AGENT: &str = "pod-agent";
const CROSS_DIRECT: &str = "cross-node-direct";
const CROSS_MTLS: &str = "cross-node-mtls";

const L7_DIRECT: &str = "l7-direct";
const L7_HAPROXY: &str = "l7-haproxy";
const L7_AGENT: &str = "l7-agent";
const L7_DIRECT_H2C: &str = "l7-direct-h2c";
const L7_HAPROXY_H2C: &str = "l7-haproxy-h2c";
const L7_AGENT_H2C: &str = "l7-agent-h2c";
const L7_AGENT_TELEMETRY_OFF: &str = "l7-agent-telemetry-off";
const L7_AGENT_OPAQUE: &str = "l7-agent-opaque";
const L7_AGENT_HYPER: &str = "l7-agent-hyper";
const L7_AGENT_H2C_OPAQUE: &str = "l7-agent-h2c-opaque";
const L7_AGENT_H2C_HYPER: &str = "l7-agent-h2c-hyper";
/// The target: with metrics and access logs on, at least this share of the req/s
/// of the same run with them off.
const TELEMETRY_RPS_TARGET: f64 = 0.9;
/// Port `http-backend` listens on in the backend pod.
const BACKEND_PORT: u16 = 8080;
/// The backend's name, echoed in its `x-backend` response header.
const BACKEND_NAME: &str = "bench-backend";
/// Host part of the Service VIP in node 1's subnet (no pod has it).
const VIP_HOST: u8 = 200;
/// haproxy's `nbthread`: the agent's data plane runs on 2 tokio workers (`--workers`
/// default), so haproxy gets the same number of threads.
const HAPROXY_THREADS: u32 = 2;
/// How long a proxy may take to start answering (probes are retried until then).
const PROBE_DEADLINE: Duration = Duration::from_secs(15);
/// h2load's per-connection inactivity timeout: a stalled connection fails the run.
const H2LOAD_INACTIVITY_TIMEOUT: &str = "10s";
/// The L7 target: agent req/s at least this times haproxy's ...
const L7_RPS_TARGET: f64 = 1.0;
/// ... and agent CPU per request at most this times haproxy's.
const L7_CPU_TARGET: f64 = 1.0;

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
    /// Concurrent connections h2load opens in the L7 scenarios.
    #[arg(long, default_value_t = 4)]
    pub l7_connections: u32,
    /// Concurrent streams per connection h2load keeps in the h2c L7 scenarios (HTTP/1.1
    /// ones always use 1: no pipelining).
    #[arg(long, default_value_t = 10)]
    pub h2_streams: u32,
    /// Run only these scenarios (repeatable; default: all).
    #[arg(long = "scenario")]
    pub scenarios: Vec<String>,
    /// Extra alternating rounds of l7-agent / l7-agent-telemetry-off (when both are selected):
    /// the telemetry cost is a ratio of two noisy rates, so its median over rounds is printed.
    #[arg(long, default_value_t = 3)]
    pub telemetry_rounds: u32,
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
    /// The user-space part of `cpu_us_per_req` (the rest is the kernel's, mostly the TCP
    /// stack): where a proxy's own code and libraries spend.
    pub cpu_user_us_per_req: Option<f64>,
    pub rss_kb: Option<u64>,
}

/// A row plus the notes printed under the table (not written to the JSON).
struct Measured {
    row: Row,
    notes: Vec<String>,
    /// Share of the machine's CPU that processes outside the pods and the agents used.
    others_share: f64,
    /// Connections the connection-rate phase completed (each one crossed the agents, if any).
    conn_completed: u64,
}

/// What every scenario may use: two linked nodes and their pods (servers already running).
struct Env<'a> {
    args: &'a BenchArgs,
    meshbench: PathBuf,
    n1: &'a Node,
    n2: &'a Node,
    /// On node 1, runs the meshbench client.
    client: Pod,
    /// On node 1, runs a meshbench server.
    server: Pod,
    /// On node 2, runs a meshbench server.
    remote: Pod,
    /// State directory shared by the two cross-node agents: one CA, one trust root.
    fleet_ca: PathBuf,
    /// On node 1, runs `http-backend` on [`BACKEND_PORT`] (never enrolled).
    backend: Pod,
    /// On node 1, runs haproxy in the `l7-haproxy*` scenarios.
    lb: Pod,
    /// The Service VIP of the `l7-agent*` scenarios, in node 1's subnet.
    vip: Ipv4Addr,
    /// Scratch directory: haproxy configs and logs, h2load request logs.
    l7_dir: PathBuf,
}

impl Env<'_> {
    fn bench<'b>(&'b self, server: &'b Pod) -> Bench<'b> {
        Bench {
            args: self.args,
            meshbench: &self.meshbench,
            client: &self.client,
            server,
            target: SocketAddr::new(server.ip.into(), SERVER_PORT),
        }
    }

    /// Client and server on node 1.
    fn same_node(&self) -> Bench<'_> {
        self.bench(&self.server)
    }

    /// Client on node 1, server on node 2.
    fn cross_node(&self) -> Bench<'_> {
        self.bench(&self.remote)
    }
}

/// What the measurements of one scenario run with: who talks to whom.
struct Bench<'a> {
    args: &'a BenchArgs,
    meshbench: &'a Path,
    client: &'a Pod,
    server: &'a Pod,
    target: SocketAddr,
}

type ScenarioFn = fn(&Env) -> anyhow::Result<Measured>;

struct Scenario {
    name: &'static str,
    run: ScenarioFn,
    /// The scenario this one's ratios are printed against.
    compare_with: Option<&'static str>,
}

/// The scenarios, in the order they run.
const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: POD_DIRECT,
        run: pod_direct,
        compare_with: None,
    },
    Scenario {
        name: POD_AGENT,
        run: pod_agent,
        compare_with: Some(POD_DIRECT),
    },
    Scenario {
        name: CROSS_DIRECT,
        run: cross_node_direct,
        compare_with: None,
    },
    Scenario {
        name: CROSS_MTLS,
        run: cross_node_mtls,
        compare_with: Some(CROSS_DIRECT),
    },
    Scenario {
        name: L7_DIRECT,
        run: |env| l7_direct(env, L7_DIRECT, Http::H1),
        compare_with: None,
    },
    Scenario {
        name: L7_HAPROXY,
        run: |env| l7_haproxy(env, L7_HAPROXY, Http::H1),
        compare_with: Some(L7_DIRECT),
    },
    Scenario {
        name: L7_AGENT,
        run: |env| l7_agent(env, L7_AGENT, Http::H1, AgentVariant::Default),
        compare_with: Some(L7_HAPROXY),
    },
    Scenario {
        name: L7_AGENT_TELEMETRY_OFF,
        run: |env| {
            l7_agent(
                env,
                L7_AGENT_TELEMETRY_OFF,
                Http::H1,
                AgentVariant::TelemetryOff,
            )
        },
        compare_with: Some(L7_AGENT),
    },
    Scenario {
        name: L7_AGENT_OPAQUE,
        run: |env| l7_agent_opaque(env, L7_AGENT_OPAQUE, Http::H1),
        compare_with: Some(L7_AGENT),
    },
    Scenario {
        name: L7_AGENT_HYPER,
        run: |env| l7_agent(env, L7_AGENT_HYPER, Http::H1, AgentVariant::HyperOnly),
        compare_with: Some(L7_AGENT),
    },
    Scenario {
        name: L7_DIRECT_H2C,
        run: |env| l7_direct(env, L7_DIRECT_H2C, Http::H2c),
        compare_with: None,
    },
    Scenario {
        name: L7_HAPROXY_H2C,
        run: |env| l7_haproxy(env, L7_HAPROXY_H2C, Http::H2c),
        compare_with: Some(L7_DIRECT_H2C),
    },
    Scenario {
        name: L7_AGENT_H2C,
        run: |env| l7_agent(env, L7_AGENT_H2C, Http::H2c, AgentVariant::Default),
        compare_with: Some(L7_HAPROXY_H2C),
    },
    Scenario {
        name: L7_AGENT_H2C_OPAQUE,
        run: |env| l7_agent_opaque(env, L7_AGENT_H2C_OPAQUE, Http::H2c),
        compare_with: Some(L7_AGENT_H2C),
    },
    Scenario {
        name: L7_AGENT_H2C_HYPER,
        run: |env| l7_agent(env, L7_AGENT_H2C_HYPER, Http::H2c, AgentVariant::HyperOnly),
        compare_with: Some(L7_AGENT_H2C),
    },
];

/// The L7 pairs the target is about: (agent scenario, haproxy scenario).
const L7_TARGET_PAIRS: &[(&str, &str)] = &[(L7_AGENT, L7_HAPROXY), (L7_AGENT_H2C, L7_HAPROXY_H2C)];

/// Removes a directory when dropped.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

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
    if args.l7_connections == 0 || args.l7_connections > 256 {
        bail!("--l7-connections must be in 1..=256");
    }
    if args.h2_streams == 0 || args.h2_streams > 1000 {
        bail!("--h2-streams must be in 1..=1000");
    }
    for name in &args.scenarios {
        if !SCENARIOS.iter().any(|s| s.name == name) {
            let all: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
            bail!("unknown --scenario {name:?}; known: {}", all.join(", "));
        }
    }
    let selected: Vec<&Scenario> = SCENARIOS
        .iter()
        .filter(|s| args.scenarios.is_empty() || args.scenarios.iter().any(|n| n == s.name))
        .collect();
    setup::run()?;
    if selected.iter().any(|s| s.name.starts_with("l7-")) {
        for tool in ["h2load", "haproxy", "curl"] {
            mesh_tests::which(tool).with_context(|| {
                format!("`{tool}` is missing (the L7 scenarios need it); `cargo xtask setup` installs it")
            })?;
        }
    }
    util::step("building release binaries (mesh-agent, meshbench)");
    util::cargo(&["build", "--release", "-p", "mesh-agent", "-p", "mesh-tests"])?;
    let root = util::workspace_root()?;
    let agent_bin = root.join("target/release/mesh-agent");
    let meshbench = root.join("target/release/meshbench");
    let http_backend = root.join("target/release/http-backend");
    for bin in [&agent_bin, &meshbench, &http_backend] {
        if !bin.is_file() {
            bail!("{} is missing after the build", bin.display());
        }
    }
    // SAFETY: xtask has no other threads at this point; the harness reads it when starting
    // the agent.
    unsafe { std::env::set_var("MESH_AGENT_BIN", &agent_bin) };

    util::step(
        "building node 1 (pods `client`, `server`, `backend`, `haproxy`) and node 2 (pod `remote`), linked",
    );
    // Drop order (reverse of declaration): server processes (meshbench, http-backend), then
    // the nodes (their cgroups are killed, namespaces and the link deleted), then the L7
    // scratch and fleet CA directories. Agents and haproxy live and die inside their
    // scenario.
    // The `trellis-PID-` prefix lets the harness remove it after a crash, like agent dirs.
    let fleet_ca = std::env::temp_dir().join(format!("trellis-{}-bench-fleet", std::process::id()));
    fs::create_dir_all(&fleet_ca).with_context(|| format!("creating {}", fleet_ca.display()))?;
    let _fleet_ca = RemoveDir(fleet_ca.clone());
    let l7_dir = std::env::temp_dir().join(format!("trellis-{}-bench-l7", std::process::id()));
    fs::create_dir_all(&l7_dir).with_context(|| format!("creating {}", l7_dir.display()))?;
    let _l7_dir = RemoveDir(l7_dir.clone());
    let mut n1 = Node::new()?;
    let mut n2 = Node::new()?;
    n1.link(&n2).context("linking the nodes")?;
    let client = n1.add_pod("client")?;
    let server = n1.add_pod("server")?;
    let remote = n2.add_pod("remote")?;
    let backend = n1.add_pod("backend")?;
    let lb = n1.add_pod("haproxy")?;
    let vip = Ipv4Addr::new(n1.subnet[0], n1.subnet[1], n1.subnet[2], VIP_HOST);
    let _server_process = start_server(&server, &meshbench)?;
    let _remote_process = start_server(&remote, &meshbench)?;
    let _backend_process = {
        let mut cmd = backend.command(&http_backend)?;
        cmd.args([&BACKEND_PORT.to_string(), "--name", BACKEND_NAME]);
        Background::spawn_ready(cmd, "listening").context("starting http-backend")?
    };
    let env = Env {
        args: &args,
        n1: &n1,
        n2: &n2,
        meshbench,
        client,
        server,
        remote,
        fleet_ca,
        backend,
        lb,
        vip,
        l7_dir,
    };

    let mut results = Vec::new();
    for scenario in selected {
        util::step(&format!("scenario {}", scenario.name));
        let measured =
            (scenario.run)(&env).with_context(|| format!("scenario {}", scenario.name))?;
        results.push(measured);
    }

    print_results(&args, &results);
    let has = |name: &str| results.iter().any(|m| m.row.scenario == name);
    if args.telemetry_rounds > 0 && has(L7_AGENT) && has(L7_AGENT_TELEMETRY_OFF) {
        telemetry_rounds(&env, args.telemetry_rounds)?;
    }
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

/// Alternates telemetry on and off `rounds` times and prints each round's req/s ratio and
/// their median against the target.
fn telemetry_rounds(env: &Env, rounds: u32) -> anyhow::Result<()> {
    util::step(&format!(
        "telemetry cost: {rounds} alternating rounds of {L7_AGENT} / {L7_AGENT_TELEMETRY_OFF}"
    ));
    let mut ratios = Vec::new();
    for _ in 0..rounds {
        let on = l7_agent(env, L7_AGENT, Http::H1, AgentVariant::Default)?;
        let off = l7_agent(
            env,
            L7_AGENT_TELEMETRY_OFF,
            Http::H1,
            AgentVariant::TelemetryOff,
        )?;
        if let (Some(a), Some(b)) = (on.row.rps, off.row.rps)
            && b > 0.0
        {
            ratios.push((a, b, a / b));
        }
    }
    if ratios.is_empty() {
        return Ok(());
    }
    let mut sorted: Vec<f64> = ratios.iter().map(|r| r.2).collect();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = sorted[sorted.len() / 2];
    let each: Vec<String> = ratios
        .iter()
        .map(|(a, b, r)| format!("{a:.0}/{b:.0} = {r:.2}x"))
        .collect();
    println!(
        "telemetry on/off req/s over {} alternating rounds: {}; median {median:.2}x (target >= {TELEMETRY_RPS_TARGET:.2}x: {}; informational)",
        ratios.len(),
        each.join(", "),
        if median >= TELEMETRY_RPS_TARGET {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Scenarios

/// Pod to pod on one node with no agent running and nothing enrolled.
fn pod_direct(env: &Env) -> anyhow::Result<Measured> {
    let bench = env.same_node();
    probe(&bench)?;
    measure(&bench, POD_DIRECT, &[])
}

/// Both pods enrolled: every connection crosses the agent.
fn pod_agent(env: &Env) -> anyhow::Result<Measured> {
    let bench = env.same_node();
    let config = agent::config_doc(
        &env.n1.id,
        &[
            env.client.config_entry("default", "client", true),
            env.server.config_entry("default", "server", true),
        ],
    );
    let mut agent = Agent::start("bench", &config)?;
    let pid = agent.pid().context("the agent is not running")?;
    let measured = probe(&bench).and_then(|()| measure(&bench, POD_AGENT, &[pid]));
    let mut measured = measured
        .map_err(|e| e.context(format!("agent log tail:\n{}", tail(&agent.log_text(), 20))))?;
    // Make sure the traffic really crossed the agent (a silent bypass would look great).
    let log = ConnectionLog::read(&agent);
    let outbound = log.outbound();
    if outbound == 0 {
        bail!(
            "the agent relayed no outbound connection: traffic bypassed it\nagent log tail:\n{}",
            tail(&agent.log_text(), 20)
        );
    }
    measured
        .notes
        .push(format!("{POD_AGENT}: agent logged {}", log.summary()));
    agent.terminate().context("stopping the agent")?;
    Ok(measured)
}

/// Client on node 1 to a pod on node 2 with no agent running and nothing enrolled.
fn cross_node_direct(env: &Env) -> anyhow::Result<Measured> {
    let bench = env.cross_node();
    probe(&bench)?;
    measure(&bench, CROSS_DIRECT, &[])
}

/// Client on node 1 to a pod on node 2, both enrolled, one agent per node: client ->
/// agent 1 -> HBONE over the node link -> agent 2 -> server app.
fn cross_node_mtls(env: &Env) -> anyhow::Result<Measured> {
    let bench = env.cross_node();
    let config1 = agent::config_doc(
        &env.n1.id,
        &[
            env.client.config_entry("default", "client", true),
            env.remote.remote_config_entry("default", "remote", env.n2),
        ],
    );
    let config2 = agent::config_doc(
        &env.n2.id,
        &[
            env.remote.config_entry("default", "remote", true),
            env.client.remote_config_entry("default", "client", env.n1),
        ],
    );
    // Dropped (killed) in reverse order on any error below.
    let mut a1 = Agent::start_with_state_dir("bench-n1", &config1, Some(&env.fleet_ca))
        .context("starting node 1's agent")?;
    let mut a2 = Agent::start_with_state_dir("bench-n2", &config2, Some(&env.fleet_ca))
        .context("starting node 2's agent")?;
    let pids = [
        a1.pid().context("node 1's agent is not running")?,
        a2.pid().context("node 2's agent is not running")?,
    ];
    let tails = |a1: &Agent, a2: &Agent| {
        format!(
            "node 1 agent log tail:\n{}\nnode 2 agent log tail:\n{}",
            tail(&a1.log_text(), 20),
            tail(&a2.log_text(), 20)
        )
    };
    let measured = probe(&bench).and_then(|()| measure(&bench, CROSS_MTLS, &pids));
    let mut measured = measured.map_err(|e| e.context(tails(&a1, &a2)))?;

    // Make sure the traffic really went client -> agent 1 -> HBONE -> agent 2: every
    // connection the connection-rate phase completed must be in agent 1's log as outbound
    // over HBONE (they are logged when they close, so give the agent a moment).
    let want = measured.conn_completed as usize;
    let deadline = Instant::now() + LOG_DEADLINE;
    let (log1, log2) = loop {
        let (log1, log2) = (ConnectionLog::read(&a1), ConnectionLog::read(&a2));
        if log1.count("outbound hbone") >= want || Instant::now() >= deadline {
            break (log1, log2);
        }
        thread::sleep(Duration::from_millis(200));
    };
    let outbound_hbone = log1.count("outbound hbone");
    if outbound_hbone == 0 {
        bail!(
            "node 1's agent logged no outbound connection over HBONE (path=hbone): traffic bypassed the mesh\n{}",
            tails(&a1, &a2)
        );
    }
    if outbound_hbone < want {
        bail!(
            "node 1's agent logged {outbound_hbone} outbound HBONE connections, fewer than the {want} the connection-rate phase completed: some traffic bypassed it\n{}",
            tails(&a1, &a2)
        );
    }
    if log2.count("inbound hbone") == 0 {
        bail!(
            "node 2's agent logged no inbound HBONE connection\n{}",
            tails(&a1, &a2)
        );
    }
    let established = a1.count_events(|e| agent::message(e) == "HBONE connection established");
    measured.notes.push(format!(
        "{CROSS_MTLS}: node 1 agent logged {}; {established} HBONE (mTLS) connection(s) established",
        log1.summary()
    ));
    measured.notes.push(format!(
        "{CROSS_MTLS}: node 2 agent logged {}",
        log2.summary()
    ));
    measured.notes.push(format!(
        "{CROSS_MTLS}: agent CPU and RSS are the SUM of both agents (node 1 + node 2)"
    ));
    a2.terminate().context("stopping node 2's agent")?;
    a1.terminate().context("stopping node 1's agent")?;
    Ok(measured)
}

/// An agent's "connection closed" events, counted by direction and path.
struct ConnectionLog {
    /// "outbound hbone", "inbound local", ... -> count.
    kinds: BTreeMap<String, usize>,
    /// Connections logged with an error.
    failed: usize,
}

impl ConnectionLog {
    fn read(agent: &Agent) -> Self {
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        let mut failed = 0;
        for e in agent
            .events()
            .iter()
            .filter(|e| agent::message(e) == "connection closed")
        {
            let path = agent::field(e, "path");
            let kind = if path.is_empty() {
                agent::field(e, "direction").to_string()
            } else {
                format!("{} {path}", agent::field(e, "direction"))
            };
            *kinds.entry(kind).or_default() += 1;
            if !agent::field(e, "error").is_empty() {
                failed += 1;
            }
        }
        Self { kinds, failed }
    }

    /// Outbound connections, whatever their path.
    fn outbound(&self) -> usize {
        self.kinds
            .iter()
            .filter(|(k, _)| k.starts_with("outbound"))
            .map(|(_, n)| n)
            .sum()
    }

    fn count(&self, kind: &str) -> usize {
        self.kinds.get(kind).copied().unwrap_or(0)
    }

    fn summary(&self) -> String {
        let kinds: Vec<String> = self.kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        format!(
            "{} connection(s); {} closed with an error",
            if kinds.is_empty() {
                "no".to_string()
            } else {
                kinds.join(", ")
            },
            self.failed
        )
    }
}

// ---------------------------------------------------------------------------------------
// L7 scenarios: h2load from the client pod to http-backend, directly, through haproxy, and
// through the agent's L7 proxy.

/// The HTTP version the client (and the proxy, to the backend) speaks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Http {
    /// HTTP/1.1, one request in flight per connection.
    H1,
    /// HTTP/2 over cleartext with prior knowledge, `--h2-streams` streams per connection.
    H2c,
}

impl Http {
    fn streams(self, args: &BenchArgs) -> u32 {
        match self {
            Http::H1 => 1,
            Http::H2c => args.h2_streams,
        }
    }

    /// `version` as http-backend reports it.
    fn backend_version(self) -> &'static str {
        match self {
            Http::H1 => "HTTP/1.1",
            Http::H2c => "HTTP/2.0",
        }
    }
}

/// What sits between the client and the backend; decides what a probe must see.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hop {
    Direct,
    Haproxy,
    Agent,
}

/// Client pod straight to the backend pod: no proxy, nothing enrolled.
fn l7_direct(env: &Env, name: &str, http: Http) -> anyhow::Result<Measured> {
    let target = SocketAddr::new(env.backend.ip.into(), BACKEND_PORT);
    probe_until(env, target, http, Hop::Direct, &mut || Ok(()))?;
    let (mut measured, _) = measure_l7(env, name, http, target, None, &[])?;
    measured
        .notes
        .push(format!("{name}: client -> backend {target}, no proxy"));
    Ok(measured)
}

/// Client pod -> haproxy (its own pod, `mode http`, one frontend, one server) -> backend.
fn l7_haproxy(env: &Env, name: &str, http: Http) -> anyhow::Result<Measured> {
    let backend = SocketAddr::new(env.backend.ip.into(), BACKEND_PORT);
    let proto = match http {
        Http::H1 => "",
        Http::H2c => " proto h2",
    };
    // No `log` line anywhere: haproxy logs nothing.
    let cfg = format!(
        "global
    nbthread {HAPROXY_THREADS}
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    http-reuse always

frontend bench
    bind :80{proto}
    default_backend backend

backend backend
    server backend {backend}{proto}
"
    );
    let cfg_path = env.l7_dir.join(format!("{name}.cfg"));
    let log_path = env.l7_dir.join(format!("{name}.log"));
    fs::write(&cfg_path, &cfg).with_context(|| format!("writing {}", cfg_path.display()))?;
    let mut check = Command::new("haproxy");
    check.arg("-c").arg("-f").arg(&cfg_path);
    let (status, out, err) =
        run_with_deadline(check, Duration::from_secs(10)).context("haproxy -c (config check)")?;
    if !status.success() {
        bail!("haproxy rejects its config ({status}): {out}{err}\n{cfg}");
    }
    let log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = env.lb.command("haproxy")?;
    // -db: foreground, no daemon, no master process, so the pid is the one doing the work.
    cmd.arg("-db")
        .arg("-f")
        .arg(&cfg_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Killed (and reaped) on every return path.
    let mut haproxy = Process {
        child: cmd.spawn().context("starting haproxy")?,
    };
    let pid = haproxy.child.id();
    let haproxy_log = || tail(&fs::read_to_string(&log_path).unwrap_or_default(), 20);
    let target = SocketAddr::new(env.lb.ip.into(), 80);
    probe_until(
        env,
        target,
        http,
        Hop::Haproxy,
        &mut || match haproxy.child.try_wait()? {
            Some(status) => bail!("haproxy exited ({status}): {}", haproxy_log()),
            None => Ok(()),
        },
    )?;
    let (mut measured, done) = measure_l7(env, name, http, target, Some(pid), &[])
        .map_err(|e| e.context(format!("haproxy log tail:\n{}", haproxy_log())))?;
    if let Some(status) = haproxy.child.try_wait()? {
        bail!(
            "haproxy exited during the run ({status}): {}",
            haproxy_log()
        );
    }
    measured.notes.push(format!(
        "{name}: client -> haproxy {target} (nbthread {HAPROXY_THREADS}, http-reuse always, no logging{}) -> backend {backend}; {done} requests",
        if proto.is_empty() { "" } else { ", proto h2 on bind and server" }
    ));
    Ok(measured)
}

/// Client pod (enrolled) -> Service VIP:80 -> agent's L7 proxy (one HTTPRoute rule) ->
/// backend pod (not enrolled, so only one proxy hop).
fn l7_agent(env: &Env, name: &str, http: Http, variant: AgentVariant) -> anyhow::Result<Measured> {
    let telemetry = variant != AgentVariant::TelemetryOff;
    let app_protocol = match http {
        Http::H1 => "http",
        Http::H2c => "http2",
    };
    let mut config = backend_service_config(env, "http", app_protocol);
    config.push_str(
        "httpRoutes:
  - name: backend
    namespace: default
    parentRefs: [{name: backend, port: 80}]
    rules:
      - matches: [{path: {type: PathPrefix, value: /}}]
        backendRefs: [{name: backend, port: 80}]
",
    );
    let agent_env: &[(&str, &str)] = match variant {
        AgentVariant::Default => &[],
        AgentVariant::TelemetryOff => &[("TRELLIS_TELEMETRY", "off")],
        AgentVariant::HyperOnly => &[
            ("TRELLIS_HTTP1_FAST_PATH", "off"),
            ("TRELLIS_H2_FAST_PATH", "off"),
        ],
    };
    let mut agent = Agent::start_with_env(&format!("bench-{name}"), &config, None, agent_env)?;
    let pid = agent.pid().context("the agent is not running")?;
    let agent_tail = |agent: &Agent| tail(&agent.log_text(), 20);
    let target = SocketAddr::new(env.vip.into(), 80);
    let result = probe_until(env, target, http, Hop::Agent, &mut || Ok(()))
        .and_then(|()| measure_l7(env, name, http, target, Some(pid), &[pid]));
    let (mut measured, done) =
        result.map_err(|e| e.context(format!("agent log tail:\n{}", agent_tail(&agent))))?;
    if !telemetry {
        // No access log to count: the probe above (x-request-id added by the agent) showed
        // the path.
        measured.notes.push(format!(
            "{name}: as l7-agent with TRELLIS_TELEMETRY=off (no metrics, no access logs)"
        ));
        agent.terminate().context("stopping the agent")?;
        return Ok(measured);
    }
    // Make sure every request crossed the agent's L7 proxy: one access log line each (they
    // are written when the response is done, so give the agent a moment).
    let deadline = Instant::now() + LOG_DEADLINE;
    let log = loop {
        let log = HttpLog::read(&agent);
        if log.outbound >= done || Instant::now() >= deadline {
            break log;
        }
        thread::sleep(Duration::from_millis(200));
    };
    if log.outbound < done {
        bail!(
            "the agent logged {} outbound `http request` events, fewer than the {done} requests h2load completed: traffic bypassed its L7 proxy\nagent log tail:\n{}",
            log.outbound,
            agent_tail(&agent)
        );
    }
    if log.non_2xx > 0 {
        bail!(
            "the agent logged {} non-2xx responses\nagent log tail:\n{}",
            log.non_2xx,
            agent_tail(&agent)
        );
    }
    // Which path served the h2c connections, from the agent's own count.
    let (fast, hyper) = agent.http2_connections()?;
    if http == Http::H2c && variant == AgentVariant::Default && (fast == 0 || hyper > 0) {
        bail!(
            "{name}: the agent served {fast} h2c connections on its HTTP/2 fast path and {hyper} on hyper; expected all on the fast path"
        );
    }
    let path = match (variant, http) {
        (AgentVariant::HyperOnly, _) => {
            " (hyper only: TRELLIS_HTTP1_FAST_PATH=off, TRELLIS_H2_FAST_PATH=off)".to_string()
        }
        (_, Http::H2c) => format!(" (HTTP/2 fast path: {fast} connections)"),
        _ => String::new(),
    };
    measured.notes.push(format!(
        "{name}: client -> VIP {target} (appProtocol {app_protocol}, 1 HTTPRoute rule) -> agent L7 proxy{path} -> backend; agent logged {} outbound `http request` events ({} non-2xx), upstream(s) {}",
        log.outbound,
        log.non_2xx,
        log.upstreams.join(", ")
    ));
    agent.terminate().context("stopping the agent")?;
    Ok(measured)
}

/// How an `l7-agent*` scenario runs the agent.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AgentVariant {
    Default,
    /// `TRELLIS_TELEMETRY=off` (no metrics, no access logs): the baseline of the issue's
    /// "telemetry costs at most 10%" target.
    TelemetryOff,
    /// `TRELLIS_HTTP1_FAST_PATH=off` and `TRELLIS_H2_FAST_PATH=off`: every request through
    /// hyper, the baseline of the fast paths.
    HyperOnly,
}

/// The L7 scenarios' agent config: the client pod enrolled, the backend pod not, and Service
/// `backend` (the VIP, port 80 to the backend's port) declared `app_protocol`.
fn backend_service_config(env: &Env, port_name: &str, app_protocol: &str) -> String {
    let mut config = agent::config_doc(
        &env.n1.id,
        &[
            env.client.config_entry("default", "client", true),
            // Labelled `app: backend` (its pod name).
            env.backend.config_entry("default", "backend", false),
        ],
    );
    config.push_str(&format!(
        "services:
  - name: backend
    namespace: default
    vips: [{vip}]
    selector: {{app: backend}}
    ports: [{{name: {port_name}, port: 80, targetPort: {BACKEND_PORT}, appProtocol: {app_protocol}}}]
",
        vip = env.vip
    ));
    config
}

/// `l7-agent`'s (or `l7-agent-h2c`'s) traffic with the Service port declared `appProtocol:
/// tcp`: the agent balances each connection to the backend and relays its bytes without
/// parsing HTTP. What that costs is the floor under any HTTP proxying in the agent (the
/// sockets, the wake-ups, the copies), so the gap to the L7 row is what the HTTP layer costs.
fn l7_agent_opaque(env: &Env, name: &str, http: Http) -> anyhow::Result<Measured> {
    let config = backend_service_config(env, "tcp", "tcp");
    let mut agent = Agent::start(&format!("bench-{name}"), &config)?;
    let pid = agent.pid().context("the agent is not running")?;
    let target = SocketAddr::new(env.vip.into(), 80);
    // No header is added on this path: the backend sees the client pod's address, as if direct.
    let result = probe_until(env, target, http, Hop::Direct, &mut || Ok(()))
        .and_then(|()| measure_l7(env, name, http, target, Some(pid), &[pid]));
    let (mut measured, _) = result
        .map_err(|e| e.context(format!("agent log tail:\n{}", tail(&agent.log_text(), 20))))?;
    // The probe went to the VIP, which only the agent serves, but check the relay logged
    // h2load's connections too (a connection is logged when it closes).
    let want = env.args.l7_connections as usize;
    let deadline = Instant::now() + LOG_DEADLINE;
    let relayed = loop {
        let outbound = ConnectionLog::read(&agent).outbound();
        if outbound > want || Instant::now() >= deadline {
            break outbound;
        }
        thread::sleep(Duration::from_millis(200));
    };
    if relayed <= want {
        bail!(
            "the agent logged {relayed} outbound connections, expected the probe's and h2load's {want}\nagent log tail:\n{}",
            tail(&agent.log_text(), 20)
        );
    }
    measured.notes.push(format!(
        "{name}: client -> VIP {target} (appProtocol tcp, no route) -> agent L4 relay -> backend; agent logged {relayed} outbound connections"
    ));
    agent.terminate().context("stopping the agent")?;
    Ok(measured)
}

/// The agent's outbound "http request" access log lines.
struct HttpLog {
    outbound: u64,
    non_2xx: u64,
    upstreams: Vec<String>,
}

impl HttpLog {
    fn read(agent: &Agent) -> Self {
        let text = fs::read_to_string(&agent.log_path).unwrap_or_default();
        let mut log = HttpLog {
            outbound: 0,
            non_2xx: 0,
            upstreams: Vec::new(),
        };
        // Parse only the candidate lines: there is one per request.
        for line in text.lines().filter(|l| l.contains("http request")) {
            let Ok(e) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if agent::message(&e) != "http request" || agent::field(&e, "direction") != "outbound" {
                continue;
            }
            log.outbound += 1;
            if !agent::number(&e, "status").is_some_and(|s| (200..300).contains(&s)) {
                log.non_2xx += 1;
            }
            let upstream = agent::field(&e, "upstream");
            if !log.upstreams.iter().any(|u| u == upstream) {
                log.upstreams.push(upstream.to_string());
            }
        }
        log
    }
}

/// Probes `target` with curl from the client pod until it answers as expected or
/// [`PROBE_DEADLINE`] passes; `alive` fails early if the proxy died.
fn probe_until(
    env: &Env,
    target: SocketAddr,
    http: Http,
    hop: Hop,
    alive: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + PROBE_DEADLINE;
    loop {
        alive()?;
        match probe_l7(env, target, http, hop) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("probing http://{target}/ from the client pod")));
            }
            Err(_) => thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// One curl request: must be a 200 from the backend, which must have seen the expected HTTP
/// version, and the request must show it took the expected path (the agent adds
/// `x-request-id`; haproxy connects from its own pod).
fn probe_l7(env: &Env, target: SocketAddr, http: Http, hop: Hop) -> anyhow::Result<()> {
    let mut cmd = env.client.command("curl")?;
    cmd.args(["-sS", "--max-time", "3", "-i"]);
    if http == Http::H2c {
        cmd.arg("--http2-prior-knowledge");
    }
    cmd.arg(format!("http://{target}/"));
    let (status, out, err) = run_with_deadline(cmd, Duration::from_secs(10))?;
    if !status.success() {
        bail!("curl failed ({status}): {}", err.trim());
    }
    let (head, body) = out
        .split_once("\r\n\r\n")
        .with_context(|| format!("no header/body split in {out:?}"))?;
    let code = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("");
    if code != "200" {
        bail!("status {code}: {out}");
    }
    let x_backend = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case("x-backend").then(|| v.trim())
    });
    if x_backend != Some(BACKEND_NAME) {
        bail!("no `x-backend: {BACKEND_NAME}` in the response: {out}");
    }
    let v: Value = serde_json::from_str(body.trim()).with_context(|| format!("body {body:?}"))?;
    let version = v["version"].as_str().unwrap_or("");
    if version != http.backend_version() {
        bail!(
            "the backend saw {version}, expected {}: {out}",
            http.backend_version()
        );
    }
    let peer_ip = v["peer"]
        .as_str()
        .and_then(|p| p.parse::<SocketAddr>().ok())
        .map(|a| a.ip());
    let has_request_id = v["headers"].get("x-request-id").is_some();
    match hop {
        Hop::Direct if peer_ip != Some(env.client.ip.into()) || has_request_id => {
            bail!("expected a request straight from the client pod: {out}")
        }
        Hop::Haproxy if peer_ip != Some(env.lb.ip.into()) || has_request_id => {
            bail!("expected a request from the haproxy pod: {out}")
        }
        Hop::Agent if !has_request_id => {
            bail!("expected a request through the agent (x-request-id added): {out}")
        }
        _ => Ok(()),
    }
}

/// Runs h2load from the client pod against `target` for `--seconds`; with `proxy`, also its
/// CPU per request and memory. Returns the row and the number of requests completed.
fn measure_l7(
    env: &Env,
    scenario: &str,
    http: Http,
    target: SocketAddr,
    proxy: Option<u32>,
    agent_pids: &[u32],
) -> anyhow::Result<(Measured, u64)> {
    let args = env.args;
    let node_cgroup = env
        .client
        .cgroup
        .parent()
        .context("the client pod's cgroup has no parent")?;
    let start = CpuSnapshot::take(&[node_cgroup], agent_pids)?;
    let served_before = backend_served(env)?;
    let proxy_before = proxy.map(CpuTicks::read).transpose()?;
    let counters_before = proxy.map(ProcCounters::read).transpose()?;
    let run = run_h2load(env, scenario, http, target)?;
    let proxy_after = proxy.map(CpuTicks::read).transpose()?;
    let counters_after = proxy.map(ProcCounters::read).transpose()?;
    let served_after = backend_served(env)?;
    let rss_kb = proxy.map(rss_kb).transpose()?;
    let others_share = start.others_share_since(&CpuSnapshot::take(&[node_cgroup], agent_pids)?);

    let served = served_after.saturating_sub(served_before);
    if served < run.done {
        bail!(
            "the backend served {served} requests, fewer than the {} h2load completed",
            run.done
        );
    }
    let ticks_to_us = 1e6 / clock_ticks_per_second();
    // (user, system) µs over the run.
    let proxy_cpu_us = match (proxy_before, proxy_after) {
        (Some(b), Some(a)) => Some((
            a.user.saturating_sub(b.user) as f64 * ticks_to_us,
            a.system.saturating_sub(b.system) as f64 * ticks_to_us,
        )),
        _ => None,
    };
    let per_request = |us: f64| round(us / run.done.max(1) as f64, 2);
    let streams = http.streams(args);
    let mut notes = vec![
        format!(
            "h2load {}-c {} -m {streams} -t 1 for {} s: {} requests (all 2xx) in {:.2} s, max {:.0} µs; the backend served {served}",
            if http == Http::H1 { "--h1 " } else { "" },
            args.l7_connections,
            args.seconds,
            run.done,
            run.seconds,
            run.max_us
        ),
        format!(
            "other processes used {:.0}% of the machine's CPU meanwhile",
            others_share * 100.0
        ),
    ];
    if let (Some((user, system)), Some(b), Some(a)) =
        (proxy_cpu_us, counters_before, counters_after)
    {
        let us = user + system;
        let per_req =
            |after: u64, before: u64| after.saturating_sub(before) as f64 / run.done as f64;
        notes.insert(
            1,
            format!(
                "proxy CPU {:.2} s over the run ({:.0}% of one core; per request {:.1} µs user + {:.1} µs system; {:.0}% of it on its busiest thread), {:.2} context switches per request",
                us / 1e6,
                us / 1e6 / run.seconds.max(1e-9) * 100.0,
                per_request(user),
                per_request(system),
                a.busiest_thread_share(&b).unwrap_or(0.0) * 100.0,
                per_req(a.context_switches, b.context_switches),
            ),
        );
    }
    let measured = Measured {
        others_share,
        conn_completed: 0,
        row: Row {
            scenario: scenario.to_string(),
            rps: Some(round(run.rps, 1)),
            p50_us: Some(round(run.p50_us, 1)),
            p99_us: Some(round(run.p99_us, 1)),
            conn_per_s: None,
            gbit_s: None,
            cpu_us_per_req: proxy_cpu_us.map(|(user, system)| per_request(user + system)),
            cpu_user_us_per_req: proxy_cpu_us.map(|(user, _)| per_request(user)),
            rss_kb,
        },
        notes: notes
            .into_iter()
            .map(|n| format!("{scenario}: {n}"))
            .collect(),
    };
    Ok((measured, run.done))
}

/// Requests http-backend has served so far (its `/count`, asked from inside its own pod so
/// that no proxy sees it).
fn backend_served(env: &Env) -> anyhow::Result<u64> {
    let mut cmd = env.backend.command("curl")?;
    cmd.args(["-sS", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{BACKEND_PORT}/count"));
    let (status, out, err) =
        run_with_deadline(cmd, Duration::from_secs(10)).context("reading the backend's /count")?;
    if !status.success() {
        bail!(
            "reading the backend's /count failed ({status}): {}",
            err.trim()
        );
    }
    out.trim()
        .parse()
        .with_context(|| format!("the backend's /count answered {out:?}"))
}

struct H2loadRun {
    done: u64,
    seconds: f64,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

/// One timing-based h2load run (`-D --seconds`; h2load ignores `-n` in that mode, so the
/// run is bounded by time, and killed if it outlives that by [`CLIENT_SLACK`]). Fails
/// unless every request completed with a 2xx.
fn run_h2load(
    env: &Env,
    scenario: &str,
    http: Http,
    target: SocketAddr,
) -> anyhow::Result<H2loadRun> {
    let args = env.args;
    let log_path = env.l7_dir.join(format!("{scenario}.h2load.log"));
    let _ = fs::remove_file(&log_path);
    let mut cmd = env.client.command("h2load")?;
    if http == Http::H1 {
        cmd.arg("--h1");
    }
    let millis = (args.seconds * 1000.0).round().max(1.0) as u64;
    cmd.args(["-t", "1"])
        .args(["-c", &args.l7_connections.to_string()])
        .args(["-m", &http.streams(args).to_string()])
        .args(["-D", &format!("{millis}ms")])
        .args(["-N", H2LOAD_INACTIVITY_TIMEOUT])
        .arg("--log-file")
        .arg(&log_path)
        .arg(format!("http://{target}/"));
    let deadline = Duration::from_secs_f64(args.seconds) + CLIENT_SLACK;
    let (status, out, err) = run_with_deadline(cmd, deadline).context("h2load")?;
    if !status.success() {
        bail!("h2load failed ({status}): {out}{err}");
    }
    let fail = |what: &str| anyhow::anyhow!("h2load: {what}:\n{out}{err}");
    // "finished in 4.00s, 12345.67 req/s, 3.21MB/s"
    let rps: f64 = out
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").find_map(|p| p.strip_suffix(" req/s")))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| fail("no `finished in ..., N req/s` line"))?;
    // "requests: 10 total, 10 started, 10 done, 10 succeeded, 0 failed, 0 errored, 0 timeout"
    let counts = |prefix: &str| -> BTreeMap<String, u64> {
        out.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|rest| {
                rest.split(',')
                    .filter_map(|p| {
                        let (n, word) = p.trim().split_once(' ')?;
                        Some((word.to_string(), n.parse().ok()?))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let requests = counts("requests:");
    let statuses = counts("status codes:");
    let get = |m: &BTreeMap<String, u64>, k: &str| {
        m.get(k)
            .copied()
            .ok_or_else(|| fail(&format!("no `{k}` count")))
    };
    let done = get(&requests, "done")?;
    let succeeded = get(&requests, "succeeded")?;
    let bad = get(&requests, "failed")? + get(&requests, "errored")? + get(&requests, "timeout")?;
    // Responses by status class; at the end of a timed run h2load may count the status of a
    // response it stopped reading before it was done, so 2xx may exceed `done` by a few.
    let ok_2xx = get(&statuses, "2xx")?;
    let non_2xx = get(&statuses, "3xx")? + get(&statuses, "4xx")? + get(&statuses, "5xx")?;
    if done == 0 {
        return Err(fail("no request completed"));
    }
    if bad > 0 || succeeded != done || non_2xx > 0 || ok_2xx < done {
        return Err(fail(&format!(
            "{done} done, {succeeded} succeeded, {bad} failed/errored/timed out, {ok_2xx} 2xx, {non_2xx} non-2xx: every request must succeed with a 2xx"
        )));
    }
    // Request log: "start (µs since the epoch) TAB status TAB duration (µs)", one per request.
    let log = fs::read_to_string(&log_path)
        .with_context(|| format!("reading h2load's log {}", log_path.display()))?;
    let mut durations = Vec::with_capacity(done as usize);
    let mut first_start = u64::MAX;
    let mut last_end = 0u64;
    for line in log.lines() {
        let mut f = line.split('\t');
        let (Some(start), Some(status), Some(duration)) = (f.next(), f.next(), f.next()) else {
            bail!("h2load log: unexpected line {line:?}");
        };
        let (start, status, duration): (u64, u16, u64) = (
            start
                .parse()
                .with_context(|| format!("h2load log line {line:?}"))?,
            status
                .parse()
                .with_context(|| format!("h2load log line {line:?}"))?,
            duration
                .parse()
                .with_context(|| format!("h2load log line {line:?}"))?,
        );
        if !(200..300).contains(&status) {
            bail!("h2load log: a request got status {status}");
        }
        first_start = first_start.min(start);
        last_end = last_end.max(start + duration);
        durations.push(duration);
    }
    if durations.len() as u64 != done {
        bail!(
            "h2load reported {done} requests done but logged {}",
            durations.len()
        );
    }
    durations.sort_unstable();
    let pct = |p: f64| {
        let rank = ((p * durations.len() as f64).ceil() as usize).clamp(1, durations.len());
        durations[rank - 1] as f64
    };
    Ok(H2loadRun {
        done,
        seconds: last_end.saturating_sub(first_start) as f64 / 1e6,
        rps,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        max_us: pct(1.0),
    })
}

// ---------------------------------------------------------------------------------------
// Measurements

/// Runs the three measurements from the client pod to the server; with `agent_pids`, also
/// the agents' CPU per request and their memory (summed over all of them).
fn measure(bench: &Bench, scenario: &str, agent_pids: &[u32]) -> anyhow::Result<Measured> {
    let mut notes = Vec::new();
    // The pods' cgroups are children of their node's.
    let mut pods_cgroups: Vec<&Path> = Vec::new();
    for pod in [bench.client, bench.server] {
        let parent = pod
            .cgroup
            .parent()
            .with_context(|| format!("pod {}'s cgroup has no parent", pod.name))?;
        if !pods_cgroups.contains(&parent) {
            pods_cgroups.push(parent);
        }
    }
    let start = CpuSnapshot::take(&pods_cgroups, agent_pids)?;
    let ticks_to_us = 1e6 / clock_ticks_per_second();

    let cpu_before = agents_cpu_ticks(agent_pids)?;
    let rr = request_response(bench)?;
    let cpu_after = agents_cpu_ticks(agent_pids)?;
    let cpu_us_per_req = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) if rr.requests > 0 => Some(round(
            after.saturating_sub(before) as f64 * ticks_to_us / rr.requests as f64,
            2,
        )),
        _ => None,
    };
    notes.push(format!(
        "rr: {} requests on {} connection(s) in {:.2} s, max {:.0} µs",
        rr.requests, bench.args.connections, rr.seconds, rr.max_us
    ));

    let cpu_before = agents_cpu_ticks(agent_pids)?;
    let conn = connection_rate(bench)?;
    let cpu_after = agents_cpu_ticks(agent_pids)?;
    let agent_cpu_per_conn = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) => format!(
            ", agent CPU {:.0} µs/connection",
            after.saturating_sub(before) as f64 * ticks_to_us / conn.completed as f64
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

    let cpu_before = agents_cpu_ticks(agent_pids)?;
    let stream = stream(bench)?;
    let cpu_after = agents_cpu_ticks(agent_pids)?;
    let agent_cpu_per_gb = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) if stream.bytes > 0 => format!(
            ", agent CPU {:.2} s/GB",
            after.saturating_sub(before) as f64 * ticks_to_us / 1e6 / (stream.bytes as f64 / 1e9)
        ),
        _ => String::new(),
    };
    notes.push(format!(
        "stream: {:.2} GB in {:.2} s{agent_cpu_per_gb}",
        stream.bytes as f64 / 1e9,
        stream.seconds
    ));

    let rss_kb = if agent_pids.is_empty() {
        None
    } else {
        Some(
            agent_pids
                .iter()
                .map(|&pid| rss_kb(pid))
                .sum::<anyhow::Result<u64>>()?,
        )
    };
    let others_share = start.others_share_since(&CpuSnapshot::take(&pods_cgroups, agent_pids)?);
    notes.push(format!(
        "other processes used {:.0}% of the machine's CPU meanwhile",
        others_share * 100.0
    ));
    Ok(Measured {
        others_share,
        conn_completed: conn.completed,
        row: Row {
            scenario: scenario.to_string(),
            rps: Some(round(rr.rps, 1)),
            p50_us: Some(round(rr.p50_us, 1)),
            p99_us: Some(round(rr.p99_us, 1)),
            conn_per_s: Some(round(conn.conn_per_s, 1)),
            gbit_s: Some(round(stream.gbit_s, 2)),
            cpu_us_per_req,
            cpu_user_us_per_req: None,
            rss_kb,
        },
        notes: notes
            .into_iter()
            .map(|n| format!("{scenario}: {n}"))
            .collect(),
    })
}

/// The summed user + system CPU time of `pids`, in clock ticks; `None` for no pids.
fn agents_cpu_ticks(pids: &[u32]) -> anyhow::Result<Option<u64>> {
    if pids.is_empty() {
        return Ok(None);
    }
    pids.iter()
        .map(|&pid| cpu_ticks(pid))
        .sum::<anyhow::Result<u64>>()
        .map(Some)
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
    let mut cmd = bench.client.command(bench.meshbench)?;
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
    CpuTicks::read(pid).map(|t| t.user + t.system)
}

/// A process's CPU time so far in clock ticks, all its threads: `utime` and `stime` of
/// /proc/PID/stat.
#[derive(Clone, Copy)]
struct CpuTicks {
    user: u64,
    system: u64,
}

impl CpuTicks {
    fn read(pid: u32) -> anyhow::Result<Self> {
        Self::read_path(Path::new(&format!("/proc/{pid}/stat")))
    }

    /// From a /proc/PID/stat or /proc/PID/task/TID/stat file.
    fn read_path(path: &Path) -> anyhow::Result<Self> {
        let stat =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
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
        Ok(Self {
            user: field(11)?,
            system: field(12)?,
        })
    }
}

/// A process's context switch count and per-thread CPU so far. (Socket syscalls are not
/// counted: /proc/PID/io's syscr/syscw miss send/recv, which haproxy uses.)
#[derive(Clone)]
struct ProcCounters {
    /// Voluntary + involuntary context switches summed over /proc/PID/task/*/status (threads
    /// that exited meanwhile are not counted).
    context_switches: u64,
    /// utime + stime of each thread, by thread id.
    thread_ticks: std::collections::HashMap<u32, u64>,
}

impl ProcCounters {
    fn read(pid: u32) -> anyhow::Result<Self> {
        let mut context_switches = 0;
        let mut thread_ticks = std::collections::HashMap::new();
        let tasks = format!("/proc/{pid}/task");
        for task in fs::read_dir(&tasks).with_context(|| format!("listing {tasks}"))? {
            let task = task?;
            // A thread may exit between the listing and the read: skip it.
            let Ok(status) = fs::read_to_string(task.path().join("status")) else {
                continue;
            };
            if let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok())
                && let Ok(ticks) = CpuTicks::read_path(&task.path().join("stat"))
            {
                thread_ticks.insert(tid, ticks.user + ticks.system);
            }
            context_switches += status
                .lines()
                .filter_map(|l| {
                    l.strip_prefix("voluntary_ctxt_switches:")
                        .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                })
                .filter_map(|v| v.trim().parse::<u64>().ok())
                .sum::<u64>();
        }
        Ok(Self {
            context_switches,
            thread_ticks,
        })
    }

    /// The share of the process's CPU since `before` that its busiest thread used: near 1
    /// when one thread did all the work, 1/n when n threads shared it evenly.
    fn busiest_thread_share(&self, before: &Self) -> Option<f64> {
        let deltas: Vec<u64> = self
            .thread_ticks
            .iter()
            .map(|(tid, &after)| {
                after.saturating_sub(before.thread_ticks.get(tid).copied().unwrap_or(0))
            })
            .collect();
        let total: u64 = deltas.iter().sum();
        let busiest = deltas.into_iter().max()?;
        (total > 0).then(|| busiest as f64 / total as f64)
    }
}

/// CPU time accounting over a scenario, to tell how much of the machine other processes
/// (outside the scenario's pods and agents) took while it ran.
struct CpuSnapshot {
    at: Instant,
    machine_s: f64,
    pods_s: f64,
    agent_s: f64,
}

impl CpuSnapshot {
    fn take(pods_cgroups: &[&Path], agent_pids: &[u32]) -> anyhow::Result<Self> {
        Ok(Self {
            at: Instant::now(),
            machine_s: machine_busy_seconds()?,
            pods_s: pods_cgroups
                .iter()
                .map(|c| cgroup_cpu_seconds(c))
                .sum::<anyhow::Result<f64>>()?,
            agent_s: agents_cpu_ticks(agent_pids)?.unwrap_or(0) as f64 / clock_ticks_per_second(),
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
    let is_l7 = |m: &Measured| m.row.scenario.starts_with("l7-");
    if results.iter().any(|m| !is_l7(m)) {
        println!(
            "pod to pod (one node, and node 1 to node 2), {} B messages, {} connection(s), {} s per measurement",
            args.size, args.connections, args.seconds
        );
    }
    if results.iter().any(is_l7) {
        println!(
            "l7-*: h2load GET / -> http-backend (~0.5 kB JSON), {} connection(s), HTTP/1.1 1 request in flight each (l7-*) or h2c {} streams each (l7-*-h2c), {} s per scenario",
            args.l7_connections, args.h2_streams, args.seconds
        );
    }
    println!(
        "proxy = the agent(s) (cross-node-mtls: both summed) or haproxy; CPU is per request of the rr / h2load phase"
    );
    let header = [
        "scenario",
        "rps",
        "p50 µs",
        "p99 µs",
        "conn/s",
        "Gbit/s",
        "proxy CPU µs/req",
        "proxy RSS kB",
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

    let find = |name: &str| results.iter().find(|m| m.row.scenario == name);
    for scenario in SCENARIOS {
        let Some(base_name) = scenario.compare_with else {
            continue;
        };
        let (Some(m), Some(base)) = (find(scenario.name), find(base_name)) else {
            continue;
        };
        let mut parts = vec![format!("rps {}", ratio(m.row.rps, base.row.rps))];
        if m.row.conn_per_s.is_some() || base.row.conn_per_s.is_some() {
            parts.push(format!(
                "conn/s {}",
                ratio(m.row.conn_per_s, base.row.conn_per_s)
            ));
        }
        if m.row.gbit_s.is_some() || base.row.gbit_s.is_some() {
            parts.push(format!("Gbit/s {}", ratio(m.row.gbit_s, base.row.gbit_s)));
        }
        if base.row.cpu_us_per_req.is_some() {
            parts.push(format!(
                "cpu/req {}",
                ratio(m.row.cpu_us_per_req, base.row.cpu_us_per_req)
            ));
        }
        println!("{} / {base_name}: {}", scenario.name, parts.join(", "));
    }
    let cross_rps = (
        find(CROSS_MTLS).and_then(|m| m.row.rps),
        find(CROSS_DIRECT).and_then(|m| m.row.rps),
    );
    if let (Some(mtls), Some(direct)) = cross_rps
        && direct > 0.0
    {
        let r = mtls / direct;
        println!(
            "target {CROSS_MTLS} round-trip rate >= {CROSS_NODE_RPS_TARGET:.2}x {CROSS_DIRECT}: {} ({r:.2}x; informational)",
            if r >= CROSS_NODE_RPS_TARGET {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    for &(agent_name, haproxy_name) in L7_TARGET_PAIRS {
        let (Some(a), Some(h)) = (find(agent_name), find(haproxy_name)) else {
            continue;
        };
        let (Some(a_rps), Some(h_rps), Some(a_cpu), Some(h_cpu)) = (
            a.row.rps,
            h.row.rps,
            a.row.cpu_us_per_req,
            h.row.cpu_us_per_req,
        ) else {
            continue;
        };
        if h_rps <= 0.0 || h_cpu <= 0.0 {
            continue;
        }
        let (r, c) = (a_rps / h_rps, a_cpu / h_cpu);
        // The split shows whose work differs: user space is the proxies' own code.
        let split = match (a.row.cpu_user_us_per_req, h.row.cpu_user_us_per_req) {
            (Some(au), Some(hu)) if hu > 0.0 && h_cpu > hu => format!(
                " = user {:.2}x, system {:.2}x",
                au / hu,
                (a_cpu - au) / (h_cpu - hu)
            ),
            _ => String::new(),
        };
        println!(
            "target {agent_name} req/s >= {L7_RPS_TARGET:.2}x {haproxy_name} and CPU/req <= {L7_CPU_TARGET:.2}x: {} (rps {r:.2}x, cpu/req {c:.2}x{split}; informational)",
            if r >= L7_RPS_TARGET && c <= L7_CPU_TARGET {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    if let (Some(on), Some(off)) = (
        find(L7_AGENT).and_then(|m| m.row.rps),
        find(L7_AGENT_TELEMETRY_OFF).and_then(|m| m.row.rps),
    ) && off > 0.0
    {
        let r = on / off;
        println!(
            "target {L7_AGENT} (telemetry on) req/s >= {TELEMETRY_RPS_TARGET:.2}x {L7_AGENT_TELEMETRY_OFF}: {} ({r:.2}x; informational)",
            if r >= TELEMETRY_RPS_TARGET {
                "met"
            } else {
                "NOT met"
            }
        );
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
