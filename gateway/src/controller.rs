//! The health controller: the one background loop that turns health state into routing.
//! Every tick it publishes effective instance weights in a new table snapshot (same
//! version), evaluates each cell's failover machine and, on a transition, builds a new table
//! version with the cell `failed_over` (or back to `active`) and swaps it in, logging the
//! switch with its reason and duration. It also keeps one probe task per cell running.
//! Runs off the request path; never blocks a worker.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cellgate_health::{now_ms, CellSignals, Transition};
use cellgate_routing::{CellState, RoutingTable};
use tokio::task::JoinHandle;

use crate::server::{Shared, SwitchEvent};

/// Run until the runtime stops.
pub async fn run(shared: Arc<Shared>, tick: Duration) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probes: HashMap<Arc<str>, JoinHandle<()>> = HashMap::new();
    let mut fleet = FleetView::default();
    loop {
        interval.tick().await;
        let table = shared.table.load_full();
        ensure_probes(&shared, &table, &mut probes);
        step(&shared, &mut fleet).await;
    }
}

/// The other gateways' verdicts as last read, for a failover quorum. Read at most every
/// [`FLEET_READ_EVERY`] (they publish every two seconds), and only while some cell that has
/// not failed over is seen failing here.
#[derive(Default)]
pub struct FleetView {
    read_at: Option<Instant>,
    peers: Option<PeerVerdicts>,
}

/// How often [`FleetView`] reads the fleet's registrations at most.
const FLEET_READ_EVERY: Duration = Duration::from_secs(1);

fn ensure_probes(
    shared: &Arc<Shared>,
    table: &RoutingTable,
    probes: &mut HashMap<Arc<str>, JoinHandle<()>>,
) {
    probes.retain(|_, h| !h.is_finished());
    for cell in table.cells() {
        if !probes.contains_key(&cell.id) {
            let h = tokio::spawn(crate::probe::probe_cell(
                Arc::clone(shared),
                Arc::clone(&cell.id),
            ));
            probes.insert(Arc::clone(&cell.id), h);
        }
    }
}

/// The other live gateways' failover verdicts, from their fleet registrations.
struct PeerVerdicts {
    /// Gateways registered besides this one.
    live: usize,
    /// Per cell id, how many of them see it failing.
    failing: HashMap<String, usize>,
}

/// Read the fleet's registrations. Without etcd this gateway is the whole fleet (`live` 0);
/// `None` means the store did not answer.
async fn peer_verdicts(shared: &Shared) -> Option<PeerVerdicts> {
    let c = &shared.control;
    let Some(store) = c.store() else {
        return Some(PeerVerdicts {
            live: 0,
            failing: HashMap::new(),
        });
    };
    let regs = match store.gateways().await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the fleet for a failover quorum");
            return None;
        }
    };
    let mut v = PeerVerdicts {
        live: 0,
        failing: HashMap::new(),
    };
    for r in regs
        .iter()
        .filter(|r| r["id"].as_str() != Some(c.gateway_id.as_str()))
    {
        v.live += 1;
        if let Some(cells) = r["health"].as_object() {
            for (id, h) in cells {
                if h["failing"] == serde_json::Value::Bool(true) {
                    *v.failing.entry(id.clone()).or_default() += 1;
                }
            }
        }
    }
    Some(v)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One controller round: failover transitions first (they rebuild the table), then weights.
