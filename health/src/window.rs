//! Sliding windows of outcomes: a ring of buckets of equal width, updated with atomics from
//! the request path. Reading sums the buckets that are still inside the span. A bucket that
//! is reused for a newer period is reset by whoever gets there first; a racing update can
//! be lost or land in the fresh bucket — a few counts in a window of thousands, which the
//! thresholds tolerate. Never locks, never allocates after creation.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const BUCKETS: usize = 20;

#[derive(Debug, Default)]
struct Bucket {
    epoch: AtomicU64,
    ok: AtomicU32,
    fail: AtomicU32,
}

/// A sliding window over `span_ms`, in 20 buckets.
#[derive(Debug)]
pub struct Window {
    width_ms: AtomicU64,
    buckets: [Bucket; BUCKETS],
}

/// What a window holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Successful outcomes.
    pub ok: u64,
    /// Failed outcomes.
    pub fail: u64,
}

impl Counts {
    /// All outcomes.
    pub fn total(&self) -> u64 {
        self.ok + self.fail
    }
    /// Failure ratio (0 when empty).
    pub fn failure_ratio(&self) -> f64 {
        if self.total() == 0 {
            0.0
        } else {
            self.fail as f64 / self.total() as f64
        }
    }
}

impl Default for Window {
    fn default() -> Self {
        Self::new(10_000)
    }
}

impl Window {
    /// A window over `span_ms` milliseconds.
    pub fn new(span_ms: u64) -> Self {
        Self {
            width_ms: AtomicU64::new((span_ms / BUCKETS as u64).max(1)),
            buckets: Default::default(),
        }
    }

    /// Re-span the window (a reload changed the setting); clears it when the span changes.
    pub fn set_span(&self, span_ms: u64) {
        let w = (span_ms / BUCKETS as u64).max(1);
        if self.width_ms.swap(w, Ordering::Relaxed) != w {
            self.clear();
        }
    }

    /// Forget everything.
    pub fn clear(&self) {
        for b in &self.buckets {
            b.epoch.store(0, Ordering::Relaxed);
            b.ok.store(0, Ordering::Relaxed);
            b.fail.store(0, Ordering::Relaxed);
        }
    }

