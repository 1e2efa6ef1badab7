//! `cargo xtask fuzz`: runs the cargo-fuzz targets in `fuzz/` one after another, each for a
//! bounded time on one core, and reports per target: runs, execs/s, corpus size, coverage and
//! crashes.
//!
//! - Installs cargo-fuzz when `cargo fuzz` does not answer (`cargo install cargo-fuzz
//!   --locked`), and the eBPF toolchain pieces the agent's build script needs.
//! - Builds with nightly (cargo-fuzz's defaults: optimized, debug assertions and overflow
//!   checks on, AddressSanitizer).
//! - Each target reads its committed seeds (`fuzz/seeds/<target>/`) and crashers
//!   (`fuzz/regressions/<target>/`) and grows a working corpus in `fuzz/corpus/<target>/`
//!   (not committed, kept between runs). An input slower than [`UNIT_TIMEOUT_S`] or above
//!   [`RSS_LIMIT_MB`] counts as a failure like a panic ("never hangs").
//! - libFuzzer's output goes to `target/fuzz/<target>.log`; the figures to
//!   `target/fuzz/summary.json`. Exits non-zero if any target found a failing input, naming
//!   the file libFuzzer wrote it to (`fuzz/artifacts/<target>/crash-...`).
//!
//! A crasher is replayed with `cargo +nightly fuzz run <target> <file>` in `fuzz/`; once
//! fixed, copy it to `fuzz/regressions/<target>/` (the stable test
//! `mesh-agent/tests/fuzz_corpus.rs` replays that directory) and add a unit test in the agent.
use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::util::{path_with_cargo_bin, step, workspace_root};

/// The targets, in the order they run by default.
pub const TARGETS: &[&str] = &[
    "config_parse",
    "protocol_detect",
    "hbone_connect",
    "authz_match",
    "http1_framing",
    "h2_frames",
];

/// libFuzzer `-timeout`: one input taking longer is reported as a hang.
const UNIT_TIMEOUT_S: u32 = 10;
/// libFuzzer `-rss_limit_mb`.
const RSS_LIMIT_MB: u32 = 2048;
/// Slack on top of `--seconds` before a run is killed as stuck.
const KILL_SLACK_S: u64 = 120;

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Seconds to fuzz each target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Only this target (repeatable); default: all of them.
    #[arg(long = "target", value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    targets: Vec<String>,
}

/// One target's figures, as libFuzzer reported them.
#[derive(Debug, Default, Serialize)]
pub struct Figures {
    target: String,
    seconds: u64,
    runs: u64,
    execs_per_s: u64,
    /// Inputs in the working corpus after the run.
    corpus: usize,
    /// Coverage counters (`cov`) and features (`ft`) at the end of the run.
    cov: u64,
    ft: u64,
    new_units: u64,
    peak_rss_mb: u64,
    /// Where libFuzzer wrote the failing input, if any.
    crash: Option<String>,
}

