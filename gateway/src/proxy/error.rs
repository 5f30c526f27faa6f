//! The errors the gateway itself answers with, and the one place that maps them to
//! responses: JSON `{"error", "request_id"}` with the SPEC's status, or for gRPC clients a
//! trailers-only gRPC status so their libraries report it properly. Messages name what an
//! operator or client can act on and never leak internals (addresses, stack traces).

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use thiserror::Error;

use super::body::ProxyBody;
use super::headers::X_REQUEST_ID;

/// A request the gateway answers itself.
#[derive(Debug, Error)]
pub enum ProxyError {
    /// Bad routing key, bad header (400).
    #[error("{0}")]
    BadRequest(String),
    /// No cell can serve the request (503).
    #[error("{0}")]
    NoHealthyCell(String),
    /// The upstream could not be reached or failed mid-request (502).
    #[error("{0}")]
    UpstreamFailed(String),
    /// The deadline passed before the upstream answered (504).
    #[error("deadline of {0} ms exceeded before the upstream answered")]
    Deadline(u64),
    /// Shed under overload (429).
    #[error("gateway overloaded: {0} request shed; retry later")]
    Shed(&'static str),
    /// The request body is larger than `limits.max_body_bytes` (413).
    #[error("request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(u64),
    /// The request target is longer than `limits.max_uri_bytes` (414).
    #[error("request target is {len} bytes; the limit is {max}")]
    UriTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Too many or too large request headers (431).
    #[error("{0}")]
    HeadersTooLarge(String),
    /// The gateway is at a capacity limit, e.g. `limits.max_connections` (503).
    #[error("{0}")]
    Overloaded(String),
    /// A method the gateway does not proxy, `CONNECT` (405).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// A protocol upgrade the gateway does not proxy, e.g. WebSocket (501).
    #[error("{0}")]
    NotImplemented(String),
}

impl ProxyError {
    /// HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NoHealthyCell(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamFailed(_) => StatusCode::BAD_GATEWAY,
            Self::Deadline(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Shed(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            Self::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
        }
    }

    fn grpc_code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "3",      // INVALID_ARGUMENT
            Self::NoHealthyCell(_) => "14",  // UNAVAILABLE
            Self::UpstreamFailed(_) => "14", // UNAVAILABLE
            Self::Deadline(_) => "4",        // DEADLINE_EXCEEDED
            Self::Shed(_) => "8",            // RESOURCE_EXHAUSTED
            Self::PayloadTooLarge(_) | Self::HeadersTooLarge(_) => "8", // RESOURCE_EXHAUSTED
            Self::UriTooLong { .. } => "3",  // INVALID_ARGUMENT
            Self::Overloaded(_) => "14",     // UNAVAILABLE
            Self::MethodNotAllowed(_) | Self::NotImplemented(_) => "12", // UNIMPLEMENTED
        }
    }

    /// The response for this error.
    pub fn into_response(self, request_id: &HeaderValue, grpc: bool) -> Response<ProxyBody> {
        let message = self.to_string();
        let mut res = if grpc {
            let mut r = Response::new(ProxyBody::empty());
            let h = r.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from_static(self.grpc_code()));
            if let Ok(m) = HeaderValue::from_str(&percent_encode_grpc(&message)) {
                h.insert("grpc-message", m);
            }
            r
        } else {
            let body = serde_json::json!({
                "error": message,
                "request_id": request_id.to_str().unwrap_or_default(),
            });
            let mut r = Response::new(ProxyBody::full(body.to_string()));
            *r.status_mut() = self.status();
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        };
        res.headers_mut()
            .insert(X_REQUEST_ID, super::ids::unindexed(request_id));
        res
    }
}

/// gRPC's `grpc-message` is percent-encoded outside printable ASCII.
fn percent_encode_grpc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
