//! Effective weights: watermarks over their threshold lower an instance's share in
//! proportion to its score, and RTT differences change the split as
//! `base × score × (1 + α·e^(−β·rtt_ms))` predicts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;

fn rtt_factor(ms: f64) -> f64 {
    1.0 + 0.5 * (-0.02 * ms).exp()
}

/// Share of `instance` over `n` requests spread on `clients` connections, measured until it
/// is within ±5 % of `want` (bounded: the probes and RTT averages need a moment to settle).
async fn converges(
    gw: &Gateway,
    keys: &[String],
    instance: &str,
    want: f64,
    n: usize,
) -> (bool, Vec<f64>) {
    let mut seen = Vec::new();
    for _ in 0..8 {
        let load = Load::start(gw.addr, keys.to_vec(), 8, Duration::from_secs(60), &[]);
        load.wait_for(Duration::from_secs(60), |s| s.len() >= n)
            .await;
        let samples = load.stop().await;
        assert!(samples.iter().all(|s| s.status == 200));
        let share =
            samples.iter().filter(|s| s.instance == instance).count() as f64 / samples.len() as f64;
        seen.push(share);
        eprintln!("{instance}: share {share:.4}, want {want:.4}");
        if (share - want).abs() <= 0.05 * want {
            return (true, seen);
        }
    }
    (false, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watermarks_and_rtt_set_the_split_the_formula_predicts() {
    let (a1, a2) = (upstream("a", "a-1"), upstream("a", "a-2"));
    let yaml = config_yaml(
        &[cell("a", "r1", &[], &[("a-1", a1.addr), ("a-2", a2.addr)])],
        "health:
  probe: { interval: 100ms, timeout: 1s, watermarks: { db_pool_usage: { soft: 0.7, hard: 0.95 } } }
  outlier: { slow_start: 0s }
",
    );
    let dir = TempDir::new("weights");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let keys: Vec<String> = (0..50).map(|i| format!("w{i}")).collect();

    // Equal instances: an even split.
    let (ok, seen) = converges(&gw, &keys, "a-2", 0.5, 600).await;
    assert!(ok, "even split expected, saw {seen:?}");

    // db_pool_usage 0.825 is halfway from soft to hard: score 1 − 0.9 × 0.5 = 0.55.
    fault(a2.addr, r#"{"db_pool_usage": 0.825}"#).await;
    let want = 0.55 / (1.0 + 0.55);
    let (ok, seen) = converges(&gw, &keys, "a-2", want, 1000).await;
    assert!(ok, "a-2 should get {want:.3} of requests, saw {seen:?}");

    // RTT: a-2 answers 60 ms late; a-1 in about 1 ms.
    fault(a2.addr, "{}").await;
    fault(a2.addr, r#"{"delay_ms": 60}"#).await;
    let want = rtt_factor(61.0) / (rtt_factor(1.0) + rtt_factor(61.0));
    let (ok, seen) = converges(&gw, &keys, "a-2", want, 500).await;
    assert!(
        ok,
        "a-2 should get {want:.3} of requests with a 60 ms RTT, saw {seen:?}"
    );
}
