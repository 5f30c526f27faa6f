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

use std::borrow::Cow;
use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use cellgate_routing::{RoutingTable, SmoothWrr};
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response};
use tokio::time::Instant;

use self::body::{ProxyBody, RequestBody, RequestBodyError};
use self::error::ProxyError;
use self::headers::{Seen, X_CELL_ID, X_REQUEST_ID};
use self::send::{AttemptError, Pool};
use crate::server::Shared;
use cellgate_health::Outcome;

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
    metrics: Vec<Arc<crate::metrics::CellMetrics>>,
}

impl Worker {
    /// A worker over the shared state, keeping up to `idle_per_instance` idle HTTP/1.1
    /// connections per upstream instance (`limits.upstream_idle_per_instance`).
    pub fn new(shared: Arc<Shared>, idle_per_instance: usize) -> Rc<Self> {
        Rc::new(Self {
            shared,
            pool: Rc::new(RefCell::new(Pool::new(idle_per_instance))),
            wrr: RefCell::default(),
        })
    }

    /// Age this worker's upstream pool, closing connections left unused (every
    /// [`send::POOL_PRUNE_EVERY`]).
    pub fn prune_pool(&self) {
        self.pool.borrow_mut().prune();
    }

    fn pick(
        &self,
        table: &RoutingTable,
        cell: u16,
        tag: Option<&str>,
        now: u64,
        tried: u64,
        key: Option<&[u8]>,
    ) -> Option<usize> {
        match self.per_version(table) {
            Some(mut st) => {
                let wrr = st.per_cell.get_mut(usize::from(cell))?;
                table.pick_instance(cell, tag, wrr, now, tried, key)
            }
            // A retry still on an older table: positions of its own.
            None => table.pick_instance(cell, tag, &mut SmoothWrr::default(), now, tried, key),
        }
    }

    /// This worker's per-table-version state (WRR positions, metric series by cell index),
    /// rebuilt when a newer table (or the one serving now) comes by. `None` for a request
    /// still on an older table: resetting for it would set every position back to the
    /// start, and back again for the next request on the new table, for as long as old
    /// requests finish (each pick then starting from nothing, on the first instance).
    fn per_version(&self, table: &RoutingTable) -> Option<std::cell::RefMut<'_, WrrState>> {
        let mut st = self.wrr.borrow_mut();
        if st.version == table.version() && st.per_cell.len() == table.cells().len() {
            return Some(st);
        }
        if table.version() <= st.version && self.shared.table.load().version() != table.version() {
            return None;
        }
        st.version = table.version();
        st.per_cell.clear();
        st.per_cell
            .resize_with(table.cells().len(), SmoothWrr::default);
        st.metrics = table
            .cells()
            .iter()
            .map(|c| self.shared.metrics.cell(&c.id))
            .collect();
        Some(st)
    }

    /// Phase *outcome*, metrics: count the request under its serving cell.
    fn observe(&self, table: &RoutingTable, cell: Option<u16>, status: u16, us: u64, now: u64) {
        let Some(st) = self.per_version(table) else {
            // A request that began on an older table: its cell by name (cell indexes
            // differ between versions).
            match cell.and_then(|c| table.cell(c)) {
                Some(c) => self.shared.metrics.cell(&c.id).record(status, us, now),
                None => self.shared.metrics.no_cell.record(status, us, now),
            }
            return;
        };
        match cell.and_then(|c| st.metrics.get(usize::from(c))) {
            Some(m) => m.record(status, us, now),
            None => self.shared.metrics.no_cell.record(status, us, now),
        }
    }
}

/// The future of one proxied request.
pub type ProxyFuture = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>>>>;

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

    /// [`tower::Service::call`] for a request whose names were already looked at (`seen`,
    /// the guard's scan).
    pub fn call_scanned(&self, req: Request<RequestBody>, seen: Seen) -> ProxyFuture {
        // The request's future is `handle`'s own, boxed as it is made: wrapped in another
        // async block it would be built on the stack and copied (~4.5 KiB) into the box.
        Box::pin(handle(
            Rc::clone(&self.worker),
            Rc::clone(&self.conn),
            req,
            seen,
        ))
    }

    /// Count an answer given before any routing (a request the guard refused: limits,
    /// smuggling defence) in the metrics, under `cell="none"` as the proxy counts its own
    /// answers to requests it could not route.
    pub fn count_unrouted(&self, status: u16) {
        let metrics = &self.worker.shared.metrics;
        metrics.no_cell.record(status, 0, cellgate_health::now_ms());
    }
}

