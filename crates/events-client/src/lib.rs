//! Publishing events from blob and peer to the events service: never blocks the caller, sends in
//! batches to every configured events pod, reconnects with backoff, and counts what it drops.
//!
//! ```ignore
//! let publisher = EventPublisher::start(&ctx, endpoints)?;
//! publisher.publish(EventBuilder::new("file_operations", "file_uploaded").data(json!({"key": k})).build());
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use peervault_proto::v1::{Event, PublishRequest, event::Payload, event_service_client::EventServiceClient};
use peervault_runtime::{ServiceContext, client::ClientError};
use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use tokio::sync::mpsc;

/// Metric names of this crate (listed with the runtime's in the dashboards).
pub mod names {
    /// Events handed to an events pod, by topic.
    pub const PUBLISHED_TOTAL: &str = "peervault_events_client_published_total";
    /// Events dropped before reaching an events pod, by reason.
    pub const DROPPED_TOTAL: &str = "peervault_events_client_dropped_total";
    /// Events waiting in the queue of each events endpoint.
    pub const QUEUE_DEPTH: &str = "peervault_events_client_queue_depth";
}

/// Events queued per endpoint before new ones are dropped.
pub const QUEUE_CAPACITY: usize = 4096;
/// Most events in one Publish call.
pub const MAX_BATCH: usize = 256;

#[derive(Clone)]
struct PublisherMetrics {
    published: IntCounterVec,
    dropped: IntCounterVec,
    depth: IntGaugeVec,
}

