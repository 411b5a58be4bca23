//! The event envelope's data: validation of published events, conversion between the JSON
//! `data` object of the WebSocket API and the typed gRPC payloads, and the JSON rendering of an
//! event for WebSocket clients.

use std::{collections::HashMap, time::SystemTime};

use peervault_proto::v1::{Alert, Event, FileOperationEvent, PeerEvent, SystemEvent, event::Payload};
use serde_json::{Map, Value};

use crate::{error::EventsError, topics::Topic};

/// Now, in RFC 3339 with milliseconds (`2024-01-01T00:00:00.000Z`).
pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

pub use peervault_runtime::time::{now_timestamp, rfc3339};

/// The published short form of a file event type (`file_uploaded` → `upload`).
pub fn file_short(kind: &str) -> &'static str {
    match kind {
        "file_uploaded" => "upload",
        "file_deleted" => "delete",
        "file_updated" => "update",
        "file_replicated" => "replicate",
        _ => "unknown",
    }
}

/// The published short form of a peer event type (`peer_connected` → `connected`).
pub fn peer_short(kind: &str) -> &'static str {
    match kind {
        "peer_connected" => "connected",
        "peer_disconnected" => "disconnected",
        "peer_health_changed" => "health_changed",
        "network_topology_changed" => "topology_changed",
        _ => "unknown",
    }
}

/// A JSON value as metadata text: strings as they are, everything else as JSON.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Metadata text back to JSON: numbers, booleans, arrays and objects when it parses as one.
fn untext(s: &str) -> Value {
    match serde_json::from_str::<Value>(s) {
        Ok(v @ (Value::Number(_) | Value::Bool(_) | Value::Array(_) | Value::Object(_))) => v,
        _ => Value::String(s.to_string()),
    }
}

fn str_field(data: &Map<String, Value>, keys: &[&str]) -> String {
    keys.iter().find_map(|k| data.get(*k).map(text)).unwrap_or_default()
}

fn num_field(data: &Map<String, Value>, key: &str) -> f64 {
    match data.get(key) {
        Some(Value::Number(n)) => n.as_f64().unwrap_or(0.0),
        Some(Value::String(s)) => s.parse().unwrap_or(0.0),
        _ => 0.0,
    }
}

fn rest(data: &Map<String, Value>, skip: &[&str]) -> HashMap<String, String> {
    data.iter()
        .filter(|(k, _)| !skip.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), text(v)))
        .collect()
}

/// Flattens nested objects into dotted keys (`storage.totalSpace`).
fn flatten(prefix: &str, v: &Value, out: &mut HashMap<String, String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), text(other));
        }
    }
}

/// The component of a source (`blob/pod-0` → `blob`).
fn component_of(source: &str) -> String {
    source.split('/').next().unwrap_or_default().to_string()
}

/// The typed payload of an event from its data object.
pub fn payload_from_data(
    topic: Topic,
    kind: &str,
    source: &str,
    ts: &prost_types::Timestamp,
    data: &Map<String, Value>,
) -> Payload {
    match topic {
        Topic::FileOperations => Payload::FileOperation(FileOperationEvent {
            event_type: file_short(kind).to_string(),
            file_key: str_field(data, &["key", "file_key"]),
            peer_id: str_field(data, &["node", "peer_id"]),
            timestamp: Some(*ts),
            metadata: rest(data, &["key", "file_key", "node", "peer_id", "size", "timestamp"]),
            size: num_field(data, "size") as i64,
        }),
        Topic::PeerNetwork => Payload::Peer(PeerEvent {
            event_type: peer_short(kind).to_string(),
            peer_id: str_field(data, &["id", "peer_id"]),
            timestamp: Some(*ts),
            metadata: rest(data, &["id", "peer_id", "timestamp"]),
        }),
        Topic::System => {
            let mut metadata = HashMap::new();
            let figures: Map<String, Value> = data
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "message" | "component" | "timestamp"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            flatten("", &Value::Object(figures), &mut metadata);
            let component = match data.get("component") {
                Some(v) => text(v),
                None => component_of(source),
            };
            Payload::System(SystemEvent {
                event_type: kind.to_string(),
                component,
                timestamp: Some(*ts),
                message: str_field(data, &["message"]),
                metadata,
            })
        }
        Topic::Alerts => Payload::Alert(Alert {
            level: match data.get("level") {
                Some(v) => text(v),
                None => "warning".into(),
            },
            r#type: kind.to_string(),
            metric: str_field(data, &["metric"]),
            value: num_field(data, "value"),
            threshold: num_field(data, "threshold"),
            message: str_field(data, &["message"]),
        }),
    }
}

