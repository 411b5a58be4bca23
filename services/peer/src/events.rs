//! Peer events (`peer_network` topic): built here, handed to the events client, which never
//! blocks and counts what it drops.

use std::collections::BTreeMap;

use peervault_events_client::{EventBuilder, EventPublisher, now_timestamp};
use peervault_proto::v1::{Event, PeerEvent, event::Payload};

/// Where peer events go.
pub trait EventSink: Send + Sync {
    /// Queues one event; must not block.
    fn publish(&self, event: Event);
}

impl EventSink for EventPublisher {
    fn publish(&self, event: Event) {
        EventPublisher::publish(self, event)
    }
}

/// The published short form of a WebSocket event type (`peer_connected` → `connected`).
fn short_type(kind: &str) -> &str {
    match kind {
        "peer_connected" => "connected",
        "peer_disconnected" => "disconnected",
        "peer_health_changed" => "health_changed",
        "network_topology_changed" => "topology_changed",
        other => other,
    }
}

/// A `peer_network` event with the WebSocket `data` object and the typed gRPC payload.
pub fn peer_event(kind: &str, peer_id: &str, metadata: &BTreeMap<String, String>, data: serde_json::Value) -> Event {
    let mut data = data;
    if let Some(obj) = data.as_object_mut() {
        obj.insert(
            "timestamp".into(),
            serde_json::Value::String(humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()),
        );
    }
    EventBuilder::new("peer_network", kind)
        .data(data)
        .payload(Payload::Peer(PeerEvent {
            event_type: short_type(kind).to_string(),
            peer_id: peer_id.to_string(),
            timestamp: Some(now_timestamp()),
            metadata: metadata.clone().into_iter().collect(),
        }))
        .build()
}

/// Test helpers.
#[cfg(test)]
pub mod testing {
    use std::sync::Mutex;

    use super::*;

    /// Keeps every event.
    #[derive(Default)]
    pub struct Collect(pub Mutex<Vec<Event>>);

    impl Collect {
        /// The types of the events kept, in order.
        pub fn kinds(&self) -> Vec<String> {
            self.0.lock().unwrap().iter().map(|e| e.r#type.clone()).collect()
        }
    }

    impl EventSink for Collect {
        fn publish(&self, event: Event) {
            self.0.lock().unwrap().push(event);
        }
    }
}
