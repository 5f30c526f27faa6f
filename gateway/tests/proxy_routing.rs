//! Requests land in their key's home cell over HTTP/1.1, h2c and HTTP/2 over TLS, carrying
//! the contract headers of SPEC §2.5 upstream and `X-Cell-ID` / `X-Request-ID` back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

struct Fleet {
    _ups: Vec<Upstream>,
    yaml: String,
}

fn three_cells(extra: &str) -> Fleet {
    three_cells_with(None, extra)
}

/// [`three_cells`], with instance `bj-1-a` at `bj_1_a` instead of a demo upstream when given.
fn three_cells_with(bj_1_a: Option<std::net::SocketAddr>, extra: &str) -> Fleet {
    let mut ups: Vec<Upstream> = vec![
        upstream("bj-1", "bj-1-b"),
        upstream("bj-2", "bj-2-a"),
        upstream("sh-1", "sh-1-a"),
    ];
    let a = bj_1_a.unwrap_or_else(|| {
        ups.push(upstream("bj-1", "bj-1-a"));
        ups[3].addr
    });
    let yaml = config_yaml(
        &[
            cell(
                "bj-1",
                "bj",
                &["bj-2", "sh-1"],
                &[("bj-1-a", a), ("bj-1-b", ups[0].addr)],
            ),
            cell("bj-2", "bj", &["bj-1"], &[("bj-2-a", ups[1].addr)]),
            cell("sh-1", "sh", &["bj-1"], &[("sh-1-a", ups[2].addr)]),
        ],
        extra,
    );
    Fleet { _ups: ups, yaml }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_requests_land_in_the_home_cell_every_time() {
    let f = three_cells("");
    let dir = TempDir::new("h1");
    std::fs::write(dir.path("c.yaml"), &f.yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let table = table_of(&f.yaml);
    let mut c = H1::connect(gw.addr).await;
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..60 {
        let key = format!("user-{i}");
        let want = expected_cell(&table, &key);
        for _ in 0..2 {
            let r = c.get("/anything", &[("x-user-id", &key)]).await;
            assert_eq!(r.status, 200);
            assert_eq!(r.header("x-cell-id"), Some(want.as_str()), "key {key}");
            assert_eq!(
                r.json()["cell"],
                want.as_str(),
                "served by an instance of {want}"
            );
            assert!(r.header("x-request-id").is_some_and(|v| !v.is_empty()));
        }
        seen.insert(want);
    }
    assert_eq!(seen.len(), 3, "60 keys spread over all three cells");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_receives_contract_headers_and_untrusted_cell_id_is_ignored() {
    let f = three_cells("");
    let dir = TempDir::new("hdr");
    std::fs::write(dir.path("c.yaml"), &f.yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let table = table_of(&f.yaml);
    let want = expected_cell(&table, "alice");
    let spoof = if want == "sh-1" { "bj-2" } else { "sh-1" };
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = get(
        gw.addr,
        "/orders/42?x=1",
        &[
            ("x-user-id", "alice"),
            ("x-request-id", "req-from-client-1"),
            ("traceparent", tp),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-timeout", "2s"),
            ("x-cell-id", spoof),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "secret"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-cell-id"),
        Some(want.as_str()),
        "spoofed X-Cell-ID must not change the route"
    );
    assert_eq!(r.header("x-request-id"), Some("req-from-client-1"));
    let body = r.json();
    assert_eq!(body["cell"], want.as_str());
    assert_eq!(body["path"], "/orders/42");
    assert_eq!(
        r.echoed("x-cell-id").as_deref(),
        Some(want.as_str()),
        "upstream sees the decided cell, not the spoof"
    );
    assert_eq!(r.echoed("x-routing-version").as_deref(), Some("1"));
    assert_eq!(
        r.echoed("x-request-id").as_deref(),
        Some("req-from-client-1")
    );
    let tp_up = r.echoed("traceparent").unwrap();
    assert!(
        tp_up.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "trace continued: {tp_up}"
    );
    assert_ne!(
        &tp_up[36..52],
        "00f067aa0ba902b7",
        "new parent id for this hop"
    );
    assert_eq!(
        r.echoed("x-forwarded-for").as_deref(),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(r.echoed("x-forwarded-proto").as_deref(), Some("http"));
    let xt = r.echoed("x-timeout").unwrap();
    let ms: u64 = xt.strip_suffix("ms").unwrap().parse().unwrap();
    assert!(
        (1000..=2000).contains(&ms),
        "remaining budget of a 2s deadline, got {xt}"
    );
    assert_eq!(
        r.echoed("x-hop"),
        None,
        "headers named by Connection are hop-by-hop"
    );
    assert_eq!(r.echoed("connection"), None);

    // Without client ids, the gateway makes them.
    let r = get(gw.addr, "/", &[("x-user-id", "alice")]).await;
    let rid = r.header("x-request-id").unwrap().to_owned();
    assert_eq!(r.echoed("x-request-id").as_deref(), Some(rid.as_str()));
    let tp = r.echoed("traceparent").unwrap();
    assert_eq!(tp.len(), 55);
    assert!(tp.starts_with("00-"));
    let ms: u64 = r
        .echoed("x-timeout")
        .unwrap()
        .strip_suffix("ms")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (14_000..=15_000).contains(&ms),
        "default 15s budget, got {ms}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_clients_may_force_a_cell() {
    let f = three_cells("routing:\n  trusted_cidrs: [127.0.0.0/8]\n");
    let dir = TempDir::new("trust");
    std::fs::write(dir.path("c.yaml"), &f.yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let table = table_of(&f.yaml);
    let want = expected_cell(&table, "alice");
    let force = if want == "sh-1" { "bj-2" } else { "sh-1" };
    let r = get(
        gw.addr,
        "/",
        &[("x-user-id", "alice"), ("x-cell-id", force)],
    )
    .await;
    assert_eq!(r.header("x-cell-id"), Some(force));
    assert_eq!(r.json()["cell"], force);
    let r = get(
        gw.addr,
        "/",
        &[("x-user-id", "alice"), ("x-cell-id", "nope")],
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("unknown cell"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_is_routed_by_key() {
    let f = three_cells("");
    let dir = TempDir::new("h2c");
    std::fs::write(dir.path("c.yaml"), &f.yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let table = table_of(&f.yaml);
    let mut tx = h2c_client(gw.addr).await;
    for key in ["alice", "bob", "carol", "dave", "erin"] {
        let req = Request::get(format!("http://gateway.test/h2/{key}"))
            .header("x-user-id", key)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let res = tx.send_request(req).await.unwrap();
        assert_eq!(res.version(), http::Version::HTTP_2);
        assert_eq!(res.status(), 200);
        let want = expected_cell(&table, key);
        assert_eq!(res.headers()["x-cell-id"], want.as_str());
        let body: serde_json::Value =
            serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(body["cell"], want.as_str());
        assert_eq!(body["path"], format!("/h2/{key}"));
        assert_eq!(
            body["headers"]["host"], "gateway.test",
            "authority becomes Host for an HTTP/1.1 upstream"
        );
    }
}

/// An HTTP/2 client may send each cookie in a field of its own (RFC 9113 §8.2.3); an
/// HTTP/1.1 upstream gets them joined into one `Cookie` field with "; ", as the RFC asks.
#[tokio::test]
async fn h2_split_cookies_reach_an_http1_upstream_as_one_field() {
    let f = three_cells("");
    let dir = TempDir::new("h2-cookies");
    std::fs::write(dir.path("c.yaml"), &f.yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let mut tx = h2c_client(gw.addr).await;
    let req = Request::get("http://gateway.test/c")
        .header("x-user-id", "alice")
        .header("cookie", "session=s1")
        .header("cookie", "theme=dark")
        .header("cookie", "lang=en")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = tx.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    // The echo joins repeated fields with ", ": one field arrives as it was sent.
    assert_eq!(
        body["headers"]["cookie"], "session=s1; theme=dark; lang=en",
        "{body}"
    );
}

/// An HTTP/2 (prior knowledge) client connection to `addr`.
async fn h2c_client(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

/// Read one HTTP/2 frame: (type, flags, stream id, payload).
async fn read_frame(s: &mut tokio::net::TcpStream) -> (u8, u8, u32, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await.expect("frame header");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.expect("frame payload");
    (head[3], head[4], stream, payload)
}

/// The HPACK representation of every field of a header block (RFC 7541 §6): `'i'` indexed,
/// `'+'` literal with incremental indexing, `'-'` literal without indexing, `'n'` literal
/// never indexed; dynamic table size updates are skipped.
fn hpack_representations(mut b: &[u8]) -> String {
    fn int(b: &mut &[u8], prefix: u32) -> usize {
        let max = (1usize << prefix) - 1;
        let mut v = usize::from(b[0]) & max;
        *b = &b[1..];
        if v == max {
            let mut shift = 0;
            loop {
                let byte = b[0];
                *b = &b[1..];
                v += usize::from(byte & 0x7f) << shift;
                shift += 7;
                if byte & 0x80 == 0 {
                    break;
                }
            }
        }
        v
    }
    fn string(b: &mut &[u8]) {
        let len = int(b, 7);
        *b = &b[len..];
    }
    let mut out = String::new();
    while !b.is_empty() {
        let first = b[0];
        if first & 0x80 != 0 {
            int(&mut b, 7);
            out.push('i');
        } else if first & 0xe0 == 0x20 {
            int(&mut b, 5);
        } else {
            let (prefix, kind) = match first {
                f if f & 0xc0 == 0x40 => (6, '+'),
                f if f & 0xf0 == 0x10 => (4, 'n'),
                _ => (4, '-'),
            };
            if int(&mut b, prefix) == 0 {
                string(&mut b);
            }
            string(&mut b);
            out.push(kind);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_request_ids_are_sent_never_indexed() {
    // A value unique to one response (X-Request-ID) must not go into the client's HPACK
    // dynamic table, where each one would evict entries later responses reuse: the gateway
    // sends it as a never-indexed literal, on answers and on its own errors alike.
    use tokio::io::AsyncWriteExt;
    let f = three_cells("");
    let dir = TempDir::new("h2c-hpack");
    std::fs::write(dir.path("c.yaml"), &f.yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    // GET / on `gateway.test`: indexed :method GET, :scheme http, :path /; :authority and
    // the other headers as literals without indexing (plain strings).
    let request = |stream: u32, headers: &[(&str, &str)]| {
        let mut block = vec![0x82, 0x86, 0x84, 0x01, 12];
        block.extend_from_slice(b"gateway.test");
        for (name, value) in headers {
            block.extend_from_slice(&[0x00, name.len() as u8]);
            block.extend_from_slice(name.as_bytes());
            block.push(value.len() as u8);
            block.extend_from_slice(value.as_bytes());
        }
        let mut frame = (block.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend_from_slice(&[0x01, 0x05]); // HEADERS, END_STREAM | END_HEADERS
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(&block);
        frame
    };
    let alice: &[(&str, &str)] = &[("x-user-id", "alice")];
    let requests = [
        (1, alice, 200),
        (3, &[("x-user-id", "bob")][..], 200),
        (5, alice, 200),
        // The gateway's own error.
        (
            7,
            &[("x-user-id", "carol"), ("x-slo-class", "urgent")][..],
            400,
        ),
    ];
    for (stream, headers, status) in requests {
        s.write_all(&request(stream, headers)).await.unwrap();
        let block = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                let (kind, flags, id, payload) = read_frame(&mut s).await;
                match kind {
                    // The server's SETTINGS: acknowledge.
                    0x04 if flags & 1 == 0 => s.write_all(b"\0\0\0\x04\x01\0\0\0\0").await.unwrap(),
                    0x01 if id == stream => {
                        assert_eq!(flags & 0x04, 0x04, "one HEADERS frame (no CONTINUATION)");
                        assert_eq!(flags & 0x28, 0, "no padding or priority");
                        break payload;
                    }
                    _ => {}
                }
            }
        })
        .await
        .expect("response HEADERS within 10 s");
        // The :status is the first field; 200 and 400 are both in the static table.
        let first = block[0];
        assert_eq!(
            first,
            if status == 200 { 0x88 } else { 0x8c },
            "status {status}"
        );
        let reps = hpack_representations(&block);
        assert_eq!(
            reps.matches('n').count(),
            1,
            "stream {stream}: exactly one never-indexed field (X-Request-ID) in {reps:?}"
        );
    }
}

fn tls_client_config(ca_der: Vec<u8>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca_der))
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_http1_over_tls_with_alpn_are_routed_by_key() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = TempDir::new("tls");
    std::fs::write(dir.path("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    let f = three_cells(&format!(
        "listen:\n  http: 127.0.0.1:0\n  tls:\n    listen: 127.0.0.1:0\n    cert: {}\n    key: {}\n",
        dir.path("cert.pem").display(),
        dir.path("key.pem").display()
    ));
    std::fs::write(dir.path("c.yaml"), &f.yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let tls_addr = gw.tls_addr.expect("TLS listener");
    let table = table_of(&f.yaml);
    let want = expected_cell(&table, "alice");
    let ca = cert.cert.der().to_vec();

    // HTTP/2 by ALPN.
    let connector =
        tokio_rustls::TlsConnector::from(tls_client_config(ca.clone(), &[b"h2", b"http/1.1"]));
    let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    let tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("https://localhost/secure")
        .header("x-user-id", "alice")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = tx.send_request(req).await.unwrap();
    assert_eq!(res.version(), http::Version::HTTP_2);
    assert_eq!(res.headers()["x-cell-id"], want.as_str());
    let body: serde_json::Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["cell"], want.as_str());
    assert_eq!(body["headers"]["x-forwarded-proto"], "https");

    // HTTP/1.1 by ALPN.
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(ca, &[b"http/1.1"]));
    let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    let tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/secure")
        .header("host", "localhost")
        .header("x-user-id", "alice")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = tx.send_request(req).await.unwrap();
    assert_eq!(res.version(), http::Version::HTTP_11);
    assert_eq!(res.headers()["x-cell-id"], want.as_str());
}

/// An upstream on loopback that answers `GET /healthz` 200 and every other request 503,
/// keeping the head of each of those.
async fn answering_503() -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = Arc::clone(&heads);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let kept = Arc::clone(&kept);
            tokio::spawn(async move {
                let (mut buf, mut chunk) = (Vec::new(), [0u8; 4096]);
                loop {
                    let n = match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        let answer: &[u8] = if head.starts_with("GET /healthz") {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
                        } else {
                            kept.lock().unwrap().push(head);
                            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
                        };
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, heads)
}

/// A request one instance answers 503 is sent again to the cell's other instance as the
/// same request: the client's headers once, and the contract headers for the cell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_retry_resends_the_same_request_to_another_instance() {
    let (failing, heads) = answering_503().await;
    let f = three_cells_with(
        Some(failing),
        // No ejection of the failing instance: it must keep getting first attempts.
        "health:\n  retry: { budget_min_per_sec: 100 }\n  outlier: { consecutive_failures: 100000, min_requests: 100000 }\n",
    );
    let yaml = &f.yaml;
    let dir = TempDir::new("resend");
    std::fs::write(dir.path("c.yaml"), yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let table = table_of(yaml);
    let key = (0..)
        .map(|i| format!("user-{i}"))
        .find(|k| expected_cell(&table, k) == "bj-1")
        .unwrap();
    let mut answers = Vec::new();
    for i in 0..6 {
        let rid = format!("resend-{i}");
        let r = get(
            gw.addr,
            "/orders/7?x=1",
            &[
                ("x-user-id", key.as_str()),
                ("x-request-id", rid.as_str()),
                ("x-forwarded-for", "203.0.113.9"),
                ("x-custom", "kept"),
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "secret"),
            ],
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.json()["instance"], "bj-1-b");
        answers.push((rid, r));
    }
    // Smooth WRR spreads first attempts over both instances: some of the six went to the
    // failing one first. Each such first attempt must match what the other one received.
    let heads = heads.lock().unwrap().clone();
    assert!(
        !heads.is_empty(),
        "no first attempt reached the failing instance"
    );
    for head in &heads {
        let field = |name: &str| {
            head.lines().skip(1).find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
        };
        assert!(head.starts_with("GET /orders/7?x=1 HTTP/1.1"), "{head}");
        let rid = field("x-request-id").unwrap();
        let (_, resent) = answers.iter().find(|(r, _)| *r == rid).unwrap();
        assert_eq!(resent.json()["path"], "/orders/7");
        for name in [
            "x-cell-id",
            "x-routing-version",
            "x-request-id",
            "traceparent",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-user-id",
            "x-custom",
            "host",
        ] {
            assert_eq!(
                resent.echoed(name),
                field(name),
                "{name} of the resend, first attempt: {head}"
            );
        }
        assert_eq!(field("x-cell-id").as_deref(), Some("bj-1"));
        assert_eq!(
            field("x-forwarded-for").as_deref(),
            Some("203.0.113.9, 127.0.0.1")
        );
        assert!(field("x-timeout").is_some() && resent.echoed("x-timeout").is_some());
        assert_eq!(field("x-hop"), None, "hop-by-hop: {head}");
        assert_eq!(resent.echoed("x-hop"), None);
    }
}

/// `Trailer` is end to end (RFC 9110 §6.6.2): an upstream's HTTP/1.1 trailers reach an
/// HTTP/1.1 client that asked for them with `TE: trailers`. hyper writes only the trailer
/// fields the response's `Trailer` header names, so stripping it would drop them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_trailers_pass_through_end_to_end() {
    use hyper::service::service_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = listener.local_addr().unwrap();
    let upstream = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|_req: http::Request<hyper::body::Incoming>| async {
                    let mut t = http::HeaderMap::new();
                    t.insert("x-checksum", http::HeaderValue::from_static("abc123"));
                    let body = Full::new(Bytes::from_static(b"hello"))
                        .with_trailers(async move { Some(Ok::<_, std::convert::Infallible>(t)) });
                    let mut res = http::Response::new(body);
                    let h = res.headers_mut();
                    h.insert("trailer", http::HeaderValue::from_static("x-checksum"));
                    // Chunked, where trailers can follow (the body's size is known).
                    h.insert(
                        "transfer-encoding",
                        http::HeaderValue::from_static("chunked"),
                    );
                    Ok::<_, std::convert::Infallible>(res)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let yaml = config_yaml(&[cell("a", "r1", &[], &[("a-1", up_addr)])], "");
    let dir = TempDir::new("trailers");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));

    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /t HTTP/1.1\r\nHost: x\r\nX-User-ID: alice\r\nTE: trailers\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let read_all = async {
        let mut b = [0u8; 4096];
        loop {
            let n = s.read(&mut b).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&b[..n]);
            let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
            if text.contains("\r\n0\r\n") && text.ends_with("\r\n\r\n") {
                break;
            }
        }
    };
    let finished = tokio::time::timeout(std::time::Duration::from_secs(5), read_all)
        .await
        .is_ok();
    assert!(
        finished,
        "response not finished within 5 s: {}",
        String::from_utf8_lossy(&got)
    );
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("transfer-encoding: chunked"), "{text}");
    let tail = text.split("\r\n0\r\n").nth(1).unwrap_or_default();
    assert!(
        tail.contains("x-checksum: abc123"),
        "no trailer after the last chunk: {text}"
    );
    upstream.abort();
}

/// `routing.forwarded_for: replace`: a client outside `trusted_cidrs` cannot pose as
/// another address — its `X-Forwarded-For` is replaced by its own; a trusted one (a load
/// balancer in front) keeps the chain, appended to. The default appends for everyone.
#[tokio::test]
async fn forwarded_for_is_replaced_for_untrusted_clients_when_configured() {
    let up = upstream("a", "a-1");
    let cells = [cell("a", "r1", &[], &[("a-1", up.addr)])];
    for (extra, want) in [
        ("", "203.0.113.9, 127.0.0.1"),
        ("routing: { forwarded_for: replace }\n", "127.0.0.1"),
        (
            "routing: { forwarded_for: replace, trusted_cidrs: [\"127.0.0.0/8\"] }\n",
            "203.0.113.9, 127.0.0.1",
        ),
    ] {
        let yaml = config_yaml(&cells, extra);
        let dir = TempDir::new("xff");
        std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
        let gw = Gateway::start(&dir.path("c.yaml"));
        let r = get(
            gw.addr,
            "/",
            &[("x-user-id", "alice"), ("x-forwarded-for", "203.0.113.9")],
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.echoed("x-forwarded-for").as_deref(),
            Some(want),
            "{extra}"
        );
    }
}

/// `balance: key_affinity`: a key keeps its instance of the cell request after request;
/// keys spread over the instances; when an instance stops answering only its keys move
/// (to the next instance on the ring), the others stay put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_affinity_keeps_each_key_on_its_instance_and_moves_only_a_lost_instances_keys() {
    let ups = [
        upstream("a", "a-1"),
        upstream("a", "a-2"),
        upstream("a", "a-3"),
    ];
    let yaml = config_yaml(
        &[cell(
            "a",
            "r1",
            &[],
            &[
                ("a-1", ups[0].addr),
                ("a-2", ups[1].addr),
                ("a-3", ups[2].addr),
            ],
        )],
        "",
    )
    .replace(
        "    state: active\n",
        "    state: active\n    balance: key_affinity\n",
    );
    let dir = TempDir::new("affinity");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let mut c = H1::connect(gw.addr).await;
    let keys: Vec<String> = (0..30).map(|i| format!("user-{i}")).collect();
    let mut home = std::collections::BTreeMap::new();
    for k in &keys {
        for round in 0..3 {
            let r = c.get("/", &[("x-user-id", k)]).await;
            assert_eq!(r.status, 200);
            let inst = r.json()["instance"].as_str().unwrap().to_owned();
            let first = home.entry(k.clone()).or_insert_with(|| inst.clone());
            assert_eq!(*first, inst, "key {k} moved in round {round}");
        }
    }
    let used: std::collections::BTreeSet<&String> = home.values().collect();
    assert!(used.len() >= 2, "keys spread over instances: {home:?}");
    // The instance with the most keys stops answering.
    let lost = ["a-1", "a-2", "a-3"]
        .into_iter()
        .max_by_key(|n| home.values().filter(|v| v == n).count())
        .unwrap();
    let idx = ["a-1", "a-2", "a-3"]
        .iter()
        .position(|n| *n == lost)
        .unwrap();
    fault(ups[idx].addr, r#"{"refuse_for_s": 10}"#).await;
    wait_refusing(ups[idx].addr).await;
    for k in &keys {
        let r = c.get("/", &[("x-user-id", k)]).await;
        assert_eq!(r.status, 200, "key {k}");
        let inst = r.json()["instance"].as_str().unwrap().to_owned();
        if home[k] == lost {
            assert_ne!(inst, lost, "key {k}");
        } else {
            assert_eq!(inst, home[k], "key {k} moved though its instance answers");
        }
    }
}
