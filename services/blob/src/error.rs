//! The blob service's errors, mapped to gRPC status in one place.

use thiserror::Error;
use tonic::Status;

/// Everything that can go wrong in the blob service.
#[derive(Debug, Error)]
pub enum BlobError {
    /// A call that must be forwarded has nowhere to go.
    #[error("{service} service is not configured: start this node with {flag} HOST:PORT")]
    NoUpstream {
        /// `peer` or `events`.
        service: &'static str,
        /// The flag that would configure it.
        flag: &'static str,
    },
    /// A channel to another service could not be built.
    #[error(transparent)]
    Client(#[from] peervault_runtime::client::ClientError),
}

impl BlobError {
    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            BlobError::NoUpstream { .. } => "no_upstream",
            BlobError::Client(_) => "client",
        }
    }
}

impl From<BlobError> for Status {
    fn from(e: BlobError) -> Status {
        match &e {
            BlobError::NoUpstream { .. } => Status::failed_precondition(e.to_string()),
            BlobError::Client(_) => Status::internal(e.to_string()),
        }
    }
}
