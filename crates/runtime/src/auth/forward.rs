//! Forwarding the original caller across a facade. A service that relays a call to another
//! service (PeerVaultService → PeerService / EventService) sends the caller it established in the
//! `x-peervault-caller` metadata header; the receiving auth layer takes it as the caller — with
//! its scopes and key prefix — **only** when the connection itself carries a service identity.
//! From anyone else the header is a forgery and the call is refused.

use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use serde::{Deserialize, Serialize};
use tonic::Status;

use super::{MAX_CREDENTIAL_LEN, Refusal, ScopeSet};
use crate::identity::{Caller, Identity};

/// The metadata header carrying the original caller.
pub const CALLER_HEADER: &str = "x-peervault-caller";

#[derive(Serialize, Deserialize)]
struct Wire {
    kind: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    sans: Vec<String>,
    scopes: Vec<String>,
    #[serde(default)]
    key_prefix: Option<String>,
    /// Seconds since the epoch.
    #[serde(default)]
    valid_until: Option<u64>,
}

/// The header value standing for `caller`.
pub fn encode(caller: &Caller) -> Option<http::HeaderValue> {
    let (kind, id, name, sans) = match &caller.identity {
        Identity::Service { service, id } => ("service", id.clone(), service.clone(), vec![]),
        Identity::Client { id, sans } => ("client", id.clone(), String::new(), sans.clone()),
        Identity::ApiKey { id, name } => ("api_key", id.clone(), name.clone(), vec![]),
        Identity::Jwt { subject } => ("jwt", subject.clone(), String::new(), vec![]),
        Identity::Anonymous => ("anonymous", String::new(), String::new(), vec![]),
        Identity::Insecure => ("insecure", String::new(), String::new(), vec![]),
    };
    let wire = Wire {
        kind: kind.into(),
        id,
        name,
        sans,
        scopes: caller.scopes.names().into_iter().map(str::to_string).collect(),
        key_prefix: caller.key_prefix.clone(),
        valid_until: caller
            .valid_until
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs()),
    };
    let json = serde_json::to_vec(&wire).ok()?;
    let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
    http::HeaderValue::from_str(&text).ok()
}

/// Adds the header for `caller` to an outgoing request's metadata (replacing any).
pub fn attach(metadata: &mut tonic::metadata::MetadataMap, caller: &Caller) {
    if let Some(v) = encode(caller)
        && let Ok(v) = tonic::metadata::MetadataValue::try_from(v.as_bytes())
    {
        metadata.insert(CALLER_HEADER, v);
    }
}

/// The caller a header names. Only call this for a connection with a service identity.
pub fn decode(value: &http::HeaderValue) -> Result<Caller, Refusal> {
    let bad = || {
        (
            Status::unauthenticated(format!("malformed {CALLER_HEADER} header")),
            "malformed_credential",
        )
    };
    if value.len() > MAX_CREDENTIAL_LEN {
        return Err(bad());
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(value.as_bytes())
        .map_err(|_| bad())?;
    let w: Wire = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let identity = match w.kind.as_str() {
        "service" => Identity::Service {
            service: w.name,
            id: w.id,
        },
        "client" => Identity::Client { id: w.id, sans: w.sans },
        "api_key" => Identity::ApiKey { id: w.id, name: w.name },
        "jwt" => Identity::Jwt { subject: w.id },
        "anonymous" => Identity::Anonymous,
        "insecure" => Identity::Insecure,
        _ => return Err(bad()),
    };
    Ok(Caller {
        identity,
        remote_addr: None,
        scopes: ScopeSet::parse(&w.scopes).map_err(|_| bad())?,
        key_prefix: w.key_prefix,
        valid_until: w.valid_until.map(|s| UNIX_EPOCH + Duration::from_secs(s)),
    })
}

/// The refusal for a header presented by a connection without a service identity.
pub fn forged(conn: &Identity) -> Refusal {
    let st = match conn {
        Identity::Anonymous => Status::unauthenticated(format!(
            "{CALLER_HEADER} is accepted only from PeerVault service identities"
        )),
        other => Status::permission_denied(format!(
            "{CALLER_HEADER} is accepted only from PeerVault service identities; caller is {other}"
        )),
    };
    (st, "forged_caller_header")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_survives_the_trip() {
        let c = Caller {
            identity: Identity::ApiKey {
                id: "k1".into(),
                name: "team".into(),
            },
            remote_addr: None,
            scopes: ScopeSet::parse(&["read"]).unwrap(),
            key_prefix: Some("a/".into()),
            valid_until: Some(UNIX_EPOCH + Duration::from_secs(2_000_000_000)),
        };
        let back = decode(&encode(&c).unwrap()).unwrap();
        assert_eq!(back.identity, c.identity);
        assert_eq!(back.scopes, c.scopes);
        assert_eq!(back.key_prefix, c.key_prefix);
        assert_eq!(back.valid_until, c.valid_until);
        assert!(decode(&http::HeaderValue::from_static("not-base64!")).is_err());
    }
}
