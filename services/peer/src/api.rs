//! The PeerService gRPC adapter: request checks, conversion to and from the published messages,
//! and the one mapping of [`PeerError`] to status codes. Domain logic lives in the registry.

use std::{collections::BTreeMap, sync::Arc};

use peervault_proto::v1::{
    AddPeerRequest, ListPeersResponse, MembershipUpdate, PeerHealthResponse, PeerRequest, PeerResponse,
    RemovePeerResponse, WatchMembershipRequest, peer_service_server::PeerService,
};
use tokio::sync::{broadcast, mpsc, watch};
use tonic::{Request, Response, Status, codegen::BoxStream};

use crate::{
    discovery::{check_host, split_host_port},
    error::PeerError,
    health::status_word,
    registry::{ManualPeer, PeerInfo, Registry, join_host_port, timestamp},
    store::ManualStore,
};

/// Most metadata entries AddPeer accepts.
pub const MAX_METADATA: usize = 128;
/// Updates queued per WatchMembership stream before the producer waits for the client.
const STREAM_BUFFER: usize = 64;

impl From<PeerError> for Status {
    fn from(e: PeerError) -> Status {
        let msg = e.to_string();
        match e {
            PeerError::InvalidArgument(_) => Status::invalid_argument(msg),
            PeerError::NotFound(_) => Status::not_found(msg),
            PeerError::AlreadyExists(_) => Status::already_exists(msg),
            PeerError::Conflict(_) => Status::aborted(msg),
            PeerError::Store { .. } => Status::unavailable(msg),
            PeerError::Config(_) | PeerError::Metrics(_) => Status::internal(msg),
        }
    }
}

/// The PeerService implementation.
pub struct PeerApi {
    registry: Registry,
    store: Arc<dyn ManualStore>,
    draining: watch::Receiver<bool>,
}

impl PeerApi {
    /// Serves `registry`, persisting manual changes in `store`; streams end when `draining`
    /// turns true.
    pub fn new(registry: Registry, store: Arc<dyn ManualStore>, draining: watch::Receiver<bool>) -> Self {
        PeerApi {
            registry,
            store,
            draining,
        }
    }
}

fn peer_response(p: PeerInfo) -> PeerResponse {
    let m = p.member;
    PeerResponse {
        status: status_word(p.health.state).to_string(),
        last_seen: m.last_seen,
        created_at: Some(timestamp(p.created_at)),
        metadata: {
            let mut md = m.metadata.clone();
            if !m.zone.is_empty() {
                md.entry("zone".into()).or_insert_with(|| m.zone.clone());
            }
            if !m.node_name.is_empty() {
                md.entry("node".into()).or_insert_with(|| m.node_name.clone());
            }
            md
        },
        zone: m.zone,
        source: m.source,
        ready: m.ready,
        id: m.id,
        address: m.address,
        port: m.port,
    }
}

fn health_response(p: PeerInfo) -> PeerHealthResponse {
    let h = &p.health;
    let mut metrics = BTreeMap::from([
        ("consecutive_failures".to_string(), h.consecutive_failures.to_string()),
        ("checks_total".to_string(), h.checks_total.to_string()),
        ("failures_total".to_string(), h.failures_total.to_string()),
        ("latency_avg_ms".to_string(), format!("{:.3}", h.latency_avg_ms)),
        ("latency_last_ms".to_string(), format!("{:.3}", h.latency_last_ms)),
    ]);
    if !h.last_error.is_empty() {
        metrics.insert("last_error".into(), h.last_error.clone());
    }
    PeerHealthResponse {
        peer_id: p.member.id.clone(),
        status: status_word(h.state).to_string(),
        latency_ms: h.latency_last_ms,
        uptime_seconds: i32::try_from(h.uptime_seconds()).unwrap_or(i32::MAX),
        metrics: metrics.into_iter().collect(),
        last_check: h.last_check.map(timestamp),
        consecutive_failures: h.consecutive_failures,
    }
}

fn require_id(id: &str) -> Result<(), PeerError> {
    if id.trim().is_empty() {
        return Err(PeerError::InvalidArgument(
            "id must not be empty: give a peer id (see ListPeers)".into(),
        ));
    }
    Ok(())
}

