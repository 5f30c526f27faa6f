//! Bad input and failures get the SPEC's JSON errors (and never a panic): 400 bad or
//! missing key, 502 upstream refused, 503 no serving cell, 504 deadline, 400 malformed HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn assert_json_error(r: &Resp, status: u16, needle: &str) {
    assert_eq!(r.status, status, "body: {:?}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains(needle),
        "error {msg:?} should mention {needle:?}"
    );
    let rid = v["request_id"].as_str().unwrap();
    assert!(!rid.is_empty());
    assert_eq!(r.header("x-request-id"), Some(rid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_missing_keys_and_malformed_deadlines_are_400() {
    let up = upstream("a", "a-1");
    let yaml = config_yaml(
        &[cell("a", "r1", &[], &[("a-1", up.addr)])],
        "routing:\n  anonymous: { policy: reject }\n  key_sources: [ { header: X-User-ID }, { query: uid } ]\n",
    );
    let dir = TempDir::new("e400");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));

    assert_json_error(&get(gw.addr, "/", &[]).await, 400, "no routing key");
    let long = "k".repeat(257);
    assert_json_error(
        &get(gw.addr, "/", &[("x-user-id", &long)]).await,
        400,
        "257 bytes",
    );
    let ok = "k".repeat(256);
    assert_eq!(get(gw.addr, "/", &[("x-user-id", &ok)]).await.status, 200);
    assert_json_error(
        &get(gw.addr, "/?uid=a%01b", &[]).await,
        400,
        "control character",
    );
    assert_json_error(
        &get(gw.addr, "/", &[("x-user-id", "a\tb")]).await,
        400,
        "control character",
    );
    assert_json_error(&get(gw.addr, "/?uid=%FF%FE", &[]).await, 400, "UTF-8");
    assert_json_error(
        &get(
            gw.addr,
            "/",
            &[("x-user-id", "alice"), ("x-timeout", "soon")],
        )
        .await,
        400,
        "X-Timeout",
    );
    // The gateway still serves.
    assert_eq!(get(gw.addr, "/?uid=alice", &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upstreams_are_502_and_no_serving_cell_is_503() {
    let dead1 = dead_addr();
    let dead2 = dead_addr();
    let yaml = config_yaml(
        &[cell("a", "r1", &[], &[("a-1", dead1), ("a-2", dead2)])],
        "",
    );
    let dir = TempDir::new("e502");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let r = get(gw.addr, "/", &[("x-user-id", "alice")]).await;
    assert_json_error(&r, 502, "cannot connect");
    assert_eq!(r.header("x-cell-id"), Some("a"));

    // Every cell disabled or draining: 503.
    let up = upstream("b", "b-1");
    let mut cells = vec![
        cell("a", "r1", &["b"], &[("a-1", up.addr)]),
        cell("b", "r1", &[], &[("b-1", up.addr)]),
    ];
    cells[0].state = "draining";
    cells[1].state = "disabled";
    let yaml = config_yaml(&cells, "");
    std::fs::write(dir.path("d.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("d.yaml"));
    for key in ["alice", "bob", "carol"] {
        assert_json_error(
            &get(gw.addr, "/", &[("x-user-id", key)]).await,
            503,
            "no healthy cell",
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_past_the_deadline_is_504_on_time() {
    let up = upstream("a", "a-1");
    fault(up.addr, r#"{"delay_ms": 3000}"#).await;
    let yaml = config_yaml(
        &[cell("a", "r1", &[], &[("a-1", up.addr)])],
        "timeouts: { default: 400ms, max: 5s }\n",
    );
    let dir = TempDir::new("e504");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let t = Instant::now();
    let r = get(gw.addr, "/", &[("x-user-id", "alice")]).await;
    assert_json_error(&r, 504, "deadline");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(2000),
        "default deadline, took {took:?}"
    );
    let t = Instant::now();
    let r = get(
        gw.addr,
        "/",
        &[("x-user-id", "alice"), ("x-timeout", "150ms")],
    )
    .await;
    assert_json_error(&r, 504, "150 ms");
    assert!(t.elapsed() < Duration::from_millis(1500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_is_400_and_the_gateway_keeps_serving() {
    let up = upstream("a", "a-1");
    let yaml = config_yaml(&[cell("a", "r1", &[], &[("a-1", up.addr)])], "");
    let dir = TempDir::new("e400raw");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    for raw in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf);
        assert!(
            text.starts_with("HTTP/1.1 400"),
            "{:?} answered {text:?}",
            String::from_utf8_lossy(raw)
        );
    }
    assert_eq!(
        get(gw.addr, "/", &[("x-user-id", "alice")]).await.status,
        200
    );
}

/// A retryable answer whose retry finds nowhere to go reaches the client as the upstream
/// gave it, not as a gateway 502: here the cell's other instance has weight 0, so smooth
/// WRR never picks it, and the budgeted retry of the 503 has no instance to take it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_nowhere_to_go_returns_the_upstream_answer() {
    let (a1, a2) = (upstream("a", "a-1"), upstream("a", "a-2"));
    fault(a1.addr, r#"{"error_rate": 1.0, "status": 503}"#).await;
    let yaml = format!(
        "regions: [r1]
cells:
  - id: a
    region: r1
    instances:
      - {{ name: a-1, addr: \"{}\" }}
      - {{ name: a-2, addr: \"{}\", weight: 0 }}
health:
  outlier: {{ consecutive_failures: 100000, failure_ratio: 1.0, min_requests: 100000 }}
  breaker: {{ min_requests: 100000 }}
  failover: {{ min_requests: 100000 }}
",
        a1.addr, a2.addr
    );
    let dir = TempDir::new("retry-nowhere");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let mut c = H1::connect(gw.addr).await;
    for i in 0..5 {
        let r = c.get("/", &[("x-user-id", "alice")]).await;
        assert_eq!(r.status, 503, "request {i}: {:?}", r.body);
        let v = r.json();
        assert_eq!(
            v["error"], "injected fault",
            "request {i}: the upstream's own body"
        );
        assert_eq!(v["instance"], "a-1");
        assert_eq!(r.header("x-cell-id"), Some("a"));
        assert!(r.header("x-request-id").is_some());
    }
}

/// A keyless request hinted to a region whose chosen cell refuses every connection moves
/// to another cell of that region, not to the default region: the retry keeps the
/// request's region hint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_retry_stays_in_the_hinted_region() {
    let (a, c2) = (upstream("a", "a-1"), upstream("c2", "c2-1"));
    let dead = dead_addr();
    let yaml = format!(
        "regions: [r1, r2]
routing:
  anonymous: {{ policy: region, default_region: r1 }}
cells:
  - id: a
    region: r1
    instances: [{{ name: a-1, addr: \"{}\" }}]
  - id: c1
    region: r2
    weight: 1000000
    instances: [{{ name: c1-1, addr: \"{}\" }}]
  - id: c2
    region: r2
    weight: 1
    instances: [{{ name: c2-1, addr: \"{}\" }}]
",
        a.addr, dead, c2.addr
    );
    let dir = TempDir::new("hint-retry");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    // The first request picks c1 (nearly all the region's weight), which refuses.
    let r = get(gw.addr, "/k", &[("x-region-hint", "r2")]).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.header("x-cell-id"), Some("c2"), "stayed in region r2");
    assert_eq!(r.json()["instance"], "c2-1");
}

/// A deadline the client shortened (`X-Timeout`) that runs out is a 504 for that client
/// but is not held against the upstream: a client cannot eject instances (or fail a cell
/// over) by asking for impossible deadlines. The route's own deadline running out is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_the_client_shortened_does_not_count_against_the_upstream() {
    let up = upstream("a", "a-1");
    fault(up.addr, r#"{"delay_ms": 300}"#).await;
    let yaml = config_yaml(
        &[cell("a", "r1", &[], &[("a-1", up.addr)])],
        "timeouts: { default: 2s, max: 5s }\n",
    );
    let dir = TempDir::new("e504client");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    // Twice the consecutive failures that eject an instance.
    for _ in 0..10 {
        let r = get(
            gw.addr,
            "/",
            &[("x-user-id", "alice"), ("x-timeout", "20ms")],
        )
        .await;
        assert_json_error(&r, 504, "20 ms");
    }
    let r = get(gw.addr, "/", &[("x-user-id", "alice")]).await;
    assert_eq!(r.status, 200);
    assert!(
        !gw.logs_contain("instance ejected"),
        "ejected by client deadlines"
    );

    // A shortened deadline that left the instance four times its usual latency (p95 of
    // ~300 ms answers, read as the 500 ms bin) is counted: a hung instance behind
    // clients that always send one (gRPC, a gateway in front) is still ejected.
    let yaml10 = config_yaml(
        &[cell("a", "r1", &[], &[("a-1", up.addr)])],
        "timeouts: { default: 10s, max: 20s }\n",
    );
    std::fs::write(dir.path("e.yaml"), &yaml10).unwrap();
    let gw10 = Gateway::start(&dir.path("e.yaml"));
    for _ in 0..5 {
        let r = get(gw10.addr, "/", &[("x-user-id", "alice")]).await;
        assert_eq!(r.status, 200);
    }
    fault(up.addr, r#"{"delay_ms": 5000}"#).await;
    let hung: Vec<_> = (0..5)
        .map(|_| {
            let addr = gw10.addr;
            tokio::spawn(async move {
                get(
                    addr,
                    "/",
                    &[("x-user-id", "alice"), ("x-timeout", "2500ms")],
                )
                .await
            })
        })
        .collect();
    for h in hung {
        assert_eq!(h.await.unwrap().status, 504);
    }
    assert!(
        gw10.wait_log("instance ejected", Duration::from_secs(5))
            .await,
        "a hung instance behind generous client deadlines was not ejected"
    );
    fault(up.addr, r#"{"delay_ms": 300}"#).await;

    // The same upstream past the route's own deadline is counted: ejected after five.
    let yaml = config_yaml(
        &[cell("a", "r1", &[], &[("a-1", up.addr)])],
        "timeouts: { default: 20ms, max: 5s }\n",
    );
    std::fs::write(dir.path("d.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("d.yaml"));
    for _ in 0..5 {
        let r = get(gw.addr, "/", &[("x-user-id", "alice")]).await;
        assert_eq!(r.status, 504);
    }
    assert!(
        gw.wait_log("instance ejected", Duration::from_secs(5))
            .await,
        "the route's deadline is the upstream's failure"
    );
}

/// Routes by path prefix carry their own deadlines: a route's default and cap apply to
/// its paths (`X-Timeout` is capped at the route's `max_timeout`), other paths keep the
/// table's; and a route's SLO class applies to its requests that send none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_set_their_own_deadlines_and_slo_class() {
    let up = upstream("a", "a-1");
    fault(up.addr, r#"{"delay_ms": 1000}"#).await;
    let yaml = config_yaml(
        &[cell("a", "r1", &[], &[("a-1", up.addr)])],
        "timeouts: { default: 5s, max: 10s }
routes:
  - { path_prefix: /quick, timeout: 200ms, max_timeout: 500ms }
  - { path_prefix: /batch, slo_class: best-effort }
shedding: { max_in_flight: 2, standard_at: 1.0, best_effort_at: 0.5 }
",
    );
    let dir = TempDir::new("routes");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let timed = |path: &'static str, t: Option<&'static str>| {
        let addr = gw.addr;
        async move {
            let mut h = vec![("x-user-id", "alice")];
            if let Some(t) = t {
                h.push(("x-timeout", t));
            }
            let t0 = Instant::now();
            let r = get(addr, path, &h).await;
            (r, t0.elapsed())
        }
    };
    // The route's default: 504 after ~200 ms.
    let (r, took) = timed("/quick/item", None).await;
    assert_json_error(&r, 504, "200 ms");
    assert!(took < Duration::from_millis(900), "{took:?}");
    // Asking for more is capped at its max_timeout (500 ms).
    let (r, took) = timed("/quick", Some("3s")).await;
    assert_json_error(&r, 504, "500 ms");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(950),
        "{took:?}"
    );
    // A path that only starts with the same letters is not the route: the table's 5 s.
    let (r, _) = timed("/quickly", None).await;
    assert_eq!(r.status, 200);
    let (r, _) = timed("/other", Some("3s")).await;
    assert_eq!(r.status, 200);

    // With one request in flight, the best-effort route is shed (its class's limit is
    // 1) while standard requests, and the route's own requests that ask for standard,
    // go through.
    let busy = tokio::spawn(timed("/other", None));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (r, _) = timed("/batch/job", None).await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    let addr = gw.addr;
    let r = get(
        addr,
        "/batch/job",
        &[("x-user-id", "alice"), ("x-slo-class", "standard")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(busy.await.unwrap().0.status, 200);
}

/// A route's adaptive deadline follows its answers: clamp(p95 × factor, min, max). After
/// answers of ~300 ms (p95 read as the 500 ms bin), a request to an upstream that got slow
/// is cut at about 2 × 500 ms, not at the route's 5 s default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adaptive_route_deadline_follows_the_latencies() {
    let up = upstream("a", "a-1");
    fault(up.addr, r#"{"delay_ms": 300}"#).await;
    let yaml = config_yaml(
        &[cell("a", "r1", &[], &[("a-1", up.addr)])],
        "timeouts: { default: 5s, max: 10s }
routes:
  - { path_prefix: /api, adaptive_timeout: { factor: 2, min: 100ms, max: 3s } }
",
    );
    let dir = TempDir::new("adaptive");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let addr = gw.addr;
    let calls: Vec<_> = (0..10)
        .map(|_| tokio::spawn(async move { get(addr, "/api/x", &[("x-user-id", "alice")]).await }))
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap().status, 200);
    }
    // The controller recomputes it on its next tick.
    tokio::time::sleep(Duration::from_millis(600)).await;
    fault(up.addr, r#"{"delay_ms": 2500}"#).await;
    let t0 = Instant::now();
    let r = get(addr, "/api/x", &[("x-user-id", "alice")]).await;
    let took = t0.elapsed();
    assert_json_error(&r, 504, "1000 ms");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1800),
        "{took:?}"
    );
    // The cut request is learnt from too: the deadline rises (to the route's 3 s max), and
    // the slower upstream is answered again instead of being cut for good.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = get(addr, "/api/x", &[("x-user-id", "alice")]).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
}