impl tower::Service<Request<RequestBody>> for Proxy {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = ProxyFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        let seen = Seen::scan(req.headers());
        self.call_scanned(req, seen)
    }
}

/// Whether a request is gRPC (`Content-Type: application/grpc...`).
pub(crate) fn is_grpc(headers: &http::HeaderMap, seen: Seen) -> bool {
    seen.get(headers, Seen::CONTENT_TYPE, CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Run every phase for one request; never fails (errors become responses).
pub async fn handle(
    worker: Rc<Worker>,
    conn: Rc<ConnInfo>,
    req: Request<RequestBody>,
    seen: Seen,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    // The clock as health and metrics count it (ms), read once: later times are derived
    // from it and the intervals measured anyway.
    let started_ms = cellgate_health::ms_at(started.into_std());
    let table = worker.shared.table.load_full();
    let (request_id, traceparent) = ids::request_ids(
        seen.get(req.headers(), Seen::REQUEST_ID, X_REQUEST_ID),
        seen.get(req.headers(), Seen::TRACEPARENT, headers::TRACEPARENT),
    );
    let grpc = is_grpc(req.headers(), seen);
    let method = req.method().clone();
    let path_for_log =
        tracing::enabled!(tracing::Level::DEBUG).then(|| req.uri().path().to_owned());
    // The client's span, when this hop continues its trace (the exported span's parent).
    let span_parent = worker.shared.traces.as_ref().and_then(|_| {
        let inbound = seen.get(req.headers(), Seen::TRACEPARENT, headers::TRACEPARENT)?;
        let (trace, parent) = ids::traceparent_ids(inbound)?;
        let (ours, _) = ids::traceparent_ids(&traceparent)?;
        (trace == ours).then(|| parent.to_owned())
    });
    let start_ns = worker
        .shared
        .traces
        .as_ref()
        .map(|_| crate::telemetry::unix_ns());
    let ctx = ReqCtx {
        request_id: &request_id,
        traceparent: &traceparent,
        grpc,
        started,
        started_ms,
        seen,
    };
    // Pinned where it is made: awaited directly, the phases' future (~3.7 KiB) would be
    // built and then copied into this one's state.
    let result = std::pin::pin!(proxy(&worker, &conn, &table, req, ctx)).await;
    let ended = Instant::now();
    let elapsed_us = ended.saturating_duration_since(started).as_micros() as u64;
    let now = started_ms + elapsed_us / 1000;
    if let (Some(exporter), Some(start_ns)) = (worker.shared.traces.as_ref(), start_ns) {
        if let Some((trace_id, span_id)) = ids::traceparent_ids(&traceparent) {
            let (status, cell) = match &result {
                Ok((res, c)) => (res.status().as_u16(), Some(*c)),
                Err((e, c)) => (e.status().as_u16(), *c),
            };
            exporter.submit(crate::telemetry::SpanRecord {
                trace_id: trace_id.to_owned(),
                span_id: span_id.to_owned(),
                parent_span_id: span_parent,
                method: method.to_string(),
                status,
                cell: cell.and_then(|c| table.cell(c)).map(|c| c.id.to_string()),
                request_id: request_id.to_str().unwrap_or_default().to_owned(),
                start_ns,
                end_ns: crate::telemetry::unix_ns(),
            });
        }
    }
    Ok(match result {
        Ok((res, cell)) => {
            worker.observe(&table, Some(cell), res.status().as_u16(), elapsed_us, now);
            if let Some(path) = path_for_log {
                tracing::debug!(request_id = log_str(Some(&request_id)), %method, path, status = res.status().as_u16(),
                    cell = log_str(res.headers().get(X_CELL_ID)), elapsed_us, "proxied");
            }
            res
        }
        Err((e, cell)) => {
            worker.observe(&table, cell, e.status().as_u16(), elapsed_us, now);
            let cell_id = cell.and_then(|c| table.cell(c)).map(|c| &c.id_header);
            tracing::warn!(request_id = log_str(Some(&request_id)), %method, status = e.status().as_u16(), cell = log_str(cell_id),
                client = %conn.peer, error = %e, "request failed");
            let mut res = e.into_response(&request_id, grpc);
            if let Some(c) = cell_id {
                res.headers_mut().insert(X_CELL_ID, c.clone());
            }
            res
        }
    })
}

type Failed = (ProxyError, Option<cellgate_routing::CellIdx>);

/// SLO class of a request (`X-SLO-Class`), for load shedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SloClass {
    /// Shed last.
    Critical,
    /// The default.
    Standard,
    /// Shed first.
    BestEffort,
}

impl SloClass {
    /// `X-SLO-Class`, else the route's class, else standard.
    fn of(
        req: &Request<RequestBody>,
        seen: Seen,
        route: Option<&cellgate_routing::Route>,
    ) -> Result<Self, ProxyError> {
        match seen
            .get(req.headers(), Seen::SLO_CLASS, headers::X_SLO_CLASS)
            .map(|v| v.as_bytes())
        {
            None => Ok(match route.and_then(|r| r.slo_class) {
                Some(cellgate_routing::SloClass::Critical) => Self::Critical,
                Some(cellgate_routing::SloClass::BestEffort) => Self::BestEffort,
                Some(cellgate_routing::SloClass::Standard) | None => Self::Standard,
            }),
            Some(b"standard") => Ok(Self::Standard),
            Some(b"critical") => Ok(Self::Critical),
            Some(b"best-effort") => Ok(Self::BestEffort),
            Some(_) => Err(ProxyError::BadRequest(
                "X-SLO-Class must be critical, standard or best-effort".into(),
            )),
        }
    }

    /// Name as in the header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Critical => "critical",
            Self::Standard => "standard",
            Self::BestEffort => "best-effort",
        }
    }
}

