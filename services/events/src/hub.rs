//! The fan-out core: sequence numbers, the bounded replay buffer, duplicate suppression and
//! subscriptions with bounded lag. No transport code lives here.
//!
//! Every accepted event gets the next sequence number of this pod, goes into a ring buffer of
//! `replay_capacity` events (for resume) and into a broadcast ring of `subscriber_queue` events
//! that every subscriber reads at its own pace. A subscriber that falls more than
//! `subscriber_queue` events behind loses the oldest ones, is told how many it missed (a
//! [`Delivery::Lagged`]) and continues with the oldest event still held: it never slows the
//! publishers or the other subscribers, and the memory it costs does not grow with its lag.

use std::{
    collections::{HashSet, VecDeque},
    sync::{Arc, Mutex, MutexGuard, OnceLock},
    time::Instant,
};

use bytes::Bytes;
use peervault_proto::v1::{Event, event::Payload};
use tokio::sync::broadcast;

use crate::{
    error::{EventsError, MAX_BATCH},
    metrics::EventsMetrics,
    model,
    topics::{Topic, TopicSet},
};

/// Sizes of the core's buffers.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Id of this events pod, stamped on every event as `node`.
    pub node: String,
    /// Events kept for replay.
    pub replay_capacity: usize,
    /// Events a subscriber may fall behind before it lags.
    pub subscriber_queue: usize,
}

/// An accepted event as the transports need it.
#[derive(Debug)]
pub struct StoredEvent {
    /// The envelope with `sequence`, `node` and the typed payload set.
    pub event: Event,
    /// Its topic.
    pub topic: Topic,
    /// Its WebSocket rendering (JSON text), made once, when a WebSocket client first needs
    /// it: most events reach gRPC subscribers only, or nobody.
    ws_text: OnceLock<Bytes>,
    /// When this pod accepted it, for the publish→deliver latency.
    pub accepted_at: Instant,
}

impl StoredEvent {
    /// An event just accepted.
    pub fn new(event: Event, topic: Topic) -> Self {
        StoredEvent {
            event,
            topic,
            ws_text: OnceLock::new(),
            accepted_at: Instant::now(),
        }
    }

    /// Its WebSocket rendering (JSON text), shared by every WebSocket client.
    pub fn ws_text(&self) -> &Bytes {
        self.ws_text.get_or_init(|| Bytes::from(model::ws_json(&self.event)))
    }

    /// Its sequence number.
    pub fn sequence(&self) -> u64 {
        self.event.sequence
    }
}

/// What a subscription yields.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// An event.
    Event(Arc<StoredEvent>),
    /// The subscriber missed this many events (of its topics) by reading too slowly.
    Lagged(u64),
    /// Replay could not start where asked; it starts at this sequence.
    ReplayStart(u64),
}

/// Which events a subscription receives.
#[derive(Debug, Clone)]
pub struct Filter {
    /// Topics (empty set: none).
    pub topics: TopicSet,
    /// Types; empty means every type of the topics.
    pub types: Vec<String>,
    /// Source; empty means every source.
    pub source: String,
    /// For a caller limited to a key prefix: file events of other keys are withheld.
    pub key_prefix: Option<String>,
}

impl Filter {
    /// Every event.
    pub fn all() -> Filter {
        Filter {
            topics: TopicSet::ALL,
            types: vec![],
            source: String::new(),
            key_prefix: None,
        }
    }

    /// Every event of `topics`.
    pub fn topics(topics: TopicSet) -> Filter {
        Filter {
            topics,
            types: vec![],
            source: String::new(),
            key_prefix: None,
        }
    }

    /// The same filter, limited to file events under `prefix` when given.
    pub fn limited_to(mut self, prefix: Option<String>) -> Filter {
        self.key_prefix = prefix;
        self
    }

