//! PeerVaultService: the published PeerVault API on one address. System calls are answered by
//! the runtime's SystemService code, peer calls are forwarded to the peer service and event
//! streams are relayed from the events service, each with the caller's deadline and the trace
//! context carried along.

use peervault_proto::v1::{
    AddPeerRequest, FileOperationEvent, HealthResponse, ListPeersResponse, MetricsResponse, PeerEvent,
    PeerHealthResponse, PeerRequest, PeerResponse, RemovePeerResponse, SystemEvent, SystemInfoResponse,
    event_service_client::EventServiceClient, peer_service_client::PeerServiceClient,
    peer_vault_service_server::PeerVaultService,
};
use peervault_runtime::{ServiceContext, client::ServiceChannel, system::SystemApi};
use tonic::{Request, Response, Status, codegen::BoxStream};

use crate::{BlobError, Upstreams};

/// The PeerVaultService implementation.
pub struct PeerVaultApi {
    system: SystemApi,
    peer: Result<PeerServiceClient<ServiceChannel>, BlobError>,
    events: Result<EventServiceClient<ServiceChannel>, BlobError>,
}

fn upstream(
    ctx: &ServiceContext,
    endpoint: &Option<String>,
    service: &'static str,
    flag: &'static str,
) -> Result<Result<ServiceChannel, BlobError>, BlobError> {
    match endpoint {
        // A bad endpoint is a configuration error at start-up, not at the first call.
        Some(ep) => Ok(Ok(ctx.channel(flag, ep)?)),
        None => Ok(Err(BlobError::NoUpstream { service, flag })),
    }
}

impl PeerVaultApi {
    /// Builds the service; channels connect lazily, so an upstream that is down does not stop
    /// start-up (its calls answer UNAVAILABLE until it is back).
    pub fn new(ctx: &ServiceContext, upstreams: Upstreams) -> Result<Self, BlobError> {
        let peer = upstream(ctx, &upstreams.peer, "peer", "--peer-endpoint")?.map(PeerServiceClient::new);
        let events = upstream(ctx, &upstreams.events, "events", "--events-endpoint")?.map(EventServiceClient::new);
        tracing::info!(peer = ?upstreams.peer, events = ?upstreams.events, "PeerVaultService upstreams");
        Ok(PeerVaultApi {
            system: ctx.system.clone(),
            peer,
            events,
        })
    }

    fn peer(&self) -> Result<PeerServiceClient<ServiceChannel>, Status> {
        match &self.peer {
            Ok(c) => Ok(c.clone()),
            Err(BlobError::NoUpstream { service, flag }) => Err(BlobError::NoUpstream { service, flag }.into()),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    fn events(&self) -> Result<EventServiceClient<ServiceChannel>, Status> {
        match &self.events {
            Ok(c) => Ok(c.clone()),
            Err(BlobError::NoUpstream { service, flag }) => Err(BlobError::NoUpstream { service, flag }.into()),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }
}

/// The outgoing request for a forwarded call: same message, same deadline.
fn forward<T>(req: Request<T>) -> Request<T> {
    let timeout = req.metadata().get("grpc-timeout").cloned();
    let mut out = Request::new(req.into_inner());
    if let Some(t) = timeout {
        out.metadata_mut().insert("grpc-timeout", t);
    }
    out
}

/// Relays a server stream from an upstream service.
fn relay<T: Send + 'static>(resp: Response<tonic::Streaming<T>>) -> Response<BoxStream<T>> {
    Response::new(Box::pin(resp.into_inner()))
}

#[tonic::async_trait]
impl PeerVaultService for PeerVaultApi {
    async fn list_peers(&self, req: Request<()>) -> Result<Response<ListPeersResponse>, Status> {
        self.peer()?.list_peers(forward(req)).await
    }

    async fn get_peer(&self, req: Request<PeerRequest>) -> Result<Response<PeerResponse>, Status> {
        self.peer()?.get_peer(forward(req)).await
    }

    async fn add_peer(&self, req: Request<AddPeerRequest>) -> Result<Response<PeerResponse>, Status> {
        self.peer()?.add_peer(forward(req)).await
    }

    async fn remove_peer(&self, req: Request<PeerRequest>) -> Result<Response<RemovePeerResponse>, Status> {
        self.peer()?.remove_peer(forward(req)).await
    }

    async fn get_peer_health(&self, req: Request<PeerRequest>) -> Result<Response<PeerHealthResponse>, Status> {
        self.peer()?.get_peer_health(forward(req)).await
    }

    async fn get_system_info(&self, _req: Request<()>) -> Result<Response<SystemInfoResponse>, Status> {
        Ok(Response::new(self.system.system_info()))
    }

    async fn get_metrics(&self, _req: Request<()>) -> Result<Response<MetricsResponse>, Status> {
        Ok(Response::new(self.system.metrics()))
    }

    async fn health_check(&self, _req: Request<()>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(self.system.health().await))
    }

    async fn stream_file_operations(
        &self,
        req: Request<()>,
    ) -> Result<Response<BoxStream<FileOperationEvent>>, Status> {
        Ok(relay(self.events()?.stream_file_operations(forward(req)).await?))
    }

    async fn stream_peer_events(&self, req: Request<()>) -> Result<Response<BoxStream<PeerEvent>>, Status> {
        Ok(relay(self.events()?.stream_peer_events(forward(req)).await?))
    }

    async fn stream_system_events(&self, req: Request<()>) -> Result<Response<BoxStream<SystemEvent>>, Status> {
        Ok(relay(self.events()?.stream_system_events(forward(req)).await?))
    }
}
