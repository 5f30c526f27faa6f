//! Soak: the `cellgate` binary under mixed traffic for a long time (default 30 minutes),
//! with periodic configuration reloads, certificate reloads and upstream faults, sampling
//! the gateway's resident memory (RSS) and open file descriptors. Prints the figures at
//! start, after warm-up and at the end, and fails (exit 1) when the end is more than 10 %
//! above the after-warm-up figures. Those two are measured in windows of steady traffic
//! (faults cleared, no reload), so they compare like with like: the median RSS, and the
//! fewest open descriptors (connections of the churning clients come and go; the minimum is
//! what the gateway keeps, where a leak shows).
//!
//! ```sh
//! benches/soak/run.sh                 # release build, then 30 minutes
//! SOAK_SECS=120 benches/soak/run.sh   # a short run
//! ```
//!
//! Environment: `SOAK_SECS` (default 1800), `SOAK_WARMUP_SECS` (default a third of the run,
//! at most 600), `CELLGATE_BIN` (default: `cellgate` beside this binary). Traffic goes to
//! loopback only; every loop stops at the deadline.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellgate_benches::{
    env_or, fd_count, gateway_bin, harness, spawn_upstreams, status_kb, GatewayProcess,
};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Client kinds, for the per-kind counts.
const KINDS: [&str; 4] = [
    "http/1.1 kept alive",
    "http/1.1 new connections",
    "h2c",
    "tls",
];

#[derive(Default)]
struct ByKind {
    ok: AtomicU64,
    c4xx: AtomicU64,
    c5xx: AtomicU64,
    transport: AtomicU64,
}

#[derive(Default)]
struct Counts {
    kinds: [ByKind; 4],
    bad_input_sent: AtomicU64,
    reloads: AtomicU64,
    cert_reloads: AtomicU64,
    faults: AtomicU64,
}

