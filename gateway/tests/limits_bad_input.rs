//! The bad-input suite against the real binary: oversized and too many headers, long
//! targets, bodies past the limit, slow loris, every request-smuggling variant, bad keys, a
//! malformed gRPC frame and an HTTP/2 rapid-reset burst. Each gets its documented answer
//! (README "Limits and bad input"), the gateway never panics, and it serves normally after.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMITS: &str = "limits:
  max_header_bytes: 4096
  max_headers: 20
  max_uri_bytes: 512
  max_body_bytes: 1024
  header_read_timeout: 600ms
  idle_timeout: 2s
  h2_max_concurrent_streams: 100
";

struct Fixture {
    _up: Upstream,
    _dir: TempDir,
    gw: Gateway,
}

fn start(extra: &str) -> Fixture {
    let up = upstream("a", "a-1");
    let yaml = config_yaml(&[cell("a", "r1", &[], &[("a-1", up.addr)])], extra);
    let dir = TempDir::new("limits");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    Fixture {
        _up: up,
        _dir: dir,
        gw,
    }
}

/// What a raw exchange produced: the bytes received, and whether the gateway closed the
/// connection (EOF or reset) within the wait.
struct Raw {
    text: String,
    closed: bool,
}

impl Raw {
    fn status(&self) -> &str {
        self.text.get(9..12).unwrap_or("")
    }
    fn responses(&self) -> usize {
        self.text.matches("HTTP/1.1 ").count()
    }
}

async fn raw(addr: SocketAddr, bytes: &[u8]) -> Raw {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_all(&mut s, Duration::from_secs(5)).await
}

