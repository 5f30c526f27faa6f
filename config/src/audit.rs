//! The audit record: one line of the audit log, the same in etcd (`audit/<time>-<txid>`)
//! and in the local append-only file.
//!
//! What it is for: saying who changed what, when, from what to what, and how long it took,
//! for every admin mutation (dry runs included, flagged) and every automatic switch.
//! It must never hold secrets (tokens are named, never stored).

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One audit event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// `<unix ms, 20 digits>-<16 hex>`: sorts by time; the etcd key's last part.
    pub id: String,
    /// RFC 3339 UTC time.
    pub time: String,
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// Who: the admin token's name, or `gateway:<id>` for automatic actions.
    pub actor: String,
    /// What: `drain`, `switch`, `restore`, `weight`, `slots_move`, `rebalance`,
    /// `config_push`, `failover`, ...
    pub action: String,
    /// The cell (or other object) acted on, if one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The request as given (body and flags).
    #[serde(default)]
    pub request: serde_json::Value,
    /// The changed documents before (`{"cells/bj-1": {...}}`; `null` for a new one).
    #[serde(default)]
    pub before: serde_json::Value,
    /// The changed documents after.
    #[serde(default)]
    pub after: serde_json::Value,
    /// The plan: slots moved, share of traffic moved, cells affected.
    #[serde(default)]
    pub plan: serde_json::Value,
    /// A dry run: nothing was changed.
    pub dry_run: bool,
    /// How long the action took, in milliseconds.
    pub duration_ms: f64,
    /// The gateway that carried it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// The table version the change was planned against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_version: Option<u64>,
    /// The store revision that recorded it (filled in when read back from etcd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
}

impl AuditRecord {
    /// A record stamped now, with a fresh id.
    pub fn new(actor: impl Into<String>, action: impl Into<String>) -> Self {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self {
            id: format!("{unix_ms:020}-{:016x}", fastrand_u64()),
            time: rfc3339(unix_ms),
            unix_ms,
            actor: actor.into(),
            action: action.into(),
            target: None,
            request: serde_json::Value::Null,
            before: serde_json::Value::Null,
            after: serde_json::Value::Null,
            plan: serde_json::Value::Null,
            dry_run: false,
            duration_ms: 0.0,
            gateway: None,
            base_version: None,
            revision: None,
        }
    }
}

/// A random u64 without another dependency: std's randomly seeded hasher.
fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// `unix_ms` as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days since the Unix epoch → proleptic Gregorian year, month, day (the standard
    // era-based civil-from-days conversion).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        unix_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_700_000_000_000), "2023-11-14T22:13:20.000Z");
    }

    #[test]
    fn ids_sort_by_time_and_differ() {
        let a = AuditRecord::new("admin", "drain");
        let b = AuditRecord::new("admin", "drain");
        assert_ne!(a.id, b.id);
        assert_eq!(a.id.len(), 37);
        assert!(a.id[..20] <= b.id[..20]);
    }
}
