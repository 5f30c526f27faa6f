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
        }
    }

    fn grpc_code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "3",      // INVALID_ARGUMENT
            Self::NoHealthyCell(_) => "14",  // UNAVAILABLE
            Self::UpstreamFailed(_) => "14", // UNAVAILABLE
            Self::Deadline(_) => "4",        // DEADLINE_EXCEEDED
            Self::Shed(_) => "8",            // RESOURCE_EXHAUSTED
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
        res.headers_mut().insert(X_REQUEST_ID, request_id.clone());
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