async fn read_all(s: &mut TcpStream, within: Duration) -> Raw {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let end = Instant::now() + within;
    let mut closed = false;
    while Instant::now() < end {
        match tokio::time::timeout_at(end.into(), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
    }
    Raw {
        text: String::from_utf8_lossy(&buf).into_owned(),
        closed,
    }
}

fn json_of(raw: &Raw) -> serde_json::Value {
    let body = raw.text.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", raw.text))
}

async fn still_serves(addr: SocketAddr) {
    let r = get(addr, "/after", &[("x-user-id", "alice")]).await;
    assert_eq!(r.status, 200, "the gateway serves normally afterwards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_get_431_or_414_and_the_gateway_keeps_serving() {
    let f = start(LIMITS);
    let addr = f.gw.addr;

    // One header past max_header_bytes: hyper answers 431 and closes.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nX-Big: {}\r\n\r\n",
        "b".repeat(5000)
    );
    let r = raw(addr, big.as_bytes()).await;
    assert_eq!(r.status(), "431", "{:?}", r.text);
    assert!(r.closed);

    // More headers than max_headers: 431 and closed.
    let mut many = String::from("GET / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\n");
    for i in 0..25 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let r = raw(addr, many.as_bytes()).await;
    assert_eq!(r.status(), "431", "{:?}", r.text);
    assert!(r.closed);

    // A request target past max_uri_bytes: the gateway's JSON 414.
    let long = format!("/{}", "p".repeat(600));
    let r = get(addr, &long, &[("x-user-id", "alice")]).await;
    assert_eq!(r.status, 414);
    assert!(r.json()["error"].as_str().unwrap().contains("limit is 512"));
    assert!(r.header("x-request-id").is_some());

    // HTTP/2 (h2c): more headers than max_headers is the gateway's JSON 431.
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut b = Request::get("http://gateway.test/").header("x-user-id", "alice");
    for i in 0..25 {
        b = b.header(format!("x-h{i}"), "v");
    }
    let res = tx
        .send_request(b.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 431);
    let body: serde_json::Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert!(body["error"].as_str().unwrap().contains("the limit is 20"));

    // HTTP/2: a header block past max_header_bytes is refused by the codec with a 431.
    let req = Request::get("http://gateway.test/")
        .header("x-user-id", "alice")
        .header("x-big", "b".repeat(5000))
        .body(Full::new(Bytes::new()))
        .unwrap();
    match tx.send_request(req).await {
        Ok(res) => assert_eq!(res.status(), 431),
        Err(e) => panic!("oversized HTTP/2 header block: {e}"),
    }

    still_serves(addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_the_limit_get_413_whether_declared_or_streamed() {
    let f = start(LIMITS);
    let addr = f.gw.addr;

    // Declared: answered before the body is sent, and the connection closes.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nContent-Length: 5000\r\n\r\n")
        .await
        .unwrap();
    let r = read_all(&mut s, Duration::from_secs(5)).await;
    assert_eq!(r.status(), "413", "{:?}", r.text);
    assert!(r.text.to_ascii_lowercase().contains("connection: close"));
    assert!(json_of(&r)["error"]
        .as_str()
        .unwrap()
        .contains("1024 bytes"));
    assert!(r.closed);

    // Declared, with the whole body already on its way (an HTTP client writing it while
    // the answer comes): the client gets the 413, not a connection error.
    for _ in 0..20 {
        let s = TcpStream::connect(addr).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::post("/up")
            .header("host", "x")
            .header("x-user-id", "a")
            .body(Full::new(Bytes::from(vec![b'z'; 300_000])))
            .unwrap();
        match tx.send_request(req).await {
            Ok(res) => assert_eq!(res.status(), 413),
            Err(e) => panic!("early 413 lost to a reset: {e}"),
        }
    }

    // Streamed (chunked, no length): counted as it flows.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /up HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await
    .unwrap();
    let chunk = format!("200\r\n{}\r\n", "c".repeat(512));
    for _ in 0..3 {
        if s.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let r = read_all(&mut s, Duration::from_secs(5)).await;
    assert_eq!(r.status(), "413", "{:?}", r.text);
    assert!(json_of(&r)["error"]
        .as_str()
        .unwrap()
        .contains("1024 bytes"));
    assert!(r.closed);

    // Within the limit, a streamed body goes through.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /up HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let r = read_all(&mut s, Duration::from_secs(5)).await;
    assert_eq!(r.status(), "200", "{:?}", r.text);

    // HTTP/2 without a length: counted as it flows, 413.
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (btx, brx) = tokio::sync::mpsc::channel(4);
    let body = ChannelBody(brx);
    let req = Request::post("http://gateway.test/up")
        .header("x-user-id", "alice")
        .body(body)
        .unwrap();
    let send = tokio::spawn(async move { tx.send_request(req).await });
    for _ in 0..4 {
        if btx
            .send(Ok(http_body::Frame::data(Bytes::from(vec![b'd'; 512]))))
            .await
            .is_err()
        {
            break;
        }
    }
    drop(btx);
    let res = send.await.unwrap().unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.map(|b| b.to_bytes());
    assert_eq!(status, 413, "{body:?}");

    still_serves(addr).await;
}

/// A request body from a channel (streamed, with no length).
struct ChannelBody(tokio::sync::mpsc::Receiver<Result<http_body::Frame<Bytes>, std::io::Error>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_is_cut_off_and_idle_keep_alive_is_separate() {
    let f = start(LIMITS);
    let addr = f.gw.addr;

    // A head trickled one line every 100 ms never completes: closed at the header read
    // timeout (600 ms), without an answer.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let t = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut closed_after = None;
    for i in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut probe = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(1), s.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed_after = Some(t.elapsed());
                break;
            }
            Ok(Ok(n)) => panic!("slow loris got an answer: {:?}", &probe[..n]),
            Err(_) => {}
        }
        if s.write_all(format!("X-Slow-{i}: a\r\n").as_bytes())
            .await
            .is_err()
        {
            closed_after = Some(t.elapsed());
            break;
        }
    }
    let took = closed_after.expect("the slow-loris connection was never closed");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(2500),
        "closed after {took:?}"
    );

    // A kept-alive connection idle for longer than the header read timeout but less than
    // the idle timeout still serves.
    let mut c = H1::connect(addr).await;
    assert_eq!(c.get("/1", &[("x-user-id", "alice")]).await.status, 200);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(c.get("/2", &[("x-user-id", "alice")]).await.status, 200);

    // Idle past idle_timeout (2 s): closed by the gateway.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\n\r\n")
        .await
        .unwrap();
    let t = Instant::now();
    let r = read_all(&mut s, Duration::from_secs(6)).await;
    assert_eq!(r.status(), "200");
    assert!(r.closed, "idle connection not closed");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_millis(4000),
        "idle close after {took:?}"
    );

    still_serves(addr).await;
}

