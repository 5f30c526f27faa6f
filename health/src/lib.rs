//! Where health is scored: what the gateway knows about every instance and cell, and the
//! rules that turn it into availability, weights and automatic cell failover.
//!
//! - [`InstanceHealth`]: passive outcomes, outlier ejection with back-off and a cap on the
//!   ejected share, a circuit breaker, the probe verdict with rise/fall hysteresis, the
//!   watermark score, RTT moving average and slow start.
//! - [`CellHealth`]: the cell's failover window, breaker, retry budget, in-flight count and
//!   the automatic failover state machine with dwell time.
//! - [`score`]: `weight = base × score × (1 + α·e^(−β·rtt_ms))`.
//! - [`probe`]: the probe trait, the TCP probe, jitter.
//!
//! State is keyed by cell and instance identity in the [`HealthRegistry`], so a new routing
//! table gets the same state objects and a reload never resets health. Every time-driven
//! rule takes `now` (milliseconds from [`now_ms`]) as an argument, so it is tested without
//! sleeping.
//!
//! This crate must never take a lock on the request path (the registry's and the failover
//! machine's locks are for table builds and the controller), and never depends on an HTTP
//! engine.

mod breaker;
mod cell;
mod instance;
mod policy;
pub mod probe;
pub mod score;
mod window;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

pub use breaker::{Breaker, BreakerState};
pub use cell::{CellHealth, CellSignals, Transition};
pub use instance::{InstanceHealth, Outcome, Recorded};
pub use policy::*;
pub use window::{quantile_ms, Counts, LatencyWindow, Window, LATENCY_BINS_MS};

/// Milliseconds since the first call in this process: the time base of every health
/// timestamp. Monotonic; never 0.
pub fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// [`now_ms`] of an instant already read (the request path reads the clock once per
/// step and derives both from it).
pub fn ms_at(at: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    at.saturating_duration_since(*epoch).as_millis() as u64 + 1
}

/// Hands out one [`InstanceHealth`] per `(cell id, instance name)` and one [`CellHealth`] per
/// cell id, for the lifetime of the process. Used while building tables, never on the
/// request path.
#[derive(Debug, Default)]
pub struct HealthRegistry {
    instances: Mutex<HashMap<(String, String), Arc<InstanceHealth>>>,
    cells: Mutex<HashMap<String, Arc<CellHealth>>>,
    routes: Mutex<HashMap<String, Arc<RouteLatency>>>,
}

/// Latencies of one route's answers and the adaptive deadline derived from them
/// (clamp(p95 × factor, min, max), recomputed by the controller); survives table swaps.
#[derive(Debug, Default)]
pub struct RouteLatency {
    window: LatencyWindow,
    adaptive_ms: std::sync::atomic::AtomicU64,
}

impl RouteLatency {
    /// Record one answer's latency at `now`.
    #[inline]
    pub fn record(&self, now: u64, latency_us: u64) {
        self.window.record(now, latency_us);
    }

    /// The p95 latency over the window (10 s) in ms, by the bins' upper bounds.
    pub fn p95_ms(&self, now: u64) -> Option<u64> {
        let mut bins = [0u64; LATENCY_BINS_MS.len() + 1];
        self.window.add_bins(now, &mut bins);
        quantile_ms(&bins, 0.95)
    }

    /// Set the adaptive deadline (0: none yet).
    pub fn set_adaptive_ms(&self, ms: u64) {
        self.adaptive_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// The adaptive deadline, once there were answers to derive it from.
    #[inline]
    pub fn adaptive(&self) -> Option<std::time::Duration> {
        match self.adaptive_ms.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            ms => Some(std::time::Duration::from_millis(ms)),
        }
    }
}

impl HealthRegistry {
    /// A new, empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The health state of `instance` in `cell`, created on first use.
    pub fn instance(&self, cell: &str, instance: &str) -> Arc<InstanceHealth> {
        let mut map = match self.instances.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry((cell.to_owned(), instance.to_owned()))
            .or_default()
            .clone()
    }

    /// The latency state of route `prefix`, created on first use.
    pub fn route(&self, prefix: &str) -> Arc<RouteLatency> {
        let mut map = match self.routes.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(prefix.to_owned()).or_default().clone()
    }

    /// The health state of `cell`, created on first use.
    pub fn cell(&self, cell: &str) -> Arc<CellHealth> {
        let mut map = match self.cells.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(cell.to_owned()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_identity_same_state() {
        let reg = HealthRegistry::new();
        assert!(Arc::ptr_eq(
            &reg.instance("bj-1", "a"),
            &reg.instance("bj-1", "a")
        ));
        assert!(!Arc::ptr_eq(
            &reg.instance("bj-1", "a"),
            &reg.instance("bj-2", "a")
        ));
        assert!(Arc::ptr_eq(&reg.cell("bj-1"), &reg.cell("bj-1")));
    }
}
