//! Upstream keep-alive against the real binary: a worker sends request after request over
//! the idle HTTP/1.1 connections it keeps to an instance, and
//! `limits.upstream_idle_per_instance` bounds how many it keeps (0: none, so every request
//! opens a connection of its own).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// An HTTP/1.1 upstream on loopback counting the connections that carried a proxied
/// request (health probes, which carry no `X-Request-ID`, are not counted). A `/pair`
/// request is answered only once a second one has arrived, so the two are in flight at
/// once for certain.
struct CountingUpstream {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CountingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn counting_upstream() -> CountingUpstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&conns);
    let pairs = Arc::new(tokio::sync::Barrier::new(2));
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counted = Arc::clone(&counted);
            let pairs = Arc::clone(&pairs);
            let seen = Arc::new(AtomicBool::new(false));
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    if req.headers().contains_key("x-request-id")
                        && !seen.swap(true, Ordering::SeqCst)
                    {
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                    let pair = (req.uri().path() == "/pair").then(|| Arc::clone(&pairs));
                    async move {
                        if let Some(pairs) = pair {
                            pairs.wait().await;
                        }
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                            b"ok",
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    CountingUpstream { addr, conns, task }
}

/// A one-worker gateway configured with `extra`, in front of `up`.
fn gateway_for(up: &CountingUpstream, extra: &str) -> (Gateway, TempDir) {
    let yaml = config_yaml(&[cell("a", "r1", &[], &[("a-1", up.addr)])], extra);
    let dir = TempDir::new("upstream-pool");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start_args(&[
        "run",
        "--config",
        dir.path("c.yaml").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
    ]);
    (gw, dir)
}

/// Send `n` requests one after another through a one-worker gateway configured with
/// `extra`; the upstream connections they used.
async fn connections_for(n: usize, extra: &str) -> usize {
    let up = counting_upstream().await;
    let (gw, _dir) = gateway_for(&up, extra);
    let mut client = H1::connect(gw.addr).await;
    for i in 0..n {
        let key = format!("user-{i}");
        let r = client.get("/pool", &[("x-user-id", key.as_str())]).await;
        assert_eq!(r.status, 200, "request {i}: {:?}", r.body);
        assert_eq!(r.body, "ok");
    }
    up.conns.load(Ordering::SeqCst)
}

#[tokio::test]
async fn idle_upstream_connections_are_reused() {
    let used = connections_for(20, "").await;
    // One connection, or two when a request arrives just before the previous response's
    // connection is ready again; never one per request.
    assert!(
        (1..=2).contains(&used),
        "20 sequential requests used {used} upstream connections"
    );
}

#[tokio::test]
async fn no_idle_connections_are_kept_when_the_limit_is_zero() {
    let used = connections_for(20, "limits:\n  upstream_idle_per_instance: 0\n").await;
    assert_eq!(
        used, 20,
        "every request opens (and closes) its own connection"
    );
}

/// Two requests at once, twice, through a one-worker gateway configured with `extra`; the
/// upstream connections they used.
async fn connections_for_two_pairs(extra: &str) -> usize {
    let up = counting_upstream().await;
    let (gw, _dir) = gateway_for(&up, extra);
    for pair in 0..2 {
        // The upstream answers neither before it holds both: a gateway sending them one
        // after another on one connection would stall here, and the timeout says so.
        let (a, b) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(
                get(gw.addr, "/pair", &[("x-user-id", "user-a")]),
                get(gw.addr, "/pair", &[("x-user-id", "user-b")]),
            )
        })
        .await
        .expect("both requests reached the upstream at once");
        assert_eq!(
            (a.status.as_u16(), b.status.as_u16()),
            (200, 200),
            "pair {pair}"
        );
        // Let the gateway's upstream connection tasks see their responses end (they are
        // ready for reuse from then on; nothing outside the gateway can observe it).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    up.conns.load(Ordering::SeqCst)
}

#[tokio::test]
async fn the_limit_bounds_the_idle_connections_kept() {
    // Two requests at once need two connections. At the default both are kept, and the
    // second pair reuses them; at 1 the second is closed when its response ends, and the
    // second pair opens one more.
    assert_eq!(connections_for_two_pairs("").await, 2);
    assert_eq!(
        connections_for_two_pairs("limits:\n  upstream_idle_per_instance: 1\n").await,
        3
    );
}