/// Counts a request in flight through the gateway until dropped.
struct InFlight<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Phase *admit*: shed by SLO class when the gateway is overloaded.
fn admit<'a>(shared: &'a Shared, class: SloClass) -> Result<InFlight<'a>, ProxyError> {
    use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
    let limit = match class {
        SloClass::Critical => shared.shedding.max.load(Relaxed),
        SloClass::Standard => shared.shedding.standard.load(Relaxed),
        SloClass::BestEffort => shared.shedding.best_effort.load(Relaxed),
    };
    // Count the request only if it fits: a shed request never takes a place, so it
    // cannot push a higher class over its limit.
    shared
        .in_flight
        .fetch_update(AcqRel, Acquire, |n| (n < limit).then_some(n + 1))
        .map(|_| InFlight(&shared.in_flight))
        .map_err(|_| ProxyError::Shed(class.as_str()))
}

/// A header value as a log field: its text (`none` when absent; never Rust's debug form,
/// so JSON logs carry plain strings).
pub(crate) fn log_str(v: Option<&HeaderValue>) -> &str {
    match v {
        Some(v) => v.to_str().unwrap_or("(not visible ASCII)"),
        None => "none",
    }
}

/// One attempt counted in its instance's and its cell's in-flight gauges until dropped.
struct AttemptInFlight<'a> {
    inst: &'a cellgate_routing::Instance,
    cell: &'a cellgate_routing::Cell,
}

impl<'a> AttemptInFlight<'a> {
    fn new(inst: &'a cellgate_routing::Instance, cell: &'a cellgate_routing::Cell) -> Self {
        inst.health.add_in_flight(1);
        cell.health.add_in_flight(1);
        Self { inst, cell }
    }

    /// The count handed on to the answer's body, counted down when the body ends.
    fn streaming(self) -> body::Streaming {
        let s = body::Streaming::take_over(&self.inst.health, &self.cell.health);
        std::mem::forget(self);
        s
    }
}

impl Drop for AttemptInFlight<'_> {
    fn drop(&mut self) {
        self.inst.health.add_in_flight(-1);
        self.cell.health.add_in_flight(-1);
    }
}

fn idempotent(m: &http::Method) -> bool {
    matches!(
        *m,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::PUT
            | http::Method::DELETE
            | http::Method::TRACE
    )
}

/// What is needed to send a bodiless request again: the client's request line and
/// headers as they arrived (hop-by-hop headers removed), shaped again for each resend. Kept
/// as a plain list: it is taken for every retryable request and read only on a retry, so
/// it copies the client's few headers and none of the ones the gateway adds.
struct Replay {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: Vec<(http::HeaderName, HeaderValue)>,
}

impl Replay {
    fn capture(parts: &http::request::Parts) -> Self {
        Self {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect(),
        }
    }

    /// The client's headers again (every value, in their order).
    fn header_map(&self) -> http::HeaderMap {
        let mut h = http::HeaderMap::with_capacity(self.headers.len());
        for (n, v) in &self.headers {
            h.append(n.clone(), v.clone());
        }
        h
    }

