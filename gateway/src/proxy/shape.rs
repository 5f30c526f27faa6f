//! Phase *shape*: turn the client's request head into the upstream's. Removes hop-by-hop
//! headers and anything the client may not set (an untrusted `X-Cell-ID` or `X-Gray-Tag`),
//! adds the contract headers of SPEC §2.5, and fixes the URI form for the upstream
//! protocol. The remaining deadline is written per attempt by [`set_remaining`].

use std::time::Duration;

use http::header::{HeaderName, COOKIE, HOST, TE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Uri};

use super::deadline::remaining_x_timeout;
use super::headers::*;
use super::ids::unindexed;
use super::ConnInfo;

/// Headers the gateway may add to a request: X-Cell-ID, X-Routing-Version, X-Gray-Tag,
/// X-Request-ID, traceparent, X-Forwarded-For, X-Forwarded-Proto, X-Timeout,
/// grpc-timeout, Host.
const ADDED_HEADERS: usize = 10;

/// What the upstream request carries besides the client's headers.
#[derive(Clone, Copy, Debug)]
pub struct Shape<'a> {
    /// `X-Cell-ID`.
    pub cell: &'a HeaderValue,
    /// `X-Routing-Version`.
    pub version: &'a HeaderValue,
    /// `X-Gray-Tag`.
    pub gray: Option<&'a HeaderValue>,
    /// `X-Request-ID`.
    pub request_id: &'a HeaderValue,
    /// The client connection.
    pub conn: &'a ConnInfo,
    /// This hop's `traceparent`.
    pub traceparent: &'a HeaderValue,
    /// Which optional headers the client's request carries.
    pub seen: Seen,
    /// Whether the client's own `X-Forwarded-For` is kept (appended to); false for an
    /// untrusted client under `routing.forwarded_for: replace`.
    pub keep_forwarded_for: bool,
}

/// Add the contract headers to the client's headers (hop-by-hop ones already removed by
/// [`strip_hop_by_hop`]).
pub fn add_headers(headers: &mut HeaderMap, s: &Shape<'_>) {
    // Room for the headers added here and per attempt (X-Timeout, Host), at most one
    // growth of the map instead of one per insert.
    headers.reserve(ADDED_HEADERS);
    headers.insert(X_CELL_ID, s.cell.clone());
    headers.insert(X_ROUTING_VERSION, s.version.clone());
    match s.gray {
        Some(g) => {
            headers.insert(X_GRAY_TAG, g.clone());
        }
        None => {
            if s.seen.has(Seen::GRAY_TAG) {
                headers.remove(X_GRAY_TAG);
            }
        }
    }
    // Unique to this request: never indexed by an h2c upstream's HPACK table.
    headers.insert(X_REQUEST_ID, unindexed(s.request_id));
    headers.insert(TRACEPARENT, unindexed(s.traceparent));
    let xff = match s
        .seen
        .get(headers, Seen::FORWARDED_FOR, X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) if s.keep_forwarded_for && !prev.trim().is_empty() => {
            HeaderValue::from_str(&format!("{prev}, {}", s.conn.peer_ip_text))
                .unwrap_or_else(|_| s.conn.peer_ip.clone())
        }
        _ => s.conn.peer_ip.clone(),
    };
    headers.insert(X_FORWARDED_FOR, xff);
    headers.insert(X_FORWARDED_PROTO, s.conn.proto.clone());
}

