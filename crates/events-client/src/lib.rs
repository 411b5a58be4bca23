//! Publishing events from blob and peer to the events service: never blocks the caller, sends in
//! batches to every events pod it finds, reconnects with backoff, and counts what it drops.
//!
//! Events pods are found from `--events-endpoint`, a comma-separated list of `host:port`: an
//! IP address is one pod; a name is resolved again every `--dns-interval`, and every address it
//! resolves to (a headless Service's pods) gets its own queue, so each pod receives every
//! event. Each queue is bounded ([`QUEUE_CAPACITY`]); a full queue drops the event and counts it
//! in `peervault_events_client_dropped_total{reason}` (logged at most every 10 s).
//!
//! ```ignore
//! let publisher = EventPublisher::start(&ctx, &endpoints)?;
//! publisher.publish(EventBuilder::new("file_operations", "file_uploaded").data(json!({"key": k})).build());
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod sampler;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, OnceLock, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use peervault_proto::v1::{Event, PublishRequest, event::Payload, event_service_client::EventServiceClient};
use peervault_runtime::{
    ServiceContext,
    client::{ClientError, ServiceChannel},
};
use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use tokio::sync::mpsc;
use tracing::Instrument as _;

pub use sampler::MetricsSampler;

/// Metric names of this crate (listed with the runtime's in the dashboards).
pub mod names {
    /// Events handed to an events pod, by topic.
    pub const PUBLISHED_TOTAL: &str = "peervault_events_client_published_total";
    /// Events dropped before reaching an events pod, by reason.
    pub const DROPPED_TOTAL: &str = "peervault_events_client_dropped_total";
    /// Events waiting in the queue of each events endpoint.
    pub const QUEUE_DEPTH: &str = "peervault_events_client_queue_depth";
    /// Events pods currently published to.
    pub const ENDPOINTS: &str = "peervault_events_client_endpoints";

    /// Every name above.
    pub const ALL: &[&str] = &[PUBLISHED_TOTAL, DROPPED_TOTAL, QUEUE_DEPTH, ENDPOINTS];
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
    endpoints: prometheus::IntGauge,
}

/// One set of collectors per process: every publisher of the process (blob's, the metrics
/// reporter's) counts into it.
static METRICS: OnceLock<PublisherMetrics> = OnceLock::new();

