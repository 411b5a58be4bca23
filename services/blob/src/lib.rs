//! The blob service: PeerVault's data plane. It hosts the file and blob APIs and
//! PeerVaultService, the PeerVault API as one service.
//!
//! Storage, FileService, BlobService and UploadService land with the blob-service issue; until
//! then their calls answer UNIMPLEMENTED through the same router, auth and metrics. What is here
//! now is PeerVaultService's routing: system calls answered locally, peer calls forwarded to the
//! peer service, event streams forwarded from the events service.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod error;
pub mod peervault_api;

use peervault_runtime::{ServiceContext, Services, configure_service};

pub use error::BlobError;

/// Where the services blob forwards to.
#[derive(Debug, Clone)]
pub struct Upstreams {
    /// The peer service (`--peer-endpoint`); `None` when not configured.
    pub peer: Option<String>,
    /// The events service (`--events-endpoint`); `None` when not configured.
    pub events: Option<String>,
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
        }
    }
}

/// The blob role's gRPC services.
pub fn services(ctx: &ServiceContext, upstreams: Upstreams) -> Result<Services, BlobError> {
    let api = peervault_api::PeerVaultApi::new(ctx, upstreams)?;
    let mut s = Services::new();
    s.add(configure_service!(
        peervault_proto::v1::peer_vault_service_server::PeerVaultServiceServer::new(api),
        ctx.config.max_message_size as usize
    ));
    Ok(s)
}
