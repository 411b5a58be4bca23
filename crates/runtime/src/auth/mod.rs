//! The one place that decides whether a call may proceed: the access table (one entry per RPC of
//! the protocol) and the tower layer that establishes the caller — from the verified client
//! certificate, an API key (`x-api-key`, or `authorization: Bearer pvk_…`) or a JWT
//! (`authorization: Bearer …`) — and enforces the table with the caller's scopes.

pub mod confine;
pub mod forward;
pub mod jwt;
pub mod remote;
pub mod scopes;

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
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
pub use scopes::{ScopeConfig, ScopeSet};

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
    ("/peervault.v1.AuthService/VerifyApiKey", Internal),
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
    ("/peervault.v1.ReplicationService/CommitRecord", Internal),
    ("/peervault.v1.ReplicationService/GetRecord", Internal),
    ("/peervault.v1.ReplicationService/GetRecords", Internal),
    ("/peervault.v1.ReplicationService/PutRecords", Internal),
    ("/peervault.v1.ReplicationService/CommitRecords", Internal),
    ("/peervault.v1.ReplicationService/Digests", Internal),
    ("/peervault.v1.ReplicationService/PutApiKeys", Internal),
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

/// The RPC whose access rule a stream of events over another transport follows.
const READ_PATH: &str = "/peervault.v1.EventService/Subscribe";

/// A refusal: the status to answer with and a bounded metric label.
pub type Refusal = (Status, &'static str);

/// The longest credential accepted; anything longer is refused before parsing.
pub const MAX_CREDENTIAL_LEN: usize = 8 * 1024;

/// A credential presented in request metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A PeerVault API key (`pvk_…`).
    ApiKey(String),
    /// A JWT.
    Jwt(String),
}

/// Prefix of every API key, so that secret scanners can find leaked ones.
pub const API_KEY_PREFIX: &str = "pvk_";

/// Reads the credential from `x-api-key` or `authorization: Bearer …`. A malformed header is a
/// refusal; no header is `Ok(None)`.
pub fn credential(headers: &http::HeaderMap) -> Result<Option<Credential>, Refusal> {
    let unauth = |reason: &'static str, msg: &str| (Status::unauthenticated(msg.to_string()), reason);
    if let Some(v) = headers.get("x-api-key") {
        let v = v
            .to_str()
            .map_err(|_| unauth("malformed_credential", "x-api-key is not valid text"))?
            .trim();
        if v.is_empty() || v.len() > MAX_CREDENTIAL_LEN {
            return Err(unauth("malformed_credential", "x-api-key is empty or too long"));
        }
        return Ok(Some(Credential::ApiKey(v.to_string())));
    }
    let Some(v) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| unauth("malformed_credential", "the authorization header is not valid text"))?;
    if v.len() > MAX_CREDENTIAL_LEN + 7 {
        return Err(unauth("malformed_credential", "the authorization header is too long"));
    }
    let Some((scheme, rest)) = v.split_once(' ') else {
        return Err(unauth(
            "malformed_credential",
            "malformed authorization header: expected 'Bearer <api key or JWT>'",
        ));
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(unauth(
            "malformed_credential",
            "unsupported authorization scheme: expected 'Bearer <api key or JWT>'",
        ));
    }
    let token = rest.trim();
    if token.is_empty() {
        return Err(unauth("malformed_credential", "'Bearer' with no token after it"));
    }
    Ok(Some(if token.starts_with(API_KEY_PREFIX) {
        Credential::ApiKey(token.to_string())
    } else {
        Credential::Jwt(token.to_string())
    }))
}

/// What a verified API key may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyGrant {
    /// The key's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its scopes.
    pub scopes: ScopeSet,
    /// The key prefix it is limited to, if any.
    pub key_prefix: Option<String>,
    /// When the key expires, if it does.
    pub expires: Option<SystemTime>,
}

/// Verifies API keys; the blob service provides one backed by its index.
pub trait ApiKeyVerifier: Send + Sync + 'static {
    /// The grant of a presented secret, or why it is refused (unknown, revoked, expired).
    fn verify(&self, secret: &str) -> Result<ApiKeyGrant, Refusal>;

    /// Whether the key with this id is still live (not revoked, not expired); long-lived streams
    /// opened with it are ended when it is not.
    fn check_id(&self, id: &str) -> Result<(), Refusal>;

    /// The blob node this verifier asks, when keys are verified remotely.
    fn remote(&self) -> Option<Arc<remote::RemoteKeys>> {
        None
    }
}

