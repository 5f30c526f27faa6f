//! Circuit breaker: closed → open when a window's failure ratio reaches the threshold over
//! enough requests; open → half-open after the open time; half-open → closed after enough
//! successes, or back to open on a failure. Atomics only; time is passed in.
//!
//! The state and the time it opened are one atomic word, so every transition is one
//! compare-and-swap: a success that saw the breaker half-open cannot overwrite a failure
//! that re-opened it meanwhile. A half-open breaker lets trial traffic through only in
//! the first tenth of every second after its open time (never all traffic at once, which
//! a still-hanging upstream would hold for a whole request timeout).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::policy::BreakerPolicy;
use crate::window::Window;

/// Breaker state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Traffic flows.
    Closed,
    /// Traffic is refused until the open time has passed.
    Open,
    /// Trial traffic flows; the next outcomes decide.
    HalfOpen,
}

impl BreakerState {
    /// Name for APIs and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const STATE_BITS: u32 = 2;
const STATE_MASK: u64 = (1 << STATE_BITS) - 1;

/// Half-open trial traffic: admitted during the first `TRIAL_WINDOW_MS` of every
/// `TRIAL_PERIOD_MS` after the open time.
const TRIAL_PERIOD_MS: u64 = 1_000;
const TRIAL_WINDOW_MS: u64 = 100;

#[inline]
fn pack(state: u64, opened_at: u64) -> u64 {
    (opened_at << STATE_BITS) | state
}

/// One circuit breaker with its own window. `repr(C)`: the state word read on every
/// request comes first, so an owner can keep it on its hot cache line.
#[derive(Debug)]
#[repr(C)]
pub struct Breaker {
    /// `opened_at << 2 | state`.
    word: AtomicU64,
    trial_successes: AtomicU32,
    // Boxed: the window is only touched when an outcome is recorded, and keeping it out
    // of line keeps the breaker (and the health record holding it) small and dense.
    window: Box<Window>,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            word: AtomicU64::new(pack(CLOSED, 0)),
            trial_successes: AtomicU32::new(0),
            window: Box::new(Window::new(
                BreakerPolicy::default().window.as_millis() as u64
            )),
        }
    }
}

impl Breaker {
    #[inline]
    fn state_of(word: u64, now: u64, p: &BreakerPolicy) -> BreakerState {
        match word & STATE_MASK {
            CLOSED => BreakerState::Closed,
            HALF_OPEN => BreakerState::HalfOpen,
            _ if now >= (word >> STATE_BITS).saturating_add(p.open_for.as_millis() as u64) => {
                BreakerState::HalfOpen
            }
            _ => BreakerState::Open,
        }
    }

    /// State at `now` (an open breaker whose time is up reads as half-open).
    pub fn state(&self, now: u64, p: &BreakerPolicy) -> BreakerState {
        Self::state_of(self.word.load(Ordering::Acquire), now, p)
    }

    /// Whether traffic may pass at `now`: always when closed, never when open, and when
    /// half-open only in the trial windows.
    #[inline]
    pub fn allows(&self, now: u64, p: &BreakerPolicy) -> bool {
        let word = self.word.load(Ordering::Relaxed);
        if word & STATE_MASK == CLOSED {
            return true;
        }
        match Self::state_of(word, now, p) {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => {
                let trials_from =
                    (word >> STATE_BITS).saturating_add(p.open_for.as_millis() as u64);
                now.saturating_sub(trials_from) % TRIAL_PERIOD_MS < TRIAL_WINDOW_MS
            }
        }
    }

    /// Count an outcome. Returns the new state when this outcome changed it.
    pub fn record(&self, now: u64, failed: bool, p: &BreakerPolicy) -> Option<BreakerState> {
        loop {
            let word = self.word.load(Ordering::Acquire);
            match Self::state_of(word, now, p) {
                BreakerState::Closed => {
                    self.window.record(now, failed);
                    if failed {
                        let c = self.window.counts(now);
                        if c.total() >= p.min_requests && c.failure_ratio() >= p.failure_ratio {
                            // Lost to a concurrent transition: that one stands.
                            return self.open(word, now).then_some(BreakerState::Open);
                        }
                    }
                    return None;
                }
                BreakerState::Open => return None,
                BreakerState::HalfOpen => {
                    if failed {
                        if self.open(word, now) {
                            return Some(BreakerState::Open);
                        }
                        continue;
                    }
                    let opened_at = word >> STATE_BITS;
                    let half_open = pack(HALF_OPEN, opened_at);
                    if word != half_open
                        && self
                            .word
                            .compare_exchange(word, half_open, Ordering::AcqRel, Ordering::Acquire)
                            .is_err()
                    {
                        continue;
                    }
                    if self.trial_successes.fetch_add(1, Ordering::AcqRel) + 1
                        >= p.half_open_successes.max(1)
                        && self
                            .word
                            .compare_exchange(
                                half_open,
                                pack(CLOSED, 0),
                                Ordering::AcqRel,
                                Ordering::Acquire,
                            )
                            .is_ok()
                    {
                        self.window.clear();
                        return Some(BreakerState::Closed);
                    }
                    return None;
                }
            }
        }
    }

