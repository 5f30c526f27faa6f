//! gRPC through the gateway with a real gRPC client and server (Python grpcio): unary,
//! server streaming and an error status are routed by key, with trailers and
//! `grpc-status` intact.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use common::*;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc/echo.py");

struct GrpcServer {
    child: Child,
    addr: SocketAddr,
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn grpc_server(cell: &str) -> GrpcServer {
    let mut child = Command::new("python3")
        .args([SCRIPT, "serve", "--cell", cell])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 with grpcio (the test command installs it)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("gRPC server did not start: {line:?}"));
    GrpcServer {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    }
}

fn grpc_call(gateway: SocketAddr, key: &str) -> serde_json::Value {
    echo_client(gateway, key, &[])
}

/// Run the echo client against `gateway` for `key` with `extra` arguments; its JSON output.
fn echo_client(gateway: SocketAddr, key: &str, extra: &[&str]) -> serde_json::Value {
    let out = Command::new("python3")
        .args([
            SCRIPT,
            "call",
            "--target",
            &gateway.to_string(),
            "--key",
            key,
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_streaming_and_errors_are_routed_by_key_with_trailers_intact() {
    let servers = [grpc_server("g-1"), grpc_server("g-2"), grpc_server("g-3")];
    let yaml = config_yaml(
        &[
            cell("g-1", "r1", &[], &[("g-1-a", servers[0].addr)]),
            cell("g-2", "r1", &[], &[("g-2-a", servers[1].addr)]),
            cell("g-3", "r2", &[], &[("g-3-a", servers[2].addr)]),
        ],
        "",
    );
    let dir = TempDir::new("grpc");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let table = table_of(&yaml);
    let mut cells = std::collections::BTreeSet::new();
    for key in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        let want = expected_cell(&table, key);
        let r = grpc_call(gw.addr, key);
        let u = &r["unary"];
        assert_eq!(u["code"], "OK");
        assert_eq!(u["body"]["cell"], want.as_str(), "key {key}");
        assert_eq!(u["body"]["x-cell-id"], want.as_str());
        assert_eq!(
            u["initial"]["x-cell-id"],
            want.as_str(),
            "response carries X-Cell-ID"
        );
        assert_eq!(
            u["trailing"]["x-served-by"],
            want.as_str(),
            "custom trailer intact"
        );
        let left = u["body"]["time_remaining"]
            .as_f64()
            .expect("the server sees a deadline");
        assert!(
            (5.0..=10.0).contains(&left),
            "the 10 s deadline reaches the server through grpc-timeout: {left}"
        );
        let s = &r["stream"];
        assert_eq!(s["code"], "OK");
        let msgs = s["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 3);
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(m["i"], i);
            assert_eq!(m["cell"], want.as_str());
        }
        assert_eq!(s["trailing"]["x-stream-count"], "3");
        let f = &r["fail"];
        assert_eq!(f["code"], "NOT_FOUND");
        assert_eq!(f["details"], format!("no such order in {want}"));
        assert_eq!(f["trailing"]["x-fail-detail"], format!("missing-{want}"));
        cells.insert(want);
    }
    assert!(cells.len() >= 2, "keys spread over cells: {cells:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_clients_get_a_grpc_status_when_no_cell_serves() {
    let dead = dead_addr();
    let yaml = config_yaml(&[cell("g-1", "r1", &[], &[("g-1-a", dead)])], "");
    let dir = TempDir::new("grpc-err");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let out = Command::new("python3")
        .args([
            SCRIPT,
            "call",
            "--target",
            &gw.addr.to_string(),
            "--key",
            "alice",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("UNAVAILABLE") && err.contains("cannot connect"),
        "grpc status from the gateway: {err}"
    );
}

/// `n` calls of `method` with `key`: the status code of each.
fn grpc_calls(gateway: SocketAddr, key: &str, method: &str, n: u32) -> Vec<String> {
    let v = echo_client(gateway, key, &["--method", method, "--n", &n.to_string()]);
    serde_json::from_value(v).unwrap()
}

/// gRPC failures come with HTTP 200: UNAVAILABLE from an instance counts against its
/// health (five in a row eject it), NOT_FOUND (the caller's business) does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unavailable_counts_against_the_instance_and_not_found_does_not() {
    grpc_failures_eject("Unavailable").await;
}

/// The same for a status that comes in the trailers after messages (a stream that fails
/// midway); streams that end OK do not count against the instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_stream_failing_midway_counts_against_the_instance() {
    grpc_failures_eject("StreamThenUnavailable").await;
}

async fn grpc_failures_eject(failing: &str) {
    let server = grpc_server("g-1");
    let yaml = config_yaml(&[cell("g-1", "r1", &[], &[("g-1-a", server.addr)])], "");
    let dir = TempDir::new("grpc-health");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let codes = grpc_calls(gw.addr, "alice", "Fail", 8);
    assert!(codes.iter().all(|c| c == "NOT_FOUND"), "{codes:?}");
    let codes = grpc_calls(gw.addr, "alice", "Stream", 8);
    assert!(codes.iter().all(|c| c == "OK"), "{codes:?}");
    assert!(
        !gw.logs_contain("instance ejected"),
        "ejected for NOT_FOUND or OK"
    );
    let codes = grpc_calls(gw.addr, "alice", failing, 5);
    assert!(codes.iter().all(|c| c == "UNAVAILABLE"), "{codes:?}");
    assert!(
        gw.wait_log("instance ejected", std::time::Duration::from_secs(5))
            .await,
        "five UNAVAILABLE answers did not count"
    );
}

/// A gRPC call without a deadline gets none upstream: a stream runs past the route's
/// default deadline (which bounds only the wait for the answer's head), instead of being
/// ended by a `grpc-timeout` the client never asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_stream_without_a_deadline_outlives_the_default_one() {
    let server = grpc_server("g-1");
    let yaml = config_yaml(
        &[cell("g-1", "r1", &[], &[("g-1-a", server.addr)])],
        "timeouts: { default: 1s, max: 2s }\n",
    );
    let dir = TempDir::new("grpc-long");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let codes = grpc_calls(gw.addr, "alice", "StreamSlow", 1);
    assert_eq!(codes, ["OK"], "a 1.6 s stream with a 1 s default deadline");
}

/// A gRPC client stream is not cut at `limits.max_body_bytes` (8 KiB of messages against a
/// 1 KiB limit here): its body lasts as long as the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_client_stream_is_not_held_to_the_body_limit() {
    let server = grpc_server("g-1");
    let yaml = config_yaml(
        &[cell("g-1", "r1", &[], &[("g-1-a", server.addr)])],
        "limits: { max_body_bytes: 1024 }\n",
    );
    let dir = TempDir::new("grpc-stream-limit");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let codes = grpc_calls(gw.addr, "alice", "Collect", 2);
    assert_eq!(codes, ["OK", "OK"]);
}
