//! Routing-key extraction: an ordered list of sources; the first that yields a key wins.
//!
//! Sources: a header (default `X-User-ID`), a cookie, a query parameter, a path segment,
//! or a claim of a JWT (HS256/RS256 signature verified when a key is configured).
//! Every key is checked: at most [`MAX_KEY_LEN`] bytes, UTF-8, no control characters.
//! Extraction borrows from the request whenever it can and never panics on any input.

use std::borrow::Cow;

use http::header::{HeaderName, COOKIE};
use http::{HeaderMap, Uri};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::error::KeyError;

/// Longest accepted routing key, in bytes.
pub const MAX_KEY_LEN: usize = 256;

/// One place a routing key can come from.
#[derive(Clone)]
pub enum KeySource {
    /// The value of a request header.
    Header(HeaderName),
    /// The value of a cookie.
    Cookie(String),
    /// The value of a query parameter (percent-decoded).
    Query(String),
    /// The n-th (0-based) non-empty segment of the path (percent-decoded).
    PathSegment(usize),
    /// A claim of a JWT.
    Jwt(JwtSource),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Header(h) => write!(f, "header({h})"),
            Self::Cookie(c) => write!(f, "cookie({c})"),
            Self::Query(q) => write!(f, "query({q})"),
            Self::PathSegment(n) => write!(f, "path_segment({n})"),
            Self::Jwt(j) => write!(f, "jwt({}, claim {})", j.header, j.claim),
        }
    }
}

/// How a JWT key source checks signatures.
#[derive(Clone, Copy, Debug)]
pub enum JwtVerify<'a> {
    /// Read the claim without verifying (the token is trusted upstream of the gateway).
    Unverified,
    /// HS256 with this shared secret.
    Hs256(&'a [u8]),
    /// RS256 with this PEM-encoded RSA public key.
    Rs256Pem(&'a [u8]),
}

impl KeySource {
    /// A header source; `Err` names why the header name is invalid.
    pub fn header(name: &str) -> Result<Self, String> {
        HeaderName::from_bytes(name.as_bytes())
            .map(Self::Header)
            .map_err(|_| format!("{name:?} is not a valid header name"))
    }

    /// A JWT source reading `claim` from the token in `header`.
    pub fn jwt(header: &str, claim: &str, verify: JwtVerify<'_>) -> Result<Self, String> {
        let header = HeaderName::from_bytes(header.as_bytes())
            .map_err(|_| format!("{header:?} is not a valid header name"))?;
        if claim.is_empty() {
            return Err("claim must not be empty".into());
        }
        let verify = match verify {
            JwtVerify::Unverified => None,
            JwtVerify::Hs256(secret) => Some((DecodingKey::from_secret(secret), Algorithm::HS256)),
            JwtVerify::Rs256Pem(pem) => Some((
                DecodingKey::from_rsa_pem(pem)
                    .map_err(|e| format!("not an RSA public key PEM: {e}"))?,
                Algorithm::RS256,
            )),
        };
        Ok(Self::Jwt(JwtSource {
            header,
            claim: claim.to_owned(),
            verify,
        }))
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Header(_) => "header",
            Self::Cookie(_) => "cookie",
            Self::Query(_) => "query",
            Self::PathSegment(_) => "path segment",
            Self::Jwt(_) => "jwt",
        }
    }
}

/// A JWT key source: the token is read from `header` (with or without a `Bearer ` prefix).
#[derive(Clone)]
pub struct JwtSource {
    /// Header carrying the token (default `authorization`).
    pub header: HeaderName,
    /// Claim used as the key (default `sub`).
    pub claim: String,
    /// Signature verification; `None` reads the claim without verifying.
    pub verify: Option<(DecodingKey, Algorithm)>,
}

impl JwtSource {
    fn extract(&self, headers: &HeaderMap) -> Result<Option<String>, KeyError> {
        let Some(raw) = headers.get(&self.header) else {
            return Ok(None);
        };
        let raw = raw
            .to_str()
            .map_err(|_| KeyError::Jwt("token is not visible ASCII".into()))?
            .trim();
        // `<scheme> <credentials>`: only the Bearer scheme (case-insensitive, RFC 9110
        // §11.1) carries a JWT; another scheme (`Basic …`) is no token here, so the next
        // source is tried. A bare value is taken as the token itself.
        let token = match raw.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
            Some(_) => return Ok(None),
            None => raw,
        };
        if token.is_empty() {
            return Ok(None);
        }
        let claims: serde_json::Map<String, serde_json::Value> = match &self.verify {
            Some((key, alg)) => {
                let mut v = Validation::new(*alg);
                v.required_spec_claims.clear();
                v.validate_exp = true;
                v.validate_aud = false;
                jsonwebtoken::decode(token, key, &v)
                    .map_err(|e| KeyError::Jwt(e.to_string()))?
                    .claims
            }
            None => decode_unverified(token)?,
        };
        match claims.get(&self.claim) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(serde_json::Value::Number(n)) => Ok(Some(n.to_string())),
            Some(_) => Err(KeyError::Jwt(format!(
                "claim {} is not a string or number",
                self.claim
            ))),
        }
    }
}

