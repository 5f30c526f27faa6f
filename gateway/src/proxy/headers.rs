//! Header names of the contract (SPEC §2.5) and small header helpers.

use http::header::HeaderName;

/// The cell that serves the request (upstream and response).
pub const X_CELL_ID: HeaderName = HeaderName::from_static("x-cell-id");
/// Routing-table version of the decision.
pub const X_ROUTING_VERSION: HeaderName = HeaderName::from_static("x-routing-version");
/// Gray tag of the request.
pub const X_GRAY_TAG: HeaderName = HeaderName::from_static("x-gray-tag");
/// Request id (kept when valid, generated otherwise).
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// W3C trace context.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// Client address chain.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// Client scheme.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// Deadline asked by the client; remaining budget sent upstream.
pub const X_TIMEOUT: HeaderName = HeaderName::from_static("x-timeout");
/// Region hint of keyless requests.
pub const X_REGION_HINT: HeaderName = HeaderName::from_static("x-region-hint");
/// SLO class for load shedding.
pub const X_SLO_CLASS: HeaderName = HeaderName::from_static("x-slo-class");
/// gRPC deadline.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// Hop-by-hop headers (RFC 9110 §7.6.1) never forwarded.
pub const HOP_BY_HOP: [HeaderName; 7] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TRAILER,
];
