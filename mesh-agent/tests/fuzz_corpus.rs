//! Replays the fuzz targets' committed inputs (`fuzz/seeds/<target>/` and
//! `fuzz/regressions/<target>/`: the seeds and every crasher the fuzzers found) through the
//! same checks the fuzz targets run (`fuzz/src/`), on stable and without libFuzzer, so that
//! `cargo xtask test` catches a regression without cargo-fuzz or nightly.
use std::{
    fs,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
};

#[path = "../../fuzz/src/lib.rs"]
mod fuzz_checks;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The committed inputs of `target`, sorted.
fn inputs(target: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in ["seeds", "regressions"] {
        let dir = fuzz_dir().join(dir).join(target);
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry
                .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
                .path();
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Runs every input of `target` through `check`; fails naming each input that panicked.
fn replay(target: &str, check: fn(&[u8])) {
    let files = inputs(target);
    assert!(
        !files.is_empty(),
        "no seeds for {target} under {}",
        fuzz_dir().display()
    );
    let failed: Vec<String> = files
        .iter()
        .filter(|path| {
            let data = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            catch_unwind(AssertUnwindSafe(|| check(&data))).is_err()
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(failed.is_empty(), "{target} fails on: {failed:#?}");
}

#[test]
fn config_parse_corpus() {
    replay("config_parse", fuzz_checks::config_parse::check);
}

#[test]
fn protocol_detect_corpus() {
    replay("protocol_detect", fuzz_checks::protocol_detect::check);
}

#[test]
fn hbone_connect_corpus() {
    replay("hbone_connect", fuzz_checks::hbone_connect::check);
}

#[test]
fn authz_match_corpus() {
    replay("authz_match", fuzz_checks::authz_match::check);
}

#[test]
fn h2_frames_corpus() {
    replay("h2_frames", fuzz_checks::h2_frames::check);
}

#[test]
fn http1_framing_corpus() {
    replay("http1_framing", fuzz_checks::http1_framing::check);
}

/// Seeds named `ok-*` are valid configs (so the fuzzer starts from files that get through to
/// validation of every section); keeps them valid as the config format evolves.
#[test]
fn config_seeds_named_ok_are_valid() {
    let mut checked = 0;
    for path in inputs("config_parse") {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if !name.starts_with("ok-") {
            continue;
        }
        let text = fs::read_to_string(&path).expect("seed is UTF-8");
        if let Err(e) = mesh_agent::config::parse(&text) {
            panic!("{}: {e}", path.display());
        }
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} ok-* config seeds");
}