    /// Count one outcome at `now`.
    #[inline]
    pub fn record(&self, now: u64, failed: bool) {
        let width = self.width_ms.load(Ordering::Relaxed);
        let epoch = now / width + 1;
        let b = &self.buckets[(epoch % BUCKETS as u64) as usize];
        if b.epoch.load(Ordering::Relaxed) != epoch
            && b.epoch.swap(epoch, Ordering::Relaxed) != epoch
        {
            b.ok.store(0, Ordering::Relaxed);
            b.fail.store(0, Ordering::Relaxed);
        }
        if failed {
            b.fail.fetch_add(1, Ordering::Relaxed);
        } else {
            b.ok.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Outcomes inside the span ending at `now`.
    pub fn counts(&self, now: u64) -> Counts {
        let width = self.width_ms.load(Ordering::Relaxed);
        let current = now / width + 1;
        let oldest = current.saturating_sub(BUCKETS as u64 - 1);
        let mut c = Counts::default();
        for b in &self.buckets {
            let e = b.epoch.load(Ordering::Relaxed);
            if e >= oldest && e <= current {
                c.ok += u64::from(b.ok.load(Ordering::Relaxed));
                c.fail += u64::from(b.fail.load(Ordering::Relaxed));
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_slide_out_after_the_span() {
        let w = Window::new(2_000); // 100 ms buckets
        for t in 0..10 {
            w.record(1_000 + t * 10, t % 5 == 0);
        }
        assert_eq!(w.counts(1_100), Counts { ok: 8, fail: 2 });
        assert_eq!(w.counts(2_900), Counts { ok: 8, fail: 2 });
        assert_eq!(w.counts(3_200), Counts::default());
        w.record(3_200, true);
        assert_eq!(w.counts(3_200), Counts { ok: 0, fail: 1 });
        w.set_span(30_000);
        assert_eq!(w.counts(3_200), Counts::default());
    }

    #[test]
    fn reused_buckets_are_reset() {
        let w = Window::new(2_000);
        w.record(0, true);
        w.record(2_000, false);
        assert_eq!(w.counts(2_000), Counts { ok: 1, fail: 0 });
    }
}

/// Upper bounds (ms) of the latency bins; the last bin is everything slower.
pub const LATENCY_BINS_MS: [u64; 15] = [
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 30_000, 60_000,
];

#[derive(Debug, Default)]
struct LatencyBucket {
    epoch: AtomicU64,
    bins: [AtomicU32; LATENCY_BINS_MS.len() + 1],
}

/// A sliding window of latencies in coarse bins (for p95 comparisons), 20 time buckets.
#[derive(Debug)]
pub struct LatencyWindow {
    width_ms: AtomicU64,
    buckets: [LatencyBucket; BUCKETS],
}

impl Default for LatencyWindow {
    fn default() -> Self {
        Self {
            width_ms: AtomicU64::new(500),
            buckets: Default::default(),
        }
    }
}

impl LatencyWindow {
    /// Re-span the window (clears it when the span changes).
    pub fn set_span(&self, span_ms: u64) {
        let w = (span_ms / BUCKETS as u64).max(1);
        if self.width_ms.swap(w, Ordering::Relaxed) != w {
            for b in &self.buckets {
                b.epoch.store(0, Ordering::Relaxed);
                for x in &b.bins {
                    x.store(0, Ordering::Relaxed);
                }
            }
        }
    }

    /// Record one latency at `now`.
    #[inline]
    pub fn record(&self, now: u64, latency_us: u64) {
        let width = self.width_ms.load(Ordering::Relaxed);
        let epoch = now / width + 1;
        let b = &self.buckets[(epoch % BUCKETS as u64) as usize];
        if b.epoch.load(Ordering::Relaxed) != epoch
            && b.epoch.swap(epoch, Ordering::Relaxed) != epoch
        {
            for x in &b.bins {
                x.store(0, Ordering::Relaxed);
            }
        }
        let ms = latency_us / 1000;
        let i = LATENCY_BINS_MS
            .iter()
            .position(|&ub| ms < ub)
            .unwrap_or(LATENCY_BINS_MS.len());
        b.bins[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Add this window's bins at `now` into `into`.
    pub fn add_bins(&self, now: u64, into: &mut [u64; LATENCY_BINS_MS.len() + 1]) {
        let width = self.width_ms.load(Ordering::Relaxed);
        let current = now / width + 1;
        let oldest = current.saturating_sub(BUCKETS as u64 - 1);
        for b in &self.buckets {
            let e = b.epoch.load(Ordering::Relaxed);
            if e >= oldest && e <= current {
                for (i, x) in b.bins.iter().enumerate() {
                    into[i] += u64::from(x.load(Ordering::Relaxed));
                }
            }
        }
    }
}

/// The p-quantile (0–1) of binned latencies, as the upper bound of its bin in ms
/// (`None` when empty; the open last bin reads as twice the last bound).
pub fn quantile_ms(bins: &[u64; LATENCY_BINS_MS.len() + 1], q: f64) -> Option<u64> {
    let total: u64 = bins.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in bins.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(
                LATENCY_BINS_MS
                    .get(i)
                    .copied()
                    .unwrap_or(LATENCY_BINS_MS[LATENCY_BINS_MS.len() - 1] * 2),
            );
        }
    }
    None
}

#[cfg(test)]
mod latency_tests {
    use super::*;

    #[test]
    fn p95_of_binned_latencies() {
        let w = LatencyWindow::default();
        w.set_span(10_000);
        for i in 0..100u64 {
            w.record(1_000, if i < 94 { 3_000 } else { 150_000 });
        }
        let mut bins = [0u64; LATENCY_BINS_MS.len() + 1];
        w.add_bins(1_000, &mut bins);
        assert_eq!(quantile_ms(&bins, 0.95), Some(200));
        assert_eq!(quantile_ms(&bins, 0.5), Some(5));
        let mut empty = [0u64; LATENCY_BINS_MS.len() + 1];
        w.add_bins(100_000, &mut empty);
        assert_eq!(quantile_ms(&empty, 0.95), None);
    }
}
