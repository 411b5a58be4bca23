//! The one place that decides whether a call may proceed: the access table (one entry per RPC of
//! the protocol) and the tower layer that establishes the caller and enforces the table.
//!
//! The access-control issue extends this same layer with API keys, JWTs and per-identity scopes;
//! until then every verified certificate holds every scope, and only the service-versus-client
//! distinction for internal RPCs is enforced.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::future::{BoxFuture, FutureExt};
use http::{Request, Response};
use tonic::Status;
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    identity::{Caller, ConnInfo, Identity},
    metrics::Metrics,
};

/// What a caller needs to call an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No credentials at all: health checks and reflection.
    Public,
    /// Only PeerVault service identities (replication, event publishing, membership watches).
    Internal,
    /// Any authenticated identity holding the scope.
    Needs(Scope),
}

/// Scopes an identity may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Get, list, stat, stream events.
    Read,
    /// Put, delete, update metadata.
    Write,
    /// Peers, keys, system changes.
    Admin,
}

impl Scope {
    /// The scope's name as written in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
}

use Access::*;
use Scope::*;

/// Access rule for every RPC, by gRPC path. A test checks that every method of the protocol has
/// exactly one entry, so a new RPC cannot ship without a decision here.
pub const ACCESS_TABLE: &[(&str, Access)] = &[
    ("/grpc.health.v1.Health/Check", Public),
    ("/grpc.health.v1.Health/Watch", Public),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Public),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", Public),
    ("/peervault.v1.FileService/UploadFile", Needs(Write)),
    ("/peervault.v1.FileService/DownloadFile", Needs(Read)),
    ("/peervault.v1.FileService/ListFiles", Needs(Read)),
    ("/peervault.v1.FileService/GetFile", Needs(Read)),
    ("/peervault.v1.FileService/DeleteFile", Needs(Write)),
    ("/peervault.v1.FileService/UpdateFileMetadata", Needs(Write)),
    ("/peervault.v1.BlobService/GetBlob", Needs(Read)),
    ("/peervault.v1.BlobService/StatBlob", Needs(Read)),
    ("/peervault.v1.BlobService/DeleteBlob", Needs(Write)),
    ("/peervault.v1.BlobService/ListBlobs", Needs(Read)),
    ("/peervault.v1.UploadService/Upload", Needs(Write)),
    ("/peervault.v1.PeerService/ListPeers", Needs(Read)),
    ("/peervault.v1.PeerService/GetPeer", Needs(Read)),
    ("/peervault.v1.PeerService/AddPeer", Needs(Admin)),
    ("/peervault.v1.PeerService/RemovePeer", Needs(Admin)),
    ("/peervault.v1.PeerService/GetPeerHealth", Needs(Read)),
    ("/peervault.v1.PeerService/WatchMembership", Internal),
    ("/peervault.v1.EventService/StreamFileOperations", Needs(Read)),
    ("/peervault.v1.EventService/StreamPeerEvents", Needs(Read)),
    ("/peervault.v1.EventService/StreamSystemEvents", Needs(Read)),
    ("/peervault.v1.EventService/Subscribe", Needs(Read)),
    ("/peervault.v1.EventService/Publish", Internal),
    ("/peervault.v1.SystemService/GetSystemInfo", Needs(Read)),
    ("/peervault.v1.SystemService/GetMetrics", Needs(Read)),
    ("/peervault.v1.SystemService/HealthCheck", Needs(Read)),
    ("/peervault.v1.AuthService/CreateApiKey", Needs(Admin)),
    ("/peervault.v1.AuthService/ListApiKeys", Needs(Admin)),
    ("/peervault.v1.AuthService/RevokeApiKey", Needs(Admin)),
    ("/peervault.v1.PeerVaultService/UploadFile", Needs(Write)),
    ("/peervault.v1.PeerVaultService/DownloadFile", Needs(Read)),
    ("/peervault.v1.PeerVaultService/ListFiles", Needs(Read)),
    ("/peervault.v1.PeerVaultService/GetFile", Needs(Read)),
    ("/peervault.v1.PeerVaultService/DeleteFile", Needs(Write)),
    ("/peervault.v1.PeerVaultService/UpdateFileMetadata", Needs(Write)),
    ("/peervault.v1.PeerVaultService/ListPeers", Needs(Read)),
    ("/peervault.v1.PeerVaultService/GetPeer", Needs(Read)),
    ("/peervault.v1.PeerVaultService/AddPeer", Needs(Admin)),
    ("/peervault.v1.PeerVaultService/RemovePeer", Needs(Admin)),
    ("/peervault.v1.PeerVaultService/GetPeerHealth", Needs(Read)),
    ("/peervault.v1.PeerVaultService/GetSystemInfo", Needs(Read)),
    ("/peervault.v1.PeerVaultService/GetMetrics", Needs(Read)),
    ("/peervault.v1.PeerVaultService/HealthCheck", Needs(Read)),
    ("/peervault.v1.PeerVaultService/StreamFileOperations", Needs(Read)),
    ("/peervault.v1.PeerVaultService/StreamPeerEvents", Needs(Read)),
    ("/peervault.v1.PeerVaultService/StreamSystemEvents", Needs(Read)),
    ("/peervault.v1.ReplicationService/HasChunks", Internal),
    ("/peervault.v1.ReplicationService/PutChunks", Internal),
    ("/peervault.v1.ReplicationService/GetChunk", Internal),
    ("/peervault.v1.ReplicationService/PutRecord", Internal),
    ("/peervault.v1.ReplicationService/ListRecords", Internal),
];

