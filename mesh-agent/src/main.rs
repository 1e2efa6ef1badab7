//! `mesh-agent`: the Trellis node agent.
//!
//! `mesh-agent run --config FILE` serves the pods the file lists (standalone mode);
//! `mesh-agent run --kubernetes` serves this node's pods as the Kubernetes API describes them.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use mesh_agent::{
    admin,
    enrolment::Enrolment,
    handover,
    identity::{CertManager, CertificateAuthority, Issuer},
    kubernetes::KubeOptions,
    live::LiveState,
    logwriter,
    metrics::Metrics,
    proxy::{
        ConnectionLimits, PodContext, ProxyInputs,
        pool::{self, HbonePool},
    },
    redirect::Redirector,
    source::{self, Update},
    state, status,
    tls::TlsConfigs,
};

/// How often pods whose enrolment failed (netns not there yet, CA unreachable, ...) are tried
/// again, while the snapshot stays the same.
const ENROL_RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// How often a draining agent checks for connections left.
const DRAIN_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long a new agent retries binding the admin ports its predecessor releases.
const ADMIN_BIND_RETRY: Duration = Duration::from_secs(5);
/// How long shutdown waits for pods' netns threads to clean up.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "Trellis node agent: sidecarless mesh data plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once at start-up: the size of `Run` does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run the agent for the pods listed in a config file (standalone mode), or for this
    /// node's pods in Kubernetes (`--kubernetes`).
    Run {
        /// YAML file naming this node and its pods; edits are applied live.
        #[arg(
            long,
            required_unless_present = "kubernetes",
            conflicts_with = "kubernetes"
        )]
        config: Option<PathBuf>,
        /// Watch the Kubernetes API (in-cluster, or --kubeconfig) instead of reading a file.
        #[arg(long)]
        kubernetes: bool,
        #[command(flatten)]
        kube: KubeOptions,
        /// Log line format.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// Data-plane worker threads.
        #[arg(long, env = "TRELLIS_WORKERS", default_value_t = 2)]
        workers: usize,
        /// Where the local CA keeps its root key and certificate (created on first run).
        #[arg(long, default_value = "/var/lib/trellis")]
        state_dir: PathBuf,
        /// Admin API (/healthz, /ready, /config_dump, /pods, /certs); keep it on localhost.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin_addr: SocketAddr,
        /// Prometheus metrics (/metrics).
        #[arg(long, default_value = "0.0.0.0:15020")]
        metrics_addr: SocketAddr,
        /// Metrics and access logs for every connection and request (`off` for benchmarks).
        #[arg(long, env = "TRELLIS_TELEMETRY", value_enum, default_value_t = Switch::On)]
        telemetry: Switch,
        /// The HTTP/1.1 fast path (`off`: every HTTP request goes through hyper).
        #[arg(long, env = "TRELLIS_HTTP1_FAST_PATH", value_enum, default_value_t = Switch::On)]
        http1_fast_path: Switch,
        /// The HTTP/2 fast path for h2c and gRPC (`off`: every HTTP/2 request goes
        /// through hyper).
        #[arg(long, env = "TRELLIS_H2_FAST_PATH", value_enum, default_value_t = Switch::On)]
        h2_fast_path: Switch,
        /// bpffs directory for the pinned maps and per-pod links (mounted if needed).
        #[arg(long, default_value = "/sys/fs/bpf/trellis")]
        bpf_pin_dir: PathBuf,
        /// On SIGTERM/SIGINT, leave the pods captured (they fail closed until the next agent
        /// adopts them) instead of detaching everything. What the DaemonSet uses.
        #[arg(long)]
        keep_capture_on_exit: bool,
        /// Unix socket for zero-drop restarts: a new agent started with the same socket takes
        /// the pods' listeners over from the running one (see `handover`).
        #[arg(long, default_value = "/run/trellis/handover.sock")]
        handover_socket: PathBuf,
        /// After handing over, how long the old agent keeps serving its open connections.
        #[arg(long, value_parser = parse_seconds, default_value = "30")]
        drain_timeout_s: Duration,
        /// Open captured connections one pod may have; more are reset at accept.
        #[arg(long, env = "TRELLIS_MAX_CONNECTIONS_PER_POD", default_value_t = ConnectionLimits::default().per_pod)]
        max_connections_per_pod: u64,
        /// Open captured connections over all pods of the node.
        #[arg(long, env = "TRELLIS_MAX_CONNECTIONS", default_value_t = ConnectionLimits::default().node)]
        max_connections: u64,
        /// Parent cgroup of every pod (kubelet: /sys/fs/cgroup/kubepods.slice). When set, a
        /// pod the agent has not decided about yet cannot open TCP connections (EPERM) until
        /// it is enrolled or known to stay out of the mesh: no connection escapes the mesh
        /// in a pod's first milliseconds.
        #[arg(long, env = "TRELLIS_GATE_CGROUP")]
        gate_cgroup: Option<PathBuf>,
    },
    /// Serve the cluster's certificate authority (signs for node agents, see `cluster_ca`).
    Ca {
        #[command(flatten)]
        options: mesh_agent::cluster_ca::CaOptions,
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Show this node's pods, identities and certificates, from the agent's admin API.
    Status {
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin_addr: SocketAddr,
        #[arg(long, value_enum, default_value_t = status::Output::Table)]
        output: status::Output,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Switch {
    On,
    Off,
}

/// What `run` needs.
struct RunOptions {
    /// The config file, or None for Kubernetes.
    config: Option<PathBuf>,
    kube: KubeOptions,
    state_dir: PathBuf,
    admin_addr: SocketAddr,
    metrics_addr: SocketAddr,
    telemetry: bool,
    http1_fast_path: bool,
    h2_fast_path: bool,
    bpf_pin_dir: PathBuf,
    keep_capture_on_exit: bool,
    handover_socket: PathBuf,
    drain_timeout: Duration,
    max_connections_per_pod: u64,
    max_connections: u64,
    gate_cgroup: Option<PathBuf>,
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    text.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| format!("{text:?} is not a whole number of seconds"))
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// mimalloc instead of glibc's malloc: the proxy allocates and frees many small, short-lived
/// objects per request (headers, futures, stream state), where glibc's bins cost more.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Status { admin_addr, output } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building the tokio runtime")?;
            runtime.block_on(status::run(admin_addr, output))
        }
        Command::Ca {
            options,
            log_format,
        } => {
            let _log_writer = init_logging(log_format);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("ca")
                .enable_all()
                .build()
                .context("building the tokio runtime")?;
            runtime.block_on(mesh_agent::cluster_ca::run(options))
        }
        Command::Run {
            config,
            kubernetes: _,
            kube,
            log_format,
            workers,
            state_dir,
            admin_addr,
            metrics_addr,
            telemetry,
            http1_fast_path,
            h2_fast_path,
            bpf_pin_dir,
            keep_capture_on_exit,
            handover_socket,
            drain_timeout_s,
            max_connections_per_pod,
            max_connections,
            gate_cgroup,
        } => {
            let options = RunOptions {
                config,
                kube,
                state_dir,
                admin_addr,
                metrics_addr,
                telemetry: telemetry == Switch::On,
                http1_fast_path: http1_fast_path == Switch::On,
                h2_fast_path: h2_fast_path == Switch::On,
                bpf_pin_dir,
                keep_capture_on_exit,
                handover_socket,
                drain_timeout: drain_timeout_s,
                max_connections_per_pod,
                max_connections,
                gate_cgroup,
            };
            let _log_writer = init_logging(log_format);
            // The control plane (config, certificates, enrolment, admin) on one thread; the
            // connections on `workers` single-threaded runtimes (see `workers`).
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("control")
                .enable_all()
                .build()
                .context("building the tokio runtime")?;
            let data_plane = mesh_agent::workers::DataPlane::start(workers)?;
            let threads = runtime.block_on(run(&options))?;
            // Dropping the workers' runtimes drops every relay task, so the pods' netns
            // threads lose their last users and remove their routes.
            data_plane.shutdown(Duration::from_secs(2));
            runtime.shutdown_timeout(Duration::from_secs(1));
            let deadline = Instant::now() + SHUTDOWN_GRACE;
            for t in threads {
                if !mesh_agent::workers::join_by(t, deadline) {
                    warn!("a pod netns thread did not finish in time");
                }
            }
            info!("agent stopped");
            Ok(())
        }
    }
}

