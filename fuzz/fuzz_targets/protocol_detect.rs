//! Fuzz target: see `mesh_fuzz::protocol_detect` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_fuzz::protocol_detect::check(data));
