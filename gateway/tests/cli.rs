//! The command line of SPEC §9: `route`, `validate`, `demo --print-config`, and the demo
//! itself answering the README's curl.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_cellgate");
const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/demo.yaml");

#[test]
fn route_explains_a_key_offline() {
    let out = Command::new(BIN)
        .args(["route", "--config", DEMO, "--key", "alice"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // xxh3_64("alice") % 16384 = 5808 (pinned in routing/tests/golden/slots.tsv); 5462-10922 is bj-2.
    assert_eq!(v["slot"], 5808);
    assert_eq!(v["home_cell"], "bj-2");
    assert_eq!(v["cell"], "bj-2");
    assert_eq!(v["key"], "alice");
    assert_eq!(v["table_version"], 1);
    assert!(v["reason"].as_str().unwrap().contains("slot 5808"));

    let out = Command::new(BIN)
        .args(["route", "--config", DEMO, "--key", &"x".repeat(300)])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("300 bytes"));
}

#[test]
fn validate_names_each_problem_with_its_path() {
    let out = Command::new(BIN)
        .args(["validate", "--config", DEMO])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (2 regions, 3 cells, 16384 slots"));

    let dir = TempDir::new("validate");
    let bad = std::fs::read_to_string(DEMO)
        .unwrap()
        .replace("failover: [bj-1]", "failover: [bj-9]")
        .replace("127.0.0.1:18104", "127.0.0.1:0");
    std::fs::write(dir.path("bad.yaml"), bad).unwrap();
    let out = Command::new(BIN)
        .args([
            "validate",
            "--config",
            dir.path("bad.yaml").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2 problem(s)"), "{err}");
    assert!(
        err.contains("cells[1].instances[1].addr: \"127.0.0.1:0\" has port 0"),
        "{err}"
    );
    assert!(
        err.contains("cells[2].failover[0]: unknown cell \"bj-9\""),
        "{err}"
    );

    let out = Command::new(BIN)
        .args(["validate", "--config", "/nonexistent/cellgate.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn demo_prints_its_built_in_config() {
    let out = Command::new(BIN)
        .args(["demo", "--print-config"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        std::fs::read_to_string(DEMO).unwrap()
    );
}

/// The README's tour: the demo answers alice from her home cell, every time. Uses the demo's
/// fixed upstream ports (18101-18106) and a free proxy port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_alice_from_her_home_cell() {
    let gw = Gateway::start_args(&["demo", "--listen", "127.0.0.1:0", "--workers", "1"]);
    let mut c = H1::connect(gw.addr).await;
    for _ in 0..5 {
        let r = c.get("/anything", &[("x-user-id", "alice")]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-cell-id"), Some("bj-2"));
        assert!(r.header("x-request-id").is_some());
        let b = r.json();
        assert_eq!(b["cell"], "bj-2");
        assert!(b["instance"].as_str().unwrap().starts_with("bj-2-"));
    }
    // Faults on the demo upstreams: bj-2's instances refuse connections; once they are
    // ejected, alice is served by bj-1, bj-2's first failover target.
    fault(
        "127.0.0.1:18103".parse().unwrap(),
        r#"{"refuse_for_s": 30}"#,
    )
    .await;
    fault(
        "127.0.0.1:18104".parse().unwrap(),
        r#"{"refuse_for_s": 30}"#,
    )
    .await;
    let mut seen = Vec::new();
    for _ in 0..50 {
        let r = c.get("/anything", &[("x-user-id", "alice")]).await;
        seen.push((
            r.status.as_u16(),
            r.header("x-cell-id").unwrap_or("").to_owned(),
        ));
        if seen.last() == Some(&(200, "bj-1".to_owned())) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        seen.last(),
        Some(&(200, "bj-1".to_owned())),
        "alice moves to bj-1 after bj-2 refuses: {seen:?}"
    );
}

/// `cellgate run` with `args`, expected to refuse to start: its exit status and stderr.
/// Killed (and reported as still running) if it has not exited within 20 s.
fn run_refused(args: &[&str]) -> (Option<i32>, String) {
    use std::io::Read;
    let dir = TempDir::new("refused");
    let mut child = Command::new(BIN)
        .args(["run", "--config", DEMO, "--listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0", "--workers", "1"])
        .args(["--state-dir", dir.0.to_str().unwrap()])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let Some(status) = status else {
        panic!("cellgate run {args:?} kept running; stderr: {err}");
    };
    (status.code(), err)
}

#[test]
fn run_checks_the_etcd_prefix_and_gateway_id_overrides_like_the_file_keys() {
    let etcd = format!("http://{}", dead_addr());
    let (code, err) = run_refused(&["--etcd", &etcd, "--etcd-prefix", "/cellgate"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--etcd-prefix \"/cellgate\": must start and end with '/'"),
        "{err}"
    );
    let (code, err) = run_refused(&["--etcd-prefix", "cellgate/"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--etcd-prefix \"cellgate/\""), "{err}");

    let (code, err) = run_refused(&["--etcd", &etcd, "--gateway-id", "gw 1/../x"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--gateway-id \"gw 1/../x\": must be 1-64 letters, digits"),
        "{err}"
    );
    let long = "g".repeat(65);
    let (code, err) = run_refused(&["--gateway-id", &long]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--gateway-id"), "{err}");
}

/// `cellgate ctl` takes `--admin`, `--token` (and the TLS flags) before or after its
/// subcommand.
#[test]
fn ctl_takes_its_connection_flags_after_the_subcommand_too() {
    let dir = TempDir::new("ctl-flags");
    let gw = Gateway::start_args(&[
        "run",
        "--config",
        DEMO,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--state-dir",
        dir.0.to_str().unwrap(),
    ]);
    let admin = gw.admin_addr.unwrap().to_string();
    let a = admin.as_str();
    for args in [
        ["ctl", "--admin", a, "--token", "demo-token", "cells"],
        ["ctl", "cells", "--admin", a, "--token", "demo-token"],
    ] {
        let out = Command::new(BIN)
            .args(args)
            .env_remove("CELLGATE_ADMIN")
            .env_remove("CELLGATE_ADMIN_TOKEN")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("\"bj-1\""));
    }
}
