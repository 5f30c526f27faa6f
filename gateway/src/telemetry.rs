//! OpenTelemetry traces over OTLP/HTTP (JSON encoding), when an endpoint is configured.
//! Each proxied request is one server span: the trace id and parent come from the client's
//! `traceparent` (or a new trace), the span id is the one sent upstream as this hop's parent.
//! Spans go into a bounded queue without blocking (dropped and counted when it is full) and
//! one background task exports them in batches. Nothing here runs when no endpoint is set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

/// One finished server span.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits: this hop's span.
    pub span_id: String,
    /// 16 hex digits: the client's span, when it sent a `traceparent`.
    pub parent_span_id: Option<String>,
    /// HTTP method.
    pub method: String,
    /// Response status.
    pub status: u16,
    /// Serving cell, if any.
    pub cell: Option<String>,
    /// Request id.
    pub request_id: String,
    /// Start, Unix nanoseconds.
    pub start_ns: u128,
    /// End, Unix nanoseconds.
    pub end_ns: u128,
}

/// Where and how spans are exported.
#[derive(Debug)]
pub struct Exporter {
    tx: mpsc::Sender<SpanRecord>,
    /// Spans dropped because the queue was full.
    pub dropped: AtomicU64,
}

/// Unix time in nanoseconds.
pub fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

impl Exporter {
    /// An exporter to `endpoint` (e.g. `http://127.0.0.1:4318/v1/traces`) for `service`, and
    /// the task that must be spawned to run it.
    pub fn new(endpoint: String, service: String) -> (Self, impl std::future::Future<Output = ()>) {
        let (tx, rx) = mpsc::channel(8192);
        (
            Self {
                tx,
                dropped: AtomicU64::new(0),
            },
            export_loop(rx, endpoint, service),
        )
    }

    /// Queue a span; never blocks.
    pub fn submit(&self, span: SpanRecord) {
        if self.tx.try_send(span).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn attr_str(k: &str, v: &str) -> serde_json::Value {
    serde_json::json!({"key": k, "value": {"stringValue": v}})
}

/// The OTLP/HTTP JSON body for a batch of spans.
pub fn encode(service: &str, spans: &[SpanRecord]) -> serde_json::Value {
    let spans: Vec<serde_json::Value> = spans
        .iter()
        .map(|s| {
            let mut attrs = vec![
                attr_str("http.request.method", &s.method),
                serde_json::json!({"key": "http.response.status_code", "value": {"intValue": s.status.to_string()}}),
                attr_str("cellgate.request_id", &s.request_id),
            ];
            if let Some(c) = &s.cell {
                attrs.push(attr_str("cellgate.cell", c));
            }
            let mut span = serde_json::json!({
                "traceId": s.trace_id,
                "spanId": s.span_id,
                "name": format!("{} proxy", s.method),
                "kind": 2,
                "startTimeUnixNano": s.start_ns.to_string(),
                "endTimeUnixNano": s.end_ns.to_string(),
                "attributes": attrs,
                "status": {"code": if s.status >= 500 { 2 } else { 0 }},
            });
            if let Some(p) = &s.parent_span_id {
                span["parentSpanId"] = serde_json::Value::String(p.clone());
            }
            span
        })
        .collect();
    serde_json::json!({
        "resourceSpans": [{
            "resource": {"attributes": [attr_str("service.name", service)]},
            "scopeSpans": [{"scope": {"name": "cellgate", "version": env!("CARGO_PKG_VERSION")}, "spans": spans}],
        }]
    })
}

async fn export_loop(mut rx: mpsc::Receiver<SpanRecord>, endpoint: String, service: String) {
    let Ok(uri) = endpoint.parse::<http::Uri>() else {
        tracing::error!(%endpoint, "OTLP endpoint is not a URL; traces are not exported");
        return;
    };
    let mut batch = Vec::with_capacity(512);
    loop {
        let first = match rx.recv().await {
            Some(s) => s,
            None => return,
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while batch.len() < 512 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let body = encode(&service, &batch).to_string();
        if let Err(e) = post(&uri, body).await {
            tracing::warn!(%endpoint, spans = batch.len(), error = %e, "OTLP export failed; spans dropped");
        }
        batch.clear();
    }
}

async fn post(uri: &http::Uri, body: String) -> Result<(), String> {
    let host = uri.host().ok_or("no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    .map_err(|_| "connect timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::post(uri.path())
        .header(
            http::header::HOST,
            uri.authority().map_or(host, |a| a.as_str()),
        )
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let res = tokio::time::timeout(Duration::from_secs(5), tx.send_request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = res.status();
    // A receiver that sends a head and then stalls must not hold the exporter (and so every
    // later span) forever.
    let _ = tokio::time::timeout(Duration::from_secs(5), res.into_body().collect()).await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("receiver answered {status}"))
    }
}
