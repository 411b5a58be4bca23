//! PeerVaultService: the published PeerVault API on one address. File calls are served by the
//! same code as FileService, system calls by the runtime's SystemService code, peer calls are
//! forwarded to the peer service and event
//! streams are relayed from the events service, each with the caller's deadline and the trace
//! context carried along.

use peervault_proto::v1::{
    AddPeerRequest, DeleteFileResponse, FileChunk, FileOperationEvent, FileRequest, FileResponse, HealthResponse,
    ListFilesRequest, ListFilesResponse, ListPeersResponse, MetricsResponse, PeerEvent, PeerHealthResponse,
    PeerRequest, PeerResponse, RemovePeerResponse, SystemEvent, SystemInfoResponse, UpdateFileMetadataRequest,
    event_service_client::EventServiceClient, peer_service_client::PeerServiceClient,
    peer_vault_service_server::PeerVaultService,
};
use std::sync::Arc;

use peervault_runtime::{Caller, ServiceContext, auth::Authorizer, client::ServiceChannel, system::SystemApi};
use tonic::{Request, Response, Status, Streaming, codegen::BoxStream};

use crate::{
    BlobError, Upstreams,
    grpc::{BlobApi, key_limit},
};

/// The PeerVaultService implementation.
pub struct PeerVaultApi {
    files: BlobApi,
    system: SystemApi,
    peer: Result<PeerServiceClient<ServiceChannel>, BlobError>,
    events: Result<EventServiceClient<ServiceChannel>, BlobError>,
    authorizer: Arc<Authorizer>,
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
    pub fn new(ctx: &ServiceContext, upstreams: Upstreams, files: BlobApi) -> Result<Self, BlobError> {
        let peer = upstream(ctx, &upstreams.peer, "peer", "--peer-endpoint")?.map(PeerServiceClient::new);
        // Streams are relayed from one events pod: every pod carries every event.
        let first_events = upstreams
            .events
            .as_deref()
            .and_then(|e| peervault_events_client::parse_endpoints(e).into_iter().next());
        let events = upstream(ctx, &first_events, "events", "--events-endpoint")?.map(EventServiceClient::new);
        tracing::info!(peer = ?upstreams.peer, events = ?upstreams.events, "PeerVaultService upstreams");
        Ok(PeerVaultApi {
            files,
            system: ctx.system.clone(),
            peer,
            events,
            authorizer: ctx.authorizer.clone(),
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

/// The outgoing request for a forwarded call: same message, same deadline, and the original
/// caller (the receiving service decides with it, never with this service's own authority).
fn forward<T>(req: Request<T>) -> Request<T> {
    let timeout = req.metadata().get("grpc-timeout").cloned();
    let caller = req.extensions().get::<Caller>().cloned();
    let mut out = Request::new(req.into_inner());
    if let Some(t) = timeout {
        out.metadata_mut().insert("grpc-timeout", t);
    }
    if let Some(c) = &caller {
        peervault_runtime::auth::forward::attach(out.metadata_mut(), c);
    }
    out
}

impl PeerVaultApi {
    /// Relays a server stream from an upstream service; it ends when the caller's credential is
    /// revoked or expires (the upstream may not be able to tell).
    fn relay<T: Send + 'static>(&self, caller: Option<Caller>, resp: Response<Streaming<T>>) -> Response<BoxStream<T>> {
        Response::new(self.authorizer.end_when_invalid(caller, Box::pin(resp.into_inner())))
    }
}

fn caller_of<T>(req: &Request<T>) -> Option<Caller> {
    req.extensions().get::<Caller>().cloned()
}

#[tonic::async_trait]
impl PeerVaultService for PeerVaultApi {
    async fn upload_file(&self, req: Request<Streaming<FileChunk>>) -> Result<Response<FileResponse>, Status> {
        let limit = key_limit(&req);
        Ok(Response::new(
            self.files
                .upload_file_stream(req.into_inner(), limit.as_deref())
                .await?,
        ))
    }

    async fn download_file(&self, req: Request<FileRequest>) -> Result<Response<BoxStream<FileChunk>>, Status> {
        let limit = key_limit(&req);
        Ok(Response::new(
            self.files.download_file_stream(req.get_ref(), limit.as_deref()).await?,
        ))
    }

    async fn list_files(&self, req: Request<ListFilesRequest>) -> Result<Response<ListFilesResponse>, Status> {
        let limit = key_limit(&req);
        Ok(Response::new(self.files.list_files_any(req.into_inner(), limit).await?))
    }

    async fn get_file(&self, req: Request<FileRequest>) -> Result<Response<FileResponse>, Status> {
        let limit = key_limit(&req);
        Ok(Response::new(
            self.files.get(&req.into_inner().key, limit.as_deref()).await?,
        ))
    }

    async fn delete_file(&self, req: Request<FileRequest>) -> Result<Response<DeleteFileResponse>, Status> {
        let limit = key_limit(&req);
        Ok(Response::new(
            self.files.delete(&req.into_inner().key, limit.as_deref()).await?,
        ))
    }

    async fn update_file_metadata(
        &self,
        req: Request<UpdateFileMetadataRequest>,
    ) -> Result<Response<FileResponse>, Status> {
        let limit = key_limit(&req);
        Ok(Response::new(
            self.files.update_metadata(req.into_inner(), limit.as_deref()).await?,
        ))
    }

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
        let caller = caller_of(&req);
        Ok(self.relay(caller, self.events()?.stream_file_operations(forward(req)).await?))
    }

    async fn stream_peer_events(&self, req: Request<()>) -> Result<Response<BoxStream<PeerEvent>>, Status> {
        let caller = caller_of(&req);
        Ok(self.relay(caller, self.events()?.stream_peer_events(forward(req)).await?))
    }

    async fn stream_system_events(&self, req: Request<()>) -> Result<Response<BoxStream<SystemEvent>>, Status> {
        let caller = caller_of(&req);
        Ok(self.relay(caller, self.events()?.stream_system_events(forward(req)).await?))
    }
}
