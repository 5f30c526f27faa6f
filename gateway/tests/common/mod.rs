//! Test harness: the real `cellgate` binary as a child process, real upstream servers on
//! loopback (the demo upstream, in-process), and a small hyper client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "cellgate-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A demo upstream instance served in-process on a free loopback port.
pub struct Upstream {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn upstream(cell: &str, name: &str) -> Upstream {
    let listener = cellgate::demo::upstream::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (c, n) = (cell.to_owned(), name.to_owned());
    let task = tokio::spawn(async move {
        let _ = cellgate::demo::upstream::serve(listener, c, n).await;
    });
    Upstream { addr, task }
}

/// A loopback address nothing listens on.
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// The `cellgate` binary running as a child process.
pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl Gateway {
    /// `cellgate run --config <path> --listen 127.0.0.1:0`, waiting until it listens.
    pub fn start(config: &Path) -> Gateway {
        Self::start_args(&[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
        ])
    }

    pub fn start_args(args: &[&str]) -> Gateway {
        // The admin API on a free port unless the test names one (the default 9901 would
        // collide between tests running in parallel).
        let mut args: Vec<&str> = args.to_vec();
        if matches!(args.first(), Some(&"run" | &"demo")) && !args.contains(&"--admin-listen") {
            args.extend(["--admin-listen", "127.0.0.1:0"]);
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_cellgate"))
            .args(["--log-format", "json"])
            .args(&args)
            .env("CELLGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cellgate");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let logs2 = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["message"] == "listening" {
                        let _ = tx.send((
                            v["listener"].as_str().unwrap_or("").to_owned(),
                            v["addr"].as_str().unwrap_or("").to_owned(),
                        ));
                    }
                }
                logs2.lock().unwrap().push(line);
            }
        });
        let mut addr = None;
        let mut tls_addr = None;
        let mut admin_addr = None;
        let deadline = Instant::now() + Duration::from_secs(20);
        // The admin listener is announced last (after proxy and TLS).
        while addr.is_none() || admin_addr.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((l, a)) => {
                    let a: SocketAddr = a.parse().unwrap();
                    if l == "proxy" {
                        addr = Some(a);
                    } else if l == "tls" {
                        tls_addr = Some(a);
                    } else if l == "admin" {
                        admin_addr = Some(a);
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "cellgate did not start listening; logs: {:?}",
                        logs.lock().unwrap()
                    );
                }
            }
        }
        Gateway {
            child,
            addr: addr.unwrap(),
            tls_addr,
            admin_addr,
            logs,
        }
    }

    pub fn logs_contain(&self, needle: &str) -> bool {
        self.logs.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    pub fn count_logs(&self, needle: &str) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Wait (bounded) until a log line contains `needle`.
    pub async fn wait_log(&self, needle: &str, within: Duration) -> bool {
        self.wait_logs(needle, 1, within).await
    }

    /// Wait (bounded) until `n` log lines contain `needle`.
    pub async fn wait_logs(&self, needle: &str, n: usize, within: Duration) -> bool {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if self.count_logs(needle) >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub mod etcd;
pub mod tls;

/// A response, fully read.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// The upstream's echo of a request header.
    pub fn echoed(&self, name: &str) -> Option<String> {
        self.json()["headers"][name].as_str().map(str::to_owned)
    }
}

/// A keep-alive HTTP/1.1 connection.
pub struct H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>);

impl H1 {
    pub async fn connect(addr: SocketAddr) -> H1 {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        H1(tx)
    }

    /// Whether the connection can take another request (false once the gateway closed it).
    pub async fn is_ready(&mut self) -> bool {
        self.0.ready().await.is_ok()
    }

    pub async fn try_get(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Resp, hyper::Error> {
        let mut b = Request::get(path).header("host", "gateway.test");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.0.ready().await?;
        let res = self
            .0
            .send_request(b.body(Full::new(Bytes::new())).unwrap())
            .await?;
        let (parts, body) = res.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Resp {
        self.try_get(path, headers).await.unwrap()
    }
}

/// One request on a new HTTP/1.1 connection.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    H1::connect(addr).await.get(path, headers).await
}

/// POST JSON to a demo upstream's `/fault`.
pub async fn fault(addr: SocketAddr, body: &str) {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::post("/fault")
        .header("host", "upstream")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let res = tx.send_request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "fault {body}");
}

/// Minimal YAML for a set of cells: `(id, region, failover, [(name, addr, labels)])`.
pub struct CellDef<'a> {
    pub id: &'a str,
    pub region: &'a str,
    pub state: &'a str,
    pub failover: &'a [&'a str],
    pub instances: Vec<(String, SocketAddr)>,
}

