//! `cellgate upstream`: one demo upstream instance. Every request gets 200 and a JSON echo
//! `{"cell", "instance", "method", "path", "headers"}`; `GET /healthz?cell=<id>` answers
//! 200 with JSON watermarks; `POST /fault` injects faults (error rate and status, delay,
//! refused connections for a while, watermark values), `{}` clears them.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Faults an instance is told to show.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Share of requests answered with `status` (0–1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    /// Status of injected errors (default 503).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Delay before every answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// Close the listener (and open connections) for this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refuse_for_s: Option<f64>,
    /// Watermark reported by `/healthz`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_pool_usage: Option<f64>,
    /// Watermark reported by `/healthz`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_backlog: Option<u64>,
}

struct State {
    cell: String,
    name: String,
    faults: Mutex<Faults>,
    /// Bumped to refuse: the accept loop closes the listener and open connections.
    refuse: watch::Sender<Option<Duration>>,
}

/// Bind a listener for an upstream (address reuse on, so a refusal can reopen it).
pub fn bind(addr: &str) -> std::io::Result<std::net::TcpListener> {
    let sa: SocketAddr = addr.parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr:?} is not ip:port"),
        )
    })?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(sa),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&sa.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Serve as instance `name` of `cell` on `listener` until the task is dropped.
pub async fn serve(
    listener: std::net::TcpListener,
    cell: String,
    name: String,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let (refuse, mut refuse_rx) = watch::channel(None);
    let state = Arc::new(State {
        cell,
        name,
        faults: Mutex::new(Faults::default()),
        refuse,
    });
    let mut listener = Some(tokio::net::TcpListener::from_std(listener)?);
    let (close_conns, _) = tokio::sync::broadcast::channel::<()>(1);
    loop {
        let Some(l) = listener.as_ref() else {
            // Refusing: wait, then reopen.
            let wait = (*refuse_rx.borrow_and_update()).unwrap_or_default();
            tokio::time::sleep(wait).await;
            loop {
                match bind(&addr.to_string()).and_then(tokio::net::TcpListener::from_std) {
                    Ok(l) => {
                        listener = Some(l);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "cannot reopen listener; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            tracing::info!(%addr, "accepting connections again");
            continue;
        };
        tokio::select! {
            accepted = l.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let state = Arc::clone(&state);
                let mut closed = close_conns.subscribe();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(Arc::clone(&state), req));
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = closed.recv() => {}
                    }
                });
            }
            changed = refuse_rx.changed() => {
                if changed.is_err() { return Ok(()); }
                if refuse_rx.borrow().is_some() {
                    listener = None;
                    let _ = close_conns.send(());
                    tracing::info!(%addr, "refusing connections");
                }
            }
        }
    }
}

fn json(status: StatusCode, v: &impl Serialize) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(v).unwrap_or_default(),
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(json(
                StatusCode::PAYLOAD_TOO_LARGE,
                &serde_json::json!({"error": "body over 1 MiB"}),
            ))
        }
    };
    let faults = match state.faults.lock() {
        Ok(f) => f.clone(),
        Err(p) => p.into_inner().clone(),
    };
    match (&parts.method, parts.uri.path()) {
        (&Method::POST, "/fault") => {
            let text = if body.is_empty() {
                &b"{}"[..]
            } else {
                &body[..]
            };
            let new: Faults = match serde_json::from_slice(text) {
                Ok(f) => f,
                Err(e) => {
                    return Ok(json(
                        StatusCode::BAD_REQUEST,
                        &serde_json::json!({"error": format!("fault body: {e}")}),
                    ))
                }
            };
            if new.error_rate.is_some_and(|r| !(0.0..=1.0).contains(&r)) {
                return Ok(json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": "error_rate must be within 0-1"}),
                ));
            }
            if new.status.is_some_and(|s| StatusCode::from_u16(s).is_err()) {
                return Ok(json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": "status must be 100-999"}),
                ));
            }
            if let Some(s) = new.refuse_for_s {
                if !(0.0..=3600.0).contains(&s) {
                    return Ok(json(
                        StatusCode::BAD_REQUEST,
                        &serde_json::json!({"error": "refuse_for_s must be within 0-3600"}),
                    ));
                }
            }
            let refuse = new.refuse_for_s;
            {
                let mut f = match state.faults.lock() {
                    Ok(f) => f,
                    Err(p) => p.into_inner(),
                };
                if new == Faults::default() {
                    *f = Faults::default();
                } else {
                    let old = f.clone();
                    *f = Faults {
                        error_rate: new.error_rate.or(old.error_rate),
                        status: new.status.or(old.status),
                        delay_ms: new.delay_ms.or(old.delay_ms),
                        refuse_for_s: None,
                        db_pool_usage: new.db_pool_usage.or(old.db_pool_usage),
                        queue_backlog: new.queue_backlog.or(old.queue_backlog),
                    };
                }
            }
            let current = state.faults.lock().map(|f| f.clone()).unwrap_or_default();
            let res = json(
                StatusCode::OK,
                &serde_json::json!({"instance": state.name, "faults": current, "refuse_for_s": refuse}),
            );
            if let Some(s) = refuse.filter(|s| *s > 0.0) {
                // Answer first, then close.
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let _ = state.refuse.send(Some(Duration::from_secs_f64(s)));
                });
            }
            Ok(res)
        }
        (&Method::GET, "/healthz") => {
            if let Some(ms) = faults.delay_ms.filter(|&d| d > 0) {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({
                    "cell": state.cell,
                    "instance": state.name,
                    "db_pool_usage": faults.db_pool_usage.unwrap_or(0.1),
                    "queue_backlog": faults.queue_backlog.unwrap_or(0),
                }),
            ))
        }
        _ => {
            if let Some(ms) = faults.delay_ms.filter(|&d| d > 0) {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            if let Some(rate) = faults.error_rate {
                if fastrand::f64() < rate {
                    let status = faults
                        .status
                        .and_then(|s| StatusCode::from_u16(s).ok())
                        .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                    return Ok(json(
                        status,
                        &serde_json::json!({"error": "injected fault", "cell": state.cell, "instance": state.name}),
                    ));
                }
            }
            let mut headers = BTreeMap::new();
            for (k, v) in &parts.headers {
                let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                headers
                    .entry(k.as_str().to_owned())
                    .and_modify(|e: &mut String| {
                        e.push_str(", ");
                        e.push_str(&v);
                    })
                    .or_insert(v);
            }
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({
                    "cell": state.cell,
                    "instance": state.name,
                    "method": parts.method.as_str(),
                    "path": parts.uri.path(),
                    "headers": headers,
                }),
            ))
        }
    }
}
