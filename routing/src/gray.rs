//! Gray (canary) rules: which requests carry a gray tag. A rule's conditions are ANDed:
//! the key is in its allow-list or in its stable percentage (when either is given), the
//! request's cell is in its regions (when given), a header matches (when given). The
//! percentage hashes the key with a per-rule seed, so a user stays in or out of a rule.

use std::collections::HashSet;
use std::sync::Arc;

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// A gray rule as given to the table builder.
#[derive(Clone, Debug, Default)]
pub struct GraySpec {
    /// Rule name (unique).
    pub name: String,
    /// Tag given to matching requests.
    pub tag: String,
    /// Switched on.
    pub enabled: bool,
    /// Keys always in the rule.
    pub keys: Vec<String>,
    /// Share of keys in the rule, 0–100, two decimals honoured.
    pub percent: Option<f64>,
    /// Regions the rule applies in.
    pub regions: Vec<String>,
    /// Header that must be present with this exact value.
    pub header: Option<(String, String)>,
    /// Automatic switch-off.
    pub guard: Option<GrayGuard>,
}

/// When a rule switches itself off: its tagged instances do worse than the untagged ones of
/// the same cells by more than these deltas.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GrayGuard {
    /// Error ratio delta.
    pub max_error_delta: f64,
    /// p95 latency delta in ms.
    pub max_p95_delta_ms: Option<u64>,
    /// Requests to tagged instances in the window before judging.
    pub min_requests: u64,
}

/// What a rule matches on (built form).
#[derive(Clone, Debug)]
pub struct GrayMatch {
    keys: HashSet<Box<str>>,
    basis_points: Option<u32>,
    seed: u64,
    regions: Vec<u16>,
    header: Option<(HeaderName, HeaderValue)>,
}

/// A built gray rule.
#[derive(Clone, Debug)]
pub struct GrayRule {
    /// Rule name.
    pub name: Arc<str>,
    /// Tag.
    pub tag: Arc<str>,
    /// Tag as header value.
    pub tag_header: HeaderValue,
    /// Switched on.
    pub enabled: bool,
    /// Conditions.
    pub when: GrayMatch,
    /// Automatic switch-off.
    pub guard: Option<GrayGuard>,
}

impl GrayRule {
    pub(crate) fn from_spec(spec: GraySpec, regions: &[Arc<str>]) -> Result<Self, String> {
        if spec.name.is_empty() {
            return Err("name: empty".into());
        }
        let tag_header = HeaderValue::from_str(&spec.tag)
            .ok()
            .filter(|_| !spec.tag.is_empty())
            .ok_or("tag: must be non-empty visible ASCII")?;
        let basis_points = match spec.percent {
            None => None,
            Some(p) if (0.0..=100.0).contains(&p) => Some((p * 100.0).round() as u32),
            Some(p) => return Err(format!("percent: {p} is outside 0-100")),
        };
        let mut region_idx = Vec::new();
        for r in &spec.regions {
            let i = regions
                .iter()
                .position(|x| &**x == r)
                .ok_or_else(|| format!("regions: unknown region {r:?}"))?;
            region_idx.push(i as u16);
        }
        let header = match spec.header {
            None => None,
            Some((n, v)) => Some((
                HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| format!("header: invalid name {n:?}"))?,
                HeaderValue::from_str(&v).map_err(|_| format!("header: invalid value {v:?}"))?,
            )),
        };
        if spec.keys.is_empty()
            && basis_points.is_none()
            && region_idx.is_empty()
            && header.is_none()
        {
            return Err("needs at least one of keys, percent, regions, header".into());
        }
        Ok(Self {
            name: spec.name.as_str().into(),
            tag: spec.tag.as_str().into(),
            tag_header,
            enabled: spec.enabled,
            guard: spec.guard,
            when: GrayMatch {
                keys: spec.keys.into_iter().map(String::into_boxed_str).collect(),
                basis_points,
                seed: xxh3_64(spec.name.as_bytes()),
                regions: region_idx,
                header,
            },
        })
    }

    /// Whether this rule tags a request with `key` served in `region`.
    pub fn matches(&self, key: Option<&str>, region: u16, headers: &HeaderMap) -> bool {
        if !self.enabled {
            return false;
        }
        let w = &self.when;
        if !w.keys.is_empty() || w.basis_points.is_some() {
            let Some(key) = key else { return false };
            let listed = w.keys.contains(key);
            let in_share = w.basis_points.is_some_and(|bp| {
                (xxh3_64_with_seed(key.as_bytes(), w.seed) % 10_000) < u64::from(bp)
            });
            if !listed && !in_share {
                return false;
            }
        }
        if !w.regions.is_empty() && !w.regions.contains(&region) {
            return false;
        }
        if let Some((n, v)) = &w.header {
            if headers.get(n) != Some(v) {
                return false;
            }
        }
        true
    }
}
