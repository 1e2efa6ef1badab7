//! Fuzz target: see `mesh_fuzz::config_parse` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_fuzz::config_parse::check(data));