/// Checks an AddPeer request; returns (id, host, port).
pub fn validate_add(req: &AddPeerRequest) -> Result<(String, String, u16), PeerError> {
    let bad = PeerError::InvalidArgument;
    let address = req.address.trim();
    if address.is_empty() {
        return Err(bad("address must not be empty: give a host name or IP address".into()));
    }
    let (host, port) = if req.port == 0 {
        split_host_port(address).map_err(|e| {
            bad(format!(
                "address '{address}' is not HOST:PORT ({e}); give a port in `port` or as HOST:PORT"
            ))
        })?
    } else {
        let port = u16::try_from(req.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(format!("port {} is outside 1 to 65535", req.port)))?;
        let host = address
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(address);
        check_host(host).map_err(|e| bad(format!("address '{address}' cannot be parsed: {e}")))?;
        (host.to_string(), port)
    };
    let id = if req.id.is_empty() {
        join_host_port(&host, port)
    } else {
        let ok = req.id.len() <= 253
            && req
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if !ok {
            return Err(bad(format!(
                "id '{}' must be 1 to 253 characters of letters, digits, '-', '.' and '_'",
                req.id
            )));
        }
        req.id.clone()
    };
    if req.metadata.len() > MAX_METADATA {
        return Err(bad(format!(
            "metadata has {} entries; at most {MAX_METADATA} are kept",
            req.metadata.len()
        )));
    }
    Ok((id, host, port))
}

#[tonic::async_trait]
impl PeerService for PeerApi {
    async fn list_peers(&self, _request: Request<()>) -> Result<Response<ListPeersResponse>, Status> {
        let peers: Vec<PeerResponse> = self.registry.list().into_iter().map(peer_response).collect();
        Ok(Response::new(ListPeersResponse {
            total: peers.len() as i32,
            peers,
        }))
    }

    async fn get_peer(&self, request: Request<PeerRequest>) -> Result<Response<PeerResponse>, Status> {
        let id = request.into_inner().id;
        require_id(&id)?;
        Ok(Response::new(peer_response(self.registry.get(&id)?)))
    }

    async fn add_peer(&self, request: Request<AddPeerRequest>) -> Result<Response<PeerResponse>, Status> {
        let req = request.into_inner();
        let (id, host, port) = validate_add(&req)?;
        self.registry.check_new(&id, &host, port)?;
        let entry = ManualPeer {
            address: host.clone(),
            port,
            metadata: req.metadata.into_iter().collect(),
            created_at_ms: Registry::now_ms(),
        };
        let key = id.clone();
        let stored = self
            .store
            .update(Box::new(move |cur| {
                if cur.added.contains_key(&key) {
                    return Err(PeerError::AlreadyExists(format!(
                        "a peer with id '{key}' was just added"
                    )));
                }
                let mut next = cur.clone();
                next.removed.remove(&key);
                next.added.insert(key.clone(), entry.clone());
                Ok(next)
            }))
            .await?;
        self.registry.set_manual(stored);
        tracing::info!(peer = %id, address = %host, port, "peer added");
        Ok(Response::new(peer_response(self.registry.get(&id)?)))
    }

    async fn remove_peer(&self, request: Request<PeerRequest>) -> Result<Response<RemovePeerResponse>, Status> {
        let id = request.into_inner().id;
        require_id(&id)?;
        if !self.registry.contains(&id) {
            return Err(PeerError::NotFound(id).into());
        }
        let key = id.clone();
        let stored = self
            .store
            .update(Box::new(move |cur| {
                let mut next = cur.clone();
                next.added.remove(&key);
                next.removed.insert(key.clone());
                Ok(next)
            }))
            .await?;
        self.registry.set_manual(stored);
        tracing::info!(peer = %id, "peer removed");
        Ok(Response::new(RemovePeerResponse {
            success: true,
            message: format!("peer {id} removed; data is being moved off"),
        }))
    }

    async fn get_peer_health(&self, request: Request<PeerRequest>) -> Result<Response<PeerHealthResponse>, Status> {
        let id = request.into_inner().id;
        require_id(&id)?;
        Ok(Response::new(health_response(self.registry.get(&id)?)))
    }

