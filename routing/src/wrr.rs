//! Smooth weighted round robin (the nginx algorithm): over any window of `Σw` picks each
//! item is chosen exactly `w` times, spread evenly. The state is per caller (the gateway
//! keeps one per worker and cell), so picking takes no lock.

/// Smooth WRR state for one set of items.
#[derive(Clone, Debug, Default)]
pub struct SmoothWrr {
    current: Vec<i64>,
}

impl SmoothWrr {
    /// Pick among `n` items; `weight(i)` is item i's weight, 0 meaning not eligible.
    /// `None` when no item has a positive weight.
    #[inline]
    pub fn pick(&mut self, n: usize, mut weight: impl FnMut(usize) -> u32) -> Option<usize> {
        if self.current.len() != n {
            self.current.clear();
            self.current.resize(n, 0);
        }
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        let mut best_val = i64::MIN;
        for (i, cur) in self.current.iter_mut().enumerate() {
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
        self.current[b] -= total;
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
