//! The gRPC adapter: EventService on top of [`EventsCore`]. Conversion only; errors become
//! statuses through `From<EventsError> for Status`.

use std::sync::Arc;

use futures_util::stream;
use peervault_proto::v1::{
    Event, FileOperationEvent, Lagged, PeerEvent, PublishRequest, PublishResponse, ReplayStart, SubscribeRequest,
    SystemEvent, event::Payload, event_service_server::EventService,
};
use peervault_runtime::{Caller, auth::Authorizer};
use tonic::{Request, Response, Status};

use crate::{
    core::EventsCore,
    error::EventsError,
    hub::{Delivery, Filter, Resume, Subscription},
    model,
    topics::{Topic, TopicSet},
};

/// A server stream as the generated code wants it.
type EventStream<T> = tonic::codegen::BoxStream<T>;

/// Most entries of Subscribe's `topics` list (there are 4 topics; repeats are tolerated).
pub const MAX_SUBSCRIBE_TOPICS: usize = 16;
/// Most entries of Subscribe's `types` list (there are 16 types; repeats are tolerated).
pub const MAX_SUBSCRIBE_TYPES: usize = 64;

/// The EventService implementation.
#[derive(Clone)]
pub struct EventApi {
    core: EventsCore,
    authorizer: Option<Arc<Authorizer>>,
}

impl EventApi {
    /// The service over `core`; with `authorizer`, streams end when the credential that opened
    /// them is revoked or expires.
    pub fn new(core: EventsCore, authorizer: Option<Arc<Authorizer>>) -> Self {
        EventApi { core, authorizer }
    }

    fn guard<T: Send + 'static>(&self, caller: Option<Caller>, stream: EventStream<T>) -> EventStream<T> {
        match &self.authorizer {
            Some(a) => a.end_when_invalid(caller, stream),
            None => stream,
        }
    }
}

fn caller<T>(req: &Request<T>) -> Option<Caller> {
    req.extensions().get::<Caller>().cloned()
}

const TRANSPORT: &str = "grpc";

/// A stream of whatever `map` makes of each delivery (`None`: skip it).
fn deliveries<T, F>(sub: Subscription, map: F) -> EventStream<T>
where
    T: Send + 'static,
    F: Fn(&Delivery) -> Option<T> + Send + 'static,
{
    Box::pin(stream::unfold((sub, map), |(mut sub, map)| async move {
        loop {
            let d = sub.next().await?;
            if let Some(item) = map(&d) {
                if let Delivery::Event(e) = &d {
                    sub.record_delivery(e);
                }
                return Some((Ok(item), (sub, map)));
            }
        }
    }))
}

fn control(kind: &str, payload: Payload, node: &str) -> Event {
    Event {
        r#type: kind.to_string(),
        timestamp: Some(model::now_timestamp()),
        node: node.to_string(),
        data_json: "{}".to_string(),
        payload: Some(payload),
        ..Default::default()
    }
}

/// The envelope a Subscribe stream carries for a delivery.
pub fn envelope(d: &Delivery, node: &str) -> Event {
    match d {
        Delivery::Event(e) => e.event.clone(),
        Delivery::Lagged(n) => control("lagged", Payload::Lagged(Lagged { missed: *n }), node),
        Delivery::ReplayStart(s) => control(
            "replay_start",
            Payload::ReplayStart(ReplayStart {
                first_available_sequence: *s,
            }),
            node,
        ),
    }
}

/// The key prefix the caller's file events are limited to (the runtime's confinement rule).
fn key_limit<T>(req: &Request<T>) -> Option<String> {
    peervault_runtime::auth::confine::event_prefix(req.extensions().get::<Caller>())
}

#[tonic::async_trait]
impl EventService for EventApi {
    async fn stream_file_operations(
        &self,
        req: Request<()>,
    ) -> Result<Response<EventStream<FileOperationEvent>>, Status> {
        let sub = self.core.hub.subscribe(
            Filter::topics([Topic::FileOperations].into_iter().collect()).limited_to(key_limit(&req)),
            None,
            TRANSPORT,
        )?;
        let stream = deliveries(sub, |d| match d {
            Delivery::Event(e) => match &e.event.payload {
                Some(Payload::FileOperation(f)) => Some(f.clone()),
                _ => None,
            },
            _ => None,
        });
        Ok(Response::new(self.guard(caller(&req), stream)))
    }

