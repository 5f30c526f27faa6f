//! Request deadlines: `X-Timeout` (`250ms`, `2s`) or gRPC's `grpc-timeout` may shorten or
//! lengthen the route's default up to its cap. Malformed values are a 400, never ignored.

use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use super::headers::{Seen, GRPC_TIMEOUT, X_TIMEOUT};
use cellgate_routing::Timeouts;

/// The request's deadline budget, or a message saying which header is malformed.
pub fn budget(headers: &HeaderMap, seen: Seen, t: &Timeouts) -> Result<Duration, String> {
    let asked = if let Some(v) = seen.get(headers, Seen::TIMEOUT, X_TIMEOUT) {
        let s = v
            .to_str()
            .map_err(|_| "X-Timeout is not ASCII".to_owned())?;
        Some(
            cellgate_config::parse_duration(s)
                .filter(|d| !d.is_zero())
                .ok_or_else(|| format!("X-Timeout {s:?} is not a duration such as 250ms or 2s"))?,
        )
    } else if let Some(v) = seen.get(headers, Seen::GRPC_TIMEOUT, GRPC_TIMEOUT) {
        Some(grpc_timeout(v).ok_or_else(|| "grpc-timeout is malformed".to_owned())?)
    } else {
        None
    };
    Ok(asked.map_or(t.default, |d| d.min(t.max)))
}

/// Parse gRPC's `TimeoutValue TimeoutUnit` (at most 8 digits; H M S m u n).
fn grpc_timeout(v: &HeaderValue) -> Option<Duration> {
    let b = v.as_bytes();
    if b.len() < 2 || b.len() > 9 {
        return None;
    }
    let (digits, unit) = b.split_at(b.len() - 1);
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit[0] {
        b'H' => Duration::from_secs(n.saturating_mul(3600)),
        b'M' => Duration::from_secs(n.saturating_mul(60)),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `X-Timeout` value for a remaining budget (whole milliseconds, at least 1).
pub fn remaining_x_timeout(rem: Duration) -> HeaderValue {
    thread_local! {
        /// The last value made on this thread. Nearly every request carries the same
        /// budget (the route's default) and its first attempt leaves with all of it, so
        /// the value is shared instead of formatted and allocated per request.
        static LAST: std::cell::RefCell<Option<(u128, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    let ms = rem.as_millis();
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((m, v)) if *m == ms => v.clone(),
            _ => {
                let v = ms_value(rem, "ms");
                *last = Some((ms, v.clone()));
                v
            }
        }
    })
}

/// `grpc-timeout` value for a remaining budget.
pub fn remaining_grpc_timeout(rem: Duration) -> HeaderValue {
    ms_value(rem, "m")
}

/// Whole milliseconds (1 to 99,999,999) followed by `unit`, formatted on the stack.
fn ms_value(rem: Duration, unit: &'static str) -> HeaderValue {
    let mut n = rem.as_millis().clamp(1, 99_999_999) as u32;
    let mut buf = [0u8; 10];
    let mut i = 8;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let end = 8 + unit.len();
    buf[8..end].copy_from_slice(unit.as_bytes());
    // Digits and an ASCII unit are always a valid value; the fallback keeps the unit.
    HeaderValue::from_bytes(&buf[i..end]).unwrap_or_else(|_| match unit {
        "m" => HeaderValue::from_static("1m"),
        _ => HeaderValue::from_static("1ms"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Timeouts {
        Timeouts {
            default: Duration::from_secs(15),
            max: Duration::from_secs(60),
            connect: Duration::from_secs(1),
        }
    }

    #[test]
    fn budgets() {
        let mut h = HeaderMap::new();
        assert_eq!(
            budget(&h, Seen::scan(&h), &t()),
            Ok(Duration::from_secs(15))
        );
        h.insert(X_TIMEOUT, HeaderValue::from_static("250ms"));
        assert_eq!(
            budget(&h, Seen::scan(&h), &t()),
            Ok(Duration::from_millis(250))
        );
        h.insert(X_TIMEOUT, HeaderValue::from_static("2s"));
        assert_eq!(budget(&h, Seen::scan(&h), &t()), Ok(Duration::from_secs(2)));
        h.insert(X_TIMEOUT, HeaderValue::from_static("300s"));
        assert_eq!(
            budget(&h, Seen::scan(&h), &t()),
            Ok(Duration::from_secs(60))
        );
        h.insert(X_TIMEOUT, HeaderValue::from_static("soon"));
        assert!(budget(&h, Seen::scan(&h), &t()).is_err());
        h.insert(X_TIMEOUT, HeaderValue::from_static("0ms"));
        assert!(budget(&h, Seen::scan(&h), &t()).is_err());
        let mut g = HeaderMap::new();
        g.insert(GRPC_TIMEOUT, HeaderValue::from_static("1500m"));
        assert_eq!(
            budget(&g, Seen::scan(&g), &t()),
            Ok(Duration::from_millis(1500))
        );
        g.insert(GRPC_TIMEOUT, HeaderValue::from_static("2H"));
        assert_eq!(
            budget(&g, Seen::scan(&g), &t()),
            Ok(Duration::from_secs(60))
        );
        g.insert(GRPC_TIMEOUT, HeaderValue::from_static("123456789S"));
        assert!(budget(&g, Seen::scan(&g), &t()).is_err());
    }

    #[test]
    fn remaining_formats() {
        assert_eq!(remaining_x_timeout(Duration::from_micros(1500)), "1ms");
        assert_eq!(remaining_x_timeout(Duration::from_millis(2400)), "2400ms");
        // The value shared between requests of one budget never answers for another.
        for ms in [2400u64, 2400, 15000, 2400, 7, 7, 15000] {
            assert_eq!(
                remaining_x_timeout(Duration::from_millis(ms)),
                format!("{ms}ms").as_str()
            );
        }
        assert_eq!(remaining_grpc_timeout(Duration::from_millis(70)), "70m");
        assert_eq!(remaining_x_timeout(Duration::ZERO), "1ms");
        assert_eq!(
            remaining_x_timeout(Duration::from_secs(1 << 40)),
            "99999999ms"
        );
        assert_eq!(remaining_grpc_timeout(Duration::from_millis(10)), "10m");
    }
}
