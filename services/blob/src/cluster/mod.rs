//! The coordinator between the gRPC adapters and the local store. It places every file on R
//! owners (rendezvous hashing over the membership view), writes to a majority before it
//! acknowledges, reads the newest record from a majority, and repairs what is missing in the
//! background (hand-off queue, read repair, anti-entropy, scrub). With one member it is a
//! pass-through to the store: no copies, no RPCs.

mod batch;
mod blobs;
pub mod config;
mod files;
pub mod handoff;
pub mod hlc;
pub mod metrics;
pub mod placement;
mod read;
mod repair;
pub mod server;
mod sync;
mod tombstones;
mod write;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use peervault_events_client::{EventBuilder, EventPublisher};
use peervault_membership::MembershipView;
use peervault_proto::v1::{
    CommitRecordRequest, CommitRecordsRequest, FileRecord, GetRecordsRequest, PeerHealthState, PutRecordRequest,
    PutRecordResponse, PutRecordsRequest, RecordQuery, replication_service_client::ReplicationServiceClient,
};
use peervault_runtime::{ServiceContext, client::ServiceChannel};
use tokio::sync::{Notify, watch};

pub use blobs::blob_key_of;
pub use config::ClusterConfig;
pub use files::Replicas;
pub use read::{ReadOutcome, ReplicaState};
pub use write::Replicator;

use crate::{
    error::{BlobError, Result},
    store::{Store, records::Hlc, replica::key_partition},
};
use placement::Placement;

/// Largest chunk piece in one replication message.
pub const MAX_PIECE: usize = 1024 * 1024;

/// Chunks in flight per replica stream during a write (memory per upload stays bounded by
/// this times the chunk size, per replica).
pub const WINDOW: usize = 4;

/// How long a pending record is held before it is dropped.
pub const PENDING_TTL: Duration = Duration::from_secs(30);

/// Most bytes of pending records held in memory.
pub const PENDING_MAX_BYTES: usize = 64 * 1024 * 1024;

/// A member as the coordinator sees it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Member id.
    pub id: String,
    /// `host:port` of its gRPC endpoint.
    pub endpoint: String,
    /// Ready and not down.
    pub ready: bool,
    /// Health rank: lower is better (healthy, degraded, unknown, down).
    pub rank: u8,
}

/// The membership as placement uses it.
#[derive(Debug, Clone)]
pub struct Layout {
    /// View version.
    pub version: u64,
    /// Members by id.
    pub peers: BTreeMap<String, Peer>,
    /// This pod's member id, when the view lists it.
    pub self_id: Option<String>,
    /// Owners under the current view.
    pub placement: Placement,
    /// Owners under the view before the last change, while data may still be moving.
    pub previous: Option<Placement>,
}

impl Layout {
    fn solo(factor: usize) -> Self {
        Layout {
            version: 0,
            peers: BTreeMap::new(),
            self_id: None,
            placement: Placement::new(&[], factor),
            previous: None,
        }
    }

    /// Whether this pod is the only member (or no view is known): the pass-through case.
    pub fn is_solo(&self) -> bool {
        self.peers.len() <= 1 && (self.peers.is_empty() || self.self_id.is_some())
    }

    /// Whether going from this layout to `next` can change what an anti-entropy round finds:
    /// members, their endpoints or readiness, this pod's id, or placement. A new health rank
    /// alone (a probe's latency) only reorders reads and starts no round, which walks the
    /// store, however often probes report.
    pub fn changes_what_repair_sees(&self, next: &Layout) -> bool {
        self.placement != next.placement
            || self.self_id != next.self_id
            || self.peers.len() != next.peers.len()
            || self
                .peers
                .iter()
                .zip(&next.peers)
                .any(|((a, pa), (b, pb))| a != b || pa.endpoint != pb.endpoint || pa.ready != pb.ready)
    }

    /// Owners of `key`: the current owners, then any previous ones not among them.
    pub fn owners(&self, key: &str) -> Vec<String> {
        let p = key_partition(key);
        let mut out: Vec<String> = self.placement.owners(p).to_vec();
        if let Some(prev) = &self.previous {
            for o in prev.owners(p) {
                if !out.contains(o) && self.peers.contains_key(o) {
                    out.push(o.clone());
                }
            }
        }
        out
    }

