//! Failover timings, for tracking: under a steady bounded load, (1) every instance of one
//! cell starts refusing connections, (2) a cell starts answering 503 to 5 % of requests
//! (with a 2 s and the default 30 s window). Prints client-visible errors and how long
//! until all of the cell's keys were served by its failover target.
//!
//! `cargo run --release -p cellgate-benches --bin failover`

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellgate::server::{Gateway, RunOptions};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

struct Sample {
    at: Instant,
    ok: bool,
    cell: String,
}

fn upstream(rt: &tokio::runtime::Runtime, cell: &str, name: &str) -> SocketAddr {
    let l = cellgate::demo::upstream::bind("127.0.0.1:0").expect("bind upstream");
    let addr = l.local_addr().expect("addr");
    let (c, n) = (cell.to_owned(), name.to_owned());
    rt.spawn(async move {
        let _ = cellgate::demo::upstream::serve(l, c, n).await;
    });
    addr
}

async fn post_fault(addr: SocketAddr, body: &'static str) {
    let Ok(s) = tokio::net::TcpStream::connect(addr).await else {
        return;
    };
    let Ok((mut tx, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await else {
        return;
    };
    tokio::spawn(conn);
    let req = http::Request::post("/fault")
        .header("host", "u")
        .body(Full::new(Bytes::from_static(body.as_bytes())));
    if let Ok(req) = req {
        let _ = tx.send_request(req).await;
    }
}

async fn client(
    addr: SocketAddr,
    keys: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
    out: Arc<Mutex<Vec<Sample>>>,
    offset: usize,
) {
    let mut i = offset;
    let end = Instant::now() + Duration::from_secs(120);
    'outer: while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        let Ok(s) = tokio::net::TcpStream::connect(addr).await else {
            continue;
        };
        let Ok((mut tx, conn)) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(s)).await
        else {
            continue;
        };
        tokio::spawn(conn);
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            i += 4;
            let key = &keys[i % keys.len()];
            let Ok(req) = http::Request::get("/bench")
                .header("host", "g")
                .header("x-user-id", key.as_str())
                .body(Full::new(Bytes::new()))
            else {
                continue;
            };
            let sample = match tx.send_request(req).await {
                Ok(res) => {
                    let ok = res.status() == 200;
                    let cell = res
                        .headers()
                        .get("x-cell-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let _ = res.into_body().collect().await;
                    Sample {
                        at: Instant::now(),
                        ok,
                        cell,
                    }
                }
                Err(_) => {
                    out.lock()
                        .map(|mut o| {
                            o.push(Sample {
                                at: Instant::now(),
                                ok: false,
                                cell: String::new(),
                            })
                        })
                        .ok();
                    continue 'outer;
                }
            };
            if let Ok(mut o) = out.lock() {
                o.push(sample);
            }
        }
    }
}

struct Outcome {
    scenario: &'static str,
    requests: usize,
    errors: usize,
    first_moved_ms: Option<f64>,
    all_moved_ms: Option<f64>,
}

fn run_scenario(
    scenario: &'static str,
    health: &str,
    fault: &'static str,
    both: bool,
    warmup: Duration,
    watch: Duration,
) -> Outcome {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let a1 = upstream(&rt, "a", "a-1");
    let a2 = upstream(&rt, "a", "a-2");
    let b1 = upstream(&rt, "b", "b-1");
    let yaml = format!(
        "listen: {{ http: 127.0.0.1:0 }}\nregions: [r1]\ncells:\n  - {{ id: a, region: r1, failover: [b], instances: [ {{ name: a-1, addr: \"{a1}\" }}, {{ name: a-2, addr: \"{a2}\" }} ] }}\n  - {{ id: b, region: r1, failover: [a], instances: [ {{ name: b-1, addr: \"{b1}\" }} ] }}\n{health}"
    );
    let config = cellgate_config::Config::from_yaml(&yaml).expect("bench config");
    let table = config
        .build_table(1, &cellgate_health::HealthRegistry::new())
        .expect("table");
    let keys: Vec<String> = (0..100_000)
        .map(|i| format!("u{i}"))
        .filter(|k| {
            table
                .explain(k, 1)
                .map(|e| e.home_cell == "a")
                .unwrap_or(false)
        })
        .take(200)
        .collect();
    let mut opts = RunOptions::new(config);
    opts.workers = Some(1);
    let gw = Gateway::start(opts).expect("gateway");
    let shared = Arc::clone(&gw.shared);
    rt.spawn(cellgate::controller::run(
        shared,
        Duration::from_millis(100),
    ));
    let addr = gw.http_addr;
    let keys = Arc::new(keys);
    let stop = Arc::new(AtomicBool::new(false));
    let out = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            rt.spawn(client(
                addr,
                Arc::clone(&keys),
                Arc::clone(&stop),
                Arc::clone(&out),
                c,
            ))
        })
        .collect();
    // Warm up for a whole window, so the failover window is full of healthy history.
    rt.block_on(async {
        tokio::time::sleep(warmup).await;
    });
    let t0 = Instant::now();
    rt.block_on(async {
        post_fault(a1, fault).await;
        if both {
            post_fault(a2, fault).await;
        }
        tokio::time::sleep(watch).await;
    });
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for c in clients {
            let _ = c.await;
        }
    });
    let samples = out
        .lock()
        .map(|mut o| std::mem::take(&mut *o))
        .unwrap_or_default();
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at >= t0).collect();
    let first_moved = after
        .iter()
        .find(|s| s.cell == "b")
        .map(|s| (s.at - t0).as_secs_f64() * 1000.0);
    let last_on_a = after.iter().filter(|s| s.cell == "a").map(|s| s.at).max();
    let all_moved = match (first_moved, last_on_a) {
        (None, _) => None,
        (Some(f), None) => Some(f),
        (Some(_), Some(l)) => after
            .iter()
            .find(|s| s.at > l && s.cell == "b")
            .map(|s| (s.at - t0).as_secs_f64() * 1000.0),
    };
    rt.shutdown_background();
    Outcome {
        scenario,
        requests: samples.len(),
        errors: samples.iter().filter(|s| !s.ok).count(),
        first_moved_ms: first_moved,
        all_moved_ms: all_moved,
    }
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("never".to_owned(), |ms| format!("{ms:.0} ms"))
}

fn main() {
    let outcomes = [
        run_scenario(
            "hard: every instance refuses",
            "health: { probe: { interval: 1s } }\n",
            r#"{"refuse_for_s": 60}"#,
            true,
            Duration::from_secs(2),
            Duration::from_secs(4),
        ),
        run_scenario(
            "soft: 5 % 503, window 2 s",
            "health: { failover: { window: 2s, min_requests: 50 }, retry: { statuses: [] } }\n",
            r#"{"error_rate": 0.05, "status": 503}"#,
            true,
            Duration::from_secs(3),
            Duration::from_secs(8),
        ),
        run_scenario(
            "soft: 5 % 503, window 30 s (default)",
            "health: { retry: { statuses: [] } }\n",
            r#"{"error_rate": 0.05, "status": 503}"#,
            true,
            Duration::from_secs(31),
            Duration::from_secs(12),
        ),
    ];
    println!("| scenario | requests | client errors | first key moved | all keys moved |");
    println!("|---|---|---|---|---|");
    for o in outcomes {
        println!(
            "| {} | {} | {} | {} | {} |",
            o.scenario,
            o.requests,
            o.errors,
            fmt(o.first_moved_ms),
            fmt(o.all_moved_ms)
        );
    }
    println!("\n(soft scenarios: client errors are the injected 503s before the switch; status retries are off to show the raw rate)");
}