fn decode_unverified(token: &str) -> Result<serde_json::Map<String, serde_json::Value>, KeyError> {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(KeyError::Jwt(
            "token is not three dot-separated parts".into(),
        ));
    };
    let bytes = base64url_decode(payload)
        .ok_or_else(|| KeyError::Jwt("payload is not base64url".into()))?;
    serde_json::from_slice(&bytes).map_err(|_| KeyError::Jwt("payload is not a JSON object".into()))
}

fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// The ordered list of key sources of a routing table.
#[derive(Clone, Debug)]
pub struct KeySources {
    sources: Vec<KeySource>,
}

impl Default for KeySources {
    fn default() -> Self {
        Self {
            sources: vec![KeySource::Header(HeaderName::from_static("x-user-id"))],
        }
    }
}

impl KeySources {
    /// Sources tried in this order.
    pub fn new(sources: Vec<KeySource>) -> Self {
        Self { sources }
    }

    /// The configured sources.
    pub fn sources(&self) -> &[KeySource] {
        &self.sources
    }

    /// The routing key of a request: the first source that yields a non-empty value.
    /// `Ok(None)` means the request has no key.
    pub fn extract<'a>(
        &self,
        uri: &'a Uri,
        headers: &'a HeaderMap,
    ) -> Result<Option<Cow<'a, str>>, KeyError> {
        for source in &self.sources {
            let raw: Option<Cow<'a, [u8]>> = match source {
                KeySource::Header(name) => {
                    let mut all = headers.get_all(name).iter();
                    let Some(v) = all.next() else { continue };
                    if all.any(|other| other != v) {
                        return Err(KeyError::Ambiguous {
                            source_name: format!("header {}", name.as_str()),
                        });
                    }
                    // Fast path: a visible-ASCII value (nearly every key) is UTF-8 already,
                    // and tab is the only control character `to_str` lets through.
                    if let Ok(s) = v.to_str() {
                        let t = s.trim_matches(|c: char| c.is_ascii_whitespace());
                        if t.is_empty() {
                            continue;
                        }
                        if t.len() <= MAX_KEY_LEN && !t.as_bytes().contains(&b'\t') {
                            return Ok(Some(Cow::Borrowed(t)));
                        }
                    }
                    Some(Cow::Borrowed(trim_bytes(v.as_bytes())))
                }
                KeySource::Cookie(name) => find_cookie(headers, name).map(Cow::Borrowed),
                KeySource::Query(name) => match uri.query() {
                    Some(q) => find_query(q, name)?,
                    None => None,
                },
                KeySource::PathSegment(n) => uri
                    .path()
                    .split('/')
                    .filter(|s| !s.is_empty())
                    .nth(*n)
                    .map(|s| percent_decode(s.as_bytes(), false)),
                KeySource::Jwt(j) => j.extract(headers)?.map(|s| Cow::Owned(s.into_bytes())),
            };
            let Some(raw) = raw else { continue };
            if raw.is_empty() {
                continue;
            }
            return validate_key(raw, source.name()).map(Some);
        }
        Ok(None)
    }
}

/// Check a key's length, encoding and characters.
fn validate_key<'a>(
    raw: Cow<'a, [u8]>,
    source_name: &'static str,
) -> Result<Cow<'a, str>, KeyError> {
    if raw.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong {
            source_name,
            len: raw.len(),
            max: MAX_KEY_LEN,
        });
    }
    if raw.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(KeyError::ControlChar { source_name });
    }
    let non_ascii = !raw.is_ascii();
    let key = match raw {
        Cow::Borrowed(b) => std::str::from_utf8(b)
            .map(Cow::Borrowed)
            .map_err(|_| KeyError::NotUtf8 { source_name }),
        Cow::Owned(v) => String::from_utf8(v)
            .map(Cow::Owned)
            .map_err(|_| KeyError::NotUtf8 { source_name }),
    }?;
    // The C1 controls (U+0080..U+009F, e.g. NEL) are control characters too.
    if non_ascii && key.chars().any(char::is_control) {
        return Err(KeyError::ControlChar { source_name });
    }
    Ok(key)
}