    /// The request for another attempt, to `cell` over h2c (`h2`) or HTTP/1.1, with the
    /// contract headers of `shape` naming that cell.
    fn request(
        &self,
        shape: &shape::Shape<'_>,
        cell: &cellgate_routing::Cell,
        h2: bool,
    ) -> Request<ProxyBody> {
        let mut r = Request::new(ProxyBody::empty());
        *r.method_mut() = self.method.clone();
        *r.version_mut() = self.version;
        let mut uri = self.uri.clone();
        let mut headers = self.header_map();
        let shape = shape::Shape {
            cell: &cell.id_header,
            ..*shape
        };
        shape::add_headers(&mut headers, &shape);
        shape::set_target(&mut uri, &mut headers, h2, &cell.id);
        *r.uri_mut() = uri;
        *r.headers_mut() = headers;
        r
    }
}

/// What `handle` settled about a request before the phases run.
struct ReqCtx<'a> {
    request_id: &'a HeaderValue,
    traceparent: &'a HeaderValue,
    grpc: bool,
    started: Instant,
    /// `started` in health's milliseconds ([`cellgate_health::ms_at`]).
    started_ms: u64,
    /// Which optional headers the request carries.
    seen: Seen,
}

async fn proxy(
    worker: &Worker,
    conn: &ConnInfo,
    table: &Arc<RoutingTable>,
    req: Request<RequestBody>,
    ctx: ReqCtx<'_>,
) -> Result<(Response<ProxyBody>, cellgate_routing::CellIdx), Failed> {
    let ReqCtx {
        request_id,
        traceparent,
        grpc,
        started,
        started_ms,
        seen,
    } = ctx;
    let now = started_ms;
    let body_over_limit = req.body().over_limit();
    // Phase: admit. The request's route (by path prefix; none configured: nothing to
    // look at) gives its deadlines and default SLO class.
    let route = table.route_for(req.uri().path());
    let class = SloClass::of(&req, seen, route).map_err(|e| (e, None))?;
    let _in_flight = admit(&worker.shared, class).map_err(|e| {
        worker.shared.metrics.shed(class as usize);
        (e, None)
    })?;
    // Phase: key + decide.
    let routed =
        route::route(table, conn, req.uri(), req.headers(), seen, now).map_err(|e| (e, None))?;
    let mut cell_idx = routed.cell();
    let Some(mut cell) = table.cell(cell_idx) else {
        return Err((
            ProxyError::NoHealthyCell("decision named no cell".into()),
            None,
        ));
    };
    // Phase: shape.
    let timeouts = match route {
        Some(r) => cellgate_routing::Timeouts {
            default: r.default_timeout(),
            ..r.timeouts
        },
        None => *table.timeouts(),
    };
    let budget = deadline::budget(req.headers(), seen, &timeouts)
        .map_err(|m| (ProxyError::BadRequest(m), None))?;
    let deadline = started + budget;
    // A deadline the client made shorter than the route's default says nothing about the
    // upstream when it runs out, unless it was generous for the instance (below): it is not
    // held against the instance's or the cell's health (else any client could eject
    // instances, or fail a cell over, with `X-Timeout: 1ms`).
    let upstream_timed_out = budget >= timeouts.default;
    let h2_for = |c: &cellgate_routing::Cell| -> Result<bool, ProxyError> {
        c.protocol.uses_h2(grpc).ok_or_else(|| {
            ProxyError::UpstreamFailed(format!(
                "cell {} speaks HTTP/1.1 only and cannot carry gRPC",
                c.id
            ))
        })
    };
    let mut h2 = h2_for(cell).map_err(|e| (e, Some(cell_idx)))?;
    let (mut parts, body) = req.into_parts();
    // The contract headers for the first cell; a resend names the cell it goes to.
    let shape = shape::Shape {
        cell: &cell.id_header,
        version: table.version_header(),
        gray: routed.gray.as_ref(),
        request_id,
        conn,
        traceparent,
        seen,
        // The trust check only where it can change something.
        keep_forwarded_for: !(seen.has(Seen::FORWARDED_FOR)
            && table.replaces_untrusted_forwarded_for()
            && !conn.trusted(table)),
    };
    shape::strip_hop_by_hop(&mut parts.headers, true);
    let p = table.health_policy();
    // A copy for status retries, only when one is possible at all (another instance, or a
    // failover cell to cross to).
    let replay = (p.retry.max_attempts > 1
        && !p.retry.statuses.is_empty()
        && (cell.instances.len() > 1 || !cell.failover.is_empty())
        && idempotent(&parts.method)
        && http_body::Body::is_end_stream(&body))
    .then(|| Replay::capture(&parts));
    shape::add_headers(&mut parts.headers, &shape);
    shape::set_target(&mut parts.uri, &mut parts.headers, h2, &cell.id);
    let mut req: Option<Request<ProxyBody>> =
        Some(Request::from_parts(parts, ProxyBody::Request(body)));
    let tag = route::tag_str(&routed.gray);

    // Phase: send. Connect failures (nothing sent) move to another instance of the cell, and
    // to the failover cell once the cell has none left; retryable answers to idempotent
    // bodiless requests are retried within the cell's retry budget.
    let connect_timeout = table.timeouts().connect;
    let upstream_tls = worker.shared.upstream_tls.load();
    let mut tried: u64 = 0;
    let mut sent_any = false;
    // Whether the current cell answered this request with an HTTP response.
    let mut answered = false;
    let mut crossed = false;
    let mut status_retries = 0u32;
    let mut last_err: Cow<'static, str> = Cow::Borrowed("no instance of the cell is available");
    cell.health.budget_request(now);
    // The last retryable answer while a retry of it is under way: what the client gets if
    // no further attempt answers (no instance left to try, the deadline, a failed resend).
    let mut held: Option<Held<'_>> = None;
    for attempt in 0..MAX_ATTEMPTS {
        // The first attempt goes out on the time read when the request arrived
        // (microseconds ago); every later one reads the clock again.
        let (at, now) = if attempt == 0 {
            (started, started_ms)
        } else {
            let at = Instant::now();
            (at, cellgate_health::ms_at(at.into_std()))
        };
        let serving = cell.is_serving(now, p);
        let picked = if serving || !sent_any {
            // Key affinity needs the key again (only for such cells: the hot path keeps
            // no copy of it).
            let key = match (&cell.ring, &routed.affinity_key) {
                (Some(_), Some(k)) => Some(Cow::Borrowed(&**k)),
                (Some(_), None) => routing_key(table, &req, &replay),
                (None, _) => None,
            };
            worker.pick(
                table,
                cell_idx,
                tag,
                now,
                tried,
                key.as_deref().map(str::as_bytes),
            )
        } else {
            None
        };
        if picked.is_none() {
            // Cross to the failover cell only when the cell gave this request no HTTP
            // answer at all (every instance refused, failed to connect or dropped the
            // connection), or when it stopped serving (drained, failed over, breaker open).
            // A cell that answers — even with errors — keeps its keys.
            let resendable = req.is_some() || replay.is_some();
            if crossed || !resendable || (answered && serving) {
                break;
            }
            // The key again, from the request we still hold (this path is rare; the hot
            // path keeps no copy of it).
            let key = routing_key(table, &req, &replay);
            // And the rest of the first decision's inputs: a keyless request keeps its
            // region hint, a forced one walks its forced cell's failover targets.
            let hint = match (&req, &replay) {
                (Some(r), _) => r.headers().get(headers::X_REGION_HINT).cloned(),
                (None, Some(r)) => r
                    .headers
                    .iter()
                    .find(|(n, _)| n == headers::X_REGION_HINT)
                    .map(|(_, v)| v.clone()),
                (None, None) => None,
            };
            let input = cellgate_routing::RouteInput {
                key: key.as_deref(),
                region_hint: hint.as_ref().and_then(|v| v.to_str().ok()),
                client_ip: Some(conn.peer.ip()),
                forced_cell: matches!(routed.decision.reason, cellgate_routing::Reason::Forced)
                    .then_some(routed.decision.cell),
                now_ms: now,
                spread: fastrand::u64(..),
                avoid: Some(cell_idx),
            };
            let Ok(d) = table.decide(&input) else { break };
            let Some(next) = table.cell(d.cell) else {
                break;
            };
            let Ok(next_h2) = h2_for(next) else { break };
            tracing::debug!(request_id = log_str(Some(request_id)), from = %cell.id, to = %next.id, "retrying in the failover cell");
            cell_idx = d.cell;
            cell = next;
            h2 = next_h2;
            crossed = true;
            answered = false;
            tried = 0;
            cell.health.budget_request(now);
            match req.as_mut() {
                Some(r) => {
                    r.headers_mut().insert(X_CELL_ID, cell.id_header.clone());
                    shape::set_target_for(r, h2, &cell.id);
                }
                None => req = replay.as_ref().map(|r| r.request(&shape, cell, h2)),
            }
            continue;
        }
        let Some(i) = picked else { break };
        tried |= 1u64.checked_shl(i as u32).unwrap_or(0);
        let inst = &cell.instances[i];
        let rem = if attempt == 0 {
            budget
        } else {
            deadline.saturating_duration_since(at)
        };
        if rem.is_zero() {
            return give_up(
                held,
                request_id,
                (
                    ProxyError::Deadline(budget.as_millis() as u64),
                    Some(cell_idx),
                ),
            );
        }
        let Some(mut r) = req
            .take()
            .or_else(|| replay.as_ref().map(|r| r.request(&shape, cell, h2)))
        else {
            break;
        };
        shape::set_remaining(r.headers_mut(), rem);
        // Counted down on drop: a client that goes away mid-attempt (an h2 RST_STREAM, a
        // closed HTTP/1.1 connection) drops this future at the await below.
        let attempt_in_flight = AttemptInFlight::new(inst, cell);
        // Pinned where it is made (see `handle`): the attempt's future is ~1.2 KiB.
        let attempt = std::pin::pin!(send::send(
            &worker.pool,
            inst.addr,
            h2,
            r,
            connect_timeout.min(rem),
            upstream_tls.get(&cell.id),
        ));
        let outcome = tokio::time::timeout_at(deadline, attempt).await;
        // Still counted while this iteration decides; handed on to the answer's body when
        // it is the answer, else counted down when the iteration ends.
        let done_at = Instant::now();
        let latency_us = done_at.saturating_duration_since(at).as_micros() as u64;
        let now = now + latency_us / 1000;
        let outcome = match outcome {
            Ok(o) => o,
            Err(_) => {
                // A shortened deadline still counts when it left the instance four times
                // its usual (p95) latency: a hung instance is seen through traffic that
                // always sends one (gRPC clients, a gateway in front forwarding X-Timeout).
                if upstream_timed_out || {
                    let mut bins = [0u64; cellgate_health::LATENCY_BINS_MS.len() + 1];
                    inst.health.add_latency_bins(now, &mut bins);
                    cellgate_health::quantile_ms(&bins, 0.95)
                        .is_some_and(|p95| budget.as_millis() as u64 >= 4 * p95)
                } {
                    record(cell, inst, now, Outcome::Timeout, p);
                }
                // An adaptive route learns from its cut requests too (at the time they
                // took), or a deadline below what the upstream now needs would never rise.
                if let Some(r) = route.filter(|r| r.adaptive.is_some()) {
                    r.latency.record(now, latency_us);
                }
                return give_up(
                    held,
                    request_id,
                    (
                        ProxyError::Deadline(budget.as_millis() as u64),
                        Some(cell_idx),
                    ),
                );
            }
        };
        match outcome {
            Ok((res, lease)) => {
                // Phase: outcome.
                sent_any = true;
                answered = true;
                inst.health.record_rtt(latency_us, &p.weight);
                inst.health.record_latency(now, latency_us);
                if let Some(r) = route.filter(|r| r.adaptive.is_some()) {
                    r.latency.record(now, latency_us);
                }
                let status = res.status().as_u16();
                // A gRPC answer that is not over with its head (no status in it) has its
                // outcome in its trailers: recorded when they come (see `body::Streaming`).
                let grpc_pending = grpc
                    && status < 500
                    && !res.headers().contains_key("grpc-status")
                    && !http_body::Body::is_end_stream(res.body());
                if !grpc_pending {
                    record(
                        cell,
                        inst,
                        now,
                        if status >= 500 || (grpc && grpc_failed(&res)) {
                            Outcome::Status5xx
                        } else {
                            Outcome::Success
                        },
                        p,
                    );
                }
                if replay.is_some()
                    && p.retry.statuses.contains(&status)
                    && status_retries + 1 < p.retry.max_attempts
                    && can_retry(cell, tried, now, p, crossed || answered)
                    && cell.health.try_retry(now, &p.retry)
                {
                    status_retries += 1;
                    last_err = format!("upstream of cell {} answered {status}", cell.id).into();
                    let backoff = p.retry.backoff.mul_f64(
                        f64::from(1u32 << status_retries.min(6)) * (0.5 + fastrand::f64()),
                    );
                    if done_at + backoff < deadline {
                        held = Some(Held {
                            res,
                            lease,
                            cell,
                            cell_idx,
                        });
                        tokio::time::sleep(backoff).await;
                        continue;
                    }
                }
                drop(held);
                let mut counted = attempt_in_flight.streaming();
                if grpc_pending {
                    counted = counted.with_grpc_outcome(body::GrpcOutcome {
                        table: Arc::downgrade(table),
                        cell: cell_idx,
                        inst: i,
                    });
                }
                let counted = Some(counted);
                return Ok(answer(res, lease, counted, cell, cell_idx, request_id));
            }
            Err(AttemptError::Connect(e, back)) => {
                let kind = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    Outcome::Refused
                } else {
                    Outcome::ConnectFailed
                };
                record(cell, inst, now, kind, p);
                last_err = format!(
                    "cannot connect to an instance of cell {}: {}",
                    cell.id,
                    e.kind()
                )
                .into();
                req = Some(back);
            }
            Err(AttemptError::Upstream(e)) => {
                // The client's own body failed (too large, malformed): its fault, not the
                // upstream's.
                if let Some(b) = RequestBodyError::find(&e) {
                    return Err((b.to_proxy_error(), Some(cell_idx)));
                }
                if let Some((over, limit)) = &body_over_limit {
                    if over.get() {
                        return Err((ProxyError::PayloadTooLarge(*limit), Some(cell_idx)));
                    }
                }
                sent_any = true;
                record(
                    cell,
                    inst,
                    now,
                    if e.is_timeout() {
                        Outcome::Timeout
                    } else {
                        Outcome::Reset
                    },
                    p,
                );
                last_err = if e.is_timeout() {
                    "upstream timed out".into()
                } else {
                    format!("upstream of cell {} failed: {}", cell.id, brief(&e)).into()
                };
                if replay.is_none()
                    || status_retries + 1 >= p.retry.max_attempts
                    || !can_retry(cell, tried, now, p, crossed || answered)
                    || !cell.health.try_retry(now, &p.retry)
                {
                    return give_up(
                        held,
                        request_id,
                        (
                            ProxyError::UpstreamFailed(last_err.into_owned()),
                            Some(cell_idx),
                        ),
                    );
                }
                status_retries += 1;
            }
        }
    }
    give_up(
        held,
        request_id,
        (
            ProxyError::UpstreamFailed(last_err.into_owned()),
            Some(cell_idx),
        ),
    )
}

