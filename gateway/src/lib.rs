//! cellgate: an edge gateway for cell-based, multi-region services.
//!
//! # The request path
//!
//! Every proxied request passes through the same named phases, each in its own module
//! of [`proxy`]; each phase reads the one routing-table snapshot loaded at the start:
//!
//! ```text
//!  client ──▶ server (accept, connection limit, TLS/ALPN)
//!               │
//!            conn          HTTP/1.1 | h2c | h2, codec limits, header-read / idle timers, drain
//!               │
//!   [guard]    guard         URI / header / Content-Length / Transfer-Encoding checks, body
//!               │                  counted against the limit as it flows
//!               ▼
//!   [key]      proxy::route   take + validate the routing key (header, cookie, query,
//!               │                  path, JWT); strip an untrusted X-Cell-ID
//!   [decide]   proxy::route   override → slot → home cell → failover walk
//!               │                  (or the keyless policy); gray tag; instance by WRR
//!   [shape]    proxy::shape   upstream headers (X-Cell-ID, X-Routing-Version, X-Request-ID,
//!               │                  traceparent, X-Forwarded-*, X-Gray-Tag), hop-by-hop removal,
//!               │                  deadline (X-Timeout / grpc-timeout, capped) and its remainder
//!   [send]     proxy::send    per-worker pooled connection (HTTP/1.1 or h2c), connect
//!               │                  failures retried on another instance of the same cell
//!   [outcome]  proxy::mod     health accounting, response headers (X-Cell-ID,
//!               ▼                  X-Request-ID), JSON (or gRPC) errors of SPEC §2
//!  upstream
//! ```
//!
//! The routing table lives behind one `ArcSwap`; a reload builds and validates a new table
//! off the request path ([`reload`]) and swaps it whole. Each worker thread runs its own
//! single-threaded runtime with its own upstream connection pool, so the request path
//! takes no lock.
//!
//! # The control plane
//!
//! Beside the workers, one control thread runs the admin API ([`admin`]), the
//! configuration source ([`control`]: the file with the admin overlay, or etcd with its
//! watch, switch protocol and fleet registration) and the audit log ([`audit`]). It builds
//! new tables off the request path and swaps them into the same `ArcSwap`;
//! `cellgate ctl` ([`ctl`]) talks to the admin API.

pub mod admin;
pub mod alloc;
pub mod audit;
pub mod conn;
pub mod control;
pub mod controller;
pub mod ctl;
pub mod demo;
pub mod guard;
pub mod metrics;
pub mod probe;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod socket;
pub mod telemetry;
pub mod tls;
pub mod upgrade;

pub use server::{Gateway, RunOptions};
