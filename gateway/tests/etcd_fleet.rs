//! A fleet of gateways on one real etcd: `config push` bootstraps it; a switch issued at any
//! gateway is applied by all of them (same table version, same decisions) within a second;
//! every gateway registers under `gateways/<id>`; two controllers racing conflicting
//! mutations never lose an update and audit exactly the winners.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::etcd::*;
use common::*;
use http::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_at_any_gateway_reaches_all_three_within_a_second() {
    let _serial = serial().lock().await;
    let etcd = Etcd::single().await;
    let cells = Cells::new();
    let dir = TempDir::new("fleet");
    let yaml = cells.yaml();
    push(&etcd.endpoints_arg(), &dir, &yaml);

    // A second push without --replace is refused: it would overwrite a live configuration.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cellgate"))
        .args([
            "config",
            "push",
            "--etcd",
            &etcd.endpoints_arg(),
            "--config",
        ])
        .arg(dir.path("push.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--replace"));

    let gws: Vec<Gateway> = (0..3)
        .map(|i| gateway(&etcd.endpoints_arg(), &dir, &yaml, &format!("gw-{i}")))
        .collect();
    let admins: Vec<_> = gws.iter().map(|g| g.admin_addr.unwrap()).collect();
    let v0 = version(admins[0]).await;
    wait_version(&admins, v0, Duration::from_secs(5)).await;
    for &a in &admins {
        let r = admin_get(a, "/readyz").await;
        assert_eq!(
            (r["source"].as_str(), r["store"]["state"].as_str()),
            (Some("etcd"), Some("ok"))
        );
    }

    let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
    let expected_home = table_of(&yaml);
    let a_key = keys
        .iter()
        .find(|k| expected_home.explain(k, 1).unwrap().home_cell == "a")
        .unwrap()
        .clone();

    // Switch at gw-0, restore at gw-1, switch again at gw-2.
    let steps: [(usize, &str, Option<serde_json::Value>, &str); 3] = [
        (0, "switch", Some(json!({"to": "c"})), "c"),
        (1, "restore", None, "a"),
        (2, "switch", Some(json!({"to": "b"})), "b"),
    ];
    for (at, action, body, a_goes_to) in steps {
        let r = admin(
            admins[at],
            Method::POST,
            &format!("/admin/cells/a/{action}"),
            body,
        )
        .await
        .unwrap();
        assert_eq!(r["applied"], true, "{r}");
        let v = r["table_version"].as_u64().unwrap();
        let took = wait_version(&admins, v, Duration::from_secs(1)).await;
        assert!(
            took < Duration::from_secs(1),
            "{action} at gw-{at} took {took:?}"
        );
        let first = decisions(admins[0], &keys).await;
        for &other in &admins[1..] {
            assert_eq!(
                decisions(other, &keys).await,
                first,
                "gateways disagree after {action}"
            );
        }
        assert!(first.iter().all(|(_, ver)| *ver == v));
        // The proxy itself agrees: a key of cell a is served where the switch says.
        let p = get(gws[(at + 1) % 3].addr, "/", &[("x-user-id", &a_key)]).await;
        assert_eq!(p.header("x-cell-id"), Some(a_goes_to));
        assert_eq!(p.echoed("x-routing-version"), Some(v.to_string()));
    }

    // Every gateway is registered with its table version and health view.
    let want = version(admins[0]).await;
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let f = admin_get(admins[1], "/admin/fleet").await;
        let list = f["gateways"].as_array().unwrap();
        let ids: Vec<&str> = list.iter().map(|g| g["id"].as_str().unwrap()).collect();
        if ids == ["gw-0", "gw-1", "gw-2"] && list.iter().all(|g| g["table_version"] == json!(want))
        {
            assert_eq!(list[0]["health"]["a"]["state"], "draining");
            assert_eq!(list[0]["health"]["c"]["serving"], true);
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "fleet never converged: {f}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_controllers_each_win_or_get_409_and_no_update_is_lost() {
    let _serial = serial().lock().await;
    let etcd = Etcd::single().await;
    let cells = Cells::new();
    let dir = TempDir::new("race");
    let yaml = cells.yaml();
    push(&etcd.endpoints_arg(), &dir, &yaml);
    let g0 = gateway(&etcd.endpoints_arg(), &dir, &yaml, "ctl-0");
    let g1 = gateway(&etcd.endpoints_arg(), &dir, &yaml, "ctl-1");
    let (a0, a1) = (g0.admin_addr.unwrap(), g1.admin_addr.unwrap());
    wait_version(&[a0, a1], version(a0).await, Duration::from_secs(5)).await;

    let (mut wins, mut refused) = (0u32, 0u32);
    for i in 0..100u32 {
        // Both controllers set cell a's weight at the same moment, from the same version.
        let w0 = 1000 + i;
        let w1 = 5000 + i;
        let (r0, r1) = tokio::join!(
            admin(
                a0,
                Method::PUT,
                "/admin/cells/a/weight",
                Some(json!({"weight": w0}))
            ),
            admin(
                a1,
                Method::PUT,
                "/admin/cells/a/weight",
                Some(json!({"weight": w1}))
            ),
        );
        for r in [r0, r1] {
            match r {
                Ok(v) => {
                    assert_eq!(v["applied"], true);
                    wins += 1;
                }
                Err((409, msg)) => {
                    assert!(msg.contains("changed after table version"), "{msg}");
                    refused += 1;
                }
                Err(other) => panic!("round {i}: neither a win nor a 409: {other:?}"),
            }
        }
    }
    assert_eq!(wins + refused, 200);
    assert!(
        wins >= 100,
        "at least one controller wins every round ({wins})"
    );
    assert!(refused >= 1, "the controllers never actually raced");

    // Exactly one audit record per win, and they form one chain: each record's "before"
    // is the previous record's "after"; the store ends at the last "after".
    let store = etcd.store().await;
    let mut recs: Vec<_> = store
        .audit(1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.action == "weight" && !r.dry_run)
        .collect();
    assert_eq!(recs.len() as u32, wins);
    recs.sort_by_key(|r| r.revision);
    let weight = |v: &serde_json::Value| v["cells/a"]["weight"].as_u64().unwrap();
    assert_eq!(weight(&recs[0].before), 100);
    for pair in recs.windows(2) {
        assert_eq!(
            weight(&pair[1].before),
            weight(&pair[0].after),
            "lost update"
        );
        assert!(pair[1].base_version.unwrap() >= pair[0].revision.unwrap() as u64);
    }
    let last = weight(&recs.last().unwrap().after);
    let (doc, _) = store.raw_get("cells/a").await.unwrap().unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&doc).unwrap();
    assert_eq!(doc["weight"].as_u64().unwrap(), last);
    for a in [a0, a1] {
        let end = std::time::Instant::now() + Duration::from_secs(2);
        while admin_get(a, "/admin/cells/a").await["weight"]
            .as_u64()
            .unwrap()
            != last
        {
            assert!(
                std::time::Instant::now() < end,
                "{a} never applied the last weight"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // The records carry who, what and how long.
    assert!(recs
        .iter()
        .all(|r| r.actor == "admin" && r.duration_ms >= 0.0 && r.gateway.is_some()));
}

/// With `health.failover.quorum: 2`, one gateway seeing a cell fail (say, over its own bad
/// network path) does not move the cell: it publishes its verdict and waits. Once a second
/// gateway sees the same, both fail the cell over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_quorum_of_two_one_gateway_alone_does_not_fail_a_cell_over() {
    let _serial = serial().lock().await;
    let etcd = Etcd::single().await;
    let cells = Cells::new();
    let dir = TempDir::new("quorum");
    let yaml = format!(
        "{}health:\n  failover: {{ error_ratio: 0.05, window: 2s, min_requests: 20, quorum: 2 }}\n  outlier: {{ consecutive_failures: 100000, failure_ratio: 1.0, min_requests: 100000 }}\n  breaker: {{ min_requests: 100000 }}\n  retry: {{ statuses: [] }}\n",
        cells.yaml()
    );
    push(&etcd.endpoints_arg(), &dir, &yaml);
    let gws: Vec<Gateway> = (0..2)
        .map(|i| gateway(&etcd.endpoints_arg(), &dir, &yaml, &format!("q-{i}")))
        .collect();
    let admins: Vec<_> = gws.iter().map(|g| g.admin_addr.unwrap()).collect();
    let t = table_of(&yaml);
    let key = (0..1000)
        .map(|i| format!("k{i}"))
        .find(|k| t.explain(k, 1).unwrap().home_cell == "a")
        .unwrap();
    fault(cells.ups[0].addr, r#"{"error_rate": 1.0, "status": 500}"#).await;
    let state = |adm| async move {
        admin_get(adm, "/admin/cells/a").await["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let drive = |gw: std::net::SocketAddr, key: String, for_: Duration| async move {
        let end = std::time::Instant::now() + for_;
        let mut c = H1::connect(gw).await;
        while std::time::Instant::now() < end {
            let _ = c.get("/", &[("x-user-id", &key)]).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };

    // Only gateway 0 sees the failures.
    drive(gws[0].addr, key.clone(), Duration::from_secs(4)).await;
    assert_eq!(
        state(admins[0]).await,
        "active",
        "moved on one gateway's view"
    );
    let fleet = admin_get(admins[1], "/admin/fleet").await;
    let q0 = fleet["gateways"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["id"] == "q-0")
        .cloned()
        .expect("q-0 registered");
    assert_eq!(
        q0["health"]["a"]["failing"], true,
        "its verdict is published: {q0}"
    );

    // Both see them now: the cell fails over on both.
    let (a, b) = (
        tokio::spawn(drive(gws[0].addr, key.clone(), Duration::from_secs(8))),
        tokio::spawn(drive(gws[1].addr, key.clone(), Duration::from_secs(8))),
    );
    let end = std::time::Instant::now() + Duration::from_secs(8);
    loop {
        if state(admins[0]).await == "failed_over" && state(admins[1]).await == "failed_over" {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "not failed over on both: {} / {}",
            state(admins[0]).await,
            state(admins[1]).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.abort();
    b.abort();
}