    /// Open the breaker at `now` if its word is still `seen`; whether it did.
    fn open(&self, seen: u64, now: u64) -> bool {
        // Reset before the state is published: a trial counted from here on belongs to
        // this opening.
        self.trial_successes.store(0, Ordering::Release);
        self.word
            .compare_exchange(seen, pack(OPEN, now), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Apply a new window span (after a reload).
    pub fn set_window(&self, p: &BreakerPolicy) {
        self.window.set_span(p.window.as_millis() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            failure_ratio: 0.6,
            min_requests: 20,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(60),
            half_open_successes: 3,
        }
    }

    #[test]
    fn opens_at_ratio_and_volume_then_half_opens_and_closes() {
        let p = policy();
        let b = Breaker::default();
        // 19 requests, all failing: below the volume.
        for i in 0..19 {
            assert_eq!(b.record(1_000 + i, true, &p), None);
        }
        assert!(b.allows(1_100, &p));
        // 20th: 20 requests at 100 % ≥ 60 %: opens.
        assert_eq!(b.record(1_100, true, &p), Some(BreakerState::Open));
        assert!(!b.allows(1_100, &p));
        assert!(!b.allows(61_099, &p));
        assert_eq!(b.state(61_100, &p), BreakerState::HalfOpen);
        assert!(b.allows(61_100, &p));
        // A failure in half-open re-opens.
        assert_eq!(b.record(61_100, true, &p), Some(BreakerState::Open));
        assert!(!b.allows(61_200, &p));
        // Half-open again; three successes close.
        assert_eq!(b.record(121_200, false, &p), None);
        assert_eq!(b.record(121_201, false, &p), None);
        assert_eq!(b.record(121_202, false, &p), Some(BreakerState::Closed));
        assert!(b.allows(121_203, &p));
    }

    #[test]
    fn half_open_admits_trial_traffic_only_in_its_windows() {
        let p = policy();
        let b = Breaker::default();
        for i in 0..20 {
            b.record(1_000 + i, true, &p);
        }
        assert_eq!(b.state(1_019, &p), BreakerState::Open);
        let trials_from = 1_019 + 60_000;
        assert!(!b.allows(trials_from - 1, &p));
        let admitted = (trials_from..trials_from + 3_000)
            .filter(|&t| b.allows(t, &p))
            .count();
        assert_eq!(admitted, 300, "a tenth of each second");
        assert!(b.allows(trials_from + 99, &p));
        assert!(!b.allows(trials_from + 100, &p));
        assert!(b.allows(trials_from + 1_000, &p));
        // A trial success makes it half-open for good; still trial windows only.
        assert_eq!(b.record(trials_from, false, &p), None);
        assert_eq!(b.state(trials_from + 500, &p), BreakerState::HalfOpen);
        assert!(!b.allows(trials_from + 500, &p));
    }

    #[test]
    fn a_failure_after_a_trial_success_reopens_and_later_successes_do_not_close_it() {
        let p = policy();
        let b = Breaker::default();
        for i in 0..20 {
            b.record(1_000 + i, true, &p);
        }
        let t = 1_019 + 60_000;
        assert_eq!(b.record(t, false, &p), None);
        assert_eq!(b.record(t + 1, true, &p), Some(BreakerState::Open));
        // Re-opened at t + 1: successes now are outcomes of requests sent before; they
        // count for nothing and cannot close it.
        for i in 0..5 {
            assert_eq!(b.record(t + 2 + i, false, &p), None);
        }
        assert_eq!(b.state(t + 10, &p), BreakerState::Open);
        assert!(!b.allows(t + 10, &p));
        assert_eq!(b.state(t + 1 + 60_000, &p), BreakerState::HalfOpen);
    }

    #[test]
    fn stays_closed_below_the_ratio() {
        let p = policy();
        let b = Breaker::default();
        for i in 0..100u64 {
            b.record(1_000 + i, i % 2 == 0, &p); // 50 %
        }
        assert_eq!(b.state(2_000, &p), BreakerState::Closed);
    }
}
