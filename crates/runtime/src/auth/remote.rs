//! API keys verified by a blob node for processes without a key store (`serve peer`,
//! `serve events` with `--auth-endpoint`): `AuthService.VerifyApiKey` (internal) over the
//! process's service channel, with a short cache so that one key costs one call per
//! `--auth-cache-ttl`. A revoked key stops working within that TTL: new calls re-verify once the
//! entry is older, and streams opened with it are re-checked by id in the background.
//!
//! The auth layer is synchronous; a key not in the cache is refused with
//! [`NOT_CACHED`], and the layer (or the WebSocket gateway) then awaits [`RemoteKeys::fetch`] and
//! decides again.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use peervault_proto::v1::{ApiKey, VerifyApiKeyRequest, auth_service_client::AuthServiceClient};
use tonic::Status;

use super::{ApiKeyGrant, ApiKeyVerifier, Refusal, ScopeSet};
use crate::client::ServiceChannel;

/// The refusal label of a key that must first be fetched from the blob node.
pub const NOT_CACHED: &str = "api_key_not_cached";

/// Deadline of one verification call.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

struct Entry {
    grant: Result<ApiKeyGrant, Refusal>,
    fetched: Instant,
}

#[derive(Default)]
struct Cache {
    by_secret: HashMap<String, Entry>,
    by_id: HashMap<String, Entry>,
    refreshing: std::collections::HashSet<String>,
}

/// API key verification delegated to a blob node.
pub struct RemoteKeys {
    client: AuthServiceClient<ServiceChannel>,
    ttl: Duration,
    cache: Mutex<Cache>,
}

fn grant_of(k: ApiKey) -> ApiKeyGrant {
    ApiKeyGrant {
        scopes: ScopeSet::parse(&k.scopes).unwrap_or(ScopeSet::NONE),
        key_prefix: (!k.key_prefix.is_empty()).then_some(k.key_prefix),
        expires: k
            .expires_at
            .and_then(|t| u64::try_from(t.seconds).ok())
            .map(|s| UNIX_EPOCH + Duration::from_secs(s)),
        id: k.id,
        name: k.name,
    }
}

/// A refusal from the blob node, kept as it said (bounded labels only).
fn refusal_of(st: Status) -> Refusal {
    let reason = match st.code() {
        tonic::Code::Unauthenticated if st.message().contains("revoked") => "revoked_key",
        tonic::Code::Unauthenticated if st.message().contains("expired") => "expired_key",
        tonic::Code::Unauthenticated => "unknown_key",
        _ => "key_store_error",
    };
    let st = if reason == "key_store_error" {
        tracing::warn!(code = ?st.code(), error = %st.message(), "API key verification by the blob node failed");
        Status::unavailable("cannot check the API key now (the blob node that verifies keys is unreachable); retry")
    } else {
        Status::unauthenticated(st.message().to_string())
    };
    (st, reason)
}

impl RemoteKeys {
    /// Verification through `channel` (a service channel to a blob node), cached for `ttl`.
    pub fn new(channel: ServiceChannel, ttl: Duration) -> Arc<Self> {
        Arc::new(RemoteKeys {
            client: AuthServiceClient::new(channel),
            ttl,
            cache: Mutex::new(Cache::default()),
        })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn call(&self, req: VerifyApiKeyRequest) -> Result<ApiKeyGrant, Refusal> {
        let mut client = self.client.clone();
        let mut r = tonic::Request::new(req);
        r.set_timeout(CALL_TIMEOUT);
        match tokio::time::timeout(CALL_TIMEOUT, client.verify_api_key(r)).await {
            Ok(Ok(resp)) => match resp.into_inner().key {
                Some(k) => Ok(grant_of(k)),
                None => Err(refusal_of(Status::internal("empty VerifyApiKey answer"))),
            },
            Ok(Err(st)) => Err(refusal_of(st)),
            Err(_) => Err(refusal_of(Status::deadline_exceeded("VerifyApiKey timed out"))),
        }
    }

    /// Asks the blob node about `secret` and caches the answer (a refusal too, so that a bad key
    /// does not become a call per request).
    pub async fn fetch(&self, secret: &str) -> Result<ApiKeyGrant, Refusal> {
        let r = self
            .call(VerifyApiKeyRequest {
                secret: secret.to_string(),
                id: String::new(),
            })
            .await;
        let now = Instant::now();
        let mut c = self.cache();
        if c.by_secret.len() > 10_000 {
            // Bounded: a flood of distinct bad keys must not grow memory.
            c.by_secret.retain(|_, e| e.fetched.elapsed() < self.ttl);
        }
        c.by_secret.insert(
            secret.to_string(),
            Entry {
                grant: r.clone(),
                fetched: now,
            },
        );
        if let Ok(g) = &r {
            c.by_id.insert(
                g.id.clone(),
                Entry {
                    grant: r.clone(),
                    fetched: now,
                },
            );
        }
        r
    }

    fn refresh_id(self: &Arc<Self>, id: &str) {
        if !self.cache().refreshing.insert(id.to_string()) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.cache().refreshing.remove(id);
            return;
        };
        let this = self.clone();
        let id = id.to_string();
        handle.spawn(async move {
            let r = this
                .call(VerifyApiKeyRequest {
                    secret: String::new(),
                    id: id.clone(),
                })
                .await;
            let mut c = this.cache();
            c.refreshing.remove(&id);
            // An unreachable blob node keeps the last known state rather than ending streams.
            if !matches!(&r, Err((_, "key_store_error"))) {
                c.by_id.insert(
                    id,
                    Entry {
                        grant: r,
                        fetched: Instant::now(),
                    },
                );
            }
        });
    }
}

/// The synchronous face the auth layer calls: answers from the cache only.
pub struct CachedRemoteKeys(pub Arc<RemoteKeys>);

impl ApiKeyVerifier for CachedRemoteKeys {
    fn verify(&self, secret: &str) -> Result<ApiKeyGrant, Refusal> {
        let c = self.0.cache();
        match c.by_secret.get(secret) {
            Some(e) if e.fetched.elapsed() < self.0.ttl => {
                let r = e.grant.clone()?;
                if r.expires.is_some_and(|t| SystemTime::now() >= t) {
                    return Err((Status::unauthenticated("this API key has expired"), "expired_key"));
                }
                Ok(r)
            }
            _ => Err((Status::unauthenticated("the API key is being verified"), NOT_CACHED)),
        }
    }

    fn check_id(&self, id: &str) -> Result<(), Refusal> {
        let (state, stale) = {
            let c = self.0.cache();
            match c.by_id.get(id) {
                Some(e) => (e.grant.clone().map(|_| ()), e.fetched.elapsed() >= self.0.ttl),
                None => (Ok(()), true),
            }
        };
        if stale {
            self.0.refresh_id(id);
        }
        state
    }

    fn remote(&self) -> Option<Arc<RemoteKeys>> {
        Some(self.0.clone())
    }
}
