//! Runs the real `mesh-agent` binary with a config file and reads its JSON log.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::wait_until;

/// Generous deadline for anything the agent does (loading, enrolling, reloading).
pub const AGENT_DEADLINE: Duration = Duration::from_secs(30);

/// The agent binary under test: `$MESH_AGENT_BIN`, or the one cargo built next to this test.
pub fn agent_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("MESH_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    // target/<profile>/deps/<test-binary> -> target/<profile>/mesh-agent
    let exe = std::env::current_exe().context("locating the test binary")?;
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join("mesh-agent");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "mesh-agent binary not found; build it (`cargo build -p mesh-agent`) or set MESH_AGENT_BIN"
    )
}

/// A running agent. Killed (SIGKILL) on drop if still running.
pub struct Agent {
    child: Option<Child>,
    dir: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

impl Agent {
    /// Writes `config` and starts the agent on it, waiting until it logs "agent ready". The
    /// agent's local CA lives in its own directory.
    pub fn start(name: &str, config: &str) -> anyhow::Result<Self> {
        Self::start_with_state_dir(name, config, None)
    }

    /// Like [`Agent::start`], with the local CA in `state_dir`: agents started on the same
    /// directory share one trust root, like a fleet.
    pub fn start_with_state_dir(
        name: &str,
        config: &str,
        state_dir: Option<&Path>,
    ) -> anyhow::Result<Self> {
        Self::start_with_env(name, config, state_dir, &[])
    }

    /// Like [`Agent::start_with_state_dir`], with extra environment variables for the agent
    /// (applied last: `("RUST_LOG", "info,access=off")` replaces the default `info`).
    pub fn start_with_env(
        name: &str,
        config: &str,
        state_dir: Option<&Path>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        remove_stale_dirs();
        let dir = std::env::temp_dir().join(format!("trellis-{}-{name}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let state_dir = state_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.join("state"));
        let config_path = dir.join("agent.yaml");
        let log_path = dir.join("agent.log");
        fs::write(&config_path, config)?;
        let log = fs::File::create(&log_path)?;
        let child = Command::new(agent_binary()?)
            .args(["run", "--config"])
            .arg(&config_path)
            .args(["--log-format", "json", "--state-dir"])
            .arg(&state_dir)
            // Ephemeral ports: several agents run side by side in tests.
            .args([
                "--admin-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting mesh-agent")?;
        let mut agent = Self {
            child: Some(child),
            dir,
            config_path,
            log_path,
        };
        agent.wait_for_event("agent ready", |e| message(e) == "agent ready")?;
        Ok(agent)
    }

    /// The admin API's address (from the agent's start-up log).
    pub fn admin_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        self.listening("admin")
    }

    /// The metrics endpoint's address (from the agent's start-up log).
    pub fn metrics_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        self.listening("metrics")
    }

    fn listening(&self, which: &str) -> anyhow::Result<std::net::SocketAddr> {
        let event = self
            .events()
            .into_iter()
            .find(|e| message(e) == "admin API and metrics listening")
            .context("the agent logged no admin/metrics addresses")?;
        Ok(field(&event, which).parse()?)
    }

    /// Every JSON log line so far.
    pub fn events(&self) -> Vec<Value> {
        fs::read_to_string(&self.log_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The agent's whole log, for failure messages.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until a log event matches; fails with the log if the agent exits or time runs out.
    pub fn wait_for_event(
        &mut self,
        what: &str,
        matches: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let result = wait_until(what, AGENT_DEADLINE, || {
            if let Some(e) = self.events().into_iter().find(|e| matches(e)) {
                return Some(Ok(e));
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Some(Err(anyhow::anyhow!(
                        "agent exited ({status}) before {what}"
                    )));
                }
            }
            None
        });
        match result {
            Ok(Ok(e)) => Ok(e),
            Ok(Err(e)) | Err(e) => Err(e.context(format!("agent log:\n{}", self.log_text()))),
        }
    }

    /// Number of events matching `matches` so far.
    pub fn count_events(&self, matches: impl Fn(&Value) -> bool) -> usize {
        self.events().iter().filter(|e| matches(e)).count()
    }

    /// Replaces the config file (atomically, as editors and ConfigMap updates do).
    pub fn write_config(&self, config: &str) -> anyhow::Result<()> {
        let tmp = self.dir.join("agent.yaml.tmp");
        fs::write(&tmp, config)?;
        fs::rename(&tmp, &self.config_path)?;
        Ok(())
    }

    /// Sends SIGTERM and waits for the agent to exit.
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().context("agent already stopped")?;
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = wait_until("the agent to exit after SIGTERM", AGENT_DEADLINE, || {
            child.try_wait().ok().flatten()
        });
        if status.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        status
    }

    /// The agent's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The directory (config, log) stays for post-mortems; the next run of the harness
        // removes it once this process is gone.
    }
}

/// Removes agent directories of harness processes that no longer exist.
fn remove_stale_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("trellis-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// The `message` field of a JSON log event.
pub fn message(event: &Value) -> &str {
    event.get("message").and_then(Value::as_str).unwrap_or("")
}

/// A string field of a JSON log event ("" when absent).
pub fn field<'a>(event: &'a Value, name: &str) -> &'a str {
    event.get(name).and_then(Value::as_str).unwrap_or("")
}

/// A numeric field of a JSON log event.
pub fn number(event: &Value, name: &str) -> Option<u64> {
    event.get(name).and_then(Value::as_u64)
}

/// Builds a standalone config document for `pods` (already formatted entries).
pub fn config_doc(node: &str, entries: &[String]) -> String {
    let mut doc = format!("node: {node}\ntrustDomain: cluster.local\npods:\n");
    for e in entries {
        doc.push_str(e);
    }
    doc
}

/// GET `path` from one of the agent's HTTP endpoints (admin, metrics) over a fresh
/// HTTP/1.1 connection: (status, body).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .with_context(|| format!("reading GET {path} from {addr}"))?;
    let text = String::from_utf8(buf).context("the answer is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {text:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_string()))
}
