//! Table swaps under load: a release gateway serving a table of 16384 slots and 100,000
//! overrides takes 100 slot moves through the admin API (each one builds and swaps a whole
//! new table) while bounded HTTP/1.1 and h2c load runs. Prints requests, failed requests
//! (must be 0), the swap round-trip times and the table versions; exits 1 on any failure.
//!
//! `cargo build --release -p cellgate -p cellgate-benches --bin cellgate --bin swap && target/release/swap`
//! (`SWAPS` changes the number of swaps, `OVERRIDES` the number of overrides.)

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellgate_benches::{env_or, harness, spawn_upstreams, GatewayProcess};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

const TOKEN: &str = "swap-bench-token";
const CELLS: [&str; 3] = ["a", "b", "c"];

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Override keys answered by a cell other than the one they are pinned to.
    misrouted: AtomicU64,
}

fn config(ups: &[SocketAddr], overrides: usize) -> String {
    let mut y = String::with_capacity(overrides * 24 + 1024);
    y.push_str("listen: { http: 127.0.0.1:0 }\nregions: [r1]\ncells:\n");
    for (i, c) in CELLS.iter().enumerate() {
        let next = CELLS[(i + 1) % CELLS.len()];
        y.push_str(&format!(
            "  - {{ id: {c}, region: r1, failover: [{next}], instances: [ {{ name: {c}-1, addr: \"{}\" }} ] }}\n",
            ups[i]
        ));
    }
    y.push_str("overrides:\n");
    for o in 0..overrides {
        y.push_str(&format!("  ovr-{o}: {}\n", CELLS[o % CELLS.len()]));
    }
    y
}

/// One keep-alive HTTP/1.1 client: alternates override keys (checked against their pin) and
/// plain keys until `stop`; a new connection after a transport error.
async fn h1_client(
    addr: SocketAddr,
    n: usize,
    overrides: usize,
    stop: Arc<AtomicBool>,
    c: Arc<Counts>,
) {
    let mut i = n;
    let deadline = Instant::now() + Duration::from_secs(600);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let Ok(s) = TcpStream::connect(addr).await else {
            c.failed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let Ok((mut tx, conn)) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(s)).await
        else {
            c.failed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        tokio::spawn(conn);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            i = i.wrapping_add(7919);
            let (key, pinned) = if i.is_multiple_of(2) {
                let o = i % overrides.max(1);
                (format!("ovr-{o}"), Some(CELLS[o % CELLS.len()]))
            } else {
                (format!("user-{}", i % 100_000), None)
            };
            let req = http::Request::get("/swap")
                .header("host", "swap")
                .header("x-user-id", key)
                .body(Full::new(Bytes::new()))
                .expect("request");
            if !record(tx.send_request(req).await, pinned, &c).await {
                break;
            }
        }
    }
}

/// h2c: one connection, 4 concurrent streams at a time, until `stop`.
async fn h2_client(addr: SocketAddr, overrides: usize, stop: Arc<AtomicBool>, c: Arc<Counts>) {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let Ok(s) = TcpStream::connect(addr).await else {
            c.failed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let Ok((tx, conn)) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s)).await
        else {
            c.failed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        tokio::spawn(conn);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..4 {
                i = i.wrapping_add(104_729);
                let o = i % overrides.max(1);
                let mut tx = tx.clone();
                let c = Arc::clone(&c);
                set.spawn(async move {
                    let req = http::Request::get("http://swap/h2")
                        .header("x-user-id", format!("ovr-{o}"))
                        .body(Full::new(Bytes::new()))
                        .expect("request");
                    record(tx.send_request(req).await, Some(CELLS[o % CELLS.len()]), &c).await
                });
            }
            let mut alive = true;
            while let Some(r) = set.join_next().await {
                alive &= r.unwrap_or(false);
            }
            if !alive {
                break;
            }
        }
    }
}

