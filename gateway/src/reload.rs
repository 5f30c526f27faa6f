//! Hot reload of the configuration file: watch it (content polled at an interval, and on
//! SIGHUP), build and validate the new table off the request path, and swap it in whole.
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

/// Load, validate and build `path`, and swap it in when it is valid.
pub async fn reload_once(shared: &Arc<Shared>, path: &Path) -> Reloaded {
    let mut writer = shared.writer.lock().await;
    let shared2 = Arc::clone(shared);
    let path2 = path.to_owned();
    let mut overlay = writer.gray_overlay.clone();
    let built = tokio::task::spawn_blocking(move || {
        let cfg = cellgate_config::load_file(&path2).map_err(|e| e.to_string())?;
        overlay.rearm(&cfg);
        let next = shared2.table.load().version() + 1;
        let table = overlay
            .apply(&cfg)
            .build_table(next, &shared2.health)
            .map_err(|e| e.to_string())?;
        let tls = crate::tls::UpstreamTlsMap::from_config(&cfg).map_err(|e| e.to_string())?;
        Ok::<_, String>((cfg, table, overlay, tls))
    })
    .await;
    match built {
        Ok(Ok((cfg, table, overlay, tls))) => {
            let v = table.version();
            shared.shedding.apply(&cfg.shedding);
            writer.gray_overlay = overlay;
            writer.config = cfg;
            shared.upstream_tls.store(Arc::new(tls));
            shared.table.store(Arc::new(table));
            shared.metrics.reload("file", true);
            tracing::info!(file = %path.display(), version = v, "configuration reloaded; routing table swapped");
            Reloaded::Applied(v)
        }
        Ok(Err(e)) => {
            shared.metrics.reload("file", false);
            tracing::error!(file = %path.display(), error = %e, "configuration rejected; the previous routing table keeps serving");
            Reloaded::Rejected(e.to_string())
        }
        Err(e) => {
            tracing::error!(error = %e, "configuration reload task failed; the previous routing table keeps serving");
            Reloaded::Rejected(e.to_string())
        }
    }
}

/// Watch `path` until the process ends.
pub async fn watch_file(shared: Arc<Shared>, path: PathBuf, interval: Duration, mut hup: Signal) {
    let mut last = tokio::fs::read(&path).await.map(|b| digest(&b)).ok();
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
