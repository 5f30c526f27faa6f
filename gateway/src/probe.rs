//! Active probes of the gateway: one task per cell probes every instance of the cell at the
//! configured interval (with jitter) — an L4 TCP connect or the L7 business probe
//! `GET /healthz?cell=<id>` whose JSON body of watermarks lowers the instance's score — and
//! records the verdict in the instance's health. A task ends when its cell leaves the table
//! or the runtime stops. Never touches the request path.
//!
//! The business probe reaches an instance the way live traffic does: over the cell's
//! upstream TLS when it has a `tls:` section (its CA, name and SNI, opened by the data
//! path's [`connect::open`]), and in the cell's upstream protocol — HTTP/2 (h2c, or h2 over
//! TLS) for an `h2c` cell, HTTP/1.1 for `http1` and `auto` cells (what `auto` uses for all
//! but gRPC). Each probe opens its own connection and closes it when done; it never borrows
//! from the workers' connection pools. The probe timeout bounds the whole check: connect,
//! TLS handshake, request and response body.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellgate_health::probe::{next_delay, Probe, ProbeResult, TcpProbe};
use cellgate_health::{now_ms, score::watermark_score, ProbeKind};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;

use crate::proxy::connect;
use crate::server::Shared;
use crate::tls::UpstreamTls;

/// Largest probe response body read for watermarks.
const MAX_BODY: usize = 64 * 1024;

/// L7 business probe: `GET <path>?cell=<id>`; 200 is up; numbers in a JSON object body are
/// watermarks. Spoken over the cell's upstream TLS and protocol (see the module docs).
#[derive(Clone, Debug)]
pub struct HttpProbe {
    /// Request path.
    pub path: String,
    /// HTTP/2 (with prior knowledge in plaintext, by ALPN `h2` over TLS) instead of HTTP/1.1.
    pub h2: bool,
    /// The cell's upstream TLS; plaintext when `None`.
    pub tls: Option<UpstreamTls>,
}

impl Probe for HttpProbe {
    fn check<'a>(
        &'a self,
        cell: &'a str,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Pin<Box<dyn std::future::Future<Output = ProbeResult> + Send + 'a>> {
        Box::pin(async move {
            let start = Instant::now();
            match tokio::time::timeout(timeout, self.http_check(cell, addr, timeout)).await {
                Ok(Some(watermarks)) => ProbeResult {
                    up: true,
                    rtt: Some(start.elapsed()),
                    watermarks,
                },
                _ => ProbeResult::default(),
            }
        })
    }
}

impl HttpProbe {
    /// One probe: the watermarks on a 200, `None` on anything else.
    async fn http_check(
        &self,
        cell: &str,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Option<Vec<(String, f64)>> {
        let stream = connect::open(addr, timeout, self.tls.as_ref(), self.h2)
            .await
            .ok()?;
        let io = TokioIo::new(stream);
        let path = format!("{}?cell={cell}", self.path);
        let authority = self.authority(addr);
        // The connection's task is aborted when this check ends (answer, failure or the
        // timeout dropping it), which closes an HTTP/1.1 connection at once; an HTTP/2 one,
        // whose I/O hyper drives on a task of its own, then resets its stream and shuts down.
        let mut conn_task = tokio::task::JoinSet::new();
        let res = if self.h2 {
            let (mut tx, conn) = http2::handshake::<_, _, Empty<Bytes>>(TokioExecutor::new(), io)
                .await
                .ok()?;
            conn_task.spawn(conn);
            let scheme = if self.tls.is_some() { "https" } else { "http" };
            let req = http::Request::get(format!("{scheme}://{authority}{path}"))
                .header(http::header::USER_AGENT, "cellgate-probe")
                .body(Empty::new())
                .ok()?;
            tx.send_request(req).await.ok()?
        } else {
            let (mut tx, conn) = http1::handshake::<_, Empty<Bytes>>(io).await.ok()?;
            conn_task.spawn(conn);
            let req = http::Request::get(path)
                .header(http::header::HOST, authority)
                .header(http::header::USER_AGENT, "cellgate-probe")
                .body(Empty::new())
                .ok()?;
            tx.send_request(req).await.ok()?
        };
        watermarks(res).await
    }

    /// `Host` (HTTP/1.1) or `:authority` (HTTP/2): the cell's TLS server name when it names
    /// one, the instance's address otherwise.
    fn authority(&self, addr: SocketAddr) -> String {
        match self.tls.as_ref().and_then(|t| t.server_name.as_ref()) {
            Some(ServerName::DnsName(n)) => format!("{}:{}", n.as_ref(), addr.port()),
            _ => addr.to_string(),
        }
    }
}

/// The numbers in a 200 response's JSON object body; `None` for any other status or a body
/// that cannot be read.
async fn watermarks(res: http::Response<Incoming>) -> Option<Vec<(String, f64)>> {
    if res.status() != http::StatusCode::OK {
        return None;
    }
    let body = Limited::new(res.into_body(), MAX_BODY)
        .collect()
        .await
        .ok()?
        .to_bytes();
    let mut marks = Vec::new();
    if let Ok(serde_json::Value::Object(m)) = serde_json::from_slice::<serde_json::Value>(&body) {
        for (k, v) in m {
            if let Some(x) = v.as_f64() {
                marks.push((k, x));
            }
        }
    }
    Some(marks)
}

/// Probe every instance of `cell` until it leaves the table.
pub async fn probe_cell(shared: Arc<Shared>, cell: Arc<str>) {
    loop {
        let table = shared.table.load_full();
        let Some(ci) = table.cell_idx(&cell) else {
            return;
        };
        let Some(c) = table.cell(ci) else { return };
        let p = table.health_policy().clone();
        let probe: Arc<dyn Probe> = match p.probe.kind {
            ProbeKind::Tcp => Arc::new(TcpProbe),
            ProbeKind::Http => Arc::new(HttpProbe {
                path: p.probe.path.clone(),
                // Not gRPC: what the data path uses for ordinary requests to this cell.
                h2: c.protocol.uses_h2(false).unwrap_or(false),
                tls: shared.upstream_tls.load().get(&c.id).cloned(),
            }),
        };
        let mut set = tokio::task::JoinSet::new();
        for inst in &c.instances {
            let (probe, cell, addr, health, timeout) = (
                Arc::clone(&probe),
                Arc::clone(&cell),
                inst.addr,
                Arc::clone(&inst.health),
                p.probe.timeout,
            );
            let p = p.clone();
            let name = Arc::clone(&inst.name);
            set.spawn(async move {
                let r = probe.check(&cell, addr, timeout).await;
                let score = watermark_score(&r.watermarks, &p.probe.watermarks, p.probe.floor);
                let rtt = r.rtt.map(|d| d.as_micros() as u64);
                if let Some(up) = health.record_probe(now_ms(), r.up, rtt, score, &p) {
                    tracing::warn!(cell = %cell, instance = %name, %addr, up, "probe verdict changed");
                }
            });
        }
        while set.join_next().await.is_some() {}
        drop(table);
        tokio::time::sleep(next_delay(
            p.probe.interval,
            p.probe.jitter,
            fastrand::f64(),
        ))
        .await;
    }
}
