//! The checks behind the fuzz targets, one module per target with a `check(data: &[u8])`: it
//! feeds the input to the agent's parser or matcher and asserts what must hold for *any*
//! input (each module's doc says what, beyond "never panics"). The fuzz targets
//! (`fuzz_targets/*.rs`) only call these, and `mesh-agent/tests/fuzz_corpus.rs` replays the
//! committed seeds and regression inputs through the same functions on stable, without
//! libFuzzer, as part of `cargo xtask test`.
//!
//! These files are compiled both as the `mesh-fuzz` library and, by path, as a module of that
//! mesh-agent test: they may only use `mesh_agent`, `arbitrary`, `http`, `serde` and
//! `serde_json`.
pub mod authz_match;
pub mod config_parse;
pub mod h2_frames;
pub mod hbone_connect;
pub mod http1_framing;
pub mod protocol_detect;
