//! Phase *send*: a per-worker pool of upstream connections (HTTP/1.1 senders kept idle per
//! address; one multiplexed h2c connection per address) and the attempt loop. A connect
//! failure, or a pooled connection found dead before the request was written, is retried
//! on another instance of the same cell; nothing that may have reached the upstream is
//! retried here. The pool belongs to one worker thread, so it needs no lock.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use hyper::body::Incoming;

use super::body::ProxyBody;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::connect;
use crate::server::LocalExec;
use crate::tls::UpstreamTls;

/// How often each worker ages its pool ([`Pool::prune`]).
pub const POOL_PRUNE_EVERY: Duration = Duration::from_secs(5);

/// Pool ages (prune ticks) an idle HTTP/1.1 connection may go unused before it is closed:
/// 10–15 s. A burst's surplus connections (the oldest, since the pool is used newest
/// first) do not stay open, and resident, for good.
const IDLE_AGES: u64 = 2;

/// Why one attempt failed.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // the request travels back by value on the cold path; boxing would allocate
pub enum AttemptError {
    /// The connection could not be made; the request is handed back untouched.
    Connect(std::io::Error, Request<ProxyBody>),
    /// The request was (maybe) written and failed; it cannot be retried.
    Upstream(hyper::Error),
}

/// An HTTP/1.1 connection lent to one response: it goes back to the pool when the response
/// body has been read to its end, and is dropped (closed) otherwise.
pub struct Lease {
    pool: Rc<RefCell<Pool>>,
    addr: SocketAddr,
    sender: http1::SendRequest<ProxyBody>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("addr", &self.addr).finish()
    }
}

impl Lease {
    /// Put the connection back for the next request.
    pub fn give_back(self) {
        let mut p = self.pool.borrow_mut();
        let age = p.age;
        let max_idle = p.max_idle;
        let idle = p.h1.entry(self.addr).or_default();
        if idle.len() < max_idle && !self.sender.is_closed() {
            idle.push((self.sender, age));
        }
    }
}

/// Hashing for the pool's keys: configured upstream addresses, not client input, so a
/// cheap multiplicative hash (two lookups per request) instead of SipHash.
type AddrHash = std::hash::BuildHasherDefault<AddrHasher>;

/// FxHash-style word mixing.
#[derive(Default)]
struct AddrHasher(u64);

impl std::hash::Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(w));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// Per-worker connection pool.
pub struct Pool {
    /// Idle HTTP/1.1 senders per address, with the pool age they were last given back at.
    h1: HashMap<SocketAddr, Vec<(http1::SendRequest<ProxyBody>, u64)>, AddrHash>,
    h2: HashMap<SocketAddr, http2::SendRequest<ProxyBody>, AddrHash>,
    /// Incremented by every [`Pool::prune`]; no clock is read on the request path.
    age: u64,
    /// Idle HTTP/1.1 connections kept per address (`limits.upstream_idle_per_instance`,
    /// default 64 like nginx's `keepalive 64`). Each costs ~44 KiB of RSS (hyper's state
    /// and buffers), so a burst's surplus is closed when it is given back instead of
    /// staying resident. The price: more requests than this at once to one instance from
    /// one worker (an h2c client's 100 streams to one cell) close and reopen the surplus —
    /// measured at one new upstream connection per 14 requests at 64. At 128 that churn
    /// stops, but 10,000 idle clients arriving in bursts of 500 left 407 idle upstream
    /// connections and took 63.2 MiB (64 MiB is the target for that case), at 256 66 MiB.
    max_idle: usize,
}

impl Pool {
    /// An empty pool keeping up to `max_idle` idle HTTP/1.1 connections per address.
    pub fn new(max_idle: usize) -> Self {
        Self {
            h1: HashMap::default(),
            h2: HashMap::default(),
            age: 0,
            max_idle,
        }
    }

    /// Age the pool by one tick and close HTTP/1.1 connections unused for [`IDLE_AGES`]
    /// ticks, and closed ones; forget addresses with nothing left.
    pub fn prune(&mut self) {
        self.age += 1;
        let keep_from = self.age.saturating_sub(IDLE_AGES);
        self.h1.retain(|_, idle| {
            idle.retain(|(s, age)| *age >= keep_from && !s.is_closed());
            !idle.is_empty()
        });
        self.h2.retain(|_, s| !s.is_closed());
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("h1_addrs", &self.h1.len())
            .field("h2_addrs", &self.h2.len())
            .finish()
    }
}