impl PublisherMetrics {
    fn new(ctx: &ServiceContext) -> Result<Self, prometheus::Error> {
        let published = IntCounterVec::new(
            Opts::new(names::PUBLISHED_TOTAL, "Events accepted by an events pod, by topic."),
            &["topic"],
        )?;
        let dropped = IntCounterVec::new(
            Opts::new(
                names::DROPPED_TOTAL,
                "Events dropped before reaching an events pod, by reason.",
            ),
            &["reason"],
        )?;
        let depth = IntGaugeVec::new(
            Opts::new(names::QUEUE_DEPTH, "Events waiting to be sent, per events endpoint."),
            &["endpoint"],
        )?;
        // Registering twice (serve all builds one publisher per service) reuses the first set.
        for c in [
            Box::new(published.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(dropped.clone()),
            Box::new(depth.clone()),
        ] {
            match ctx.metrics.register(c) {
                Ok(()) | Err(prometheus::Error::AlreadyReg) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(PublisherMetrics {
            published,
            dropped,
            depth,
        })
    }
}

/// Why a publisher could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PublisherError {
    /// An endpoint is unusable.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Hands events to the events service without ever waiting for it. Cheap to clone.
#[derive(Clone)]
pub struct EventPublisher {
    queues: Arc<Vec<(String, mpsc::Sender<Event>)>>,
    metrics: PublisherMetrics,
    source: String,
    counter: Arc<AtomicU64>,
    last_drop_log: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl EventPublisher {
    /// Starts one sender task per events endpoint (`host:port`). With no endpoints, every event
    /// is dropped and counted under `reason="no_events_service"`.
    pub fn start(ctx: &ServiceContext, endpoints: &[String]) -> Result<Self, PublisherError> {
        let metrics = PublisherMetrics::new(ctx)?;
        let mut queues = Vec::new();
        for ep in endpoints {
            let channel = ctx.channel("--events-endpoint", ep)?;
            let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
            tokio::spawn(sender(
                ep.clone(),
                EventServiceClient::new(channel),
                rx,
                metrics.clone(),
            ));
            queues.push((ep.clone(), tx));
        }
        if endpoints.is_empty() {
            tracing::warn!(
                "no events service configured: events are dropped (counted in {})",
                names::DROPPED_TOTAL
            );
        }
        Ok(EventPublisher {
            queues: Arc::new(queues),
            metrics,
            source: format!("{}/{}", ctx.role, ctx.node_id),
            counter: Arc::new(AtomicU64::new(0)),
            last_drop_log: Arc::new(std::sync::Mutex::new(None)),
        })
    }

    /// The `source` stamped on events from this process (`<role>/<node-id>`).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Queues an event for every events pod. Fills in `id`, `timestamp` and `source` when empty.
    /// Never blocks: when a queue is full the event is dropped for that pod and counted.
    pub fn publish(&self, mut event: Event) {
        if event.id.is_empty() {
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_nanos();
            event.id = format!("{}-{nanos:x}-{n}", self.source);
        }
        if event.timestamp.is_none() {
            event.timestamp = Some(now_timestamp());
        }
        if event.source.is_empty() {
            event.source = self.source.clone();
        }
        if self.queues.is_empty() {
            self.drop_event("no_events_service");
            return;
        }
        for (ep, tx) in self.queues.iter() {
            match tx.try_send(event.clone()) {
                Ok(()) => self.metrics.depth.with_label_values(&[ep.as_str()]).inc(),
                Err(mpsc::error::TrySendError::Full(_)) => self.drop_event("queue_full"),
                Err(mpsc::error::TrySendError::Closed(_)) => self.drop_event("closed"),
            }
        }
    }

    fn drop_event(&self, reason: &str) {
        self.metrics.dropped.with_label_values(&[reason]).inc();
        let mut last = self.last_drop_log.lock().unwrap_or_else(|p| p.into_inner());
        // At most one log line per 10 s: a down events service must not flood the logs.
        if last.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            *last = Some(Instant::now());
            tracing::warn!(reason, "dropping events (see {} for the count)", names::DROPPED_TOTAL);
        }
    }
}

/// Builds an event envelope; `id`, `timestamp` and `source` are filled in by the publisher.
pub struct EventBuilder {
    event: Event,
}

impl EventBuilder {
    /// An event of `topic` (e.g. `file_operations`) and `kind` (e.g. `file_uploaded`).
    pub fn new(topic: &str, kind: &str) -> Self {
        EventBuilder {
            event: Event {
                topic: topic.to_string(),
                r#type: kind.to_string(),
                ..Default::default()
            },
        }
    }

    /// The `data` object, in the WebSocket API's shape.
    pub fn data(mut self, data: serde_json::Value) -> Self {
        self.event.data_json = data.to_string();
        self
    }

    /// The typed payload for gRPC subscribers.
    pub fn payload(mut self, payload: Payload) -> Self {
        self.event.payload = Some(payload);
        self
    }

    /// The finished envelope.
    pub fn build(self) -> Event {
        self.event
    }
}

/// The current time as a protobuf timestamp.
pub fn now_timestamp() -> prost_types::Timestamp {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// Sends batches to one events pod until the publisher is dropped, retrying a failed batch with
/// exponential backoff (100 ms to 10 s) while new events keep queueing (bounded).
async fn sender(
    endpoint: String,
    mut client: EventServiceClient<peervault_runtime::client::ServiceChannel>,
    mut rx: mpsc::Receiver<Event>,
    metrics: PublisherMetrics,
) {
    let depth = metrics.depth.with_label_values(&[endpoint.as_str()]);
    let mut batch: Vec<Event> = Vec::with_capacity(MAX_BATCH);
    let mut backoff = Duration::from_millis(100);
    let mut failing = false;
    loop {
        if batch.is_empty() {
            match rx.recv().await {
                Some(e) => batch.push(e),
                None => return,
            }
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let mut req = tonic::Request::new(PublishRequest { events: batch.clone() });
        req.set_timeout(Duration::from_secs(5));
        match client.publish(req).await {
            Ok(_) => {
                for e in &batch {
                    metrics.published.with_label_values(&[e.topic.as_str()]).inc();
                }
                depth.sub(batch.len() as i64);
                batch.clear();
                if failing {
                    tracing::info!(endpoint = %endpoint, "events service reachable again");
                    failing = false;
                }
                backoff = Duration::from_millis(100);
            }
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                // A batch the service refuses will never succeed: drop it rather than block the queue.
                tracing::warn!(endpoint = %endpoint, error = %status.message(), events = batch.len(), "events service rejected a batch");
                metrics
                    .dropped
                    .with_label_values(&["rejected"])
                    .inc_by(batch.len() as u64);
                depth.sub(batch.len() as i64);
                batch.clear();
            }
            Err(status) => {
                if !failing {
                    tracing::warn!(endpoint = %endpoint, code = ?status.code(), error = %status.message(), "cannot publish events; retrying with backoff");
                    failing = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}
