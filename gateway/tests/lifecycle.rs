//! Process lifecycle against the real binary: a binary upgrade (SIGUSR2) under a bounded
//! load fails no request; SIGTERM lets in-flight requests finish within `shutdown.grace`
//! and then exits; past the grace it exits anyway; SIGINT exits at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(pid as i32), sig).unwrap();
}

/// Kills a process by pid when dropped (the upgraded gateway is not our child).
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// Wait (bounded) for the child to exit; its exit status and when.
fn wait_exit(gw: &mut Gateway, within: Duration) -> Option<(std::process::ExitStatus, Instant)> {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if let Some(st) = gw.child.try_wait().unwrap() {
            return Some((st, Instant::now()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Pids of every process that logged "listening".
fn listening_pids(gw: &Gateway) -> Vec<u32> {
    let logs = gw.logs.lock().unwrap();
    let mut pids: Vec<u32> = logs
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "listening")
        .filter_map(|v| v["pid"].as_u64().map(|p| p as u32))
        .collect();
    pids.dedup();
    pids
}

#[derive(Default)]
struct Load {
    ok: AtomicU64,
    failed: AtomicU64,
    reconnects: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
}

/// `clients` keep-alive clients sending requests until `stop` (at most `cap`). A
/// connection the gateway closed between requests is reopened (nothing was sent on it);
/// any request that was sent and got no 200 is a failure.
fn start_load(
    addr: SocketAddr,
    clients: usize,
    stop: Arc<AtomicBool>,
    cap: Duration,
) -> (Arc<Load>, Vec<tokio::task::JoinHandle<()>>) {
    let load = Arc::new(Load::default());
    let mut tasks = Vec::new();
    for n in 0..clients {
        let load = Arc::clone(&load);
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let end = Instant::now() + cap;
            let mut conn: Option<H1> = None;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                let ready = match conn.as_mut() {
                    Some(c) => c.is_ready().await,
                    None => false,
                };
                if !ready {
                    load.reconnects.fetch_add(1, Ordering::Relaxed);
                    conn = Some(H1::connect(addr).await);
                }
                let c = conn.as_mut().unwrap();
                i += 1;
                let key = format!("user-{n}-{}", i % 50);
                match c.try_get("/load", &[("x-user-id", &key)]).await {
                    Ok(r) if r.status == 200 => {
                        load.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        load.failed.fetch_add(1, Ordering::Relaxed);
                        load.errors
                            .lock()
                            .unwrap()
                            .push(format!("status {}", r.status));
                    }
                    Err(e) => {
                        load.failed.fetch_add(1, Ordering::Relaxed);
                        load.errors.lock().unwrap().push(e.to_string());
                        conn = None;
                    }
                }
            }
        }));
    }
    (load, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_binary_upgrade_under_load_fails_no_request() {
    let up = upstream("a", "a-1");
    let yaml = config_yaml(
        &[cell("a", "r1", &[], &[("a-1", up.addr)])],
        "shutdown: { grace: 10s }\n",
    );
    let dir = TempDir::new("upgrade");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let mut gw = Gateway::start(&dir.path("c.yaml"));
    let old_pid = gw.child.id();
    let mut new_proc = KillOnDrop(None);

    let stop = Arc::new(AtomicBool::new(false));
    let (load, tasks) = start_load(gw.addr, 4, Arc::clone(&stop), Duration::from_secs(30));
    // Some traffic on the old process first.
    let t = Instant::now();
    while load.ok.load(Ordering::Relaxed) < 200 && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = load.ok.load(Ordering::Relaxed);
    assert!(before >= 200, "load did not start");

    signal(old_pid, Signal::SIGUSR2);
    assert!(
        gw.wait_log("told the old process to drain", Duration::from_secs(20))
            .await,
        "the new process never took over: {:?}",
        gw.logs.lock().unwrap()
    );
    // The gateway's address stays ready throughout: the old process, draining, shares the
    // admin socket with the new one and does not answer 503 on it.
    let admin = gw.admin_addr.unwrap();
    for _ in 0..20 {
        let r = get(admin, "/readyz", &[]).await;
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    }
    let pids = listening_pids(&gw);
    new_proc.0 = pids.iter().copied().find(|&p| p != old_pid);
    assert!(new_proc.0.is_some(), "no new pid in {pids:?}");
    let (status, _) =
        wait_exit(&mut gw, Duration::from_secs(15)).expect("old process still running");
    assert!(status.success(), "old process exit: {status}");
    assert!(gw.logs_contain("drained; exiting"));

    // Traffic goes on, now on the new process only.
    let at_exit = load.ok.load(Ordering::Relaxed);
    let t = Instant::now();
    while load.ok.load(Ordering::Relaxed) < at_exit + 200 && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let ok = load.ok.load(Ordering::Relaxed);
    let failed = load.failed.load(Ordering::Relaxed);
    eprintln!(
        "upgrade under load: {ok} ok ({before} before the upgrade, {} after the old process exited), {failed} failed, {} connections opened",
        ok - at_exit,
        load.reconnects.load(Ordering::Relaxed)
    );
    assert_eq!(
        failed,
        0,
        "failed requests: {:?}",
        load.errors.lock().unwrap()
    );
    assert!(ok >= at_exit + 200, "the new process did not serve");
    // And new clients reach the new process.
    assert_eq!(
        get(gw.addr, "/", &[("x-user-id", "alice")]).await.status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits() {
    let up = upstream("a", "a-1");
    fault(up.addr, r#"{"delay_ms": 1500}"#).await;
    let yaml = config_yaml(
        &[cell("a", "r1", &[], &[("a-1", up.addr)])],
        "shutdown: { grace: 10s }\n",
    );
    let dir = TempDir::new("sigterm");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let mut gw = Gateway::start(&dir.path("c.yaml"));
    let addr = gw.addr;
    let r = get(gw.admin_addr.unwrap(), "/readyz", &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.json()["ready"].as_bool()),
        (200, Some(true))
    );
    let mut c = H1::connect(addr).await;
    let in_flight =
        tokio::spawn(async move { c.try_get("/slow", &[("x-user-id", "alice")]).await });
    // The request is on its way to the slow upstream before the signal.
    wait_in_flight(&gw, 1).await;
    let t = Instant::now();
    signal(gw.child.id(), Signal::SIGTERM);
    assert!(
        gw.wait_log("SIGTERM: draining", Duration::from_secs(5))
            .await
    );

    // New clients are refused outright (the listening socket is closed), not left
    // waiting in its backlog until the process exits — here, while the 1.5 s request is
    // still in flight.
    // The admin listener stays to watch the drain, and /readyz says the gateway is not
    // ready any more (a load balancer stops sending it new connections).
    let admin = gw.admin_addr.unwrap();
    let r = get(admin, "/readyz", &[]).await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(
        (r.json()["ready"].as_bool(), r.json()["draining"].as_bool()),
        (Some(false), Some(true))
    );
    let end = Instant::now() + Duration::from_millis(500);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < end,
            "the proxy port still accepts connections while draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // No new connection is served once it drains.
    let end = Instant::now() + Duration::from_secs(3);
    loop {
        let refused = match tokio::net::TcpStream::connect(addr).await {
            Err(_) => true,
            Ok(mut s) => {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let _ = s
                    .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\n\r\n")
                    .await;
                let mut b = [0u8; 16];
                !matches!(
                    tokio::time::timeout(Duration::from_millis(300), s.read(&mut b)).await,
                    Ok(Ok(n)) if n > 0
                )
            }
        };
        if refused {
            break;
        }
        assert!(
            Instant::now() < end,
            "new connections still served while draining"
        );
    }

    let r = in_flight.await.unwrap().expect("in-flight request failed");
    assert_eq!(r.status, 200);
    let finished = Instant::now();
    let (status, exited) = wait_exit(&mut gw, Duration::from_secs(10)).expect("did not exit");
    assert!(status.success(), "exit: {status}");
    assert!(
        exited >= finished - Duration::from_millis(50),
        "exited before the request finished"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert!(gw.logs_contain("drained; exiting"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_the_moment_it_listens_drains_instead_of_killing() {
    // A supervisor may stop a gateway just after it came up. The signal must already be
    // handled then (drain, exit 0), not take its default action (killed by SIGTERM).
    let up = upstream("a", "a-1");
    let yaml = config_yaml(
        &[cell("a", "r1", &[], &[("a-1", up.addr)])],
        "shutdown: { grace: 2s }\n",
    );
    let dir = TempDir::new("sigterm-early");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    for round in 0..3 {
        // `start` returns as soon as the proxy listener is logged.
        let mut gw = Gateway::start(&dir.path("c.yaml"));
        signal(gw.child.id(), Signal::SIGTERM);
        let (status, _) = wait_exit(&mut gw, Duration::from_secs(10)).expect("still running");
        assert!(status.success(), "round {round}: exit {status}");
        assert!(
            gw.wait_log("SIGTERM: draining", Duration::from_secs(2))
                .await,
            "round {round}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_at_the_end_of_the_grace_period_and_sigint_at_once() {
    let up = upstream("a", "a-1");
    fault(up.addr, r#"{"delay_ms": 5000}"#).await;
    let yaml = config_yaml(
        &[cell("a", "r1", &[], &[("a-1", up.addr)])],
        "shutdown: { grace: 700ms }\n",
    );
    let dir = TempDir::new("grace");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();

    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let mut gw = Gateway::start(&dir.path("c.yaml"));
        let mut c = H1::connect(gw.addr).await;
        let in_flight =
            tokio::spawn(async move { c.try_get("/slow", &[("x-user-id", "alice")]).await });
        wait_in_flight(&gw, 1).await;
        let t = Instant::now();
        signal(gw.child.id(), sig);
        let (_, exited) = wait_exit(&mut gw, Duration::from_secs(5)).expect("did not exit");
        let took = exited - t;
        match sig {
            Signal::SIGTERM => {
                assert!(
                    took >= Duration::from_millis(600) && took < Duration::from_millis(2500),
                    "SIGTERM exit after {took:?}"
                );
                assert!(gw.logs_contain("grace period over"));
            }
            _ => assert!(
                took < Duration::from_millis(500),
                "SIGINT exit after {took:?}"
            ),
        }
        assert!(
            in_flight.await.unwrap().is_err(),
            "cut-off request reported success"
        );
    }
}

/// Wait (bounded) until the gateway reports `n` requests in flight (`cellgate_in_flight`).
async fn wait_in_flight(gw: &Gateway, n: u64) {
    let admin = gw.admin_addr.expect("admin listener");
    let want = format!("cellgate_in_flight {n}");
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        let m = get(admin, "/metrics", &[]).await;
        if String::from_utf8_lossy(&m.body).lines().any(|l| l == want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the gateway never had {n} request(s) in flight");
}

/// A client that gives up while its request waits on the upstream leaves nothing counted:
/// the cell's and the instance's in-flight gauges (what `/admin/cells` and a drain report)
/// come back to 0 at once, not when the upstream would have answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_is_no_longer_counted_in_flight() {
    let up = upstream("a", "a-1");
    fault(up.addr, r#"{"delay_ms": 8000}"#).await;
    let yaml = config_yaml(
        &[cell("a", "r1", &[], &[("a-1", up.addr)])],
        "admin: { token: t0k }\n",
    );
    let dir = TempDir::new("cancel-in-flight");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let admin = gw.admin_addr.expect("admin listener").to_string();
    let cell_in_flight = || cell_a_in_flight(&admin);
    for round in 0..2 {
        let mut c = H1::connect(gw.addr).await;
        let pending = tokio::spawn(async move {
            let r = c.try_get("/slow", &[("x-user-id", "alice")]).await;
            drop(c);
            r
        });
        wait_in_flight(&gw, 1).await;
        assert_eq!(cell_in_flight().await, (Some(1), Some(1)), "round {round}");
        // The client goes away (its connection closes) long before the upstream answers.
        pending.abort();
        let _ = pending.await;
        let end = Instant::now() + Duration::from_secs(3);
        loop {
            let now = cell_in_flight().await;
            if now == (Some(0), Some(0)) {
                break;
            }
            assert!(Instant::now() < end, "round {round}: still counted {now:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// An answer still streaming counts in flight until its body ends (what a drain reports
/// and operators wait on before stopping a cell), not only until its head arrived; a
/// client that goes away mid-body is not counted any more either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_still_streaming_is_counted_in_flight_until_it_ends() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Head and half the body at once, the rest `pause` later.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                    while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        got.drain(..end + 4);
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n0123456789")
                            .await;
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        if s.write_all(b"abcdefghij").await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let yaml = config_yaml(
        &[cell("a", "r1", &[], &[("a-1", up)])],
        "admin: { token: t0k }\n",
    );
    let dir = TempDir::new("streaming-in-flight");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let admin = gw.admin_addr.expect("admin listener").to_string();
    let cell_in_flight = || cell_a_in_flight(&admin);
    let wait_for = |want: (Option<i64>, Option<i64>), what: &'static str| async move {
        let end = Instant::now() + Duration::from_secs(3);
        loop {
            let now = cell_in_flight().await;
            if now == want {
                return;
            }
            assert!(Instant::now() < end, "{what}: {now:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    for finish in [true, false] {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(b"GET /s HTTP/1.1\r\nHost: x\r\nX-User-ID: alice\r\n\r\n")
            .await
            .unwrap();
        // The head and the first half are here: the answer is still streaming.
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        while !got.ends_with(b"0123456789") {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed early");
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(cell_in_flight().await, (Some(1), Some(1)), "mid-body");
        if finish {
            while !got.ends_with(b"abcdefghij") {
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed early");
                got.extend_from_slice(&chunk[..n]);
            }
            wait_for((Some(0), Some(0)), "still counted after the body ended").await;
        } else {
            drop(s);
            wait_for((Some(0), Some(0)), "still counted after the client left").await;
        }
    }
}

/// Cell `a`'s in-flight count and its first instance's, from `/admin/cells/a` (token t0k).
async fn cell_a_in_flight(admin: &str) -> (Option<i64>, Option<i64>) {
    let v = cellgate::ctl::call(
        admin,
        Some("t0k"),
        http::Method::GET,
        "/admin/cells/a",
        None,
    )
    .await
    .expect("GET /admin/cells/a");
    (
        v["in_flight"].as_i64(),
        v["instances"][0]["in_flight"].as_i64(),
    )
}
