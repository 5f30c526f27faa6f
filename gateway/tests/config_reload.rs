//! The configuration file is hot-applied: cell states move keys to the first serving
//! failover target; many edits under load fail no request; an invalid edit is rejected and
//! the previous table keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Cells {
    ups: Vec<Upstream>,
}

impl Cells {
    fn new() -> Self {
        Self {
            ups: vec![
                upstream("a", "a-1"),
                upstream("b", "b-1"),
                upstream("c", "c-1"),
            ],
        }
    }
    /// Cell `a` fails over to `c` then `b`; `extra` is appended.
    fn yaml(&self, a_state: &str, c_state: &str, weight: u32) -> String {
        let mut cells = vec![
            cell("a", "r1", &["c", "b"], &[("a-1", self.ups[0].addr)]),
            cell("b", "r1", &["a"], &[("b-1", self.ups[1].addr)]),
            cell("c", "r2", &["a"], &[("c-1", self.ups[2].addr)]),
        ];
        cells[0].state = a_state;
        cells[2].state = c_state;
        config_yaml(&cells, &format!("slots:\n  - {{ cell: a, ranges: [\"0-8191\"] }}\n  - {{ cell: b, ranges: [\"8192-12287\"] }}\n  - {{ cell: c, ranges: [\"12288-16383\"] }}\n# weight {weight}\n"))
    }
}

/// A key whose home cell is `cell` under `yaml`.
fn key_in(yaml: &str, cell: &str) -> String {
    let t = table_of(yaml);
    (0..10_000)
        .map(|i| format!("k{i}"))
        .find(|k| t.explain(k, 1).unwrap().home_cell == cell)
        .unwrap()
}

