//! The proxy: one tower `Service` per client connection, running the phases of the crate
//! docs in order. Must never take a lock, block, or load the routing table more than once
//! per request.

pub mod body;
pub mod connect;
pub mod deadline;
pub mod error;
pub mod headers;
pub mod ids;
pub mod route;
pub mod send;
pub mod shape;

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use cellgate_routing::{RoutingTable, SmoothWrr, UpstreamProtocol};
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response};
use tokio::time::Instant;

use self::body::{ProxyBody, RequestBody, RequestBodyError};
use self::error::ProxyError;
use self::headers::{X_CELL_ID, X_REQUEST_ID};
use self::send::{AttemptError, Pool};
use crate::server::Shared;

/// The client side of a connection.
#[derive(Debug)]
pub struct ConnInfo {
    /// Client address.
    pub peer: SocketAddr,
    /// Client IP as a header value (`X-Forwarded-For`).
    pub peer_ip: HeaderValue,
    /// Client IP as text.
    pub peer_ip_text: String,
    /// `http` or `https` (`X-Forwarded-Proto`).
    pub proto: HeaderValue,
}

impl ConnInfo {
    /// Describe a new client connection.
    pub fn new(peer: SocketAddr, tls: bool) -> Self {
        let ip = peer.ip().to_canonical().to_string();
        Self {
            peer,
            peer_ip: HeaderValue::from_str(&ip)
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            peer_ip_text: ip,
            proto: HeaderValue::from_static(if tls { "https" } else { "http" }),
        }
    }

    /// Whether this client may force a cell or a gray tag under `table`.
    pub fn trusted(&self, table: &RoutingTable) -> bool {
        table.is_trusted(self.peer.ip())
    }
}

/// State of one worker thread: the shared table and its own pool and WRR positions.
#[derive(Debug)]
pub struct Worker {
    shared: Arc<Shared>,
    pool: Rc<RefCell<Pool>>,
    wrr: RefCell<WrrState>,
}

#[derive(Debug, Default)]
struct WrrState {
    version: u64,
    per_cell: Vec<SmoothWrr>,
}

impl Worker {
    /// A worker over the shared state.
    pub fn new(shared: Arc<Shared>) -> Rc<Self> {
        Rc::new(Self {
            shared,
            pool: Rc::default(),
            wrr: RefCell::default(),
        })
    }

    fn pick(
        &self,
        table: &RoutingTable,
        cell: u16,
        tag: Option<&str>,
        now: u64,
        tried: u64,
    ) -> Option<usize> {
        let mut st = self.wrr.borrow_mut();
        if st.version != table.version() || st.per_cell.len() != table.cells().len() {
            st.version = table.version();
            st.per_cell.clear();
            st.per_cell
                .resize_with(table.cells().len(), SmoothWrr::default);
        }
        let wrr = st.per_cell.get_mut(usize::from(cell))?;
        table.pick_instance(cell, tag, wrr, now, tried)
    }
}

/// The proxy service for one client connection.
#[derive(Clone, Debug)]
pub struct Proxy {
    worker: Rc<Worker>,
    conn: Rc<ConnInfo>,
}

impl Proxy {
    /// A service for a connection from `conn` on `worker`.
    pub fn new(worker: Rc<Worker>, conn: ConnInfo) -> Self {
        Self {
            worker,
            conn: Rc::new(conn),
        }
    }
}

impl tower::Service<Request<RequestBody>> for Proxy {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>>>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        let worker = Rc::clone(&self.worker);
        let conn = Rc::clone(&self.conn);
        Box::pin(async move { Ok(handle(&worker, &conn, req).await) })
    }
}