/// The data object of an event from its typed payload (for events published without data_json).
pub fn data_from_payload(payload: &Payload) -> Map<String, Value> {
    let mut m = Map::new();
    match payload {
        Payload::FileOperation(f) => {
            m.insert("key".into(), f.file_key.clone().into());
            m.insert("size".into(), f.size.into());
            m.insert("node".into(), f.peer_id.clone().into());
            for (k, v) in &f.metadata {
                m.insert(k.clone(), untext(v));
            }
        }
        Payload::Peer(p) => {
            m.insert("id".into(), p.peer_id.clone().into());
            for (k, v) in &p.metadata {
                m.insert(k.clone(), untext(v));
            }
        }
        Payload::System(s) => {
            for (k, v) in &s.metadata {
                // Dotted keys become nested objects again.
                let mut cur = &mut m;
                let parts: Vec<&str> = k.split('.').collect();
                for (i, part) in parts.iter().enumerate() {
                    if i + 1 == parts.len() {
                        cur.insert((*part).to_string(), untext(v));
                    } else {
                        let entry = cur
                            .entry((*part).to_string())
                            .or_insert_with(|| Value::Object(Map::new()));
                        if !entry.is_object() {
                            *entry = Value::Object(Map::new());
                        }
                        match entry {
                            Value::Object(o) => cur = o,
                            _ => break,
                        }
                    }
                }
            }
            if !s.message.is_empty() {
                m.insert("message".into(), s.message.clone().into());
            }
        }
        Payload::Alert(a) => {
            m.insert("level".into(), a.level.clone().into());
            m.insert("message".into(), a.message.clone().into());
            m.insert("metric".into(), a.metric.clone().into());
            m.insert("value".into(), a.value.into());
            m.insert("threshold".into(), a.threshold.into());
        }
        Payload::Lagged(_) | Payload::ReplayStart(_) => {}
    }
    m
}

/// Whether a payload is of the kind its topic carries.
fn payload_fits(topic: Topic, p: &Payload) -> bool {
    matches!(
        (topic, p),
        (Topic::FileOperations, Payload::FileOperation(_))
            | (Topic::PeerNetwork, Payload::Peer(_))
            | (Topic::System, Payload::System(_))
            | (Topic::Alerts, Payload::Alert(_))
    )
}

/// Checks one published event and completes it: a known topic and type, an id, a data object
/// (from `data_json`, else from the payload) and a typed payload (from the payload, else from
/// the data). Returns the topic and the data object.
pub fn normalize(index: usize, event: &mut Event) -> Result<(Topic, Map<String, Value>), EventsError> {
    if event.id.is_empty() {
        return Err(EventsError::MissingField { index, field: "id" });
    }
    if event.topic.is_empty() {
        return Err(EventsError::MissingField { index, field: "topic" });
    }
    if event.r#type.is_empty() {
        return Err(EventsError::MissingField { index, field: "type" });
    }
    let topic = Topic::parse(&event.topic).ok_or_else(|| EventsError::UnknownTopic(event.topic.clone()))?;
    if !topic.types().contains(&event.r#type.as_str()) {
        return Err(EventsError::UnknownType {
            topic: event.topic.clone(),
            kind: event.r#type.clone(),
        });
    }
    // As W3C trace context says of a header it cannot parse: ignore it (the event is fine).
    if !event.traceparent.is_empty() && peervault_runtime::telemetry::parse_traceparent(&event.traceparent).is_none() {
        tracing::debug!(index, "dropping an invalid traceparent from a published event");
        event.traceparent.clear();
    }
    let ts = *event.timestamp.get_or_insert_with(now_timestamp);
    let payload = event.payload.take().filter(|p| payload_fits(topic, p));
    let mut data = if !event.data_json.trim().is_empty() {
        match serde_json::from_str::<Value>(&event.data_json) {
            Ok(Value::Object(m)) => m,
            Ok(_) => {
                return Err(EventsError::InvalidData {
                    index,
                    reason: "not a JSON object".into(),
                });
            }
            Err(e) => {
                return Err(EventsError::InvalidData {
                    index,
                    reason: e.to_string(),
                });
            }
        }
    } else if let Some(p) = &payload {
        data_from_payload(p)
    } else {
        Map::new()
    };
    if topic != Topic::System && !data.contains_key("timestamp") {
        data.insert("timestamp".into(), rfc3339(&ts).into());
        event.data_json.clear();
    }
    if event.data_json.trim().is_empty() {
        // The envelope carries the complete data object, as the WebSocket clients see it.
        event.data_json = Value::Object(data.clone()).to_string();
    }
    event.payload = Some(match payload {
        Some(p) => p,
        None => payload_from_data(topic, &event.r#type, &event.source, &ts, &data),
    });
    Ok((topic, data))
}

