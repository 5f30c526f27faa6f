//! Where configuration is loaded from: the YAML model, its validation, and the build of a
//! routing table from it.
//!
//! A file is parsed into typed structs ([`Config`]), validated once ([`Config::validate`])
//! with every problem named by its path (`cells[2].instances[0].addr: ...`), and turned into
//! a [`cellgate_routing::RoutingTable`] by [`Config::build_table`]. This crate never sits
//! on the request path and never depends on an HTTP engine.

mod error;
mod health;
mod model;
mod validate;

pub use error::{ConfigError, Issue};
pub use health::*;
pub use model::*;
pub use validate::parse_duration;

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