    /// Whether `e` passes.
    pub fn matches(&self, e: &StoredEvent) -> bool {
        self.topics.contains(e.topic)
            && (self.types.is_empty() || self.types.contains(&e.event.r#type))
            && (self.source.is_empty() || self.source == e.event.source)
            && self.key_visible(e)
    }

    fn key_visible(&self, e: &StoredEvent) -> bool {
        let Some(prefix) = &self.key_prefix else {
            return true;
        };
        if e.topic != Topic::FileOperations {
            return true;
        }
        // A file event without a typed key is withheld rather than guessed at.
        matches!(&e.event.payload, Some(Payload::FileOperation(f)) if f.file_key.starts_with(prefix.as_str()))
    }
}

/// Where a resuming subscriber left off.
#[derive(Debug, Clone, Default)]
pub struct Resume {
    /// The last sequence it received.
    pub since_sequence: u64,
    /// The events pod that sequence came from (empty: assume this one).
    pub node: String,
}

/// Result of a publish.
#[derive(Debug, Default)]
pub struct Published {
    /// The events taken in (duplicates excluded), in sequence order.
    pub accepted: Vec<Arc<StoredEvent>>,
    /// Events ignored as duplicates.
    pub duplicates: usize,
}

struct State {
    next_sequence: u64,
    ring: VecDeque<Arc<StoredEvent>>,
    ids: HashSet<String>,
    tx: Option<broadcast::Sender<Arc<StoredEvent>>>,
}

struct Inner {
    config: HubConfig,
    state: Mutex<State>,
    metrics: EventsMetrics,
}

/// The fan-out core. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl Hub {
    /// A hub with empty buffers; sequences start at 1.
    pub fn new(config: HubConfig, metrics: EventsMetrics) -> Hub {
        let config = HubConfig {
            replay_capacity: config.replay_capacity.max(1),
            subscriber_queue: config.subscriber_queue.max(1),
            ..config
        };
        let (tx, _) = broadcast::channel(config.subscriber_queue);
        Hub {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    next_sequence: 1,
                    ring: VecDeque::with_capacity(config.replay_capacity.min(65_536)),
                    ids: HashSet::new(),
                    tx: Some(tx),
                }),
                config,
                metrics,
            }),
        }
    }

    /// This pod's id.
    pub fn node(&self) -> &str {
        &self.inner.config.node
    }

    /// The sizes in force.
    pub fn config(&self) -> &HubConfig {
        &self.inner.config
    }

    /// The metrics.
    pub fn metrics(&self) -> &EventsMetrics {
        &self.inner.metrics
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; a poisoned lock still holds consistent data.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last sequence assigned (0 before the first event).
    pub fn last_sequence(&self) -> u64 {
        self.state().next_sequence - 1
    }

    /// The oldest sequence still buffered (the next one when the buffer is empty).
    pub fn first_available(&self) -> u64 {
        let st = self.state();
        st.ring.front().map(|e| e.sequence()).unwrap_or(st.next_sequence)
    }

    /// Validates a batch (all or nothing), then takes in every event whose id is new: assigns
    /// sequences, buffers and fans them out. Never waits for subscribers.
    pub fn publish(&self, events: Vec<Event>) -> Result<Published, EventsError> {
        let m = &self.inner.metrics;
        if events.len() > MAX_BATCH {
            let e = EventsError::BatchTooLarge(events.len());
            m.rejected.with_label_values(&[e.metric_label()]).inc();
            return Err(e);
        }
        let mut checked = Vec::with_capacity(events.len());
        for (i, mut e) in events.into_iter().enumerate() {
            match model::normalize(i, &mut e) {
                Ok((topic, _)) => checked.push((e, topic)),
                Err(err) => {
                    m.rejected.with_label_values(&[err.metric_label()]).inc();
                    return Err(err);
                }
            }
        }
        let mut out = Published::default();
        let (last, buffered) = {
            let mut st = self.state();
            if st.tx.is_none() {
                return Err(EventsError::ShuttingDown);
            }
            for (mut event, topic) in checked {
                if st.ids.contains(&event.id) {
                    out.duplicates += 1;
                    continue;
                }
                event.sequence = st.next_sequence;
                event.node = self.inner.config.node.clone();
                st.next_sequence += 1;
                let stored = Arc::new(StoredEvent::new(event, topic));
                st.ids.insert(stored.event.id.clone());
                st.ring.push_back(stored.clone());
                while st.ring.len() > self.inner.config.replay_capacity {
                    if let Some(old) = st.ring.pop_front() {
                        st.ids.remove(&old.event.id);
                    }
                }
                if let Some(tx) = &st.tx {
                    // An error only means nobody subscribes right now.
                    let _ = tx.send(stored.clone());
                }
                out.accepted.push(stored);
            }
            (st.next_sequence - 1, st.ring.len())
        };
        for e in &out.accepted {
            m.published.with_label_values(&[e.topic.as_str()]).inc();
        }
        m.duplicates.inc_by(out.duplicates as u64);
        m.last_sequence.set(last as i64);
        m.buffered.set(buffered as i64);
        Ok(out)
    }

    /// Opens a subscription for `transport` (`grpc`, `websocket`: a metric label). With
    /// `resume`, buffered events after `since_sequence` come first; when the buffer does not
    /// reach back that far, or the sequence is from another pod or newer than this pod's latest
    /// (the pod restarted), a [`Delivery::ReplayStart`] comes first and the whole buffer is
    /// replayed.
    pub fn subscribe(
        &self,
        filter: Filter,
        resume: Option<Resume>,
        transport: &'static str,
    ) -> Result<Subscription, EventsError> {
        let st = self.state();
        let Some(tx) = &st.tx else {
            return Err(EventsError::ShuttingDown);
        };
        let rx = tx.subscribe();
        let last = st.next_sequence - 1;
        let first = st.ring.front().map(|e| e.sequence()).unwrap_or(st.next_sequence);
        let mut control = None;
        let mut replay = VecDeque::new();
        if let Some(r) = resume {
            let other_node = !r.node.is_empty() && r.node != self.inner.config.node;
            let from = if other_node || r.since_sequence > last || r.since_sequence + 1 < first {
                control = Some(Delivery::ReplayStart(first));
                first
            } else {
                r.since_sequence + 1
            };
            let skip = from.saturating_sub(first) as usize;
            // Only the pointers are copied under the lock; the filter runs after it is released,
            // so a costly filter never stalls publishers or other subscribers.
            replay.extend(st.ring.iter().skip(skip).cloned());
        }
        drop(st);
        replay.retain(|e| filter.matches(e));
        self.inner.metrics.replayed.inc_by(replay.len() as u64);
        let gauge = self.inner.metrics.subscribers.with_label_values(&[transport]);
        gauge.inc();
        Ok(Subscription {
            hub: self.clone(),
            rx,
            filter,
            control,
            replay,
            stashed: None,
            cursor: last,
            lag_pending: false,
            transport,
            _guard: GaugeGuard(gauge),
        })
    }

    /// Counts the events in sequences `[from, to)` that `filter` would have passed, by topic;
    /// events no longer buffered count as missed of an unknown topic.
    fn count_missed(&self, from: u64, to: u64, filter: &Filter, transport: &str) -> u64 {
        if to <= from {
            return 0;
        }
        let st = self.state();
        let first = st.ring.front().map(|e| e.sequence()).unwrap_or(st.next_sequence);
        let gone = first.saturating_sub(from).min(to - from);
        let start = from.max(first);
        let missed: Vec<Arc<StoredEvent>> = if start < to {
            let skip = (start - first) as usize;
            st.ring.iter().skip(skip).take((to - start) as usize).cloned().collect()
        } else {
            Vec::new()
        };
        drop(st);
        // Filtered outside the lock, as in `subscribe`.
        let mut by_topic = [0u64; 4];
        for e in missed.iter().filter(|e| filter.matches(e)) {
            by_topic[e.topic as usize] += 1;
        }
        let m = &self.inner.metrics;
        if gone > 0 {
            m.dropped.with_label_values(&["unknown", transport]).inc_by(gone);
        }
        for t in crate::topics::TOPICS {
            if by_topic[t as usize] > 0 {
                m.dropped
                    .with_label_values(&[t.as_str(), transport])
                    .inc_by(by_topic[t as usize]);
            }
        }
        gone + by_topic.iter().sum::<u64>()
    }

    /// Stops the hub: subscriptions end after what they already hold, publishes and new
    /// subscriptions are refused with [`EventsError::ShuttingDown`].
    pub fn close(&self) {
        self.state().tx = None;
    }

    /// The buffered events (oldest first), for status pages and tests.
    pub fn buffered(&self) -> usize {
        self.state().ring.len()
    }
}