/// Send `req` to `addr` over HTTP/1.1 (`h2 = false`) or h2c, reusing a pooled connection.
pub async fn send(
    pool: &Rc<RefCell<Pool>>,
    addr: SocketAddr,
    h2: bool,
    mut req: Request<ProxyBody>,
    connect_timeout: Duration,
    tls: Option<&UpstreamTls>,
) -> Result<(Response<Incoming>, Option<Lease>), AttemptError> {
    if h2 {
        let existing = pool
            .borrow()
            .h2
            .get(&addr)
            .filter(|s| !s.is_closed())
            .cloned();
        let mut sender = match existing {
            Some(s) => s,
            // Boxed: a handshake's future is large and rare; inline, it would make every
            // request's future (moved and allocated per request) carry its size.
            None => match Box::pin(connect_h2(addr, connect_timeout, tls)).await {
                Ok(s) => {
                    pool.borrow_mut().h2.insert(addr, s.clone());
                    s
                }
                Err(e) => return Err(AttemptError::Connect(e, req)),
            },
        };
        return match sender.try_send_request(req).await {
            Ok(res) => Ok((res, None)),
            Err(mut e) => match e.take_message() {
                Some(r) => {
                    pool.borrow_mut().h2.remove(&addr);
                    Err(AttemptError::Connect(
                        std::io::Error::other("pooled h2 connection closed"),
                        r,
                    ))
                }
                None => Err(AttemptError::Upstream(e.into_error())),
            },
        };
    }

    // HTTP/1.1 upstream, whatever the client spoke: an HTTP/2 request's version would keep
    // hyper from chunking a body of unknown length, and the body would be dropped.
    if req.version() == hyper::Version::HTTP_2 {
        super::shape::join_cookies(req.headers_mut());
    }
    *req.version_mut() = hyper::Version::HTTP_11;
    // HTTP/1.1: a pooled sender that is ready (closed ones are dropped, ones still finishing
    // their previous response stay), else a new connection. A pooled sender found dead hands
    // the request back and the next one is tried.
    loop {
        let (mut sender, fresh) = match take_ready(pool, addr) {
            Some(s) => (s, false),
            // Boxed for the same reason as the h2c handshake above.
            None => match Box::pin(connect_h1(addr, connect_timeout, tls)).await {
                Ok(s) => (s, true),
                Err(e) => return Err(AttemptError::Connect(e, req)),
            },
        };
        match sender.try_send_request(req).await {
            Ok(res) => {
                let lease = Lease {
                    pool: Rc::clone(pool),
                    addr,
                    sender,
                };
                return Ok((res, Some(lease)));
            }
            Err(mut e) => match e.take_message() {
                Some(r) if !fresh => req = r,
                Some(r) => {
                    return Err(AttemptError::Connect(
                        std::io::Error::other("new connection closed"),
                        r,
                    ))
                }
                None => return Err(AttemptError::Upstream(e.into_error())),
            },
        }
    }
}

/// How often a pooled HTTP/2 upstream connection is pinged, and how long its answer may take.
const H2_PING_EVERY: Duration = Duration::from_secs(10);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// A new h2c (or h2 over TLS) connection to `addr`, its connection task running on this
/// worker.
async fn connect_h2(
    addr: SocketAddr,
    timeout: Duration,
    tls: Option<&UpstreamTls>,
) -> std::io::Result<http2::SendRequest<ProxyBody>> {
    let stream = connect::open(addr, timeout, tls, true).await?;
    let (sender, conn) = http2::Builder::new(LocalExec)
        .timer(TokioTimer::new())
        // A pooled connection whose path died without a reset (a partition, a frozen
        // middlebox) is found out and closed, so the next request opens a new one
        // instead of waiting on it until its deadline.
        .keep_alive_interval(H2_PING_EVERY)
        .keep_alive_timeout(H2_PING_TIMEOUT)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// A new HTTP/1.1 connection to `addr`, its connection task running on this worker.
async fn connect_h1(
    addr: SocketAddr,
    timeout: Duration,
    tls: Option<&UpstreamTls>,
) -> std::io::Result<http1::SendRequest<ProxyBody>> {
    let stream = connect::open(addr, timeout, tls, false).await?;
    let (sender, conn) = http1::Builder::new()
        .max_buf_size(crate::conn::MAX_CONN_BUF)
        // One buffer per message, written with `send`, as on the client side (conn.rs).
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// A pooled HTTP/1.1 sender of `addr` that is ready for a request, newest first. Closed
/// senders are dropped; busy ones (still finishing a response) stay in the pool.
fn take_ready(pool: &Rc<RefCell<Pool>>, addr: SocketAddr) -> Option<http1::SendRequest<ProxyBody>> {
    let mut p = pool.borrow_mut();
    let idle = p.h1.get_mut(&addr)?;
    let mut i = idle.len();
    while i > 0 {
        i -= 1;
        if idle[i].0.is_ready() {
            return Some(idle.remove(i).0);
        }
        if idle[i].0.is_closed() {
            idle.remove(i);
        }
    }
    None
}
