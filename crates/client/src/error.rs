//! The client's error type: every failure says what went wrong and, where it can, what to do.

use std::error::Error as StdError;

use thiserror::Error;
use tonic::{Code, Status};

/// What a failed client operation ran into.
#[derive(Debug, Error)]
pub enum Error {
    /// The client was configured with something unusable (a bad address, unreadable
    /// certificate files).
    #[error("{0}")]
    Config(String),

    /// The TLS handshake failed: the server's certificate is not trusted, or the server refused
    /// ours.
    #[error("TLS handshake with {server} failed: {detail}; {hint}")]
    Tls {
        /// The server address.
        server: String,
        /// What the TLS layer reported.
        detail: String,
        /// What to do about it.
        hint: &'static str,
    },

    /// The server could not be reached (after the configured retries).
    #[error(
        "cannot reach the server at {server}: {detail}; is `peervault serve` running there? (check --server / PEERVAULT_SERVER)"
    )]
    Unavailable {
        /// The server address.
        server: String,
        /// What the transport reported.
        detail: String,
    },

    /// The server answered the call with a status other than OK.
    #[error("{}", describe_status(.0))]
    Status(Status),

    /// Reading the local input or writing the local output failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being read or written.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// Received data failed an integrity check (a chunk or file hash did not match).
    #[error("integrity check failed: {0}")]
    Integrity(String),

    /// The server answered in a way the protocol does not allow.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// A coarse classification of [`Error`], stable enough for exit codes and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad configuration or arguments given to the client.
    Config,
    /// The key, blob, peer or upload does not exist.
    NotFound,
    /// Credentials missing or refused, not allowed, or a TLS certificate problem.
    Auth,
    /// The server is unreachable, overloaded or timed out.
    Unavailable,
    /// The server rejected the request as invalid (INVALID_ARGUMENT, FAILED_PRECONDITION,
    /// ALREADY_EXISTS, OUT_OF_RANGE).
    Rejected,
    /// Storage quota or object size limit reached (RESOURCE_EXHAUSTED).
    Quota,
    /// Stored or transferred data failed a hash check (DATA_LOSS, or checked by the client).
    Integrity,
    /// Local input or output failed.
    Io,
    /// Anything else (INTERNAL, UNKNOWN, protocol violations).
    Other,
}

impl Error {
    /// The classification of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_) => ErrorKind::Config,
            Error::Tls { .. } => ErrorKind::Auth,
            Error::Unavailable { .. } => ErrorKind::Unavailable,
            Error::Io { .. } => ErrorKind::Io,
            Error::Integrity(_) => ErrorKind::Integrity,
            Error::Protocol(_) => ErrorKind::Other,
            Error::Status(s) => match s.code() {
                Code::NotFound => ErrorKind::NotFound,
                Code::Unauthenticated | Code::PermissionDenied => ErrorKind::Auth,
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => ErrorKind::Unavailable,
                Code::InvalidArgument | Code::FailedPrecondition | Code::AlreadyExists | Code::OutOfRange => {
                    ErrorKind::Rejected
                }
                Code::ResourceExhausted => ErrorKind::Quota,
                Code::DataLoss => ErrorKind::Integrity,
                _ => ErrorKind::Other,
            },
        }
    }

    /// The gRPC status code behind this error, when the server (or the transport) produced one.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Status(s) => Some(s.code()),
            Error::Unavailable { .. } => Some(Code::Unavailable),
            Error::Tls { .. } => Some(Code::Unavailable),
            _ => None,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Converts a status from a call to `server` into an error, recognising transport
    /// failures (TLS handshake, connection refused) that tonic reports as UNAVAILABLE or
    /// UNKNOWN.
    pub(crate) fn from_status(status: Status, server: &str, client_cert: bool) -> Self {
        if let Some((detail, hint)) = tls_failure(&status) {
            return Error::Tls {
                server: server.to_string(),
                detail,
                hint,
            };
        }
        // With TLS 1.3 a server that refuses the client certificate does so after the client
        // considers the handshake done: the client only sees the connection drop on its first
        // request (a broken pipe, a reset, or a cancelled request) rather than a TCP error.
        let text = chain_text(&status).to_ascii_lowercase();
        if client_cert
            && is_transport(&status)
            && !text.contains("tcp connect error")
            && [
                "broken pipe",
                "operation was canceled",
                "connection reset",
                "connection closed",
                "unexpected eof",
            ]
            .iter()
            .any(|w| text.contains(w))
        {
            return Error::Tls {
                server: server.to_string(),
                detail: format!(
                    "the server closed the connection right after the handshake ({})",
                    chain_text(&status)
                ),
                hint: "the server most likely refused the client certificate (signed by a CA it does not trust); pass a certificate and key issued by the server's client CA with --cert/--key or --tls-dir",
            };
        }
        if status.code() == Code::Unavailable && is_transport(&status) {
            return Error::Unavailable {
                server: server.to_string(),
                detail: chain_text(&status),
            };
        }
        if status.code() == Code::Unknown && is_transport(&status) {
            return Error::Unavailable {
                server: server.to_string(),
                detail: chain_text(&status),
            };
        }
        Error::Status(status)
    }
}

