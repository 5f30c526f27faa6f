//! What the gateway knows about one instance: passive outcomes (window, consecutive
//! failures, ejection with back-off), its breaker, the active probe's verdict and score, RTT,
//! and when it last became available (slow start). Shared by every table containing the
//! instance and updated with atomics from the request path and the probe tasks.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};

use crate::breaker::{Breaker, BreakerState};
use crate::policy::{HealthPolicy, OutlierPolicy, WeightPolicy};
use crate::window::{Counts, LatencyWindow, Window, LATENCY_BINS_MS};

/// How one attempt at an instance ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An answer that does not count against the instance (below 500).
    Success,
    /// A 5xx answer.
    Status5xx,
    /// The connection was refused (nothing listens).
    Refused,
    /// Connect timed out or failed otherwise (nothing was sent).
    ConnectFailed,
    /// The request went out and the connection was reset or closed before an answer (the
    /// instance crashed on it, say).
    Reset,
    /// The instance did not answer in time.
    Timeout,
}

impl Outcome {
    /// Whether this outcome counts as a failure.
    pub fn is_failure(self) -> bool {
        self != Self::Success
    }
}

/// What changed when an outcome was recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    /// The instance was ejected by this outcome.
    pub ejected: bool,
    /// The instance's breaker changed state.
    pub breaker: Option<BreakerState>,
}

/// Health of one instance.
///
/// Laid out for the request path: what [`Self::is_available`] reads (probe verdict,
/// ejection, the breaker's state) sits on the first cache line, so a routing decision
/// touches one line per instance, and the windows live out of line so the records of a
/// cell's instances stay small and close together.
#[derive(Debug)]
#[repr(C, align(64))]
pub struct InstanceHealth {
    probe_up: AtomicBool,
    ejected_until_ms: AtomicU64,
    breaker: Breaker,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    // Out of line (see the type's docs): written once per outcome, never read to route.
    window: Box<Window>,
    latency: Box<LatencyWindow>,
    probe_streak: AtomicI64,
    score_milli: AtomicU32,
    rtt_us: AtomicU64,
    available_since_ms: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
    in_flight: AtomicI64,
    /// The last ejection was for its answers (5xx, timeouts), not for being unreachable.
    ejected_for_answers: AtomicBool,
}

impl Default for InstanceHealth {
    fn default() -> Self {
        Self {
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            window: Box::default(),
            latency: Box::default(),
            breaker: Breaker::default(),
            probe_up: AtomicBool::new(true),
            probe_streak: AtomicI64::new(0),
            score_milli: AtomicU32::new(1000),
            rtt_us: AtomicU64::new(0),
            available_since_ms: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            ejected_for_answers: AtomicBool::new(false),
        }
    }
}

impl InstanceHealth {
    /// Whether the instance may receive traffic at `now`: probe up, not ejected, breaker
    /// not open.
    #[inline]
    pub fn is_available(&self, now: u64, p: &HealthPolicy) -> bool {
        self.probe_up.load(Ordering::Relaxed)
            && self.ejected_until_ms.load(Ordering::Relaxed) <= now
            && self.breaker.allows(now, &p.breaker)
    }

    /// Whether the instance is only held back by passive health (ejection or breaker) —
    /// the panic threshold may ignore that; a failed probe it may not.
    pub fn is_probe_up(&self) -> bool {
        self.probe_up.load(Ordering::Relaxed)
    }