/// A gRPC answer that is a server-side failure in its head (a trailers-only answer):
/// `grpc-status` INTERNAL (13) or UNAVAILABLE (14), whatever its HTTP status (gRPC errors
/// come with 200). Other codes are the caller's business (not found, invalid argument, its
/// own deadline...). A status in the trailers after a body is recorded when they come.
fn grpc_failed(res: &Response<hyper::body::Incoming>) -> bool {
    res.headers()
        .get("grpc-status")
        .is_some_and(grpc_status_failed)
}

/// Whether a `grpc-status` is a server-side failure: INTERNAL (13) or UNAVAILABLE (14).
pub(crate) fn grpc_status_failed(v: &HeaderValue) -> bool {
    matches!(v.as_bytes(), b"13" | b"14")
}

/// The request's routing key again, from the request still held or its replay copy.
fn routing_key<'r>(
    table: &RoutingTable,
    req: &'r Option<Request<ProxyBody>>,
    replay: &Option<Replay>,
) -> Option<Cow<'r, str>> {
    match (req, replay) {
        (Some(r), _) => table.key_sources().extract(r.uri(), r.headers()),
        (None, Some(r)) => table
            .key_sources()
            .extract(&r.uri, &r.header_map())
            .map(|k| k.map(|k| Cow::Owned(k.into_owned()))),
        (None, None) => Ok(None),
    }
    .ok()
    .flatten()
}

