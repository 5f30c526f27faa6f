//! The engine floor: a minimal HTTP/1.1 reverse proxy on bare hyper 1.x + tokio, the
//! `hyper` reference target of `benches/load/run.sh` and `benches/load/instructions.sh`.
//! Not a product and not part of the gateway.
//!
//! ```text
//! hyper_floor --listen 127.0.0.1:PORT --upstream HOST:PORT --upstream HOST:PORT --upstream HOST:PORT
//! ```
//!
//! It does the load comparison's job and nothing else: one thread (a current-thread tokio
//! runtime and a `LocalSet`), hyper's HTTP/1.1 server with keep-alive, the upstream picked
//! by `xxh3_64(X-User-ID) % 3` (a request without the header gets 400), `x-cell-id: cN`
//! added, method, path and query, headers and body forwarded over HTTP/1.1 keep-alive
//! connections from its own per-thread pool of hyper `SendRequest`s, the response streamed
//! back (502 when the upstream fails), each message written with one `send` (hyper's
//! `writev(false)`), mimalloc as the allocator (the gateway's). Whatever
//! this costs per request is what the engine cellgate is built on costs; cellgate's figure
//! above it is the price of its features.
//!
//! It must never grow a routing table, health checks, metrics, timeouts, retries, logging
//! or configuration: every one of them would move the floor it exists to measure.

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::uri::Uri;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{spawn_local, LocalSet};

#[global_allocator]
static GLOBAL: cellgate::alloc::Mimalloc = cellgate::alloc::Mimalloc;

/// Idle senders kept per upstream; a sender returned to a full pool is dropped.
const POOL_CAP: usize = 256;
const UPSTREAMS: usize = 3;
const USAGE: &str = "usage: hyper_floor --listen 127.0.0.1:PORT --upstream HOST:PORT --upstream HOST:PORT --upstream HOST:PORT";

type Body = Either<Incoming, Full<Bytes>>;

struct Upstream {
    addr: SocketAddr,
    cell: HeaderValue,
    pool: RefCell<Vec<SendRequest<Incoming>>>,
}

impl Upstream {
    /// A pooled sender ready for a request; closed ones are dropped on the way, busy ones
    /// (a response body still streaming) stay.
    fn take(&self) -> Option<SendRequest<Incoming>> {
        let mut pool = self.pool.borrow_mut();
        let mut i = pool.len();
        while i > 0 {
            i -= 1;
            if pool[i].is_closed() {
                pool.swap_remove(i);
            } else if pool[i].is_ready() {
                return Some(pool.swap_remove(i));
            }
        }
        None
    }

    fn put(&self, tx: SendRequest<Incoming>) {
        let mut pool = self.pool.borrow_mut();
        if pool.len() < POOL_CAP {
            pool.push(tx);
        }
    }

    async fn connect(&self) -> Option<SendRequest<Incoming>> {
        let stream = TcpStream::connect(self.addr).await.ok()?;
        stream.set_nodelay(true).ok()?;
        // One buffer per message, written with `send` (as cellgate does since 9d63eea): the
        // kernel's `writev` path costs more per call.
        let (tx, conn) = hyper::client::conn::http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await
            .ok()?;
        spawn_local(async move {
            let _ = conn.await;
        });
        Some(tx)
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut res = Response::new(Either::Right(Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    res
}

async fn proxy(
    req: Request<Incoming>,
    upstreams: Rc<[Upstream; UPSTREAMS]>,
) -> Result<Response<Body>, Infallible> {
    static X_CELL_ID: HeaderName = HeaderName::from_static("x-cell-id");
    let Some(key) = req.headers().get("x-user-id") else {
        return Ok(plain(StatusCode::BAD_REQUEST, "missing X-User-ID\n"));
    };
    let up = &upstreams[(xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % UPSTREAMS as u64) as usize];

    let (mut parts, body) = req.into_parts();
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        // absolute-form request target: the upstream gets origin-form
        let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        parts.uri = match pq.parse::<Uri>() {
            Ok(u) => u,
            Err(_) => return Ok(plain(StatusCode::BAD_REQUEST, "bad request target\n")),
        };
    }
    parts.version = Version::HTTP_11;
    parts.headers.insert(&X_CELL_ID, up.cell.clone());
    let req = Request::from_parts(parts, body);

    let mut tx = match up.take() {
        Some(tx) => tx,
        None => match up.connect().await {
            Some(tx) => tx,
            None => return Ok(plain(StatusCode::BAD_GATEWAY, "upstream connect failed\n")),
        },
    };
    match tx.send_request(req).await {
        Ok(res) => {
            up.put(tx);
            Ok(res.map(Either::Left))
        }
        Err(_) => Ok(plain(StatusCode::BAD_GATEWAY, "upstream failed\n")),
    }
}

struct Args {
    listen: SocketAddr,
    upstreams: Vec<SocketAddr>,
}

fn parse_args() -> Result<Args, String> {
    let mut listen = None;
    let mut upstreams = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let addr = value
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| format!("{flag}: '{value}' is not a HOST:PORT address"))?;
        match flag.as_str() {
            "--listen" if listen.is_none() => listen = Some(addr),
            "--upstream" => upstreams.push(addr),
            _ => return Err(format!("unexpected argument '{flag}'")),
        }
    }
    let listen = listen.ok_or("--listen is required")?;
    if upstreams.len() != UPSTREAMS {
        return Err(format!(
            "exactly {UPSTREAMS} --upstream addresses are required (got {})",
            upstreams.len()
        ));
    }
    Ok(Args { listen, upstreams })
}

async fn serve(listener: TcpListener, upstreams: Rc<[Upstream; UPSTREAMS]>) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(true).writev(false);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // out of descriptors and the like: do not spin
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let ups = upstreams.clone();
        let conn = http.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| proxy(req, ups.clone())),
        );
        spawn_local(async move {
            let _ = conn.await;
        });
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("hyper_floor: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let upstreams: Rc<[Upstream; UPSTREAMS]> = Rc::new(std::array::from_fn(|i| Upstream {
        addr: args.upstreams[i],
        cell: HeaderValue::from_static(["c1", "c2", "c3"][i]),
        pool: RefCell::new(Vec::new()),
    }));
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hyper_floor: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = LocalSet::new();
    local.block_on(&rt, async move {
        let listener = match TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("hyper_floor: listen on {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        serve(listener, upstreams).await;
        ExitCode::SUCCESS
    })
}