    async fn stream_peer_events(&self, req: Request<()>) -> Result<Response<EventStream<PeerEvent>>, Status> {
        let sub = self.core.hub.subscribe(
            Filter::topics([Topic::PeerNetwork].into_iter().collect()),
            None,
            TRANSPORT,
        )?;
        let stream = deliveries(sub, |d| match d {
            Delivery::Event(e) => match &e.event.payload {
                Some(Payload::Peer(p)) => Some(p.clone()),
                _ => None,
            },
            _ => None,
        });
        Ok(Response::new(self.guard(caller(&req), stream)))
    }

    async fn stream_system_events(&self, req: Request<()>) -> Result<Response<EventStream<SystemEvent>>, Status> {
        let topics: TopicSet = [Topic::System, Topic::Alerts].into_iter().collect();
        let sub = self.core.hub.subscribe(Filter::topics(topics), None, TRANSPORT)?;
        let stream = deliveries(sub, |d| match d {
            Delivery::Event(e) => match &e.event.payload {
                Some(Payload::System(s)) => Some(s.clone()),
                Some(Payload::Alert(a)) => Some(model::alert_as_system_event(a, &e.event.source, e.event.timestamp)),
                _ => None,
            },
            _ => None,
        });
        Ok(Response::new(self.guard(caller(&req), stream)))
    }

    async fn subscribe(&self, req: Request<SubscribeRequest>) -> Result<Response<EventStream<Event>>, Status> {
        let limit = key_limit(&req);
        let who = caller(&req);
        let r = req.into_inner();
        // Bounded before anything looks at them: the filter runs for every event delivered.
        for (field, given, limit) in [
            ("topics", r.topics.len(), MAX_SUBSCRIBE_TOPICS),
            ("types", r.types.len(), MAX_SUBSCRIBE_TYPES),
        ] {
            if given > limit {
                let e = EventsError::FilterTooLong { field, given, limit };
                self.core
                    .hub
                    .metrics()
                    .rejected
                    .with_label_values(&[e.metric_label()])
                    .inc();
                tracing::info!(field, given, limit, "Subscribe refused: filter list too long");
                return Err(e.into());
            }
        }
        let mut types = r.types;
        types.sort_unstable();
        types.dedup();
        let mut topics = TopicSet::EMPTY;
        for t in &r.topics {
            topics.insert(Topic::parse(t).ok_or_else(|| EventsError::UnknownTopic(t.clone()))?);
        }
        if r.topics.is_empty() {
            topics = TopicSet::ALL;
        }
        for ty in &types {
            if !topics.iter().any(|t| t.types().contains(&ty.as_str())) {
                return Err(Status::invalid_argument(format!(
                    "unknown event type '{ty}' for topics {:?}",
                    topics.iter().map(Topic::as_str).collect::<Vec<_>>()
                )));
            }
        }
        let filter = Filter {
            topics,
            types,
            source: r.source,
            key_prefix: limit,
        };
        let resume = r.since_sequence.map(|since_sequence| Resume {
            since_sequence,
            node: r.node,
        });
        let sub = self.core.hub.subscribe(filter, resume, TRANSPORT)?;
        let node = self.core.hub.node().to_string();
        let stream = deliveries(sub, move |d| Some(envelope(d, &node)));
        Ok(Response::new(self.guard(who, stream)))
    }

    async fn publish(&self, req: Request<PublishRequest>) -> Result<Response<PublishResponse>, Status> {
        let events = req.into_inner().events;
        let n = events.len();
        // This call's span (a batch of many requests' events) links to each event's span.
        let links = peervault_runtime::telemetry::link_traceparents(
            &tracing::Span::current(),
            events.iter().map(|e| e.traceparent.as_str()),
        );
        tracing::debug!(events = n, links, "Publish");
        let published = self.core.publish(events).inspect_err(|e| {
            tracing::info!(error = %e, events = n, "Publish refused");
        })?;
        Ok(Response::new(PublishResponse {
            accepted: published.accepted.len() as u32,
        }))
    }
}
