//! `cellgate ctl`: the admin API from the command line.
//!
//! Every subcommand is one HTTP call to the admin API (the same endpoints, the same
//! rules): the answer's JSON is printed; an error answer is printed to stderr and the
//! command exits 1. The address comes from `--admin` (default `127.0.0.1:9901`), the token
//! from `--token` or `CELLGATE_ADMIN_TOKEN`. An admin API served over TLS (`admin.tls`,
//! mTLS) is reached with `--ca` (the CA its certificate chains to) and `--cert`/`--key` (the
//! client certificate); `--admin https://host:port` says TLS too and needs `--ca`.
//!
//! It must never retry a mutation on its own: a mutation that timed out may have been
//! applied (the audit log says).

use std::time::Duration;

use bytes::Bytes;
use clap::Subcommand;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// How long `ctl` waits for the admin API.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A `ctl` subcommand.
#[derive(Subcommand, Debug, Clone)]
pub enum CtlCommand {
    /// List the cells (or show one).
    Cells {
        /// Cell id.
        id: Option<String>,
    },
    /// Explain where a key goes now.
    Route {
        /// Routing key.
        #[arg(long)]
        key: String,
        /// Region of the request.
        #[arg(long)]
        region: Option<String>,
        /// Gray tag of the request.
        #[arg(long)]
        gray: Option<String>,
    },
    /// Stop new traffic to a cell.
    Drain {
        /// Cell id.
        id: String,
        #[command(flatten)]
        flags: MutationFlags,
    },
    /// Send a cell's traffic to another cell.
    Switch {
        /// Cell id.
        id: String,
        /// The cell that takes the traffic.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        flags: MutationFlags,
    },
    /// Return a cell to active.
    Restore {
        /// Cell id.
        id: String,
        #[command(flatten)]
        flags: MutationFlags,
    },
    /// Set a cell's base weight.
    Weight {
        /// Cell id.
        id: String,
        /// New base weight.
        weight: u32,
        #[command(flatten)]
        flags: MutationFlags,
    },
    /// Move the fewest slots that make slot shares proportional to weights.
    Rebalance {
        #[command(flatten)]
        flags: MutationFlags,
    },
    /// The newest audit events.
    Audit {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// The routing table.
    Table,
    /// The gateways of the fleet.
    Fleet,
}

/// Flags every mutation takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct MutationFlags {
    /// Only show the plan; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Apply even above the traffic cap.
    #[arg(long)]
    pub force: bool,
}

impl MutationFlags {
    fn query(&self) -> String {
        let mut q = Vec::new();
        if self.dry_run {
            q.push("dry_run=true");
        }
        if self.force {
            q.push("force=true");
        }
        if q.is_empty() {
            String::new()
        } else {
            format!("?{}", q.join("&"))
        }
    }
}

/// Why a `ctl` call failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The admin API could not be reached.
    #[error("cannot reach the admin API at {addr}: {message}")]
    Connect {
        /// Address.
        addr: String,
        /// What failed.
        message: String,
    },
    /// The admin API answered with an error.
    #[error("{status}: {message}")]
    Status {
        /// HTTP status.
        status: StatusCode,
        /// The error message.
        message: String,
    },
    /// TLS to the admin API: bad files, or a failed handshake.
    #[error("TLS: {0}")]
    Tls(String),
}

/// Percent-encode a query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn seg(s: &str) -> String {
    encode(s)
}

/// The HTTP call a subcommand makes: method, path and query, JSON body.
pub fn request_of(cmd: &CtlCommand) -> (Method, String, Option<Value>) {
    match cmd {
        CtlCommand::Cells { id: None } => (Method::GET, "/admin/cells".into(), None),
        CtlCommand::Cells { id: Some(id) } => {
            (Method::GET, format!("/admin/cells/{}", seg(id)), None)
        }
        CtlCommand::Route { key, region, gray } => {
            let mut q = format!("key={}", encode(key));
            if let Some(r) = region {
                q.push_str(&format!("&region={}", encode(r)));
            }
            if let Some(g) = gray {
                q.push_str(&format!("&gray={}", encode(g)));
            }
            (Method::GET, format!("/admin/route?{q}"), None)
        }
        CtlCommand::Drain { id, flags } => (
            Method::POST,
            format!("/admin/cells/{}/drain{}", seg(id), flags.query()),
            None,
        ),
        CtlCommand::Switch { id, to, flags } => (
            Method::POST,
            format!("/admin/cells/{}/switch{}", seg(id), flags.query()),
            Some(json!({ "to": to })),
        ),
        CtlCommand::Restore { id, flags } => (
            Method::POST,
            format!("/admin/cells/{}/restore{}", seg(id), flags.query()),
            None,
        ),
        CtlCommand::Weight { id, weight, flags } => (
            Method::PUT,
            format!("/admin/cells/{}/weight{}", seg(id), flags.query()),
            Some(json!({ "weight": weight })),
        ),
        CtlCommand::Rebalance { flags } => (
            Method::POST,
            format!("/admin/rebalance{}", flags.query()),
            None,
        ),
        CtlCommand::Audit { limit } => (Method::GET, format!("/admin/audit?limit={limit}"), None),
        CtlCommand::Table => (Method::GET, "/admin/table".into(), None),
        CtlCommand::Fleet => (Method::GET, "/admin/fleet".into(), None),
    }
}