/// Logs go to stderr in batches (see `logwriter`); keep the guard until exit, dropping it
/// writes out what is left.
fn init_logging(format: LogFormat) -> logwriter::FlushOnDrop {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = logwriter::BatchedStderr::start();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .event_format(mesh_agent::logformat::JsonLines)
            .init(),
    }
    guard
}

/// The certificate authority the config asks for: an operator-provided one, or the local CA
/// in the state directory.
fn certificate_authority(
    mesh: &state::Mesh,
    state_dir: &Path,
) -> anyhow::Result<CertificateAuthority> {
    match &mesh.identity.ca {
        Some(plugin) => {
            CertificateAuthority::from_files(&plugin.cert_chain, &plugin.key, &plugin.root_bundle)
                .context("loading the operator-provided CA (identity.ca)")
        }
        None => {
            CertificateAuthority::load_or_create(state_dir, &mesh.trust_domain).with_context(|| {
                format!(
                    "loading or creating the local CA in {}",
                    state_dir.display()
                )
            })
        }
    }
}

async fn run(options: &RunOptions) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let state_dir = options.state_dir.as_path();
    let (mesh, mut updates) = match &options.config {
        Some(path) => source::file(path)?,
        None => mesh_agent::kubernetes::start(options.kube.clone()).await?,
    };
    // An agent already running on this node hands its pods over before anything is touched.
    let mut inherited = handover::request(&options.handover_socket)
        .context("asking the running agent to hand over")?;
    let inherited_listeners = inherited
        .as_mut()
        .map(|i| std::mem::take(&mut i.listeners))
        .unwrap_or_default();
    let issuer: Arc<dyn Issuer> = match mesh_agent::kubernetes::cluster_ca_issuer(&options.kube)? {
        Some(cluster_ca) if options.config.is_none() => cluster_ca,
        _ => Arc::new(certificate_authority(&mesh, state_dir)?),
    };
    let certs = CertManager::with_issuer(
        issuer,
        mesh.identity.certificate_lifetime,
        mesh.identity.rotate_at,
    );
    let _rotation = certs.spawn_rotation();
    raise_fd_limit();
    let (redirector, maps) = Redirector::load(&options.bpf_pin_dir)?;
    let inputs = Arc::new(ProxyInputs {
        mesh: ArcSwap::from_pointee(mesh.clone()),
        local_pods: ArcSwap::default(),
        maps,
        tls: TlsConfigs::new(certs.clone()),
        certs,
        pool: HbonePool::default(),
        services: ArcSwap::default(),
        routes: ArcSwap::default(),
        l7: Default::default(),
        metrics: Arc::new(Metrics::new()),
        telemetry: options.telemetry,
        http1_fast_path: options.http1_fast_path,
        h2_fast_path: options.h2_fast_path,
        drain: Default::default(),
        limits: ConnectionLimits::new(options.max_connections_per_pod, options.max_connections),
    });
    inputs.publish(mesh.clone());
    let reaper_inputs = inputs.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(pool::POOL_IDLE_TIMEOUT / 4);
        loop {
            tick.tick().await;
            let closed = reaper_inputs.pool.close_idle(pool::POOL_IDLE_TIMEOUT);
            if closed > 0 {
                tracing::debug!(closed, "idle HBONE connections let go");
            }
            let closed: usize = reaper_inputs
                .local_pods
                .load()
                .values()
                .flat_map(|pod| pod.http_clients.iter())
                .filter_map(|clients| clients.get())
                .map(|clients| clients.idle_http1.close_expired())
                .sum();
            if closed > 0 {
                tracing::debug!(closed, "idle HTTP/1.1 fast-path connections let go");
            }
        }
    });
    let mut enrolment = Enrolment::new(redirector, inputs.clone(), inherited_listeners);
    let live = Arc::new(LiveState {
        inputs: inputs.clone(),
        failures: enrolment.failures.clone(),
        started: AtomicBool::new(false),
    });
    enrolment.apply(&mesh).await;
    if let Some(gated) = &options.gate_cgroup {
        enrolment.attach_gate(gated)?;
    }
    if let Some(predecessor) = inherited {
        // Our accept loops run on the inherited sockets; the old agent may stop accepting.
        match tokio::task::spawn_blocking(move || predecessor.complete()).await {
            Ok(Ok(())) => info!("took over from the previous agent; it is draining"),
            Ok(Err(e)) => warn!(
                error = format!("{e:#}"),
                "the previous agent did not confirm the handover; serving anyway"
            ),
            Err(e) => warn!(error = %e, "handover completion task failed; serving anyway"),
        }
    }
    let admin = spawn_admin(options, live.clone())?;
    let (handover_tx, mut handover_rx) = tokio::sync::mpsc::channel(1);
    let handover_listener =
        handover::HandoverListener::bind(&options.handover_socket, handover_tx)?;
    live.started.store(true, Ordering::Release);
    info!(node = %mesh.node, pods = mesh.pods.len(), enrolled = enrolment.enrolled_count(), handover_socket = %handover_listener.path().display(), "agent ready");

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut retry = tokio::time::interval(ENROL_RETRY_INTERVAL);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let successor = loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break None; }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break None; }
            Some(stream) = handover_rx.recv() => {
                info!("a new agent asks to take over");
                let pods = enrolment.listener_fds();
                match tokio::task::spawn_blocking(move || handover::give(stream, pods)).await {
                    Ok(Ok(giving)) => break Some(giving),
                    Ok(Err(e)) => warn!(error = format!("{e:#}"), "handover failed; still serving"),
                    Err(e) => warn!(error = %e, "handover task failed; still serving"),
                }
            }
            _ = retry.tick() => {
                let failed = !enrolment.failures.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
                if failed {
                    enrolment.apply(&inputs.mesh.load_full()).await;
                }
            }
            update = updates.recv() => {
                match update {
                    None => { error!("the snapshot source stopped; exiting"); break None; }
                    Some(Update::Apply(mesh)) => {
                        let mesh = *mesh;
                        if mesh.identity != inputs.mesh.load().identity {
                            warn!("identity settings changed; they take effect at the next restart");
                        }
                        inputs.publish(mesh.clone());
                        enrolment.apply(&mesh).await;
                        inputs.metrics.config_reload(true);
                        info!(pods = mesh.pods.len(), enrolled = enrolment.enrolled_count(), "config applied");
                    }
                    Some(Update::Rejected(e)) => {
                        inputs.metrics.config_reload(false);
                        error!(field = %e.field, reason = %e.message, "config rejected; still serving the last good config");
                    }
                }
            }
        }
    };
    let counters: Vec<String> = inputs
        .maps
        .counters()
        .into_iter()
        .filter(|(name, _)| !name.starts_with("unused"))
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    info!(counters = %counters.join(" "), "eBPF counters");
    drop(admin);
    let Some(giving) = successor else {
        let detach = !options.keep_capture_on_exit;
        let threads = enrolment.shutdown(detach);
        if detach {
            info!("all pods detached");
        } else {
            info!("pods left captured for the next agent (they fail closed until it comes)");
        }
        return Ok(threads);
    };
    let (pods, threads) = enrolment.release();
    giving.released();
    inputs.drain.start();
    info!(
        pods = pods.len(),
        "handed over to the new agent; draining open connections"
    );
    drain(&pods, options.drain_timeout, &mut sigterm, &mut sigint).await;
    Ok(threads)
}