/// The access rule for a path. Paths outside the protocol still need an authenticated caller
/// (they then answer UNIMPLEMENTED), so probing unknown paths reveals nothing to strangers.
pub fn access_for(path: &str) -> Access {
    ACCESS_TABLE
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, a)| *a)
        .unwrap_or(Needs(Admin))
}

/// The scopes an identity holds. Services and insecure-mode callers hold all; verified client
/// certificates hold all until `--auth-config` mappings narrow them (access-control issue).
pub fn scopes_for(identity: &Identity) -> &'static [Scope] {
    match identity {
        Identity::Anonymous => &[],
        _ => &[Read, Write, Admin],
    }
}

/// Decides a call: `Ok(())` or the status to answer with.
pub fn authorize(path: &str, identity: &Identity) -> Result<(), (Status, &'static str)> {
    match access_for(path) {
        Public => Ok(()),
        _ if matches!(identity, Identity::Anonymous) => Err((
            Status::unauthenticated(
                "no credentials: present a client certificate signed by the server's CA (or a token where token auth is enabled)",
            ),
            "no_credentials",
        )),
        Internal if !identity.is_service() => Err((
            Status::permission_denied(format!(
                "{path} is internal to PeerVault: only service identities (spiffe://<trust-domain>/peervault/<service>) may call it; caller is {identity}"
            )),
            "not_a_service",
        )),
        Internal => Ok(()),
        Needs(s) if !scopes_for(identity).contains(&s) => Err((
            Status::permission_denied(format!(
                "{path} needs scope '{}', which {identity} does not hold",
                s.as_str()
            )),
            "missing_scope",
        )),
        Needs(_) => Ok(()),
    }
}

/// Establishes the [`Caller`] of every request and enforces [`ACCESS_TABLE`].
#[derive(Clone)]
pub struct AuthLayer {
    inner: Arc<AuthState>,
}

struct AuthState {
    trust_domain: String,
    metrics: Metrics,
}

impl AuthLayer {
    /// A layer for identities in `trust_domain`, counting refusals in `metrics`.
    pub fn new(trust_domain: String, metrics: Metrics) -> Self {
        AuthLayer {
            inner: Arc::new(AuthState { trust_domain, metrics }),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            state: self.inner.clone(),
        }
    }
}

/// The service produced by [`AuthLayer`].
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    state: Arc<AuthState>,
}

impl<S, B, RB> Service<Request<B>> for AuthService<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let conn = req.extensions().get::<ConnInfo>().cloned();
        let identity = match &conn {
            Some(c) if c.insecure => Identity::Insecure,
            Some(ConnInfo {
                peer_certs: Some(certs),
                ..
            }) if !certs.is_empty() => Identity::from_certificate(&certs[0], &self.state.trust_domain),
            _ => Identity::Anonymous,
        };
        let path = req.uri().path().to_string();
        if let Err((status, reason)) = authorize(&path, &identity) {
            self.state.metrics.auth_failures.with_label_values(&[reason]).inc();
            tracing::info!(
                path = %path,
                caller = %identity,
                remote = ?conn.as_ref().and_then(|c| c.remote_addr),
                code = ?status.code(),
                reason,
                "call refused"
            );
            return futures_util::future::ready(Ok(status.into_http())).boxed();
        }
        tracing::Span::current().record("caller", tracing::field::display(&identity));
        req.extensions_mut().insert(Caller {
            identity,
            remote_addr: conn.and_then(|c| c.remote_addr),
        });
        // Take the service that was driven to readiness and leave a fresh clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        inner.call(req).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rpc_of_the_protocol_has_exactly_one_entry() {
        let methods = peervault_proto::methods();
        for m in &methods {
            let n = ACCESS_TABLE.iter().filter(|(p, _)| *p == m.path()).count();
            assert_eq!(n, 1, "{} has {n} entries in ACCESS_TABLE", m.path());
        }
        for (p, _) in ACCESS_TABLE {
            let known = methods.iter().any(|m| &m.path() == p)
                || p.starts_with("/grpc.health.v1.")
                || p.starts_with("/grpc.reflection.");
            assert!(known, "{p} is in ACCESS_TABLE but not in the protocol");
        }
    }

    #[test]
    fn internal_rpcs_refuse_clients_and_anonymous_callers_differently() {
        let client = Identity::Client {
            id: "c".into(),
            sans: vec![],
        };
        let service = Identity::Service {
            service: "blob".into(),
            id: "spiffe://peervault.local/peervault/blob".into(),
        };
        let path = "/peervault.v1.EventService/Publish";
        assert_eq!(
            authorize(path, &client).unwrap_err().0.code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            authorize(path, &Identity::Anonymous).unwrap_err().0.code(),
            tonic::Code::Unauthenticated
        );
        assert!(authorize(path, &service).is_ok());
        assert!(authorize("/grpc.health.v1.Health/Check", &Identity::Anonymous).is_ok());
        assert!(authorize("/peervault.v1.SystemService/GetSystemInfo", &client).is_ok());
    }
}