/// How `ctl` reaches an admin API served over TLS.
#[derive(Clone, Debug)]
pub struct AdminTls {
    config: std::sync::Arc<rustls::ClientConfig>,
}

impl AdminTls {
    /// Trust `ca_path`; present `client` (certificate and key files) for mTLS.
    pub fn load(ca_path: &str, client: Option<(&str, &str)>) -> Result<Self, CtlError> {
        crate::tls::admin_client_config(ca_path, client)
            .map(|config| Self { config })
            .map_err(|e| CtlError::Tls(e.to_string()))
    }
}

/// Call the admin API at `admin` (`host:port` or `http://host:port`) in plain HTTP.
pub async fn call(
    admin: &str,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, CtlError> {
    call_with(admin, None, token, method, path, body).await
}

/// Call the admin API at `admin` (`host:port`, `http://…` or `https://…`), over TLS when
/// `tls` is given.
pub async fn call_with(
    admin: &str,
    tls: Option<&AdminTls>,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, CtlError> {
    let https = admin.starts_with("https://");
    let addr = admin
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_owned();
    if https && tls.is_none() {
        return Err(CtlError::Tls(format!(
            "{admin} is https: give the CA its certificate chains to with --ca"
        )));
    }
    let connect_err = |message: String| CtlError::Connect {
        addr: addr.clone(),
        message,
    };
    let fut = async {
        let stream = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let mut tx = match tls {
            None => {
                let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| connect_err(e.to_string()))?;
                tokio::spawn(conn);
                tx
            }
            Some(t) => {
                let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                    .map_err(|e| CtlError::Tls(format!("{host}: {e}")))?;
                let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::clone(&t.config))
                    .connect(name, stream)
                    .await
                    .map_err(|e| CtlError::Tls(format!("TLS handshake with {addr}: {e}")))?;
                let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| connect_err(e.to_string()))?;
                tokio::spawn(conn);
                tx
            }
        };
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &addr)
            .header("accept", "application/json");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let body = match body {
            Some(v) => {
                b = b.header("content-type", "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let req = b
            .body(Full::new(body))
            .map_err(|e| connect_err(format!("bad request: {e}")))?;
        let res = tx
            .send_request(req)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let status = res.status();
        let bytes = res
            .into_body()
            .collect()
            .await
            .map_err(|e| connect_err(e.to_string()))?
            .to_bytes();
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        if status.is_success() {
            Ok(v)
        } else {
            Err(CtlError::Status {
                status,
                message: v["error"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string()),
            })
        }
    };
    match tokio::time::timeout(TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(connect_err(format!("no answer within {TIMEOUT:?}"))),
    }
}

/// Run one subcommand.
pub async fn run(
    admin: &str,
    tls: Option<&AdminTls>,
    token: Option<&str>,
    cmd: &CtlCommand,
) -> Result<Value, CtlError> {
    let (method, path, body) = request_of(cmd);
    call_with(admin, tls, token, method, &path, body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_encoded() {
        assert_eq!(encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
        let (m, p, b) = request_of(&CtlCommand::Switch {
            id: "bj-1".into(),
            to: "bj-2".into(),
            flags: MutationFlags {
                dry_run: true,
                force: false,
            },
        });
        assert_eq!(m, Method::POST);
        assert_eq!(p, "/admin/cells/bj-1/switch?dry_run=true");
        assert_eq!(b, Some(json!({"to": "bj-2"})));
    }
}
