//! The request guard: the hyper service of a client connection, in front of the proxy
//! phases. It checks what the codec leaves to the application — request-target length,
//! header count (HTTP/2), `Content-Length` syntax and size against the body limit,
//! `Transfer-Encoding` other than a single `chunked` — answers violations itself with the
//! JSON errors of [`ProxyError`], wraps the body so it is counted as it flows
//! ([`RequestBody`]), and keeps the connection's in-flight count for its timers.
//!
//! What hyper itself refuses before this guard sees a request (HTTP/1: malformed request
//! lines and headers, obs-fold, bare CR, differing duplicate `Content-Length`, invalid
//! chunk sizes, heads over `limits.max_header_bytes` or `limits.max_headers`) is answered by
//! hyper with a bodiless `400`/`431`/`414` and the connection is closed.
//!
//! Must never buffer a body, allocate on the accepted path, or take a lock.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use cellgate_config::Limits;
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderValue, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::conn::Activity;
use crate::proxy::body::{BodyError, ProxyBody, RequestBody};
use crate::proxy::error::ProxyError;
use crate::proxy::headers::{Seen, X_REQUEST_ID};
use crate::proxy::{ids, Proxy, ProxyFuture};

/// Per-request checks, from `limits:`.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    max_headers: usize,
    max_uri: usize,
    max_body: u64,
}

impl RequestLimits {
    /// From validated limits.
    pub fn new(l: &Limits) -> Self {
        Self {
            max_headers: l.max_headers,
            max_uri: l.max_uri_bytes,
            max_body: if l.max_body_bytes == 0 {
                u64::MAX
            } else {
                l.max_body_bytes
            },
        }
    }
}

/// The service of one client connection: checks, then the proxy.
#[derive(Debug)]
pub struct Guard {
    proxy: Proxy,
    limits: RequestLimits,
    act: Rc<Activity>,
    h1: bool,
}

impl Guard {
    /// A guard in front of `proxy` for one connection.
    pub fn new(proxy: Proxy, limits: RequestLimits, act: Rc<Activity>, h1: bool) -> Self {
        Self {
            proxy,
            limits,
            act,
            h1,
        }
    }
}

fn target_len(uri: &http::Uri) -> usize {
    uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len())
}

/// The first rule `req` breaks, if any.
fn check(req: &Request<Incoming>, l: &RequestLimits, seen: Seen) -> Option<ProxyError> {
    // Tunnels are not proxied: said so, instead of a broken tunnel or a silent downgrade.
    if req.method() == http::Method::CONNECT {
        return Some(ProxyError::MethodNotAllowed(
            "CONNECT is not proxied: cellgate is a reverse proxy, not a tunnel".into(),
        ));
    }
    if let Some(u) = seen.get(req.headers(), Seen::UPGRADE, http::header::UPGRADE) {
        // `h2c` is an offer hyper declines by answering over HTTP/1.1, which is right.
        if !u.as_bytes().eq_ignore_ascii_case(b"h2c") {
            return Some(ProxyError::NotImplemented(format!(
                "protocol upgrades ({}) are not proxied; use HTTP/1.1, HTTP/2 or gRPC",
                String::from_utf8_lossy(u.as_bytes())
            )));
        }
    }
    let len = target_len(req.uri());
    if len > l.max_uri {
        return Some(ProxyError::UriTooLong {
            len,
            max: l.max_uri,
        });
    }
    let h = req.headers();
    if h.len() > l.max_headers {
        return Some(ProxyError::HeadersTooLarge(format!(
            "{} request headers; the limit is {}",
            h.len(),
            l.max_headers
        )));
    }
    let mut cl = seen.get_all(h, Seen::CONTENT_LENGTH, CONTENT_LENGTH);
    if let Some(v) = cl.next() {
        if cl.next().is_some() {
            return Some(ProxyError::BadRequest(
                "more than one Content-Length header".into(),
            ));
        }
        let b = v.as_bytes();
        let n = (!b.is_empty() && b.len() <= 19 && b.iter().all(u8::is_ascii_digit))
            .then(|| std::str::from_utf8(b).ok()?.parse::<u64>().ok())
            .flatten();
        match n {
            None => {
                return Some(ProxyError::BadRequest(
                    "Content-Length is not a decimal number".into(),
                ))
            }
            Some(n) if n > l.max_body => return Some(ProxyError::PayloadTooLarge(l.max_body)),
            Some(_) => {}
        }
    }
    let mut te = seen.get_all(h, Seen::TRANSFER_ENCODING, TRANSFER_ENCODING);
    if let Some(v) = te.next() {
        if te.next().is_some() || !v.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Some(ProxyError::BadRequest(
                "Transfer-Encoding other than a single \"chunked\" is not accepted".into(),
            ));
        }
    }
    None
}