/// Validate a key given directly (admin explain, CLI), with the same rules as requests.
pub(crate) fn check_key(key: &str) -> Result<(), KeyError> {
    validate_key(Cow::Borrowed(key.as_bytes()), "argument").map(|_| ())
}

fn trim_bytes(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// The cookie `name`'s value: the first one sent. Browsers send one name more than once
/// when cookies of different paths or domains match, the most specific first (RFC 6265
/// §5.4), so a repeat is not refused.
fn find_cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    for value in headers.get_all(COOKIE) {
        for pair in value.as_bytes().split(|&c| c == b';') {
            let pair = trim_bytes(pair);
            let Some(eq) = pair.iter().position(|&c| c == b'=') else {
                continue;
            };
            if trim_bytes(&pair[..eq]) == name.as_bytes() {
                let v = trim_bytes(&pair[eq + 1..]);
                let v = v
                    .strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(v);
                return Some(v);
            }
        }
    }
    None
}

/// The query parameter `name`'s value; the same parameter twice with different values is
/// ambiguous.
fn find_query<'a>(query: &'a str, name: &str) -> Result<Option<Cow<'a, [u8]>>, KeyError> {
    let mut found: Option<Cow<'a, [u8]>> = None;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(k.as_bytes(), true).as_ref() == name.as_bytes() {
            let v = percent_decode(v.as_bytes(), true);
            match &found {
                Some(f) if *f != v => {
                    return Err(KeyError::Ambiguous {
                        source_name: format!("query parameter {name}"),
                    })
                }
                Some(_) => {}
                None => found = Some(v),
            }
        }
    }
    Ok(found)
}