    /// Current owners of `key` only.
    pub fn current_owners(&self, key: &str) -> &[String] {
        self.placement.owners(key_partition(key))
    }

    /// Whether `id` is this pod.
    pub fn is_self(&self, id: &str) -> bool {
        self.self_id.as_deref() == Some(id)
    }
}

fn rank(health: i32, ready: bool) -> u8 {
    if !ready {
        return 3;
    }
    match PeerHealthState::try_from(health) {
        Ok(PeerHealthState::Healthy) => 0,
        Ok(PeerHealthState::Degraded) => 1,
        Ok(PeerHealthState::Down) => 3,
        _ => 2,
    }
}

/// Majority of `n` owners.
pub fn majority(n: usize) -> usize {
    n / 2 + 1
}

struct PendingRecord {
    record: FileRecord,
    expires: Instant,
    bytes: usize,
}

#[derive(Default)]
struct Pending {
    map: HashMap<(String, (u64, u32, String)), PendingRecord>,
    bytes: usize,
}

struct Inner {
    store: Store,
    cfg: ClusterConfig,
    ctx: ServiceContext,
    self_endpoint: String,
    clock: hlc::Clock,
    metrics: metrics::ClusterMetrics,
    layout: RwLock<Arc<Layout>>,
    clients: Mutex<HashMap<String, PeerLink>>,
    pending: Mutex<Pending>,
    handoff: handoff::Handoff,
    handoff_wake: Notify,
    events: EventPublisher,
    layout_changed: Notify,
    throttle: sync::Throttle,
    /// Follows a membership view (`--peer-endpoint`): writes are records that can replicate,
    /// even while this pod is the only member.
    replicates: bool,
}

type Client = ReplicationServiceClient<ServiceChannel>;

/// The coalesced calls to one peer (see [`batch`]): record reads, pending and commit rounds.
pub(crate) struct PeerCalls {
    /// GetRecords.
    pub get: batch::Batcher<RecordQuery, Option<FileRecord>>,
    /// PutRecords (the pending round, and whole records).
    pub put: batch::Batcher<PutRecordRequest, PutRecordResponse>,
    /// CommitRecords.
    pub commit: batch::Batcher<CommitRecordRequest, PutRecordResponse>,
}

/// A channel to one peer: its endpoint, client and batchers.
struct PeerLink {
    endpoint: String,
    client: Client,
    calls: Arc<PeerCalls>,
}

/// Runs one replication call with `timeout`.
async fn timed_call<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded("replica did not answer in time")),
    }
}

fn put_results(r: peervault_proto::v1::PutRecordsResponse) -> Vec<Result<PutRecordResponse, tonic::Status>> {
    r.results
        .into_iter()
        .map(|x| batch::item_result(x.status).map(|()| x.response.unwrap_or_default()))
        .collect()
}

impl PeerCalls {
    fn new(client: &Client, timeout: Duration, sizes: &prometheus::HistogramVec) -> Self {
        let c = client.clone();
        let get: batch::BatchCall<RecordQuery, Option<FileRecord>> = Arc::new(move |queries| {
            let mut c = c.clone();
            Box::pin(async move {
                let r = timed_call(timeout, c.get_records(GetRecordsRequest { queries })).await?;
                Ok(r.results
                    .into_iter()
                    .map(|x| batch::item_result(x.status).map(|()| x.record))
                    .collect())
            })
        });
        let c = client.clone();
        let put: batch::BatchCall<PutRecordRequest, PutRecordResponse> = Arc::new(move |requests| {
            let mut c = c.clone();
            Box::pin(async move {
                let r = timed_call(timeout, c.put_records(PutRecordsRequest { requests })).await?;
                Ok(put_results(r))
            })
        });
        let c = client.clone();
        let commit: batch::BatchCall<CommitRecordRequest, PutRecordResponse> = Arc::new(move |requests| {
            let mut c = c.clone();
            Box::pin(async move {
                let r = timed_call(timeout, c.commit_records(CommitRecordsRequest { requests })).await?;
                Ok(put_results(r))
            })
        });
        let h = |call: &str| Some(sizes.with_label_values(&[call]));
        PeerCalls {
            get: batch::Batcher::new(get, batch::MAX_BATCH, h("get_records")),
            put: batch::Batcher::new(put, batch::MAX_BATCH, h("put_records")),
            commit: batch::Batcher::new(commit, batch::MAX_BATCH, h("commit_records")),
        }
    }
}

