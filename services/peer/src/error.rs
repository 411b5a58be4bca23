//! The peer service's errors: one enum, a bounded metric label per kind, and (in `api.rs`) one
//! mapping to gRPC status codes.

use thiserror::Error;

/// What can go wrong in the peer service.
#[derive(Debug, Error)]
pub enum PeerError {
    /// A request field is missing or malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// No peer has the id.
    #[error("no peer has id '{0}': ListPeers shows the known ids")]
    NotFound(String),
    /// A peer with the same id or address is already known.
    #[error("{0}")]
    AlreadyExists(String),
    /// The manual-peer store could not be read or written.
    #[error("peer store {path}: {reason}")]
    Store {
        /// File or object concerned.
        path: String,
        /// What failed.
        reason: String,
    },
    /// A concurrent writer changed the store first and retries ran out.
    #[error("peer store {0} changed concurrently; try again")]
    Conflict(String),
    /// Discovery could not be set up (bad flags, no Kubernetes config, ...).
    #[error("{0}")]
    Config(String),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl PeerError {
    /// A bounded label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            PeerError::InvalidArgument(_) => "invalid_argument",
            PeerError::NotFound(_) => "not_found",
            PeerError::AlreadyExists(_) => "already_exists",
            PeerError::Store { .. } => "store",
            PeerError::Conflict(_) => "conflict",
            PeerError::Config(_) => "config",
            PeerError::Metrics(_) => "metrics",
        }
    }
}
