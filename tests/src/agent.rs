//! Runs the real `mesh-agent` binary with a config file and reads its JSON log.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
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

/// Where test agents pin their BPF links and maps: one directory per agent, named after the
/// harness process so that leftovers of dead runs can be recognised.
const PIN_ROOT: &str = "/sys/fs/bpf/trellis-test";

/// A running agent. Killed (SIGKILL) on drop if still running, and its pins removed.
pub struct Agent {
    child: Option<Child>,
    dir: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    state_dir: PathBuf,
    /// The agent's `--bpf-pin-dir`; a successor started with [`Agent::start_successor`] shares it.
    pub pin_dir: PathBuf,
    env: Vec<(String, String)>,
    generation: u32,
    /// `run`'s arguments that say where snapshots come from (`--config FILE`, or
    /// `--kubernetes ...`).
    source: Vec<std::ffi::OsString>,
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
        let dir = agent_dir(name)?;
        let config_path = dir.join("agent.yaml");
        fs::write(&config_path, config)?;
        let source = vec!["--config".into(), config_path.clone().into_os_string()];
        Self::launch(name, dir, source, state_dir, env)
    }

    /// Starts the agent in Kubernetes mode (`run --kubernetes`) against the API server the
    /// kubeconfig names, as node `node_name`, finding pods' cgroups under
    /// `kubelet_cgroup_root`; `extra` arguments are added to `run`'s.
    pub fn start_kubernetes(
        name: &str,
        kubeconfig: &str,
        node_name: &str,
        kubelet_cgroup_root: &Path,
        state_dir: Option<&Path>,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let dir = agent_dir(name)?;
        let kubeconfig_path = dir.join("kubeconfig");
        fs::write(&kubeconfig_path, kubeconfig)?;
        let mut source: Vec<std::ffi::OsString> = vec![
            "--kubernetes".into(),
            "--kubeconfig".into(),
            kubeconfig_path.into_os_string(),
            "--node-name".into(),
            node_name.into(),
            "--kubelet-cgroup-root".into(),
            kubelet_cgroup_root.as_os_str().to_owned(),
        ];
        source.extend(extra.iter().map(|a| a.into()));
        Self::launch(name, dir, source, state_dir, &[])
    }

    fn launch(
        name: &str,
        dir: PathBuf,
        source: Vec<std::ffi::OsString>,
        state_dir: Option<&Path>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let state_dir = state_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.join("state"));
        let config_path = dir.join("agent.yaml");
        let pin_dir = Path::new(PIN_ROOT).join(format!("{}-{name}", std::process::id()));
        let mut agent = Self {
            child: None,
            log_path: dir.join("agent.log"),
            dir,
            config_path,
            state_dir,
            pin_dir,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            generation: 0,
            source,
        };
        agent.spawn()?;
        agent.wait_for_event("agent ready", |e| message(e) == "agent ready")?;
        Ok(agent)
    }

    /// Starts a second agent process on the same config, CA, pin directory and handover
    /// socket while this one may still run: the upgrade path. Its log is a file of its own.
    /// Returns once the new agent logged "agent ready".
    pub fn start_successor(&self) -> anyhow::Result<Self> {
        let generation = self.generation + 1;
        let mut next = Self {
            child: None,
            dir: self.dir.clone(),
            config_path: self.config_path.clone(),
            log_path: self.dir.join(format!("agent.{generation}.log")),
            state_dir: self.state_dir.clone(),
            pin_dir: self.pin_dir.clone(),
            env: self.env.clone(),
            generation,
            source: self.source.clone(),
        };
        next.spawn()?;
        next.wait_for_event("agent ready", |e| message(e) == "agent ready")?;
        Ok(next)
    }

    /// The handover socket agents of this harness directory share.
    pub fn handover_socket(&self) -> PathBuf {
        self.dir.join("handover.sock")
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = fs::File::create(&self.log_path)?;
        let child = Command::new(agent_binary()?)
            .arg("run")
            .args(&self.source)
            .args(["--log-format", "json", "--state-dir"])
            .arg(&self.state_dir)
            .arg("--bpf-pin-dir")
            .arg(&self.pin_dir)
            .arg("--handover-socket")
            .arg(self.handover_socket())
            // Ephemeral ports: several agents run side by side in tests.
            .args([
                "--admin-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting mesh-agent")?;
        self.child = Some(child);
        Ok(())
    }

    /// Kills the agent with SIGKILL (a crash: nothing of its own shutdown runs) and reaps it.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("agent already stopped")?;
        child.kill().context("killing the agent")?;
        child.wait().context("reaping the agent")?;
        Ok(())
    }

    /// Waits for the agent to exit by itself (e.g. after handing over and draining).
    pub fn wait_exit(&mut self, deadline: Duration) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().context("agent already stopped")?;
        let status = wait_until("the agent to exit", deadline, || {
            child.try_wait().ok().flatten()
        });
        if status.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        status
    }

    /// The admin API's address (from the agent's start-up log).
    pub fn admin_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        self.listening("admin")
    }

    /// The metrics endpoint's address (from the agent's start-up log).
    pub fn metrics_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        self.listening("metrics")
    }

    /// HTTP/2 connections the agent has served: (on its HTTP/2 fast path, on hyper), from
    /// `trellis_http2_connections_total{path}`.
    pub fn http2_connections(&self) -> anyhow::Result<(u64, u64)> {
        let (status, text) = http_get(self.metrics_addr()?, "/metrics")?;
        ensure!(status == 200, "/metrics answered {status}");
        Ok(http2_connections(&text))
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
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Some(Err(anyhow::anyhow!(
                    "agent exited ({status}) before {what}"
                )));
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
            // A killed agent leaves its pins (fail closed, by design); the test is over.
            // (An agent that exited by itself may have handed them to a successor.)
            let _ = fs::remove_dir_all(&self.pin_dir);
        }
        // The directory (config, log) stays for post-mortems; the next run of the harness
        // removes it once this process is gone.
    }
}

/// A fresh directory for agent `name` of this test process.
fn agent_dir(name: &str) -> anyhow::Result<PathBuf> {
    remove_stale_dirs();
    let dir = std::env::temp_dir().join(format!("trellis-{}-{name}", std::process::id()));
    fs::create_dir_all(&dir)?;
    Ok(dir)
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
    if let Ok(entries) = fs::read_dir(PIN_ROOT) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = fs::remove_dir_all(e.path());
            }
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
/// The value of `series` (its name and labels as the exposition writes them) in a
/// Prometheus text exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// `trellis_http2_connections_total` by path in a metrics exposition: (fast path, hyper).
pub fn http2_connections(text: &str) -> (u64, u64) {
    let get = |path: &str| {
        metric(
            text,
            &format!("trellis_http2_connections_total{{path=\"{path}\"}}"),
        )
        .map_or(0, |v| v as u64)
    };
    (get("fast_path"), get("hyper"))
}

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
