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

/// Which of the optional request headers the gateway reads are present, found in one pass
/// over the request's names. Most requests carry none of them, and a bit test is cheaper
/// than a hashed lookup of a name that is not there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen(u16);

impl Seen {
    /// `X-Request-ID`.
    pub const REQUEST_ID: u16 = 1;
    /// `traceparent`.
    pub const TRACEPARENT: u16 = 1 << 1;
    /// `X-SLO-Class`.
    pub const SLO_CLASS: u16 = 1 << 2;
    /// `X-Cell-ID`.
    pub const CELL_ID: u16 = 1 << 3;
    /// `X-Region-Hint`.
    pub const REGION_HINT: u16 = 1 << 4;
    /// `X-Gray-Tag`.
    pub const GRAY_TAG: u16 = 1 << 5;
    /// `X-Timeout`.
    pub const TIMEOUT: u16 = 1 << 6;
    /// `grpc-timeout`.
    pub const GRPC_TIMEOUT: u16 = 1 << 7;
    /// `Content-Type`.
    pub const CONTENT_TYPE: u16 = 1 << 8;
    /// `X-Forwarded-For`.
    pub const FORWARDED_FOR: u16 = 1 << 9;
    /// `Content-Length`.
    pub const CONTENT_LENGTH: u16 = 1 << 10;
    /// `Transfer-Encoding`.
    pub const TRANSFER_ENCODING: u16 = 1 << 11;
    /// `Upgrade`.
    pub const UPGRADE: u16 = 1 << 12;

    /// Look at every name of `headers` once.
    pub fn scan(headers: &http::HeaderMap) -> Self {
        let mut bits = 0;
        for name in headers.keys() {
            bits |= match name.as_str() {
                "x-request-id" => Self::REQUEST_ID,
                "traceparent" => Self::TRACEPARENT,
                "x-slo-class" => Self::SLO_CLASS,
                "x-cell-id" => Self::CELL_ID,
                "x-region-hint" => Self::REGION_HINT,
                "x-gray-tag" => Self::GRAY_TAG,
                "x-timeout" => Self::TIMEOUT,
                "grpc-timeout" => Self::GRPC_TIMEOUT,
                "content-type" => Self::CONTENT_TYPE,
                "x-forwarded-for" => Self::FORWARDED_FOR,
                "content-length" => Self::CONTENT_LENGTH,
                "transfer-encoding" => Self::TRANSFER_ENCODING,
                "upgrade" => Self::UPGRADE,
                _ => 0,
            };
        }
        Self(bits)
    }

    /// `headers.get(name)`, skipped when the scan saw no such name (`bit`).
    #[inline]
    pub fn get(
        self,
        headers: &http::HeaderMap,
        bit: u16,
        name: HeaderName,
    ) -> Option<&http::HeaderValue> {
        if self.0 & bit == 0 {
            None
        } else {
            headers.get(name)
        }
    }

    /// `headers.get_all(name)`, empty without a lookup when the scan saw no such name.
    #[inline]
    pub fn get_all(
        self,
        headers: &http::HeaderMap,
        bit: u16,
        name: HeaderName,
    ) -> impl Iterator<Item = &http::HeaderValue> {
        self.has(bit)
            .then(|| headers.get_all(name).iter())
            .into_iter()
            .flatten()
    }

    /// Whether the scan saw the name of `bit`.
    #[inline]
    pub fn has(self, bit: u16) -> bool {
        self.0 & bit != 0
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) never forwarded (`TE` is handled on its own).
/// `Trailer` is end to end: it announces the trailer fields, and an HTTP/1.1 sender writes
/// only the trailers it names.
pub const HOP_BY_HOP: [HeaderName; 6] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::header::PROXY_AUTHORIZATION,
];

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    #[test]
    fn seen_knows_every_name_it_skips() {
        let names = [
            (Seen::REQUEST_ID, X_REQUEST_ID),
            (Seen::TRACEPARENT, TRACEPARENT),
            (Seen::SLO_CLASS, X_SLO_CLASS),
            (Seen::CELL_ID, X_CELL_ID),
            (Seen::REGION_HINT, X_REGION_HINT),
            (Seen::GRAY_TAG, X_GRAY_TAG),
            (Seen::TIMEOUT, X_TIMEOUT),
            (Seen::GRPC_TIMEOUT, GRPC_TIMEOUT),
            (Seen::CONTENT_TYPE, http::header::CONTENT_TYPE),
            (Seen::FORWARDED_FOR, X_FORWARDED_FOR),
        ];
        for (bit, name) in names {
            let mut h = HeaderMap::new();
            h.insert(name.clone(), HeaderValue::from_static("v"));
            assert_eq!(Seen::scan(&h), Seen(bit), "{name}");
            assert!(Seen::scan(&h).get(&h, bit, name).is_some());
        }
    }

    #[test]
    fn seen_skips_only_what_is_absent() {
        let mut h = HeaderMap::new();
        h.insert("x-user-id", HeaderValue::from_static("alice"));
        h.insert(X_TIMEOUT, HeaderValue::from_static("2s"));
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        let seen = Seen::scan(&h);
        assert!(seen.has(Seen::TIMEOUT) && seen.has(Seen::CONTENT_TYPE));
        assert!(!seen.has(Seen::CELL_ID) && !seen.has(Seen::GRAY_TAG));
        assert_eq!(
            seen.get(&h, Seen::TIMEOUT, X_TIMEOUT).map(|v| v.as_bytes()),
            Some(&b"2s"[..])
        );
        // A name added after the scan is not seen: the scan is taken once, before any
        // header the gateway reads is changed.
        h.insert(X_GRAY_TAG, HeaderValue::from_static("canary"));
        assert_eq!(seen.get(&h, Seen::GRAY_TAG, X_GRAY_TAG), None);
        assert!(Seen::scan(&h).has(Seen::GRAY_TAG));
    }
}
