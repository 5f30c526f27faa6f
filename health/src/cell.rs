//! What the gateway knows about one cell: its passive windows (failover and breaker), retry
//! budget, in-flight count, and the automatic-failover state machine. The request path
//! records outcomes with atomics; the failover machine is evaluated by the health controller
//! off the request path and is the only part behind a lock.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;

use crate::breaker::{Breaker, BreakerState};
use crate::policy::{FailoverPolicy, HealthPolicy, RetryPolicy};
use crate::window::{Counts, Window};

/// Health of one cell.
#[derive(Debug)]
#[repr(C, align(64))]
pub struct CellHealth {
    // First: the breaker, whose state every routing decision reads.
    breaker: Breaker,
    failover_window: Window,
    budget_requests: Window,
    budget_retries: Window,
    in_flight: AtomicI64,
    failed_over: AtomicBool,
    /// This gateway's own verdict at the last evaluation: the cell should fail over (what
    /// it publishes for a fleet quorum).
    sees_failing: AtomicBool,
    ejections: std::sync::atomic::AtomicU64,
    machine: Mutex<Machine>,
}

impl Default for CellHealth {
    fn default() -> Self {
        Self {
            failover_window: Window::new(FailoverPolicy::default().window.as_millis() as u64),
            breaker: Breaker::default(),
            budget_requests: Window::new(1_000),
            budget_retries: Window::new(1_000),
            in_flight: AtomicI64::new(0),
            failed_over: AtomicBool::new(false),
            sees_failing: AtomicBool::new(false),
            ejections: std::sync::atomic::AtomicU64::new(0),
            machine: Mutex::new(Machine::default()),
        }
    }
}

/// What the controller knows about a cell when it evaluates it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CellSignals {
    /// No instance of the cell is available (probe down, ejected or breaker open).
    pub all_down: bool,
    /// Some instance's probe has succeeded at least `recover_probes` times in a row.
    pub probes_healthy: bool,
    /// At least one failover target is serving. Without one, failing over would turn a
    /// partial outage into a total one, so the cell keeps its keys.
    pub target_available: bool,
}

/// A change of the automatic state.
#[derive(Clone, Debug, PartialEq)]
pub enum Transition {
    /// The cell failed over.
    FailedOver {
        /// Why, in words.
        reason: String,
        /// Why, as a metric label: `instances_down` or `error_ratio`.
        code: &'static str,
    },
    /// The cell returned to service.
    Returned {
        /// How long it was failed over, in ms.
        after_ms: u64,
    },
}

#[derive(Debug, Default)]
struct Machine {
    since: Option<u64>,
    dwell_ms: u64,
    returned_at: Option<u64>,
    reason: String,
}

impl CellHealth {
    /// Count one attempt's outcome at `now`. Returns the breaker's new state if it changed.
    #[inline]
    pub fn record(&self, now: u64, failed: bool, p: &HealthPolicy) -> Option<BreakerState> {
        self.failover_window.record(now, failed);
        self.breaker.record(now, failed, &p.breaker)
    }

    /// Whether the cell's breaker lets traffic through at `now`.
    #[inline]
    pub fn breaker_allows(&self, now: u64, p: &HealthPolicy) -> bool {
        self.breaker.allows(now, &p.breaker)
    }

    /// Breaker state at `now`.
    pub fn breaker_state(&self, now: u64, p: &HealthPolicy) -> BreakerState {
        self.breaker.state(now, &p.breaker)
    }

    /// Outcomes in the failover window.
    pub fn window(&self, now: u64) -> Counts {
        self.failover_window.counts(now)
    }

    /// Count a request for the retry budget.
    #[inline]
    pub fn budget_request(&self, now: u64) {
        self.budget_requests.record(now, false);
    }

    /// Take one retry from the budget, if there is one.
    pub fn try_retry(&self, now: u64, r: &RetryPolicy) -> bool {
        let reqs = self.budget_requests.counts(now).total() as f64;
        let retries = self.budget_retries.counts(now).total() as f64;
        let allowed = (r.budget_ratio * reqs).max(f64::from(r.budget_min_per_sec));
        if retries < allowed {
            self.budget_retries.record(now, false);
            true
        } else {
            false
        }
    }

    /// Track requests in flight (`delta` +1 at send, −1 at answer).
    #[inline]
    pub fn add_in_flight(&self, delta: i64) {
        self.in_flight.fetch_add(delta, Ordering::Relaxed);
    }

    /// Count an instance ejection.
    pub fn count_ejection(&self) {
        self.ejections.fetch_add(1, Ordering::Relaxed);
    }

