//! Real etcd for the tests: single nodes and clusters of Debian's `etcd` 3.4 on free
//! loopback ports with temporary data directories, started and stopped by pid; a TCP relay
//! that can cut a gateway off from etcd; admin API helpers; a bounded request load.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellgate_config::etcd::EtcdStore;
use http::Method;
use serde_json::Value;

use super::TempDir;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One member of a test cluster.
pub struct Member {
    pub name: String,
    pub client: u16,
    pub peer: u16,
    child: Option<Child>,
}

/// A running etcd (one member or several).
pub struct Etcd {
    pub members: Vec<Member>,
    dir: TempDir,
    cluster: String,
    token: String,
}

/// Serializes the heavy etcd tests of one test binary (2 cores; raft timing matters).
pub fn serial() -> &'static tokio::sync::Mutex<()> {
    static M: std::sync::OnceLock<tokio::sync::Mutex<()>> = std::sync::OnceLock::new();
    M.get_or_init(|| tokio::sync::Mutex::new(()))
}

impl Etcd {
    pub async fn single() -> Etcd {
        Self::cluster(1).await
    }

    pub async fn cluster(n: usize) -> Etcd {
        assert!(
            Command::new("etcd").arg("--version").output().is_ok(),
            "etcd is not installed (scripts/test installs Debian's etcd-server)"
        );
        let dir = TempDir::new("etcd");
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                child: None,
            })
            .collect();
        let cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut e = Etcd {
            members,
            dir,
            cluster,
            token: format!("cellgate-test-{}-{}", std::process::id(), free_port()),
        };
        for i in 0..n {
            e.spawn(i);
        }
        e.wait_ready(Duration::from_secs(20)).await;
        e
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let data = self.dir.path(&m.name);
        let log = std::fs::File::create(self.dir.path(&format!("{}.log", m.name))).unwrap();
        let child = Command::new("etcd")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{}", m.client),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{}", m.client),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", m.peer),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", m.peer),
                "--initial-cluster",
                &self.cluster,
                "--initial-cluster-token",
                &self.token,
                "--initial-cluster-state",
                "new",
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "1000",
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.members[i].child = Some(child);
    }

    pub fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client)
    }

    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.url(i)).collect()
    }

    pub fn endpoints_arg(&self) -> String {
        self.endpoints().join(",")
    }

    /// A client on every member still running.
    pub async fn store(&self) -> EtcdStore {
        let eps: Vec<String> = (0..self.members.len())
            .filter(|&i| self.members[i].child.is_some())
            .map(|i| self.url(i))
            .collect();
        EtcdStore::connect(&eps, "/cellgate/").await.unwrap()
    }

    /// Wait (bounded) until the running members answer a read.
    pub async fn wait_ready(&self, within: Duration) {
        let store = self.store().await;
        let end = Instant::now() + within;
        loop {
            if store.raw_get("probe").await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < end,
                "etcd did not become ready within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL member `i` and wait for it to exit.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start member `i` again on its data directory.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none());
        self.spawn(i);
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// A loopback TCP relay in front of an address; closing it cuts every connection and
/// refuses new ones until it is opened again.
pub struct Relay {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (o, cs) = (Arc::clone(&open), Arc::clone(&conns));
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = l.accept().await else {
                    continue;
                };
                if !o.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let h = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                cs.lock().unwrap().push(h);
            }
        });
        Relay {
            addr,
            open,
            conns,
            accept,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.close();
        self.accept.abort();
    }
}

pub const TOKEN: &str = "test-token";

/// Call a gateway's admin API; `Ok(json)` on 2xx, `Err((status, error))` otherwise.
pub async fn admin(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, (u16, String)> {
    match cellgate::ctl::call(&addr.to_string(), Some(TOKEN), method, path, body).await {
        Ok(v) => Ok(v),
        Err(cellgate::ctl::CtlError::Status { status, message }) => Err((status.as_u16(), message)),
        Err(e) => Err((0, e.to_string())),
    }
}

pub async fn admin_get(addr: SocketAddr, path: &str) -> Value {
    admin(addr, Method::GET, path, None)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e:?}"))
}

/// The table version a gateway serves.
pub async fn version(addr: SocketAddr) -> u64 {
    admin_get(addr, "/admin/table").await["version"]
        .as_u64()
        .unwrap()
}