/// Count one answer; false when the connection is no longer usable.
async fn record(
    r: Result<http::Response<hyper::body::Incoming>, hyper::Error>,
    pinned: Option<&str>,
    c: &Counts,
) -> bool {
    match r {
        Ok(res) => {
            let status = res.status();
            let cell = res
                .headers()
                .get("x-cell-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let body_ok = res.into_body().collect().await.is_ok();
            if status == 200 && body_ok {
                c.ok.fetch_add(1, Ordering::Relaxed);
                if pinned.is_some_and(|p| p != cell) {
                    c.misrouted.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                c.failed.fetch_add(1, Ordering::Relaxed);
            }
            body_ok
        }
        Err(_) => {
            c.failed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// One admin call; (status, JSON body).
async fn admin(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: String,
) -> Result<(u16, serde_json::Value), String> {
    let s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "admin")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let res = tx.send_request(req).await.map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    let bytes = res
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Ok((status, v))
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let swaps = env_or("SWAPS", 100usize);
    let overrides = env_or("OVERRIDES", 100_000usize);
    let (dir, rt) = harness("swap");
    let ups = spawn_upstreams(&rt, &[("a", "a-1"), ("b", "b-1"), ("c", "c-1")]);
    let cfg = dir.join("swap.yaml");
    std::fs::write(&cfg, config(&ups, overrides)).expect("write config");
    let gw = GatewayProcess::run_file(&cfg, 1, &["--admin-token", TOKEN], &["proxy", "admin"]);
    let (proxy, admin_addr) = (gw.addr("proxy"), gw.addr("admin"));
    println!(
        "swap: gateway pid {} on {proxy}, admin {admin_addr}; 16384 slots, {overrides} overrides, {swaps} swaps",
        gw.pid()
    );

    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (times, versions, swap_errors, elapsed) = rt.block_on(async {
        let mut load = Vec::new();
        for n in 0..6 {
            load.push(tokio::spawn(h1_client(
                proxy,
                n,
                overrides,
                Arc::clone(&stop),
                Arc::clone(&counts),
            )));
        }
        load.push(tokio::spawn(h2_client(
            proxy,
            overrides,
            Arc::clone(&stop),
            Arc::clone(&counts),
        )));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let first = admin(admin_addr, "GET", "/admin/table", String::new())
            .await
            .ok()
            .and_then(|(_, v)| v["version"].as_u64());
        let t0 = Instant::now();
        let (mut times, mut errors) = (Vec::new(), Vec::new());
        for k in 0..swaps {
            let (from, to) = (CELLS[k % 3], CELLS[(k + 1) % 3]);
            let body = format!(r#"{{"from": "{from}", "to": "{to}", "count": 64}}"#);
            let t = Instant::now();
            match admin(admin_addr, "POST", "/admin/slots/move", body).await {
                Ok((200, v))
                    if v["applied"] == true && v["plan"]["slots_moved"].as_u64() == Some(64) =>
                {
                    times.push(t.elapsed().as_secs_f64() * 1000.0)
                }
                Ok((st, v)) => errors.push(format!("swap {k}: {st} {v}")),
                Err(e) => errors.push(format!("swap {k}: {e}")),
            }
        }
        let elapsed = t0.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let last = admin(admin_addr, "GET", "/admin/table", String::new())
            .await
            .ok()
            .and_then(|(_, v)| v["version"].as_u64());
        stop.store(true, Ordering::Relaxed);
        for l in load {
            let _ = l.await;
        }
        (times, (first, last), errors, elapsed)
    });
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);

    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let (ok, failed, misrouted) = (
        counts.ok.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
        counts.misrouted.load(Ordering::Relaxed),
    );
    println!("\n| figure | value |\n|---|---|");
    println!(
        "| table swaps done | {} of {swaps} in {:.1} s |",
        times.len(),
        elapsed.as_secs_f64()
    );
    println!(
        "| swap round trip (admin call: build + validate + swap) | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms |",
        pct(&sorted, 0.5),
        pct(&sorted, 0.99),
        sorted.last().copied().unwrap_or(0.0)
    );
    println!(
        "| table version | {} → {} |",
        versions.0.map_or("?".into(), |v| v.to_string()),
        versions.1.map_or("?".into(), |v| v.to_string())
    );
    println!("| requests answered 200 | {ok} |");
    println!("| failed requests | {failed} |");
    println!("| override keys answered by another cell | {misrouted} |");
    for e in &swap_errors {
        println!("swap error: {e}");
    }
    let pass = failed == 0 && misrouted == 0 && swap_errors.is_empty() && ok > 0;
    println!("\nverdict: {}", if pass { "PASS" } else { "FAIL" });
    if !pass {
        std::process::exit(1);
    }
}
