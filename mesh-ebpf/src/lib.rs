#![no_std]
// This file exists so that mesh-agent can declare mesh-ebpf as a build-dependency (aya-build
// rebuilds the BPF object when this crate changes). The programs live in main.rs.