/// Percent-decode (and `+` → space in query strings). Borrows when nothing changes.
/// Malformed escapes are kept literally.
fn percent_decode(s: &[u8], plus_is_space: bool) -> Cow<'_, [u8]> {
    if !s.iter().any(|&c| c == b'%' || (plus_is_space && c == b'+')) {
        return Cow::Borrowed(s);
    }
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'%' if i + 2 < s.len() => match (hex(s[i + 1]), hex(s[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus_is_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    Cow::Owned(out)
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn req(uri: &str, headers: &[(&str, &str)]) -> (Uri, HeaderMap) {
        let uri: Uri = uri.parse().expect("uri");
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        (uri, h)
    }

    fn all_sources() -> KeySources {
        KeySources::new(vec![
            KeySource::Header(HeaderName::from_static("x-user-id")),
            KeySource::Cookie("uid".into()),
            KeySource::Query("user".into()),
            KeySource::PathSegment(1),
        ])
    }

    #[test]
    fn sources_in_order() {
        let s = all_sources();
        let (u, h) = req(
            "/u/path-key?user=q%20key",
            &[("cookie", "a=1; uid=\"ck\""), ("x-user-id", " hdr ")],
        );
        assert_eq!(s.extract(&u, &h).expect("ok").as_deref(), Some("hdr"));
        let (u, h) = req("/u/path-key?user=q%20key", &[("cookie", "a=1; uid=\"ck\"")]);
        assert_eq!(s.extract(&u, &h).expect("ok").as_deref(), Some("ck"));
        let (u, h) = req("/u/path-key?x=1&user=q+k%21", &[("cookie", "a=1")]);
        assert_eq!(s.extract(&u, &h).expect("ok").as_deref(), Some("q k!"));
        let (u, h) = req("/u/path%2Dkey/more", &[]);
        assert_eq!(s.extract(&u, &h).expect("ok").as_deref(), Some("path-key"));
        let (u, h) = req("/u", &[("x-user-id", "")]);
        assert_eq!(s.extract(&u, &h).expect("ok"), None);
    }

    #[test]
    fn rejects_bad_keys() {
        let s = all_sources();
        let long = "k".repeat(257);
        let (u, h) = req("/", &[("x-user-id", &long)]);
        assert!(matches!(
            s.extract(&u, &h),
            Err(KeyError::TooLong { len: 257, .. })
        ));
        let ok = "k".repeat(256);
        let (u, h) = req("/", &[("x-user-id", &ok)]);
        assert!(s.extract(&u, &h).is_ok());
        let (u, h) = req("/?user=a%01b", &[]);
        assert!(matches!(
            s.extract(&u, &h),
            Err(KeyError::ControlChar { .. })
        ));
        let (u, h) = req("/?user=a%FFb", &[]);
        assert!(matches!(s.extract(&u, &h), Err(KeyError::NotUtf8 { .. })));
        let (u, h) = req("/", &[("x-user-id", " \t alice \t")]);
        assert_eq!(s.extract(&u, &h).expect("valid").as_deref(), Some("alice"));
        let mut h = HeaderMap::new();
        h.insert(
            "x-user-id",
            HeaderValue::from_bytes("zoë".as_bytes()).expect("opaque"),
        );
        assert_eq!(s.extract(&u, &h).expect("valid").as_deref(), Some("zoë"));
        let (u, h) = req("/", &[("x-user-id", "a\tb")]);
        assert!(matches!(
            s.extract(&u, &h),
            Err(KeyError::ControlChar { .. })
        ));
    }

    #[test]
    fn malformed_percent_escapes_are_literal() {
        assert_eq!(percent_decode(b"a%", false).as_ref(), b"a%");
        assert_eq!(percent_decode(b"a%4", false).as_ref(), b"a%4");
        assert_eq!(percent_decode(b"a%zz", false).as_ref(), b"a%zz");
        assert_eq!(percent_decode(b"%41", false).as_ref(), b"A");
    }

    fn hs256_token(claims: &serde_json::Value, secret: &[u8]) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            claims,
            &jsonwebtoken::EncodingKey::from_secret(secret),
        )
        .expect("encode")
    }

    #[test]
    fn jwt_claims_verified_and_unverified() {
        let token = hs256_token(
            &serde_json::json!({"sub": "jwt-user", "tenant": 7}),
            b"s3cret",
        );
        let auth = format!("Bearer {token}");
        let verified = KeySources::new(vec![KeySource::Jwt(JwtSource {
            header: HeaderName::from_static("authorization"),
            claim: "sub".into(),
            verify: Some((DecodingKey::from_secret(b"s3cret"), Algorithm::HS256)),
        })]);
        let (u, h) = req("/", &[("authorization", &auth)]);
        assert_eq!(
            verified.extract(&u, &h).expect("ok").as_deref(),
            Some("jwt-user")
        );

        let wrong = KeySources::new(vec![KeySource::Jwt(JwtSource {
            header: HeaderName::from_static("authorization"),
            claim: "sub".into(),
            verify: Some((DecodingKey::from_secret(b"other"), Algorithm::HS256)),
        })]);
        assert!(matches!(wrong.extract(&u, &h), Err(KeyError::Jwt(_))));

        let unverified = KeySources::new(vec![KeySource::Jwt(JwtSource {
            header: HeaderName::from_static("authorization"),
            claim: "tenant".into(),
            verify: None,
        })]);
        assert_eq!(
            unverified.extract(&u, &h).expect("ok").as_deref(),
            Some("7")
        );
        let (u, h) = req("/", &[("authorization", "Bearer not-a-jwt")]);
        assert!(matches!(unverified.extract(&u, &h), Err(KeyError::Jwt(_))));
        // The scheme name is case-insensitive; a bare token is the token.
        for value in [format!("BEARER {token}"), token.clone()] {
            let (u, h) = req("/", &[("authorization", &value)]);
            assert_eq!(
                verified.extract(&u, &h).expect("ok").as_deref(),
                Some("jwt-user"),
                "{value}"
            );
        }
    }

    #[test]
    fn another_auth_scheme_is_no_jwt_and_the_next_source_is_tried() {
        let s = KeySources::new(vec![
            KeySource::Jwt(JwtSource {
                header: HeaderName::from_static("authorization"),
                claim: "sub".into(),
                verify: Some((DecodingKey::from_secret(b"s3cret"), Algorithm::HS256)),
            }),
            KeySource::Header(HeaderName::from_static("x-user-id")),
        ]);
        let (u, h) = req(
            "/",
            &[
                ("authorization", "Basic YWxpY2U6c2VjcmV0"),
                ("x-user-id", "alice"),
            ],
        );
        assert_eq!(s.extract(&u, &h).expect("ok").as_deref(), Some("alice"));
        // A Bearer token that fails verification is still refused, not skipped.
        let (u, h) = req(
            "/",
            &[("authorization", "Bearer x.y.z"), ("x-user-id", "alice")],
        );
        assert!(matches!(s.extract(&u, &h), Err(KeyError::Jwt(_))));
    }

    #[test]
    fn a_key_header_sent_twice_with_different_values_is_refused() {
        let s = KeySources::new(vec![KeySource::Header(HeaderName::from_static(
            "x-user-id",
        ))]);
        let (u, h) = req("/", &[("x-user-id", "alice"), ("x-user-id", "bob")]);
        assert!(matches!(s.extract(&u, &h), Err(KeyError::Ambiguous { .. })));
        // The same value twice names one user.
        let (u, h) = req("/", &[("x-user-id", "alice"), ("x-user-id", "alice")]);
        assert_eq!(s.extract(&u, &h).expect("ok").as_deref(), Some("alice"));
    }

    #[test]
    fn a_key_query_parameter_sent_twice_with_different_values_is_refused() {
        let s = KeySources::new(vec![
            KeySource::Cookie("uid".into()),
            KeySource::Query("uid".into()),
        ]);
        // A cookie name sent twice (paths or domains that both match): the first, the
        // most specific, as browsers order them.
        let (u, h) = req("/", &[("cookie", "uid=alice; theme=dark; uid=bob")]);
        assert_eq!(s.extract(&u, &h).expect("ok").as_deref(), Some("alice"));
        let (u, h) = req("/", &[("cookie", "uid=alice"), ("cookie", "uid=bob")]);
        assert_eq!(s.extract(&u, &h).expect("ok").as_deref(), Some("alice"));
        let (u, h) = req("/?uid=alice&x=1&uid=bob", &[]);
        let e = s.extract(&u, &h).expect_err("ambiguous");
        assert!(e.to_string().contains("query parameter uid"), "{e}");
        // The same value twice names one user.
        let (u, h) = req(
            "/?uid=alice&uid=alice",
            &[("cookie", "uid=carol; uid=carol")],
        );
        assert_eq!(s.extract(&u, &h).expect("ok").as_deref(), Some("carol"));
        let (u, h) = req("/?uid=alice&uid=al%69ce", &[]);
        assert_eq!(s.extract(&u, &h).expect("ok").as_deref(), Some("alice"));
    }

    #[test]
    fn c1_control_characters_are_refused() {
        let s = KeySources::new(vec![KeySource::Query("user".into())]);
        for q in ["/?user=a%C2%85b", "/?user=a%C2%9Fb"] {
            let (u, h) = req(q, &[]);
            assert!(
                matches!(s.extract(&u, &h), Err(KeyError::ControlChar { .. })),
                "{q}"
            );
        }
        // Other non-ASCII letters are keys like any other.
        let (u, h) = req("/?user=%C3%A9mile", &[]);
        assert_eq!(s.extract(&u, &h).expect("ok").as_deref(), Some("émile"));
    }

    proptest::proptest! {
        #[test]
        fn extraction_never_panics(path in "[ -~]{0,64}", q in "[ -~]{0,64}", cookie in "[ -~]{0,64}", hdr in proptest::collection::vec(0u8..=255, 0..300)) {
            let s = all_sources();
            let uri = format!("/{}?{}", path.replace(['?', '#', ' ', '"', '<', '>', '\\', '^', '`', '{', '|', '}'], ""), q.replace(['#', ' ', '"', '<', '>', '\\', '^', '`', '{', '|', '}'], ""));
            if let Ok(u) = uri.parse::<Uri>() {
                let mut h = HeaderMap::new();
                if let Ok(v) = HeaderValue::from_bytes(&hdr) { h.insert("x-user-id", v); }
                if let Ok(v) = HeaderValue::from_str(&cookie) { h.insert(COOKIE, v); }
                if let Ok(Some(k)) = s.extract(&u, &h) {
                    proptest::prop_assert!(k.len() <= MAX_KEY_LEN);
                    proptest::prop_assert!(!k.bytes().any(|b| b < 0x20 || b == 0x7f));
                }
            }
        }

        /// The visible-ASCII fast path for header keys answers exactly as the general
        /// rules (trim, length, control characters, UTF-8) do.
        #[test]
        fn header_fast_path_matches_the_general_rules(hdr in proptest::collection::vec(proptest::prop_oneof![16 => 0x20u8..0x7f, 2 => proptest::strategy::Just(b'\t'), 1 => 0x80u8..=0xff, 1 => 0u8..0x20], 0..270)) {
            let Ok(v) = HeaderValue::from_bytes(&hdr) else { return Ok(()) };
            let s = KeySources::new(vec![KeySource::Header(HeaderName::from_static("x-user-id"))]);
            let mut h = HeaderMap::new();
            h.insert("x-user-id", v.clone());
            let u = Uri::from_static("/");
            let got = s.extract(&u, &h);
            let trimmed = trim_bytes(v.as_bytes());
            let want = if trimmed.is_empty() { Ok(None) } else { validate_key(Cow::Borrowed(trimmed), "header").map(Some) };
            proptest::prop_assert_eq!(format!("{got:?}"), format!("{want:?}"));
        }
    }
}