struct GaugeGuard(prometheus::IntGauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One subscriber's view of the hub: replayed events first, then live ones, with lag notices.
pub struct Subscription {
    hub: Hub,
    rx: broadcast::Receiver<Arc<StoredEvent>>,
    filter: Filter,
    control: Option<Delivery>,
    replay: VecDeque<Arc<StoredEvent>>,
    stashed: Option<Arc<StoredEvent>>,
    /// The last live sequence looked at (delivered or filtered out).
    cursor: u64,
    lag_pending: bool,
    transport: &'static str,
    _guard: GaugeGuard,
}

impl Subscription {
    fn held(&mut self) -> Option<Delivery> {
        if let Some(c) = self.control.take() {
            return Some(c);
        }
        if let Some(e) = self.replay.pop_front() {
            return Some(Delivery::Event(e));
        }
        self.stashed.take().map(Delivery::Event)
    }

    /// Handles one event from the broadcast ring; `None` when the filter drops it.
    fn on_event(&mut self, e: Arc<StoredEvent>) -> Option<Delivery> {
        let seq = e.sequence();
        if self.lag_pending {
            self.lag_pending = false;
            let missed = self
                .hub
                .count_missed(self.cursor + 1, seq, &self.filter, self.transport);
            self.cursor = seq;
            let pass = self.filter.matches(&e);
            if missed > 0 {
                self.hub
                    .inner
                    .metrics
                    .lag_notices
                    .with_label_values(&[self.transport])
                    .inc();
                if pass {
                    self.stashed = Some(e);
                }
                return Some(Delivery::Lagged(missed));
            }
            return pass.then_some(Delivery::Event(e));
        }
        if seq <= self.cursor {
            return None;
        }
        self.cursor = seq;
        self.filter.matches(&e).then_some(Delivery::Event(e))
    }

    /// The next delivery; `None` once the hub is closed and everything held was delivered.
    ///
    /// Cancel-safe: its only await point is the broadcast receive, and state changes happen
    /// after it returns.
    pub async fn next(&mut self) -> Option<Delivery> {
        if let Some(d) = self.held() {
            return Some(d);
        }
        loop {
            match self.rx.recv().await {
                Ok(e) => {
                    if let Some(d) = self.on_event(e) {
                        return Some(d);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => self.lag_pending = true,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The next delivery if one is ready now, without waiting (for transports that batch writes).
    pub fn try_next(&mut self) -> Option<Delivery> {
        if let Some(d) = self.held() {
            return Some(d);
        }
        loop {
            match self.rx.try_recv() {
                Ok(e) => {
                    if let Some(d) = self.on_event(e) {
                        return Some(d);
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => self.lag_pending = true,
                Err(_) => return None,
            }
        }
    }

    /// Records a delivery in the metrics (called by the transport once it handed the event on).
    pub fn record_delivery(&self, e: &StoredEvent) {
        let m = &self.hub.inner.metrics;
        m.delivered.with_label_values(&[e.topic.as_str(), self.transport]).inc();
        m.latency
            .with_label_values(&[self.transport])
            .observe(e.accepted_at.elapsed().as_secs_f64());
    }

    /// Changes the topics received from now on.
    pub fn set_topics(&mut self, topics: TopicSet) {
        self.filter.topics = topics;
    }

    /// Changes the key prefix file events are limited to from now on (the subscriber
    /// authenticated again with another credential).
    pub fn set_key_prefix(&mut self, prefix: Option<String>) {
        self.filter.key_prefix = prefix;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(replay: usize, queue: usize) -> Hub {
        Hub::new(
            HubConfig {
                node: "ev-0".into(),
                replay_capacity: replay,
                subscriber_queue: queue,
            },
            EventsMetrics::unregistered(),
        )
    }

    fn ev(id: &str, topic: &str, kind: &str) -> Event {
        Event {
            id: id.into(),
            topic: topic.into(),
            r#type: kind.into(),
            source: "blob/b0".into(),
            data_json: r#"{"key":"k"}"#.into(),
            ..Default::default()
        }
    }

    fn file(id: &str) -> Event {
        ev(id, "file_operations", "file_uploaded")
    }

    async fn next_seq(s: &mut Subscription) -> u64 {
        match s.next().await {
            Some(Delivery::Event(e)) => e.sequence(),
            other => panic!("expected an event, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn sequences_increase_and_duplicates_are_ignored() {
        let h = hub(100, 16);
        let mut s = h.subscribe(Filter::all(), None, "grpc").unwrap();
        let p = h.publish(vec![file("a"), file("b"), file("a")]).unwrap();
        assert_eq!((p.accepted.len(), p.duplicates), (2, 1));
        assert_eq!(next_seq(&mut s).await, 1);
        assert_eq!(next_seq(&mut s).await, 2);
        assert_eq!(h.publish(vec![file("b")]).unwrap().accepted.len(), 0);
        assert_eq!(h.last_sequence(), 2);
    }

    #[tokio::test]
    async fn a_bad_event_rejects_the_whole_batch() {
        let h = hub(100, 16);
        let err = h.publish(vec![file("a"), ev("b", "nope", "x")]).unwrap_err();
        assert!(matches!(err, EventsError::UnknownTopic(_)));
        assert_eq!(h.last_sequence(), 0);
        let big: Vec<Event> = (0..=MAX_BATCH).map(|i| file(&i.to_string())).collect();
        assert!(matches!(h.publish(big), Err(EventsError::BatchTooLarge(_))));
    }

    #[tokio::test]
    async fn resume_replays_exactly_what_was_missed() {
        let h = hub(100, 16);
        h.publish((1..=5).map(|i| file(&format!("e{i}"))).collect()).unwrap();
        let mut s = h
            .subscribe(
                Filter::all(),
                Some(Resume {
                    since_sequence: 3,
                    node: "ev-0".into(),
                }),
                "grpc",
            )
            .unwrap();
        h.publish(vec![file("e6")]).unwrap();
        for want in [4, 5, 6] {
            assert_eq!(next_seq(&mut s).await, want);
        }
    }

    #[tokio::test]
    async fn resume_older_than_the_buffer_says_where_replay_starts() {
        let h = hub(3, 16);
        h.publish((1..=6).map(|i| file(&format!("e{i}"))).collect()).unwrap();
        let mut s = h.subscribe(Filter::all(), Some(Resume::default()), "grpc").unwrap();
        assert!(matches!(s.next().await, Some(Delivery::ReplayStart(4))));
        for want in [4, 5, 6] {
            assert_eq!(next_seq(&mut s).await, want);
        }
        // A sequence from the future (the pod restarted) or another pod: the same.
        let mut s = h
            .subscribe(
                Filter::all(),
                Some(Resume {
                    since_sequence: 99,
                    node: String::new(),
                }),
                "grpc",
            )
            .unwrap();
        assert!(matches!(s.next().await, Some(Delivery::ReplayStart(4))));
        let mut s = h
            .subscribe(
                Filter::all(),
                Some(Resume {
                    since_sequence: 5,
                    node: "ev-1".into(),
                }),
                "grpc",
            )
            .unwrap();
        assert!(matches!(s.next().await, Some(Delivery::ReplayStart(4))));
    }

    #[tokio::test]
    async fn a_slow_subscriber_lags_without_slowing_a_fast_one() {
        let h = hub(1000, 8);
        let mut slow = h.subscribe(Filter::all(), None, "grpc").unwrap();
        let mut fast = h.subscribe(Filter::all(), None, "grpc").unwrap();
        for i in 0..100 {
            h.publish(vec![file(&format!("e{i}"))]).unwrap();
            assert_eq!(next_seq(&mut fast).await, i + 1);
        }
        match slow.next().await {
            Some(Delivery::Lagged(n)) => assert_eq!(n, 92),
            other => panic!("{other:?}"),
        }
        assert_eq!(next_seq(&mut slow).await, 93);
    }

    #[tokio::test]
    async fn filters_apply_to_live_replay_and_lag_counts() {
        let h = hub(1000, 4);
        let f = Filter {
            topics: TopicSet::ALL,
            types: vec!["file_deleted".into()],
            source: String::new(),
            key_prefix: None,
        };
        let mut s = h.subscribe(f, None, "grpc").unwrap();
        for i in 0..20 {
            let kind = if i % 2 == 0 { "file_deleted" } else { "file_uploaded" };
            h.publish(vec![ev(&format!("e{i}"), "file_operations", kind)]).unwrap();
        }
        // 20 published, 4 held; of the 16 missed, 8 were deletes.
        assert!(matches!(s.next().await, Some(Delivery::Lagged(8))));
        assert_eq!(next_seq(&mut s).await, 17);
        assert_eq!(next_seq(&mut s).await, 19);
    }

    #[tokio::test]
    async fn close_ends_subscriptions_and_refuses_publishes() {
        let h = hub(10, 4);
        let mut s = h.subscribe(Filter::all(), None, "grpc").unwrap();
        h.close();
        assert!(s.next().await.is_none());
        assert!(matches!(h.publish(vec![file("x")]), Err(EventsError::ShuttingDown)));
    }
}
