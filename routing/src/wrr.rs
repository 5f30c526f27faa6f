//! Smooth weighted round robin (the nginx algorithm): over any window of `Σw` picks each
//! item is chosen exactly `w` times, spread evenly. The state is per caller (the gateway
//! keeps one per worker and cell), so picking takes no lock.

/// Items whose positions live inline, without a heap allocation to follow.
const INLINE: usize = 4;

/// Smooth WRR state for one set of items: one cache line for up to [`INLINE`] items.
#[derive(Clone, Debug, Default)]
#[repr(align(64))]
pub struct SmoothWrr {
    n: usize,
    small: [i64; INLINE],
    large: Vec<i64>,
}

impl SmoothWrr {
    /// Pick among `n` items; `weight(i)` is item i's weight, 0 meaning not eligible.
    /// `None` when no item has a positive weight.
    #[inline]
    pub fn pick(&mut self, n: usize, mut weight: impl FnMut(usize) -> u32) -> Option<usize> {
        if self.n != n {
            self.n = n;
            self.small = [0; INLINE];
            self.large.clear();
            if n > INLINE {
                self.large.resize(n, 0);
            }
        }
        let current = if n <= INLINE {
            &mut self.small[..n]
        } else {
            &mut self.large[..]
        };
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        let mut best_val = i64::MIN;
        for (i, cur) in current.iter_mut().enumerate() {
            let w = i64::from(weight(i));
            if w == 0 {
                continue;
            }
            *cur += w;
            total += w;
            if *cur > best_val {
                best_val = *cur;
                best = Some(i);
            }
        }
        let b = best?;
        current[b] -= total;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_sequence() {
        // weights 5,1,1 → a a b a c a a (nginx's documented smooth order)
        let w = [5u32, 1, 1];
        let mut s = SmoothWrr::default();
        let seq: Vec<usize> = (0..7).filter_map(|_| s.pick(3, |i| w[i])).collect();
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn skips_ineligible_and_handles_none() {
        let mut s = SmoothWrr::default();
        assert_eq!(s.pick(3, |_| 0), None);
        for _ in 0..10 {
            assert_eq!(s.pick(3, |i| if i == 1 { 2 } else { 0 }), Some(1));
        }
    }

    #[test]
    fn more_items_than_fit_inline() {
        let w: Vec<u32> = (1..=20).collect();
        let total: u32 = w.iter().sum();
        let mut s = SmoothWrr::default();
        let mut counts = vec![0u32; w.len()];
        for _ in 0..total {
            counts[s.pick(w.len(), |i| w[i]).expect("positive")] += 1;
        }
        assert_eq!(counts, w);
        // Shrinking the set starts over with the inline positions.
        assert_eq!(s.pick(2, |i| [0, 3][i]), Some(1));
    }

    proptest::proptest! {
        #[test]
        fn exact_shares_over_a_window(ws in proptest::collection::vec(0u32..20, 1..8)) {
            let total: u32 = ws.iter().sum();
            proptest::prop_assume!(total > 0);
            let mut s = SmoothWrr::default();
            let mut counts = vec![0u32; ws.len()];
            for _ in 0..total {
                let i = s.pick(ws.len(), |i| ws[i]).expect("positive total");
                counts[i] += 1;
            }
            proptest::prop_assert_eq!(counts, ws);
        }
    }
}
