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
    identity::{CertManager, CertificateAuthority, Issuer},
    kubernetes::KubeOptions,
    live::LiveState,
    logwriter,
    metrics::Metrics,
    proxy::{ProxyInputs, pool::HbonePool},
    redirect::Redirector,
    source::{self, Update},
    state, status,
    tls::TlsConfigs,
};

/// How often pods whose enrolment failed (netns not there yet, CA unreachable, ...) are tried
/// again, while the snapshot stays the same.
const ENROL_RETRY_INTERVAL: Duration = Duration::from_secs(5);
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
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

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
        } => {
            let options = RunOptions {
                config,
                kube,
                state_dir,
                admin_addr,
                metrics_addr,
                telemetry: telemetry == Switch::On,
            };
            let _log_writer = init_logging(log_format);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers.max(1))
                .thread_name("dataplane")
                .enable_all()
                .build()
                .context("building the tokio runtime")?;
            let threads = runtime.block_on(run(&options))?;
            // Dropping the runtime drops every relay task, so the pods' netns threads lose
            // their last users and remove their routes.
            runtime.shutdown_timeout(Duration::from_secs(1));
            let deadline = Instant::now() + SHUTDOWN_GRACE;
            for t in threads {
                while !t.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if t.is_finished() {
                    let _ = t.join();
                } else {
                    warn!("a pod netns thread did not finish in time");
                }
            }
            info!("agent stopped; all programs detached");
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
        LogFormat::Json => builder.json().flatten_event(true).init(),
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
    let (redirector, maps) = Redirector::load()?;
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
    });
    inputs.publish(mesh.clone());
    let mut enrolment = Enrolment::new(redirector, inputs.clone());
    let live = Arc::new(LiveState {
        inputs: inputs.clone(),
        failures: enrolment.failures.clone(),
        started: AtomicBool::new(false),
    });
    let admin = admin::spawn(options.admin_addr, options.metrics_addr, live.clone())
        .context("starting the admin and metrics servers")?;
    info!(admin = %admin.admin_addr, metrics = %admin.metrics_addr, "admin API and metrics listening");
    enrolment.apply(&mesh).await;
    live.started.store(true, Ordering::Release);
    info!(node = %mesh.node, pods = mesh.pods.len(), enrolled = enrolment.enrolled_count(), "agent ready");

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut retry = tokio::time::interval(ENROL_RETRY_INTERVAL);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: detaching and exiting"); break; }
            _ = retry.tick() => {
                let failed = !enrolment.failures.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
                if failed {
                    enrolment.apply(&inputs.mesh.load_full()).await;
                }
            }
            _ = sigint.recv() => { info!("SIGINT: detaching and exiting"); break; }
            update = updates.recv() => {
                match update {
                    None => { error!("the snapshot source stopped; exiting"); break; }
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
    }
    let counters: Vec<String> = inputs
        .maps
        .counters()
        .into_iter()
        .filter(|(name, _)| !name.starts_with("unused"))
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    info!(counters = %counters.join(" "), "eBPF counters");
    drop(admin);
    Ok(enrolment.shutdown())
}
