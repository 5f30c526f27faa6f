//! The L7 business probe speaks to an instance the way live traffic does: over the cell's
//! upstream TLS (its CA and name) and in the cell's protocol (HTTP/1.1, or HTTP/2 for an
//! `h2c` cell, in plaintext or over TLS). An instance that answers its probes stays up and
//! its cell keeps serving; one whose `/healthz` answers 503 is still marked down.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::tls::{ca, leaf, Pem};
use common::*;
use http::{Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

/// The name on the upstream's certificate, which the cell's TLS verifies.
const NAME: &str = "upstream.test";

/// How often the probes run in these tests, and how few failures mark an instance down.
const HEALTH: &str = "admin: { token: t0ken }
health:
  probe: { interval: 100ms, timeout: 1s, rise: 1, fall: 2 }
";

/// One request an upstream received.
#[derive(Clone, Debug)]
struct Seen {
    /// Path and query.
    target: String,
    version: Version,
    tls: bool,
    user_agent: String,
    /// `Host`, or the URI's authority under HTTP/2.
    authority: String,
}

impl Seen {
    fn is_probe(&self, cell: &str) -> bool {
        self.target == format!("/healthz?cell={cell}") && self.user_agent == "cellgate-probe"
    }
}

/// How an upstream serves.
#[derive(Clone, Copy)]
enum Serves {
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 only, prior knowledge in plaintext (h2c) or by ALPN `h2` over TLS.
    Http2,
}

/// An upstream on loopback that records every request; `/healthz` answers `healthz`,
/// anything else 200. Over TLS with `cert` when given.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    async fn start(serves: Serves, cert: Option<&Pem>, healthz: StatusCode) -> Recorder {
        let alpn: &[u8] = match serves {
            Serves::Http1 => b"http/1.1",
            Serves::Http2 => b"h2",
        };
        let acceptor = cert.map(|c| common::tls::acceptor(c, &[alpn]));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { break };
                let (acceptor, seen) = (acceptor.clone(), Arc::clone(&seen2));
                tokio::spawn(async move {
                    match acceptor {
                        None => serve(s, serves, false, seen, healthz).await,
                        Some(a) => {
                            if let Ok(s) = a.accept(s).await {
                                serve(s, serves, true, seen, healthz).await;
                            }
                        }
                    }
                });
            }
        });
        Recorder { addr, seen, task }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn probes(&self, cell: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.is_probe(cell))
            .collect()
    }

    /// Wait (bounded) until the upstream has received `n` probe requests of `cell`.
    async fn wait_probes(&self, cell: &str, n: usize) -> Vec<Seen> {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let p = self.probes(cell);
            if p.len() >= n {
                return p;
            }
            assert!(
                Instant::now() < end,
                "{} probe requests of {n} after 10 s; received: {:?}",
                p.len(),
                self.seen()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn serve<S>(
    io: S,
    serves: Serves,
    tls: bool,
    seen: Arc<Mutex<Vec<Seen>>>,
    healthz: StatusCode,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<Incoming>| {
        let header = |name: http::header::HeaderName| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let authority = match req.uri().authority() {
            Some(a) => a.to_string(),
            None => header(http::header::HOST),
        };
        let target = req
            .uri()
            .path_and_query()
            .map(ToString::to_string)
            .unwrap_or_default();
        let status = if req.uri().path() == "/healthz" {
            healthz
        } else {
            StatusCode::OK
        };
        seen.lock().unwrap().push(Seen {
            target,
            version: req.version(),
            tls,
            user_agent: header(http::header::USER_AGENT),
            authority,
        });
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(br#"{"db_pool_usage": 0.1}"#)))
                    .unwrap(),
            )
        }
    });
    let io = TokioIo::new(io);
    let _ = match serves {
        Serves::Http1 => {
            hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
        }
        Serves::Http2 => {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, svc)
                .await
        }
    };
}

/// A gateway with one cell `a` whose only instance is `up`; `cell_extra` is YAML added to
/// the cell (`tls:`, `protocol:`).
fn gateway(dir: &TempDir, up: SocketAddr, cell_extra: &str) -> Gateway {
    let yaml = format!(
        "{HEALTH}regions: [r1]\ncells:\n  - id: a\n    region: r1\n{cell_extra}    instances: [ {{ name: a-1, addr: \"{up}\" }} ]\n"
    );
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    Gateway::start(&dir.path("c.yaml"))
}

/// The cell's TLS section, trusting the CA that signed the upstream's certificate.
fn tls_section(dir: &TempDir, pem: &str) -> String {
    std::fs::write(dir.path("ca.pem"), pem).unwrap();
    format!(
        "    tls: {{ ca_file: {}, server_name: {NAME} }}\n",
        dir.path("ca.pem").display()
    )
}

