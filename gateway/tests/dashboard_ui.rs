//! The dashboard in a real headless browser: it lists every demo cell, and a click on Drain
//! (after the token and the dry-run plan) changes the cell's state on the page and in
//! `/admin/cells`. A screenshot is saved to `target/ui-dashboard.png`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;

const DRIVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ui/drive.py");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_cell_from_the_dashboard() {
    let gw = Gateway::start_args(&[
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--workers",
        "1",
    ]);
    let admin = gw.admin_addr.expect("admin listener");
    // Some traffic, so the page has rates to show.
    let mut c = H1::connect(gw.addr).await;
    for i in 0..200 {
        c.get("/", &[("x-user-id", &format!("u{i}"))]).await;
    }
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-dashboard.png");
    let base = format!("http://{admin}");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([DRIVER, &base, "demo-token", "bj-1", shot.to_str().unwrap()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "browser run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cells: Vec<&str> = v["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for id in ["bj-1", "bj-2", "sh-1"] {
        assert!(cells.contains(&id), "page lists {id}: {cells:?}");
    }
    assert_eq!(v["before"], "active");
    assert_eq!(v["after"], "draining");
    assert!(
        v["plan"].as_str().unwrap().contains("bj-1"),
        "the dry-run plan was shown: {}",
        v["plan"]
    );
    assert_eq!(v["error"], "");
    let r = get(
        admin,
        "/admin/cells/bj-1",
        &[("authorization", "Bearer demo-token")],
    )
    .await;
    assert_eq!(r.json()["state"], "draining", "{:?}", r.body);
    assert!(std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("ui-dashboard.png")
        .exists());
}
