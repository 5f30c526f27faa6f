//! Prometheus metrics (SPEC §8). Counters and histograms are atomics; per-cell series live in
//! [`CellMetrics`] objects handed out once per cell id (each worker caches them per table
//! version), so recording takes no lock. Label values are bounded: cell ids, status classes,
//! SLO classes, states, sources — never keys or paths. [`render`] writes the text format.
//!
//! Never allocate or lock on the recording path; `render` may do both.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use cellgate_health::{now_ms, Window};
use cellgate_routing::CellState;

use crate::server::Shared;

/// Upper bounds (seconds) of the duration histograms.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A fixed-bucket histogram of seconds.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Observe a duration in microseconds.
    #[inline]
    pub fn observe_us(&self, us: u64) {
        let s = us as f64 / 1e6;
        let i = BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let mut cum = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.counts[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
        }
        cum += self.counts[BUCKETS.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cum}");
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            self.sum_us.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {cum}");
    }
}

/// Status classes counted per cell; `error` is a request the gateway answered itself
/// without any cell (bad key, shed).
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Series of one cell.
#[derive(Debug)]
pub struct CellMetrics {
    requests: [AtomicU64; 5],
    duration: Histogram,
    /// Requests and errors (5xx) for the SLO burn rate, fast window (5 min).
    burn_fast: Window,
    /// Same, slow window (1 h).
    burn_slow: Window,
}

impl Default for CellMetrics {
    fn default() -> Self {
        Self {
            requests: Default::default(),
            duration: Histogram::default(),
            burn_fast: Window::new(5 * 60 * 1000),
            burn_slow: Window::new(60 * 60 * 1000),
        }
    }
}

impl CellMetrics {
    /// Count one request answered with `status` after `us` microseconds, at `now` ([`now_ms`]).
    #[inline]
    pub fn record(&self, status: u16, us: u64, now: u64) {
        let class = usize::from((status / 100).clamp(1, 5) - 1);
        self.requests[class].fetch_add(1, Relaxed);
        self.duration.observe_us(us);
        let failed = status >= 500;
        self.burn_fast.record(now, failed);
        self.burn_slow.record(now, failed);
    }

    /// Error-budget burn rate over the fast and the slow window for an SLO `target`
    /// (e.g. 0.999): error ratio ÷ (1 − target).
    pub fn burn_rates(&self, target: f64) -> (f64, f64) {
        let now = now_ms();
        let budget = (1.0 - target).max(1e-9);
        (
            self.burn_fast.counts(now).failure_ratio() / budget,
            self.burn_slow.counts(now).failure_ratio() / budget,
        )
    }
}

