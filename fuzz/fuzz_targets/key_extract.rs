//! Routing-key extraction from any header, cookie, query, path and JWT bytes: never
//! panics, and every key it returns obeys the key rules (1-256 bytes, UTF-8, no control
//! characters).
//!
//! Input layout: one selector byte (which sources, in which order), then up to five parts
//! separated by 0xFF: header value, cookie header, request target, JWT token, second
//! header value (a repeated header).
#![no_main]

use cellgate_routing::{JwtVerify, KeySource, KeySources, MAX_KEY_LEN};
use http::{HeaderMap, HeaderValue, Uri};
use libfuzzer_sys::fuzz_target;

fn sources(sel: u8) -> KeySources {
    let all = [
        KeySource::header("x-user-id").expect("valid name"),
        KeySource::Cookie("uid".into()),
        KeySource::Query("uid".into()),
        KeySource::PathSegment(usize::from(sel >> 5)),
        KeySource::jwt("authorization", "sub", JwtVerify::Unverified).expect("valid jwt source"),
        KeySource::jwt("authorization", "sub", JwtVerify::Hs256(b"fuzz-secret"))
            .expect("valid jwt source"),
    ];
    let n = all.len();
    let start = usize::from(sel) % n;
    let mut picked: Vec<KeySource> = (0..n)
        .filter(|i| sel & (1 << (i % 5)) != 0 || *i == start)
        .map(|i| all[(i + start) % n].clone())
        .collect();
    if picked.is_empty() {
        picked.push(all[start].clone());
    }
    KeySources::new(picked)
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let mut parts = rest.split(|&b| b == 0xFF);
    let header = parts.next().unwrap_or_default();
    let cookie = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let jwt = parts.next().unwrap_or_default();
    let header2 = parts.next();

    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(header) {
        headers.append("x-user-id", v);
    }
    if let Some(Ok(v)) = header2.map(HeaderValue::from_bytes) {
        headers.append("x-user-id", v);
    }
    if let Ok(v) = HeaderValue::from_bytes(cookie) {
        headers.append(http::header::COOKIE, v);
    }
    if let Ok(v) = HeaderValue::from_bytes(jwt) {
        headers.append(http::header::AUTHORIZATION, v);
    }
    let uri = Uri::try_from(target).unwrap_or_else(|_| Uri::from_static("/"));

    if let Ok(Some(key)) = sources(sel).extract(&uri, &headers) {
        assert!(!key.is_empty(), "empty key returned");
        assert!(key.len() <= MAX_KEY_LEN, "key of {} bytes", key.len());
        assert!(
            !key.bytes().any(|b| b < 0x20 || b == 0x7f),
            "control character in key {key:?}"
        );
    }
});