/// How often the credential behind a long-lived stream is checked again (revocation ends the
/// stream within this time).
pub const REVALIDATE_INTERVAL: Duration = Duration::from_secs(1);

/// Decides calls: the access table, the scope mapping, and the credential verifiers.
pub struct Authorizer {
    trust_domain: String,
    scopes: ScopeConfig,
    jwt: Option<jwt::JwtVerifier>,
    api_keys: std::sync::RwLock<Option<Arc<dyn ApiKeyVerifier>>>,
    metrics: Option<Metrics>,
}

impl Authorizer {
    /// An authorizer for `trust_domain` with a scope mapping and an optional JWT verifier.
    pub fn new(trust_domain: String, scopes: ScopeConfig, jwt: Option<jwt::JwtVerifier>) -> Self {
        Authorizer {
            trust_domain,
            scopes,
            jwt,
            api_keys: std::sync::RwLock::new(None),
            metrics: None,
        }
    }

    /// The same authorizer counting stream ends and refusals it makes outside the layer in
    /// `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn count_failure(&self, reason: &'static str) {
        if let Some(m) = &self.metrics {
            m.auth_failures.with_label_values(&[reason]).inc();
        }
    }

    /// Authenticates what a connection of another transport (the WebSocket gateway) presents:
    /// its verified client certificate and/or a bearer token (API key or JWT; the token decides
    /// when both are given). `Ok(None)` when neither is presented. The caller must hold `read`.
    /// Refusals are counted like the gRPC layer's.
    pub fn authenticate_connection(
        &self,
        conn: Option<&ConnInfo>,
        token: Option<&str>,
    ) -> Result<Option<Caller>, Refusal> {
        let identity = self.connection_identity(conn);
        if token.is_none() && identity == Identity::Anonymous {
            return Ok(None);
        }
        let r = match token {
            Some(t) => self.authenticate_token_as(t, identity, Scope::Read),
            None => self.decide(READ_PATH, identity, &http::HeaderMap::new()),
        };
        match r {
            Ok(mut c) => {
                c.remote_addr = conn.and_then(|c| c.remote_addr);
                Ok(Some(c))
            }
            Err((st, reason)) => {
                self.count_failure(reason);
                Err((st, reason))
            }
        }
    }

    /// Whether a caller established earlier still holds its credential: its JWT or key has not
    /// expired and its API key has not been revoked.
    pub fn revalidate(&self, caller: &Caller) -> Result<(), Refusal> {
        if let Some(t) = caller.valid_until
            && SystemTime::now() >= t
        {
            return Err((
                Status::unauthenticated("the credential of this stream has expired"),
                "expired",
            ));
        }
        if let Identity::ApiKey { id, .. } = &caller.identity {
            // A process without a key store cannot tell; the process that verified the key
            // (the facade that forwarded the call) checks it.
            let verifier = self.api_keys.read().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(v) = verifier {
                return v.check_id(id);
            }
        }
        Ok(())
    }

    /// Completes with the refusal once `caller`'s credential is revoked or expired (checked
    /// every [`REVALIDATE_INTERVAL`]); never completes for credentials that cannot lapse
    /// (certificates, which the TLS layer checks).
    pub async fn until_invalid(self: Arc<Self>, caller: Caller) -> Status {
        let watched = caller.valid_until.is_some() || matches!(caller.identity, Identity::ApiKey { .. });
        if !watched {
            return std::future::pending().await;
        }
        loop {
            tokio::time::sleep(REVALIDATE_INTERVAL).await;
            if let Err((st, reason)) = self.revalidate(&caller) {
                self.count_failure(reason);
                if let Some(m) = &self.metrics {
                    m.streams_ended.with_label_values(&[reason]).inc();
                }
                tracing::info!(caller = %caller.identity, reason, "credential no longer valid: ending its stream");
                return st;
            }
        }
    }

    /// `stream`, ended with the refusal once `caller`'s credential is revoked or expires.
    pub fn end_when_invalid<T: Send + 'static>(
        self: &Arc<Self>,
        caller: Option<Caller>,
        stream: tonic::codegen::BoxStream<T>,
    ) -> tonic::codegen::BoxStream<T> {
        use futures_util::StreamExt;
        let Some(caller) = caller else { return stream };
        let watch: BoxFuture<'static, Status> = self.clone().until_invalid(caller).boxed();
        Box::pin(futures_util::stream::unfold(
            Some((stream, watch)),
            |state| async move {
                let (mut stream, mut watch) = state?;
                tokio::select! {
                    st = &mut watch => Some((Err(st), None)),
                    item = stream.next() => item.map(|i| (i, Some((stream, watch)))),
                }
            },
        ))
    }

    /// Authenticates a bare token (API key or JWT) for a transport other than gRPC — the
    /// WebSocket gateway — and checks it grants `needed`. Returns the full caller, key prefix
    /// and validity included.
    pub fn authenticate_token(&self, token: &str, needed: Scope) -> Result<Caller, Refusal> {
        self.authenticate_token_as(token, Identity::Anonymous, needed)
            .inspect_err(|(_, reason)| self.count_failure(reason))
    }

    fn authenticate_token_as(&self, token: &str, conn: Identity, needed: Scope) -> Result<Caller, Refusal> {
        let mut headers = http::HeaderMap::new();
        let value = http::HeaderValue::from_str(&format!("Bearer {}", token.trim())).map_err(|_| {
            (
                Status::unauthenticated("the token is not valid text"),
                "malformed_credential",
            )
        })?;
        headers.insert(http::header::AUTHORIZATION, value);
        let path = match needed {
            Scope::Read => READ_PATH,
            Scope::Write => "/peervault.v1.FileService/UploadFile",
            Scope::Admin => "/peervault.v1.AuthService/ListApiKeys",
        };
        self.decide(path, conn, &headers)
    }

    fn remote_keys(&self) -> Option<Arc<remote::RemoteKeys>> {
        self.api_keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|v| v.remote())
    }

    /// Fetches an API key presented in `headers` from the blob node that verifies keys, when the
    /// last decision said it was not cached yet. Returns whether a fetch happened.
    pub async fn fetch_presented_key(&self, headers: &http::HeaderMap, reason: &str) -> bool {
        if reason != remote::NOT_CACHED {
            return false;
        }
        let (Some(remote), Ok(Some(Credential::ApiKey(secret)))) = (self.remote_keys(), credential(headers)) else {
            return false;
        };
        let _ = remote.fetch(&secret).await;
        true
    }

    /// As [`Authorizer::authenticate_token`], fetching an API key from the blob node first when
    /// this process verifies keys remotely.
    pub async fn authenticate_token_remote(&self, token: &str, needed: Scope) -> Result<Caller, Refusal> {
        match self.authenticate_token_as(token, Identity::Anonymous, needed) {
            Err((_, reason)) if reason == remote::NOT_CACHED => {
                if let Some(remote) = self.remote_keys() {
                    let _ = remote.fetch(token.trim()).await;
                }
                self.authenticate_token(token, needed)
            }
            Err((st, reason)) => {
                self.count_failure(reason);
                Err((st, reason))
            }
            ok => ok,
        }
    }

    /// Installs the API key verifier (the blob service's key store).
    pub fn set_api_key_verifier(&self, v: Arc<dyn ApiKeyVerifier>) {
        *self.api_keys.write().unwrap_or_else(|p| p.into_inner()) = Some(v);
    }

    /// The identity a connection's certificate establishes.
    pub fn connection_identity(&self, conn: Option<&ConnInfo>) -> Identity {
        match conn {
            Some(c) if c.insecure => Identity::Insecure,
            Some(c) => c
                .certificate_identity(&self.trust_domain)
                .unwrap_or(Identity::Anonymous),
            None => Identity::Anonymous,
        }
    }

    /// Decides a call to `path` by a connection with `conn_identity` presenting `headers`.
    pub fn decide(&self, path: &str, conn_identity: Identity, headers: &http::HeaderMap) -> Result<Caller, Refusal> {
        let access = access_for(path);
        let caller = |identity: Identity, scopes: ScopeSet, key_prefix: Option<String>| Caller {
            identity,
            remote_addr: None,
            scopes,
            key_prefix,
            valid_until: None,
        };
        if access == Public {
            return Ok(caller(conn_identity, ScopeSet::NONE, None));
        }
        // A facade forwarding its caller: believed only from a service identity.
        if let Some(v) = headers.get(forward::CALLER_HEADER) {
            if !conn_identity.is_service() {
                return Err(forward::forged(&conn_identity));
            }
            let principal = forward::decode(v)?;
            if principal.valid_until.is_some_and(|t| SystemTime::now() >= t) {
                return Err((
                    Status::unauthenticated("the forwarded credential has expired"),
                    "expired",
                ));
            }
            return self.permit(path, access, principal);
        }
        if access == Internal {
            return match conn_identity {
                i if i.is_service() => Ok(caller(i, ScopeSet::ALL, None)),
                Identity::Anonymous => Err((
                    Status::unauthenticated(format!(
                        "{path} is internal to PeerVault and needs a service certificate"
                    )),
                    "no_credentials",
                )),
                i => Err((
                    Status::permission_denied(format!(
                        "{path} is internal to PeerVault: only service identities (spiffe://<trust-domain>/peervault/{{blob,peer,events}}) may call it; caller is {i}"
                    )),
                    "not_a_service",
                )),
            };
        }
        let principal = match credential(headers)? {
            Some(Credential::ApiKey(secret)) => {
                let verifier = self.api_keys.read().unwrap_or_else(|p| p.into_inner()).clone();
                let Some(v) = verifier else {
                    return Err((
                        Status::unauthenticated(
                            "API keys are verified by blob nodes and this node has no key store: use a certificate or a JWT here",
                        ),
                        "api_keys_unavailable",
                    ));
                };
                let g = v.verify(&secret)?;
                let mut c = caller(Identity::ApiKey { id: g.id, name: g.name }, g.scopes, g.key_prefix);
                c.valid_until = g.expires;
                c
            }
            Some(Credential::Jwt(token)) => {
                let Some(j) = &self.jwt else {
                    return Err((
                        Status::unauthenticated(
                            "JWTs are not accepted here: no --jwt-hs256-secret-file or --jwt-jwks-file is configured",
                        ),
                        "jwt_not_configured",
                    ));
                };
                let verified = j
                    .verify(&token)
                    .map_err(|r| (Status::unauthenticated(r.message), r.reason))?;
                let grant = self.scopes.for_subject(&verified.subject);
                let mut c = caller(
                    Identity::Jwt {
                        subject: verified.subject,
                    },
                    grant.scopes,
                    grant.key_prefix,
                );
                c.valid_until = Some(verified.expires);
                c
            }
            None => match conn_identity {
                Identity::Anonymous => {
                    return Err((
                        Status::unauthenticated(
                            "no credentials: present a client certificate signed by the server's CA, an API key or a JWT",
                        ),
                        "no_credentials",
                    ));
                }
                Identity::Client { ref sans, .. } => {
                    let s = self.scopes.for_certificate(sans);
                    caller(conn_identity, s, None)
                }
                other => caller(other, ScopeSet::ALL, None),
            },
        };
        self.permit(path, access, principal)
    }

    /// Checks an established principal against the access rule and the confinement of `path`.
    fn permit(&self, path: &str, access: Access, principal: Caller) -> Result<Caller, Refusal> {
        match access {
            Public => {}
            Internal if !principal.identity.is_service() => {
                return Err((
                    Status::permission_denied(format!(
                        "{path} is internal to PeerVault: only service identities may call it; caller is {}",
                        principal.identity
                    )),
                    "not_a_service",
                ));
            }
            Internal => {}
            Needs(s) if !principal.scopes.grants(s) => {
                return Err((
                    Status::permission_denied(format!(
                        "{path} needs scope '{}', which {} does not hold (it holds: {})",
                        s.as_str(),
                        principal.identity,
                        principal.scopes.names().join(", ")
                    )),
                    "missing_scope",
                ));
            }
            Needs(_) => {}
        }
        confine::check_path(principal.key_prefix.as_deref(), path).map_err(|st| (st, "outside_prefix"))?;
        Ok(principal)
    }
}

