//! Circuit breaker: closed → open when a window's failure ratio reaches the threshold over
//! enough requests; open → half-open after the open time; half-open → closed after enough
//! successes, or back to open on a failure. Atomics only; time is passed in.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

use crate::policy::BreakerPolicy;
use crate::window::Window;

/// Breaker state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Traffic flows.
    Closed,
    /// Traffic is refused until the open time has passed.
    Open,
    /// Traffic flows on trial; the next outcomes decide.
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

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// One circuit breaker with its own window. `repr(C)`: the state byte read on every
/// request comes first, so an owner can keep it on its hot cache line.
#[derive(Debug)]
#[repr(C)]
pub struct Breaker {
    state: AtomicU8,
    opened_at: AtomicU64,
    trial_successes: AtomicU32,
    // Boxed: the window is only touched when an outcome is recorded, and keeping it out
    // of line keeps the breaker (and the health record holding it) small and dense.
    window: Box<Window>,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            state: AtomicU8::new(CLOSED),
            opened_at: AtomicU64::new(0),
            trial_successes: AtomicU32::new(0),
            window: Box::new(Window::new(
                BreakerPolicy::default().window.as_millis() as u64
            )),
        }
    }
}

impl Breaker {
    /// State at `now` (an open breaker whose time is up reads as half-open).
    pub fn state(&self, now: u64, p: &BreakerPolicy) -> BreakerState {
        match self.state.load(Ordering::Relaxed) {
            CLOSED => BreakerState::Closed,
            HALF_OPEN => BreakerState::HalfOpen,
            _ if now >= self.opened_at.load(Ordering::Relaxed) + p.open_for.as_millis() as u64 => {
                BreakerState::HalfOpen
            }
            _ => BreakerState::Open,
        }
    }

    /// Whether traffic may pass at `now`.
    #[inline]
    pub fn allows(&self, now: u64, p: &BreakerPolicy) -> bool {
        self.state.load(Ordering::Relaxed) == CLOSED || self.state(now, p) != BreakerState::Open
    }

    /// Count an outcome. Returns the new state when this outcome changed it.
    pub fn record(&self, now: u64, failed: bool, p: &BreakerPolicy) -> Option<BreakerState> {
        match self.state(now, p) {
            BreakerState::Closed => {
                self.window.record(now, failed);
                if failed {
                    let c = self.window.counts(now);
                    if c.total() >= p.min_requests && c.failure_ratio() >= p.failure_ratio {
                        return self.open(now);
                    }
                }
                None
            }
            BreakerState::Open => None,
            BreakerState::HalfOpen => {
                if failed {
                    return self.open(now);
                }
                self.state.store(HALF_OPEN, Ordering::Relaxed);
                if self.trial_successes.fetch_add(1, Ordering::Relaxed) + 1
                    >= p.half_open_successes.max(1)
                {
                    self.window.clear();
                    self.state.store(CLOSED, Ordering::Relaxed);
                    return Some(BreakerState::Closed);
                }
                None
            }
        }
    }

    /// Called only on a transition (from closed, or from half-open).
    fn open(&self, now: u64) -> Option<BreakerState> {
        self.opened_at.store(now, Ordering::Relaxed);
        self.trial_successes.store(0, Ordering::Relaxed);
        self.state.store(OPEN, Ordering::Relaxed);
        Some(BreakerState::Open)
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
    fn stays_closed_below_the_ratio() {
        let p = policy();
        let b = Breaker::default();
        for i in 0..100u64 {
            b.record(1_000 + i, i % 2 == 0, &p); // 50 %
        }
        assert_eq!(b.state(2_000, &p), BreakerState::Closed);
    }
}
