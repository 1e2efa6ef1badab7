//! Fuzz target: see `mesh_fuzz::hbone_connect` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_fuzz::hbone_connect::check(data));
