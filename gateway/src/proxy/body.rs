//! The response/request body type of the proxy: a streamed body from the other side
//! (frames, including gRPC trailers, pass through untouched; a client's request body is
//! counted against the body limit as it flows, [`RequestBody`]) or a small body the
//! gateway made.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::send::Lease;

/// A body the proxy sends.
#[derive(Debug)]
pub enum ProxyBody {
    /// Streamed from the other side.
    Stream(Incoming),
    /// An upstream response body (on a pooled HTTP/1.1 connection, returned to the pool
    /// when the body ends), counted in flight until then.
    Upstream(Incoming, Option<Lease>, Option<Streaming>),
    /// A client's request body, counted against the body limit.
    Request(RequestBody),
    /// Made by the gateway (errors); `None` once sent.
    Full(Option<Bytes>),
}

impl ProxyBody {
    /// A gateway-made body.
    pub fn full(b: impl Into<Bytes>) -> Self {
        Self::Full(Some(b.into()))
    }
    /// An empty body.
    pub fn empty() -> Self {
        Self::Full(None)
    }

    /// An upstream response body; an already finished one gives its connection back and
    /// leaves the in-flight gauges now.
    pub fn upstream(body: Incoming, lease: Option<Lease>, counted: Option<Streaming>) -> Self {
        if body.is_end_stream() {
            if let Some(l) = lease {
                l.give_back();
            }
            drop(counted);
            return Self::Upstream(body, None, None);
        }
        Self::Upstream(body, lease, counted)
    }
}

/// An answer's place in its instance's and its cell's in-flight gauges while its body
/// streams: a drain's in-flight count reaches 0 only once the answers have ended, not when
/// their heads arrived (downloads, server-sent events and gRPC streams are still going).
#[derive(Debug)]
pub struct Streaming {
    inst: Arc<cellgate_health::InstanceHealth>,
    cell: Arc<cellgate_health::CellHealth>,
    /// A gRPC answer's outcome, known only from its trailers.
    grpc: Option<Box<GrpcOutcome>>,
}

/// Where a gRPC answer's outcome is recorded once its trailers say it (`grpc-status`).
#[derive(Debug)]
pub struct GrpcOutcome {
    /// The table the request was routed on; not kept alive by a long stream (a table
    /// replaced since is not looked up: the outcome goes unrecorded).
    pub table: std::sync::Weak<cellgate_routing::RoutingTable>,
    /// Its cell and instance there.
    pub cell: cellgate_routing::CellIdx,
    /// Instance index in the cell.
    pub inst: usize,
}

impl Streaming {
    /// Take over one in-flight count already held on `inst` and `cell`.
    pub fn take_over(
        inst: &Arc<cellgate_health::InstanceHealth>,
        cell: &Arc<cellgate_health::CellHealth>,
    ) -> Self {
        Self {
            inst: Arc::clone(inst),
            cell: Arc::clone(cell),
            grpc: None,
        }
    }

    /// Record the answer's outcome when its trailers come (gRPC).
    pub fn with_grpc_outcome(mut self, o: GrpcOutcome) -> Self {
        self.grpc = Some(Box::new(o));
        self
    }

