//! The admin REST API (SPEC §5), an axum router on the control runtime.
//!
//! What it is for: letting an operator see and steer the gateway — cells, the table, a
//! decision explained, drains, switches, weights, slot moves, the audit log and the fleet —
//! over JSON. [`router`] builds the whole API from [`routes`], the one list of what is
//! served; `GET /admin/openapi.json` describes it and a test keeps the two equal.
//!
//! Rules every endpoint follows:
//! - Every `/admin/*` path (known or not) needs `Authorization: Bearer <token>`; without a
//!   valid one the answer is 401. The token's name is the actor in the audit log.
//! - Errors are JSON `{"error": "..."}`: 400 names what is wrong with the request, 404 an
//!   unknown cell, 409 a change that lost a race (re-read and retry), 422 a change over the
//!   traffic cap (repeat with `force=true`), 503 a store that cannot be reached (nothing
//!   changed, unless the message says a sent change went unanswered: then its audit
//!   record tells).
//! - Mutations take `?dry_run=true` (answer with the plan, change nothing) and
//!   `?force=true` (ignore `admin.max_move_share`), and are audited before they answer.
//!
//! Transport: [`serve`] answers HTTP/1.1 over plain TCP, or, with `admin.tls` set, only over
//! TLS with a client certificate that chains to `admin.tls.client_ca` (mTLS; HTTP/1.1 or
//! h2 by ALPN). With `admin.tls.client_cert: admin_only` a client without a certificate
//! completes the handshake and is served everything but `/admin/*` (401 there). A failed or
//! timed-out handshake closes that connection with a log line; the listener keeps
//! accepting. The server certificate is reloaded when its files change; the client CA is
//! read at start-up.
//!
//! What it must never do: run on a worker thread, touch the request path, or change the
//! table other than through [`crate::control::mutate`].

mod error;
mod handlers;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{any, get, on, MethodFilter, MethodRouter};
use axum::Router;
use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub use error::AppError;

use crate::server::Shared;

/// The OpenAPI 3 description served at `GET /admin/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The bearer token's name, set by the auth layer for handlers.
#[derive(Debug, Clone)]
pub struct Actor(pub String);

/// One served route.
pub struct Route {
    /// Method.
    pub method: Method,
    /// Path, in OpenAPI / axum syntax (`/admin/cells/{id}`).
    pub path: &'static str,
    /// Whether it needs the bearer token.
    pub auth: bool,
    handler: MethodRouter<Arc<Shared>>,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

fn route(method: Method, path: &'static str, handler: MethodRouter<Arc<Shared>>) -> Route {
    Route {
        auth: path.starts_with("/admin/"),
        method,
        path,
        handler,
    }
}

/// Every route the admin listener serves. `/ui` and `/metrics` are served by other
/// modules.
pub fn routes() -> Vec<Route> {
    use handlers::*;
    vec![
        route(Method::GET, "/healthz", get(healthz)),
        route(Method::GET, "/readyz", get(readyz)),
        route(Method::GET, "/admin/cells", get(cells)),
        route(Method::GET, "/admin/cells/{id}", get(cell)),
        route(
            Method::POST,
            "/admin/cells/{id}/drain",
            on(MethodFilter::POST, drain),
        ),
        route(
            Method::POST,
            "/admin/cells/{id}/switch",
            on(MethodFilter::POST, switch),
        ),
        route(
            Method::POST,
            "/admin/cells/{id}/restore",
            on(MethodFilter::POST, restore),
        ),
        route(
            Method::PUT,
            "/admin/cells/{id}/weight",
            on(MethodFilter::PUT, weight),
        ),
        route(Method::GET, "/admin/route", get(explain)),
        route(Method::GET, "/admin/table", get(table)),
        route(
            Method::POST,
            "/admin/slots/move",
            on(MethodFilter::POST, slots_move),
        ),
        route(
            Method::POST,
            "/admin/rebalance",
            on(MethodFilter::POST, rebalance),
        ),
        route(Method::GET, "/admin/audit", get(audit)),
        route(Method::GET, "/admin/openapi.json", get(openapi)),
        route(Method::GET, "/admin/fleet", get(fleet)),
        route(Method::GET, "/ui", get(ui)),
        route(Method::GET, "/metrics", get(metrics)),
    ]
}

/// The admin API.
pub fn router(shared: Arc<Shared>) -> Router {
    let mut open = Router::new();
    let mut admin = Router::new();
    for r in routes() {
        if r.auth {
            admin = admin.route(r.path, r.handler);
        } else {
            open = open.route(r.path, r.handler);
        }
    }
    // Unknown /admin paths still need the token first, then get a JSON 404. A known
    // /admin path called with another method needs it too, then gets a JSON 405: the
    // 405 fallback is set on the admin routes before the auth layer wraps them (`layer`,
    // unlike `route_layer`, wraps the fallbacks as well).
    let admin = admin
        .route("/admin/{*rest}", any(handlers::not_found))
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&shared),
            auth,
        ));
    open.merge(admin)
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .with_state(shared)
}

