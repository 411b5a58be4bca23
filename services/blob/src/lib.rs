//! The blob service: PeerVault's data plane. A durable content-addressed store ([`store`]) and
//! its gRPC adapters: FileService, BlobService, UploadService and PeerVaultService (the
//! PeerVault API on one address: file calls served here, peer calls forwarded to the peer
//! service, event streams relayed from the events service).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cluster;
pub mod config;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod pause;
pub mod peervault_api;
pub mod store;
pub mod validate;

use std::sync::Arc;

use peervault_runtime::{ServiceContext, Services, configure_service, system::SystemStats};

pub use config::BlobConfig;
pub use error::BlobError;

/// Where the services blob forwards to.
#[derive(Debug, Clone)]
pub struct Upstreams {
    /// The peer service (`--peer-endpoint`); `None` when not configured.
    pub peer: Option<String>,
    /// The events service (`--events-endpoint`, possibly a comma-separated list of pods);
    /// `None` when not configured.
    pub events: Option<String>,
    /// The membership view the coordinator places files over; `None`: this pod alone.
    pub membership: Option<tokio::sync::watch::Receiver<peervault_membership::MembershipView>>,
}

impl Upstreams {
    /// `--peer-endpoint` / `--events-endpoint` as given, else this process itself when it also
    /// hosts that service (`serve all`).
    pub fn from_context(ctx: &ServiceContext, hosts_peer: bool, hosts_events: bool) -> Upstreams {
        let own = ctx.self_endpoint();
        Upstreams {
            peer: ctx
                .config
                .peer_endpoint
                .clone()
                .or_else(|| hosts_peer.then(|| own.clone())),
            events: ctx
                .config
                .events_endpoint
                .clone()
                .or_else(|| hosts_events.then(|| own.clone())),
            membership: None,
        }
    }
}

struct StoreStatsSource(store::Store);

impl SystemStats for StoreStatsSource {
    fn storage_used(&self) -> u64 {
        self.0.stats().storage_used
    }
    fn storage_total(&self) -> u64 {
        let s = self.0.stats();
        if s.quota > 0 { s.quota } else { self.0.volume_size() }
    }
    fn file_count(&self) -> u64 {
        self.0.stats().files
    }
}

/// Opens the store under `<data-dir>/blob`, starts its background workers and returns the blob
/// role's gRPC services.
pub async fn services(ctx: &ServiceContext, cfg: BlobConfig, upstreams: Upstreams) -> Result<Services, BlobError> {
    let metrics = metrics::BlobMetrics::new(Some(&ctx.metrics.registry))
        .map_err(|e| BlobError::Unavailable(format!("metrics: {e}")))?;
    let root = ctx.config.data_dir.join("blob");
    let cfg_cluster = cfg.cluster.clone();
    let mut cfg = cfg;
    if upstreams.membership.is_some() {
        // In a cluster, anti-entropy collects tombstones once every owner holds them
        // (cluster/tombstones.rs); the engine's own expiry could let a pod that missed the
        // delete bring the file back.
        cfg.tombstone_expiry = std::time::Duration::MAX;
    }
    let store = tokio::task::spawn_blocking(move || store::Store::open(&root, cfg, metrics))
        .await
        .map_err(|e| BlobError::Unavailable(format!("opening the store failed: {e}")))??;
    ctx.system.add_stats(Arc::new(StoreStatsSource(store.clone())));
    // API keys presented to any service of this process are checked against this store.
    ctx.authorizer
        .set_api_key_verifier(Arc::new(grpc::auth::KeyVerifier::new(store.clone())));
    grpc::spawn_gc(ctx.clone(), store.clone());
    let events = peervault_events_client::EventPublisher::start(ctx, upstreams.events.as_slice())
        .map_err(|e| BlobError::Unavailable(format!("events publisher: {e}")))?;
    let cluster = cluster::Cluster::start(
        ctx,
        store.clone(),
        cfg_cluster,
        upstreams.membership.clone(),
        events.clone(),
        Some(&ctx.metrics.registry),
    )?;
    let api = grpc::BlobApi::new(store, events, ctx.node_id.clone(), ctx.grpc_addr, cluster.clone());
    let forward = peervault_api::PeerVaultApi::new(ctx, upstreams, api.clone())?;
    let max = ctx.config.max_message_size as usize;
    let mut s = Services::new();
    s.add(configure_service!(
        peervault_proto::v1::file_service_server::FileServiceServer::new(api.clone()),
        max
    ));
    s.add(configure_service!(
        peervault_proto::v1::blob_service_server::BlobServiceServer::new(api.clone()),
        max
    ));
    s.add(configure_service!(
        peervault_proto::v1::upload_service_server::UploadServiceServer::new(api.clone()),
        max
    ));
    s.add(configure_service!(
        peervault_proto::v1::auth_service_server::AuthServiceServer::new(api),
        max
    ));
    s.add(configure_service!(
        peervault_proto::v1::peer_vault_service_server::PeerVaultServiceServer::new(forward),
        max
    ));
    s.add(configure_service!(
        peervault_proto::v1::replication_service_server::ReplicationServiceServer::new(
            grpc::replication::ReplicationApi::new(cluster)
        ),
        max
    ));
    Ok(s)
}