/// An upstream's answer on its way to the client.
struct Held<'a> {
    res: Response<hyper::body::Incoming>,
    lease: Option<send::Lease>,
    cell: &'a cellgate_routing::Cell,
    cell_idx: cellgate_routing::CellIdx,
}

/// The response for the client: hop-by-hop headers out, `X-Cell-ID` and `X-Request-ID` in.
// Always inlined: out of line, the response is moved in and out of the call.
#[inline(always)]
fn answer(
    mut res: Response<hyper::body::Incoming>,
    lease: Option<send::Lease>,
    counted: Option<body::Streaming>,
    cell: &cellgate_routing::Cell,
    cell_idx: cellgate_routing::CellIdx,
    request_id: &HeaderValue,
) -> (Response<ProxyBody>, cellgate_routing::CellIdx) {
    shape::strip_hop_by_hop(res.headers_mut(), false);
    let h = res.headers_mut();
    h.insert(X_CELL_ID, cell.id_header.clone());
    h.insert(X_REQUEST_ID, ids::unindexed(request_id));
    (
        res.map(|b| ProxyBody::upstream(b, lease, counted)),
        cell_idx,
    )
}

/// The end of a request's attempts: the held retryable answer if there is one (a retry
/// of it found nowhere to go or failed), else `err`.
fn give_up(
    held: Option<Held<'_>>,
    request_id: &HeaderValue,
    err: Failed,
) -> Result<(Response<ProxyBody>, cellgate_routing::CellIdx), Failed> {
    match held {
        Some(h) => Ok(answer(h.res, h.lease, None, h.cell, h.cell_idx, request_id)),
        None => Err(err),
    }
}