impl hyper::service::Service<Request<Incoming>> for Guard {
    type Response = Response<GuardBody>;
    type Error = Infallible;
    type Future = GuardFuture;

    fn call(&self, req: Request<Incoming>) -> GuardFuture {
        let scan = self.act.request_started();
        let inflight = InFlight(Rc::clone(&self.act));
        let h1 = self.h1 || req.version() < Version::HTTP_2;
        // The names the proxy looks for, looked at once for both.
        let seen = Seen::scan(req.headers());
        let refused = match scan.refusal() {
            Some(why) if h1 => Some(ProxyError::BadRequest(format!(
                "request refused: {why} (request smuggling defence)"
            ))),
            _ => check(&req, &self.limits, seen),
        };
        let grpc = crate::proxy::is_grpc(req.headers(), seen);
        if let Some(e) = refused {
            let request_id = ids::request_id(req.headers().get(X_REQUEST_ID));
            tracing::debug!(request_id = crate::proxy::log_str(Some(&request_id)), status = e.status().as_u16(), error = %e, "request refused by the guard");
            self.proxy.count_unrouted(e.status().as_u16());
            let res = e.into_response(&request_id, grpc);
            return GuardFuture {
                state: State::Ready(Some(Box::new(res))),
                inflight: Some(inflight),
                h1,
            };
        }
        let (parts, body) = req.into_parts();
        // A gRPC request's body is a stream of messages, as long as the call runs: the body
        // limit would end a long client stream; its messages' size is the server's to limit.
        let limit = if grpc { u64::MAX } else { self.limits.max_body };
        let req = Request::from_parts(parts, RequestBody::new(body, limit));
        GuardFuture {
            state: State::Proxy(self.proxy.call_scanned(req, seen)),
            inflight: Some(inflight),
            h1,
        }
    }
}

/// Counts one request in flight on its connection until its response body is done.
#[derive(Debug)]
struct InFlight(Rc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

enum State {
    /// A refusal (boxed: rare, and it keeps every request's future small).
    Ready(Option<Box<Response<ProxyBody>>>),
    Proxy(ProxyFuture),
}

/// The guard's response future.
pub struct GuardFuture {
    state: State,
    inflight: Option<InFlight>,
    h1: bool,
}

impl std::fmt::Debug for GuardFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardFuture").finish_non_exhaustive()
    }
}

impl Future for GuardFuture {
    type Output = Result<Response<GuardBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let refused = matches!(this.state, State::Ready(_));
        let mut res = match &mut this.state {
            State::Ready(r) => match r.take() {
                Some(r) => *r,
                None => Response::new(ProxyBody::empty()),
            },
            State::Proxy(f) => match ready!(f.as_mut().poll(cx)) {
                Ok(r) => r,
                Err(never) => match never {},
            },
        };
        // A request refused for its framing, or whose body was refused, may have left bytes
        // unread: HTTP/1 cannot tell where the next request starts, so the connection
        // closes. (Other answers keep the connection; hyper drains or closes as needed.)
        if this.h1 && (refused || res.status() == StatusCode::PAYLOAD_TOO_LARGE) {
            res.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        let inflight = this.inflight.take();
        if let Some(i) = &inflight {
            i.0.answer_started();
        }
        Poll::Ready(Ok(res.map(|inner| GuardBody { inner, inflight })))
    }
}

/// A response body that keeps its request counted in flight until it is sent.
#[derive(Debug)]
pub struct GuardBody {
    inner: ProxyBody,
    inflight: Option<InFlight>,
}

impl Body for GuardBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let f = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if f.is_none() {
            this.inflight = None;
        }
        Poll::Ready(f)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