/// The gateway's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    cells: Mutex<HashMap<String, Arc<CellMetrics>>>,
    /// Requests the gateway answered without a cell (bad key, shed, no cell).
    pub no_cell: Arc<CellMetrics>,
    shed: [AtomicU64; 3],
    reloads: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    failovers: Mutex<BTreeMap<(String, String, &'static str), u64>>,
    switch_duration: Histogram,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// SLO target of the burn-rate series.
pub const SLO_TARGET: f64 = 0.999;

impl Metrics {
    /// The series of `cell`, created on first use (called when a worker sees a new table
    /// version, never per request).
    pub fn cell(&self, cell: &str) -> Arc<CellMetrics> {
        Arc::clone(lock(&self.cells).entry(cell.to_owned()).or_default())
    }

    /// Count a shed request of SLO class index 0 critical, 1 standard, 2 best-effort.
    pub fn shed(&self, class: usize) {
        if let Some(c) = self.shed.get(class) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// Count a configuration reload from `source` (`file`, `etcd`, `admin`, `health`).
    pub fn reload(&self, source: &'static str, ok: bool) {
        *lock(&self.reloads)
            .entry((source, if ok { "ok" } else { "rejected" }))
            .or_default() += 1;
    }

    /// Count a failover of `from` to `to` for `reason`, and how long the switch took.
    pub fn failover(&self, from: &str, to: &str, reason: &'static str, switch_us: u64) {
        *lock(&self.failovers)
            .entry((from.to_owned(), to.to_owned(), reason))
            .or_default() += 1;
        self.switch_duration.observe_us(switch_us);
    }

    /// Count a switch back (a return), for the switch-duration histogram only.
    pub fn switch(&self, switch_us: u64) {
        self.switch_duration.observe_us(switch_us);
    }
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition of every metric.
pub fn render(shared: &Shared) -> String {
    let m = &shared.metrics;
    let table = shared.table.load_full();
    let now = now_ms();
    let p = table.health_policy();
    let mut out = String::with_capacity(8192);
    let cells = lock(&m.cells).clone();

    out.push_str("# HELP cellgate_requests_total Requests answered, by serving cell and status class.\n# TYPE cellgate_requests_total counter\n");
    let mut all: Vec<(&str, &Arc<CellMetrics>)> =
        cells.iter().map(|(k, v)| (k.as_str(), v)).collect();
    all.sort_by(|a, b| a.0.cmp(b.0));
    all.push(("none", &m.no_cell));
    for (cell, cm) in &all {
        for (i, class) in CLASSES.iter().enumerate() {
            let _ = writeln!(
                out,
                "cellgate_requests_total{{cell=\"{}\",code_class=\"{class}\"}} {}",
                esc(cell),
                cm.requests[i].load(Relaxed)
            );
        }
    }
    out.push_str("# HELP cellgate_request_duration_seconds Time from request to response head, by serving cell.\n# TYPE cellgate_request_duration_seconds histogram\n");
    for (cell, cm) in &all {
        cm.duration.write(
            &mut out,
            "cellgate_request_duration_seconds",
            &format!("cell=\"{}\"", esc(cell)),
        );
    }
    out.push_str("# HELP cellgate_slo_burn_rate Error-budget burn rate (5xx ratio / (1 - 0.999)) over a fast (5m) and a slow (1h) window.\n# TYPE cellgate_slo_burn_rate gauge\n");
    for (cell, cm) in all.iter().filter(|(c, _)| *c != "none") {
        let (fast, slow) = cm.burn_rates(SLO_TARGET);
        let _ = writeln!(
            out,
            "cellgate_slo_burn_rate{{cell=\"{}\",window=\"5m\"}} {fast}",
            esc(cell)
        );
        let _ = writeln!(
            out,
            "cellgate_slo_burn_rate{{cell=\"{}\",window=\"1h\"}} {slow}",
            esc(cell)
        );
    }

    out.push_str("# HELP cellgate_cell_health_score Mean health score of the cell's instances (0 = down, 1 = fully healthy).\n# TYPE cellgate_cell_health_score gauge\n");
    for c in table.cells() {
        let score = c.health_score(now, p);
        let _ = writeln!(
            out,
            "cellgate_cell_health_score{{cell=\"{}\"}} {score}",
            esc(&c.id)
        );
    }
    out.push_str("# HELP cellgate_cell_weight Sum of the effective weights of the cell's instances.\n# TYPE cellgate_cell_weight gauge\n");
    for c in table.cells() {
        let w = c.effective_weight();
        let _ = writeln!(out, "cellgate_cell_weight{{cell=\"{}\"}} {w}", esc(&c.id));
    }
    out.push_str("# HELP cellgate_cell_state 1 for the cell's current state.\n# TYPE cellgate_cell_state gauge\n");
    for c in table.cells() {
        for s in [
            CellState::Active,
            CellState::Draining,
            CellState::FailedOver,
            CellState::Disabled,
        ] {
            let _ = writeln!(
                out,
                "cellgate_cell_state{{cell=\"{}\",state=\"{}\"}} {}",
                esc(&c.id),
                s.as_str(),
                u8::from(c.state == s)
            );
        }
    }
    out.push_str("# HELP cellgate_upstream_ejections_total Instances ejected by passive health, by cell.\n# TYPE cellgate_upstream_ejections_total counter\n");
    for c in table.cells() {
        let _ = writeln!(
            out,
            "cellgate_upstream_ejections_total{{cell=\"{}\"}} {}",
            esc(&c.id),
            c.health.ejections_total()
        );
    }
    let _ = writeln!(out, "# HELP cellgate_routing_table_version Version of the routing table in use.\n# TYPE cellgate_routing_table_version gauge\ncellgate_routing_table_version {}", table.version());

    out.push_str("# HELP cellgate_failovers_total Cell failovers, by cell, target and reason.\n# TYPE cellgate_failovers_total counter\n");
    for ((from, to, reason), n) in lock(&m.failovers).iter() {
        let _ = writeln!(
            out,
            "cellgate_failovers_total{{from=\"{}\",to=\"{}\",reason=\"{reason}\"}} {n}",
            esc(from),
            esc(to)
        );
    }
    out.push_str("# HELP cellgate_switch_duration_seconds Time from detecting a cell transition to the new table serving.\n# TYPE cellgate_switch_duration_seconds histogram\n");
    m.switch_duration
        .write(&mut out, "cellgate_switch_duration_seconds", "");
    out.push_str("# HELP cellgate_config_reloads_total Configuration reloads, by source and result.\n# TYPE cellgate_config_reloads_total counter\n");
    for ((source, result), n) in lock(&m.reloads).iter() {
        let _ = writeln!(
            out,
            "cellgate_config_reloads_total{{source=\"{source}\",result=\"{result}\"}} {n}"
        );
    }
    out.push_str("# HELP cellgate_shed_total Requests shed under overload, by SLO class.\n# TYPE cellgate_shed_total counter\n");
    for (i, class) in ["critical", "standard", "best-effort"].iter().enumerate() {
        let _ = writeln!(
            out,
            "cellgate_shed_total{{class=\"{class}\"}} {}",
            m.shed[i].load(Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP cellgate_in_flight Requests in flight through the gateway.\n# TYPE cellgate_in_flight gauge\ncellgate_in_flight {}",
        shared.in_flight.load(Relaxed)
    );
    if let Some(t) = &shared.traces {
        let _ = writeln!(
            out,
            "# HELP cellgate_trace_spans_dropped_total Spans not exported because the export queue was full.\n# TYPE cellgate_trace_spans_dropped_total counter\ncellgate_trace_spans_dropped_total {}",
            t.dropped.load(Relaxed)
        );
    }
    out
}
