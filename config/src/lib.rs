//! Where configuration is loaded from: the YAML model, its validation, and the build of a
//! routing table from it.
//!
//! A file is parsed into typed structs ([`Config`]), validated once ([`Config::validate`])
//! with every problem named by its path (`cells[2].instances[0].addr: ...`), and turned into
//! a [`cellgate_routing::RoutingTable`] by [`Config::build_table`].
//!
//! The control plane's pure parts live here too: admin mutations and their impact
//! ([`mutate`]), the configuration as etcd documents ([`docs`]), the etcd store client
//! ([`etcd`]: load, watch, switch protocol, audit, fleet), the on-disk last known good
//! table ([`lkg`]), the local admin overlay ([`overlay`]) and the audit record ([`audit`]).
//!
//! This crate never sits on the request path and never depends on an HTTP engine (the
//! etcd client's gRPC transport is the store client, not a server).

pub mod audit;
pub mod docs;
mod error;
pub mod etcd;
mod health;
pub mod lkg;
mod model;
pub mod mutate;
pub mod overlay;
mod validate;

pub use audit::AuditRecord;
pub use error::{ConfigError, Issue};
pub use health::*;
pub use model::*;
pub use mutate::{Impact, MutateError, Mutation};
pub use validate::{instance_addr, parse_duration, parse_range, valid_id, valid_prefix};

/// The demo configuration (`examples/demo.yaml`), built into the binary.
pub const DEMO_YAML: &str = include_str!("../../examples/demo.yaml");

/// Read, parse and validate a configuration file.
pub fn load_file(path: &std::path::Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    Config::from_yaml(&text)
}
