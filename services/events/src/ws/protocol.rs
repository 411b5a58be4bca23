//! The PeerVault WebSocket API's messages: parsing what clients send (the fuzzed surface) and
//! rendering what the server sends.
//!
//! Client messages: `{"type":"subscribe","topic":T}`, `{"type":"unsubscribe","topic":T}`,
//! `{"type":"auth","data":{"token":…}}` and `{"type":"ping"}`; `clientId` is optional on all.
//! Server messages follow the published `{type, topic, data, timestamp, clientId}` format.

use serde_json::{Value, json};

use crate::{error::EventsError, model::rfc3339_now, topics::Topic};

/// A parsed client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    /// Start receiving a topic.
    Subscribe(Topic),
    /// Stop receiving a topic.
    Unsubscribe(Topic),
    /// Authenticate with a token (when token auth is on).
    Auth(String),
    /// Application-level ping; answered with `pong`.
    Ping,
}

impl ClientMessage {
    /// The message type, as a bounded metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientMessage::Subscribe(_) => "subscribe",
            ClientMessage::Unsubscribe(_) => "unsubscribe",
            ClientMessage::Auth(_) => "auth",
            ClientMessage::Ping => "ping",
        }
    }
}

fn topic_of(obj: &serde_json::Map<String, Value>, kind: &'static str) -> Result<Topic, EventsError> {
    let t = obj
        .get("topic")
        .or_else(|| obj.get("data").and_then(|d| d.get("topic")));
    match t {
        Some(Value::String(s)) => {
            Topic::parse(s).ok_or_else(|| EventsError::UnknownTopic(s.chars().take(100).collect()))
        }
        _ => Err(EventsError::BadField { kind, field: "topic" }),
    }
}

/// Parses one text message of at most `max_size` bytes.
pub fn parse(text: &str, max_size: usize) -> Result<ClientMessage, EventsError> {
    if text.len() > max_size {
        return Err(EventsError::MessageTooLarge { limit: max_size });
    }
    let v: Value = serde_json::from_str(text).map_err(|e| EventsError::NotJson(e.to_string()))?;
    let Value::Object(obj) = v else {
        return Err(EventsError::NotAnObject);
    };
    let kind = match obj.get("type") {
        None | Some(Value::Null) => return Err(EventsError::MissingMessageType),
        Some(Value::String(s)) => s.as_str(),
        Some(_) => {
            return Err(EventsError::BadField {
                kind: "any",
                field: "type",
            });
        }
    };
    match kind {
        "subscribe" => Ok(ClientMessage::Subscribe(topic_of(&obj, "subscribe")?)),
        "unsubscribe" => Ok(ClientMessage::Unsubscribe(topic_of(&obj, "unsubscribe")?)),
        "auth" => {
            let token = obj
                .get("data")
                .and_then(|d| d.get("token"))
                .or_else(|| obj.get("token"));
            match token {
                Some(Value::String(t)) => Ok(ClientMessage::Auth(t.clone())),
                _ => Err(EventsError::BadField {
                    kind: "auth",
                    field: "data.token",
                }),
            }
        }
        "ping" => Ok(ClientMessage::Ping),
        other => Err(EventsError::UnknownMessageType(other.chars().take(100).collect())),
    }
}

/// The first message on a connection: its client id and what it may do.
pub fn welcome(client_id: &str, auth_required: bool) -> String {
    json!({
        "type": "connected",
        "clientId": client_id,
        "data": {
            "topics": crate::topics::TOPICS.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
            "authRequired": auth_required,
        },
        "timestamp": rfc3339_now(),
    })
    .to_string()
}

/// Confirms a subscribe or unsubscribe (`kind` `subscribed` / `unsubscribed`) with the topics now held.
pub fn confirm(kind: &str, topic: Topic, client_id: &str, topics: &[&str]) -> String {
    json!({
        "type": kind,
        "topic": topic.as_str(),
        "clientId": client_id,
        "data": {"topics": topics},
        "timestamp": rfc3339_now(),
    })
    .to_string()
}

/// Confirms authentication.
pub fn authenticated(client_id: &str) -> String {
    json!({"type": "authenticated", "clientId": client_id, "timestamp": rfc3339_now()}).to_string()
}

/// Answers a ping.
pub fn pong(client_id: &str) -> String {
    json!({"type": "pong", "clientId": client_id, "timestamp": rfc3339_now()}).to_string()
}

/// Tells a client it missed `missed` events of its topics by reading too slowly.
pub fn lagged(missed: u64) -> String {
    json!({"type": "lagged", "data": {"missed": missed}, "timestamp": rfc3339_now()}).to_string()
}

/// An error message in the published format.
pub fn error(e: &EventsError) -> String {
    e.ws_message().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    #[test]
    fn the_published_messages_parse() {
        assert_eq!(
            parse(r#"{"type":"subscribe","topic":"file_operations"}"#, MAX),
            Ok(ClientMessage::Subscribe(Topic::FileOperations))
        );
        assert_eq!(
            parse(r#"{"type":"unsubscribe","topic":"alerts","clientId":"c"}"#, MAX),
            Ok(ClientMessage::Unsubscribe(Topic::Alerts))
        );
        assert_eq!(
            parse(r#"{"type":"auth","data":{"token":"t"}}"#, MAX),
            Ok(ClientMessage::Auth("t".into()))
        );
        assert_eq!(parse(r#"{"type":"ping"}"#, MAX), Ok(ClientMessage::Ping));
    }

    #[test]
    fn each_bad_input_has_its_error() {
        let code = |s: &str| parse(s, 64).unwrap_err();
        assert!(matches!(code("not json"), EventsError::NotJson(_)));
        assert!(matches!(code("[1,2]"), EventsError::NotAnObject));
        assert!(matches!(code(r#"{"topic":"system"}"#), EventsError::MissingMessageType));
        assert!(matches!(
            code(r#"{"type":"dance"}"#),
            EventsError::UnknownMessageType(_)
        ));
        assert!(matches!(
            code(r#"{"type":"subscribe","topic":"x"}"#),
            EventsError::UnknownTopic(_)
        ));
        assert!(matches!(code(r#"{"type":"subscribe"}"#), EventsError::BadField { .. }));
        assert!(matches!(code(r#"{"type":7}"#), EventsError::BadField { .. }));
        assert!(matches!(
            code(&"x".repeat(65)),
            EventsError::MessageTooLarge { limit: 64 }
        ));
        for e in [code("not json"), code(r#"{"type":"dance"}"#)] {
            let v: Value = serde_json::from_str(&error(&e)).unwrap();
            assert_eq!(v["data"]["code"], "INVALID_MESSAGE");
        }
    }
}
