//! The blob service's errors, mapped to gRPC status in one place.

use thiserror::Error;
use tonic::Status;

/// Everything that can go wrong in the blob service.
#[derive(Debug, Error)]
pub enum BlobError {
    /// The request is malformed (bad key, bad offsets, checksum mismatch, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// No such file, blob or upload.
    #[error("{0}")]
    NotFound(String),
    /// Something with that name exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The caller may not do this (e.g. outside its key prefix).
    #[error("{0}")]
    PermissionDenied(String),
    /// A byte range outside the object.
    #[error("{0}")]
    OutOfRange(String),
    /// The storage quota would be exceeded.
    #[error("{0}")]
    QuotaExceeded(String),
    /// The data volume is full (ENOSPC, EDQUOT, or below `--volume-reserve`).
    #[error("volume full: {0}; delete files or grow the volume")]
    VolumeFull(String),
    /// The operation conflicts with the current state (e.g. deleting a blob a file uses).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A stored chunk failed its hash check or is missing.
    #[error("{0}")]
    DataLoss(String),
    /// The client went away or the stream broke.
    #[error("{0}")]
    Aborted(String),
    /// The store is shutting down or overloaded.
    #[error("{0}")]
    Unavailable(String),
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
    /// The index failed.
    #[error("index: {0}")]
    Index(#[from] redb::Error),
    /// The file system failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A stored record could not be decoded.
    #[error("corrupt index record: {0}")]
    Corrupt(String),
}

impl BlobError {
    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            BlobError::InvalidArgument(_) => "invalid_argument",
            BlobError::NotFound(_) => "not_found",
            BlobError::AlreadyExists(_) => "already_exists",
            BlobError::PermissionDenied(_) => "permission_denied",
            BlobError::OutOfRange(_) => "out_of_range",
            BlobError::QuotaExceeded(_) => "quota_exceeded",
            BlobError::VolumeFull(_) => "volume_full",
            BlobError::FailedPrecondition(_) => "failed_precondition",
            BlobError::DataLoss(_) => "data_loss",
            BlobError::Aborted(_) => "aborted",
            BlobError::Unavailable(_) => "unavailable",
            BlobError::NoUpstream { .. } => "no_upstream",
            BlobError::Client(_) => "client",
            BlobError::Index(_) => "index",
            BlobError::Io { .. } => "io",
            BlobError::Corrupt(_) => "corrupt",
        }
    }

    /// Wraps an I/O error with what was being done: a full volume becomes
    /// [`BlobError::VolumeFull`], a device read error (EIO) [`BlobError::DataLoss`].
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        let context = context.into();
        if is_volume_full(&source) {
            return BlobError::VolumeFull(format!("{context}: {source}"));
        }
        if source.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()) {
            return BlobError::DataLoss(format!("{context}: {source} (the device failed to read or write)"));
        }
        BlobError::Io { context, source }
    }

    /// Whether this error means the volume is full.
    pub fn is_volume_full(&self) -> bool {
        matches!(self, BlobError::VolumeFull(_))
    }

    /// Shorthand for [`BlobError::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        BlobError::InvalidArgument(msg.into())
    }
}

/// ENOSPC or EDQUOT.
pub fn is_volume_full(e: &std::io::Error) -> bool {
    let code = e.raw_os_error();
    code == Some(rustix::io::Errno::NOSPC.raw_os_error()) || code == Some(rustix::io::Errno::DQUOT.raw_os_error())
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for BlobError {
            fn from(e: $t) -> Self {
                let e: redb::Error = e.into();
                if let redb::Error::Io(io) = &e
                    && is_volume_full(io)
                {
                    return BlobError::VolumeFull(format!("index: {io}"));
                }
                BlobError::Index(e)
            }
        }
    )*};
}
from_redb!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::SetDurabilityError,
    redb::DatabaseError
);

impl From<BlobError> for Status {
    fn from(e: BlobError) -> Status {
        let msg = e.to_string();
        match e {
            BlobError::InvalidArgument(_) => Status::invalid_argument(msg),
            BlobError::NotFound(_) => Status::not_found(msg),
            BlobError::AlreadyExists(_) => Status::already_exists(msg),
            BlobError::PermissionDenied(_) => Status::permission_denied(msg),
            BlobError::OutOfRange(_) => Status::out_of_range(msg),
            BlobError::QuotaExceeded(_) | BlobError::VolumeFull(_) => Status::resource_exhausted(msg),
            BlobError::FailedPrecondition(_) | BlobError::NoUpstream { .. } => Status::failed_precondition(msg),
            BlobError::DataLoss(_) => Status::data_loss(msg),
            BlobError::Aborted(_) => Status::aborted(msg),
            BlobError::Unavailable(_) => Status::unavailable(msg),
            BlobError::Client(_) | BlobError::Index(_) | BlobError::Io { .. } | BlobError::Corrupt(_) => {
                // Internal details go to the log; the caller gets a stable message.
                tracing::error!(error = %msg, "internal storage error");
                Status::internal(format!("internal storage error: {msg}"))
            }
        }
    }
}

/// Result with [`BlobError`].
pub type Result<T, E = BlobError> = std::result::Result<T, E>;
