//! The events service's metrics; every name is listed once in [`names`].

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Metric names of the events service (dashboards use only these and the runtime's).
pub mod names {
    /// Events taken into the buffer, by topic.
    pub const PUBLISHED_TOTAL: &str = "peervault_events_published_total";
    /// Published events ignored because their id was already seen.
    pub const DUPLICATES_TOTAL: &str = "peervault_events_duplicates_total";
    /// Published batches refused, by reason.
    pub const REJECTED_TOTAL: &str = "peervault_events_rejected_total";
    /// Events handed to subscribers, by topic and transport (`grpc`, `websocket`).
    pub const DELIVERED_TOTAL: &str = "peervault_events_delivered_total";
    /// Events subscribers missed because they read too slowly, by topic and transport.
    pub const DROPPED_TOTAL: &str = "peervault_events_dropped_total";
    /// Lagged notices sent, by transport.
    pub const LAG_NOTICES_TOTAL: &str = "peervault_events_lag_notices_total";
    /// Open subscriptions, by transport.
    pub const SUBSCRIBERS: &str = "peervault_events_subscribers";
    /// Events replayed to resuming subscribers.
    pub const REPLAYED_TOTAL: &str = "peervault_events_replayed_total";
    /// Events held in the replay buffer.
    pub const BUFFERED: &str = "peervault_events_buffered";
    /// The last sequence number assigned.
    pub const LAST_SEQUENCE: &str = "peervault_events_last_sequence";
    /// Time from an event's arrival at this pod to its hand-off to a subscriber's transport, by transport.
    pub const DELIVERY_LATENCY_SECONDS: &str = "peervault_events_delivery_latency_seconds";
    /// Open WebSocket connections.
    pub const WS_CONNECTIONS: &str = "peervault_events_ws_connections";
    /// WebSocket connections accepted.
    pub const WS_CONNECTIONS_TOTAL: &str = "peervault_events_ws_connections_total";
    /// WebSocket connections refused or closed by the server, by reason.
    pub const WS_REJECTS_TOTAL: &str = "peervault_events_ws_rejects_total";
    /// WebSocket messages received from clients, by message type (`invalid` when unparsable).
    pub const WS_MESSAGES_RECEIVED_TOTAL: &str = "peervault_events_ws_messages_received_total";
    /// WebSocket error messages sent, by code.
    pub const WS_ERRORS_TOTAL: &str = "peervault_events_ws_errors_total";
    /// Alerts raised by this pod's threshold rules, by type and level.
    pub const ALERTS_TOTAL: &str = "peervault_events_alerts_total";

    /// Every name above.
    pub const ALL: &[&str] = &[
        PUBLISHED_TOTAL,
        DUPLICATES_TOTAL,
        REJECTED_TOTAL,
        DELIVERED_TOTAL,
        DROPPED_TOTAL,
        LAG_NOTICES_TOTAL,
        SUBSCRIBERS,
        REPLAYED_TOTAL,
        BUFFERED,
        LAST_SEQUENCE,
        DELIVERY_LATENCY_SECONDS,
        WS_CONNECTIONS,
        WS_CONNECTIONS_TOTAL,
        WS_REJECTS_TOTAL,
        WS_MESSAGES_RECEIVED_TOTAL,
        WS_ERRORS_TOTAL,
        ALERTS_TOTAL,
    ];
}

/// The events service's collectors. Cheap to clone.
#[derive(Clone)]
pub struct EventsMetrics {
    /// `peervault_events_published_total{topic}`.
    pub published: IntCounterVec,
    /// `peervault_events_duplicates_total`.
    pub duplicates: IntCounter,
    /// `peervault_events_rejected_total{reason}`.
    pub rejected: IntCounterVec,
    /// `peervault_events_delivered_total{topic,transport}`.
    pub delivered: IntCounterVec,
    /// `peervault_events_dropped_total{topic,transport}`.
    pub dropped: IntCounterVec,
    /// `peervault_events_lag_notices_total{transport}`.
    pub lag_notices: IntCounterVec,
    /// `peervault_events_subscribers{transport}`.
    pub subscribers: IntGaugeVec,
    /// `peervault_events_replayed_total`.
    pub replayed: IntCounter,
    /// `peervault_events_buffered`.
    pub buffered: IntGauge,
    /// `peervault_events_last_sequence`.
    pub last_sequence: IntGauge,
    /// `peervault_events_delivery_latency_seconds{transport}`.
    pub latency: HistogramVec,
    /// `peervault_events_ws_connections`.
    pub ws_connections: IntGauge,
    /// `peervault_events_ws_connections_total`.
    pub ws_connections_total: IntCounter,
    /// `peervault_events_ws_rejects_total{reason}`.
    pub ws_rejects: IntCounterVec,
    /// `peervault_events_ws_messages_received_total{type}`.
    pub ws_received: IntCounterVec,
    /// `peervault_events_ws_errors_total{code}`.
    pub ws_errors: IntCounterVec,
    /// `peervault_events_alerts_total{type,level}`.
    pub alerts: IntCounterVec,
}

impl EventsMetrics {
    /// Creates the collectors and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        use names::*;
        let cv = |n: &str, h: &str, l: &[&str]| IntCounterVec::new(Opts::new(n, h), l);
        let m = EventsMetrics {
            published: cv(PUBLISHED_TOTAL, "Events taken into the buffer, by topic.", &["topic"])?,
            duplicates: IntCounter::new(DUPLICATES_TOTAL, "Published events ignored as duplicates.")?,
            rejected: cv(REJECTED_TOTAL, "Published batches refused, by reason.", &["reason"])?,
            delivered: cv(
                DELIVERED_TOTAL,
                "Events handed to subscribers, by topic and transport.",
                &["topic", "transport"],
            )?,
            dropped: cv(
                DROPPED_TOTAL,
                "Events subscribers missed by reading too slowly, by topic and transport.",
                &["topic", "transport"],
            )?,
            lag_notices: cv(LAG_NOTICES_TOTAL, "Lagged notices sent, by transport.", &["transport"])?,
            subscribers: IntGaugeVec::new(
                Opts::new(SUBSCRIBERS, "Open subscriptions, by transport."),
                &["transport"],
            )?,
            replayed: IntCounter::new(REPLAYED_TOTAL, "Events replayed to resuming subscribers.")?,
            buffered: IntGauge::new(BUFFERED, "Events held in the replay buffer.")?,
            last_sequence: IntGauge::new(LAST_SEQUENCE, "The last sequence number assigned.")?,
            latency: HistogramVec::new(
                HistogramOpts::new(
                    DELIVERY_LATENCY_SECONDS,
                    "Time from an event's arrival to its hand-off to a subscriber's transport.",
                )
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                ]),
                &["transport"],
            )?,
            ws_connections: IntGauge::new(WS_CONNECTIONS, "Open WebSocket connections.")?,
            ws_connections_total: IntCounter::new(WS_CONNECTIONS_TOTAL, "WebSocket connections accepted.")?,
            ws_rejects: cv(
                WS_REJECTS_TOTAL,
                "WebSocket connections refused or closed by the server, by reason.",
                &["reason"],
            )?,
            ws_received: cv(
                WS_MESSAGES_RECEIVED_TOTAL,
                "WebSocket messages received, by message type.",
                &["type"],
            )?,
            ws_errors: cv(WS_ERRORS_TOTAL, "WebSocket error messages sent, by code.", &["code"])?,
            alerts: cv(
                ALERTS_TOTAL,
                "Alerts raised by threshold rules, by type and level.",
                &["type", "level"],
            )?,
        };
        let all: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.published.clone()),
            Box::new(m.duplicates.clone()),
            Box::new(m.rejected.clone()),
            Box::new(m.delivered.clone()),
            Box::new(m.dropped.clone()),
            Box::new(m.lag_notices.clone()),
            Box::new(m.subscribers.clone()),
            Box::new(m.replayed.clone()),
            Box::new(m.buffered.clone()),
            Box::new(m.last_sequence.clone()),
            Box::new(m.latency.clone()),
            Box::new(m.ws_connections.clone()),
            Box::new(m.ws_connections_total.clone()),
            Box::new(m.ws_rejects.clone()),
            Box::new(m.ws_received.clone()),
            Box::new(m.ws_errors.clone()),
            Box::new(m.alerts.clone()),
        ];
        for c in all {
            registry.register(c)?;
        }
        Ok(m)
    }

    /// Collectors registered nowhere, for unit tests and benchmarks.
    pub fn unregistered() -> Self {
        // Registering into a fresh registry cannot collide.
        Self::new(&Registry::new()).unwrap_or_else(|e| panic!("metrics definitions are invalid: {e}"))
    }

    /// The latency histogram of one transport.
    pub fn latency_of(&self, transport: &str) -> Histogram {
        self.latency.with_label_values(&[transport])
    }
}