/// Whether a status is worth retrying: UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED
/// (the Graviton API's guidance), except a TLS handshake failure, which no retry fixes.
pub fn is_retryable(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => tls_failure(status).is_none(),
        // tonic reports some connection failures (reset, refused mid-handshake) as UNKNOWN with a
        // transport error inside; those are UNAVAILABLE in substance.
        Code::Unknown => is_transport(status) && tls_failure(status).is_none(),
        _ => false,
    }
}

/// The status message followed by the messages of its source chain.
pub(crate) fn chain_text(status: &Status) -> String {
    let mut parts = vec![status.message().to_string()];
    let mut cur: Option<&(dyn StdError + 'static)> = status.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !s.is_empty() && !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = e.source();
    }
    parts.retain(|p| !p.is_empty());
    parts.join(": ")
}

fn is_transport(status: &Status) -> bool {
    let text = chain_text(status).to_ascii_lowercase();
    status.source().is_some()
        || [
            "transport error",
            "connect",
            "connection",
            "broken pipe",
            "dns error",
            "h2 protocol",
        ]
        .iter()
        .any(|w| text.contains(w))
}

/// Recognises a TLS handshake failure and says what to do about it.
fn tls_failure(status: &Status) -> Option<(String, &'static str)> {
    // A status the server sent carries no source; only transport failures are looked at.
    if status.source().is_none()
        && !status.message().contains("transport error")
        && !status.message().contains("invalid peer certificate")
    {
        return None;
    }
    let text = chain_text(status);
    let lower = text.to_ascii_lowercase();
    if lower.contains("invalid peer certificate") || lower.contains("unknownissuer") {
        let hint = if lower.contains("notvalidforname") {
            "the server's certificate does not name the host you dialled; use the name it was issued for in --server"
        } else if lower.contains("expired") {
            "the server's certificate has expired; renew it"
        } else {
            "the server's certificate is not signed by the CA you trust; pass the CA that signed it with --ca (or --tls-dir / PEERVAULT_TLS_DIR pointing at the server's tls folder)"
        };
        return Some((text, hint));
    }
    if lower.contains("fatal alert") || lower.contains("certificaterequired") || lower.contains("handshake") {
        let hint = if lower.contains("certificaterequired") || lower.contains("certificate required") {
            "the server requires a client certificate; pass --cert and --key (or --tls-dir)"
        } else {
            "the server refused the client certificate; pass a certificate signed by the server's client CA with --cert/--key (or --tls-dir)"
        };
        return Some((text, hint));
    }
    None
}

fn describe_status(status: &Status) -> String {
    let msg = status.message();
    let what = match status.code() {
        Code::NotFound => "not found",
        Code::Unauthenticated => "not authenticated",
        Code::PermissionDenied => "permission denied",
        Code::InvalidArgument => "invalid argument",
        Code::FailedPrecondition => "failed precondition",
        Code::AlreadyExists => "already exists",
        Code::ResourceExhausted => "resource exhausted",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Internal => "internal server error",
        Code::Unimplemented => {
            "not served here (a server of another version, or a role without this service; check --server)"
        }
        _ => "error",
    };
    let hint = match status.code() {
        Code::Unauthenticated => "; present a client certificate (--cert/--key or --tls-dir) or a token (--token)",
        Code::PermissionDenied => "; the identity you used lacks the scope this needs",
        Code::DeadlineExceeded => "; raise --timeout if the server is slow",
        _ => "",
    };
    if msg.is_empty() {
        format!("{what} ({:?}){hint}", status.code())
    } else {
        format!("{what}: {msg}{hint}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_published_codes_are_retried() {
        assert!(is_retryable(&Status::unavailable("down")));
        assert!(is_retryable(&Status::deadline_exceeded("slow")));
        assert!(is_retryable(&Status::resource_exhausted("later")));
        assert!(!is_retryable(&Status::invalid_argument("bad")));
        assert!(!is_retryable(&Status::not_found("nope")));
        assert!(!is_retryable(&Status::internal("boom")));
        assert!(!is_retryable(&Status::permission_denied("no")));
        assert!(!is_retryable(&Status::unknown("no source, not transport")));
    }

    #[test]
    fn tls_failures_are_not_retried_and_say_what_to_do() {
        let s = Status::unavailable("invalid peer certificate: UnknownIssuer");
        assert!(!is_retryable(&s));
        let e = Error::from_status(s, "localhost:8082", true);
        assert_eq!(e.kind(), ErrorKind::Auth);
        assert!(e.to_string().contains("--ca"), "{e}");
    }

    #[test]
    fn statuses_map_to_kinds() {
        assert_eq!(Error::Status(Status::not_found("k")).kind(), ErrorKind::NotFound);
        assert_eq!(Error::Status(Status::invalid_argument("k")).kind(), ErrorKind::Rejected);
        assert_eq!(Error::Status(Status::resource_exhausted("k")).kind(), ErrorKind::Quota);
        assert_eq!(Error::Status(Status::data_loss("k")).kind(), ErrorKind::Integrity);
        assert_eq!(Error::Status(Status::unauthenticated("k")).kind(), ErrorKind::Auth);
        let e = Error::Status(Status::not_found("no file has the key 'x'"));
        assert_eq!(e.to_string(), "not found: no file has the key 'x'");
    }
}