/// Wait (bounded) until requests report routing version `v`.
async fn wait_version(c: &mut H1, key: &str, v: u64) -> Resp {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let r = c.get("/", &[("x-user-id", key)]).await;
        if r.echoed("x-routing-version").as_deref() == Some(v.to_string().as_str()) {
            return r;
        }
        assert!(
            Instant::now() < end,
            "version {v} was not applied; last {:?}",
            r.echoed("x-routing-version")
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_and_failed_over_cells_send_keys_to_their_first_serving_target() {
    let cells = Cells::new();
    let dir = TempDir::new("states");
    let path = dir.path("c.yaml");
    let y = cells.yaml("active", "active", 1);
    write_atomic(&path, &y);
    let key = key_in(&y, "a");
    let gw = Gateway::start(&path);
    let mut c = H1::connect(gw.addr).await;
    assert_eq!(
        c.get("/", &[("x-user-id", &key)]).await.header("x-cell-id"),
        Some("a")
    );

    write_atomic(&path, &cells.yaml("draining", "active", 1));
    let r = wait_version(&mut c, &key, 2).await;
    assert_eq!(
        r.header("x-cell-id"),
        Some("c"),
        "draining → first failover target"
    );

    write_atomic(&path, &cells.yaml("failed_over", "disabled", 1));
    let r = wait_version(&mut c, &key, 3).await;
    assert_eq!(
        r.header("x-cell-id"),
        Some("b"),
        "first target disabled → next serving target"
    );

    write_atomic(&path, &cells.yaml("active", "active", 1));
    let r = wait_version(&mut c, &key, 4).await;
    assert_eq!(r.header("x-cell-id"), Some("a"), "restored → home again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_under_load_fail_nothing_and_invalid_edits_are_rejected() {
    let cells = Cells::new();
    let dir = TempDir::new("reload");
    let path = dir.path("c.yaml");
    write_atomic(&path, &cells.yaml("active", "active", 0));
    let gw = Gateway::start(&path);
    let key = key_in(&cells.yaml("active", "active", 0), "a");

    // Bounded load: 4 keep-alive clients, until told to stop or 60 s.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for w in 0..4u32 {
        let (stop, ok, failed, addr) = (
            Arc::clone(&stop),
            Arc::clone(&ok),
            Arc::clone(&failed),
            gw.addr,
        );
        load.push(tokio::spawn(async move {
            let mut c = H1::connect(addr).await;
            let end = Instant::now() + Duration::from_secs(60);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                i += 1;
                let key = format!("load-{w}-{}", i % 500);
                match c.try_get("/", &[("x-user-id", &key)]).await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(r) => {
                        eprintln!("failed: {} {:?}", r.status, r.body);
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        eprintln!("failed: {e}");
                        c = H1::connect(addr).await;
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }

    let mut c = H1::connect(gw.addr).await;
    let mut version = 1;
    for edit in 1..=24u32 {
        let a_state = if edit % 2 == 1 { "draining" } else { "active" };
        write_atomic(&path, &cells.yaml(a_state, "active", edit));
        version += 1;
        let r = wait_version(&mut c, &key, version).await;
        assert_eq!(
            r.header("x-cell-id"),
            Some(if a_state == "draining" { "c" } else { "a" })
        );
    }

    // An invalid edit: unknown failover target. Rejected; the old table keeps serving.
    let bad = cells
        .yaml("active", "active", 99)
        .replace("failover: [c, b]", "failover: [nowhere]");
    write_atomic(&path, &bad);
    assert!(
        gw.wait_log("configuration rejected", Duration::from_secs(10))
            .await,
        "rejection is logged"
    );
    assert!(
        gw.logs_contain("cells[0].failover[0]"),
        "the log names the offending path"
    );
    for _ in 0..20 {
        let r = c.get("/", &[("x-user-id", &key)]).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.echoed("x-routing-version").as_deref(),
            Some(version.to_string().as_str())
        );
    }
    // A broken YAML file too.
    write_atomic(&path, "cells: [ {id: a, ");
    assert!(
        gw.wait_logs("configuration rejected", 2, Duration::from_secs(10))
            .await
    );
    assert_eq!(
        c.get("/", &[("x-user-id", &key)])
            .await
            .echoed("x-routing-version")
            .as_deref(),
        Some(version.to_string().as_str())
    );

    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 200, "load ran ({ok} requests)");
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed during 24 reloads",
        ok + failed
    );
}

/// The slot count never changes after bootstrap: an edit to `routing.slot_count` (with
/// slot ranges that fit it) is rejected with the path named, and keys stay where they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_of_the_slot_count_is_rejected_and_keys_stay() {
    let cells = Cells::new();
    let dir = TempDir::new("slot-count");
    let path = dir.path("c.yaml");
    let yaml = cells.yaml("active", "active", 1);
    write_atomic(&path, &yaml);
    let gw = Gateway::start(&path);
    let key = key_in(&yaml, "b");
    let mut c = H1::connect(gw.addr).await;
    let before = c.get("/", &[("x-user-id", &key)]).await;
    assert_eq!(before.header("x-cell-id"), Some("b"));
    let v = before.echoed("x-routing-version").unwrap();

    let resized = yaml
        .replace("regions:", "routing: { slot_count: 1024 }\nregions:")
        .replace("0-8191", "0-511")
        .replace("8192-12287", "512-767")
        .replace("12288-16383", "768-1023");
    assert!(
        cellgate_config::Config::from_yaml(&resized).is_ok(),
        "valid on its own"
    );
    write_atomic(&path, &resized);
    assert!(
        gw.wait_log("configuration rejected", Duration::from_secs(10))
            .await,
        "rejection is logged"
    );
    assert!(
        gw.logs_contain("routing.slot_count"),
        "the log names the path"
    );
    for _ in 0..10 {
        let r = c.get("/", &[("x-user-id", &key)]).await;
        assert_eq!(r.header("x-cell-id"), Some("b"));
        assert_eq!(r.echoed("x-routing-version").as_deref(), Some(v.as_str()));
    }
}

/// A file without a `slots` section: adding a cell (here at the front, which also
/// reorders the even split) moves no key, on the reload and after a restart; the new cell
/// gets slots only by an explicit move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_cell_to_a_file_without_slots_moves_no_key() {
    let ups = [
        upstream("a", "a-1"),
        upstream("b", "b-1"),
        upstream("n", "n-1"),
    ];
    let a = || cell("a", "r1", &[], &[("a-1", ups[0].addr)]);
    let b = || cell("b", "r1", &[], &[("b-1", ups[1].addr)]);
    let n = cell("n", "r1", &[], &[("n-1", ups[2].addr)]);
    let two = config_yaml(&[a(), b()], "admin: { token: t0k }\n");
    let three = config_yaml(&[n, a(), b()], "admin: { token: t0k }\n");
    let dir = TempDir::new("add-cell");
    let path = dir.path("c.yaml");
    write_atomic(&path, &two);
    let before = table_of(&two);
    let keys: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let home = |k: &str| before.explain(k, 1).unwrap().home_cell;
    let check = |gw: &Gateway, what: &'static str| {
        let addr = gw.addr;
        let keys = keys.clone();
        let want: Vec<String> = keys.iter().map(|k| home(k)).collect();
        async move {
            let mut c = H1::connect(addr).await;
            for (k, w) in keys.iter().zip(&want) {
                let r = c.get("/", &[("x-user-id", k)]).await;
                assert_eq!(r.header("x-cell-id"), Some(w.as_str()), "{what}: key {k}");
            }
        }
    };
    {
        let gw = Gateway::start(&path);
        check(&gw, "before").await;
        write_atomic(&path, &three);
        let mut c = H1::connect(gw.addr).await;
        wait_version(&mut c, "user-0", 2).await;
        check(&gw, "after adding a cell").await;
        assert!(gw.logs_contain("every slot stays with its cell"));
        let t = cellgate::ctl::call(
            &gw.admin_addr.unwrap().to_string(),
            Some("t0k"),
            http::Method::GET,
            "/admin/table",
            None,
        )
        .await
        .unwrap();
        assert!(t["slots_per_cell"]["n"].as_u64().unwrap_or(0) == 0, "{t}");
    }
    let gw = Gateway::start(&path);
    check(&gw, "after a restart").await;
}
