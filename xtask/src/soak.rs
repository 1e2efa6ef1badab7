//! `cargo xtask soak --minutes N`: N minutes of mixed L4 + HTTP/1.1 + h2c + cross-node mTLS
//! load on two agents with config reloads and certificate rotations, printing the agents' RSS
//! and open fds every minute; fails on any lost request or unbounded growth.
//!
//! Builds release binaries (the agent and the tests crate's `soak`, `http-backend`,
//! `peer-echo`) and runs `target/release/soak run`, which does the work (see
//! tests/src/bin/soak/main.rs); its figures and verdict also go to
//! `target/soak/latest.json`.
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{setup, util};

#[derive(clap::Args)]
pub struct SoakArgs {
    /// Minutes of load.
    #[arg(long, default_value_t = 10)]
    pub minutes: u64,
    /// Seconds between config rewrites.
    #[arg(long, default_value_t = 25)]
    pub reload_seconds: u64,
    /// Certificate lifetime in seconds (rotated at half life).
    #[arg(long, default_value_t = 30)]
    pub cert_lifetime: u64,
    /// Multiplies the rates of the new-connection load classes.
    #[arg(long, default_value_t = 1.0)]
    pub rate_scale: f64,
}

pub fn run(args: SoakArgs) -> anyhow::Result<()> {
    if args.minutes == 0 || args.minutes > 24 * 60 {
        bail!("--minutes must be in 1..=1440");
    }
    setup::run()?;
    util::step("building release binaries (mesh-agent, soak, http-backend, peer-echo)");
    util::cargo(&["build", "--release", "-p", "mesh-agent", "-p", "mesh-tests"])?;
    let root = util::workspace_root()?;
    let agent = root.join("target/release/mesh-agent");
    let soak = root.join("target/release/soak");
    for bin in [&agent, &soak] {
        if !bin.is_file() {
            bail!("{} is missing after the build", bin.display());
        }
    }
    util::step(&format!(
        "soaking two release agents for {} minute(s)",
        args.minutes
    ));
    let json = root.join("target/soak/latest.json");
    let status = Command::new(&soak)
        .arg("run")
        .args(["--minutes", &args.minutes.to_string()])
        .args(["--reload-seconds", &args.reload_seconds.to_string()])
        .args(["--cert-lifetime", &args.cert_lifetime.to_string()])
        .args(["--rate-scale", &args.rate_scale.to_string()])
        .arg("--json")
        .arg(&json)
        .env("MESH_AGENT_BIN", &agent)
        .status()
        .with_context(|| format!("running {}", soak.display()))?;
    if !status.success() {
        bail!("the soak failed ({status}); the reasons are listed above");
    }
    Ok(())
}
