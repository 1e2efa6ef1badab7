//! Fuzz target: see `mesh_fuzz::http1_framing` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_fuzz::http1_framing::check(data));