pub fn run(args: FuzzArgs) -> anyhow::Result<()> {
    let targets: Vec<String> = if args.targets.is_empty() {
        TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        args.targets
    };
    if args.seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    // The agent's build script compiles the eBPF programs (rust-src, bpf-linker).
    crate::setup::toolchain()?;
    cargo_fuzz()?;
    let root = workspace_root()?;
    let fuzz_dir = root.join("fuzz");
    let out_dir = root.join("target/fuzz");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    step("building the fuzz targets (nightly, ASan, debug assertions)");
    let mut build = nightly_fuzz(&fuzz_dir);
    build.arg("build");
    // Without a target, `cargo fuzz build` builds them all in one go.
    if let [only] = targets.as_slice() {
        build.arg(only);
    }
    let status = build.status().context("running cargo fuzz build")?;
    if !status.success() {
        bail!("`cargo +nightly fuzz build` failed ({status})");
    }

    let mut all = Vec::new();
    for target in &targets {
        step(&format!("fuzzing {target} for {} s", args.seconds));
        let figures = fuzz_one(&fuzz_dir, &out_dir, target, args.seconds)?;
        println!(
            "{target}: {} runs, {} execs/s, corpus {}, cov {}, ft {}, {}",
            figures.runs,
            figures.execs_per_s,
            figures.corpus,
            figures.cov,
            figures.ft,
            match &figures.crash {
                Some(path) => format!("CRASH: {path}"),
                None => "no crash".into(),
            }
        );
        all.push(figures);
    }

    println!();
    println!(
        "{:<16} {:>7} {:>12} {:>9} {:>7} {:>6} {:>7} crashes",
        "target", "seconds", "runs", "execs/s", "corpus", "cov", "ft"
    );
    for f in &all {
        println!(
            "{:<16} {:>7} {:>12} {:>9} {:>7} {:>6} {:>7} {}",
            f.target,
            f.seconds,
            f.runs,
            f.execs_per_s,
            f.corpus,
            f.cov,
            f.ft,
            f.crash
                .as_deref()
                .map_or("0".to_string(), |p| format!("1 ({p})"))
        );
    }
    let summary = out_dir.join("summary.json");
    fs::write(&summary, serde_json::to_string_pretty(&all)?)
        .with_context(|| format!("writing {}", summary.display()))?;
    println!("figures: {}", summary.display());

    let crashed: Vec<&Figures> = all.iter().filter(|f| f.crash.is_some()).collect();
    if !crashed.is_empty() {
        for f in &crashed {
            eprintln!(
                "{}: failing input at {} (replay: cd fuzz && cargo +nightly fuzz run {} {}; log: {})",
                f.target,
                f.crash.as_deref().unwrap_or_default(),
                f.target,
                f.crash.as_deref().unwrap_or_default(),
                out_dir.join(format!("{}.log", f.target)).display()
            );
        }
        bail!("{} fuzz target(s) found a failing input", crashed.len());
    }
    Ok(())
}

/// `cargo +nightly fuzz` in `fuzz/`, with `$CARGO_HOME/bin` on PATH (cargo-fuzz, bpf-linker).
fn nightly_fuzz(fuzz_dir: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(["+nightly", "fuzz"])
        .current_dir(fuzz_dir)
        .env("PATH", path_with_cargo_bin())
        // Set by `cargo run` for xtask itself; the fuzz build picks its own toolchain.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC");
    cmd
}

/// The host's target triple, which `cargo fuzz build` builds for by default.
fn host_triple() -> anyhow::Result<String> {
    let out = crate::util::output("rustc", &["+nightly", "-vV"])?;
    out.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(|h| h.trim().to_string())
        .context("`rustc +nightly -vV` names no host")
}

/// Installs cargo-fuzz unless `cargo fuzz --version` already answers.
fn cargo_fuzz() -> anyhow::Result<()> {
    let answers = Command::new("cargo")
        .args(["fuzz", "--version"])
        .env("PATH", path_with_cargo_bin())
        .output()
        .is_ok_and(|o| o.status.success());
    if answers {
        return Ok(());
    }
    step("installing cargo-fuzz (cargo install cargo-fuzz --locked)");
    let status = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked"])
        .env("PATH", path_with_cargo_bin())
        .status()
        .context("running cargo install cargo-fuzz")?;
    if !status.success() {
        bail!("cargo install cargo-fuzz failed ({status})");
    }
    Ok(())
}

