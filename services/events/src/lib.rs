//! The events service: PeerVault's fan-out plane. It receives events from blob and peer
//! (Publish, internal), keeps a bounded replay buffer, raises alerts from threshold rules, and
//! serves subscribers over gRPC streams (EventService) and the PeerVault WebSocket API.
//!
//! Layers, lowest first: [`topics`] and [`model`] (the published topics, types and data shapes),
//! [`hub`] (sequence numbers, replay buffer, bounded per-subscriber lag), [`alerts`] (threshold
//! rules), [`core`] (hub plus alerts behind one publish call), then the adapters [`grpc`] and
//! [`ws`]. Errors are one enum, [`error::EventsError`], mapped to gRPC statuses and WebSocket
//! error codes in one place.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod alerts;
pub mod core;
pub mod error;
pub mod grpc;
pub mod hub;
pub mod metrics;
pub mod model;
pub mod settings;
pub mod topics;
pub mod ws;

use std::{net::SocketAddr, sync::Arc};

use peervault_runtime::{ServiceContext, Services, configure_service};
use tokio::sync::watch;

pub use crate::core::EventsCore;
pub use error::EventsError;
pub use settings::EventsSettings;
pub use ws::TokenValidator;

/// Why the events service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad settings.
    #[error(transparent)]
    Settings(#[from] settings::SettingsError),
    /// The HTTP port could not be bound.
    #[error("cannot listen on --http-listen {addr} (the WebSocket port): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// A started events service: its gRPC services to hand to the runtime, and what tests and
/// the binary may want to know.
pub struct EventsService {
    /// EventService, to add to the role's services.
    pub services: Services,
    /// The domain core (for in-process publishing).
    pub core: EventsCore,
    /// The bound WebSocket/HTTP address.
    pub http_addr: SocketAddr,
}

/// Starts the events service: resolves its settings, binds the WebSocket/HTTP port (logged as
/// `events HTTP listening` with `http_addr`), starts the gateway and this pod's own metrics
/// events, and stops them all when the process drains. WebSocket clients authenticate with the
/// process's authorizer (the same credentials as gRPC) unless `--ws-allow-anonymous`; the port
/// speaks TLS with the process's certificates unless `--insecure`.
pub async fn start(ctx: &ServiceContext) -> Result<EventsService, StartError> {
    let validator: Arc<dyn TokenValidator> = Arc::new(ws::auth::RuntimeAuth(ctx.authorizer.clone()));
    let settings = EventsSettings::resolve(&ctx.config)?;
    let metrics = metrics::EventsMetrics::new(&ctx.metrics.registry)?;
    let hub = hub::Hub::new(
        hub::HubConfig {
            node: ctx.node_id.clone(),
            replay_capacity: settings.replay_capacity,
            subscriber_queue: settings.subscriber_queue,
        },
        metrics.clone(),
    );
    let source = format!("events/{}", ctx.node_id);
    let core = EventsCore::new(
        hub.clone(),
        alerts::AlertEngine::new(settings.alerts.clone(), source, metrics),
    );

    let addr = settings.ws_addr().await?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let http_addr = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let gateway = ws::Gateway::new(core.clone(), settings.ws.clone(), validator, stop_rx);
    let tls = ctx.tls_state().cloned();
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    tokio::spawn(gateway.serve(listener, tls));
    if settings.ws.allow_anonymous {
        tracing::warn!("--ws-allow-anonymous: WebSocket clients without credentials receive every event");
    }
    tracing::info!(
        http_addr = %http_addr,
        ws_url = %format!("{scheme}://{http_addr}/ws"),
        max_connections = settings.ws.max_connections,
        max_connections_per_address = settings.ws.max_connections_per_address,
        origins = ?settings.ws.origins,
        credentials_required = !settings.ws.allow_anonymous,
        replay_buffer = settings.replay_capacity,
        subscriber_queue = settings.subscriber_queue,
        "events HTTP listening"
    );

    // This pod's own metrics events go straight into the hub.
    if !settings.metrics_interval.is_zero() {
        let ctx2 = ctx.clone();
        let core2 = core.clone();
        let interval = settings.metrics_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sampler = peervault_events_client::MetricsSampler::new(&ctx2);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = ctx2.draining() => return,
                }
                let source = format!("{}/{}", ctx2.role, ctx2.node_id);
                let events = sampler.sample(&source);
                if let Err(e) = core2.publish(events) {
                    tracing::debug!(error = %e, "own metrics events not published");
                }
            }
        });
    }

    // Draining: close the gateway (clients get 1001) and end every stream so tonic's drain
    // does not wait for subscriptions that would never finish.
    let ctx3 = ctx.clone();
    let hub2 = hub.clone();
    tokio::spawn(async move {
        ctx3.draining().await;
        let _ = stop_tx.send(true);
        hub2.close();
    });

    let mut services = Services::new();
    services.add(configure_service!(
        peervault_proto::v1::event_service_server::EventServiceServer::new(grpc::EventApi::new(
            core.clone(),
            Some(ctx.authorizer.clone())
        )),
        ctx.config.max_message_size as usize
    ));
    Ok(EventsService {
        services,
        core,
        http_addr,
    })
}