/// An idle HTTP/1 connection is parked after 1 s without hyper's buffers; what the client
/// sends next (split, pipelined or never finished) is served exactly as on a busy one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_keep_alive_connections_wake_without_losing_a_byte() {
    let f = start(&LIMITS.replace("idle_timeout: 2s", "idle_timeout: 20s"));
    let addr = f.gw.addr;
    let req = |p: &str| format!("GET /{p} HTTP/1.1\r\nHost: x\r\nX-User-ID: alice\r\n\r\n");
    let park = || tokio::time::sleep(Duration::from_millis(1500));
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req("1").as_bytes()).await.unwrap();
    let r = read_all(&mut s, Duration::from_millis(500)).await;
    assert_eq!((r.status(), r.responses(), r.closed), ("200", 1, false));

    // Parked; the next head arrives in two pieces 200 ms apart.
    park().await;
    let second = req("2");
    let (a, b) = second.split_at(10);
    s.write_all(a.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(b.as_bytes()).await.unwrap();
    let r = read_all(&mut s, Duration::from_millis(500)).await;
    assert_eq!((r.status(), r.responses(), r.closed), ("200", 1, false));
    assert!(
        !r.text.to_ascii_lowercase().contains("connection: close"),
        "a woken connection stays kept alive: {}",
        r.text
    );

    // Parked again; two pipelined requests in one write: two answers, in order.
    park().await;
    s.write_all(format!("{}{}", req("3"), req("4")).as_bytes())
        .await
        .unwrap();
    let r = read_all(&mut s, Duration::from_millis(700)).await;
    assert_eq!((r.responses(), r.closed), (2, false), "{}", r.text);

    // Parked again; a head that never completes is cut off at the header read timeout
    // (600 ms) without an answer.
    park().await;
    s.write_all(b"GET /5 HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let t = Instant::now();
    let r = read_all(&mut s, Duration::from_secs(4)).await;
    let took = t.elapsed();
    assert!(r.closed && r.text.is_empty(), "got {:?}", r.text);
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(2000),
        "cut off after {took:?}"
    );

    still_serves(addr).await;
}

/// An upstream on loopback that answers every request with `len` bytes (`Content-Length`).
async fn big_body_upstream(len: usize) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                let mut got = Vec::new();
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        got.drain(..end + 4);
                        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
                        if s.write_all(head.as_bytes()).await.is_err()
                            || s.write_all(&vec![b'z'; len]).await.is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A client with a small receive window that has asked for `/big` (and reads nothing yet):
/// most of the answer waits in the gateway.
async fn slow_reader(addr: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\nX-User-ID: alice\r\n\r\n")
        .await
        .unwrap();
    s
}