impl Counts {
    fn record(&self, kind: usize, status: Option<u16>) {
        let k = &self.kinds[kind];
        match status {
            Some(200..=399) => &k.ok,
            Some(400..=499) => &k.c4xx,
            Some(_) => &k.c5xx,
            None => &k.transport,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    fn answered(&self) -> u64 {
        self.kinds
            .iter()
            .map(|k| {
                k.ok.load(Ordering::Relaxed)
                    + k.c4xx.load(Ordering::Relaxed)
                    + k.c5xx.load(Ordering::Relaxed)
            })
            .sum()
    }
}

#[derive(Clone, Copy)]
struct Sample {
    t: Duration,
    rss_kb: u64,
    /// Anonymous part of the RSS (heap, stacks): where a leak shows.
    anon_kb: u64,
    fds: u64,
    requests: u64,
}

fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let tmp = dir.join("tmp.pem");
    std::fs::write(&tmp, c.cert.pem()).expect("write cert");
    std::fs::rename(&tmp, &cert).expect("rename cert");
    std::fs::write(&tmp, c.signing_key.serialize_pem()).expect("write key");
    std::fs::rename(&tmp, &key).expect("rename key");
    (cert, key)
}

fn config(ups: &[SocketAddr], cert: &Path, key: &Path, weight: u32) -> String {
    format!(
        "listen:
  http: 127.0.0.1:0
  tls: {{ listen: \"127.0.0.1:0\", cert: {cert}, key: {key} }}
regions: [r1]
cells:
  - id: a
    region: r1
    failover: [b]
    weight: {weight}
    instances:
      - {{ name: a-1, addr: \"{a1}\" }}
      - {{ name: a-2, addr: \"{a2}\" }}
  - id: b
    region: r1
    failover: [a]
    instances:
      - {{ name: b-1, addr: \"{b1}\" }}
limits: {{ max_body_bytes: 65536, header_read_timeout: 2s, idle_timeout: 10s }}
shutdown: {{ grace: 5s }}
",
        cert = cert.display(),
        key = key.display(),
        a1 = ups[0],
        a2 = ups[1],
        b1 = ups[2],
    )
}

async fn h1_keepalive(addr: SocketAddr, n: usize, end: Instant, c: Arc<Counts>) {
    let mut i = 0usize;
    while Instant::now() < end {
        let Ok(s) = TcpStream::connect(addr).await else {
            c.record(0, None);
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok((mut tx, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await
        else {
            continue;
        };
        tokio::spawn(conn);
        while Instant::now() < end && tx.ready().await.is_ok() {
            i += 1;
            let body = if i.is_multiple_of(7) {
                Bytes::from(vec![b'x'; (i * 37) % 40_000])
            } else {
                Bytes::new()
            };
            let req = http::Request::post(format!("/soak/{n}/{i}"))
                .header("host", "soak")
                .header("x-user-id", format!("user-{n}-{}", i % 500))
                .body(Full::new(body))
                .expect("request");
            match tx.send_request(req).await {
                Ok(res) => {
                    let st = res.status().as_u16();
                    let _ = res.into_body().collect().await;
                    c.record(0, Some(st));
                }
                Err(_) => {
                    c.record(0, None);
                    break;
                }
            }
        }
    }
}

async fn h1_new_connections(addr: SocketAddr, end: Instant, c: Arc<Counts>) {
    let mut i = 0u64;
    while Instant::now() < end {
        i += 1;
        let Ok(mut s) = TcpStream::connect(addr).await else {
            c.record(1, None);
            continue;
        };
        let req = format!(
            "GET /new/{i} HTTP/1.1\r\nHost: soak\r\nX-User-ID: fresh-{}\r\nConnection: close\r\n\r\n",
            i % 1000
        );
        if s.write_all(req.as_bytes()).await.is_err() {
            c.record(1, None);
            continue;
        }
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
        let status = std::str::from_utf8(buf.get(9..12).unwrap_or_default())
            .ok()
            .and_then(|s| s.parse().ok());
        c.record(1, if matches!(r, Ok(Ok(_))) { status } else { None });
    }
}

async fn h2c(addr: SocketAddr, end: Instant, c: Arc<Counts>) {
    while Instant::now() < end {
        let Ok(s) = TcpStream::connect(addr).await else {
            c.record(2, None);
            continue;
        };
        let Ok((tx, conn)) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s)).await
        else {
            continue;
        };
        tokio::spawn(conn);
        // A few thousand streams per connection, 8 at a time, then a new connection.
        for round in 0..400u64 {
            if Instant::now() >= end {
                break;
            }
            let mut set = tokio::task::JoinSet::new();
            for k in 0..8u64 {
                let mut tx = tx.clone();
                set.spawn(async move {
                    let req = http::Request::get(format!("http://soak/h2/{round}/{k}"))
                        .header("x-user-id", format!("h2-{}", (round * 8 + k) % 300))
                        .body(Full::new(Bytes::new()))
                        .expect("request");
                    match tx.send_request(req).await {
                        Ok(res) => {
                            let st = res.status().as_u16();
                            let _ = res.into_body().collect().await;
                            Some(st)
                        }
                        Err(_) => None,
                    }
                });
            }
            while let Some(r) = set.join_next().await {
                c.record(2, r.ok().flatten());
            }
        }
    }
}

async fn tls_clients(addr: SocketAddr, end: Instant, c: Arc<Counts>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let mut i = 0u64;
    while Instant::now() < end {
        let Ok(tcp) = TcpStream::connect(addr).await else {
            c.record(3, None);
            continue;
        };
        let Ok(tls) = connector
            .connect("localhost".try_into().expect("name"), tcp)
            .await
        else {
            c.record(3, None);
            continue;
        };
        let Ok((mut tx, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await
        else {
            continue;
        };
        tokio::spawn(conn);
        for _ in 0..10 {
            i += 1;
            if tx.ready().await.is_err() {
                break;
            }
            let req = http::Request::get(format!("/tls/{i}"))
                .header("host", "localhost")
                .header("x-user-id", format!("tls-{}", i % 200))
                .body(Full::new(Bytes::new()))
                .expect("request");
            match tx.send_request(req).await {
                Ok(res) => {
                    let st = res.status().as_u16();
                    let _ = res.into_body().collect().await;
                    c.record(3, Some(st));
                }
                Err(_) => c.record(3, None),
            }
        }
    }
}

/// Bad input, a few per second: smuggling attempts, oversized heads and bodies, bad keys,
/// abandoned slow heads.
async fn bad_input(addr: SocketAddr, end: Instant, c: Arc<Counts>) {
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(40_000)
    );
    let cases: Vec<Vec<u8>> = vec![
        b"POST / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
        b"POST / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello".to_vec(),
        b"POST / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
        b"GET / HTTP/1.1\nHost: x\n\n".to_vec(),
        b"POST / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nContent-Length: 999999\r\n\r\n".to_vec(),
        format!("GET / HTTP/1.1\r\nHost: x\r\nX-User-ID: {}\r\n\r\n", "k".repeat(300)).into_bytes(),
        big.into_bytes(),
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ".to_vec(),
    ];
    let mut i = 0usize;
    while Instant::now() < end {
        let case = &cases[i % cases.len()];
        i += 1;
        if let Ok(mut s) = TcpStream::connect(addr).await {
            let _ = s.write_all(case).await;
            let mut buf = [0u8; 512];
            let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
            c.bad_input_sent.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn post_fault(addr: SocketAddr, body: &str) {
    let Ok(s) = TcpStream::connect(addr).await else {
        return;
    };
    let Ok((mut tx, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await else {
        return;
    };
    tokio::spawn(conn);
    if let Ok(req) = http::Request::post("/fault")
        .header("host", "u")
        .body(Full::new(Bytes::from(body.to_owned())))
    {
        let _ = tx.send_request(req).await;
    }
}

/// Every `period`: a configuration reload, a certificate reload, and a fault on one
/// upstream (cleared at the next event); outside the `quiet` windows, where the figures are
/// measured under steady traffic.
async fn events(
    ups: Vec<SocketAddr>,
    dir: PathBuf,
    period: Duration,
    end: Instant,
    quiet: Vec<(Instant, Instant)>,
    c: Arc<Counts>,
) {
    let faults = [
        r#"{"error_rate": 0.05, "status": 503}"#,
        r#"{"delay_ms": 30}"#,
        r#"{"refuse_for_s": 2}"#,
        r#"{"db_pool_usage": 0.95}"#,
    ];
    let mut n = 0usize;
    while Instant::now() + period < end {
        tokio::time::sleep(period).await;
        let now = Instant::now();
        if quiet
            .iter()
            .any(|&(from, to)| now + period > from && now < to)
        {
            // Measuring window: steady traffic only, no fault in place.
            for u in &ups {
                post_fault(*u, "{}").await;
            }
            continue;
        }
        n += 1;
        let (cert, key) = self_signed(&dir);
        c.cert_reloads.fetch_add(1, Ordering::Relaxed);
        let yaml = config(&ups, &cert, &key, 100 + (n as u32 % 5) * 10);
        let tmp = dir.join("c.yaml.tmp");
        if std::fs::write(&tmp, yaml).is_ok() && std::fs::rename(&tmp, dir.join("c.yaml")).is_ok() {
            c.reloads.fetch_add(1, Ordering::Relaxed);
        }
        for u in &ups {
            post_fault(*u, "{}").await;
        }
        post_fault(ups[n % ups.len()], faults[n % faults.len()]).await;
        c.faults.fetch_add(1, Ordering::Relaxed);
    }
    for u in &ups {
        post_fault(*u, "{}").await;
    }
}

#[derive(Debug)]
struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A window's figures: median RSS, median anonymous RSS, and the fewest open fds. The
/// clients open and close connections all the time (new connections, bad input, TLS), so a
/// single sample's fd count swings by ±15 around the descriptors the gateway keeps; the
/// window's minimum is that kept baseline, which is where a descriptor leak shows.
fn figures(s: &[Sample]) -> (u64, u64, u64) {
    let m = |f: fn(&Sample) -> u64| {
        let mut v: Vec<u64> = s.iter().map(f).collect();
        v.sort_unstable();
        v[v.len() / 2]
    };
    let fds = s.iter().map(|x| x.fds).min().unwrap_or(0);
    (m(|x| x.rss_kb), m(|x| x.anon_kb), fds)
}

fn main() {
    let secs = env_or("SOAK_SECS", 1800u64).max(30);
    let warmup = env_or("SOAK_WARMUP_SECS", (secs / 3).min(600)).min(secs / 2);
    let sample_every = Duration::from_secs((secs / 60).clamp(1, 10));
    let event_every = Duration::from_secs((secs / 30).clamp(2, 20));
    let bin = gateway_bin();
    let (dir, rt) = harness("soak");
    let ups = spawn_upstreams(&rt, &[("a", "a-1"), ("a", "a-2"), ("b", "b-1")]);
    let (cert, key) = self_signed(&dir);
    std::fs::write(dir.join("c.yaml"), config(&ups, &cert, &key, 100)).expect("config");
    let gw = GatewayProcess::run_file(&dir.join("c.yaml"), 2, &[], &["proxy", "tls"]);
    let (http, tls, pid) = (gw.addr("proxy"), gw.addr("tls"), gw.pid());
    println!(
        "soak: {} for {secs} s (warm-up {warmup} s), gateway pid {pid} on {http} and {tls}, sampling every {:?}",
        bin.display(),
        sample_every
    );

    let counts = Arc::new(Counts::default());
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    // The figures are measured in two windows of steady traffic (faults cleared): right
    // after the warm-up, and at the end.
    // Measuring windows of eight samples; the second half of each is measured.
    let q = sample_every * 8;
    let w0 = start + Duration::from_secs(warmup);
    let quiet = vec![(w0, w0 + q), (end - q, end)];
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for n in 0..4 {
            tasks.push(tokio::spawn(h1_keepalive(
                http,
                n,
                end,
                Arc::clone(&counts),
            )));
        }
        tasks.push(tokio::spawn(h1_new_connections(
            http,
            end,
            Arc::clone(&counts),
        )));
        tasks.push(tokio::spawn(h2c(http, end, Arc::clone(&counts))));
        tasks.push(tokio::spawn(tls_clients(tls, end, Arc::clone(&counts))));
        tasks.push(tokio::spawn(bad_input(http, end, Arc::clone(&counts))));
        tasks.push(tokio::spawn(events(
            ups.clone(),
            dir.clone(),
            event_every,
            end,
            quiet.clone(),
            Arc::clone(&counts),
        )));
        let (s2, c2, st2) = (Arc::clone(&samples), Arc::clone(&counts), Arc::clone(&stop));
        let sampler = tokio::spawn(async move {
            let mut tick = tokio::time::interval(sample_every);
            while !st2.load(Ordering::Relaxed) {
                tick.tick().await;
                let s = Sample {
                    t: start.elapsed(),
                    rss_kb: status_kb(pid, "VmRSS:"),
                    anon_kb: status_kb(pid, "RssAnon:"),
                    fds: fd_count(pid),
                    requests: c2.answered(),
                };
                println!(
                    "  t={:>5}s rss={:>7} KiB (anon {:>7}) fds={:>4} requests={}",
                    s.t.as_secs(),
                    s.rss_kb,
                    s.anon_kb,
                    s.fds,
                    s.requests
                );
                s2.lock().unwrap_or_else(|p| p.into_inner()).push(s);
            }
        });
        for t in tasks {
            let _ = t.await;
        }
        stop.store(true, Ordering::Relaxed);
        let _ = sampler.await;
    });
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);

    let samples = samples.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if samples.len() < 6 {
        eprintln!("soak: too few samples ({})", samples.len());
        std::process::exit(2);
    }
    // The second half of each measuring window, after things settle.
    let in_window = |from: Duration, to: Duration| -> Vec<Sample> {
        samples
            .iter()
            .filter(|s| s.t >= from && s.t < to)
            .copied()
            .collect()
    };
    let wq = Duration::from_secs(warmup) + q / 2;
    let warm = in_window(wq, Duration::from_secs(warmup) + q);
    let last = in_window(Duration::from_secs(secs) - q / 2, Duration::from_secs(secs));
    if warm.is_empty() || last.is_empty() {
        eprintln!("soak: no samples in a measuring window");
        std::process::exit(2);
    }
    let (r0, a0, f0) = (samples[0].rss_kb, samples[0].anon_kb, samples[0].fds);
    let (rw, aw, fw) = figures(&warm);
    let (re, ae, fe) = figures(&last);
    let c = &counts;
    println!("\nsoak results ({secs} s, gateway pid {pid}):");
    println!("  start:          rss {r0} KiB (anon {a0}), fds {f0}");
    println!(
        "  after warm-up:  rss {rw} KiB (anon {aw}), fds {fw}   (RSS median and fd minimum of {} samples from t={} s, steady traffic)",
        warm.len(),
        wq.as_secs()
    );
    println!(
        "  end:            rss {re} KiB (anon {ae}), fds {fe}   (RSS median and fd minimum of the last {} samples, steady traffic)",
        last.len()
    );
    let pct = |a: u64, b: u64| 100.0 * (a as f64 - b as f64) / (b.max(1) as f64);
    println!(
        "  end vs warm-up: rss {:+.1} % (anon {:+.1} %), fds {:+.1} %",
        pct(re, rw),
        pct(ae, aw),
        pct(fe, fw)
    );
    for (name, k) in KINDS.iter().zip(&c.kinds) {
        println!(
            "  {name:<26} {:>9} ok {:>7} 4xx {:>8} 5xx {:>6} transport errors",
            k.ok.load(Ordering::Relaxed),
            k.c4xx.load(Ordering::Relaxed),
            k.c5xx.load(Ordering::Relaxed),
            k.transport.load(Ordering::Relaxed),
        );
    }
    println!(
        "  {} bad-input connections; {} config reloads, {} certificate reloads, {} faults",
        c.bad_input_sent.load(Ordering::Relaxed),
        c.reloads.load(Ordering::Relaxed),
        c.cert_reloads.load(Ordering::Relaxed),
        c.faults.load(Ordering::Relaxed),
    );
    let ok = re as f64 <= rw as f64 * 1.10 && fe as f64 <= fw as f64 * 1.10;
    println!(
        "  verdict: {}",
        if ok {
            "PASS (end within 10 % of after-warm-up)"
        } else {
            "FAIL (end more than 10 % above after-warm-up)"
        }
    );
    if !ok {
        std::process::exit(1);
    }
}