    /// The answer ended: with `trailers`, or without any (`None`). A gRPC answer's outcome
    /// is recorded now: a failure for INTERNAL or UNAVAILABLE, or for no status at all.
    fn ended(&mut self, trailers: Option<&http::HeaderMap>) {
        let Some(o) = self.grpc.take() else { return };
        let Some(table) = o.table.upgrade() else {
            return;
        };
        let failed = match trailers.and_then(|t| t.get("grpc-status")) {
            Some(v) => super::grpc_status_failed(v),
            None => true,
        };
        if let Some(cell) = table.cell(o.cell) {
            if let Some(inst) = cell.instances.get(o.inst) {
                super::record_grpc(cell, inst, &table, failed);
            }
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        self.inst.add_in_flight(-1);
        self.cell.add_in_flight(-1);
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Self::Upstream(body, lease, _) = self {
            if body.is_end_stream() {
                if let Some(l) = lease.take() {
                    l.give_back();
                }
            }
        }
    }
}

/// Why a body stream failed: the other side's error, or the request body's limit.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Self::Stream(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
            Self::Request(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
            Self::Upstream(b, lease, counted) => {
                let r = Pin::new(&mut *b).poll_frame(cx);
                let done = matches!(r, Poll::Ready(None))
                    || (matches!(r, Poll::Ready(Some(Ok(_)))) && b.is_end_stream());
                if let Some(c) = counted.as_mut() {
                    match &r {
                        Poll::Ready(Some(Ok(f))) if f.is_trailers() => c.ended(f.trailers_ref()),
                        // Cut off by the upstream: no status will come.
                        Poll::Ready(Some(Err(_))) => c.ended(None),
                        _ => {}
                    }
                }
                if done {
                    if let Some(l) = lease.take() {
                        l.give_back();
                    }
                    if let Some(c) = counted.as_mut() {
                        c.ended(None);
                    }
                    *counted = None;
                }
                r.map_err(BodyError::from)
            }
            Self::Full(b) => Poll::Ready(
                b.take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Stream(b) | Self::Upstream(b, _, _) => b.is_end_stream(),
            Self::Request(b) => b.is_end_stream(),
            Self::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Stream(b) | Self::Upstream(b, _, _) => b.size_hint(),
            Self::Request(b) => b.size_hint(),
            Self::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// A client's request body on its way upstream, counted as it flows against the body limit
/// (`limits.max_body_bytes`); never buffered. Past the limit it fails with
/// [`RequestBodyError::TooLarge`], which aborts the upstream request.
#[derive(Debug)]
pub struct RequestBody {
    inner: Incoming,
    seen: u64,
    limit: u64,
    /// Set when the body went past the limit: an HTTP/2 upstream connection reports the
    /// abort as its own stream error, without this body's error behind it.
    over: Option<std::rc::Rc<std::cell::Cell<bool>>>,
}

impl RequestBody {
    /// Count `inner` against `limit` bytes (`u64::MAX`: no limit).
    pub fn new(inner: Incoming, limit: u64) -> Self {
        let over = (limit != u64::MAX && !inner.is_end_stream())
            .then(|| std::rc::Rc::new(std::cell::Cell::new(false)));
        Self {
            inner,
            seen: 0,
            limit,
            over,
        }
    }

    /// Whether the body went past its limit, readable after the body was handed on
    /// (`None` for a body that has none, or no bytes).
    pub fn over_limit(&self) -> Option<(std::rc::Rc<std::cell::Cell<bool>>, u64)> {
        self.over
            .as_ref()
            .map(|o| (std::rc::Rc::clone(o), self.limit))
    }
}

/// Why a client's request body could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    /// More bytes than the limit.
    #[error("request body is larger than the limit of {0} bytes")]
    TooLarge(u64),
    /// The client's body was malformed (e.g. an invalid chunk) or cut off.
    #[error("request body could not be read from the client: {0}")]
    Client(#[source] hyper::Error),
}

impl RequestBodyError {
    /// The answer for a request whose body failed this way.
    pub fn to_proxy_error(&self) -> super::error::ProxyError {
        match self {
            Self::TooLarge(n) => super::error::ProxyError::PayloadTooLarge(*n),
            Self::Client(_) => super::error::ProxyError::BadRequest(
                "the request body is malformed or was cut off".into(),
            ),
        }
    }

    /// The body error behind an upstream send failure, if that is what it was.
    pub fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Self> {
        let mut cur = Some(e);
        for _ in 0..8 {
            let Some(err) = cur else { break };
            if let Some(b) = err.downcast_ref::<Self>() {
                return Some(b);
            }
            cur = err.source();
        }
        None
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(RequestBodyError::Client(e)))),
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.seen = this.seen.saturating_add(d.len() as u64);
                    if this.seen > this.limit {
                        if let Some(o) = &this.over {
                            o.set(true);
                        }
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge(this.limit))));
                    }
                }
                Poll::Ready(Some(Ok(f)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