    /// Instance ejections counted so far.
    pub fn ejections_total(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed).max(0)
    }

    /// Whether health has failed the cell over (read when a table is built).
    pub fn is_failed_over(&self) -> bool {
        self.failed_over.load(Ordering::Relaxed)
    }

    /// Whether this gateway, at its last evaluation, saw the cell failing (error ratio over
    /// the threshold, or no instance available), whether or not it failed it over.
    pub fn sees_failing(&self) -> bool {
        self.sees_failing.load(Ordering::Relaxed)
    }

    /// Why the cell is failed over (empty when it is not).
    pub fn failover_reason(&self) -> String {
        self.lock().reason.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Machine> {
        match self.machine.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        }
    }

    /// Apply window spans of a new policy (after a reload).
    pub fn apply_policy(&self, p: &HealthPolicy) {
        self.failover_window
            .set_span(p.failover.window.as_millis() as u64);
        self.breaker.set_window(&p.breaker);
    }

    /// Evaluate the failover machine at `now`. Fails the cell over when its error ratio over
    /// the window exceeds the threshold (with enough requests) or when no instance is
    /// available; returns it after the dwell time once its probes are healthy. Each return
    /// that fails again within two dwell times doubles the dwell (up to 16×).
    pub fn evaluate(&self, now: u64, s: CellSignals, p: &FailoverPolicy) -> Option<Transition> {
        self.evaluate_in_fleet(now, s, p, true)
    }

    /// [`Self::evaluate`] in a fleet that may require a quorum: the cell fails over only when
    /// `quorum_met` (enough gateways see it failing); this gateway's own verdict is recorded
    /// either way ([`Self::sees_failing`]) for the others to count.
    pub fn evaluate_in_fleet(
        &self,
        now: u64,
        s: CellSignals,
        p: &FailoverPolicy,
        quorum_met: bool,
    ) -> Option<Transition> {
        let mut m = self.lock();
        let min_dwell = p.min_dwell.as_millis() as u64;
        match m.since {
            None => {
                let c = self.failover_window.counts(now);
                let reason = if s.all_down {
                    Some(("no instance is available".to_owned(), "instances_down"))
                } else if c.total() >= p.min_requests
                    && wilson_lower(c.fail, c.total(), 3.0) > p.error_ratio
                {
                    Some((
                        format!(
                            "error ratio {:.2} % over {} requests in {} s exceeds {:.2} %",
                            c.failure_ratio() * 100.0,
                            c.total(),
                            p.window.as_secs_f64(),
                            p.error_ratio * 100.0
                        ),
                        "error_ratio",
                    ))
                } else {
                    None
                };
                self.sees_failing.store(reason.is_some(), Ordering::Relaxed);
                let (reason, code) = reason?;
                if !s.target_available || !quorum_met {
                    return None;
                }
                m.dwell_ms = match m.returned_at {
                    Some(r) if now < r + 2 * m.dwell_ms.max(min_dwell) => {
                        (m.dwell_ms.max(min_dwell) * 2).min(min_dwell * 16)
                    }
                    _ => min_dwell,
                };
                m.since = Some(now);
                m.reason = reason.clone();
                self.failed_over.store(true, Ordering::Relaxed);
                Some(Transition::FailedOver { reason, code })
            }
            Some(since) => {
                if now >= since + m.dwell_ms && s.probes_healthy && !s.all_down {
                    m.since = None;
                    m.returned_at = Some(now);
                    m.reason.clear();
                    self.failover_window.clear();
                    self.failed_over.store(false, Ordering::Relaxed);
                    Some(Transition::Returned {
                        after_ms: now - since,
                    })
                } else {
                    None
                }
            }
        }
    }
}