pub fn cell<'a>(
    id: &'a str,
    region: &'a str,
    failover: &'a [&'a str],
    instances: &[(&str, SocketAddr)],
) -> CellDef<'a> {
    CellDef {
        id,
        region,
        state: "active",
        failover,
        instances: instances
            .iter()
            .map(|(n, a)| ((*n).to_owned(), *a))
            .collect(),
    }
}

pub fn config_yaml(cells: &[CellDef<'_>], extra: &str) -> String {
    let mut regions: Vec<&str> = cells.iter().map(|c| c.region).collect();
    regions.dedup();
    regions.sort();
    regions.dedup();
    let mut y = format!("regions: [{}]\ncells:\n", regions.join(", "));
    for c in cells {
        y.push_str(&format!(
            "  - id: {}\n    region: {}\n    state: {}\n    failover: [{}]\n    instances:\n",
            c.id,
            c.region,
            c.state,
            c.failover.join(", ")
        ));
        for (n, a) in &c.instances {
            y.push_str(&format!("      - {{ name: {n}, addr: \"{a}\" }}\n"));
        }
    }
    y.push_str(extra);
    y
}

/// The table a configuration text builds, to compute expected decisions.
pub fn table_of(yaml: &str) -> cellgate_routing::RoutingTable {
    let cfg = cellgate_config::Config::from_yaml(yaml).unwrap();
    cfg.build_table(1, &cellgate_health::HealthRegistry::new())
        .unwrap()
}

pub fn expected_cell(table: &cellgate_routing::RoutingTable, key: &str) -> String {
    let e = table.explain(key, cellgate_health::now_ms()).unwrap();
    e.cell
}

/// One response seen by [`Load`].
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    pub key: String,
    pub status: u16,
    pub cell: String,
    pub instance: String,
}

/// A bounded load: `clients` keep-alive connections cycling over `keys` until stopped or
/// `max` has passed. Every response (or transport error, as status 0) is recorded.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(
        addr: SocketAddr,
        keys: Vec<String>,
        clients: usize,
        max: Duration,
        extra: &[(&'static str, &'static str)],
    ) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let keys = Arc::new(keys);
        let extra: Arc<Vec<(&'static str, &'static str)>> = Arc::new(extra.to_vec());
        let mut tasks = Vec::new();
        for c in 0..clients {
            let (stop, samples, keys, extra) = (
                Arc::clone(&stop),
                Arc::clone(&samples),
                Arc::clone(&keys),
                Arc::clone(&extra),
            );
            tasks.push(tokio::spawn(async move {
                let end = Instant::now() + max;
                let mut conn = H1::connect(addr).await;
                let mut i = c;
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    let key = keys[i % keys.len()].clone();
                    i += clients;
                    let mut h: Vec<(&str, &str)> = vec![("x-user-id", key.as_str())];
                    h.extend(extra.iter().copied());
                    let s = match conn.try_get("/load", &h).await {
                        Ok(r) => {
                            let (cell, instance) =
                                match serde_json::from_slice::<serde_json::Value>(&r.body) {
                                    Ok(v) => (
                                        v["cell"].as_str().unwrap_or("").to_owned(),
                                        v["instance"].as_str().unwrap_or("").to_owned(),
                                    ),
                                    Err(_) => (String::new(), String::new()),
                                };
                            Sample {
                                at: Instant::now(),
                                key,
                                status: r.status.as_u16(),
                                cell,
                                instance,
                            }
                        }
                        Err(e) => {
                            eprintln!("load client transport error: {e}");
                            conn = H1::connect(addr).await;
                            Sample {
                                at: Instant::now(),
                                key,
                                status: 0,
                                cell: String::new(),
                                instance: String::new(),
                            }
                        }
                    };
                    samples.lock().unwrap().push(s);
                }
            }));
        }
        Load {
            stop,
            samples,
            tasks,
        }
    }

    /// Samples so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    /// Wait (bounded) until `pred` holds for the samples so far.
    pub async fn wait_for(&self, within: Duration, pred: impl Fn(&[Sample]) -> bool) -> bool {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if pred(&self.samples.lock().unwrap()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub async fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let s = self.samples.lock().unwrap().clone();
        s
    }
}

/// Keys whose home cell is `cell` under `table`.
pub fn keys_in(table: &cellgate_routing::RoutingTable, cell: &str, n: usize) -> Vec<String> {
    (0..100_000)
        .map(|i| format!("user-{i}"))
        .filter(|k| table.explain(k, 1).unwrap().home_cell == cell)
        .take(n)
        .collect()
}

/// Wait (bounded) until connections to `addr` are refused.
pub async fn wait_refusing(addr: SocketAddr) {
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{addr} still accepts connections");
}