impl PublisherMetrics {
    fn get(ctx: &ServiceContext) -> Result<Self, prometheus::Error> {
        if let Some(m) = METRICS.get() {
            return Ok(m.clone());
        }
        let m = PublisherMetrics {
            published: IntCounterVec::new(
                Opts::new(names::PUBLISHED_TOTAL, "Events accepted by an events pod, by topic."),
                &["topic"],
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    names::DROPPED_TOTAL,
                    "Events dropped before reaching an events pod, by reason.",
                ),
                &["reason"],
            )?,
            depth: IntGaugeVec::new(
                Opts::new(names::QUEUE_DEPTH, "Events waiting to be sent, per events endpoint."),
                &["endpoint"],
            )?,
            endpoints: prometheus::IntGauge::new(names::ENDPOINTS, "Events pods currently published to.")?,
        };
        let m = METRICS.get_or_init(|| m).clone();
        for c in [
            Box::new(m.published.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.dropped.clone()),
            Box::new(m.depth.clone()),
            Box::new(m.endpoints.clone()),
        ] {
            match ctx.metrics.register(c) {
                Ok(()) | Err(prometheus::Error::AlreadyReg) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(m)
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

/// Splits a `--events-endpoint` value (`host:port,host:port`) into endpoints.
pub fn parse_endpoints(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The host and port of `host:port` (IPv6 in brackets).
fn split_host(ep: &str) -> Option<(String, u16)> {
    let (host, port) = ep.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| (host.to_string(), port))
}

/// One events pod's queue.
struct Queue {
    label: String,
    tx: mpsc::Sender<Event>,
}

/// Hands events to the events service without ever waiting for it. Cheap to clone.
#[derive(Clone)]
pub struct EventPublisher {
    queues: Arc<RwLock<Vec<Queue>>>,
    configured: bool,
    metrics: PublisherMetrics,
    source: String,
    counter: Arc<AtomicU64>,
    last_drop_log: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl EventPublisher {
    /// Starts publishing to `endpoints` (each `host:port`, or several separated by commas):
    /// one sender task per events pod, and a resolver per name. With no endpoints, every event
    /// is dropped and counted under `reason="no_events_service"`.
    pub fn start(ctx: &ServiceContext, endpoints: &[String]) -> Result<Self, PublisherError> {
        let metrics = PublisherMetrics::get(ctx)?;
        let endpoints: Vec<String> = endpoints.iter().flat_map(|e| parse_endpoints(e)).collect();
        let queues = Arc::new(RwLock::new(Vec::new()));
        let mut names = Vec::new();
        for ep in &endpoints {
            // Validates the endpoint (and TLS files) up front: a typo stops start-up.
            let channel = ctx.channel("--events-endpoint", ep)?;
            let Some((host, port)) = split_host(ep) else { continue };
            if host.parse::<IpAddr>().is_ok() {
                let q = spawn_sender(ep.clone(), channel, &metrics);
                write(&queues).push(q);
            } else {
                names.push((host, port));
            }
        }
        for (host, port) in names {
            tokio::spawn(resolve_loop(ctx.clone(), host, port, queues.clone(), metrics.clone()));
        }
        metrics.endpoints.set(read(&queues).len() as i64);
        if endpoints.is_empty() {
            tracing::warn!(
                "no events service configured (--events-endpoint): events are dropped (counted in {})",
                names::DROPPED_TOTAL
            );
        }
        Ok(EventPublisher {
            queues,
            configured: !endpoints.is_empty(),
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
        // The span that produced the event (an upload's, a probe's…): subscribers can continue
        // its trace, and the batched Publish links to it.
        if event.traceparent.is_empty()
            && let Some(tp) = peervault_runtime::telemetry::current_traceparent()
        {
            event.traceparent = tp;
        }
        let queues = read(&self.queues);
        if queues.is_empty() {
            drop(queues);
            self.drop_event(if self.configured {
                "unresolved"
            } else {
                "no_events_service"
            });
            return;
        }
        for q in queues.iter() {
            match q.tx.try_send(event.clone()) {
                Ok(()) => self.metrics.depth.with_label_values(&[q.label.as_str()]).inc(),
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

fn read(q: &RwLock<Vec<Queue>>) -> std::sync::RwLockReadGuard<'_, Vec<Queue>> {
    q.read().unwrap_or_else(|p| p.into_inner())
}

fn write(q: &RwLock<Vec<Queue>>) -> std::sync::RwLockWriteGuard<'_, Vec<Queue>> {
    q.write().unwrap_or_else(|p| p.into_inner())
}

fn spawn_sender(label: String, channel: ServiceChannel, metrics: &PublisherMetrics) -> Queue {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    tokio::spawn(sender(
        label.clone(),
        EventServiceClient::new(channel),
        rx,
        metrics.clone(),
    ));
    Queue { label, tx }
}

/// A channel to `addr` that verifies the server certificate against `domain` (the DNS name the
/// address came from): the runtime's service channel, so rotated certificates apply.
fn channel_to(ctx: &ServiceContext, addr: SocketAddr, domain: &str) -> Result<ServiceChannel, ClientError> {
    ctx.channel_to("--events-endpoint", addr, domain)
}

/// Resolves `host` every `--dns-interval` and keeps one queue per address it resolves to.
/// IPv4 addresses are preferred when a name has both (one pod, two families).
async fn resolve_loop(
    ctx: ServiceContext,
    host: String,
    port: u16,
    queues: Arc<RwLock<Vec<Queue>>>,
    metrics: PublisherMetrics,
) {
    let interval = ctx.config.dns_interval.max(Duration::from_secs(1));
    let prefix = format!("{host}:{port}@");
    let mut failing = false;
    loop {
        match tokio::net::lookup_host((host.as_str(), port)).await {
            Ok(addrs) => {
                let all: Vec<SocketAddr> = addrs.collect();
                let v4: Vec<SocketAddr> = all.iter().copied().filter(SocketAddr::is_ipv4).collect();
                let mut chosen: BTreeMap<String, SocketAddr> = BTreeMap::new();
                for a in if v4.is_empty() { all } else { v4 } {
                    chosen.insert(format!("{prefix}{a}"), a);
                }
                let mut qs = write(&queues);
                let before = qs.len();
                // Pods that left: their queues go (and their senders stop).
                qs.retain(|q| !q.label.starts_with(&prefix) || chosen.contains_key(&q.label));
                let removed = before - qs.len();
                let mut added = 0;
                for (label, addr) in chosen {
                    if qs.iter().any(|q| q.label == label) {
                        continue;
                    }
                    match channel_to(&ctx, addr, &host) {
                        Ok(ch) => {
                            qs.push(spawn_sender(label, ch, &metrics));
                            added += 1;
                        }
                        Err(e) => tracing::warn!(endpoint = %addr, error = %e, "cannot publish to an events pod"),
                    }
                }
                metrics.endpoints.set(qs.len() as i64);
                if added + removed > 0 {
                    tracing::info!(name = %host, added, removed, pods = qs.len(), "events pods changed");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(name = %host, error = %e, "cannot resolve the events service; keeping the pods known so far");
                    failing = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = ctx.draining() => return,
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

pub use peervault_runtime::time::now_timestamp;

/// Publishes this process's system, storage, network and performance metrics events every
/// `--metrics-interval` (nothing when it is 0) until the process drains.
pub fn start_metrics_reporter(ctx: &ServiceContext, publisher: EventPublisher) {
    let interval = ctx.config.events.metrics_interval;
    if interval.is_zero() {
        return;
    }
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let mut sampler = MetricsSampler::new(&ctx);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = ctx.draining() => return,
            }
            for e in sampler.sample(publisher.source()) {
                publisher.publish(e);
            }
        }
    });
}

/// Sends batches to one events pod until its queue is dropped, retrying a failed batch with
/// exponential backoff (100 ms to 10 s) while new events keep queueing (bounded).
async fn sender(
    endpoint: String,
    mut client: EventServiceClient<ServiceChannel>,
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
        // A batch is a trace of its own (events of many requests travel together), linked to
        // the span of every event it carries. `parent: None` makes it a root even when the
        // worker thread still has a request's OpenTelemetry context attached (a contextual
        // root span would take that context as its parent).
        let span = tracing::info_span!(parent: None, "events.publish", otel.kind = "producer", endpoint = %endpoint, events = batch.len(), links = tracing::field::Empty);
        let links =
            peervault_runtime::telemetry::link_traceparents(&span, batch.iter().map(|e| e.traceparent.as_str()));
        span.record("links", links);
        match client.publish(req).instrument(span).await {
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
                if rx.is_closed() {
                    // This pod left (DNS no longer lists it): give up on what it still holds.
                    metrics
                        .dropped
                        .with_label_values(&["endpoint_gone"])
                        .inc_by(batch.len() as u64);
                    depth.sub(batch.len() as i64);
                    return;
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_lists_split_on_commas() {
        assert_eq!(parse_endpoints(" a:1, b:2 ,,"), ["a:1", "b:2"]);
        assert!(parse_endpoints("").is_empty());
        assert_eq!(split_host("[::1]:80"), Some(("::1".into(), 80)));
        assert_eq!(
            split_host("events-headless:8082"),
            Some(("events-headless".into(), 8082))
        );
        assert_eq!(split_host("nope"), None);
    }
}
