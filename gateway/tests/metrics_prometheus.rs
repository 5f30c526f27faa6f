//! `/metrics` after a load run: parsed by the reference Prometheus text parser, holding every
//! series of SPEC §8 with values that match the traffic sent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const PARSER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/prom/parse.py");

fn parse(text: &str) -> serde_json::Value {
    let mut child = Command::new("python3")
        .arg(PARSER)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 with prometheus-client (the test command installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "not valid Prometheus text: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sum(m: &serde_json::Value, family: &str, sample: &str, filter: &[(&str, &str)]) -> f64 {
    m[family]["samples"]
        .as_array()
        .unwrap_or_else(|| panic!("family {family} missing"))
        .iter()
        .filter(|s| s[0] == sample && filter.iter().all(|(k, v)| s[1][*k] == *v))
        .map(|s| s[2].as_f64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_match_the_traffic_sent() {
    let (a1, b1, c1) = (
        upstream("a", "a-1"),
        upstream("b", "b-1"),
        upstream("c", "c-1"),
    );
    let yaml = config_yaml(
        &[
            cell("a", "r1", &[], &[("a-1", a1.addr)]),
            cell("b", "r1", &["c"], &[("b-1", b1.addr)]),
            cell("c", "r1", &[], &[("c-1", c1.addr)]),
        ],
        "routing:\n  anonymous: { policy: reject }\nhealth:\n  retry: { statuses: [] }\n  outlier: { consecutive_failures: 100000, min_requests: 100000 }\n",
    );
    let dir = TempDir::new("metrics");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let table = table_of(&yaml);
    let ka = keys_in(&table, "a", 50);
    let kb = keys_in(&table, "b", 50);

    // 1500 requests to a, of which the upstream fails 10 % with 500; 500 to b; 100 without a key.
    fault(a1.addr, r#"{"error_rate": 0.1, "status": 500}"#).await;
    let mut c = H1::connect(gw.addr).await;
    let (mut a_ok, mut a_5xx) = (0, 0);
    for i in 0..1500 {
        let r = c.get("/", &[("x-user-id", &ka[i % ka.len()])]).await;
        assert_eq!(r.header("x-cell-id"), Some("a"));
        if r.status == 200 {
            a_ok += 1
        } else {
            a_5xx += 1
        }
    }
    for i in 0..500 {
        assert_eq!(
            c.get("/", &[("x-user-id", &kb[i % kb.len()])]).await.status,
            200
        );
    }
    for _ in 0..100 {
        assert_eq!(c.get("/", &[]).await.status, 400);
    }
    // 20 refused by the guard before routing (a request target over `max_uri_bytes`; the
    // gateway closes such a connection): answered, so counted too.
    let long = format!("/{}", "a".repeat(9000));
    for _ in 0..20 {
        assert_eq!(
            get(gw.addr, &long, &[("x-user-id", &ka[0])]).await.status,
            414
        );
    }
    // A failover (b's instance refuses) and a reload.
    fault(b1.addr, r#"{"refuse_for_s": 60}"#).await;
    wait_refusing(b1.addr).await;
    assert_eq!(
        c.get("/", &[("x-user-id", &kb[0])])
            .await
            .header("x-cell-id"),
        Some("c")
    );
    assert!(
        gw.wait_log("cell failed over", Duration::from_secs(5))
            .await
    );
    std::fs::write(dir.path("c.yaml"), format!("{yaml}# touched\n")).unwrap();
    assert!(
        gw.wait_log("configuration reloaded", Duration::from_secs(5))
            .await
    );

    let admin = gw.admin_addr.expect("admin listener");
    let text = String::from_utf8(get(admin, "/metrics", &[]).await.body.to_vec()).unwrap();
    let m = parse(&text);
    for family in [
        "cellgate_requests",
        "cellgate_request_duration_seconds",
        "cellgate_cell_health_score",
        "cellgate_cell_weight",
        "cellgate_cell_state",
        "cellgate_routing_table_version",
        "cellgate_failovers",
        "cellgate_switch_duration_seconds",
        "cellgate_config_reloads",
        "cellgate_upstream_ejections",
        "cellgate_shed",
    ] {
        assert!(
            m.get(family).is_some(),
            "family {family} missing from /metrics"
        );
    }
    let within = |got: f64, want: f64| (got - want).abs() <= 0.01 * want.max(1.0);
    let a2 = sum(
        &m,
        "cellgate_requests",
        "cellgate_requests_total",
        &[("cell", "a"), ("code_class", "2xx")],
    );
    let a5 = sum(
        &m,
        "cellgate_requests",
        "cellgate_requests_total",
        &[("cell", "a"), ("code_class", "5xx")],
    );
    assert!(
        within(a2, f64::from(a_ok)) && within(a5, f64::from(a_5xx)),
        "a: {a2}/{a5} vs sent {a_ok}/{a_5xx}"
    );
    assert!(within(
        sum(
            &m,
            "cellgate_requests",
            "cellgate_requests_total",
            &[("cell", "b"), ("code_class", "2xx")]
        ),
        500.0
    ));
    assert!(within(
        sum(
            &m,
            "cellgate_requests",
            "cellgate_requests_total",
            &[("cell", "none"), ("code_class", "4xx")]
        ),
        120.0
    ));
    let a_count = sum(
        &m,
        "cellgate_request_duration_seconds",
        "cellgate_request_duration_seconds_count",
        &[("cell", "a")],
    );
    assert!(
        within(a_count, 1500.0),
        "duration histogram count {a_count}"
    );
    assert_eq!(
        sum(
            &m,
            "cellgate_cell_state",
            "cellgate_cell_state",
            &[("cell", "b"), ("state", "failed_over")]
        ),
        1.0
    );
    assert_eq!(
        sum(
            &m,
            "cellgate_cell_state",
            "cellgate_cell_state",
            &[("cell", "a"), ("state", "active")]
        ),
        1.0
    );
    assert_eq!(
        sum(
            &m,
            "cellgate_failovers",
            "cellgate_failovers_total",
            &[("from", "b"), ("to", "c"), ("reason", "instances_down")]
        ),
        1.0
    );
    assert!(
        sum(
            &m,
            "cellgate_switch_duration_seconds",
            "cellgate_switch_duration_seconds_count",
            &[]
        ) >= 1.0
    );
    assert!(
        sum(
            &m,
            "cellgate_config_reloads",
            "cellgate_config_reloads_total",
            &[("source", "file"), ("result", "ok")]
        ) >= 1.0
    );
    assert!(
        sum(
            &m,
            "cellgate_upstream_ejections",
            "cellgate_upstream_ejections_total",
            &[("cell", "b")]
        ) >= 1.0
    );
    assert!(
        sum(
            &m,
            "cellgate_routing_table_version",
            "cellgate_routing_table_version",
            &[]
        ) >= 3.0
    );
    assert_eq!(sum(&m, "cellgate_shed", "cellgate_shed_total", &[]), 0.0);
    let score = sum(
        &m,
        "cellgate_cell_health_score",
        "cellgate_cell_health_score",
        &[("cell", "a")],
    );
    assert!((0.0..=1.0).contains(&score) && score > 0.5);
    assert!(
        sum(
            &m,
            "cellgate_cell_weight",
            "cellgate_cell_weight",
            &[("cell", "a")]
        ) > 0.0
    );
    assert!(
        m.get("cellgate_slo_burn_rate").is_some(),
        "per-cell SLO burn rate"
    );
    let burn = sum(
        &m,
        "cellgate_slo_burn_rate",
        "cellgate_slo_burn_rate",
        &[("cell", "a"), ("window", "5m")],
    );
    assert!(
        burn > 50.0,
        "10 % errors burn a 99.9 % budget ~100× ({burn})"
    );
}