/// How long a client has to complete the admin listener's TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve `router` on `listener` until the runtime stops: plain HTTP/1.1, or TLS through
/// `tls` (whose configuration verifies client certificates) with HTTP/1.1 or h2 by ALPN;
/// `/admin/*` is refused on a TLS connection without a client certificate.
/// Accept errors are logged and retried; a failed or timed-out handshake only drops its
/// connection.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    mut handed_over: tokio::sync::watch::Receiver<bool>,
) {
    // Once a new binary serves on the same socket, this (draining) process stops taking
    // admin connections: every probe gets the new process's answer, none a connection cut
    // by this one exiting.
    let stop = async move {
        let _ = handed_over.wait_for(|&h| h).await;
        tracing::info!(
            listener = "admin",
            "the new process serves the admin API; this one stops accepting"
        );
    };
    let Some(acceptor) = tls else {
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "admin API stopped");
        }
        return;
    };
    let mut stop = std::pin::pin!(stop);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut stop => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(listener = "admin", error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(listener = "admin", client = %peer, error = %e, "admin TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(listener = "admin", client = %peer, "admin TLS handshake timed out");
                    return;
                }
            };
            // Only possible under `client_cert: admin_only`: rustls hands over verified
            // certificates only, and requires one otherwise.
            let router = if stream.get_ref().1.peer_certificates().is_none() {
                router.layer(axum::Extension(NoClientCert))
            } else {
                router
            };
            let service = TowerToHyperService::new(router);
            let conn = auto::Builder::new(TokioExecutor::new());
            if let Err(e) = conn.serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(listener = "admin", client = %peer, error = %e, "admin connection failed");
            }
        });
    }
}

/// Marks the requests of an admin TLS connection that presented no client certificate.
#[derive(Clone, Copy)]
struct NoClientCert;

async fn auth(State(shared): State<Arc<Shared>>, mut req: Request, next: Next) -> Response {
    use axum::response::IntoResponse;
    if req.extensions().get::<NoClientCert>().is_some() {
        return AppError::Unauthorized(
            "a client certificate signed by admin.tls.client_ca is required for /admin".into(),
        )
        .into_response();
    }
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let Some(token) = presented else {
        return AppError::Unauthorized(
            "missing credentials: send Authorization: Bearer <admin token>".into(),
        )
        .into_response();
    };
    match shared.control.admin.actor(token) {
        Some(name) => {
            let actor = Actor(name.to_owned());
            req.extensions_mut().insert(actor);
            next.run(req).await
        }
        None => AppError::Unauthorized("the bearer token is not valid".into()).into_response(),
    }
}

/// A JSON request body; a problem is a 400 that names it.
#[derive(Debug)]
pub struct JsonBody<T> {
    /// The parsed body.
    pub value: T,
    /// The body as JSON, for the audit record.
    pub raw: serde_json::Value,
}

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AppError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| AppError::BadRequest(format!("cannot read the request body: {e}")))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(AppError::BadRequest(
                "the request body is empty; a JSON object is expected".into(),
            ));
        }
        let raw: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| AppError::BadRequest(format!("the request body is not JSON: {e}")))?;
        // The error names the field (`slots[1]`, `count`), not only what was expected.
        let value = serde_path_to_error::deserialize(&raw).map_err(|e| {
            let path = e.path().to_string();
            AppError::BadRequest(if path == "." {
                format!("request body: {}", e.inner())
            } else {
                format!("request body: {path}: {}", e.inner())
            })
        })?;
        Ok(Self { value, raw })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn openapi_is_json_with_every_route_and_nothing_else() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let paths = doc["paths"].as_object().unwrap();
        let mut documented = Vec::new();
        for (p, ops) in paths {
            for (m, _) in ops.as_object().unwrap() {
                if ["get", "post", "put", "delete", "patch"].contains(&m.as_str()) {
                    documented.push(format!("{} {p}", m.to_uppercase()));
                }
            }
        }
        let mut served: Vec<String> = routes()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(served, documented);
    }
}