/// Remove hop-by-hop headers (and the ones `Connection` names). `keep_te_trailers` keeps
/// `TE: trailers`, which gRPC needs end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    // One pass over the names, noting which hop-by-hop headers are present (bit i =
    // HOP_BY_HOP[i], bit 7 = TE): most messages carry none, most others only `Connection`.
    let mut present = 0u8;
    // Whether every `Connection` value is a bare `keep-alive` (what nearly every upstream
    // response carries): it names no header, so there is nothing to parse.
    let mut connection_names_none = true;
    for (k, v) in headers.iter() {
        if *k == TE {
            present |= 1 << 7;
        } else if let Some(i) = HOP_BY_HOP.iter().position(|h| h == k) {
            present |= 1 << i;
            if i == 0 {
                let v = v.as_bytes();
                connection_names_none &= v.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 && !connection_names_none {
        // The names `Connection` lists go too; `keep-alive` (nearly every value) is in the
        // hop-by-hop set already, so it costs no parse.
        let listed = headers
            .get_all(http::header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case(b"keep-alive"))
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .filter(|n| *n != TE && *n != X_CELL_ID && !HOP_BY_HOP.contains(n))
            .collect::<Vec<_>>();
        for n in listed {
            headers.remove(n);
        }
    }
    for (i, h) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(h);
        }
    }
    if present & (1 << 7) != 0 {
        let te_trailers = keep_te_trailers
            && headers
                .get(TE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        headers.remove(TE);
        if te_trailers {
            headers.insert(TE, HeaderValue::from_static("trailers"));
        }
    }
}

/// Set the URI and `Host` for the upstream protocol: origin-form plus `Host` for HTTP/1.1,
/// absolute `http://authority/path` for HTTP/2.
pub fn set_target(uri: &mut Uri, headers: &mut HeaderMap, h2: bool, fallback_authority: &str) {
    // Parsed only where it is used: an HTTP/1.1 request that already has `Host` (nearly
    // all) needs none.
    let authority = |uri: &Uri, headers: &HeaderMap| -> Option<Authority> {
        uri.authority()
            .cloned()
            .or_else(|| {
                headers
                    .get(HOST)
                    .and_then(|h| h.to_str().ok())
                    .and_then(|h| h.parse().ok())
            })
            .or_else(|| fallback_authority.parse().ok())
    };
    let pq = |uri: &Uri| {
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"))
    };
    if h2 {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = authority(uri, headers);
        parts.path_and_query = Some(pq(uri));
        if let Ok(u) = Uri::from_parts(parts) {
            *uri = u;
        }
        headers.remove(HOST);
    } else {
        if !headers.contains_key(HOST) {
            if let Some(a) =
                authority(uri, headers).and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                headers.insert(HOST, a);
            }
        }
        // Origin-form already (nearly every HTTP/1.1 request): nothing to rebuild. An
        // absolute-form target's authority is the request's host (RFC 9112 §3.2.2): it
        // replaces whatever `Host` says.
        if uri.scheme().is_some() || uri.authority().is_some() {
            if let Some(a) = uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                headers.insert(HOST, a);
            }
            *uri = Uri::from(pq(uri));
        }
    }
}

/// Re-target a request at another cell's protocol (a retry that crossed cells).
pub fn set_target_for<B>(req: &mut http::Request<B>, h2: bool, fallback_authority: &str) {
    let mut uri = std::mem::take(req.uri_mut());
    set_target(&mut uri, req.headers_mut(), h2, fallback_authority);
    *req.uri_mut() = uri;
}

/// Join the `Cookie` fields an HTTP/2 client may send one per cookie (RFC 9113 §8.2.3) into
/// the single field an HTTP/1.1 upstream expects, separated by `"; "`.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut all = headers.get_all(COOKIE).iter();
    let (Some(first), Some(_)) = (all.next(), all.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for v in headers.get_all(COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(COOKIE, v);
    }
}

