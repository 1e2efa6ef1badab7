//! Test harness: builds a node out of network namespaces, veths and cgroup v2 directories,
//! runs processes inside its pods, and runs the real `mesh-agent` binary against it.
//!
//! Topology: a node is a network namespace with a bridge `br0` (`10.A.B.1/24`); each pod is a
//! network namespace whose `eth0` is a veth to that bridge (`10.A.B.N/24`, default route via
//! the bridge) plus a cgroup v2 directory. Names and subnets are unique per [`Node`], and
//! everything is removed when it is dropped. Leftovers of a crashed run (named after a pid
//! that no longer exists) are removed when the next [`Node`] is created.
//!
//! Everything here needs root, cgroup v2 and a BPF-capable kernel; [`require_privileges`]
//! fails a test with a clear message when they are missing, never skips it.
pub mod agent;
pub mod kube_api;
pub mod node;
pub mod process;
pub mod wait;

pub use agent::{Agent, agent_binary};
pub use node::{CgroupDriver, Node, Pod};
pub use process::Background;
pub use wait::wait_until;

use anyhow::{Context as _, bail};

/// Fails with an explanation when the machine cannot run end-to-end tests.
pub fn require_privileges() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "end-to-end tests need root (they create network namespaces, cgroups and load eBPF programs); run `cargo xtask test` as root"
        );
    }
    node::cgroup2_root().context("end-to-end tests need a cgroup v2 mount")?;
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!(
            "this kernel exposes no BTF (/sys/kernel/btf/vmlinux); it cannot run the mesh's eBPF programs"
        );
    }
    for tool in ["ip", "curl", "bpftool", "tcpdump", "python3", "h2load"] {
        which(tool)
            .with_context(|| format!("`{tool}` is missing; `cargo xtask setup` installs it"))?;
    }
    // tests/fixtures/grpc_echo.py needs grpcio; the telemetry tests parse the metrics text with
    // prometheus_client's reference parsers. Checked once per test binary.
    static PYTHON_MODULES: std::sync::OnceLock<Option<(&str, &str)>> = std::sync::OnceLock::new();
    let missing = *PYTHON_MODULES.get_or_init(|| {
        [
            ("grpc", "grpcio"),
            ("prometheus_client", "prometheus_client"),
        ]
        .into_iter()
        .find(|(module, _)| {
            !std::process::Command::new("python3")
                .args(["-c", &format!("import {module}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
    });
    if let Some((module, package)) = missing {
        bail!("python3 cannot import {module} ({package}); `cargo xtask setup` installs it");
    }
    Ok(())
}

/// Finds `program` on PATH.
pub fn which(program: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} not found on PATH"))
}

/// Runs a command to completion and fails with its stderr if it fails.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