/// Lower bound of the Wilson score interval for `fail` failures in `n` trials at `z`
/// standard deviations: the error ratio we are confident the cell is at least at. Using it
/// instead of the raw ratio keeps a handful of unlucky errors in a thin window (or a cell
/// just under the threshold, evaluated every tick) from failing a healthy cell over.
pub fn wilson_lower(fail: u64, n: u64, z: f64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let n = n as f64;
    let p = fail as f64 / n;
    let z2 = z * z;
    let centre = p + z2 / (2.0 * n);
    let margin = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - margin) / (1.0 + z2 / n)).max(0.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn wilson_bound_separates_noise_from_errors() {
        // 2 errors in 300 (0.67 %): not confidently above 0.5 %.
        assert!(super::wilson_lower(2, 300, 3.0) < 0.005);
        // 5 % of 500: confidently above.
        assert!(super::wilson_lower(25, 500, 3.0) > 0.005);
        // 0.2 % of 6000: far below.
        assert!(super::wilson_lower(12, 6000, 3.0) < 0.002);
        assert_eq!(super::wilson_lower(0, 0, 3.0), 0.0);
    }

    use super::*;
    use std::time::Duration;

    fn policy() -> FailoverPolicy {
        FailoverPolicy {
            error_ratio: 0.005,
            window: Duration::from_secs(30),
            min_requests: 100,
            min_dwell: Duration::from_secs(10),
            recover_probes: 2,
            quorum: 1,
        }
    }

    fn healthy() -> CellSignals {
        CellSignals {
            all_down: false,
            probes_healthy: true,
            target_available: true,
        }
    }

    #[test]
    fn error_ratio_fails_over_and_dwell_holds_it() {
        let hp = HealthPolicy::default();
        let p = policy();
        let c = CellHealth::default();
        // 0.2 % errors: never.
        for i in 0..5_000u64 {
            c.record(1_000 + i, i % 500 == 0, &hp);
        }
        assert_eq!(c.evaluate(6_000, healthy(), &p), None);
        // 1 % errors on top: over the threshold.
        for i in 0..1_000u64 {
            c.record(6_000 + i, i % 20 == 0, &hp);
        }
        assert!(matches!(
            c.evaluate(7_000, healthy(), &p),
            Some(Transition::FailedOver { .. })
        ));
        assert!(c.is_failed_over());
        assert_eq!(c.evaluate(16_999, healthy(), &p), None, "dwell");
        assert_eq!(
            c.evaluate(
                17_000,
                CellSignals {
                    all_down: false,
                    probes_healthy: false,
                    target_available: true,
                },
                &p
            ),
            None,
            "probes not healthy yet"
        );
        assert_eq!(
            c.evaluate(17_000, healthy(), &p),
            Some(Transition::Returned { after_ms: 10_000 })
        );
        assert!(!c.is_failed_over());
        assert_eq!(c.window(17_000).total(), 0, "window cleared on return");
    }

    #[test]
    fn no_failover_without_a_serving_target() {
        let p = policy();
        let c = CellHealth::default();
        let down = CellSignals {
            all_down: true,
            probes_healthy: false,
            target_available: false,
        };
        assert_eq!(c.evaluate(0, down, &p), None);
        assert!(!c.is_failed_over());
        assert!(c
            .evaluate(
                1,
                CellSignals {
                    target_available: true,
                    ..down
                },
                &p
            )
            .is_some());
    }

    #[test]
    fn flapping_doubles_the_dwell() {
        let p = policy();
        let c = CellHealth::default();
        let down = CellSignals {
            all_down: true,
            probes_healthy: false,
            target_available: true,
        };
        assert!(c.evaluate(0, down, &p).is_some());
        assert!(c.evaluate(10_000, healthy(), &p).is_some());
        // Fails again soon after returning: dwell doubles to 20 s.
        assert!(c.evaluate(11_000, down, &p).is_some());
        assert_eq!(c.evaluate(30_999, healthy(), &p), None);
        assert!(c.evaluate(31_000, healthy(), &p).is_some());
        // Long healthy period: back to the base dwell.
        assert!(c.evaluate(200_000, down, &p).is_some());
        assert!(c.evaluate(210_000, healthy(), &p).is_some());
    }

    #[test]
    fn retry_budget_is_a_share_of_traffic_with_a_floor() {
        let r = RetryPolicy {
            budget_ratio: 0.2,
            budget_min_per_sec: 2,
            ..RetryPolicy::default()
        };
        let c = CellHealth::default();
        assert!(c.try_retry(0, &r));
        assert!(c.try_retry(0, &r));
        assert!(!c.try_retry(0, &r), "floor of 2 per second");
        for _ in 0..100 {
            c.budget_request(10);
        }
        let granted = (0..100).filter(|_| c.try_retry(10, &r)).count();
        assert_eq!(granted, 18, "20 % of 100 requests, 2 already used");
    }

    #[test]
    fn without_a_quorum_the_verdict_is_published_and_the_cell_stays() {
        let p = policy();
        let h = CellHealth::default();
        for i in 0..200u64 {
            h.record(1_000 + i, i % 2 == 0, &HealthPolicy::default());
        }
        assert_eq!(h.evaluate_in_fleet(1_300, healthy(), &p, false), None);
        assert!(h.sees_failing(), "the verdict is kept for the fleet");
        assert!(!h.is_failed_over());
        assert!(matches!(
            h.evaluate_in_fleet(1_301, healthy(), &p, true),
            Some(Transition::FailedOver { .. })
        ));
    }
}
