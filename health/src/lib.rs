//! Health state of upstream instances, keyed by identity so it survives routing-table swaps.
//!
//! What this crate is for: holding what the gateway has learned about each instance
//! (consecutive failures, ejection back-off) in lock-free atomics that the request path
//! reads and updates, and handing out the *same* state object for the same
//! `(cell, instance)` identity every time a new routing table is built. A reload can
//! therefore never reset an ejection or send traffic back to an instance known to be bad.
//!
//! What it must never do: take a lock on the request path, depend on an HTTP engine, or
//! know about routing tables. The [`HealthRegistry`] lock is only taken while a table is
//! being built, off the request path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Milliseconds since the first call in this process: the time base of every health
/// timestamp. Monotonic; never goes backwards.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    // Start at 1 so that 0 can mean "never".
    epoch.elapsed().as_millis() as u64 + 1
}

/// Passive ejection settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EjectionPolicy {
    /// Consecutive connect failures after which an instance is ejected.
    pub consecutive_failures: u32,
    /// First ejection length; doubles with each further ejection up to `max_backoff`.
    pub base_backoff: Duration,
    /// Longest ejection.
    pub max_backoff: Duration,
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: 3,
            base_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// What the gateway knows about one instance. Shared by every table that contains the
/// instance; updated with relaxed atomics from the request path.
#[derive(Debug, Default)]
pub struct InstanceHealth {
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    ejected_until_ms: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
}

impl InstanceHealth {
    /// Whether the instance may receive traffic at `now` (milliseconds from [`now_ms`]).
    #[inline]
    pub fn is_available(&self, now: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) <= now
    }

    /// Record a request that reached the instance and got an answer.
    #[inline]
    pub fn record_success(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if self.ejections.load(Ordering::Relaxed) != 0 {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// Record a failure to reach the instance (connect refused, reset, timeout).
    /// Returns `true` when this failure ejected the instance.
    pub fn record_failure(&self, now: u64, policy: &EjectionPolicy) -> bool {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.failures.fetch_add(1, Ordering::Relaxed);
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < policy.consecutive_failures.max(1) || !self.is_available(now) {
            return false;
        }
        let k = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let backoff = policy
            .base_backoff
            .saturating_mul(1u32 << k)
            .min(policy.max_backoff);
        self.ejected_until_ms
            .store(now + backoff.as_millis() as u64, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        true
    }

    /// Milliseconds (from [`now_ms`]) until which the instance is ejected; 0 if never.
    pub fn ejected_until(&self) -> u64 {
        self.ejected_until_ms.load(Ordering::Relaxed)
    }

    /// Requests and failures recorded so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }
}

/// Hands out one [`InstanceHealth`] per `(cell id, instance name)` identity, for the
/// lifetime of the process. Used while building tables, never on the request path.
#[derive(Debug, Default)]
pub struct HealthRegistry {
    instances: Mutex<HashMap<(String, String), Arc<InstanceHealth>>>,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_identity_same_state() {
        let reg = HealthRegistry::new();
        let a = reg.instance("bj-1", "a");
        let b = reg.instance("bj-1", "a");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &reg.instance("bj-2", "a")));
    }

    #[test]
    fn ejects_after_consecutive_failures_with_backoff() {
        let p = EjectionPolicy::default();
        let h = InstanceHealth::default();
        assert!(!h.record_failure(100, &p));
        assert!(!h.record_failure(100, &p));
        assert!(h.record_failure(100, &p));
        assert!(!h.is_available(100));
        assert!(!h.is_available(1099));
        assert!(h.is_available(1100));
        // second ejection doubles
        for _ in 0..2 {
            h.record_failure(1200, &p);
        }
        assert!(h.record_failure(1200, &p));
        assert!(!h.is_available(3199));
        assert!(h.is_available(3200));
        // success resets the back-off
        h.record_success();
        for _ in 0..3 {
            h.record_failure(5000, &p);
        }
        assert!(h.is_available(6000));
    }
}