/// Wait (bounded) until `cond` holds for the gateway's `/readyz`.
pub async fn wait_ready_state(
    addr: SocketAddr,
    within: Duration,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let end = Instant::now() + within;
    loop {
        let v = admin_get(addr, "/readyz").await;
        if cond(&v) {
            return v;
        }
        assert!(Instant::now() < end, "readyz never matched; last {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait (bounded) until every gateway serves table version `v`; returns how long it took.
pub async fn wait_version(admins: &[SocketAddr], v: u64, within: Duration) -> Duration {
    let start = Instant::now();
    for &a in admins {
        loop {
            let got = version(a).await;
            if got >= v {
                assert_eq!(got, v, "{a} went past version {v}");
                break;
            }
            assert!(
                start.elapsed() < within,
                "{a} still serves version {got}, not {v}, after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    start.elapsed()
}

/// Connect, retrying (bounded) while the gateway cannot be reached.
async fn connect_retrying(addr: SocketAddr) -> super::H1 {
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return super::H1::connect(addr).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot connect to the gateway at {addr}");
}

/// A bounded request load: `conns` keep-alive connections each sending one request every
/// `every`, keys spread over `keys`; counts successes and failures (any non-200 or error).
pub struct PacedLoad {
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    pub failures: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl PacedLoad {
    pub fn start(addr: SocketAddr, conns: usize, every: Duration, keys: Vec<String>) -> PacedLoad {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let keys = Arc::new(keys);
        let tasks = (0..conns)
            .map(|n| {
                let (ok, failed, failures, stop, keys) = (
                    Arc::clone(&ok),
                    Arc::clone(&failed),
                    Arc::clone(&failures),
                    Arc::clone(&stop),
                    Arc::clone(&keys),
                );
                tokio::spawn(async move {
                    let mut c = connect_retrying(addr).await;
                    let mut i = n;
                    let mut tick = tokio::time::interval(every);
                    while !stop.load(Ordering::SeqCst) {
                        tick.tick().await;
                        let key = &keys[i % keys.len()];
                        i += conns;
                        match c.try_get("/load", &[("x-user-id", key)]).await {
                            Ok(r) if r.status == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                failures
                                    .lock()
                                    .unwrap()
                                    .push(format!("{} {:?}", r.status, r.body));
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                failures.lock().unwrap().push(e.to_string());
                                c = connect_retrying(addr).await;
                            }
                        }
                    }
                })
            })
            .collect();
        PacedLoad {
            ok,
            failed,
            failures,
            stop,
            tasks,
        }
    }

    /// Stop and return (succeeded, failed, first failures).
    pub async fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
        }
        let f = self
            .failures
            .lock()
            .unwrap()
            .iter()
            .take(5)
            .cloned()
            .collect();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            f,
        )
    }
}

/// Three one-instance cells `a`, `b` (region r1) and `c` (region r2) on real upstreams,
/// with the test admin token and an explicit slot table; `a` fails over to `b` then `c`.
pub struct Cells {
    pub ups: Vec<super::Upstream>,
}

impl Cells {
    pub fn new() -> Cells {
        Cells {
            ups: vec![
                super::upstream("a", "a-1"),
                super::upstream("b", "b-1"),
                super::upstream("c", "c-1"),
            ],
        }
    }

    pub fn yaml(&self) -> String {
        let cells = vec![
            super::cell("a", "r1", &["b", "c"], &[("a-1", self.ups[0].addr)]),
            super::cell("b", "r1", &["a", "c"], &[("b-1", self.ups[1].addr)]),
            super::cell("c", "r2", &["a"], &[("c-1", self.ups[2].addr)]),
        ];
        super::config_yaml(
            &cells,
            &format!(
                "admin: {{ token: {TOKEN} }}\nslots:\n  - {{ cell: a, ranges: [\"0-5461\"] }}\n  - {{ cell: b, ranges: [\"5462-10922\"] }}\n  - {{ cell: c, ranges: [\"10923-16383\"] }}\n"
            ),
        )
    }
}

/// Push `yaml` to etcd with `cellgate config push`.
pub fn push(endpoints: &str, dir: &TempDir, yaml: &str) {
    let path = dir.path("push.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cellgate"))
        .args(["config", "push", "--etcd", endpoints, "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "config push: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `cellgate run --etcd ...` with its own state directory.
pub fn gateway(endpoints: &str, dir: &TempDir, yaml: &str, id: &str) -> super::Gateway {
    let cfg = dir.path(&format!("{id}.yaml"));
    std::fs::write(&cfg, yaml).unwrap();
    let state = dir.path(&format!("{id}.state"));
    super::Gateway::start_args(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--etcd",
        endpoints,
        "--gateway-id",
        id,
        "--state-dir",
        state.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--workers",
        "1",
    ])
}

/// Keys and their cells as a gateway decides them now.
pub async fn decisions(admin_addr: SocketAddr, keys: &[String]) -> Vec<(String, u64)> {
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(50) {
        let futs: Vec<_> = chunk
            .iter()
            .map(|k| {
                let path = format!("/admin/route?key={}", cellgate::ctl::encode(k));
                tokio::spawn(async move { admin_get(admin_addr, &path).await })
            })
            .collect();
        for f in futs {
            let v = f.await.unwrap();
            out.push((
                v["cell"].as_str().unwrap().to_owned(),
                v["table_version"].as_u64().unwrap(),
            ));
        }
    }
    out
}
