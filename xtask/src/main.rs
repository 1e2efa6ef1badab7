//! `cargo xtask <command>`: everything beyond `cargo build`, each step idempotent.
//!
//! - `setup`: toolchain pieces (nightly rust-src, bpf-linker) and Debian packages.
//! - `test`:  setup, then the deploy/ manifest checks, unit and end-to-end tests.
//! - `manifests`: setup, then validate deploy/ (manifests, CRDs, rendered Helm chart) offline.
//! - `demo`:  setup, then a small node with pods, the agent, traffic, and its story.
//! - `bench`: setup, then pod-to-pod direct vs through the agent, side by side.
//! - `soak`:  setup, then minutes of mixed load on two agents with reloads and rotations.
//! - `fuzz`:  the cargo-fuzz targets in fuzz/, each for a bounded time (nightly).
mod bench;
mod demo;
mod fuzz;
mod manifests;
mod setup;
mod soak;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Trellis build, test, demo and benchmark tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need (idempotent; quick when already done).
    Setup,
    /// Run the unit and end-to-end tests (needs root).
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// Run a small demo node: pods, the agent, traffic, and what happened.
    Demo,
    /// Benchmark pod-to-pod traffic directly and through the agent.
    Bench(bench::BenchArgs),
    /// Soak two agents: mixed L4 + HTTP + cross-node mTLS load, config reloads and
    /// certificate rotations; fails on lost requests or growing RSS / open fds.
    Soak(soak::SoakArgs),
    /// Validate deploy/ (manifests, CRDs, rendered Helm chart) offline; part of `test`.
    Manifests,
    /// Run the fuzz targets in fuzz/ (nightly, cargo-fuzz), each for a bounded time.
    Fuzz(fuzz::FuzzArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Setup => setup::run(),
        Command::Test { filter } => test(filter.as_deref()),
        Command::Demo => demo::run(),
        Command::Bench(args) => bench::run(args),
        Command::Soak(args) => soak::run(args),
        Command::Manifests => setup::run().and_then(|()| manifests::run()),
        Command::Fuzz(args) => fuzz::run(args),
    }
}

fn test(filter: Option<&str>) -> anyhow::Result<()> {
    setup::run()?;
    // Seconds, and fails fast; skipped when only some tests are asked for.
    if filter.is_none() {
        manifests::run()?;
    }
    util::step("building the agent (with its eBPF programs)");
    util::cargo(&["build", "-p", "mesh-agent"])?;
    let agent = util::workspace_root()?.join("target/debug/mesh-agent");
    util::step("running unit and end-to-end tests");
    // mesh-ebpf only builds for the BPF target; mesh-agent builds it.
    let mut args = vec!["test", "--workspace", "--exclude", "mesh-ebpf"];
    if let Some(f) = filter {
        args.push(f);
    }
    args.extend(["--", "--test-threads=2"]);
    util::cargo_with_env(&args, &[("MESH_AGENT_BIN", agent.as_os_str())])
}
