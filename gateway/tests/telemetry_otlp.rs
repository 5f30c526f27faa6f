//! Traces exported over OTLP to a receiver that decodes them with the official protobuf
//! definitions: the gateway's span is a child of the client's `traceparent`, and its span id
//! is the parent the upstream sees.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

const RECEIVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/otlp/receiver.py");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_span_is_a_child_of_the_client_traceparent() {
    let mut receiver = Command::new("python3")
        .arg(RECEIVER)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 with opentelemetry-proto (the test command installs it)");
    let mut lines = BufReader::new(receiver.stdout.take().unwrap()).lines();
    let port: u16 = lines.next().unwrap().unwrap().trim().parse().unwrap();
    let (tx, rx) = mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            let _ = tx.send(serde_json::from_str(&l).unwrap());
        }
    });

    let up = upstream("a", "a-1");
    let yaml = config_yaml(
        &[cell("a", "r1", &[], &[("a-1", up.addr)])],
        &format!("telemetry:\n  otlp_endpoint: http://127.0.0.1:{port}/v1/traces\n  service_name: cellgate-test\n"),
    );
    let dir = TempDir::new("otlp");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let client_tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let r = get(
        gw.addr,
        "/traced",
        &[
            ("x-user-id", "alice"),
            ("traceparent", client_tp),
            ("x-request-id", "trace-req-1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let upstream_tp = r.echoed("traceparent").unwrap();

    let span = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a span reached the receiver");
    receiver.kill().ok();
    receiver.wait().ok();
    assert!(
        span.get("error").is_none(),
        "receiver rejected the export: {span}"
    );
    assert_eq!(span["service"], "cellgate-test");
    assert_eq!(
        span["trace_id"], "0af7651916cd43dd8448eb211c80319c",
        "same trace as the client"
    );
    assert_eq!(
        span["parent_span_id"], "b7ad6b7169203331",
        "child of the client's span"
    );
    assert_eq!(
        span["span_id"],
        &upstream_tp[36..52],
        "the upstream's parent is the gateway span"
    );
    assert_eq!(span["kind"], 2, "server span");
    assert_eq!(
        span["attributes"]["cellgate.request_id"]["stringValue"],
        "trace-req-1"
    );
    assert_eq!(span["attributes"]["cellgate.cell"]["stringValue"], "a");
    assert_eq!(
        span["attributes"]["http.response.status_code"]["intValue"],
        "200"
    );
    let (start, end) = (
        span["start"].as_u64().unwrap(),
        span["end"].as_u64().unwrap(),
    );
    assert!(end >= start && end - start < 5_000_000_000);
    // Nothing was dropped, and the counter says so.
    let m = get(gw.admin_addr.expect("admin listener"), "/metrics", &[]).await;
    assert!(
        String::from_utf8_lossy(&m.body)
            .lines()
            .any(|l| l == "cellgate_trace_spans_dropped_total 0"),
        "no dropped-spans counter"
    );
}
