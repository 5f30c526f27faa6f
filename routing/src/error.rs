//! Typed errors of the routing crate.

use thiserror::Error;

/// Why a routing key could not be taken from a request. All map to HTTP 400.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The key is longer than [`crate::MAX_KEY_LEN`] bytes.
    #[error("routing key from {source_name} is {len} bytes; the limit is {max}")]
    TooLong {
        /// Which source produced the key.
        source_name: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The key contains a control character.
    #[error("routing key from {source_name} contains a control character")]
    ControlChar {
        /// Which source produced the key.
        source_name: &'static str,
    },
    /// The key is not valid UTF-8.
    #[error("routing key from {source_name} is not valid UTF-8")]
    NotUtf8 {
        /// Which source produced the key.
        source_name: &'static str,
    },
    /// A JWT was present but could not be used.
    #[error("routing key from JWT: {0}")]
    Jwt(String),
    /// The key's header or query parameter was sent more than once with different values:
    /// routing by one while the upstream reads another would send a user's request to
    /// someone else's cell.
    #[error("routing key {source_name} is sent more than once with different values")]
    Ambiguous {
        /// The source, as "header x-user-id" or "query parameter uid".
        source_name: String,
    },
}

/// Why no cell could be chosen.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecideError {
    /// No key and the anonymous policy rejects keyless requests (HTTP 400).
    #[error("request has no routing key and anonymous requests are rejected")]
    MissingKey,
    /// Neither the home cell nor any of its failover targets is serving (HTTP 503).
    #[error("no healthy cell for this request: home cell {home} is {state} and none of its failover targets is serving")]
    NoServingCell {
        /// The home cell.
        home: String,
        /// Its state.
        state: &'static str,
    },
    /// Keyless request and no cell is serving anywhere (HTTP 503).
    #[error("no healthy cell in any region")]
    NoCellAnywhere,
}

/// Why a routing table could not be built. The gateway keeps its previous table.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TableError {
    /// A problem at a named place of the configuration.
    #[error("{path}: {message}")]
    Invalid {
        /// Where, e.g. `cells[2].failover[0]`.
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl TableError {
    pub(crate) fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}
