//! Where snapshots come from: the config file (standalone) or the Kubernetes API. Each source
//! validates what it reads into a [`Mesh`] and hands the agent an initial snapshot and a
//! channel of later ones; the agent applies them all the same way.
use std::{path::Path, time::Duration};

use anyhow::Context as _;
use tokio::sync::mpsc;

use crate::{
    config::{self, ConfigError},
    state::Mesh,
};

/// How often the config file is checked for changes.
pub const CONFIG_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// What a source sends after its first snapshot.
#[derive(Debug)]
pub enum Update {
    /// A new valid snapshot to serve.
    Apply(Box<Mesh>),
    /// The source's new content is invalid; the last good snapshot keeps serving.
    Rejected(ConfigError),
}

/// The config file at `path`: loaded now, then watched (polled) for edits.
pub fn file(path: &Path) -> anyhow::Result<(Mesh, mpsc::Receiver<Update>)> {
    let mesh = config::load(path).with_context(|| format!("invalid config {}", path.display()))?;
    let mut last_text = std::fs::read(path).unwrap_or_default();
    let (tx, rx) = mpsc::channel(4);
    let path = path.to_path_buf();
    tokio::spawn(async move {
        let mut poll = tokio::time::interval(CONFIG_POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            poll.tick().await;
            let Ok(text) = std::fs::read(&path) else {
                continue;
            };
            if text == last_text {
                continue;
            }
            last_text = text;
            let update = match config::load(&path) {
                Ok(mesh) => Update::Apply(Box::new(mesh)),
                Err(e) => Update::Rejected(e),
            };
            if tx.send(update).await.is_err() {
                return;
            }
        }
    });
    Ok((mesh, rx))
}
