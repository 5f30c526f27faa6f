//! Active probes of the gateway: one task per cell probes every instance of the cell at the
//! configured interval (with jitter) — an L4 TCP connect or the L7 business probe
//! `GET /healthz?cell=<id>` whose JSON body of watermarks lowers the instance's score — and
//! records the verdict in the instance's health. A task ends when its cell leaves the table
//! or the runtime stops. Never touches the request path.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellgate_health::probe::{next_delay, Probe, ProbeResult, TcpProbe};
use cellgate_health::{now_ms, score::watermark_score, ProbeKind};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;

use crate::server::Shared;

/// L7 business probe: `GET <path>?cell=<id>`; 200 is up; numbers in a JSON object body are
/// watermarks.
#[derive(Clone, Debug)]
pub struct HttpProbe {
    /// Request path.
    pub path: String,
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
            match tokio::time::timeout(timeout, http_check(&self.path, cell, addr)).await {
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

async fn http_check(path: &str, cell: &str, addr: SocketAddr) -> Option<Vec<(String, f64)>> {
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get(format!("{path}?cell={cell}"))
        .header(http::header::HOST, addr.to_string())
        .header(http::header::USER_AGENT, "cellgate-probe")
        .body(Empty::new())
        .ok()?;
    let res = tx.send_request(req).await.ok()?;
    if res.status() != http::StatusCode::OK {
        return None;
    }
    let body = Limited::new(res.into_body(), 64 * 1024)
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
