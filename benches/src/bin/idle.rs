//! Memory with idle keep-alive clients: a release gateway (one worker, every feature on)
//! takes `CONNS` (default 10,000) client connections, each sends one proxied HTTP/1.1
//! request and then stays open and idle. Prints the gateway's RSS before, with all
//! connections idle, and after they close; checks that every connection still works at the
//! end; exits 1 when the RSS with the idle connections exceeds 64 MiB or a request failed.
//!
//! `cargo build --release -p cellgate -p cellgate-benches --bin cellgate --bin idle && target/release/idle`
//!
//! Needs about 2 × `CONNS` + 100 file descriptors in this process's limit (`ulimit -n`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellgate_benches::{env_or, fd_count, harness, spawn_upstreams, status_kb, GatewayProcess};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const LIMIT_KIB: u64 = 64 * 1024;

/// One proxied GET on an open connection; true on a 200 with its whole body.
async fn get(tx: &mut SendRequest<Full<Bytes>>, key: usize) -> bool {
    if tx.ready().await.is_err() {
        return false;
    }
    let req = http::Request::get("/idle")
        .header("host", "idle")
        .header("x-user-id", format!("idle-{key}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    match tx.send_request(req).await {
        Ok(res) => res.status() == 200 && res.into_body().collect().await.is_ok(),
        Err(_) => false,
    }
}

async fn open(addr: SocketAddr, key: usize) -> Option<SendRequest<Full<Bytes>>> {
    let s = TcpStream::connect(addr).await.ok()?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .ok()?;
    tokio::spawn(conn);
    get(&mut tx, key).await.then_some(tx)
}

fn main() {
    let conns: usize = env_or("CONNS", 10_000);
    let (dir, rt) = harness("idle");
    let ups = spawn_upstreams(&rt, &[("a", "a-1"), ("b", "b-1"), ("c", "c-1")]);
    // Every feature on: three cells with failover, health (probes, ejection, breakers, the
    // failover window), metrics; idle timeout long enough to outlast the measurement; the
    // connection limit above the number of clients.
    let yaml = format!(
        "listen: {{ http: 127.0.0.1:0 }}
regions: [r1]
cells:
  - {{ id: a, region: r1, failover: [b], instances: [ {{ name: a-1, addr: \"{}\" }} ] }}
  - {{ id: b, region: r1, failover: [c], instances: [ {{ name: b-1, addr: \"{}\" }} ] }}
  - {{ id: c, region: r1, failover: [a], instances: [ {{ name: c-1, addr: \"{}\" }} ] }}
limits: {{ idle_timeout: 300s, max_connections: {} }}
",
        ups[0],
        ups[1],
        ups[2],
        conns + 100
    );
    let cfg = dir.join("idle.yaml");
    std::fs::write(&cfg, yaml).expect("write config");
    let gw = GatewayProcess::run_file(&cfg, 1, &[], &["proxy"]);
    let (pid, addr) = (gw.pid(), gw.addr("proxy"));
    let rss = || status_kb(pid, "VmRSS:");
    std::thread::sleep(Duration::from_millis(500));
    let (rss0, fds0) = (rss(), fd_count(pid));
    println!(
        "  before: rss {rss0} KiB = anon {} + file {} KiB",
        status_kb(pid, "RssAnon:"),
        status_kb(pid, "RssFile:")
    );
    println!("idle: gateway pid {pid} on {addr}; {conns} connections");

    let t0 = Instant::now();
    let (held, opened_failed, rss_idle, fds_idle, reused_ok) = rt.block_on(async {
        // Open in batches of 500 so the accept queue never overflows.
        let mut held = Vec::with_capacity(conns);
        let mut failed = 0usize;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut k = 0;
        while k < conns && Instant::now() < deadline {
            let batch = (conns - k).min(500);
            let mut set = tokio::task::JoinSet::new();
            for j in k..k + batch {
                set.spawn(open(addr, j));
            }
            while let Some(r) = set.join_next().await {
                match r.ok().flatten() {
                    Some(tx) => held.push(tx),
                    None => failed += 1,
                }
            }
            k += batch;
        }
        // Idle: nothing is sent for 5 s; then the figures.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (r, f) = (rss(), fd_count(pid));
        println!(
            "  idle: rss {r} KiB = anon {} + file {} KiB",
            status_kb(pid, "RssAnon:"),
            status_kb(pid, "RssFile:")
        );
        // Every held connection still works after the idle period.
        let (n, mut ok) = (held.len(), 0usize);
        let mut it = held.into_iter().enumerate();
        loop {
            let mut set = tokio::task::JoinSet::new();
            for (j, mut tx) in it.by_ref().take(500) {
                set.spawn(async move { get(&mut tx, j).await });
            }
            if set.is_empty() {
                break;
            }
            while let Some(r) = set.join_next().await {
                ok += usize::from(r.unwrap_or(false));
            }
        }
        (n, failed, r, f, ok)
    });
    let open_secs = t0.elapsed().as_secs_f64();
    // Close every client connection and let the gateway release them.
    drop(rt);
    std::thread::sleep(Duration::from_secs(2));
    let (rss_after, fds_after) = (rss(), fd_count(pid));
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);

    let mib = |kb: u64| kb as f64 / 1024.0;
    println!("\n| figure | value |\n|---|---|");
    println!(
        "| idle keep-alive connections held | {held} of {conns} ({opened_failed} failed to open) |"
    );
    println!("| gateway RSS before | {:.1} MiB ({fds0} fds) |", mib(rss0));
    println!(
        "| gateway RSS with {held} idle connections | {:.1} MiB ({fds_idle} fds) — {:.2} KiB per connection |",
        mib(rss_idle),
        (rss_idle.saturating_sub(rss0)) as f64 / held.max(1) as f64
    );
    println!(
        "| gateway RSS after they closed | {:.1} MiB ({fds_after} fds) |",
        mib(rss_after)
    );
    println!("| connections that still answered 200 after idling | {reused_ok} of {held} |");
    println!("| time to open, idle 5 s and reuse | {open_secs:.1} s |");
    let pass = held == conns && reused_ok == held && rss_idle <= LIMIT_KIB;
    println!(
        "\nverdict: {} (RSS with {conns} idle connections {:.1} MiB, limit 64 MiB)",
        if pass { "PASS" } else { "FAIL" },
        mib(rss_idle)
    );
    if !pass {
        std::process::exit(1);
    }
}