/// The coordinator. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

fn hlc_tuple(h: &Hlc) -> (u64, u32, String) {
    (h.physical_ms, h.logical, h.node_id.clone())
}

impl Cluster {
    /// A coordinator over `store` following `view` (none: this pod alone). Starts the
    /// background workers (layout updates, hand-off, anti-entropy, scrub).
    pub fn start(
        ctx: &ServiceContext,
        store: Store,
        cfg: ClusterConfig,
        view: Option<watch::Receiver<MembershipView>>,
        events: EventPublisher,
        registry: Option<&prometheus::Registry>,
    ) -> Result<Cluster> {
        let metrics = metrics::ClusterMetrics::new(registry)
            .map_err(|e| BlobError::Unavailable(format!("replication metrics: {e}")))?;
        let handoff = handoff::Handoff::open(&store.root().join("handoff.redb"))?;
        let factor = cfg.replication_factor.max(1);
        let cfg_rate = cfg.repair_bytes_per_second;
        let cluster = Cluster {
            inner: Arc::new(Inner {
                store,
                cfg,
                ctx: ctx.clone(),
                self_endpoint: ctx.self_endpoint(),
                clock: hlc::Clock::new(&ctx.node_id),
                metrics,
                layout: RwLock::new(Arc::new(Layout::solo(factor))),
                clients: Mutex::new(HashMap::new()),
                pending: Mutex::new(Pending::default()),
                handoff,
                handoff_wake: Notify::new(),
                events,
                layout_changed: Notify::new(),
                throttle: sync::Throttle::new(cfg_rate),
                replicates: view.is_some(),
            }),
        };
        if let Ok(n) = cluster.inner.handoff.len() {
            cluster.inner.metrics.handoff_depth.set(n as i64);
            cluster.inner.metrics.under_replicated.set(n as i64);
        }
        if let Some(mut view) = view {
            let initial = view.borrow().clone();
            cluster.set_view(&initial);
            let c = cluster.clone();
            let drain = ctx.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        r = view.changed() => if r.is_err() { return },
                        _ = drain.draining() => return,
                    }
                    let v = view.borrow_and_update().clone();
                    c.set_view(&v);
                }
            });
        }
        repair::spawn_workers(&cluster);
        Ok(cluster)
    }

    /// The store behind the coordinator.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The layout in force.
    pub fn layout(&self) -> Arc<Layout> {
        self.inner.layout.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether this pod follows a membership view and so may replicate (a blob pod with
    /// `--peer-endpoint`), even while it is the only member; `serve all` does not.
    pub fn replicates(&self) -> bool {
        self.inner.replicates
    }

    /// Whether calls go straight to the local store (one member).
    pub fn is_solo(&self) -> bool {
        self.layout().is_solo()
    }

    /// The replication metrics.
    pub fn metrics(&self) -> &metrics::ClusterMetrics {
        &self.inner.metrics
    }

    /// This pod's clock.
    pub fn clock(&self) -> &hlc::Clock {
        &self.inner.clock
    }

    /// A new clock reading for a local write.
    pub fn now(&self) -> Hlc {
        self.inner.clock.now()
    }

    fn set_view(&self, view: &MembershipView) {
        let mut peers = BTreeMap::new();
        let mut members = Vec::new();
        let mut self_id = None;
        for m in view.members.values() {
            let endpoint = format!("{}:{}", m.address, m.port);
            if endpoint == self.inner.self_endpoint
                || m.id == self.inner.self_endpoint
                || m.id == self.inner.ctx.node_id
            {
                self_id = Some(m.id.clone());
            }
            peers.insert(
                m.id.clone(),
                Peer {
                    id: m.id.clone(),
                    endpoint,
                    ready: m.ready,
                    rank: rank(m.health, m.ready),
                },
            );
            members.push(placement::Member {
                id: m.id.clone(),
                zone: m.zone.clone(),
                node: m.node_name.clone(),
            });
        }
        let placement = Placement::new(&members, self.inner.cfg.replication_factor);
        let mut guard = self.inner.layout.write().unwrap_or_else(|p| p.into_inner());
        let old = guard.clone();
        let moved = old.placement != placement && !old.peers.is_empty();
        let previous = if moved {
            Some(old.placement.clone())
        } else {
            old.previous.clone()
        };
        let layout = Layout {
            version: view.version,
            peers,
            self_id,
            placement,
            previous,
        };
        self.inner.metrics.members.set(layout.peers.len() as i64);
        self.inner.metrics.factor.set(layout.placement.factor as i64);
        if moved || old.peers.len() != layout.peers.len() {
            tracing::info!(
                version = layout.version,
                members = layout.peers.len(),
                factor = layout.placement.factor,
                self_id = ?layout.self_id,
                moving = layout.previous.is_some(),
                "replication layout changed"
            );
        }
        let relevant = old.changes_what_repair_sees(&layout);
        *guard = Arc::new(layout);
        drop(guard);
        if relevant {
            self.inner.layout_changed.notify_waiters();
        }
        self.inner.handoff_wake.notify_one();
    }

    /// Marks the partitions in motion as settled: reads and writes use the current owners only.
    fn settle(&self, version: u64) {
        let mut guard = self.inner.layout.write().unwrap_or_else(|p| p.into_inner());
        if guard.version == version && guard.previous.is_some() {
            let mut l = (**guard).clone();
            l.previous = None;
            *guard = Arc::new(l);
            tracing::info!(version, "rebalance complete: writes go to the current owners only");
        }
    }

    /// The channel to member `id` (`None` when it is not in the view or its endpoint is bad).
    fn link(&self, id: &str) -> Option<(Client, Arc<PeerCalls>)> {
        let layout = self.layout();
        let peer = layout.peers.get(id)?;
        let mut clients = self.inner.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = clients.get(id)
            && l.endpoint == peer.endpoint
        {
            return Some((l.client.clone(), l.calls.clone()));
        }
        match self.inner.ctx.channel("--peers", &peer.endpoint) {
            Ok(ch) => {
                let c = ReplicationServiceClient::new(ch)
                    .max_decoding_message_size(self.inner.ctx.config.max_message_size as usize)
                    .max_encoding_message_size(self.inner.ctx.config.max_message_size as usize);
                let calls = Arc::new(PeerCalls::new(
                    &c,
                    self.inner.cfg.replication_timeout,
                    &self.inner.metrics.batch_size,
                ));
                clients.insert(
                    id.to_string(),
                    PeerLink {
                        endpoint: peer.endpoint.clone(),
                        client: c.clone(),
                        calls: calls.clone(),
                    },
                );
                Some((c, calls))
            }
            Err(e) => {
                tracing::warn!(peer = %id, error = %e, "cannot build a channel to a replica");
                None
            }
        }
    }

    /// A client for member `id` (`None` when it is not in the view or its endpoint is bad).
    fn client(&self, id: &str) -> Option<ReplicationServiceClient<ServiceChannel>> {
        self.link(id).map(|(c, _)| c)
    }

    /// A fresh service channel to member `id` (for a call relayed to it, such as a resumed
    /// upload held there); `None` when the view does not list it.
    pub fn member_channel(&self, id: &str) -> Option<ServiceChannel> {
        let layout = self.layout();
        let peer = layout.peers.get(id)?;
        match self.inner.ctx.channel("--peers", &peer.endpoint) {
            Ok(ch) => Some(ch),
            Err(e) => {
                tracing::warn!(peer = %id, error = %e, "cannot build a channel to a member");
                None
            }
        }
    }

    /// The coalescing batchers for member `id`.
    pub(crate) fn calls(&self, id: &str) -> Option<Arc<PeerCalls>> {
        self.link(id).map(|(_, b)| b)
    }

    /// Runs one replication call with the replication timeout.
    async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        timed_call(self.inner.cfg.replication_timeout, fut).await
    }

    /// Holds a record invisible until it is committed (or expires).
    pub fn hold_pending(&self, record: FileRecord) -> Result<()> {
        let Some(h) = record.hlc.as_ref() else {
            return Err(BlobError::invalid("pending record without a clock"));
        };
        let key = (record.key.clone(), (h.physical_ms, h.logical, h.node_id.clone()));
        let bytes = record.inline_data.len() + record.key.len() + 256;
        let now = Instant::now();
        let mut p = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
        if p.bytes + bytes > PENDING_MAX_BYTES {
            let expired: Vec<_> = p
                .map
                .iter()
                .filter(|(_, v)| v.expires <= now)
                .map(|(k, _)| k.clone())
                .collect();
            for k in expired {
                if let Some(v) = p.map.remove(&k) {
                    p.bytes -= v.bytes;
                }
            }
            if p.bytes + bytes > PENDING_MAX_BYTES {
                return Err(BlobError::Unavailable(
                    "too many writes pending on this replica; retry shortly".into(),
                ));
            }
        }
        p.bytes += bytes;
        if let Some(old) = p.map.insert(
            key,
            PendingRecord {
                record,
                expires: now + PENDING_TTL,
                bytes,
            },
        ) {
            p.bytes -= old.bytes;
        }
        Ok(())
    }

    /// Takes a pending record out (to commit it).
    pub fn take_pending(&self, key: &str, hlc: &Hlc) -> Option<FileRecord> {
        let mut p = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
        let v = p.map.remove(&(key.to_string(), hlc_tuple(hlc)))?;
        p.bytes -= v.bytes;
        (v.expires > Instant::now()).then_some(v.record)
    }

    /// Queues replicas to write later, durably, and wakes the hand-off worker.
    async fn enqueue(&self, entries: Vec<handoff::Entry>) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let q = self.inner.handoff.clone();
        let n = entries.len();
        tokio::task::spawn_blocking(move || q.push(&entries))
            .await
            .map_err(|e| BlobError::Unavailable(format!("hand-off task failed: {e}")))??;
        self.inner.metrics.handoff_depth.add(n as i64);
        self.inner.metrics.under_replicated.add(n as i64);
        self.inner.handoff_wake.notify_one();
        Ok(())
    }

    /// Entries in the hand-off queue (tests, status).
    pub fn handoff_len(&self) -> u64 {
        self.inner.handoff.len().unwrap_or(0)
    }

    fn publish_replicated(&self, key: &str, target: &str) {
        let ts = peervault_runtime::time::now_timestamp();
        self.inner.events.publish(
            EventBuilder::new("file_operations", "file_replicated")
                .data(serde_json::json!({
                    "key": crate::store::replica::display_key(key),
                    "node": self.inner.ctx.node_id,
                    "replica": target,
                    "timestamp": peervault_runtime::time::rfc3339(&ts),
                }))
                .build(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(members: &[(&str, bool, u8)]) -> Layout {
        let ms: Vec<placement::Member> = members
            .iter()
            .map(|(id, _, _)| placement::Member {
                id: id.to_string(),
                zone: String::new(),
                node: String::new(),
            })
            .collect();
        Layout {
            version: 1,
            peers: members
                .iter()
                .map(|(id, ready, rank)| {
                    (
                        id.to_string(),
                        Peer {
                            id: id.to_string(),
                            endpoint: format!("{id}:7000"),
                            ready: *ready,
                            rank: *rank,
                        },
                    )
                })
                .collect(),
            self_id: Some("a".into()),
            placement: Placement::new(&ms, 3),
            previous: None,
        }
    }

    #[test]
    fn a_health_rank_alone_starts_no_repair_round_but_membership_and_readiness_do() {
        let base = layout(&[("a", true, 0), ("b", true, 0), ("c", true, 0)]);
        let degraded = layout(&[("a", true, 0), ("b", true, 1), ("c", true, 2)]);
        assert!(!base.changes_what_repair_sees(&degraded), "latency/health rank only");
        let not_ready = layout(&[("a", true, 0), ("b", false, 3), ("c", true, 0)]);
        assert!(
            base.changes_what_repair_sees(&not_ready),
            "a member stopped being ready"
        );
        assert!(not_ready.changes_what_repair_sees(&base), "and came back");
        let joined = layout(&[("a", true, 0), ("b", true, 0), ("c", true, 0), ("d", true, 0)]);
        assert!(base.changes_what_repair_sees(&joined));
        let replaced = layout(&[("a", true, 0), ("b", true, 0), ("e", true, 0)]);
        assert!(base.changes_what_repair_sees(&replaced));
        let mut moved = base.clone();
        if let Some(p) = moved.peers.get_mut("c") {
            p.endpoint = "10.0.0.9:7000".into();
        }
        assert!(base.changes_what_repair_sees(&moved), "a new address");
        let mut other_self = base.clone();
        other_self.self_id = None;
        assert!(base.changes_what_repair_sees(&other_self));
    }
}