/// A client that stops reading an answer for longer than the park delay still gets all of
/// it: a connection is never parked while part of an answer waits to be written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_gets_the_whole_answer() {
    const LEN: usize = 3 << 20;
    let up = big_body_upstream(LEN).await;
    let yaml = config_yaml(
        &[cell("a", "r1", &[], &[("a-1", up)])],
        &LIMITS.replace("idle_timeout: 2s", "idle_timeout: 20s"),
    );
    let dir = TempDir::new("stall");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let mut s = slow_reader(gw.addr).await;
    // Read a little, then stall for longer than the park delay, three times over.
    let mut got = 0usize;
    let mut buf = vec![0u8; 65536];
    for _ in 0..3 {
        let n = s.read(&mut buf).await.unwrap();
        got += n;
        tokio::time::sleep(Duration::from_millis(1600)).await;
    }
    let end = Instant::now() + Duration::from_secs(20);
    let mut head_len = None;
    let mut text = Vec::new();
    text.extend_from_slice(b"");
    while Instant::now() < end {
        match tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                if head_len.is_none() && text.len() < 4096 {
                    text.extend_from_slice(&buf[..n.min(4096)]);
                }
                got += n;
                if head_len.is_none() {
                    head_len = text
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map(|p| p + 4);
                }
                if head_len.is_some_and(|h| got >= h + LEN) {
                    break;
                }
            }
        }
    }
    // The head is ~150 bytes; everything after it is the body.
    assert!(
        got >= LEN + 100,
        "the answer was cut short: {got} bytes of a {LEN}-byte body and its head"
    );
    // The connection is still usable afterwards.
    s.write_all(b"GET /again HTTP/1.1\r\nHost: x\r\nX-User-ID: alice\r\n\r\n")
        .await
        .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n.min(64)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_variants_are_refused_with_400_and_the_connection_closed() {
    let f = start(LIMITS);
    let addr = f.gw.addr;
    let tail = "GET /smuggled HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\n\r\n";
    let cases: Vec<(&str, String)> = vec![
        (
            "Content-Length with Transfer-Encoding",
            format!("POST / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{tail}"),
        ),
        (
            "Transfer-Encoding with Content-Length",
            format!("POST / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 60\r\n\r\n0\r\n\r\n{tail}"),
        ),
        (
            "differing duplicate Content-Length",
            format!("POST / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello{tail}"),
        ),
        (
            "equal duplicate Content-Length",
            format!("POST / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello{tail}"),
        ),
        (
            "Content-Length list",
            format!("POST / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nContent-Length: 5, 5\r\n\r\nhello{tail}"),
        ),
        (
            "signed Content-Length",
            format!("POST / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nContent-Length: +5\r\n\r\nhello{tail}"),
        ),
        (
            "hex Content-Length",
            format!("POST / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nContent-Length: 0x5\r\n\r\nhello{tail}"),
        ),
        (
            "space before the colon",
            format!("POST / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nContent-Length : 5\r\n\r\nhello{tail}"),
        ),
        (
            "invalid chunk size",
            format!("POST / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n{tail}"),
        ),
        (
            "overflowing chunk size",
            format!("POST / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nhello\r\n0\r\n\r\n{tail}"),
        ),
        (
            "chunked not last",
            format!("POST / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n{tail}"),
        ),
        (
            "another coding before chunked",
            format!("POST / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n{tail}"),
        ),
        (
            "two Transfer-Encoding lines",
            format!("POST / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{tail}"),
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            format!("POST / HTTP/1.0\r\nHost: x\r\nX-User-ID: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{tail}"),
        ),
        (
            "obs-fold",
            format!("GET / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nX-Folded: one\r\n two\r\n\r\n{tail}"),
        ),
        (
            "bare CR",
            format!("GET / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\rX-Other: b\r\n\r\n{tail}"),
        ),
        (
            "bare LF",
            format!("GET / HTTP/1.1\nHost: x\nX-User-ID: a\n\n{tail}"),
        ),
    ];
    for (name, bytes) in &cases {
        let r = raw(addr, bytes.as_bytes()).await;
        assert_eq!(r.status(), "400", "{name}: answered {:?}", r.text);
        assert_eq!(
            r.responses(),
            1,
            "{name}: the smuggled request was answered: {:?}",
            r.text
        );
        assert!(r.closed, "{name}: connection left open");
    }
    still_serves(addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_and_over_long_keys_are_400_from_every_source() {
    let f = start(&format!(
        "{LIMITS}routing:\n  key_sources: [ {{ header: X-User-ID }}, {{ cookie: uid }}, {{ query: uid }}, {{ jwt: {{ header: X-Token }} }} ]\n"
    ));
    let addr = f.gw.addr;
    let long = "k".repeat(300);
    for (name, head) in [
        ("header, invalid UTF-8", b"X-User-ID: \xff\xfe\r\n".to_vec()),
        (
            "header, over-long",
            format!("X-User-ID: {long}\r\n").into_bytes(),
        ),
        (
            "cookie, invalid UTF-8",
            b"Cookie: uid=\xc3\x28\r\n".to_vec(),
        ),
        (
            "cookie, over-long",
            format!("Cookie: uid={long}\r\n").into_bytes(),
        ),
        ("jwt, not a token", b"X-Token: a.b\r\n".to_vec()),
    ] {
        let mut req = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
        req.extend_from_slice(&head);
        req.extend_from_slice(b"Connection: close\r\n\r\n");
        let r = raw(addr, &req).await;
        assert_eq!(r.status(), "400", "{name}: {:?}", r.text);
        let v = json_of(&r);
        assert!(!v["error"].as_str().unwrap().is_empty(), "{name}");
        assert!(!v["request_id"].as_str().unwrap().is_empty(), "{name}");
    }
    for (name, target) in [
        ("query, invalid UTF-8", "/?uid=%C3%28".to_owned()),
        ("query, over-long", format!("/?uid={}", "q".repeat(300))),
    ] {
        let r = get(addr, &target, &[]).await;
        assert_eq!(r.status, 400, "{name}");
    }
    still_serves(addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_grpc_frame_goes_through_and_never_crashes_the_gateway() {
    let f = start(LIMITS);
    let addr = f.gw.addr;
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    for body in [
        &b"\x00\x00\x00"[..],                    // shorter than a frame header
        b"\x00\xff\xff\xff\xffonly a few bytes", // length prefix far past the body
        b"\x07\x00\x00\x00\x01x",                // unknown compression flag
    ] {
        let req = Request::post("http://gateway.test/pkg.Svc/Method")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("x-user-id", "alice")
            .body(Full::new(Bytes::from_static(body)))
            .unwrap();
        let res = tx.send_request(req).await.unwrap();
        // The gateway does not parse gRPC frames: the request reaches the upstream (the demo
        // upstream answers 200), or a gRPC client gets a grpc-status; never a crash.
        assert!(
            res.status() == 200 || res.headers().contains_key("grpc-status"),
            "answered {}",
            res.status()
        );
        let _ = res.into_body().collect().await;
    }
    still_serves(addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_rapid_reset_burst_is_cut_off_and_the_gateway_keeps_serving() {
    let f = start(LIMITS);
    let addr = f.gw.addr;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let t = Instant::now();
    let mut opened = 0u32;
    for _ in 0..5000 {
        let Ok(c) = client.clone().ready().await else {
            break;
        };
        client = c;
        let req = Request::get("http://gateway.test/reset")
            .header("x-user-id", "alice")
            .body(())
            .unwrap();
        let Ok((_res, mut stream)) = client.send_request(req, false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        opened += 1;
        if t.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    // The gateway ends the connection with GOAWAY long before 5000 resets.
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    let err = match ended {
        Ok(Ok(Err(e))) => e,
        other => panic!("connection not ended by the gateway after {opened} resets: {other:?}"),
    };
    assert!(opened < 5000, "all {opened} resets accepted");
    // GOAWAY(ENHANCE_YOUR_CALM), or — when the client was still writing as the gateway
    // closed — the broken connection itself.
    assert!(
        err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || err.is_io(),
        "after {opened} resets: {err:?}"
    );
    still_serves(addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_new_clients_get_503_and_are_closed() {
    let f = start("limits: { max_connections: 3 }\n");
    let addr = f.gw.addr;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = H1::connect(addr).await;
        assert_eq!(c.get("/", &[("x-user-id", "alice")]).await.status, 200);
        held.push(c);
    }
    let r = raw(addr, b"GET / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\n\r\n").await;
    assert_eq!(r.status(), "503", "{:?}", r.text);
    assert!(json_of(&r)["error"]
        .as_str()
        .unwrap()
        .contains("limit of 3 connections"));
    assert!(r.closed);
    // A held connection still works; once one closes, a new client gets in.
    assert_eq!(
        held[0].get("/", &[("x-user-id", "alice")]).await.status,
        200
    );
    held.pop();
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-User-ID: a\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let r = read_all(&mut s, Duration::from_secs(5)).await;
        if r.status() == "200" {
            break;
        }
        assert!(Instant::now() < end, "no slot freed: {:?}", r.text);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client that takes none of an answer for longer than `idle_timeout` has its connection
/// cut (and with it the upstream response it was holding): a client that never reads
/// cannot hold a connection and an upstream connection forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_after_the_idle_timeout() {
    const LEN: usize = 8 << 20;
    let up = big_body_upstream(LEN).await;
    let yaml = config_yaml(&[cell("a", "r1", &[], &[("a-1", up)])], LIMITS);
    let dir = TempDir::new("never-reads");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let mut s = slow_reader(gw.addr).await;
    // Read nothing for twice idle_timeout (2 s).
    tokio::time::sleep(Duration::from_secs(4)).await;
    // What the client reads now ends before the whole answer: the connection was cut.
    // (Not cut, the rest of the 8 MiB would flow within the wait, keep-alive.)
    let r = read_all(&mut s, Duration::from_secs(5)).await;
    assert!(r.closed, "connection still open");
    assert!(
        r.text.len() < LEN,
        "the whole answer arrived: {}",
        r.text.len()
    );
    still_serves(gw.addr).await;
}

/// An upstream that sends the head and `sent` bytes of a `len`-byte body, then a byte every
/// `every` until `stop_after` more, then holds the connection open, saying nothing. Sends
/// `()` on `closed` when the gateway closes the connection.
async fn stalling_upstream(
    len: usize,
    sent: usize,
    every: Duration,
    stop_after: usize,
    closed: tokio::sync::mpsc::UnboundedSender<()>,
) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let closed = closed.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&vec![b'z'; sent]).await;
                for _ in 0..stop_after {
                    tokio::time::sleep(every).await;
                    if s.write_all(b"z").await.is_err() {
                        let _ = closed.send(());
                        return;
                    }
                }
                // Silent from here on; report when the gateway lets go.
                let end = Instant::now() + Duration::from_secs(30);
                while Instant::now() < end {
                    match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => {
                            let _ = closed.send(());
                            return;
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    addr
}

/// An upstream that stops in the middle of an answer (hung, or cut off by a partition
/// without a reset) does not hold the client, or the upstream connection, forever: once
/// nothing more came for `idle_timeout` (2 s) the client connection is cut and the upstream
/// connection closed. One that trickles (a byte every 0.5 s for 5 s) is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_stops_midway_is_cut_after_the_idle_timeout() {
    let (tx, mut upstream_closed) = tokio::sync::mpsc::unbounded_channel();
    let stalled = stalling_upstream(100, 10, Duration::ZERO, 0, tx.clone()).await;
    let trickle = stalling_upstream(10, 0, Duration::from_millis(500), 10, tx).await;
    let plain = upstream("c", "c-1");
    let yaml = config_yaml(
        &[
            cell("a", "r1", &[], &[("a-1", stalled)]),
            cell("b", "r1", &[], &[("b-1", trickle)]),
            cell("c", "r1", &[], &[("c-1", plain.addr)]),
        ],
        &format!("{LIMITS}overrides:\n  alice: a\n  bob: b\n  carol: c\n"),
    );
    let dir = TempDir::new("answer-stall");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));

    // The trickle: every byte arrives, the connection stays open.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /t HTTP/1.1\r\nHost: x\r\nX-User-ID: bob\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    let end = Instant::now() + Duration::from_secs(10);
    while !got.ends_with(b"\r\n\r\nzzzzzzzzzz") {
        match tokio::time::timeout_at(end.into(), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&chunk[..n]),
            other => panic!(
                "a trickling answer was cut ({other:?}): {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    assert!(got.starts_with(b"HTTP/1.1 200"));

    // The stall: the head and 10 bytes, then the connection is closed.
    let t0 = Instant::now();
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /s HTTP/1.1\r\nHost: x\r\nX-User-ID: alice\r\n\r\n")
        .await
        .unwrap();
    let r = read_all(&mut s, Duration::from_secs(10)).await;
    assert!(r.text.starts_with("HTTP/1.1 200"), "{:?}", r.text);
    assert!(r.text.ends_with("\r\n\r\nzzzzzzzzzz"), "{:?}", r.text);
    assert!(r.closed, "the client still waits for the rest");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(6),
        "cut after {waited:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), upstream_closed.recv())
        .await
        .expect("the upstream connection was kept open")
        .unwrap();
    assert!(
        gw.wait_log(
            "upstream sent nothing more of an answer",
            Duration::from_secs(2)
        )
        .await
    );
    let r = get(gw.addr, "/after", &[("x-user-id", "carol")]).await;
    assert_eq!(r.status, 200, "the gateway serves normally afterwards");
}

/// The `100 Continue` hyper sends for a request that expects it is not the answer: an
/// upstream that takes longer than `idle_timeout` (2 s) to answer the upload is waited for
/// (within the deadline), not cut as a stalled answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_continue_is_not_taken_for_the_answer_starting() {
    let up = upstream("a", "a-1");
    fault(up.addr, r#"{"delay_ms": 3000}"#).await;
    let yaml = config_yaml(&[cell("a", "r1", &[], &[("a-1", up.addr)])], LIMITS);
    let dir = TempDir::new("continue");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nX-User-ID: alice\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 100"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    s.write_all(b"hello").await.unwrap();
    let r = read_all(&mut s, Duration::from_secs(6)).await;
    assert!(r.text.starts_with("HTTP/1.1 200"), "{:?}", r.text);
}

/// Tunnels are not proxied, and the client is told: CONNECT is a 405, a WebSocket (or
/// other) upgrade a 501, each with a JSON error; an `Upgrade: h2c` offer is answered over
/// HTTP/1.1 as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_protocol_upgrades_are_refused_with_a_clear_answer() {
    let f = start(LIMITS);
    let r = raw(
        f.gw.addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nX-User-ID: alice\r\n\r\n",
    )
    .await;
    assert_eq!(r.status(), "405", "{:?}", r.text);
    assert!(r.text.contains("not a tunnel"), "{:?}", r.text);
    let r = raw(
        f.gw.addr,
        b"GET /chat HTTP/1.1\r\nHost: x\r\nX-User-ID: alice\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert_eq!(r.status(), "501", "{:?}", r.text);
    assert!(r.text.contains("websocket"), "{:?}", r.text);
    let r = raw(
        f.gw.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nX-User-ID: alice\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert_eq!(r.status(), "200", "{:?}", r.text);
    still_serves(f.gw.addr).await;
}

/// A body past the limit on its way to an HTTP/2 (h2c) upstream is the client's 413, as
/// on HTTP/1.1, and is not held against the instance (the upstream connection reports the
/// abort as its own stream error): a client cannot eject instances with big bodies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_past_the_limit_to_an_h2c_upstream_is_the_clients_413() {
    let up = upstream("a", "a-1");
    let yaml = config_yaml(&[cell("a", "r1", &[], &[("a-1", up.addr)])], LIMITS).replace(
        "    state: active\n",
        "    state: active\n    protocol: h2c\n",
    );
    let dir = TempDir::new("h2c-body");
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let chunk = "x".repeat(1000);
    for _ in 0..6 {
        let mut req = String::from(
            "POST /up HTTP/1.1\r\nHost: x\r\nX-User-ID: alice\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        for _ in 0..4 {
            req.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
        }
        req.push_str("0\r\n\r\n");
        let r = raw(gw.addr, req.as_bytes()).await;
        assert_eq!(r.status(), "413", "{:?}", r.text);
    }
    assert!(
        !gw.logs_contain("instance ejected"),
        "ejected for client bodies"
    );
    still_serves(gw.addr).await;
}