    /// Record one attempt's outcome at `now`. `ejected_in_cell` and `cell_size` enforce the
    /// cap on the ejected share of the cell.
    pub fn record(
        &self,
        now: u64,
        outcome: Outcome,
        p: &HealthPolicy,
        ejected_in_cell: usize,
        cell_size: usize,
    ) -> Recorded {
        let failed = outcome.is_failure();
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.window.record(now, failed);
        let breaker = self.breaker.record(now, failed, &p.breaker);
        if !failed {
            if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                self.consecutive_failures.store(0, Ordering::Relaxed);
            }
            if self.ejections.load(Ordering::Relaxed) != 0
                && self.ejected_until_ms.load(Ordering::Relaxed) + 10_000 < now
            {
                self.ejections.store(0, Ordering::Relaxed);
            }
            return Recorded {
                ejected: false,
                breaker,
            };
        }
        self.failures.fetch_add(1, Ordering::Relaxed);
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let o = &p.outlier;
        let by_count = n >= o.consecutive_failures.max(1);
        let by_refusal = o.eject_on_refused && outcome == Outcome::Refused;
        let by_ratio = {
            let c = self.window.counts(now);
            c.total() >= o.min_requests && c.failure_ratio() >= o.failure_ratio
        };
        let mut ejected = false;
        if (by_count || by_refusal || by_ratio)
            && self.ejected_until_ms.load(Ordering::Relaxed) <= now
        {
            let cap_ok = by_refusal
                || (ejected_in_cell as f64)
                    < (o.max_ejected_fraction * cell_size as f64).floor().max(1.0);
            if cap_ok {
                self.eject(now, o);
                self.ejected_for_answers.store(
                    matches!(
                        outcome,
                        Outcome::Status5xx | Outcome::Timeout | Outcome::Reset
                    ),
                    Ordering::Relaxed,
                );
                ejected = true;
            }
        }
        Recorded { ejected, breaker }
    }

    fn eject(&self, now: u64, o: &OutlierPolicy) {
        let k = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let backoff = o
            .base_ejection
            .saturating_mul(1u32 << k)
            .min(o.max_ejection);
        let until = now + backoff.as_millis() as u64;
        self.ejected_until_ms.store(until, Ordering::Relaxed);
        self.available_since_ms.store(until, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.window.clear();
    }

    /// Whether the instance is ejected at `now`.
    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now
    }

    /// Whether the instance is ejected at `now` for what it did with requests (5xx,
    /// timeouts, requests dropped unanswered), not
    /// for being unreachable (refused or failed connections: down, or restarting).
    pub fn is_ejected_for_answers(&self, now: u64) -> bool {
        self.is_ejected(now) && self.ejected_for_answers.load(Ordering::Relaxed)
    }

    /// Milliseconds until which the instance is ejected; 0 if never ejected.
    pub fn ejected_until(&self) -> u64 {
        self.ejected_until_ms.load(Ordering::Relaxed)
    }

    /// Breaker state at `now`.
    pub fn breaker_state(&self, now: u64, p: &HealthPolicy) -> BreakerState {
        self.breaker.state(now, &p.breaker)
    }

    /// Record an active probe at `now`: `up` (with hysteresis: `rise` successes to come up,
    /// `fall` failures to go down), its RTT, and the score from its watermarks. Returns
    /// `Some(up)` when the probe verdict changed.
    pub fn record_probe(
        &self,
        now: u64,
        up: bool,
        rtt_us: Option<u64>,
        score: f64,
        p: &HealthPolicy,
    ) -> Option<bool> {
        if let Some(rtt) = rtt_us {
            self.record_rtt(rtt, &p.weight);
        }
        if up {
            self.score_milli.store(
                (score.clamp(0.0, 1.0) * 1000.0).round() as u32,
                Ordering::Relaxed,
            );
        }
        let streak = self.probe_streak.load(Ordering::Relaxed);
        let streak = if up {
            streak.max(0) + 1
        } else {
            streak.min(0) - 1
        };
        self.probe_streak.store(streak, Ordering::Relaxed);
        let was_up = self.probe_up.load(Ordering::Relaxed);
        if was_up && !up && -streak >= i64::from(p.probe.fall.max(1)) {
            self.probe_up.store(false, Ordering::Relaxed);
            return Some(false);
        }
        if !was_up && up && streak >= i64::from(p.probe.rise.max(1)) {
            self.probe_up.store(true, Ordering::Relaxed);
            self.available_since_ms.store(now, Ordering::Relaxed);
            // A recovered instance starts afresh.
            self.ejected_until_ms.store(0, Ordering::Relaxed);
            self.ejections.store(0, Ordering::Relaxed);
            return Some(true);
        }
        None
    }

    /// Consecutive probe successes (positive) or failures (negative).
    pub fn probe_streak(&self) -> i64 {
        self.probe_streak.load(Ordering::Relaxed)
    }

    /// Record the latency of an answered request (for the canary guard's p95).
    #[inline]
    pub fn record_latency(&self, now: u64, latency_us: u64) {
        self.latency.record(now, latency_us);
    }

    /// Outcomes in the instance window at `now`.
    pub fn window_counts(&self, now: u64) -> Counts {
        self.window.counts(now)
    }

    /// Add the instance's latency bins at `now` into `into`.
    pub fn add_latency_bins(&self, now: u64, into: &mut [u64; LATENCY_BINS_MS.len() + 1]) {
        self.latency.add_bins(now, into);
    }

    /// Fold one RTT sample (microseconds) into the moving average.
    #[inline]
    pub fn record_rtt(&self, rtt_us: u64, w: &WeightPolicy) {
        let old = self.rtt_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            rtt_us.max(1)
        } else {
            let a = w.rtt_ewma.clamp(0.01, 1.0);
            ((1.0 - a) * old as f64 + a * rtt_us as f64)
                .round()
                .max(1.0) as u64
        };
        self.rtt_us.store(new, Ordering::Relaxed);
    }

    /// RTT moving average in milliseconds (None before the first sample).
    pub fn rtt_ms(&self) -> Option<f64> {
        match self.rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(us as f64 / 1000.0),
        }
    }

    /// Health score in [0, 1] from the last probe's watermarks (0 when the probe says down).
    pub fn score(&self) -> f64 {
        if self.probe_up.load(Ordering::Relaxed) {
            f64::from(self.score_milli.load(Ordering::Relaxed)) / 1000.0
        } else {
            0.0
        }
    }

    /// Effective weight at `now`: `base × score × (1 + α·e^(−β·rtt_ms)) × slow start`, 0 when
    /// unavailable. Computed off the request path and published in the routing table.
    pub fn effective_weight(&self, base: u32, now: u64, p: &HealthPolicy) -> f64 {
        if !self.is_available(now, p) {
            return 0.0;
        }
        crate::score::effective_weight(f64::from(base), self.score(), self.rtt_ms(), &p.weight)
            * self.slow_start(now, &p.outlier)
    }

    /// Slow-start factor in [0.1, 1] at `now`.
    pub fn slow_start(&self, now: u64, o: &OutlierPolicy) -> f64 {
        let since = self.available_since_ms.load(Ordering::Relaxed);
        let ramp = o.slow_start.as_millis() as u64;
        if since == 0 || ramp == 0 || now >= since + ramp {
            return 1.0;
        }
        let t = now.saturating_sub(since) as f64 / ramp as f64;
        0.1 + 0.9 * t
    }

    /// Track in-flight requests (`delta` +1 at send, −1 at answer).
    #[inline]
    pub fn add_in_flight(&self, delta: i64) {
        self.in_flight.fetch_add(delta, Ordering::Relaxed);
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed).max(0)
    }

    /// Requests and failures recorded so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }

    /// Apply window spans of a new policy (after a reload).
    pub fn apply_policy(&self, p: &HealthPolicy) {
        self.window.set_span(p.outlier.window.as_millis() as u64);
        self.latency.set_span(p.outlier.window.as_millis() as u64);
        self.breaker.set_window(&p.breaker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn policy() -> HealthPolicy {
        HealthPolicy::default()
    }

    #[test]
    fn consecutive_failures_eject_with_doubling_backoff_and_success_resets() {
        let mut p = policy();
        p.outlier.consecutive_failures = 3;
        let h = InstanceHealth::default();
        assert!(!h.record(100, Outcome::Status5xx, &p, 0, 4).ejected);
        assert!(!h.record(100, Outcome::Timeout, &p, 0, 4).ejected);
        assert!(h.record(100, Outcome::Status5xx, &p, 0, 4).ejected);
        assert!(!h.is_available(1_099, &p));
        assert!(h.is_available(1_100, &p));
        for _ in 0..2 {
            h.record(1_200, Outcome::Status5xx, &p, 0, 4);
        }
        assert!(h.record(1_200, Outcome::Status5xx, &p, 0, 4).ejected);
        assert!(!h.is_available(3_199, &p), "second ejection lasts 2 s");
        assert!(h.is_available(3_200, &p));
        h.record(20_000, Outcome::Success, &p, 0, 4);
        for _ in 0..3 {
            h.record(20_001, Outcome::Status5xx, &p, 0, 4);
        }
        assert!(
            h.is_available(21_001, &p),
            "back-off reset after a healthy period"
        );
    }

    #[test]
    fn a_refused_connection_ejects_at_once_and_the_cap_holds_for_other_failures() {
        let mut p = policy();
        p.outlier.consecutive_failures = 1;
        let h = InstanceHealth::default();
        assert!(
            h.record(10, Outcome::Refused, &p, 3, 4).ejected,
            "refusal ignores the cap"
        );
        let h2 = InstanceHealth::default();
        assert!(
            !h2.record(10, Outcome::Status5xx, &p, 2, 4).ejected,
            "2 of 4 ejected already, cap 50 %"
        );
        assert!(h2.record(10, Outcome::Status5xx, &p, 1, 4).ejected);
    }

    #[test]
    fn probe_hysteresis_rise_and_fall() {
        let p = policy(); // rise 2, fall 3
        let h = InstanceHealth::default();
        assert_eq!(h.record_probe(1, false, None, 1.0, &p), None);
        assert_eq!(h.record_probe(2, false, None, 1.0, &p), None);
        assert!(h.is_available(2, &p));
        assert_eq!(h.record_probe(3, false, None, 1.0, &p), Some(false));
        assert!(!h.is_available(3, &p));
        assert_eq!(h.score(), 0.0);
        assert_eq!(h.record_probe(4, true, None, 0.5, &p), None);
        assert_eq!(h.record_probe(5, false, None, 0.5, &p), None);
        assert_eq!(h.record_probe(6, true, None, 0.5, &p), None);
        assert_eq!(h.record_probe(7, true, Some(2_000), 0.5, &p), Some(true));
        assert!(h.is_available(7, &p));
        assert_eq!(h.score(), 0.5);
        assert_eq!(h.rtt_ms(), Some(2.0));
    }

    #[test]
    fn slow_start_ramps_after_recovery() {
        let mut p = policy();
        p.outlier.slow_start = Duration::from_secs(10);
        p.outlier.consecutive_failures = 1;
        let h = InstanceHealth::default();
        h.record(0, Outcome::Status5xx, &p, 0, 2); // ejected until 1000
        assert_eq!(h.effective_weight(100, 500, &p), 0.0);
        let w0 = h.effective_weight(100, 1_000, &p);
        let w5 = h.effective_weight(100, 6_000, &p);
        let w10 = h.effective_weight(100, 11_000, &p);
        assert!(w0 < w5 && w5 < w10, "{w0} {w5} {w10}");
        assert!((w0 / w10 - 0.1).abs() < 1e-9);
        assert!((w5 / w10 - 0.55).abs() < 1e-9);
    }
}
