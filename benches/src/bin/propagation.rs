//! Propagation bench: how long a change made at one gateway takes to be served by a fleet.
//!
//! ```sh
//! cargo build -p cellgate && cargo run -p cellgate-benches --bin propagation
//! # options: CHANGES=100 GATEWAYS=3 CELLGATE_BIN=target/release/cellgate BENCH_DIR=/dev/shm
//! ```
//!
//! Starts a single-node etcd (Debian's `etcd`) on free loopback ports with a temporary
//! data directory, bootstraps it with `cellgate config push`, starts `GATEWAYS` gateways
//! (`cellgate run --etcd`), then makes `CHANGES` admin changes (switch / restore of one
//! cell, issued at the gateways in turn). For each change it measures, from the moment the
//! request is sent:
//!
//! - **commit**: until the issuing gateway answers (lock, compare-and-swap transaction with
//!   the audit record, applied locally);
//! - **propagation**: until the last gateway of the fleet serves the new table version
//!   (each gateway's `/readyz` polled every millisecond).
//!
//! Prints p50 / p99 / max of both, and of the fan-out between them (the issuing gateway
//! answered → every gateway serves the change). Everything runs on loopback and is stopped at the end.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::Method;
use serde_json::{json, Value};

const TOKEN: &str = "bench-token";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn cellgate_bin() -> PathBuf {
    if let Ok(p) = std::env::var("CELLGATE_BIN") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for profile in ["release", "debug"] {
        let p = root.join("target").join(profile).join("cellgate");
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from("cellgate")
}

async fn call(
    admin: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    cellgate::ctl::call(&admin.to_string(), Some(TOKEN), method, path, body)
        .await
        .map_err(|e| e.to_string())
}

async fn version(admin: SocketAddr) -> Result<u64, String> {
    let v = call(admin, Method::GET, "/readyz", None).await?;
    v["table_version"]
        .as_u64()
        .ok_or_else(|| format!("no table_version in {v}"))
}

/// Start a gateway and read its proxy and admin addresses from its JSON log.
fn start_gateway(
    bin: &PathBuf,
    dir: &std::path::Path,
    etcd: &str,
    i: usize,
) -> Result<(Proc, SocketAddr), String> {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(bin)
        .args(["--log-format", "json", "run", "--config"])
        .arg(dir.join("cellgate.yaml"))
        .args([
            "--etcd",
            etcd,
            "--gateway-id",
            &format!("bench-{i}"),
            "--state-dir",
        ])
        .arg(dir.join(format!("state-{i}")))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--workers",
            "1",
        ])
        .env("CELLGATE_LOG", "warn,cellgate=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v["message"] == "listening" && v["listener"] == "admin" {
                    let _ = tx.send(v["addr"].as_str().unwrap_or_default().to_owned());
                }
            }
        }
    });
    let proc = Proc(child);
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .map_err(|_| "gateway did not start".to_owned())?;
    let addr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    Ok((proc, addr))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), String> {
    let changes = env_usize("CHANGES", 100);
    let n = env_usize("GATEWAYS", 3).max(1);
    let bin = cellgate_bin();
    // BENCH_DIR: where etcd keeps its data (default: the temp dir; /dev/shm takes the disk
    // out of the measurement).
    let parent = std::env::var_os("BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let dir = parent.join(format!("cellgate-propagation-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (client, peer) = (
        free_port().map_err(|e| e.to_string())?,
        free_port().map_err(|e| e.to_string())?,
    );
    let etcd_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let etcd = Proc(
        Command::new("etcd")
            .args(["--name", "bench", "--data-dir"])
            .arg(dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args([
                "--initial-cluster",
                &format!("bench={peer_url}"),
                "--log-level",
                "warn",
                "--logger",
                "zap",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start etcd (apt-get install etcd-server): {e}"))?,
    );
    let mut yaml = format!("admin: {{ token: {TOKEN} }}\nregions: [r1, r2]\ncells:\n");
    for (i, (id, region, failover)) in [
        ("a", "r1", "[b, c]"),
        ("b", "r1", "[a, c]"),
        ("c", "r2", "[a]"),
    ]
    .iter()
    .enumerate()
    {
        yaml.push_str(&format!(
            "  - {{ id: {id}, region: {region}, failover: {failover}, instances: [{{ name: {id}-1, addr: \"127.0.0.1:{}\" }}] }}\n",
            19500 + i
        ));
    }
    std::fs::write(dir.join("cellgate.yaml"), &yaml).map_err(|e| e.to_string())?;
    // Push (retrying while etcd starts).
    let mut pushed = false;
    for _ in 0..100 {
        let out = Command::new(&bin)
            .args(["config", "push", "--etcd", &etcd_url, "--config"])
            .arg(dir.join("cellgate.yaml"))
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            pushed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !pushed {
        return Err("config push never succeeded".into());
    }
    let mut gws = Vec::new();
    for i in 0..n {
        gws.push(start_gateway(&bin, &dir, &etcd_url, i)?);
    }
    let admins: Vec<SocketAddr> = gws.iter().map(|(_, a)| *a).collect();

    let mut commit = Vec::with_capacity(changes);
    let mut propagation = Vec::with_capacity(changes);
    let mut after = Vec::with_capacity(changes);
    for k in 0..changes {
        let at = admins[k % n];
        let old = version(at).await?;
        let (path, body) = if k % 2 == 0 {
            ("/admin/cells/a/switch", Some(json!({"to": "c"})))
        } else {
            ("/admin/cells/a/restore", None)
        };
        let t0 = Instant::now();
        let pollers: Vec<_> = admins
            .iter()
            .map(|&a| {
                tokio::spawn(async move {
                    let end = t0 + Duration::from_secs(10);
                    loop {
                        if let Ok(v) = version(a).await {
                            if v > old {
                                return Ok((Instant::now(), v));
                            }
                        }
                        if Instant::now() > end {
                            return Err(format!("{a} did not apply a change within 10 s"));
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                })
            })
            .collect();
        let r = call(at, Method::POST, path, body).await?;
        let committed = t0.elapsed();
        let want = r["table_version"].as_u64().ok_or("no table_version")?;
        let mut last = t0;
        for p in pollers {
            let (when, v) = p.await.map_err(|e| e.to_string())??;
            if v != want {
                return Err(format!("a gateway serves version {v}, expected {want}"));
            }
            last = last.max(when);
        }
        commit.push(committed);
        propagation.push(last - t0);
        after.push((last - t0).saturating_sub(committed));
    }
    commit.sort();
    propagation.sort();
    after.sort();
    println!(
        "cellgate propagation: {changes} changes, {n} gateways, one etcd (loopback), {}",
        bin.display()
    );
    println!(
        "  commit (request → issuing gateway answered):   p50 {}  p99 {}  max {}",
        ms(percentile(&commit, 0.50)),
        ms(percentile(&commit, 0.99)),
        ms(percentile(&commit, 1.0))
    );
    println!(
        "  propagation (request → all {n} gateways serve it): p50 {}  p99 {}  max {}",
        ms(percentile(&propagation, 0.50)),
        ms(percentile(&propagation, 0.99)),
        ms(percentile(&propagation, 1.0))
    );
    println!(
        "  fan-out (issuing gateway answered → all serve it): p50 {}  p99 {}  max {}",
        ms(percentile(&after, 0.50)),
        ms(percentile(&after, 0.99)),
        ms(percentile(&after, 1.0))
    );
    drop(gws);
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