/// Waits until the handed-over pods' connections have all ended, the drain deadline passes,
/// or SIGINT asks to stop now.
async fn drain(
    pods: &[Arc<PodContext>],
    deadline: Duration,
    sigterm: &mut tokio::signal::unix::Signal,
    sigint: &mut tokio::signal::unix::Signal,
) {
    let end = Instant::now() + deadline;
    loop {
        let open: u64 = pods
            .iter()
            .map(|p| p.active_connections.load(Ordering::Relaxed))
            .sum();
        if open == 0 {
            info!("drained: no connections left");
            return;
        }
        if Instant::now() >= end {
            warn!(open, "drain deadline passed; closing what is left");
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(DRAIN_POLL_INTERVAL) => {}
            // Kubernetes deletes the old pod once the new one is ready: keep draining until
            // the deadline (set it below terminationGracePeriodSeconds).
            _ = sigterm.recv() => { info!(open, "SIGTERM while draining; draining continues until the deadline"); }
            _ = sigint.recv() => { warn!(open, "SIGINT while draining; closing what is left"); return; }
        }
    }
}

/// Two descriptors per relayed connection: lift the soft limit to the hard one so the
/// connection limits, not the fd limit, decide when connections are turned away.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                warn!("could not raise the open file limit");
            }
        }
    }
}

/// Binds the admin and metrics ports. After a handover the old agent has just released
/// them; a short retry covers a slow release.
fn spawn_admin(options: &RunOptions, live: Arc<LiveState>) -> anyhow::Result<admin::AdminHandle> {
    let deadline = Instant::now() + ADMIN_BIND_RETRY;
    loop {
        match admin::spawn(options.admin_addr, options.metrics_addr, live.clone()) {
            Ok(handle) => return Ok(handle),
            Err(e) if Instant::now() < deadline => {
                warn!(error = format!("{e:#}"), "admin ports busy; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e.context("starting the admin and metrics servers")),
        }
    }
}
