//! A 30-second soak (`cargo xtask soak` runs the same binary for minutes): two agents under
//! mixed L4, HTTP/1.1, h2c (HTTP/2 fast path) and cross-node mTLS load lose nothing across
//! config reloads (including rejected ones) and certificate rotations, and their RSS and fds
//! stay bounded.
//!
//! Needs root and a BPF-capable kernel, like every end-to-end test; it fails, not skips,
//! without them.
use std::process::Command;

use anyhow::{Context as _, ensure};

const SOAK: &str = env!("CARGO_BIN_EXE_soak");

#[test]
fn a_short_soak_loses_nothing_across_reloads_and_rotations() -> anyhow::Result<()> {
    mesh_tests::require_privileges()?;
    // Reloads every 4 s (the fourth invalid) and 6 s certificates (rotated every 3 s) put
    // several of each into 30 s; 10 s samples give the growth rule three points.
    let out = Command::new(SOAK)
        .args([
            "run",
            "--seconds",
            "30",
            "--sample-seconds",
            "10",
            "--reload-seconds",
            "4",
            "--cert-lifetime",
            "6",
        ])
        .output()
        .context("running the soak binary")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && stdout.contains("soak: PASS"),
        "the soak failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        stdout.contains("invalid (") && stdout.contains("applied"),
        "no good and invalid reloads in the run:\n{stdout}"
    );
    Ok(())
}