/// The WebSocket rendering of an accepted event: the published `{type, topic, data, timestamp}`
/// plus `id`, `sequence`, `source` and `node` for clients that track positions, and
/// `traceparent` when the event carries its producer's span.
pub fn ws_json(event: &Event) -> String {
    let ts = event.timestamp.as_ref().map(rfc3339).unwrap_or_else(rfc3339_now);
    // After `normalize` the envelope's `data_json` is the complete data object (validated as
    // one), so it goes in as it is: no parse and render per event.
    let data = match event.data_json.trim() {
        "" => "{}",
        d => d,
    };
    let q = |v: &str| Value::from(v).to_string();
    // Keys in the order serde_json's map rendered them before (sorted).
    let mut out = format!(
        "{{\"data\":{data},\"id\":{},\"node\":{},\"sequence\":{},\"source\":{},\"timestamp\":{},\"topic\":{}",
        q(&event.id),
        q(&event.node),
        event.sequence,
        q(&event.source),
        q(&ts),
        q(&event.topic),
    );
    // The originating span, for clients that continue the trace; absent when there is none.
    if !event.traceparent.is_empty() {
        out.push_str(",\"traceparent\":");
        out.push_str(&q(&event.traceparent));
    }
    out.push_str(",\"type\":");
    out.push_str(&q(&event.r#type));
    out.push('}');
    out
}

/// An alert as the published SystemEvent of StreamSystemEvents (`warning`, or `error` for
/// critical alerts).
pub fn alert_as_system_event(a: &Alert, source: &str, ts: Option<prost_types::Timestamp>) -> SystemEvent {
    let mut metadata = HashMap::new();
    metadata.insert("alert_type".to_string(), a.r#type.clone());
    metadata.insert("level".to_string(), a.level.clone());
    metadata.insert("metric".to_string(), a.metric.clone());
    metadata.insert("value".to_string(), a.value.to_string());
    metadata.insert("threshold".to_string(), a.threshold.to_string());
    SystemEvent {
        event_type: if a.level == "critical" { "error" } else { "warning" }.to_string(),
        component: component_of(source),
        timestamp: ts,
        message: a.message.clone(),
        metadata,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(topic: &str, kind: &str, data: Value) -> Event {
        Event {
            id: "e1".into(),
            topic: topic.into(),
            r#type: kind.into(),
            source: "blob/pod-0".into(),
            data_json: data.to_string(),
            ..Default::default()
        }
    }

    #[test]
    fn file_data_becomes_the_published_file_operation_event() {
        let mut e = ev(
            "file_operations",
            "file_uploaded",
            json!({"key": "k1", "size": 1024, "node": "n1", "hash": "abc"}),
        );
        let (topic, data) = normalize(0, &mut e).unwrap();
        assert_eq!(topic, Topic::FileOperations);
        assert!(data.contains_key("timestamp"));
        let Some(Payload::FileOperation(f)) = &e.payload else {
            panic!("{:?}", e.payload)
        };
        assert_eq!(
            (f.event_type.as_str(), f.file_key.as_str(), f.peer_id.as_str()),
            ("upload", "k1", "n1")
        );
        assert_eq!(f.size, 1024);
        assert_eq!(f.metadata["hash"], "abc");
    }

    #[test]
    fn the_websocket_rendering_carries_the_complete_data_and_the_envelope() {
        let mut e = ev(
            "file_operations",
            "file_uploaded",
            json!({"key": "a \"quoted\" key\n", "size": 3, "nested": {"x": [1, 2]}}),
        );
        e.source = "blob/n\\1".into();
        let (_, data) = normalize(0, &mut e).unwrap();
        e.sequence = 42;
        e.node = "events-0".into();
        let ws: Value = serde_json::from_str(&ws_json(&e)).unwrap();
        assert_eq!(ws["data"], Value::Object(data));
        assert_eq!(ws["data"]["key"], "a \"quoted\" key\n");
        assert_eq!(
            (
                ws["type"].as_str(),
                ws["topic"].as_str(),
                ws["id"].as_str(),
                ws["source"].as_str(),
                ws["node"].as_str()
            ),
            (
                Some("file_uploaded"),
                Some("file_operations"),
                Some(e.id.as_str()),
                Some("blob/n\\1"),
                Some("events-0")
            )
        );
        assert_eq!(ws["sequence"], 42);
        assert!(ws["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(ws.get("traceparent").is_none());
    }

    #[test]
    fn a_typed_payload_gives_the_data_object() {
        let mut e = ev("system", "system_metrics", json!({}));
        e.data_json.clear();
        let mut metadata = HashMap::new();
        metadata.insert("storage.totalSpace".to_string(), "100".to_string());
        metadata.insert("storage.usedSpace".to_string(), "40".to_string());
        e.payload = Some(Payload::System(SystemEvent {
            event_type: "system_metrics".into(),
            metadata,
            ..Default::default()
        }));
        let (_, data) = normalize(0, &mut e).unwrap();
        assert_eq!(Value::Object(data)["storage"]["usedSpace"], 40);
    }

    #[test]
    fn bad_events_are_refused_with_a_reason() {
        let mut e = ev("files", "file_uploaded", json!({}));
        assert!(matches!(normalize(0, &mut e), Err(EventsError::UnknownTopic(_))));
        let mut e = ev("file_operations", "peer_connected", json!({}));
        assert!(matches!(normalize(0, &mut e), Err(EventsError::UnknownType { .. })));
        let mut e = ev("alerts", "storage_alert", json!([1]));
        assert!(matches!(
            normalize(3, &mut e),
            Err(EventsError::InvalidData { index: 3, .. })
        ));
        let mut e = ev("alerts", "storage_alert", json!({}));
        e.id.clear();
        assert!(matches!(
            normalize(0, &mut e),
            Err(EventsError::MissingField { field: "id", .. })
        ));
    }

    #[test]
    fn traceparent_travels_with_the_event_and_an_invalid_one_is_ignored() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut e = ev("file_operations", "file_uploaded", json!({"key": "k"}));
        e.traceparent = tp.into();
        normalize(0, &mut e).unwrap();
        assert_eq!(e.traceparent, tp);
        let ws: Value = serde_json::from_str(&ws_json(&e)).unwrap();
        assert_eq!(ws["traceparent"], tp);
        let mut e = ev("file_operations", "file_uploaded", json!({"key": "k"}));
        e.traceparent = "00-not-a-trace".into();
        normalize(0, &mut e).unwrap();
        assert!(e.traceparent.is_empty());
        let ws: Value = serde_json::from_str(&ws_json(&e)).unwrap();
        assert!(ws.get("traceparent").is_none());
    }

    #[test]
    fn alerts_keep_level_metric_value_threshold() {
        let mut e = ev(
            "alerts",
            "performance_alert",
            json!({"level": "critical", "message": "High memory usage detected", "metric": "memory_usage", "value": 85.5, "threshold": 80.0}),
        );
        normalize(0, &mut e).unwrap();
        let Some(Payload::Alert(a)) = &e.payload else { panic!() };
        assert_eq!((a.value, a.threshold, a.level.as_str()), (85.5, 80.0, "critical"));
        let s = alert_as_system_event(a, &e.source, e.timestamp);
        assert_eq!((s.event_type.as_str(), s.component.as_str()), ("error", "blob"));
        let ws: Value = serde_json::from_str(&ws_json(&e)).unwrap();
        assert_eq!(ws["type"], "performance_alert");
        assert!(ws["timestamp"].as_str().unwrap().ends_with('Z'));
    }
}
