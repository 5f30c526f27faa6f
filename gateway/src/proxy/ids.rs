//! Request ids and W3C trace context: keep what the client sent when it is well formed,
//! otherwise start new ones.

use http::HeaderValue;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The low `out.len() / 2` bytes of `v` as lowercase hex, most significant first (`out` has
/// an even length of at most 32). Four bytes at a time in one word (ids are made for every
/// request); a tail of fewer than four bytes a byte at a time.
fn hex_into(out: &mut [u8], v: u128) {
    debug_assert!(out.len().is_multiple_of(2) && out.len() <= 32);
    let bytes = v.to_be_bytes();
    let src = &bytes[16 - out.len() / 2..];
    let mut outs = out.chunks_exact_mut(8);
    let mut ins = src.chunks_exact(4);
    for (o, i) in (&mut outs).zip(&mut ins) {
        o.copy_from_slice(&hex8(u32::from_be_bytes([i[0], i[1], i[2], i[3]])));
    }
    for (pair, b) in outs
        .into_remainder()
        .chunks_exact_mut(2)
        .zip(ins.remainder())
    {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
}

/// `x` as 8 lowercase hex digits, most significant first.
fn hex8(x: u32) -> [u8; 8] {
    // One nibble per byte, most significant nibble in the top byte: spread the 4 bytes to
    // 16-bit lanes, then each byte's high nibble to its lane's top byte.
    let mut t = u64::from(x);
    t = ((t & 0xffff_0000) << 16) | (t & 0x0000_ffff);
    t = ((t & 0x0000_ff00_0000_ff00) << 8) | (t & 0x0000_00ff_0000_00ff);
    t = ((t & 0x00f0_00f0_00f0_00f0) << 4) | (t & 0x000f_000f_000f_000f);
    // Nibble n to ASCII: '0' + n, plus the gap to 'a' when n > 9 (then n + 6 reaches 16).
    let letters = ((t + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    (t + 0x3030_3030_3030_3030 + letters * 0x27).to_be_bytes()
}

/// Whether an inbound request id is kept: 1–128 visible ASCII characters.
fn keeps_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

const REQUEST_ID_FALLBACK: &str = "0";
const TRACEPARENT_FALLBACK: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The inbound request id when it is 1–128 visible ASCII characters, else a new one
/// (32 lowercase hex digits).
pub fn request_id(inbound: Option<&HeaderValue>) -> HeaderValue {
    if let Some(v) = inbound.filter(|v| keeps_request_id(v)) {
        return v.clone();
    }
    let mut buf = [0u8; 32];
    hex_into(&mut buf, fastrand::u128(1..));
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static(REQUEST_ID_FALLBACK))
}

/// [`request_id`] and the `traceparent` to send upstream (see `traceparent_into`) for one
/// proxied request, made in one allocation that both values share: each is copied into the
/// upstream request and the id into the answer, and copies of a shared value only count
/// references (a value in an allocation of its own is moved to a shared one when first
/// copied: a second allocation).
pub fn request_ids(
    inbound_id: Option<&HeaderValue>,
    inbound_traceparent: Option<&HeaderValue>,
) -> (HeaderValue, HeaderValue) {
    let mut buf = [0u8; 32 + 55];
    let (id, tp) = buf.split_at_mut(32);
    let kept = inbound_id.filter(|v| keeps_request_id(v)).cloned();
    if kept.is_none() {
        hex_into(id, fastrand::u128(1..));
    }
    traceparent_into(tp, inbound_traceparent);
    let shared = bytes::Bytes::from_owner(buf);
    let id = kept.unwrap_or_else(|| {
        HeaderValue::from_maybe_shared(shared.slice(..32))
            .unwrap_or_else(|_| HeaderValue::from_static(REQUEST_ID_FALLBACK))
    });
    let tp = HeaderValue::from_maybe_shared(shared.slice(32..))
        .unwrap_or_else(|_| HeaderValue::from_static(TRACEPARENT_FALLBACK));
    (id, tp)
}

/// `v` marked never-indexed for HPACK (RFC 7541 §7.1.3). For values unique to one request
/// (request ids, trace context): indexing them would only churn an HTTP/2 connection's
/// dynamic table, each insert evicting entries that later messages could have reused.
/// HTTP/1.1 writes the value as usual.
pub fn unindexed(v: &HeaderValue) -> HeaderValue {
    let mut v = v.clone();
    v.set_sensitive(true);
    v
}

fn is_lower_hex(b: &[u8]) -> bool {
    b.iter()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

/// `(trace id, parent/span id)` of a well-formed `traceparent`.
pub fn traceparent_ids(v: &HeaderValue) -> Option<(&str, &str)> {
    let s = v.to_str().ok()?;
    let b = s.as_bytes();
    (b.len() >= 55
        && b[2] == b'-'
        && b[35] == b'-'
        && b[52] == b'-'
        && is_lower_hex(&b[3..35])
        && is_lower_hex(&b[36..52]))
    .then(|| (&s[3..35], &s[36..52]))
}

/// Write the `traceparent` to send upstream into `out` (55 bytes): the inbound trace
/// continued with a new parent id (this hop's span), or a new sampled trace.
fn traceparent_into(out: &mut [u8], inbound: Option<&HeaderValue>) {
    // version(2) - trace-id(32) - parent-id(16) - flags(2)
    out.copy_from_slice(b"00-00000000000000000000000000000000-0000000000000000-01");
    let mut continued = false;
    if let Some(v) = inbound {
        let b = v.as_bytes();
        if b.len() >= 55
            && b[2] == b'-'
            && b[35] == b'-'
            && b[52] == b'-'
            && is_lower_hex(&b[0..2])
            && &b[0..2] != b"ff"
            && is_lower_hex(&b[3..35])
            && is_lower_hex(&b[36..52])
            && is_lower_hex(&b[53..55])
            && b[3..35].iter().any(|&c| c != b'0')
            && b[36..52].iter().any(|&c| c != b'0')
            && (b.len() == 55 || (b[0..2] != *b"00" && b[55] == b'-'))
        {
            out[3..35].copy_from_slice(&b[3..35]);
            out[53..55].copy_from_slice(&b[53..55]);
            continued = true;
        }
    }
    if !continued {
        hex_into(&mut out[3..35], fastrand::u128(1..));
    }
    hex_into(&mut out[36..52], u128::from(fastrand::u64(1..)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_digits_most_significant_first() {
        let mut out = [0u8; 32];
        hex_into(&mut out, 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        assert_eq!(&out, b"0123456789abcdeffedcba9876543210");
        let mut out = [0u8; 16];
        hex_into(&mut out, u128::from(0x00f0_67aa_0ba9_02b7u64));
        assert_eq!(&out, b"00f067aa0ba902b7");
        let mut out = [0u8; 4];
        hex_into(&mut out, 0xffff_abcd);
        assert_eq!(&out, b"abcd", "only the low bytes that fit");
    }

    #[test]
    fn hex_matches_the_formatter() {
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..2000 {
            let v = rng.u128(..);
            for len in (2..=32).step_by(2) {
                let mut out = [0u8; 32];
                hex_into(&mut out[..len], v);
                let want = format!("{v:032x}");
                assert_eq!(&out[..len], &want.as_bytes()[32 - len..], "{v:x} {len}");
            }
        }
        assert_eq!(&hex8(0x09af_50ff), b"09af50ff");
    }

    #[test]
    fn request_id_kept_or_made() {
        let v = HeaderValue::from_static("abc-123");
        assert_eq!(request_id(Some(&v)), v);
        let made = request_id(None);
        assert_eq!(made.len(), 32);
        assert_ne!(made, request_id(None));
        let bad = HeaderValue::from_static("has space");
        assert_ne!(request_id(Some(&bad)), bad);
    }

    #[test]
    fn request_ids_made_together_read_as_made_apart() {
        let inbound_id = HeaderValue::from_static("abc-123");
        let inbound_tp =
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let (id, tp) = request_ids(Some(&inbound_id), Some(&inbound_tp));
        assert_eq!(id, inbound_id);
        assert_eq!(&tp.as_bytes()[..36], &inbound_tp.as_bytes()[..36]);
        assert_ne!(tp, inbound_tp, "a new parent id");
        let (id, tp) = request_ids(Some(&HeaderValue::from_static("has space")), None);
        assert_eq!(id.len(), 32);
        assert!(id.as_bytes().iter().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(tp.len(), 55);
        assert!(traceparent_ids(&tp).is_some(), "{tp:?}");
        let (id2, tp2) = request_ids(None, None);
        assert_ne!((id, tp), (id2, tp2));
    }

    #[test]
    fn traceparent_continued_or_started() {
        let inbound =
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let (_, out) = request_ids(None, Some(&inbound));
        let s = out.to_str().expect("ascii");
        assert_eq!(&s[..36], "00-4bf92f3577b34da6a3ce929d0e0e4736-");
        assert_ne!(&s[36..52], "00f067aa0ba902b7");
        assert!(s.ends_with("-01"));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "garbage",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            let (_, out) = request_ids(None, Some(&HeaderValue::from_static(bad)));
            let s = out.to_str().expect("ascii");
            assert_eq!(s.len(), 55);
            assert_ne!(&s[3..35], "4bf92f3577b34da6a3ce929d0e0e4736");
        }
    }
}