async fn admin_cell(gw: &Gateway, id: &str) -> serde_json::Value {
    let r = get(
        gw.admin_addr.unwrap(),
        &format!("/admin/cells/{id}"),
        &[("authorization", "Bearer t0ken")],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.json()
}

/// After many probe rounds the instance is still up, the cell serves, and no verdict ever
/// changed; a proxied request gets 200 from the upstream.
async fn assert_stays_up(gw: &Gateway, up: &Recorder) -> Vec<Seen> {
    // Ten probes take at least nine intervals: far more than `fall` failures would need.
    let probes = up.wait_probes("a", 10).await;
    let cell = admin_cell(gw, "a").await;
    assert_eq!(cell["serving"], true, "{cell}");
    assert_eq!(cell["instances"][0]["available"], true, "{cell}");
    assert_eq!(cell["instances_up"], 1, "{cell}");
    assert!(
        !gw.logs_contain("probe verdict changed"),
        "a probe verdict changed: {:?}",
        gw.logs.lock().unwrap()
    );
    let r = get(gw.addr, "/served", &[("x-user-id", "alice")]).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.header("x-cell-id"), Some("a"));
    assert!(
        up.seen().iter().any(|s| s.target == "/served"),
        "the proxied request reached the upstream"
    );
    probes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_instance_answering_its_probes_stays_up_and_is_probed_over_tls() {
    let authority = ca("cellgate test CA");
    let cert = leaf(&authority, NAME);
    let up = Recorder::start(Serves::Http1, Some(&cert), StatusCode::OK).await;
    let dir = TempDir::new("probe-tls");
    let gw = gateway(&dir, up.addr, &tls_section(&dir, &authority.pem));

    let probes = assert_stays_up(&gw, &up).await;
    for p in &probes {
        assert!(p.tls && p.version == Version::HTTP_11, "{p:?}");
        // The cell's TLS name is the probe's Host.
        assert_eq!(p.authority, format!("{NAME}:{}", up.addr.port()), "{p:?}");
    }
    assert!(up.seen().iter().all(|s| s.tls));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_only_instance_answering_its_probes_stays_up_and_is_probed_over_http2() {
    let up = Recorder::start(Serves::Http2, None, StatusCode::OK).await;
    let dir = TempDir::new("probe-h2c");
    let gw = gateway(&dir, up.addr, "    protocol: h2c\n");

    let probes = assert_stays_up(&gw, &up).await;
    for p in &probes {
        assert!(!p.tls && p.version == Version::HTTP_2, "{p:?}");
        assert_eq!(p.authority, up.addr.to_string(), "{p:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_cell_with_upstream_tls_is_probed_over_h2_by_alpn() {
    let authority = ca("cellgate test CA");
    let cert = leaf(&authority, NAME);
    let up = Recorder::start(Serves::Http2, Some(&cert), StatusCode::OK).await;
    let dir = TempDir::new("probe-h2-tls");
    let extra = format!("    protocol: h2c\n{}", tls_section(&dir, &authority.pem));
    let gw = gateway(&dir, up.addr, &extra);

    let probes = assert_stays_up(&gw, &up).await;
    for p in &probes {
        assert!(p.tls && p.version == Version::HTTP_2, "{p:?}");
    }
}

/// An instance whose `/healthz` answers 503 is marked down after `fall` probes and its cell
/// (with nowhere to fail over to) stops serving — in plaintext as before, and over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_answering_503_to_its_probes_is_marked_down_in_plaintext_and_over_tls() {
    let authority = ca("cellgate test CA");
    let cert = leaf(&authority, NAME);
    for tls in [false, true] {
        let up = Recorder::start(
            Serves::Http1,
            tls.then_some(&cert),
            StatusCode::SERVICE_UNAVAILABLE,
        )
        .await;
        let dir = TempDir::new("probe-503");
        let extra = if tls {
            tls_section(&dir, &authority.pem)
        } else {
            String::new()
        };
        let gw = gateway(&dir, up.addr, &extra);

        assert!(
            gw.wait_log("probe verdict changed", Duration::from_secs(10))
                .await,
            "tls {tls}: the instance was never marked down; received: {:?}",
            up.seen()
        );
        let probes = up.probes("a");
        assert!(probes.len() >= 2, "tls {tls}: {probes:?}");
        assert!(probes.iter().all(|p| p.tls == tls), "tls {tls}: {probes:?}");
        let cell = admin_cell(&gw, "a").await;
        assert_eq!(
            cell["instances"][0]["available"], false,
            "tls {tls}: {cell}"
        );
        assert_eq!(cell["serving"], false, "tls {tls}: {cell}");
        let r = get(gw.addr, "/served", &[("x-user-id", "alice")]).await;
        assert_eq!(r.status, 503, "tls {tls}: {:?}", r.body);
        assert!(
            !up.seen().iter().any(|s| s.target == "/served"),
            "tls {tls}: a request went to an instance marked down"
        );
    }
}
