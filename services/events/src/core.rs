//! The events service's domain: the fan-out hub and the alert rules, behind one publish call
//! that every adapter (gRPC Publish, this pod's own metrics, the WebSocket gateway's auth
//! failures) uses.

use std::sync::Arc;

use peervault_proto::v1::Event;

use crate::{
    alerts::AlertEngine,
    error::EventsError,
    hub::{Hub, Published},
};

/// Hub plus alert rules. Cheap to clone.
#[derive(Clone)]
pub struct EventsCore {
    /// The fan-out core.
    pub hub: Hub,
    alerts: Arc<AlertEngine>,
}

impl EventsCore {
    /// Joins a hub and its alert rules.
    pub fn new(hub: Hub, alerts: AlertEngine) -> Self {
        EventsCore {
            hub,
            alerts: Arc::new(alerts),
        }
    }

    /// Publishes a batch (see [`Hub::publish`]), then the alerts it triggers.
    pub fn publish(&self, events: Vec<Event>) -> Result<Published, EventsError> {
        let published = self.hub.publish(events)?;
        let alerts: Vec<Event> = published
            .accepted
            .iter()
            .filter(|e| e.topic != crate::topics::Topic::Alerts)
            .flat_map(|e| self.alerts.observe(e))
            .collect();
        self.publish_alerts(alerts);
        Ok(published)
    }

    fn publish_alerts(&self, alerts: Vec<Event>) {
        if alerts.is_empty() {
            return;
        }
        if let Err(e) = self.hub.publish(alerts) {
            // Only possible while shutting down.
            tracing::debug!(error = %e, "alerts not published");
        }
    }

    /// Records an authentication failure of `who`; publishes a security_alert when they repeat.
    pub fn auth_failure(&self, who: &str) {
        if let Some(a) = self.alerts.auth_failures(who, 1) {
            self.publish_alerts(vec![a]);
        }
    }
}
