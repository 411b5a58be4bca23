//! AuthService (API keys, admin only through the access table) and the verifier the shared auth
//! layer calls for every API key presented to this node.

use peervault_proto::v1::{
    ApiKey, CreateApiKeyRequest, CreateApiKeyResponse, ListApiKeysRequest, ListApiKeysResponse, RevokeApiKeyRequest,
    RevokeApiKeyResponse, VerifyApiKeyRequest, VerifyApiKeyResponse, auth_service_server::AuthService,
    create_api_key_request::Expiry,
};
use peervault_runtime::{
    Caller,
    auth::{ApiKeyGrant, ApiKeyVerifier, Refusal, ScopeSet},
};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
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

/// Checks API keys against this node's index on every call (so revocation is immediate), and
/// the keys behind open streams against a snapshot of the key table at most
/// [`SNAPSHOT_AGE`] old (many streams share one read).
pub struct KeyVerifier {
    store: Store,
    snapshot: Mutex<Option<(Instant, Arc<KeyStates>)>>,
}

/// Each key's (revoked, expiry in ns since the epoch) by id.
type KeyStates = HashMap<String, (bool, i64)>;

/// How old the key-table snapshot that open streams are checked against may be.
const SNAPSHOT_AGE: Duration = Duration::from_millis(500);

impl KeyVerifier {
    /// A verifier over `store`'s key table.
    pub fn new(store: Store) -> Self {
        KeyVerifier {
            store,
            snapshot: Mutex::new(None),
        }
    }

    fn snapshot(&self) -> Result<Arc<KeyStates>, Refusal> {
        let mut g = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, snap)) = g.as_ref()
            && at.elapsed() < SNAPSHOT_AGE
        {
            return Ok(snap.clone());
        }
        let keys = self.store.list_api_keys(true).map_err(|e| {
            tracing::error!(error = %e, "API key table read failed");
            (
                Status::unavailable("cannot check the API key now; retry"),
                "key_store_error",
            )
        })?;
        let snap = Arc::new(
            keys.into_iter()
                .map(|k| (k.id, (k.revoked, k.expires_ns)))
                .collect::<KeyStates>(),
        );
        *g = Some((Instant::now(), snap.clone()));
        Ok(snap)
    }
}

fn expiry(ns: i64) -> Option<SystemTime> {
    (ns > 0).then(|| UNIX_EPOCH + Duration::from_nanos(ns as u64))
}

impl ApiKeyVerifier for KeyVerifier {
    fn check_id(&self, id: &str) -> Result<(), Refusal> {
        let refused = |reason: &'static str, msg: &str| (Status::unauthenticated(msg.to_string()), reason);
        match self.snapshot()?.get(id) {
            None => Err(refused("unknown_key", "the API key of this stream no longer exists")),
            Some((true, _)) => Err(refused("revoked_key", "the API key of this stream has been revoked")),
            Some((false, ns)) if *ns > 0 && *ns <= now_ns() => {
                Err(refused("expired_key", "the API key of this stream has expired"))
            }
            Some(_) => Ok(()),
        }
    }

    fn verify(&self, secret: &str) -> Result<ApiKeyGrant, Refusal> {
        let refused = |reason: &'static str, msg: &str| (Status::unauthenticated(msg.to_string()), reason);
        match self.store.verify_api_key(secret) {
            Ok(Ok(rec)) => Ok(ApiKeyGrant {
                scopes: ScopeSet::parse(&rec.scopes).unwrap_or(ScopeSet::NONE),
                key_prefix: (!rec.key_prefix.is_empty()).then(|| rec.key_prefix.clone()),
                expires: expiry(rec.expires_ns),
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
        let caller = req.extensions().get::<Caller>().cloned();
        let by = caller.as_ref().map(|c| c.identity.to_string()).unwrap_or_default();
        let req = req.into_inner();
        if req.name.trim().is_empty() {
            return Err(Status::invalid_argument("give the key a name"));
        }
        validate::short_text("name", &req.name).map_err(Status::from)?;
        if !req.key_prefix.is_empty() {
            validate::file_key(&req.key_prefix).map_err(Status::from)?;
        }
        let scopes = check_scopes(&req.scopes).map_err(Status::from)?;
        // A new key fits inside its creator: no scope it lacks, no prefix outside its own.
        let Some(caller) = caller else {
            return Err(Status::internal("no caller established for CreateApiKey"));
        };
        let asked = ScopeSet::parse(&scopes).map_err(Status::invalid_argument)?;
        peervault_runtime::auth::confine::check_grant(&caller, asked, &req.key_prefix).inspect_err(|st| {
            tracing::info!(caller = %caller.identity, error = %st.message(), "CreateApiKey refused: broader than its creator");
        })?;
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

    async fn verify_api_key(
        &self,
        req: Request<VerifyApiKeyRequest>,
    ) -> Result<Response<VerifyApiKeyResponse>, Status> {
        let r = req.into_inner();
        let store = self.store.clone();
        let unauth = |m: &str| Status::unauthenticated(m.to_string());
        let rec = if !r.secret.is_empty() {
            match blocking(move || store.verify_api_key(&r.secret)).await? {
                Ok(rec) => rec,
                Err(KeyRefusal::Unknown) => return Err(unauth("unknown API key")),
                Err(KeyRefusal::Revoked) => return Err(unauth("this API key has been revoked")),
                Err(KeyRefusal::Expired) => return Err(unauth("this API key has expired")),
            }
        } else if !r.id.is_empty() {
            let id = r.id;
            let keys = blocking(move || store.list_api_keys(true)).await?;
            let Some(rec) = keys.into_iter().find(|k| k.id == id) else {
                return Err(unauth("unknown API key"));
            };
            if rec.revoked {
                return Err(unauth("this API key has been revoked"));
            }
            if rec.expires_ns > 0 && rec.expires_ns <= now_ns() {
                return Err(unauth("this API key has expired"));
            }
            rec
        } else {
            return Err(Status::invalid_argument(
                "give the secret or the id of the key to verify",
            ));
        };
        Ok(Response::new(VerifyApiKeyResponse {
            key: Some(to_proto(&rec)),
        }))
    }
}