fn is_grpc(req: &Request<RequestBody>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Run every phase for one request; never fails (errors become responses).
pub async fn handle(
    worker: &Worker,
    conn: &ConnInfo,
    req: Request<RequestBody>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let table = worker.shared.table.load_full();
    let request_id = ids::request_id(req.headers().get(X_REQUEST_ID));
    let grpc = is_grpc(&req);
    let method = req.method().clone();
    let path_for_log =
        tracing::enabled!(tracing::Level::DEBUG).then(|| req.uri().path().to_owned());
    let result = proxy(worker, conn, &table, req, &request_id, grpc, started).await;
    match result {
        Ok(res) => {
            if let Some(path) = path_for_log {
                tracing::debug!(request_id = ?request_id, %method, path, status = res.status().as_u16(),
                    cell = ?res.headers().get(X_CELL_ID), elapsed_us = started.elapsed().as_micros() as u64, "proxied");
            }
            res
        }
        Err((e, cell)) => {
            tracing::warn!(request_id = ?request_id, %method, status = e.status().as_u16(), cell = ?cell,
                client = %conn.peer, error = %e, "request failed");
            let mut res = e.into_response(&request_id, grpc);
            if let Some(c) = cell {
                res.headers_mut().insert(X_CELL_ID, c);
            }
            res
        }
    }
}

type Failed = (ProxyError, Option<HeaderValue>);

async fn proxy(
    worker: &Worker,
    conn: &ConnInfo,
    table: &Arc<RoutingTable>,
    req: Request<RequestBody>,
    request_id: &HeaderValue,
    grpc: bool,
    started: Instant,
) -> Result<Response<ProxyBody>, Failed> {
    let now = cellgate_health::now_ms();
    // Phase: key + decide.
    let routed = route::route(table, conn, req.uri(), req.headers(), now).map_err(|e| (e, None))?;
    let cell_idx = routed.cell();
    let Some(cell) = table.cell(cell_idx) else {
        return Err((
            ProxyError::NoHealthyCell("decision named no cell".into()),
            None,
        ));
    };
    let cell_hdr = || Some(cell.id_header.clone());
    // Phase: shape.
    let budget = deadline::budget(req.headers(), table.timeouts())
        .map_err(|m| (ProxyError::BadRequest(m), None))?;
    let deadline = started + budget;
    let h2 = match (cell.protocol, grpc) {
        (UpstreamProtocol::H2c, _) | (UpstreamProtocol::Auto, true) => true,
        (UpstreamProtocol::Http1, true) => {
            return Err((
                ProxyError::UpstreamFailed(format!(
                    "cell {} speaks HTTP/1.1 only and cannot carry gRPC",
                    cell.id
                )),
                cell_hdr(),
            ))
        }
        _ => false,
    };
    let (mut parts, body) = req.into_parts();
    shape::shape_headers(
        &mut parts.headers,
        &shape::Shape {
            cell: &cell.id_header,
            version: table.version_header(),
            gray: routed.gray.as_ref(),
            request_id,
            conn,
        },
    );
    shape::set_target(&mut parts.uri, &mut parts.headers, h2, &cell.id);
    let mut req = Request::from_parts(parts, body);
    let tag = route::tag_str(&routed.gray);

    // Phase: send, retrying connect failures on other instances of the cell.
    let upstream_tls = worker.shared.upstream_tls.load();
    let connect_timeout = table.timeouts().connect;
    let mut tried: u64 = 0;
    let mut last_err = String::from("no instance of the cell is available");
    for _attempt in 0..cell.instances.len().clamp(1, 4) {
        let Some(i) = worker.pick(table, cell_idx, tag, now, tried) else {
            break;
        };
        tried |= 1u64.checked_shl(i as u32).unwrap_or(0);
        let inst = &cell.instances[i];
        let rem = deadline.saturating_duration_since(Instant::now());
        if rem.is_zero() {
            return Err((ProxyError::Deadline(budget.as_millis() as u64), cell_hdr()));
        }
        shape::set_remaining(req.headers_mut(), rem, grpc);
        let attempt = send::send(
            &worker.pool,
            inst.addr,
            h2,
            req,
            connect_timeout.min(rem),
            upstream_tls.get(&cell.id),
        );
        let outcome = match tokio::time::timeout_at(deadline, attempt).await {
            Ok(o) => o,
            Err(_) => return Err((ProxyError::Deadline(budget.as_millis() as u64), cell_hdr())),
        };
        match outcome {
            Ok(mut res) => {
                // Phase: outcome.
                inst.health.record_success();
                shape::strip_hop_by_hop(res.headers_mut(), false);
                let h = res.headers_mut();
                h.insert(X_CELL_ID, cell.id_header.clone());
                h.insert(X_REQUEST_ID, request_id.clone());
                return Ok(res.map(ProxyBody::Stream));
            }
            Err(AttemptError::Connect(e, back)) => {
                if inst
                    .health
                    .record_failure(cellgate_health::now_ms(), &worker.shared.ejection)
                {
                    tracing::warn!(cell = %cell.id, instance = %inst.name, addr = %inst.addr, "instance ejected after consecutive connect failures");
                }
                last_err = format!(
                    "cannot connect to an instance of cell {}: {}",
                    cell.id,
                    e.kind()
                );
                req = back;
            }
            Err(AttemptError::Upstream(e)) => {
                // The client's own body failed (too large, malformed): its fault, not the
                // upstream's.
                if let Some(b) = RequestBodyError::find(&e) {
                    return Err((b.to_proxy_error(), cell_hdr()));
                }
                inst.health
                    .record_failure(cellgate_health::now_ms(), &worker.shared.ejection);
                let msg = if e.is_timeout() {
                    "upstream timed out".to_owned()
                } else {
                    format!("upstream of cell {} failed: {}", cell.id, brief(&e))
                };
                return Err((ProxyError::UpstreamFailed(msg), cell_hdr()));
            }
        }
    }
    Err((ProxyError::UpstreamFailed(last_err), cell_hdr()))
}

/// A short, internals-free description of an upstream error.
fn brief(e: &hyper::Error) -> &'static str {
    if e.is_incomplete_message() {
        "connection closed before the response completed"
    } else if e.is_parse() {
        "invalid HTTP response"
    } else if e.is_canceled() {
        "request canceled"
    } else if e.is_closed() {
        "connection closed"
    } else {
        "connection error"
    }
}
