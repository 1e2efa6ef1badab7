//! Builds the eBPF programs (crate `mesh-ebpf`) with the nightly toolchain and bpf-linker, and
//! leaves the object in OUT_DIR for `include_bytes_aligned!`. `cargo xtask setup` installs both.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let root_dir = std::path::Path::new(&manifest_dir).join("../mesh-ebpf");
    let root_dir = root_dir.to_str().context("mesh-ebpf path is not UTF-8")?;
    let package = aya_build::Package {
        name: "mesh-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default()).context(
        "building the eBPF programs (run `cargo xtask setup`: it installs bpf-linker and nightly's rust-src)",
    )
}
