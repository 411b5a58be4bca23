//! AuthService (API keys, admin only through the access table) and the verifier the shared auth
//! layer calls for every API key presented to this node.

use peervault_proto::v1::{
    ApiKey, CreateApiKeyRequest, CreateApiKeyResponse, ListApiKeysRequest, ListApiKeysResponse, RevokeApiKeyRequest,
    RevokeApiKeyResponse, auth_service_server::AuthService, create_api_key_request::Expiry,
};
use peervault_runtime::{
    Caller,
    auth::{ApiKeyGrant, ApiKeyVerifier, Refusal, ScopeSet},
};
use tonic::{Request, Response, Status};

use super::{BlobApi, timestamp};
use crate::{
    error::BlobError,
    store::{
        Store,
        keys::{ApiKeyRec, KeyRefusal, check_scopes},
        now_ns,
    },
    validate,
};

/// Checks API keys against this node's index on every call (so revocation is immediate).
pub struct KeyVerifier(pub Store);

impl ApiKeyVerifier for KeyVerifier {
    fn verify(&self, secret: &str) -> Result<ApiKeyGrant, Refusal> {
        let refused = |reason: &'static str, msg: &str| (Status::unauthenticated(msg.to_string()), reason);
        match self.0.verify_api_key(secret) {
            Ok(Ok(rec)) => Ok(ApiKeyGrant {
                scopes: ScopeSet::parse(&rec.scopes).unwrap_or(ScopeSet::NONE),
                key_prefix: (!rec.key_prefix.is_empty()).then(|| rec.key_prefix.clone()),
                id: rec.id,
                name: rec.name,
            }),
            Ok(Err(KeyRefusal::Unknown)) => Err(refused("unknown_key", "unknown API key")),
            Ok(Err(KeyRefusal::Revoked)) => Err(refused("revoked_key", "this API key has been revoked")),
            Ok(Err(KeyRefusal::Expired)) => Err(refused("expired_key", "this API key has expired")),
            Err(e) => {
                tracing::error!(error = %e, "API key lookup failed");
                Err((
                    Status::unavailable("cannot check the API key now; retry"),
                    "key_store_error",
                ))
            }
        }
    }
}

fn to_proto(r: &ApiKeyRec) -> ApiKey {
    ApiKey {
        id: r.id.clone(),
        name: r.name.clone(),
        scopes: r.scopes.clone(),
        key_prefix: r.key_prefix.clone(),
        created_at: Some(timestamp(r.created_ns)),
        expires_at: (r.expires_ns > 0).then(|| timestamp(r.expires_ns)),
        revoked: r.revoked,
        revoked_at: (r.revoked_ns > 0).then(|| timestamp(r.revoked_ns)),
        created_by: r.created_by.clone(),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, BlobError> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("key store task failed: {e}")))?
        .map_err(Status::from)
}

#[tonic::async_trait]
impl AuthService for BlobApi {
    async fn create_api_key(
        &self,
        req: Request<CreateApiKeyRequest>,
    ) -> Result<Response<CreateApiKeyResponse>, Status> {
        let by = req
            .extensions()
            .get::<Caller>()
            .map(|c| c.identity.to_string())
            .unwrap_or_default();
        let req = req.into_inner();
        if req.name.trim().is_empty() {
            return Err(Status::invalid_argument("give the key a name"));
        }
        validate::short_text("name", &req.name).map_err(Status::from)?;
        if !req.key_prefix.is_empty() {
            validate::file_key(&req.key_prefix).map_err(Status::from)?;
        }
        let scopes = check_scopes(&req.scopes).map_err(Status::from)?;
        let now = now_ns();
        let expires_ns = match req.expiry {
            None => 0,
            Some(Expiry::Ttl(d)) => {
                let ns = d.seconds.saturating_mul(1_000_000_000).saturating_add(d.nanos as i64);
                if ns <= 0 {
                    return Err(Status::invalid_argument("ttl must be positive"));
                }
                now.saturating_add(ns)
            }
            Some(Expiry::ExpiresAt(t)) => {
                let ns = t.seconds.saturating_mul(1_000_000_000).saturating_add(t.nanos as i64);
                if ns <= now {
                    return Err(Status::invalid_argument("expires_at must be in the future"));
                }
                ns
            }
        };
        let store = self.store.clone();
        let (rec, secret) =
            blocking(move || store.create_api_key(&req.name, scopes, &req.key_prefix, expires_ns, &by)).await?;
        // Every blob pod verifies every key: the record goes to the others before the answer.
        self.cluster.spread_api_keys().await;
        Ok(Response::new(CreateApiKeyResponse {
            key: Some(to_proto(&rec)),
            secret,
        }))
    }

    async fn list_api_keys(&self, req: Request<ListApiKeysRequest>) -> Result<Response<ListApiKeysResponse>, Status> {
        let include = req.into_inner().include_revoked;
        let store = self.store.clone();
        let keys = blocking(move || store.list_api_keys(include)).await?;
        Ok(Response::new(ListApiKeysResponse {
            keys: keys.iter().map(to_proto).collect(),
        }))
    }

    async fn revoke_api_key(
        &self,
        req: Request<RevokeApiKeyRequest>,
    ) -> Result<Response<RevokeApiKeyResponse>, Status> {
        let id = req.into_inner().id;
        if id.is_empty() {
            return Err(Status::invalid_argument("give the id of the key to revoke"));
        }
        let store = self.store.clone();
        let rec = blocking(move || store.revoke_api_key(&id)).await?;
        self.cluster.spread_api_keys().await;
        Ok(Response::new(RevokeApiKeyResponse {
            key: Some(to_proto(&rec)),
        }))
    }
}