/// Establishes the [`Caller`] of every request and enforces [`ACCESS_TABLE`].
#[derive(Clone)]
pub struct AuthLayer {
    inner: Arc<AuthState>,
}

struct AuthState {
    authorizer: Arc<Authorizer>,
    metrics: Metrics,
}

impl AuthLayer {
    /// A layer deciding with `authorizer`, counting refusals in `metrics`.
    pub fn new(authorizer: Arc<Authorizer>, metrics: Metrics) -> Self {
        AuthLayer {
            inner: Arc::new(AuthState { authorizer, metrics }),
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

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let conn = req.extensions().get::<ConnInfo>().cloned();
        let identity = self.state.authorizer.connection_identity(conn.as_ref());
        let path = req.uri().path().to_string();
        // Take the service that was driven to readiness and leave a fresh clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        let first = state.authorizer.decide(&path, identity.clone(), req.headers());
        let refuse = move |state: &AuthState, status: Status, reason: &'static str| {
            state.metrics.auth_failures.with_label_values(&[reason]).inc();
            tracing::info!(
                path = %path,
                connection = %identity,
                remote = ?conn.as_ref().and_then(|c| c.remote_addr),
                code = ?status.code(),
                reason,
                "call refused"
            );
            Ok(status.into_http())
        };
        let remote_addr = req.extensions().get::<ConnInfo>().and_then(|c| c.remote_addr);
        let admit = move |mut req: Request<B>, mut caller: Caller| {
            caller.remote_addr = remote_addr;
            tracing::Span::current().record("caller", tracing::field::display(&caller.identity));
            req.extensions_mut().insert(caller);
            req
        };
        match first {
            Ok(caller) => inner.call(admit(req, caller)).boxed(),
            // An API key this process must first ask a blob node about.
            Err((_, reason)) if reason == remote::NOT_CACHED => async move {
                let path = req.uri().path().to_string();
                let conn = req.extensions().get::<ConnInfo>().cloned();
                let identity = state.authorizer.connection_identity(conn.as_ref());
                state.authorizer.fetch_presented_key(req.headers(), reason).await;
                match state.authorizer.decide(&path, identity, req.headers()) {
                    Ok(caller) => inner.call(admit(req, caller)).await,
                    Err((status, reason)) => refuse(&state, status, reason),
                }
            }
            .boxed(),
            Err((status, reason)) => futures_util::future::ready(refuse(&state, status, reason)).boxed(),
        }
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

    fn authorizer() -> Authorizer {
        Authorizer::new("peervault.local".into(), ScopeConfig::defaults("peervault.local"), None)
    }

    fn authorize(path: &str, id: &Identity) -> Result<Caller, Refusal> {
        authorizer().decide(path, id.clone(), &http::HeaderMap::new())
    }

    #[test]
    fn credentials_are_parsed_and_malformed_ones_refused() {
        let h = |k: &str, v: &str| {
            let mut m = http::HeaderMap::new();
            m.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
            m
        };
        assert_eq!(credential(&http::HeaderMap::new()).unwrap(), None);
        assert_eq!(
            credential(&h("x-api-key", "pvk_abc")).unwrap(),
            Some(Credential::ApiKey("pvk_abc".into()))
        );
        assert_eq!(
            credential(&h("authorization", "Bearer pvk_abc")).unwrap(),
            Some(Credential::ApiKey("pvk_abc".into()))
        );
        assert_eq!(
            credential(&h("authorization", "bearer a.b.c")).unwrap(),
            Some(Credential::Jwt("a.b.c".into()))
        );
        for bad in ["Bearer", "Bearer    ", "Basic dXNlcjpwdw==", "token"] {
            let (st, _) = credential(&h("authorization", bad)).unwrap_err();
            assert_eq!(st.code(), tonic::Code::Unauthenticated, "{bad}");
            assert!(!st.message().contains("dXNlcjpwdw"), "the secret must not be echoed");
        }
        let huge = format!("Bearer {}", "a".repeat(MAX_CREDENTIAL_LEN + 1));
        assert!(credential(&h("authorization", &huge)).is_err());
    }

    #[test]
    fn scopes_limit_what_a_certificate_may_call() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.yaml");
        std::fs::write(&p, "certificates:\n  spiffe://peervault.local/client/reader: [read]\n").unwrap();
        let a = Authorizer::new(
            "peervault.local".into(),
            ScopeConfig::load(&p, "peervault.local").unwrap(),
            None,
        );
        let reader = Identity::Client {
            id: "r".into(),
            sans: vec!["spiffe://peervault.local/client/reader".into()],
        };
        let none = http::HeaderMap::new();
        assert!(
            a.decide("/peervault.v1.FileService/GetFile", reader.clone(), &none)
                .is_ok()
        );
        let (st, reason) = a
            .decide("/peervault.v1.FileService/DeleteFile", reader, &none)
            .unwrap_err();
        assert_eq!((st.code(), reason), (tonic::Code::PermissionDenied, "missing_scope"));
        let stranger = Identity::Client {
            id: "s".into(),
            sans: vec!["spiffe://peervault.local/client/stranger".into()],
        };
        assert!(a.decide("/peervault.v1.FileService/GetFile", stranger, &none).is_err());
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
