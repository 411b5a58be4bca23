//! Every error of the events service, with its metric label, its gRPC status and its WebSocket
//! error code, mapped in this one place.

use tonic::{Code, Status};

use crate::topics::TOPIC_LIST;

/// Most events in one Publish batch.
pub const MAX_BATCH: usize = 1000;

/// What went wrong, for gRPC callers and WebSocket clients alike.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EventsError {
    /// A topic that is not one of the four published ones.
    #[error("unknown topic '{0}' (topics: {TOPIC_LIST})")]
    UnknownTopic(String),
    /// An event type that does not belong to its topic.
    #[error("unknown event type '{kind}' for topic '{topic}' (types: {})", crate::topics::Topic::parse(topic).map(|t| t.types().join(", ")).unwrap_or_default())]
    UnknownType {
        /// The topic.
        topic: String,
        /// The type given.
        kind: String,
    },
    /// A published event without a required envelope field.
    #[error("event {index} of the batch has no `{field}`")]
    MissingField {
        /// Position in the batch.
        index: usize,
        /// The missing field.
        field: &'static str,
    },
    /// A published event whose `data_json` is not a JSON object.
    #[error("event {index} of the batch has invalid data_json: {reason}")]
    InvalidData {
        /// Position in the batch.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A Publish batch over [`MAX_BATCH`].
    #[error("a batch holds at most {MAX_BATCH} events; this one has {0}")]
    BatchTooLarge(usize),
    /// A WebSocket message that is not JSON.
    #[error("message is not valid JSON: {0}")]
    NotJson(String),
    /// A WebSocket message that is JSON but not an object.
    #[error("message must be a JSON object like {{\"type\":\"subscribe\",\"topic\":\"file_operations\"}}")]
    NotAnObject,
    /// A WebSocket message without `type`.
    #[error("message has no `type` (types: subscribe, unsubscribe, auth, ping)")]
    MissingMessageType,
    /// A WebSocket message whose `type` is not one the server accepts.
    #[error("unknown message type '{0}' (types: subscribe, unsubscribe, auth, ping)")]
    UnknownMessageType(String),
    /// A field of a WebSocket message with the wrong JSON type or missing.
    #[error("`{field}` of a '{kind}' message must be a string")]
    BadField {
        /// The message type.
        kind: &'static str,
        /// The field.
        field: &'static str,
    },
    /// A binary WebSocket frame.
    #[error("binary messages are not supported: send JSON text")]
    Binary,
    /// A WebSocket message over the size limit.
    #[error("message exceeds the limit of {limit} bytes")]
    MessageTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// A client sending more messages per second than allowed.
    #[error("Rate limit exceeded. Please slow down your requests.")]
    RateLimited {
        /// Seconds until the client may send again.
        retry_after: u64,
    },
    /// The connection limit is reached.
    #[error("Server is not accepting connections: {limit} connections are open (the limit); try again later")]
    TooManyConnections {
        /// The limit.
        limit: usize,
    },
    /// The per-address connection limit is reached.
    #[error(
        "Server is not accepting connections: {limit} connections from this address are open (the limit per address)"
    )]
    TooManyConnectionsFromAddress {
        /// The limit.
        limit: usize,
    },
    /// A Subscribe filter list longer than allowed.
    #[error("`{field}` holds {given} entries; at most {limit} are accepted")]
    FilterTooLong {
        /// `types` or `topics`.
        field: &'static str,
        /// How many were given.
        given: usize,
        /// The limit.
        limit: usize,
    },
    /// An `Origin` that is not allowed.
    #[error("origin '{0}' is not allowed (see PEERVAULT_WS_CORS_ORIGINS)")]
    OriginNotAllowed(String),
    /// A token that does not verify.
    #[error("Invalid authentication credentials: {0}")]
    AuthFailed(String),
    /// A message other than `auth` before authenticating, or no auth message in time.
    #[error("authentication required: send {{\"type\":\"auth\",\"data\":{{\"token\":\"…\"}}}} first{0}")]
    AuthRequired(&'static str),
    /// The service is shutting down.
    #[error("the events service is shutting down; reconnect to another pod or retry")]
    ShuttingDown,
}

