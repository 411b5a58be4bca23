//! The peer service: PeerVault's control plane. It knows which blob pods exist (discovered from
//! Kubernetes EndpointSlices, DNS or a static list, plus peers added by hand, minus peers removed
//! by hand), checks their health, and streams that membership view to the blob pods.
//!
//! Layout: [`discovery`] providers feed the [`registry`] (the view, its versions and change log);
//! [`probe`] checks each member and records [`health`] outcomes there; [`store`] persists manual
//! changes; [`api`] is the thin gRPC adapter; [`events`] and [`metrics`] report what happens.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod discovery;
pub mod error;
pub mod events;
pub mod health;
pub mod metrics;
pub mod probe;
pub mod registry;
pub mod store;

use std::sync::Arc;

use peervault_runtime::{
    ServiceContext, Services,
    config::{DiscoveryKind, PeerStoreKind},
    configure_service,
};
use tokio::sync::watch;

pub use error::PeerError;

use crate::{
    discovery::{Discovery, DiscoverySink, StaticDiscovery, dns::DnsDiscovery, kubernetes::KubernetesDiscovery},
    health::HealthPolicy,
    metrics::PeerMetrics,
    registry::Registry,
    store::{ConfigMapStore, FileStore, ManualStore},
};

/// How often a shared (ConfigMap) store is read again for other replicas' changes.
pub const STORE_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// What the role wiring decides for the peer service.
#[derive(Debug, Clone, Default)]
pub struct PeerOptions {
    /// Events pods to publish peer events to (`--events-endpoint`, or itself in `serve all`).
    pub events_endpoints: Vec<String>,
    /// This process's own blob endpoint, used as the static membership when `--peers` is empty
    /// (`serve all`: a membership of itself).
    pub self_member: Option<String>,
}

/// The running peer service, for the role wiring.
pub struct PeerService {
    /// Its gRPC services.
    pub services: Services,
    /// The membership view.
    pub registry: Registry,
}

/// The health thresholds from the flags.
pub fn policy_from(ctx: &ServiceContext) -> HealthPolicy {
    let c = &ctx.config;
    HealthPolicy {
        interval: c.probe_interval,
        timeout: c.probe_timeout,
        down_after: c.probe_down_after,
        up_after: c.probe_up_after,
        slow: c.probe_slow,
    }
}

/// Loads the manual peers, starts discovery and probing, and returns the PeerService server.
/// Background tasks stop when the process starts to drain.
pub async fn start(ctx: &ServiceContext, opts: PeerOptions) -> Result<PeerService, PeerError> {
    let cfg = &ctx.config;
    let metrics = PeerMetrics::new()?;
    for c in metrics.collectors() {
        ctx.metrics.register(c)?;
    }
    let store: Arc<dyn ManualStore> = match cfg.peer_store {
        PeerStoreKind::File => FileStore::new(cfg.data_dir.join("peer").join("peers.json")),
        PeerStoreKind::Configmap => {
            let (client, ns) =
                discovery::kubernetes::client_from_environment("--peer-store configmap", cfg.kube_namespace.as_deref())
                    .await?;
            ConfigMapStore::new(client, &ns, &cfg.peer_configmap)
        }
    };
    let manual = store.load().await?;
    let publisher = peervault_events_client::EventPublisher::start(ctx, &opts.events_endpoints)
        .map_err(|e| PeerError::Config(format!("events publisher: {e}")))?;
    let policy = policy_from(ctx);
    let registry = Registry::new(manual.clone(), policy, metrics, Arc::new(publisher));

    let discovery: Box<dyn Discovery> = match cfg.discovery {
        DiscoveryKind::Static => {
            let mut peers = cfg.peers.clone();
            if peers.iter().all(|p| p.trim().is_empty())
                && let Some(me) = &opts.self_member
            {
                peers = vec![me.clone()];
            }
            Box::new(StaticDiscovery::new(&peers)?)
        }
        DiscoveryKind::Dns => Box::new(DnsDiscovery::new(
            cfg.dns_name.as_deref().unwrap_or_default(),
            cfg.dns_port,
            cfg.dns_interval,
            cfg.dns_server,
        )?),
        DiscoveryKind::Kubernetes => Box::new(
            KubernetesDiscovery::from_environment(
                cfg.kube_namespace.as_deref(),
                cfg.kube_service.as_deref(),
                &cfg.kube_port_name,
            )
            .await?,
        ),
    };
    let provider = discovery.name();
    tracing::info!(
        discovery = provider,
        store = %store.describe(),
        added = manual.added.len(),
        removed = manual.removed.len(),
        probe_interval = ?policy.interval,
        probe_timeout = ?policy.timeout,
        down_after = policy.down_after,
        detection_time = ?policy.detection_time(),
        "peer service starting"
    );

    let (drain_tx, drain_rx) = watch::channel(false);
    let discovery_task = tokio::spawn(discovery.run(DiscoverySink::new(registry.clone(), provider)));
    let connect_ctx = ctx.clone();
    let prober = probe::spawn(
        registry.clone(),
        Arc::new(move |endpoint: &str| connect_ctx.channel("--peers", endpoint).map_err(|e| e.to_string())),
    );
    // A shared store may be changed by other replicas: pick their changes up.
    let refresh = (cfg.peer_store == PeerStoreKind::Configmap).then(|| {
        let (store, registry) = (store.clone(), registry.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(STORE_REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match store.load().await {
                    Ok(m) => registry.set_manual(m),
                    Err(e) => tracing::warn!(error = %e, "cannot refresh manual peers; keeping the last set"),
                }
            }
        })
    });
    let drain_ctx = ctx.clone();
    tokio::spawn(async move {
        drain_ctx.draining().await;
        let _ = drain_tx.send(true);
        discovery_task.abort();
        prober.abort();
        if let Some(r) = refresh {
            r.abort();
        }
    });

    let api = api::PeerApi::new(registry.clone(), store, drain_rx);
    let mut services = Services::new();
    services.add(configure_service!(
        peervault_proto::v1::peer_service_server::PeerServiceServer::new(api),
        cfg.max_message_size as usize
    ));
    Ok(PeerService { services, registry })
}
