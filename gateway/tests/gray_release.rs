//! Gray release: a stable percentage of keys carries the tag to the labelled instances only,
//! and a canary that hurts users is switched off by its guard.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;

fn canary_cell(extra: &str) -> (Upstream, Upstream, String) {
    let (a1, a2) = (upstream("a", "a-1"), upstream("a", "a-2"));
    let mut y = format!(
        "regions: [r1]\ncells:\n  - id: a\n    region: r1\n    instances:\n      - {{ name: a-1, addr: \"{}\" }}\n      - {{ name: a-2, addr: \"{}\", labels: {{ gray: canary }} }}\n",
        a1.addr, a2.addr
    );
    y.push_str(extra);
    (a1, a2, y)
}

/// `n` keys the configuration `yaml` tags.
fn tagged_keys(yaml: &str, n: usize) -> Vec<String> {
    let table = table_of(yaml);
    (0..400)
        .map(|i| format!("g{i}"))
        .filter(|k| table.explain(k, 1).unwrap().gray_tag.is_some())
        .take(n)
        .collect()
}

/// Send every key once over `clients` connections; (key, instance, upstream's x-gray-tag).
async fn sweep(
    addr: std::net::SocketAddr,
    keys: &[String],
    clients: usize,
) -> Vec<(String, String, Option<String>)> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mine: Vec<String> = keys.iter().skip(c).step_by(clients).cloned().collect();
        tasks.push(tokio::spawn(async move {
            let mut conn = H1::connect(addr).await;
            let mut out = Vec::new();
            for k in mine {
                let r = conn.get("/", &[("x-user-id", &k)]).await;
                assert_eq!(r.status, 200);
                let b = r.json();
                out.push((
                    k,
                    b["instance"].as_str().unwrap().to_owned(),
                    b["headers"]["x-gray-tag"].as_str().map(str::to_owned),
                ));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_percent_of_keys_stably_reach_only_the_canary_with_the_tag() {
    let (_a1, _a2, yaml) = canary_cell("gray:\n  - { name: canary-5, tag: canary, percent: 5 }\n");
    let dir = TempDir::new("gray");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let keys: Vec<String> = (0..10_000).map(|i| format!("member-{i}")).collect();
    let seen = sweep(gw.addr, &keys, 8).await;
    let tagged: BTreeSet<&str> = seen
        .iter()
        .filter(|(_, _, t)| t.is_some())
        .map(|(k, _, _)| k.as_str())
        .collect();
    let share = tagged.len() as f64 / keys.len() as f64;
    assert!(
        (0.045..=0.055).contains(&share),
        "{:.2} % tagged",
        share * 100.0
    );
    for (k, inst, tag) in &seen {
        match tag.as_deref() {
            Some(t) => {
                assert_eq!(t, "canary");
                assert_eq!(inst, "a-2", "tagged key {k} served by the canary");
            }
            None => assert_eq!(inst, "a-1", "untagged key {k} never reaches the canary"),
        }
    }
    // The same keys every time, and the offline explanation agrees.
    let again = sweep(gw.addr, &keys[..2_000], 4).await;
    for (k, _, tag) in &again {
        assert_eq!(
            tag.is_some(),
            tagged.contains(k.as_str()),
            "key {k} changed sides"
        );
    }
    let table = table_of(&yaml);
    for k in keys.iter().take(2_000) {
        assert_eq!(
            table.explain(k, 1).unwrap().gray_tag.is_some(),
            tagged.contains(k.as_str())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_with_five_percent_errors_is_switched_off_by_its_guard() {
    let (_a1, a2, yaml) = canary_cell(
        "admin:\n  token: t0ken\ngray:\n  - { name: canary-half, tag: canary, percent: 50, guard: { max_error_delta: 0.02, min_requests: 40 } }\nhealth:\n  outlier: { window: 2s }\n  retry: { statuses: [] }\n",
    );
    let dir = TempDir::new("guard");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let keys = tagged_keys(&yaml, 50);
    let load = Load::start(gw.addr, keys, 4, Duration::from_secs(30), &[]);
    assert!(
        load.wait_for(Duration::from_secs(10), |s| s.len() > 100)
            .await
    );
    assert!(
        load.samples().iter().all(|s| s.instance == "a-2"),
        "tagged keys go to the canary while it is healthy"
    );
    let t0 = Instant::now();
    fault(a2.addr, r#"{"error_rate": 0.05, "status": 503}"#).await;
    let off = gw
        .wait_log(
            "gray rule switched off by its guard",
            Duration::from_secs(6),
        )
        .await;
    let took = t0.elapsed();
    let settled = t0 + took + Duration::from_millis(300);
    let moved = load
        .wait_for(Duration::from_secs(5), |s| {
            s.iter().filter(|x| x.at > settled).count() > 100
        })
        .await;
    let samples = load.stop().await;
    assert!(
        off && took <= Duration::from_secs(4),
        "switched off after {took:?} (guard window 2 s)"
    );
    assert!(
        gw.logs_contain("error rate of instances tagged canary"),
        "the event says why"
    );
    let audited = switch_off_audited(&gw).await;
    let why = audited["plan"]["reason"].as_str().unwrap();
    assert!(
        why.contains("canary-half") && why.contains("error rate"),
        "the audit log says why: {why}"
    );
    // The table the admin API shows is the one serving: the rule is off there.
    let t = get(
        gw.admin_addr.unwrap(),
        "/admin/table",
        &[("authorization", "Bearer t0ken")],
    )
    .await
    .json();
    let rule = t["gray"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "canary-half")
        .unwrap()
        .clone();
    assert_eq!(rule["enabled"], false, "{rule}");
    assert!(moved);
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at > settled).collect();
    let wrong: Vec<(&str, u16)> = after
        .iter()
        .filter(|s| s.instance != "a-1" || s.status != 200)
        .map(|s| (s.instance.as_str(), s.status))
        .collect();
    assert!(
        !after.is_empty() && wrong.is_empty(),
        "traffic returned to untagged instances; {} of {} were not: {:?}",
        wrong.len(),
        after.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// A canary failing every request is ejected by outlier detection long before it gathers
/// the guard's request count (ejection clears its outcome window); its ejection trips the
/// guard instead, so the rule is switched off and audited all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_every_request_is_switched_off_by_its_guard() {
    let (_a1, a2, yaml) = canary_cell(
        "admin:\n  token: t0ken\ngray:\n  - { name: canary-all, tag: canary, percent: 50, guard: { max_error_delta: 0.02, min_requests: 50 } }\nhealth:\n  retry: { statuses: [] }\n",
    );
    let dir = TempDir::new("guard-ejected");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let keys = tagged_keys(&yaml, 20);
    fault(a2.addr, r#"{"error_rate": 1.0, "status": 503}"#).await;
    let t0 = Instant::now();
    let load = Load::start(gw.addr, keys, 2, Duration::from_secs(20), &[]);
    let off = gw
        .wait_log(
            "gray rule switched off by its guard",
            Duration::from_secs(8),
        )
        .await;
    let took = t0.elapsed();
    let _ = load.stop().await;
    assert!(off, "the guard never tripped ({took:?})");
    assert!(
        gw.logs_contain("instances tagged canary ejected by outlier detection"),
        "the event says why"
    );
    let audited = switch_off_audited(&gw).await;
    let why = audited["plan"]["reason"].as_str().unwrap();
    assert!(
        why.contains("canary-all") && why.contains("ejected"),
        "the audit log says why: {why}"
    );
}

/// A canary that restarts (refuses connections for a moment) is ejected while it is
/// down, but that says nothing about its answers: the rule stays on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_restarts_keeps_its_rule() {
    let (_a1, a2, yaml) = canary_cell(
        "admin:\n  token: t0ken\ngray:\n  - { name: canary-all, tag: canary, percent: 50, guard: { max_error_delta: 0.02, min_requests: 50 } }\n",
    );
    let dir = TempDir::new("guard-restart");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let keys = tagged_keys(&yaml, 20);
    fault(a2.addr, r#"{"refuse_for_s": 1}"#).await;
    let load = Load::start(gw.addr, keys, 2, Duration::from_secs(20), &[]);
    assert!(
        gw.wait_log("instance ejected", Duration::from_secs(5))
            .await,
        "the refusing canary was not ejected"
    );
    // Several guard evaluations (every controller tick) while it is ejected and after.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = load.stop().await;
    assert!(
        !gw.logs_contain("gray rule switched off by its guard"),
        "a restart switched the rule off"
    );
}

/// The audit record of a gray rule switched off by its guard (written just after the log
/// line), waited for within 2 s.
async fn switch_off_audited(gw: &Gateway) -> serde_json::Value {
    let admin = gw.admin_addr.expect("admin listener");
    for _ in 0..100 {
        let a = get(
            admin,
            "/admin/audit?limit=20",
            &[("authorization", "Bearer t0ken")],
        )
        .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        if let Some(e) = a.json()["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["action"] == "gray_rule_disabled")
        {
            return e.clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no audit event for the switch-off");
}

/// A canary that crashes on every request (takes it, then drops the connection without an
/// answer) hurts users as surely as one answering 503: its ejection trips the guard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_dropping_every_request_is_switched_off_by_its_guard() {
    use tokio::io::AsyncReadExt;
    let (_a1, a2, yaml) = canary_cell(
        "admin:\n  token: t0ken\ngray:\n  - { name: canary-all, tag: canary, percent: 50, guard: { max_error_delta: 0.02, min_requests: 50 } }\nhealth:\n  retry: { statuses: [] }\n",
    );
    // In a2's place: a listener that reads each request and closes the connection.
    let crash = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let crash_addr = crash.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = crash.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 4096];
                let _ = s.read(&mut b).await;
            });
        }
    });
    let yaml = yaml.replace(&a2.addr.to_string(), &crash_addr.to_string());
    let dir = TempDir::new("guard-crash");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let keys = tagged_keys(&yaml, 20);
    let load = Load::start(gw.addr, keys, 2, Duration::from_secs(20), &[]);
    let off = gw
        .wait_log(
            "gray rule switched off by its guard",
            Duration::from_secs(8),
        )
        .await;
    let _ = load.stop().await;
    assert!(off, "the guard never tripped");
}
