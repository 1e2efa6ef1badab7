//! Fuzz target: see `mesh_fuzz::authz_match` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_fuzz::authz_match::check(data));
