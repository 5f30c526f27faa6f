//! Hot reload of the configuration file: watch it (content polled at an interval, and on
//! SIGHUP), build and validate the new table (the file with the admin overlay on top) off
//! the request path, and swap it in whole.
//! An invalid file is rejected with a log line naming each problem; the old table keeps
//! serving. Never blocks a worker.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::Signal;

use crate::server::Shared;

fn digest(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Outcome of one reload attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Reloaded {
    /// A new table version is serving.
    Applied(u64),
    /// The file was refused; the old table keeps serving.
    Rejected(String),
}

/// Load and validate `path`, apply the admin overlay on top, build, and swap it in when it
/// is valid (see [`crate::control`] for how file and admin changes compose).
pub async fn reload_once(shared: &Arc<Shared>, path: &Path) -> Reloaded {
    let path2 = path.to_owned();
    let loaded = tokio::task::spawn_blocking(move || cellgate_config::load_file(&path2)).await;
    let result = match loaded {
        Ok(Ok(cfg)) => crate::control::apply_file(shared, cfg).await,
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(v) => {
            shared.metrics.reload("file", true);
            tracing::info!(file = %path.display(), version = v, "configuration reloaded; routing table swapped");
            Reloaded::Applied(v)
        }
        Err(e) => {
            shared.metrics.reload("file", false);
            tracing::error!(file = %path.display(), error = %e, "configuration rejected; the previous routing table keeps serving");
            Reloaded::Rejected(e)
        }
    }
}

/// Digest of a file's content (`None` when unreadable).
pub fn file_digest(path: &Path) -> Option<u64> {
    std::fs::read(path).ok().map(|b| digest(&b))
}

/// Watch `path` until the process ends. `baseline` is the digest of the content the serving
/// table was built from; anything else is a change to apply.
pub async fn watch_file(
    shared: Arc<Shared>,
    path: PathBuf,
    baseline: Option<u64>,
    interval: Duration,
    mut hup: Signal,
) {
    let mut last = baseline;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            _ = hup.recv() => true,
        };
        let now = match tokio::fs::read(&path).await {
            Ok(b) => Some(digest(&b)),
            Err(e) => {
                if last.is_some() || forced {
                    tracing::warn!(file = %path.display(), error = %e, "configuration file unreadable; the previous routing table keeps serving");
                }
                last = None;
                continue;
            }
        };
        if forced || now != last {
            last = now;
            reload_once(&shared, &path).await;
        }
    }
}
