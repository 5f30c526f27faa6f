//! Circuit breakers, health state across reloads, and load shedding by SLO class.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_at_ratio_and_volume_answers_503_fast_then_half_opens_and_closes() {
    let (a1, b1) = (upstream("a", "a-1"), upstream("b", "b-1"));
    let yaml = config_yaml(
        &[cell("a", "r1", &[], &[("a-1", a1.addr)]), cell("b", "r1", &[], &[("b-1", b1.addr)])],
        "health:
  breaker: { failure_ratio: 0.6, min_requests: 20, window: 10s, open_for: 2s, half_open_successes: 3 }
  outlier: { consecutive_failures: 100000, failure_ratio: 1.0, min_requests: 100000 }
  failover: { min_requests: 100000, min_dwell: 500ms }
  retry: { statuses: [] }
  probe: { interval: 100ms }
",
    );
    let dir = TempDir::new("breaker");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let table = table_of(&yaml);
    let ka = keys_in(&table, "a", 1).remove(0);
    let kb = keys_in(&table, "b", 1).remove(0);
    let mut c = H1::connect(gw.addr).await;

    // Below the ratio: 30 % failures over 60 requests never opens it.
    fault(b1.addr, r#"{"error_rate": 0.3, "status": 500}"#).await;
    for _ in 0..60 {
        let r = c.get("/", &[("x-user-id", &kb)]).await;
        assert!(
            r.status == 200 || r.json()["error"] == "injected fault",
            "breaker must stay closed: {:?}",
            r.body
        );
    }

    // 100 % failures: the 20th request opens it (volume 20, ratio ≥ 60 %).
    fault(a1.addr, r#"{"error_rate": 1.0, "status": 500}"#).await;
    for i in 1..=20 {
        let r = c.get("/", &[("x-user-id", &ka)]).await;
        assert_eq!(r.status, 500, "request {i} reaches the upstream");
        assert_eq!(r.json()["error"], "injected fault");
    }
    let opened = Instant::now();
    let t = Instant::now();
    let r = c.get("/", &[("x-user-id", &ka)]).await;
    assert_eq!(r.status, 503, "open breaker: {:?}", r.body);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("no healthy cell"));
    assert!(r.json()["request_id"].is_string());
    assert!(t.elapsed() < Duration::from_millis(100), "answered fast");
    assert!(gw.logs_contain("cell breaker changed state"));

    // Half-open after the open time; successes close it.
    fault(a1.addr, "{}").await;
    let mut first_ok = None;
    for _ in 0..200 {
        let r = c.get("/", &[("x-user-id", &ka)]).await;
        if r.status == 200 {
            first_ok = Some(opened.elapsed());
            break;
        }
        assert_eq!(r.status, 503);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let first_ok = first_ok.expect("the breaker half-opened");
    assert!(
        first_ok >= Duration::from_millis(1900),
        "half-opened after {first_ok:?}, before open_for 2 s"
    );
    for _ in 0..20 {
        assert_eq!(
            c.get("/", &[("x-user-id", &ka)]).await.status,
            200,
            "closed again"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_during_an_ejection_keeps_the_instance_ejected_and_the_cell_failed_over() {
    let (a1, a2, b1) = (
        upstream("a", "a-1"),
        upstream("a", "a-2"),
        upstream("b", "b-1"),
    );
    let health = "health:
  probe: { interval: 60s }
  outlier: { base_ejection: 30s }
  failover: { min_dwell: 60s }
";
    let yaml = |w: u32| {
        let mut y = config_yaml(
            &[
                cell("a", "r1", &["b"], &[("a-1", a1.addr), ("a-2", a2.addr)]),
                cell("b", "r1", &["a"], &[("b-1", b1.addr)]),
            ],
            health,
        );
        y.push_str(&format!("# edit {w}\n"));
        y
    };
    let dir = TempDir::new("reload-eject");
    std::fs::write(dir.path("c.yaml"), yaml(1)).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let table = table_of(&yaml(1));
    let ka = keys_in(&table, "a", 10);
    let kb = keys_in(&table, "b", 5);

    // a-1 refuses briefly (ejected for 30 s); b-1 refuses for a minute (b fails over to a).
    fault(a1.addr, r#"{"refuse_for_s": 1}"#).await;
    fault(b1.addr, r#"{"refuse_for_s": 60}"#).await;
    wait_refusing(a1.addr).await;
    wait_refusing(b1.addr).await;
    let mut c = H1::connect(gw.addr).await;
    for k in ka.iter().chain(kb.iter()).cycle().take(40) {
        assert_eq!(c.get("/", &[("x-user-id", k)]).await.status, 200);
    }
    assert!(
        gw.wait_log("cell failed over", Duration::from_secs(5))
            .await
    );
    let before = c.get("/", &[("x-user-id", &kb[0])]).await;
    assert_eq!(before.header("x-cell-id"), Some("a"));

    // Reload (a trivial edit): a new table version, same health.
    std::fs::write(dir.path("c.yaml"), yaml(2)).unwrap();
    assert!(
        gw.wait_log("configuration reloaded", Duration::from_secs(5))
            .await
    );
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        let r = c.get("/", &[("x-user-id", &ka[0])]).await;
        if r.echoed("x-routing-version").as_deref() != before.echoed("x-routing-version").as_deref()
        {
            break;
        }
    }
    for k in ka.iter().cycle().take(30) {
        let r = c.get("/", &[("x-user-id", k)]).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.json()["instance"],
            "a-2",
            "a-1 stays ejected across the reload"
        );
    }
    for k in &kb {
        assert_eq!(
            c.get("/", &[("x-user-id", k)]).await.header("x-cell-id"),
            Some("a"),
            "b stays failed over across the reload"
        );
    }
    assert!(!gw.logs_contain("cell returned to service"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_overload_best_effort_is_shed_before_any_critical_request() {
    let a1 = upstream("a", "a-1");
    fault(a1.addr, r#"{"delay_ms": 1500}"#).await;
    let yaml = config_yaml(
        &[cell("a", "r1", &[], &[("a-1", a1.addr)])],
        "shedding: { max_in_flight: 10, standard_at: 0.8, best_effort_at: 0.5 }\nhealth:\n  probe: { kind: tcp }\n",
    );
    let dir = TempDir::new("shed");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let fire = |class: &'static str, n: usize| {
        (0..n)
            .map(|i| {
                let addr = gw.addr;
                tokio::spawn(async move {
                    let key = format!("{class}-{i}");
                    get(addr, "/", &[("x-user-id", &key), ("x-slo-class", class)]).await
                })
            })
            .collect::<Vec<_>>()
    };
    // Phase by phase, each waiting for its shed answers (which come at once; admitted
    // requests stay in flight for 1.5 s): best-effort fills to 5 (0.5 × 10), standard to
    // 8 (0.8 × 10), critical to 10.
    let (be_shed, be_rest) = shed_answers(fire("best-effort", 12), 7).await;
    let (st_shed, st_rest) = shed_answers(fire("standard", 4), 1).await;
    let (cr_shed, cr_rest) = shed_answers(fire("critical", 2), 0).await;
    assert_eq!(
        (be_shed, st_shed, cr_shed),
        (7, 1, 0),
        "shed counts per class"
    );
    for (class, rest, n) in [
        ("best-effort", be_rest, 5),
        ("standard", st_rest, 3),
        ("critical", cr_rest, 2),
    ] {
        assert_eq!(rest.len(), n, "{class} admitted");
        for h in rest {
            let r = h.await.unwrap();
            assert_eq!(r.status, 200, "{class} admitted and served: {:?}", r.body);
        }
    }
}

/// Wait (bounded) until `n` of `handles` have answered 429; returns how many answered 429
/// and the handles still running (they must not have answered anything else yet).
async fn shed_answers(
    handles: Vec<tokio::task::JoinHandle<Resp>>,
    n: usize,
) -> (usize, Vec<tokio::task::JoinHandle<Resp>>) {
    let mut pending = handles;
    let mut shed = 0;
    let end = Instant::now() + Duration::from_secs(1);
    loop {
        let mut still = Vec::new();
        for h in pending {
            if h.is_finished() {
                let r = h.await.unwrap();
                assert_eq!(
                    r.status, 429,
                    "only shed requests answer this early: {:?}",
                    r.body
                );
                assert!(r.json()["error"].as_str().unwrap().contains("shed"));
                shed += 1;
            } else {
                still.push(h);
            }
        }
        pending = still;
        if shed >= n && (n > 0 || Instant::now() + Duration::from_millis(900) > end)
            || Instant::now() > end
        {
            return (shed, pending);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
