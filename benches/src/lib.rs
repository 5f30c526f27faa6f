//! Shared fixtures for cellgate's benchmarks: large routing tables built the way the gateway
//! builds them.

use std::net::SocketAddr;

use cellgate_health::HealthRegistry;
use cellgate_routing::{
    CellSpec, CellState, InstanceSpec, RoutingTable, TableBuilder, UpstreamProtocol,
};

/// A table of `slot_count` slots over `cells` cells (three instances each, two regions) with
/// `overrides` key pins (`ovr-<n>`), version `version`.
pub fn big_table(
    version: u64,
    slot_count: u32,
    cells: usize,
    overrides: usize,
    health: &HealthRegistry,
) -> RoutingTable {
    let mut b = TableBuilder::new(version, slot_count)
        .region("r0")
        .region("r1");
    for c in 0..cells {
        b = b.cell(CellSpec {
            id: format!("cell-{c}"),
            region: format!("r{}", c % 2),
            state: CellState::Active,
            weight: 100,
            failover: vec![format!("cell-{}", (c + 1) % cells)],
            instances: (0..3)
                .map(|i| InstanceSpec {
                    name: format!("cell-{c}-{i}"),
                    addr: SocketAddr::from((
                        [127, 0, (c / 250) as u8, (c % 250) as u8 + 1],
                        8000 + i as u16,
                    )),
                    weight: 100,
                    labels: Default::default(),
                })
                .collect(),
            protocol: UpstreamProtocol::Auto,
            balance: Default::default(),
        });
    }
    for o in 0..overrides {
        b = b.override_key(format!("ovr-{o}"), format!("cell-{}", o % cells));
    }
    b.build(health).expect("benchmark table is valid")
}

/// The release `cellgate` binary the scenario harnesses start: `CELLGATE_BIN`, or the
/// `cellgate` next to the running harness (both live in `target/release`).
pub fn gateway_bin() -> std::path::PathBuf {
    std::env::var_os("CELLGATE_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(|d| d.join("cellgate")))
                .unwrap_or_else(|| std::path::PathBuf::from("cellgate"))
        })
}

/// Start demo upstreams (`(cell, instance)` each) on loopback inside `rt`; their addresses.
pub fn spawn_upstreams(rt: &tokio::runtime::Runtime, specs: &[(&str, &str)]) -> Vec<SocketAddr> {
    specs
        .iter()
        .map(|(cell, name)| {
            let l = rt.block_on(async { cellgate::demo::upstream::bind("127.0.0.1:0") });
            let l = l.expect("bind upstream");
            let addr = l.local_addr().expect("upstream address");
            let (c, n) = ((*cell).to_owned(), (*name).to_owned());
            rt.spawn(async move {
                let _ = cellgate::demo::upstream::serve(l, c, n).await;
            });
            addr
        })
        .collect()
}

/// A gateway process started by a harness, with the addresses it announced.
pub struct GatewayProcess {
    /// The process; killed on drop.
    pub child: std::process::Child,
    /// `listener` name → address, from the gateway's JSON `listening` log lines.
    pub listeners: std::collections::HashMap<String, SocketAddr>,
}

impl GatewayProcess {
    /// Run `cellgate --log-format json <args>` and wait (≤ 60 s) until every listener in
    /// `wait_for` (`proxy`, `tls`, `admin`) has announced its address. Error lines of the
    /// gateway are echoed to stderr.
    pub fn start(bin: &std::path::Path, args: &[&str], wait_for: &[&str]) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(bin)
            .args(["--log-format", "json"])
            .args(args)
            .env("CELLGATE_LOG", "warn,cellgate=info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["message"] == "listening" {
                        let _ = tx.send((
                            v["listener"].as_str().unwrap_or("").to_owned(),
                            v["addr"].as_str().unwrap_or("").to_owned(),
                        ));
                    } else if v["level"] == "ERROR" {
                        eprintln!("gateway: {line}");
                    }
                }
            }
        });
        let mut listeners = std::collections::HashMap::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !wait_for.iter().all(|w| listeners.contains_key(*w)) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let (l, a) = rx
                .recv_timeout(left)
                .expect("the gateway did not announce its listeners within 60 s");
            if let Ok(a) = a.parse::<SocketAddr>() {
                listeners.insert(l, a);
            }
        }
        Self { child, listeners }
    }

    /// `cellgate run` on the file `cfg` in directory `dir` (state in `dir/state`), proxy and
    /// admin on loopback port 0, `workers` workers, plus `extra` arguments; waits for the
    /// listeners in `wait_for`.
    pub fn run_file(
        cfg: &std::path::Path,
        workers: usize,
        extra: &[&str],
        wait_for: &[&str],
    ) -> Self {
        let cfg_s = cfg.display().to_string();
        let state = cfg
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("state")
            .display()
            .to_string();
        let workers = workers.to_string();
        let mut args = vec![
            "run",
            "--config",
            &cfg_s,
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--workers",
            &workers,
            "--state-dir",
            &state,
        ];
        args.extend_from_slice(extra);
        Self::start(&gateway_bin(), &args, wait_for)
    }

    /// The address of listener `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.listeners[name]
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS:`, `RssAnon:`, `RssFile:`); 0 when absent.
pub fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// The environment variable `name` parsed as a `T`, or `default` when unset or unparsable.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A scratch directory `cellgate-<tag>-<pid>` under the temp dir and a two-thread runtime for
/// a harness's clients and upstreams.
pub fn harness(tag: &str) -> (std::path::PathBuf, tokio::runtime::Runtime) {
    let dir = std::env::temp_dir().join(format!("cellgate-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    (dir, rt)
}
