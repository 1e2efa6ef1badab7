//! Fuzz target: see `mesh_fuzz::h2_frames` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_fuzz::h2_frames::check(data));
