//! The etcd side of the control plane: keep the table in step with the store, and keep
//! this gateway registered in the fleet.
//!
//! [`run`]: load everything → build → validate → swap; watch from the loaded revision and
//! rebuild on every change of a table document (documents refused here are tried again,
//! 1 s doubling to 30 s, until they apply or change); on any error (etcd down, a member lost,
//! a compacted revision) mark the store degraded, keep serving, back off (100 ms doubling
//! to 2 s) and start over with a full load. [`fleet`]: register `gateways/<id>` under a
//! lease and republish the table version and this gateway's view of cell health every
//! [`FLEET_INTERVAL`] and whenever the table changes.
//!
//! Neither task ever blocks a worker or holds a lock a worker could want.

use std::sync::Arc;
use std::time::Duration;

use cellgate_config::docs::Documents;
use cellgate_config::etcd::{Change, StoreError};
use serde_json::json;

use super::{now_rfc3339, unix_ms, Backend, Rejection, Source};
use crate::server::Shared;

/// How often the fleet registration is refreshed.
pub const FLEET_INTERVAL: Duration = Duration::from_secs(2);
/// TTL of the fleet registration lease.
pub const FLEET_LEASE_TTL_S: i64 = 10;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// First and longest wait before refused documents are tried again.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Keep the serving table in step with etcd until the process ends.
pub async fn run(shared: Arc<Shared>) {
    let c = &shared.control;
    let Backend::Etcd { store, .. } = &c.backend else {
        return;
    };
    let mut backoff = BACKOFF_MIN;
    loop {
        let session = tokio::time::Instant::now();
        let result = sync_once(&shared).await;
        if session.elapsed() > Duration::from_secs(5) {
            backoff = BACKOFF_MIN;
        }
        match result {
            Ok(()) => {}
            Err(e) => {
                let msg = e.to_string();
                let was = c.status().state;
                c.set_status(|s| {
                    if s.state != "empty" {
                        s.state = "degraded";
                    }
                    s.error = Some(msg.clone());
                });
                if was != "degraded" {
                    tracing::warn!(error = %msg, endpoints = ?store, "etcd unreachable; serving the last known good table");
                } else {
                    tracing::debug!(error = %msg, "etcd still unreachable");
                }
                if matches!(e, StoreError::Compacted(_)) {
                    backoff = BACKOFF_MIN;
                    continue;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One load + watch session; returns when the watch fails.
async fn sync_once(shared: &Arc<Shared>) -> Result<(), StoreError> {
    let c = &shared.control;
    let Backend::Etcd { store, .. } = &c.backend else {
        return Ok(());
    };
    let snap = store.load().await?;
    let mut watch = store.watch(snap.revision + 1).await?;
    let mut docs = snap.docs;
    // Apply first, then report the store ok: readiness never claims a sync that has not
    // reached the table yet.
    apply_docs(shared, &docs).await;
    let was = c.status().state;
    c.set_status(|s| {
        s.state = if docs.is_empty() { "empty" } else { "ok" };
        s.error = docs.is_empty().then(|| {
            format!(
                "etcd prefix {} holds no configuration; bootstrap it with `cellgate config push`",
                store.prefix()
            )
        });
        s.last_sync = Some(now_rfc3339());
    });
    if was == "degraded" {
        tracing::info!(revision = snap.revision, "etcd reachable again; resynced");
    }
    // A refusal can pass (a CA file or a name that appears on this host): the refused
    // documents are tried again, backing off, until they apply or the store changes.
    let mut retry_in = refused(c, &docs).then_some(RETRY_MIN);
    loop {
        let changes = match retry_in {
            Some(wait) => tokio::select! {
                r = watch.next() => r?,
                () = tokio::time::sleep(wait) => {
                    apply_docs(shared, &docs).await;
                    retry_in = refused(c, &docs).then(|| (wait * 2).min(RETRY_MAX));
                    continue;
                }
            },
            None => watch.next().await?,
        };
        if changes.is_empty() {
            continue;
        }
        for ch in changes {
            match ch {
                Change::Put {
                    rel,
                    value,
                    revision,
                } => docs.put(rel, value, revision),
                Change::Delete { rel, revision } => docs.delete(&rel, revision),
            }
        }
        if c.status().state != "ok" && !docs.is_empty() {
            c.set_status(|s| {
                s.state = "ok";
                s.error = None;
            });
        }
        apply_docs(shared, &docs).await;
        retry_in = refused(c, &docs).then_some(RETRY_MIN);
    }
}

/// Whether the store's current documents were refused here.
fn refused(c: &super::ControlState, docs: &Documents) -> bool {
    !docs.is_empty()
        && c.status()
            .rejected
            .as_ref()
            .is_some_and(|r| r.version == docs.version())
}

/// Build the table the documents describe and swap it in, or record why not.
async fn apply_docs(shared: &Arc<Shared>, docs: &Documents) {
    let c = &shared.control;
    let Backend::Etcd {
        lkg_path, local, ..
    } = &c.backend
    else {
        return;
    };
    if docs.is_empty() {
        return;
    }
    let version = docs.version();
    let current = c.desired();
    if current.source == Source::Etcd && current.version == version {
        return;
    }
    let docs2 = docs.clone();
    let local2: cellgate_config::Config = (**local).clone();
    let assembled = tokio::task::spawn_blocking(move || docs2.assemble(&local2)).await;
    let cfg = match assembled {
        Ok(Ok(cfg)) => cfg,
        Ok(Err(e)) => return reject(shared, version, e.to_string()),
        Err(e) => return reject(shared, version, format!("table build task failed: {e}")),
    };
    let slots_version = docs.slots_version();
    let cfg2 = cfg.clone();
    match super::install(shared, cfg, Some(version), Source::Etcd, slots_version).await {
        Ok(_) => {
            shared.metrics.reload("etcd", true);
            c.set_status(|s| s.rejected = None);
            tracing::info!(
                version,
                "configuration from etcd applied; routing table swapped"
            );
            let lkg = lkg_path.clone();
            let saved = tokio::task::spawn_blocking(move || {
                cellgate_config::lkg::save(&lkg, version, &cfg2)
            })
            .await;
            match saved {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot write the last known good table"),
                Err(e) => tracing::warn!(error = %e, "cannot write the last known good table"),
            }
        }
        Err(e) => reject(shared, version, e.to_string()),
    }
}

fn reject(shared: &Shared, version: u64, reason: String) {
    shared.metrics.reload("etcd", false);
    tracing::error!(version, error = %reason, "configuration in etcd rejected; the previous routing table keeps serving");
    shared.control.set_status(|s| {
        s.rejected = Some(Rejection {
            version,
            reason,
            at: now_rfc3339(),
        })
    });
}

/// This gateway's view of cell health: state, whether it serves, instances up.
pub fn health_view(shared: &Shared) -> serde_json::Value {
    let t = shared.table.load();
    let now = cellgate_health::now_ms();
    let p = t.health_policy();
    let mut cells = serde_json::Map::new();
    for cell in t.cells() {
        let up = cell
            .instances
            .iter()
            .filter(|i| i.health.is_available(now, p))
            .count();
        cells.insert(
            cell.id.to_string(),
            json!({
                "state": cell.state.as_str(),
                "serving": cell.is_serving(now, p),
                "failed_over": cell.health.is_failed_over(),
                // This gateway's own verdict, counted by the others for a failover quorum.
                "failing": cell.health.sees_failing(),
                "in_flight": cell.health.in_flight(),
                "instances_up": up,
                "instances": cell.instances.len(),
            }),
        );
    }
    serde_json::Value::Object(cells)
}

/// This gateway's fleet document.
pub fn registration(shared: &Shared) -> serde_json::Value {
    let c = &shared.control;
    let d = c.desired();
    let status = c.status();
    json!({
        "id": c.gateway_id,
        "proxy": c.addrs().map(|a| a.proxy.to_string()),
        "admin": c.addrs().map(|a| a.admin.to_string()),
        "table_version": shared.table.load().version(),
        "source": d.source,
        "store": status.state,
        "health": health_view(shared),
        "started_unix_ms": c.started_unix_ms(),
        "updated_unix_ms": unix_ms(),
    })
}

/// Keep `gateways/<id>` registered until the process ends.
pub async fn fleet(shared: Arc<Shared>) {
    let c = &shared.control;
    let Backend::Etcd { store, .. } = &c.backend else {
        return;
    };
    let key_id = c.gateway_id.clone();
    let mut applied = c.applied();
    let mut lease: Option<i64> = None;
    let mut tick = tokio::time::interval(FLEET_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = applied.changed() => { if r.is_err() { return; } }
        }
        let result: Result<(), StoreError> = async {
            let id = match lease {
                Some(id) => {
                    if store.keep_alive_once(id).await? <= 0 {
                        lease = None;
                        store.grant(FLEET_LEASE_TTL_S).await?
                    } else {
                        id
                    }
                }
                None => store.grant(FLEET_LEASE_TTL_S).await?,
            };
            lease = Some(id);
            let doc = serde_json::to_vec(&registration(&shared)).unwrap_or_default();
            store.put_gateway(&key_id, doc, id).await
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "fleet registration not refreshed");
            lease = None;
        }
    }
}