pub async fn step(shared: &Arc<Shared>, fleet: &mut FleetView) {
    let detected = Instant::now();
    let now = now_ms();
    let table = shared.table.load_full();
    let p = table.health_policy();
    let mut transitions: Vec<(Arc<str>, Transition)> = Vec::new();
    // A failover quorum counts the other gateways' verdicts; read only when it matters.
    let quorum = p.failover.quorum;
    let wanted = quorum > 1
        && table
            .cells()
            .iter()
            .any(|c| c.health.sees_failing() && !c.health.is_failed_over());
    if wanted
        && fleet
            .read_at
            .is_none_or(|t| t.elapsed() >= FLEET_READ_EVERY)
    {
        fleet.peers = peer_verdicts(shared).await;
        fleet.read_at = Some(Instant::now());
    }
    let peers = if wanted { fleet.peers.as_ref() } else { None };
    for cell in table.cells() {
        if cell.configured_state != CellState::Active {
            continue;
        }
        let signals = CellSignals {
            all_down: !cell.instances.iter().any(|i| i.health.is_available(now, p)),
            probes_healthy: cell.instances.iter().any(|i| {
                i.health.is_probe_up()
                    && i.health.probe_streak() >= i64::from(p.failover.recover_probes)
            }),
            // A target that failed over earlier in this same round serves no more: two
            // cells failing over to each other must not both leave in one round.
            target_available: cell.failover.iter().any(|&f| {
                table.cell(f).is_some_and(|t| {
                    t.is_serving(now, p)
                        && !transitions.iter().any(|(id, tr)| {
                            *id == t.id && matches!(tr, Transition::FailedOver { .. })
                        })
                })
            }),
        };
        let quorum_met = quorum <= 1
            || match peers {
                // This gateway (which must see it failing to fail it over) and the others
                // that do; the quorum is capped at the gateways alive.
                Some(v) => {
                    let need = (quorum as usize).min(v.live + 1);
                    1 + v.failing.get(&*cell.id).copied().unwrap_or(0) >= need
                }
                // Not read yet (this gateway saw nothing failing last time), or unreadable:
                // no automatic failover on this gateway's view alone.
                None => false,
            };
        tracing::trace!(cell = %cell.id, window = ?cell.health.window(now), ?signals, quorum_met, "evaluate");
        if let Some(t) = cell
            .health
            .evaluate_in_fleet(now, signals, &p.failover, quorum_met)
        {
            transitions.push((Arc::clone(&cell.id), t));
        }
    }
    let mut writer = shared.writer.lock().await;
    if !transitions.is_empty() {
        match shared.rebuild(&writer) {
            Ok(version) => {
                let switch_us = detected.elapsed().as_micros() as u64;
                let switch_ms = switch_us as f64 / 1000.0;
                let new_table = shared.table.load_full();
                shared.metrics.reload("health", true);
                for (cell, t) in transitions {
                    let (action, reason, failed_over_ms) = match t {
                        Transition::FailedOver { reason, code } => {
                            // Where its keys go now: the first serving failover target.
                            let to = new_table
                                .cell_idx(&cell)
                                .and_then(|ci| new_table.cell(ci))
                                .and_then(|c| {
                                    c.failover.iter().find_map(|&f| {
                                        let fc = new_table.cell(f)?;
                                        fc.is_serving(now, new_table.health_policy())
                                            .then(|| fc.id.to_string())
                                    })
                                })
                                .unwrap_or_else(|| "none".to_owned());
                            shared.metrics.failover(&cell, &to, code, switch_us);
                            tracing::warn!(cell = %cell, to = %to, %reason, version, switch_ms, "cell failed over");
                            ("failed_over", reason, None)
                        }
                        Transition::Returned { after_ms } => {
                            shared.metrics.switch(switch_us);
                            tracing::warn!(cell = %cell, failed_over_ms = after_ms, version, switch_ms, "cell returned to service");
                            (
                                "returned",
                                "recovered: probes healthy after the dwell time".to_owned(),
                                Some(after_ms),
                            )
                        }
                    };
                    shared.push_switch(SwitchEvent {
                        at_unix_ms: unix_ms(),
                        cell: cell.to_string(),
                        action,
                        reason,
                        switch_ms,
                        failed_over_ms,
                        table_version: version,
                    });
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot rebuild the routing table for a health transition")
            }
        }
    }
    // Canary guards: switch off gray rules whose tagged instances do worse.
    let trips = evaluate_guards(&shared.table.load_full(), now);
    if !trips.is_empty() {
        for (name, reason) in &trips {
            if let Some(g) = writer.config.gray.iter().find(|g| &g.name == name) {
                let g = g.clone();
                writer
                    .gray_overlay
                    .0
                    .insert(name.clone(), (g, reason.clone()));
            }
        }
        match shared.rebuild(&writer) {
            Ok(version) => {
                shared.metrics.reload("health", true);
                for (name, reason) in trips {
                    tracing::warn!(rule = %name, %reason, version, "gray rule switched off by its guard");
                    shared.push_switch(SwitchEvent {
                        at_unix_ms: unix_ms(),
                        cell: String::new(),
                        action: "gray_rule_disabled",
                        reason: format!("gray rule {name} switched off: {reason}"),
                        switch_ms: detected.elapsed().as_secs_f64() * 1000.0,
                        failed_over_ms: None,
                        table_version: version,
                    });
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot rebuild the routing table to switch off a gray rule")
            }
        }
    }
    // Weights: publish when any changed by more than 1 %.
    let current = shared.table.load_full();
    // Adaptive route deadlines follow their routes' latencies.
    for r in current.routes() {
        r.update_adaptive(now);
    }
    let p = current.health_policy();
    let mut changed = false;
    let next = current.with_weights(|_, inst| {
        let w = (inst.health.effective_weight(inst.weight, now, p) * 100.0).round() as u32;
        if u64::from(w.abs_diff(inst.effective)) * 100 > u64::from(inst.effective.max(1)) {
            changed = true;
        }
        w
    });
    if changed {
        shared.table.store(Arc::new(next));
    }
    drop(writer);
}

/// Gray rules whose guard trips now: (rule name, why).
fn evaluate_guards(table: &RoutingTable, now: u64) -> Vec<(String, String)> {
    use cellgate_health::{quantile_ms, Counts, LATENCY_BINS_MS};
    let mut trips = Vec::new();
    for rule in table.gray_rules().iter().filter(|r| r.enabled) {
        let Some(g) = rule.guard else { continue };
        let (mut tagged, mut untagged) = (Counts::default(), Counts::default());
        let (mut tb, mut ub) = (
            [0u64; LATENCY_BINS_MS.len() + 1],
            [0u64; LATENCY_BINS_MS.len() + 1],
        );
        // Instances tagged / untagged, and how many of each are ejected now for their
        // answers. Ejection wipes an instance's outcome window, so a canary failing hard
        // enough to be ejected never reaches the guard's request count: its ejection is the
        // signal. One ejected for being unreachable (a canary restarting refuses
        // connections; retries take those requests elsewhere) hurts no user's answers.
        let (mut n_tagged, mut n_untagged, mut ej_tagged, mut ej_untagged) =
            (0u32, 0u32, 0u32, 0u32);
        for cell in table.cells() {
            if !cell
                .instances
                .iter()
                .any(|i| i.gray.as_deref() == Some(&*rule.tag))
            {
                continue;
            }
            for inst in &cell.instances {
                let c = inst.health.window_counts(now);
                let ejected = u32::from(inst.health.is_ejected_for_answers(now));
                match inst.gray.as_deref() {
                    Some(t) if t == &*rule.tag => {
                        n_tagged += 1;
                        ej_tagged += ejected;
                        tagged.ok += c.ok;
                        tagged.fail += c.fail;
                        inst.health.add_latency_bins(now, &mut tb);
                    }
                    None => {
                        n_untagged += 1;
                        ej_untagged += ejected;
                        untagged.ok += c.ok;
                        untagged.fail += c.fail;
                        inst.health.add_latency_bins(now, &mut ub);
                    }
                    Some(_) => {}
                }
            }
        }
        // A larger share of the tagged instances ejected than of the untagged ones.
        if ej_tagged > 0
            && u64::from(ej_tagged) * u64::from(n_untagged.max(1))
                > u64::from(ej_untagged) * u64::from(n_tagged)
        {
            trips.push((
                rule.name.to_string(),
                format!(
                    "{ej_tagged} of {n_tagged} instances tagged {} ejected by outlier detection, {ej_untagged} of {n_untagged} untagged",
                    rule.tag
                ),
            ));
            continue;
        }
        if tagged.total() < g.min_requests {
            continue;
        }
        let (et, eu) = (tagged.failure_ratio(), untagged.failure_ratio());
        if et - eu > g.max_error_delta {
            trips.push((
                rule.name.to_string(),
                format!(
                    "error rate of instances tagged {} is {:.2} % over {} requests, untagged {:.2} %: worse by more than {:.2} points",
                    rule.tag,
                    et * 100.0,
                    tagged.total(),
                    eu * 100.0,
                    g.max_error_delta * 100.0
                ),
            ));
            continue;
        }
        if let (Some(max), Some(pt), Some(pu)) = (
            g.max_p95_delta_ms,
            quantile_ms(&tb, 0.95),
            quantile_ms(&ub, 0.95),
        ) {
            if pt > pu + max {
                trips.push((
                    rule.name.to_string(),
                    format!("p95 latency of instances tagged {} is about {pt} ms, untagged about {pu} ms: slower by more than {max} ms", rule.tag),
                ));
            }
        }
    }
    trips
}