    async fn watch_membership(
        &self,
        request: Request<WatchMembershipRequest>,
    ) -> Result<Response<BoxStream<MembershipUpdate>>, Status> {
        let req = request.into_inner();
        if req.watcher_id.trim().is_empty() {
            return Err(
                PeerError::InvalidArgument("watcher_id must not be empty: name the watching pod".into()).into(),
            );
        }
        let (first, rx) = self.registry.watch(req.since_version);
        let (tx, out) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(forward(
            self.registry.clone(),
            req.watcher_id,
            req.since_version,
            first,
            rx,
            tx,
            self.draining.clone(),
        ));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
            out,
        ))))
    }
}

/// Feeds one WatchMembership stream: what the watcher needs first, then every change; a watcher
/// that falls behind the broadcast buffer gets a fresh snapshot instead of the changes it missed.
async fn forward(
    registry: Registry,
    watcher: String,
    since: u64,
    first: Vec<MembershipUpdate>,
    mut rx: broadcast::Receiver<MembershipUpdate>,
    tx: mpsc::Sender<Result<MembershipUpdate, Status>>,
    mut draining: watch::Receiver<bool>,
) {
    let gauge = registry.metrics().watchers.clone();
    gauge.inc();
    struct Dec(prometheus::IntGauge);
    impl Drop for Dec {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    let _dec = Dec(gauge);
    let resumed = first
        .first()
        .is_none_or(|u| u.kind != peervault_proto::v1::MembershipUpdateKind::Snapshot as i32);
    tracing::info!(watcher = %watcher, since, resumed, replay = first.len(), "membership watcher connected");
    let mut last = since;
    for u in first {
        last = u.version;
        if tx.send(Ok(u)).await.is_err() {
            return;
        }
    }
    loop {
        tokio::select! {
            r = rx.recv() => {
                let u = match r {
                    Ok(u) if u.version <= last => continue,
                    Ok(u) => u,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(watcher = %watcher, missed = n, "membership watcher fell behind; sending a snapshot");
                        registry.snapshot()
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                last = u.version;
                if tx.send(Ok(u)).await.is_err() {
                    break;
                }
            }
            _ = tx.closed() => break,
            _ = async { draining.wait_for(|d| *d).await.map(|_| ()) } => {
                let _ = tx.send(Err(Status::unavailable("the peer service is shutting down; reconnect"))).await;
                break;
            }
        }
    }
    tracing::info!(watcher = %watcher, version = last, "membership watcher disconnected");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(address: &str, port: i32, id: &str) -> AddPeerRequest {
        AddPeerRequest {
            address: address.into(),
            port,
            metadata: Default::default(),
            id: id.into(),
        }
    }

    #[test]
    fn add_requests_are_checked() {
        assert_eq!(
            validate_add(&add("10.0.0.1", 8082, "")).unwrap(),
            ("10.0.0.1:8082".into(), "10.0.0.1".into(), 8082)
        );
        assert_eq!(
            validate_add(&add("blob-0.blob:9000", 0, "blob-0")).unwrap(),
            ("blob-0".into(), "blob-0.blob".into(), 9000)
        );
        assert_eq!(validate_add(&add("[::1]", 1, "")).unwrap().0, "[::1]:1");
        for (a, p, id) in [
            ("", 1, ""),
            ("  ", 1, ""),
            ("host", 0, ""),
            ("host", 70000, ""),
            ("host", -1, ""),
            ("not a host", 1, ""),
            ("h:99999", 0, ""),
            ("ok", 1, "bad id!"),
        ] {
            let e = validate_add(&add(a, p, id)).unwrap_err();
            assert!(matches!(e, PeerError::InvalidArgument(_)), "{a} {p} {id}: {e}");
            assert_eq!(Status::from(e).code(), tonic::Code::InvalidArgument);
        }
        let mut big = add("h", 1, "");
        for i in 0..=MAX_METADATA {
            big.metadata.insert(i.to_string(), String::new());
        }
        assert!(validate_add(&big).is_err());
    }

    #[test]
    fn errors_map_to_the_published_codes() {
        assert_eq!(
            Status::from(PeerError::NotFound("x".into())).code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            Status::from(PeerError::AlreadyExists("x".into())).code(),
            tonic::Code::AlreadyExists
        );
        assert_eq!(
            Status::from(PeerError::Conflict("x".into())).code(),
            tonic::Code::Aborted
        );
    }
}
