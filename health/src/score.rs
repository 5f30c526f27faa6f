//! Scores and weights: a probe's watermarks → score in [floor, 1]; score and RTT → effective
//! weight by `base × score × (1 + α·e^(−β·rtt_ms))`.

use crate::policy::{Watermark, WeightPolicy};

/// Score from watermark values: each watermark over its `soft` value lowers the score
/// linearly, reaching `floor` at `hard`; several multiply.
pub fn watermark_score(values: &[(String, f64)], thresholds: &[Watermark], floor: f64) -> f64 {
    let floor = floor.clamp(0.0, 1.0);
    let mut score = 1.0;
    for t in thresholds {
        let Some((_, v)) = values.iter().find(|(n, _)| *n == t.name) else {
            continue;
        };
        let f = if *v <= t.soft {
            1.0
        } else if *v >= t.hard || t.hard <= t.soft {
            floor
        } else {
            1.0 - (1.0 - floor) * (v - t.soft) / (t.hard - t.soft)
        };
        score *= f;
    }
    score.clamp(floor.min(1.0), 1.0)
}

/// The SPEC's effective weight; an unknown RTT counts as 0 ms' worth of bonus withheld
/// (factor 1) so a fresh instance is not favoured over measured ones.
pub fn effective_weight(base: f64, score: f64, rtt_ms: Option<f64>, w: &WeightPolicy) -> f64 {
    let rtt_factor = match rtt_ms {
        Some(ms) => 1.0 + w.alpha * (-w.beta * ms.max(0.0)).exp(),
        None => 1.0 + w.alpha * (-w.beta * 50.0f64).exp(),
    };
    base * score.clamp(0.0, 1.0) * rtt_factor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_matches_the_spec() {
        let w = WeightPolicy::default();
        let e = effective_weight(100.0, 1.0, Some(0.0), &w);
        assert!((e - 150.0).abs() < 1e-9);
        let e = effective_weight(100.0, 0.5, Some(50.0), &w);
        assert!((e - 50.0 * (1.0 + 0.5 * (-1.0f64).exp())).abs() < 1e-9);
    }

    #[test]
    fn watermarks_lower_the_score_linearly() {
        let t = vec![Watermark {
            name: "db_pool_usage".into(),
            soft: 0.7,
            hard: 0.95,
        }];
        let s = |v: f64| watermark_score(&[("db_pool_usage".into(), v)], &t, 0.1);
        assert_eq!(s(0.5), 1.0);
        assert!((s(0.825) - 0.55).abs() < 1e-9);
        assert_eq!(s(0.99), 0.1);
        assert_eq!(watermark_score(&[], &t, 0.1), 1.0);
    }
}