/// Whether a sent request has somewhere to go again: another untried available instance of
/// the cell, or the failover cell when this cell stopped serving — or, when `stay` is
/// false (the cell has not answered this request), when it has no instance left to try.
fn can_retry(
    cell: &cellgate_routing::Cell,
    tried: u64,
    now: u64,
    p: &cellgate_health::HealthPolicy,
    stay: bool,
) -> bool {
    let untried =
        cell.instances.iter().enumerate().any(|(i, inst)| {
            (i >= 64 || tried & (1u64 << i) == 0) && inst.health.is_available(now, p)
        });
    untried || !stay || !cell.is_serving(now, p)
}

/// Attempts per request at most, across instances and cells (connect failures included).
const MAX_ATTEMPTS: usize = 8;

/// A gRPC answer's outcome, from its trailers (`body::Streaming`).
pub(crate) fn record_grpc(
    cell: &cellgate_routing::Cell,
    inst: &cellgate_routing::Instance,
    table: &RoutingTable,
    failed: bool,
) {
    let now = cellgate_health::now_ms();
    let outcome = if failed {
        Outcome::Status5xx
    } else {
        Outcome::Success
    };
    record(cell, inst, now, outcome, table.health_policy());
}

/// Phase *outcome*: feed an attempt's outcome to the instance's and the cell's health.
fn record(
    cell: &cellgate_routing::Cell,
    inst: &cellgate_routing::Instance,
    now: u64,
    outcome: Outcome,
    p: &cellgate_health::HealthPolicy,
) {
    let ejected = if outcome.is_failure() {
        cell.instances
            .iter()
            .filter(|i| i.health.is_ejected(now))
            .count()
    } else {
        0
    };
    let r = inst
        .health
        .record(now, outcome, p, ejected, cell.instances.len());
    if r.ejected {
        cell.health.count_ejection();
        tracing::warn!(cell = %cell.id, instance = %inst.name, addr = %inst.addr, ?outcome, "instance ejected");
    }
    if let Some(b) = r.breaker {
        tracing::warn!(cell = %cell.id, instance = %inst.name, state = b.as_str(), "instance breaker changed state");
    }
    if let Some(b) = cell.health.record(now, outcome.is_failure(), p) {
        tracing::warn!(cell = %cell.id, state = b.as_str(), "cell breaker changed state");
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_request_on_an_older_table_does_not_reset_the_current_round_robin() {
        let yaml = "regions: [r1]
cells:
  - id: a
    region: r1
    instances:
      - { name: a-1, addr: \"127.0.0.1:9\" }
      - { name: a-2, addr: \"127.0.0.1:10\" }
";
        let cfg = cellgate_config::Config::from_yaml(yaml).unwrap();
        let dir = std::env::temp_dir().join(format!("cellgate-wrr-{}", std::process::id()));
        let shared = crate::control::standalone(cfg.clone(), &dir).unwrap();
        let old = shared.table.load_full();
        let v = old.version() + 1;
        shared
            .table
            .store(Arc::new(cfg.build_table(v, &shared.health).unwrap()));
        let new = shared.table.load_full();
        let worker = Worker::new(Arc::clone(&shared), 8);
        let now = cellgate_health::now_ms();
        let mut picks = Vec::new();
        for _ in 0..6 {
            picks.push(worker.pick(&new, 0, None, now, 0, None).unwrap());
            // A request that began on the old table finishes in between.
            worker.observe(&old, Some(0), 200, 100, now);
        }
        assert_eq!(picks, [0, 1, 0, 1, 0, 1], "equal weights alternate");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