fn fuzz_one(
    fuzz_dir: &Path,
    out_dir: &Path,
    target: &str,
    seconds: u64,
) -> anyhow::Result<Figures> {
    // The first corpus directory is the one libFuzzer adds new inputs to; the committed ones
    // after it are only read.
    let corpus = fuzz_dir.join("corpus").join(target);
    fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let mut dirs = vec![corpus.clone()];
    for committed in ["seeds", "regressions"] {
        let dir = fuzz_dir.join(committed).join(target);
        if dir.is_dir() {
            dirs.push(dir);
        }
    }
    let log_path = out_dir.join(format!("{target}.log"));
    let log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let artifacts = fuzz_dir.join("artifacts").join(target);
    fs::create_dir_all(&artifacts).with_context(|| format!("creating {}", artifacts.display()))?;
    // The binary `cargo fuzz build` left, run directly (as `cargo fuzz run` does, with its
    // ASAN_OPTIONS) so that nothing is rebuilt while the clock runs.
    let binary = fuzz_dir
        .join("target")
        .join(host_triple()?)
        .join("release")
        .join(target);
    if !binary.is_file() {
        bail!("{} is missing after cargo fuzz build", binary.display());
    }
    let mut cmd = Command::new(&binary);
    cmd.current_dir(fuzz_dir)
        .env("ASAN_OPTIONS", "detect_odr_violation=0")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .args(&dirs);
    cmd.args([
        format!("-max_total_time={seconds}"),
        format!("-timeout={UNIT_TIMEOUT_S}"),
        format!("-rss_limit_mb={RSS_LIMIT_MB}"),
        "-print_final_stats=1".into(),
    ]);
    let dict = fuzz_dir.join("dicts").join(format!("{target}.dict"));
    if dict.is_file() {
        cmd.arg(format!("-dict={}", dict.display()));
    }
    cmd.stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null());
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    // libFuzzer stops itself after -max_total_time; this only guards against a stuck run.
    let deadline = seconds + KILL_SLACK_S;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed().as_secs() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{target}: still running {deadline} s after start; killed (log: {})",
                log_path.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let text =
        fs::read_to_string(&log_path).with_context(|| format!("reading {}", log_path.display()))?;
    let mut figures = parse_log(&text);
    figures.target = target.to_string();
    figures.seconds = seconds;
    figures.corpus = fs::read_dir(&corpus)
        .map(|d| d.flatten().count())
        .unwrap_or(0);
    if !status.success() && figures.crash.is_none() {
        bail!(
            "{target}: libFuzzer failed ({status}) without a failing input; see {}",
            log_path.display()
        );
    }
    Ok(figures)
}

/// The figures from libFuzzer's output: its final stats (`-print_final_stats=1`), the last
/// status line (`#N DONE cov: C ft: F corp: ...`) and where a failing input was written.
fn parse_log(text: &str) -> Figures {
    let mut f = Figures::default();
    let number = |s: &str| s.trim().parse::<u64>().unwrap_or(0);
    for line in text.lines() {
        if let Some((key, value)) = line.strip_prefix("stat::").and_then(|l| l.split_once(':')) {
            match key {
                "number_of_executed_units" => f.runs = number(value),
                "average_exec_per_sec" => f.execs_per_s = number(value),
                "new_units_added" => f.new_units = number(value),
                "peak_rss_mb" => f.peak_rss_mb = number(value),
                _ => {}
            }
        }
        if line.starts_with('#') {
            let mut words = line.split_whitespace();
            while let Some(word) = words.next() {
                match word {
                    "cov:" => f.cov = words.next().map_or(0, number),
                    "ft:" => f.ft = words.next().map_or(0, number),
                    _ => {}
                }
            }
        }
        // "Test unit written to fuzz/artifacts/<target>/crash-<sha1>" (or timeout-, oom-,
        // leak-); a slow-unit- is only a report, the run goes on.
        if let Some(path) = line.split("Test unit written to ").nth(1)
            && !path.contains("slow-unit-")
        {
            f.crash = Some(path.trim().to_string());
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_figures() {
        let log = "INFO: Seed: 1\n#2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                   #567975\tDONE   cov: 80 ft: 252 corp: 90/1116b lim: 4096 exec/s: 51634 rss: 103Mb\n\
                   Done 567975 runs in 11 second(s)\nstat::number_of_executed_units: 567975\n\
                   stat::average_exec_per_sec:     51634\nstat::new_units_added:          89\n\
                   stat::slowest_unit_time_sec:    0\nstat::peak_rss_mb:              103\n";
        let f = parse_log(log);
        assert_eq!(
            (f.runs, f.execs_per_s, f.new_units, f.peak_rss_mb),
            (567975, 51634, 89, 103)
        );
        assert_eq!((f.cov, f.ft), (80, 252));
        assert!(f.crash.is_none());
    }

    #[test]
    fn finds_the_crasher() {
        let log = "thread '<unnamed>' panicked at src/x.rs:1:1:\n==1== ERROR: libFuzzer: deadly signal\n\
                   artifact_prefix='/w/fuzz/artifacts/t/'; Test unit written to /w/fuzz/artifacts/t/crash-abc\n";
        assert_eq!(
            parse_log(log).crash.as_deref(),
            Some("/w/fuzz/artifacts/t/crash-abc")
        );
    }
}
