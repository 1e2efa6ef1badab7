//! `cargo xtask setup`: nightly's rust-src, bpf-linker built against nightly's own libLLVM,
//! the Debian packages the tests, demo and benchmarks use, and Python's grpcio (the gRPC test
//! fixture), prometheus_client (the reference parsers the telemetry tests check the metrics
//! text with) and kubernetes-validate (the Kubernetes OpenAPI schemas, shipped in the package,
//! that deploy/'s manifests are validated against offline; it brings jsonschema and PyYAML).
//! Each step checks first and does nothing when already done.
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::util::{cargo_bin_dir, output, path_with_cargo_bin, step};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages: iproute2 (ip, ss), bpftool (checks that nothing is left attached), curl
/// (the HTTP client in tests and demo), tcpdump (proves the node link carries only TLS),
/// python3 (socket-level test clients and tests/fixtures/grpc_echo.py), python3-h2 (the HTTP/2
/// state machine of tests/fixtures/h2_peer.py, the raw HTTP/2 client and server of the h2 tests;
/// they run Debian's python3 when the one on PATH lacks it), nghttp2-client (h2load, the
/// HTTP/1.1 and HTTP/2 load generator), haproxy (a baseline proxy for the benchmarks).
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "bpftool",
    "curl",
    "tcpdump",
    "python3",
    "python3-h2",
    "nghttp2-client",
    "haproxy",
];

pub fn run() -> anyhow::Result<()> {
    debian_packages()?;
    python_package("grpc", "grpcio")?;
    python_package("prometheus_client", "prometheus_client")?;
    python_package("kubernetes_validate", "kubernetes-validate")?;
    rust_src()?;
    bpf_linker()?;
    Ok(())
}

/// Only the toolchain pieces the agent's build needs (nightly rust-src, bpf-linker): enough
/// for `cargo xtask fuzz`, which runs no tests needing the Debian or Python packages.
pub fn toolchain() -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()
}

fn debian_packages() -> anyhow::Result<()> {
    install_debian_packages(DEBIAN_PACKAGES)
}

/// Installs those of `packages` that are not installed yet.
fn install_debian_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| !String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    let status = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .context("running apt-get update")?;
    if !status.success() {
        bail!("apt-get update failed (are you root?)");
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get install")?;
    if !status.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

/// Whether `python3 -c CODE` runs successfully.
fn python3_ok(code: &str) -> bool {
    Command::new("python3")
        .args(["-c", code])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The pip package `package` (imported as `module`) for the `python3` on PATH (the one the
/// tests run), through pip.
fn python_package(module: &str, package: &str) -> anyhow::Result<()> {
    let import = format!("import {module}");
    if python3_ok(&import) {
        return Ok(());
    }
    step(&format!("installing {package} for python3 (pip)"));
    if !python3_ok("import pip") {
        // Only helps when `python3` is Debian's own; any other Python brings its pip along.
        install_debian_packages(&["python3-pip"])?;
    }
    let pip = |extra: &[&str]| {
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet"])
            .args(extra)
            .arg(package)
            .env("PIP_ROOT_USER_ACTION", "ignore")
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
            .output()
            .context("running python3 -m pip")
    };
    let mut out = pip(&[])?;
    // PEP 668: Debian's python3 refuses pip installs outside a virtualenv unless told to.
    if !out.status.success()
        && String::from_utf8_lossy(&out.stderr).contains("externally-managed-environment")
    {
        out = pip(&["--break-system-packages"])?;
    }
    if !out.status.success() {
        bail!(
            "pip install {package} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if !python3_ok(&import) {
        bail!("{package} was installed but `python3 -c \"{import}\"` still fails");
    }
    Ok(())
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"])
        .context("the nightly toolchain is needed to build the eBPF programs")?;
    Ok(PathBuf::from(sysroot.trim()))
}

fn rust_src() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    step("adding rust-src to the nightly toolchain");
    output(
        "rustup",
        &["component", "add", "rust-src", "--toolchain", "nightly"],
    )?;
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    let installed = cargo_bin_dir().join("bpf-linker");
    if let Ok(out) = Command::new(&installed).arg("--version").output()
        && out.status.success()
        && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against nightly's libLLVM (about a minute)"
    ));
    let sysroot = nightly_sysroot()?;
    let lib = sysroot.join("lib");
    // Nightly ships libLLVM under a versioned soname only; bpf-linker's build wants
    // libLLVM.so in $LLVM_PREFIX/lib.
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("listing {}", lib.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM-") && n.ends_with(".so"))
            })
        })
        .with_context(|| format!("no libLLVM in {}", lib.display()))?;
    let prefix = std::env::temp_dir().join("trellis-llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link).context("linking libLLVM.so")?;
    let root = cargo_bin_dir()
        .parent()
        .map(PathBuf::from)
        .context("cargo home")?;
    let status = Command::new("cargo")
        .args([
            "+nightly",
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features", "llvm-22", "--root"])
        .arg(&root)
        .env("LLVM_PREFIX", &prefix)
        // The binary finds nightly's libLLVM at run time through its rpath.
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", lib.display()),
        )
        .env("PATH", path_with_cargo_bin())
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!("building bpf-linker failed");
    }
    Ok(())
}