/// Write the remaining budget (`X-Timeout`). A gRPC request's `grpc-timeout` is left as
/// the client sent it, or absent: it is the deadline of the whole call (a stream may run
/// for as long as the client allows), while the gateway's budget bounds only the wait for
/// the answer's head; putting the budget there would end streams the client meant to run
/// on (at the route's default when the client sent none, at its cap when it sent more).
pub fn set_remaining(headers: &mut HeaderMap, rem: Duration) {
    headers.insert(X_TIMEOUT, remaining_x_timeout(rem));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_absolute_form_target_sets_the_host_for_an_http1_upstream() {
        let mut uri: Uri = "http://api.example.com/abs?q=1".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_static("other.example"));
        set_target(&mut uri, &mut h, false, "cell-a");
        assert_eq!(uri, "/abs?q=1");
        assert_eq!(h.get(HOST).unwrap(), "api.example.com");
        // Origin-form keeps its Host.
        let mut uri: Uri = "/x".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_static("other.example"));
        set_target(&mut uri, &mut h, false, "cell-a");
        assert_eq!(
            (
                uri.to_string().as_str(),
                h.get(HOST).unwrap().to_str().unwrap()
            ),
            ("/x", "other.example")
        );
    }

    #[test]
    fn strips_hop_by_hop_and_named() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, true);
        assert!(
            h.get("connection").is_none()
                && h.get("keep-alive").is_none()
                && h.get("x-secret").is_none()
        );
        assert!(h.get("upgrade").is_none());
        assert_eq!(h.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
        assert!(h.get("x-keep").is_some());
        h.insert("te", HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h, true);
        assert!(h.get("te").is_none());

        // Every Connection line counts; listed names go, X-Cell-ID and TE rules stay.
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("close"));
        h.append(
            "connection",
            HeaderValue::from_static(" X-A ,, x-cell-id,te"),
        );
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("close", HeaderValue::from_static("1"));
        h.insert("x-cell-id", HeaderValue::from_static("c1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("connection").is_none() && h.get("x-a").is_none());
        assert!(
            h.get("close").is_none(),
            "a header named by `Connection: close` goes too"
        );
        assert!(h.get("te").is_none() && h.get("transfer-encoding").is_none());
        assert_eq!(h.get("x-cell-id").map(|v| v.as_bytes()), Some(&b"c1"[..]));

        // A lone `Connection: keep-alive` (nearly every upstream response) goes, and names
        // nothing; a lone `Connection: close` still removes a header of that name.
        for (value, close_kept) in [("Keep-Alive", true), ("close", false)] {
            let mut h = HeaderMap::new();
            h.insert("connection", HeaderValue::from_static(value));
            h.insert("close", HeaderValue::from_static("1"));
            h.insert("content-length", HeaderValue::from_static("3"));
            strip_hop_by_hop(&mut h, false);
            assert!(h.get("connection").is_none(), "{value}");
            assert_eq!(h.get("close").is_some(), close_kept, "{value}");
            assert_eq!(
                h.get("content-length").map(|v| v.as_bytes()),
                Some(&b"3"[..])
            );
        }

        // Nothing hop-by-hop: untouched.
        let mut h = HeaderMap::new();
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn per_request_ids_go_upstream_never_indexed() {
        let conn = ConnInfo::new("127.0.0.1:5000".parse().expect("addr"), false);
        let (cell, version) = (
            HeaderValue::from_static("bj-1"),
            HeaderValue::from_static("7"),
        );
        let id = HeaderValue::from_static("0af7651916cd43dd8448eb211c80319c");
        let tp =
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let mut h = HeaderMap::new();
        h.insert("x-user-id", HeaderValue::from_static("alice"));
        add_headers(
            &mut h,
            &Shape {
                cell: &cell,
                version: &version,
                gray: None,
                request_id: &id,
                conn: &conn,
                traceparent: &tp,
                seen: Seen::default(),
                keep_forwarded_for: true,
            },
        );
        // An h2c upstream's HPACK encoder sends these as never-indexed literals.
        for name in [X_REQUEST_ID, TRACEPARENT] {
            let v = h.get(&name).expect("added");
            assert!(v.is_sensitive(), "{name}");
        }
        assert_eq!(h[X_REQUEST_ID], id);
        assert_eq!(h[TRACEPARENT], tp);
        // Values shared by many requests stay indexable.
        for name in [
            X_CELL_ID,
            X_ROUTING_VERSION,
            X_FORWARDED_FOR,
            X_FORWARDED_PROTO,
        ] {
            assert!(!h[&name].is_sensitive(), "{name}");
        }
        assert_eq!(h["x-user-id"], "alice");
    }

    #[test]
    fn targets() {
        let mut uri: Uri = "http://example.com/a?b=1".parse().expect("uri");
        let mut h = HeaderMap::new();
        set_target(&mut uri, &mut h, false, "10.0.0.1:80");
        assert_eq!(uri.to_string(), "/a?b=1");
        assert_eq!(h.get(HOST).map(|v| v.as_bytes()), Some(&b"example.com"[..]));
        let mut uri: Uri = "/b/c?d=2".parse().expect("uri");
        set_target(&mut uri, &mut h, false, "10.0.0.1:80");
        assert_eq!(uri.to_string(), "/b/c?d=2", "origin-form is kept");
        assert_eq!(h.get(HOST).map(|v| v.as_bytes()), Some(&b"example.com"[..]));
        let mut uri: Uri = "/svc.Echo/Say".parse().expect("uri");
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_static("api.local:8080"));
        set_target(&mut uri, &mut h, true, "10.0.0.1:80");
        assert_eq!(uri.to_string(), "http://api.local:8080/svc.Echo/Say");
        assert!(h.get(HOST).is_none());
    }
}