impl EventsError {
    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            EventsError::UnknownTopic(_) => "unknown_topic",
            EventsError::UnknownType { .. } => "unknown_type",
            EventsError::MissingField { .. } => "missing_field",
            EventsError::InvalidData { .. } => "invalid_data",
            EventsError::BatchTooLarge(_) => "batch_too_large",
            EventsError::NotJson(_) => "not_json",
            EventsError::NotAnObject => "not_an_object",
            EventsError::MissingMessageType => "missing_type",
            EventsError::UnknownMessageType(_) => "unknown_message_type",
            EventsError::BadField { .. } => "bad_field",
            EventsError::Binary => "binary",
            EventsError::MessageTooLarge { .. } => "message_too_large",
            EventsError::RateLimited { .. } => "rate_limited",
            EventsError::TooManyConnections { .. } => "connection_limit",
            EventsError::TooManyConnectionsFromAddress { .. } => "address_connection_limit",
            EventsError::FilterTooLong { .. } => "filter_too_long",
            EventsError::OriginNotAllowed(_) => "origin_not_allowed",
            EventsError::AuthFailed(_) => "auth_failed",
            EventsError::AuthRequired(_) => "auth_required",
            EventsError::ShuttingDown => "shutting_down",
        }
    }

    /// The published WebSocket error code.
    pub fn ws_code(&self) -> &'static str {
        match self {
            EventsError::TooManyConnections { .. }
            | EventsError::TooManyConnectionsFromAddress { .. }
            | EventsError::OriginNotAllowed(_)
            | EventsError::ShuttingDown => "CONNECTION_REFUSED",
            EventsError::AuthFailed(_) | EventsError::AuthRequired(_) => "AUTH_FAILED",
            EventsError::RateLimited { .. } => "RATE_LIMIT_EXCEEDED",
            _ => "INVALID_MESSAGE",
        }
    }

    /// The WebSocket error message: `{"type":"error","data":{"code","message"[,"retryAfter"]},"timestamp"}`.
    pub fn ws_message(&self) -> serde_json::Value {
        let mut data = serde_json::json!({"code": self.ws_code(), "message": self.to_string()});
        if let EventsError::RateLimited { retry_after } = self {
            data["retryAfter"] = (*retry_after).into();
        }
        serde_json::json!({"type": "error", "data": data, "timestamp": crate::model::rfc3339_now()})
    }

    /// The gRPC status code.
    pub fn code(&self) -> Code {
        match self {
            EventsError::RateLimited { .. }
            | EventsError::TooManyConnections { .. }
            | EventsError::TooManyConnectionsFromAddress { .. } => Code::ResourceExhausted,
            EventsError::OriginNotAllowed(_) => Code::PermissionDenied,
            EventsError::AuthFailed(_) | EventsError::AuthRequired(_) => Code::Unauthenticated,
            EventsError::ShuttingDown => Code::Unavailable,
            _ => Code::InvalidArgument,
        }
    }
}

impl From<EventsError> for Status {
    fn from(e: EventsError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_published_tables() {
        assert_eq!(EventsError::NotJson("x".into()).ws_code(), "INVALID_MESSAGE");
        assert_eq!(EventsError::UnknownTopic("x".into()).ws_code(), "INVALID_MESSAGE");
        assert_eq!(
            EventsError::RateLimited { retry_after: 1 }.ws_code(),
            "RATE_LIMIT_EXCEEDED"
        );
        assert_eq!(
            EventsError::TooManyConnections { limit: 3 }.ws_code(),
            "CONNECTION_REFUSED"
        );
        assert_eq!(EventsError::AuthFailed("bad".into()).ws_code(), "AUTH_FAILED");
        let m = EventsError::RateLimited { retry_after: 2 }.ws_message();
        assert_eq!(m["type"], "error");
        assert_eq!(m["data"]["retryAfter"], 2);
        let st = Status::from(EventsError::UnknownTopic("files".into()));
        assert_eq!(st.code(), Code::InvalidArgument);
        assert!(st.message().contains("file_operations"), "{}", st.message());
        let e = EventsError::UnknownType {
            topic: "alerts".into(),
            kind: "x".into(),
        };
        assert!(e.to_string().contains("storage_alert"), "{e}");
    }
}
