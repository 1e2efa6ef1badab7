//! Background processes (servers in pods) that are killed when dropped.
use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, bail};

/// How long a server may take to print its ready line.
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// A child process killed (and reaped) on drop.
pub struct Background {
    child: Child,
}

impl Background {
    /// Spawns `cmd` and waits until it prints a stdout line containing `ready`.
    pub fn spawn_ready(mut cmd: Command, ready: &str) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        let ready = ready.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains(&ready) {
                    let _ = tx.send(());
                }
            }
        });
        let mut bg = Self { child };
        match rx.recv_timeout(READY_DEADLINE) {
            Ok(()) => Ok(bg),
            Err(_) => {
                let status = bg.child.try_wait().ok().flatten();
                bail!(
                    "{cmd:?} did not become ready within {READY_DEADLINE:?} (exit status: {status:?})"
                )
            }
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
