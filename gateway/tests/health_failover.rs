//! Health that moves traffic: hard failover (instances refuse), soft failover (error rate
//! over the threshold), return after the dwell time, and no flapping.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;

const FAST_HEALTH: &str = "admin: { token: t0ken }
health:
  probe: { interval: 200ms, timeout: 300ms, rise: 2, fall: 2 }
  failover: { window: 2s, min_requests: 20, min_dwell: 3s, recover_probes: 2 }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_instances_fail_over_within_a_second_with_no_failed_request_and_return_after_the_dwell(
) {
    let (a1, a2, b1) = (
        upstream("a", "a-1"),
        upstream("a", "a-2"),
        upstream("b", "b-1"),
    );
    let yaml = config_yaml(
        &[
            cell("a", "r1", &["b"], &[("a-1", a1.addr), ("a-2", a2.addr)]),
            cell("b", "r1", &["a"], &[("b-1", b1.addr)]),
        ],
        FAST_HEALTH,
    );
    let dir = TempDir::new("hard");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let table = table_of(&yaml);
    let a_keys = keys_in(&table, "a", 20);
    let mut keys = a_keys.clone();
    keys.extend(keys_in(&table, "b", 20));
    let load = Load::start(gw.addr, keys, 4, Duration::from_secs(40), &[]);
    assert!(
        load.wait_for(Duration::from_secs(10), |s| s.len() > 200)
            .await
    );

    let refused_at = Instant::now();
    fault(a1.addr, r#"{"refuse_for_s": 4}"#).await;
    fault(a2.addr, r#"{"refuse_for_s": 4}"#).await;
    assert!(
        gw.wait_log("cell failed over", Duration::from_secs(3))
            .await
    );
    // While health holds it: the table shows it failed over (configured active), and a
    // restore says health holds it instead of answering "applied: false" and nothing else.
    let admin = gw.admin_addr.unwrap().to_string();
    let t = cellgate::ctl::call(
        &admin,
        Some("t0ken"),
        http::Method::GET,
        "/admin/table",
        None,
    )
    .await
    .unwrap();
    let a = t["cells"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "a")
        .unwrap()
        .clone();
    assert_eq!(
        (a["state"].as_str(), a["configured_state"].as_str()),
        (Some("failed_over"), Some("active")),
        "{a}"
    );
    match cellgate::ctl::call(
        &admin,
        Some("t0ken"),
        http::Method::POST,
        "/admin/cells/a/restore",
        None,
    )
    .await
    {
        Err(cellgate::ctl::CtlError::Status { status, message }) => {
            assert_eq!(status, http::StatusCode::CONFLICT);
            assert!(message.contains("failed over by health"), "{message}");
        }
        other => panic!("restore of a cell health holds: {other:?}"),
    }
    // Keys go home again after the instances return and the dwell time has passed.
    let home_again = load
        .wait_for(Duration::from_secs(20), |s| {
            s.iter().any(|x| {
                x.at > refused_at + Duration::from_secs(3)
                    && a_keys.contains(&x.key)
                    && x.cell == "a"
            })
        })
        .await;
    let samples = load.stop().await;
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        samples.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(home_again, "a's keys did not return to a");

    let a_after: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at > refused_at && a_keys.contains(&s.key))
        .collect();
    let last_on_a_before_return = a_after
        .iter()
        .filter(|s| s.cell == "a" && s.at < refused_at + Duration::from_secs(3))
        .map(|s| s.at - refused_at)
        .max();
    assert!(
        last_on_a_before_return.is_none_or(|d| d < Duration::from_secs(1)),
        "a's keys still served by a {last_on_a_before_return:?} after the refusal"
    );
    let on_b = a_after.iter().filter(|s| s.cell == "b").count();
    assert!(on_b > 20, "a's keys were served by b ({on_b})");
    let first_home = a_after
        .iter()
        .filter(|s| s.cell == "a" && s.at > refused_at + Duration::from_secs(1))
        .map(|s| s.at - refused_at)
        .min()
        .unwrap();
    assert!(
        first_home >= Duration::from_secs(3),
        "returned after {first_home:?}, before the 3 s dwell"
    );
    assert!(gw.logs_contain("cell failed over") && gw.logs_contain("cell returned to service"));
    // Both switches are audit events with their reason and duration.
    let a = get(
        gw.admin_addr.unwrap(),
        "/admin/audit?limit=50",
        &[("authorization", "Bearer t0ken")],
    )
    .await;
    let events = a.json()["events"].as_array().unwrap().clone();
    let find = |action: &str| {
        events
            .iter()
            .find(|e| e["action"] == action && e["target"] == "a")
            .cloned()
    };
    let out = find("failed_over").expect("failover audited");
    assert!(out["plan"]["reason"]
        .as_str()
        .unwrap()
        .contains("no instance is available"));
    assert!(out["duration_ms"].as_f64().unwrap() >= 0.0);
    let back = find("returned").expect("return audited");
    assert!(
        back["plan"]["failed_over_ms"].as_u64().unwrap() >= 3_000,
        "{back}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_percent_errors_fail_a_cell_over_within_window_plus_three_seconds() {
    let (a1, b1) = (upstream("a", "a-1"), upstream("b", "b-1"));
    let yaml = config_yaml(
        &[cell("a", "r1", &["b"], &[("a-1", a1.addr)]), cell("b", "r1", &["a"], &[("b-1", b1.addr)])],
        "health:\n  probe: { interval: 200ms }\n  failover: { window: 2s, min_requests: 50, min_dwell: 60s }\n",
    );
    let dir = TempDir::new("soft2");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let a_keys = keys_in(&table_of(&yaml), "a", 30);
    let load = Load::start(gw.addr, a_keys, 4, Duration::from_secs(30), &[]);
    assert!(
        load.wait_for(Duration::from_secs(10), |s| s.len() > 200)
            .await
    );
    let t0 = Instant::now();
    fault(a1.addr, r#"{"error_rate": 0.05, "status": 503}"#).await;
    let moved = load
        .wait_for(Duration::from_secs(8), |s| {
            s.iter().any(|x| x.at > t0 && x.cell == "b")
        })
        .await;
    let took = t0.elapsed();
    let samples = load.stop().await;
    assert!(moved, "cell a never failed over");
    assert!(
        took <= Duration::from_secs(5),
        "failed over {took:?} after the errors began (window 2 s + 3 s)"
    );
    let first_b = samples
        .iter()
        .filter(|s| s.at > t0 && s.cell == "b")
        .map(|s| s.at)
        .min()
        .unwrap();
    assert!(
        samples
            .iter()
            .filter(|s| s.at > first_b + Duration::from_millis(300))
            .all(|s| s.cell == "b"),
        "all of a's keys moved"
    );
    assert!(
        gw.wait_log("error ratio", Duration::from_secs(5)).await,
        "the switch names its reason"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_default_30s_window_five_percent_switches_and_point_two_percent_never_does() {
    let (a1, c1, b1) = (
        upstream("a", "a-1"),
        upstream("c", "c-1"),
        upstream("b", "b-1"),
    );
    let yaml = config_yaml(
        &[
            cell("a", "r1", &["b"], &[("a-1", a1.addr)]),
            cell("c", "r1", &["b"], &[("c-1", c1.addr)]),
            cell("b", "r1", &[], &[("b-1", b1.addr)]),
        ],
        "health:\n  retry: { statuses: [] }\n",
    );
    let dir = TempDir::new("soft30");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let table = table_of(&yaml);
    let a_keys = keys_in(&table, "a", 30);
    let mut keys = a_keys.clone();
    let c_keys = keys_in(&table, "c", 30);
    keys.extend(c_keys.clone());
    fault(c1.addr, r#"{"error_rate": 0.002, "status": 503}"#).await;
    let load = Load::start(gw.addr, keys, 4, Duration::from_secs(60), &[]);
    assert!(
        load.wait_for(Duration::from_secs(10), |s| s.len() > 500)
            .await
    );
    let t0 = Instant::now();
    fault(a1.addr, r#"{"error_rate": 0.05, "status": 503}"#).await;
    let moved = load
        .wait_for(Duration::from_secs(40), |s| {
            s.iter()
                .any(|x| x.at > t0 && a_keys.contains(&x.key) && x.cell == "b")
        })
        .await;
    let took = t0.elapsed();
    // Keep the 0.2 % cell under load a while longer.
    let until = Instant::now() + Duration::from_secs(5);
    load.wait_for(Duration::from_secs(6), |_| Instant::now() >= until)
        .await;
    let samples = load.stop().await;
    assert!(
        moved && took <= Duration::from_secs(33),
        "a failed over after {took:?} (window 30 s + 3 s)"
    );
    let c_total = samples.iter().filter(|s| c_keys.contains(&s.key)).count();
    let c_moved = samples
        .iter()
        .filter(|s| c_keys.contains(&s.key) && s.cell != "c")
        .count();
    assert!(c_total > 2_000, "enough traffic on c ({c_total})");
    let odd: Vec<(u16, &str)> = samples
        .iter()
        .filter(|s| c_keys.contains(&s.key) && s.cell != "c")
        .map(|s| (s.status, s.cell.as_str()))
        .take(5)
        .collect();
    assert_eq!(c_moved, 0, "the 0.2 % cell was switched: {odd:?}");
    assert!(!gw.logs_contain("\"cell\":\"c\""), "no event for cell c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_instance_causes_at_most_one_switch_per_dwell_time() {
    let (a1, a2, b1) = (
        upstream("a", "a-1"),
        upstream("a", "a-2"),
        upstream("b", "b-1"),
    );
    let yaml = config_yaml(
        &[cell("a", "r1", &["b"], &[("a-1", a1.addr), ("a-2", a2.addr)]), cell("b", "r1", &["a"], &[("b-1", b1.addr)])],
        "health:\n  probe: { interval: 200ms, timeout: 300ms, rise: 1, fall: 1 }\n  outlier: { base_ejection: 500ms }\n  failover: { window: 2s, min_requests: 20, min_dwell: 4s, error_ratio: 0.001 }\n",
    );
    let dir = TempDir::new("flap");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let load = Load::start(
        gw.addr,
        keys_in(&table_of(&yaml), "a", 20),
        4,
        Duration::from_secs(40),
        &[],
    );
    assert!(
        load.wait_for(Duration::from_secs(10), |s| s.len() > 100)
            .await
    );
    let start = Instant::now();
    // a-1 is down 2 s, up 2 s, four times (16 s).
    for _ in 0..4 {
        fault(a1.addr, r#"{"refuse_for_s": 2}"#).await;
        let t = Instant::now();
        load.wait_for(Duration::from_secs(5), |_| {
            t.elapsed() >= Duration::from_secs(4)
        })
        .await;
    }
    let elapsed = start.elapsed();
    let samples = load.stop().await;
    let failed = samples.iter().filter(|s| s.status != 200).count();
    assert_eq!(failed, 0, "requests failed while an instance flapped");
    let switches = gw.count_logs("cell failed over");
    let allowed = (elapsed.as_secs_f64() / 4.0).ceil() as usize;
    assert!(
        switches <= allowed,
        "{switches} switches in {elapsed:?} with a 4 s dwell"
    );
}
