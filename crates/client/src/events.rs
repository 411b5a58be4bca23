//! Event subscriptions that survive reconnections without gaps (resuming from the last
//! sequence number seen).

use peervault_proto::v1::{Event, SubscribeRequest};
use tonic::Status;

use crate::{Client, Error, error::is_retryable};

/// Which events to receive.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Topics (`file_operations`, `peer_network`, `system`, `alerts`); empty means all.
    pub topics: Vec<String>,
    /// Event types (for example `file_uploaded`); empty means all.
    pub types: Vec<String>,
    /// Replay buffered events after this sequence number first; `None` means live only.
    pub since: Option<u64>,
    /// Only events from this source; empty means all.
    pub source: String,
}

/// A live subscription; [`EventWatch::next`] yields events in order and reconnects after
/// retryable failures, asking the server to replay from the last sequence number received.
pub struct EventWatch {
    client: Client,
    filter: EventFilter,
    stream: Option<tonic::Streaming<Event>>,
    last: Option<(u64, String)>,
    /// Reconnections made so far.
    pub reconnects: u32,
}

impl std::fmt::Debug for EventWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventWatch")
            .field("filter", &self.filter)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Subscribes to events. Returns once the server has accepted the subscription, so events
    /// that happen after this returns are delivered.
    pub async fn watch_events(&self, filter: EventFilter) -> Result<EventWatch, Error> {
        let mut w = EventWatch {
            client: self.clone(),
            filter,
            stream: None,
            last: None,
            reconnects: 0,
        };
        let policy = self.config().retry.clone();
        let s = policy.run("Subscribe", || w.open()).await.map_err(|s| self.err(s))?;
        w.stream = Some(s);
        Ok(w)
    }
}

impl EventWatch {
    fn open(&self) -> impl std::future::Future<Output = Result<tonic::Streaming<Event>, Status>> + use<> {
        let (since, node) = match &self.last {
            Some((seq, node)) => (Some(*seq), node.clone()),
            None => (self.filter.since, String::new()),
        };
        let req = SubscribeRequest {
            topics: self.filter.topics.clone(),
            types: self.filter.types.clone(),
            since_sequence: since,
            source: self.filter.source.clone(),
            node,
        };
        let mut c = self.client.events_client();
        let req = self.client.request(req, false);
        async move { c.subscribe(req).await.map(|r| r.into_inner()) }
    }

    /// The next event; `Ok(None)` never happens while the server runs (a server shutting down
    /// ends the stream, which is reconnected like a failure).
    pub async fn next(&mut self) -> Result<Option<Event>, Error> {
        let policy = self.client.config().retry.clone();
        let mut attempt = 0;
        loop {
            let result = match self.stream.as_mut() {
                Some(s) => s.message().await,
                None => match self.open().await {
                    Ok(s) => {
                        self.stream = Some(s);
                        continue;
                    }
                    Err(e) => Err(e),
                },
            };
            match result {
                Ok(Some(ev)) => {
                    if ev.sequence > 0 {
                        self.last = Some((ev.sequence, ev.node.clone()));
                    }
                    return Ok(Some(ev));
                }
                Ok(None) => {
                    self.stream = None;
                    attempt += 1;
                    if attempt > policy.max_retries {
                        return Ok(None);
                    }
                    self.reconnects += 1;
                    let d = policy.delay(attempt);
                    policy.note("Subscribe", attempt, &Status::unavailable("event stream ended"), d);
                    tokio::time::sleep(d).await;
                }
                Err(s) if is_retryable(&s) && attempt < policy.max_retries => {
                    self.stream = None;
                    attempt += 1;
                    self.reconnects += 1;
                    let d = policy.delay(attempt);
                    policy.note("Subscribe", attempt, &s, d);
                    tokio::time::sleep(d).await;
                }
                Err(s) => return Err(self.client.err(s)),
            }
        }
    }
}
