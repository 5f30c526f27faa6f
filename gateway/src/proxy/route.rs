//! Phases *key* and *decide*: take and validate the routing key, honour a trusted forced
//! cell, decide the serving cell from the table snapshot, and choose the gray tag.

use cellgate_routing::{CellIdx, DecideError, Decision, RouteInput, RoutingTable};
use http::{HeaderMap, HeaderValue, Uri};

use super::error::ProxyError;
use super::headers::{Seen, X_CELL_ID, X_GRAY_TAG, X_REGION_HINT};
use super::ConnInfo;

/// The outcome of routing a request.
#[derive(Debug)]
pub struct Routed {
    /// The decision.
    pub decision: Decision,
    /// The gray tag, if any (as sent upstream).
    pub gray: Option<HeaderValue>,
    /// The routing key, kept only when the chosen cell picks its instance by key
    /// (key affinity), so it is not extracted (a JWT not verified) again per attempt.
    pub affinity_key: Option<Box<str>>,
}

impl Routed {
    /// The serving cell.
    pub fn cell(&self) -> CellIdx {
        self.decision.cell
    }
}

/// Route one request on `table`.
pub fn route(
    table: &RoutingTable,
    conn: &ConnInfo,
    uri: &Uri,
    headers: &HeaderMap,
    seen: Seen,
    now_ms: u64,
) -> Result<Routed, ProxyError> {
    let trusted = conn.trusted(table);
    let forced_cell = match seen.get(headers, Seen::CELL_ID, X_CELL_ID) {
        Some(v) if trusted => {
            let id = v.to_str().unwrap_or_default();
            Some(table.cell_idx(id).ok_or_else(|| {
                ProxyError::BadRequest(format!("X-Cell-ID names unknown cell {id:?}"))
            })?)
        }
        _ => None,
    };
    let key = table
        .key_sources()
        .extract(uri, headers)
        .map_err(|e| ProxyError::BadRequest(e.to_string()))?;
    let input = RouteInput {
        key: key.as_deref(),
        region_hint: seen
            .get(headers, Seen::REGION_HINT, X_REGION_HINT)
            .and_then(|v| v.to_str().ok()),
        client_ip: Some(conn.peer.ip()),
        forced_cell,
        now_ms,
        spread: if key.is_none() { fastrand::u64(..) } else { 0 },
        avoid: None,
    };
    let decision = table.decide(&input).map_err(|e| match e {
        DecideError::MissingKey => ProxyError::BadRequest(
            "no routing key: send it in one of the configured key sources (default header X-User-ID)".into(),
        ),
        DecideError::NoServingCell { .. } | DecideError::NoCellAnywhere => ProxyError::NoHealthyCell(e.to_string()),
    })?;
    let gray = match seen.get(headers, Seen::GRAY_TAG, X_GRAY_TAG) {
        Some(v) if trusted && !v.is_empty() => Some(v.clone()),
        _ => table
            .gray_rule(key.as_deref(), decision.cell, headers)
            .map(|r| r.tag_header.clone()),
    };
    let affinity_key = match (&key, table.cell(decision.cell)) {
        (Some(k), Some(c)) if c.ring.is_some() => Some(Box::from(&**k)),
        _ => None,
    };
    Ok(Routed {
        decision,
        gray,
        affinity_key,
    })
}

/// The gray tag as text, for instance selection.
pub fn tag_str(gray: &Option<HeaderValue>) -> Option<&str> {
    gray.as_ref().and_then(|v| v.to_str().ok())
}
