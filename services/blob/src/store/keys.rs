//! API keys: random secrets with a recognisable `pvk_` prefix, stored only as their BLAKE3 hash
//! in the index, compared in constant time, revocable with effect on the next call.

use std::collections::HashMap;

use prost::Message;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{Store, now_ns};
use crate::error::{BlobError, Result};

/// Key records by id.
pub(crate) const API_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("api_keys");
/// Key ids by the hash of their secret.
pub(crate) const API_KEY_HASHES: TableDefinition<&[u8], &str> = TableDefinition::new("api_key_hashes");

/// A stored API key (never the secret).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ApiKeyRec {
    /// Id (`key_…`).
    #[prost(string, tag = "1")]
    pub id: String,
    /// Name, unique among keys not revoked.
    #[prost(string, tag = "2")]
    pub name: String,
    /// Scope names.
    #[prost(string, repeated, tag = "3")]
    pub scopes: Vec<String>,
    /// Key prefix restriction ("" for none).
    #[prost(string, tag = "4")]
    pub key_prefix: String,
    /// Creation time, ns since the epoch.
    #[prost(int64, tag = "5")]
    pub created_ns: i64,
    /// Expiry, ns since the epoch (0: never).
    #[prost(int64, tag = "6")]
    pub expires_ns: i64,
    /// Revoked.
    #[prost(bool, tag = "7")]
    pub revoked: bool,
    /// Revocation time (0 if not revoked).
    #[prost(int64, tag = "8")]
    pub revoked_ns: i64,
    /// Who created it.
    #[prost(string, tag = "9")]
    pub created_by: String,
    /// BLAKE3 of the secret.
    #[prost(bytes = "vec", tag = "10")]
    pub secret_hash: Vec<u8>,
}

/// Why a presented key is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRefusal {
    /// No such key.
    Unknown,
    /// Revoked.
    Revoked,
    /// Past its expiry.
    Expired,
}

fn random_token(bytes: usize) -> Result<String> {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| BlobError::Unavailable("the system random source failed".into()))?;
    Ok(super::hex(&buf))
}

fn decode(bytes: &[u8]) -> Result<ApiKeyRec> {
    super::records::decode("api key", bytes)
}

impl Store {
    /// Creates a key; returns its record and the secret (shown once, stored only hashed).
    /// Blocking.
    pub fn create_api_key(
        &self,
        name: &str,
        scopes: Vec<String>,
        key_prefix: &str,
        expires_ns: i64,
        created_by: &str,
    ) -> Result<(ApiKeyRec, String)> {
        let id = format!("key_{}", random_token(8)?);
        let secret = format!("pvk_{}", random_token(24)?);
        let hash = blake3::hash(secret.as_bytes());
        let rec = ApiKeyRec {
            id: id.clone(),
            name: name.to_string(),
            scopes,
            key_prefix: key_prefix.to_string(),
            created_ns: now_ns(),
            expires_ns,
            revoked: false,
            revoked_ns: 0,
            created_by: created_by.to_string(),
            secret_hash: hash.as_bytes().to_vec(),
        };
        let txn = self.inner.db.begin_write()?;
        {
            let mut keys = txn.open_table(API_KEYS)?;
            for e in keys.iter()? {
                let (_, v) = e?;
                let other = decode(v.value())?;
                if !other.revoked && other.name == name {
                    return Err(BlobError::AlreadyExists(format!(
                        "an API key named '{name}' exists ({}); revoke it or choose another name",
                        other.id
                    )));
                }
            }
            keys.insert(id.as_str(), rec.encode_to_vec().as_slice())?;
            txn.open_table(API_KEY_HASHES)?
                .insert(hash.as_bytes().as_slice(), id.as_str())?;
        }
        txn.commit()?;
        tracing::info!(id = %id, name, created_by, "API key created");
        Ok((rec, secret))
    }

    /// Every key (revoked ones only when asked). Blocking.
    pub fn list_api_keys(&self, include_revoked: bool) -> Result<Vec<ApiKeyRec>> {
        let txn = self.inner.db.begin_read()?;
        let t = txn.open_table(API_KEYS)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (_, v) = e?;
            let rec = decode(v.value())?;
            if include_revoked || !rec.revoked {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Revokes a key (again: no change). Blocking.
    pub fn revoke_api_key(&self, id: &str) -> Result<ApiKeyRec> {
        let txn = self.inner.db.begin_write()?;
        let rec = {
            let mut t = txn.open_table(API_KEYS)?;
            let cur = t.get(id)?.map(|v| v.value().to_vec());
            let Some(cur) = cur else {
                return Err(BlobError::NotFound(format!("API key '{id}' not found")));
            };
            let mut rec = decode(&cur)?;
            if !rec.revoked {
                rec.revoked = true;
                rec.revoked_ns = now_ns();
                t.insert(id, rec.encode_to_vec().as_slice())?;
            }
            rec
        };
        txn.commit()?;
        tracing::info!(id, "API key revoked");
        Ok(rec)
    }

    /// Looks up a presented secret. Blocking (one index read).
    pub fn verify_api_key(&self, secret: &str) -> Result<std::result::Result<ApiKeyRec, KeyRefusal>> {
        let hash = blake3::hash(secret.as_bytes());
        let txn = self.inner.db.begin_read()?;
        let id = txn
            .open_table(API_KEY_HASHES)?
            .get(hash.as_bytes().as_slice())?
            .map(|v| v.value().to_string());
        let Some(id) = id else {
            return Ok(Err(KeyRefusal::Unknown));
        };
        let Some(v) = txn.open_table(API_KEYS)?.get(id.as_str())?.map(|v| v.value().to_vec()) else {
            return Ok(Err(KeyRefusal::Unknown));
        };
        let rec = decode(&v)?;
        // blake3::Hash compares in constant time.
        let stored = <[u8; 32]>::try_from(rec.secret_hash.as_slice()).map(blake3::Hash::from_bytes);
        if stored.map(|h| h != hash).unwrap_or(true) {
            return Ok(Err(KeyRefusal::Unknown));
        }
        if rec.revoked {
            return Ok(Err(KeyRefusal::Revoked));
        }
        if rec.expires_ns > 0 && rec.expires_ns <= now_ns() {
            return Ok(Err(KeyRefusal::Expired));
        }
        Ok(Ok(rec))
    }
}

/// Scope names from a request, checked.
pub fn check_scopes(scopes: &[String]) -> Result<Vec<String>> {
    if scopes.is_empty() {
        return Err(BlobError::invalid("give at least one scope: read, write or admin"));
    }
    let mut seen = HashMap::new();
    for s in scopes {
        if !matches!(s.as_str(), "read" | "write" | "admin") {
            return Err(BlobError::invalid(format!(
                "unknown scope '{s}' (expected read, write or admin)"
            )));
        }
        seen.insert(s.clone(), ());
    }
    let mut v: Vec<String> = seen.into_keys().collect();
    v.sort();
    Ok(v)
}
