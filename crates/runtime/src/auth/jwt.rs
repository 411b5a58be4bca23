//! JWT bearer tokens: HS256 with a secret file, or RS256/ES256 with the public keys of a JWKS
//! file that is re-read when it changes (a Kubernetes cluster's service-account issuer keys are
//! such a file). `exp`, `nbf`, `iss` and `aud` are checked with a small clock-skew allowance.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind, jwk::Jwk};
use serde::Deserialize;

/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;
/// How often the JWKS file's modification time is checked.
const JWKS_CHECK: Duration = Duration::from_secs(1);

/// Why a token was refused: a bounded metric label and a message that never repeats the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtReject {
    /// Metric label.
    pub reason: &'static str,
    /// Message for the caller.
    pub message: String,
}

fn reject(reason: &'static str, message: impl Into<String>) -> JwtReject {
    JwtReject {
        reason,
        message: message.into(),
    }
}

enum Keys {
    Hs256(DecodingKey),
    Jwks { path: PathBuf, cache: Mutex<JwksCache> },
}

struct JwksCache {
    keys: Vec<LoadedKey>,
    stamp: Option<(SystemTime, u64)>,
    checked: Option<Instant>,
}

/// Verifies JWTs against the configured keys.
pub struct JwtVerifier {
    keys: Keys,
    issuer: Option<String>,
    audience: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

/// What a verified token establishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The `sub` claim.
    pub subject: String,
    /// The `exp` claim: streams opened with the token end then.
    pub expires: SystemTime,
}

fn load_jwks(path: &Path) -> Result<Vec<LoadedKey>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read --jwt-jwks-file {}: {e}", path.display()))?;
    // Keys are parsed one by one: a key of a type this library does not know must not make the
    // whole set unusable.
    #[derive(Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let set: RawSet =
        serde_json::from_str(&text).map_err(|e| format!("invalid --jwt-jwks-file {}: {e}", path.display()))?;
    let mut parsed = Vec::new();
    for (i, raw) in set.keys.into_iter().enumerate() {
        let kty = raw.get("kty").and_then(|v| v.as_str()).unwrap_or("").to_string();
        match serde_json::from_value::<Jwk>(raw) {
            Ok(jwk) => parsed.push((i, jwk)),
            Err(e) => tracing::warn!(
                path = %path.display(), index = i, kty = %kty, error = %e,
                "JWKS key skipped: unknown key type"
            ),
        }
    }
    let mut keys = Vec::new();
    for (i, jwk) in &parsed {
        match usable_key(jwk) {
            Ok(Some(k)) => keys.push(k),
            // A key set may hold keys for other uses (encryption, symmetric keys, curves we do
            // not verify): skip them, name them in the log, and keep the others.
            Ok(None) => tracing::warn!(
                path = %path.display(), index = i, kid = jwk.common.key_id.as_deref().unwrap_or(""),
                "JWKS key skipped: not an RS256/RS384/RS512/ES256/ES384 public key"
            ),
            Err(e) => tracing::warn!(
                path = %path.display(), index = i, kid = jwk.common.key_id.as_deref().unwrap_or(""),
                error = %e, "JWKS key skipped: unusable"
            ),
        }
    }
    if keys.is_empty() {
        return Err(format!(
            "--jwt-jwks-file {} holds no usable RS/ES public key",
            path.display()
        ));
    }
    Ok(keys)
}

type LoadedKey = (Option<String>, Algorithm, DecodingKey);

/// The key a JWK stands for, `None` when it is of a kind this verifier does not use.
fn usable_key(jwk: &jsonwebtoken::jwk::Jwk) -> Result<Option<LoadedKey>, String> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve};
    let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
        (_, Some(a)) => match a.to_string().parse::<Algorithm>() {
            Ok(a) => a,
            Err(_) => return Ok(None),
        },
        (AlgorithmParameters::RSA(_), None) => Algorithm::RS256,
        (AlgorithmParameters::EllipticCurve(p), None) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        (AlgorithmParameters::EllipticCurve(p), None) if p.curve == EllipticCurve::P384 => Algorithm::ES384,
        _ => return Ok(None),
    };
    if !matches!(
        alg,
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 | Algorithm::ES256 | Algorithm::ES384
    ) {
        // Symmetric keys have no place in a public key set; other families are not verified.
        return Ok(None);
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("invalid key: {e}"))?;
    Ok(Some((jwk.common.key_id.clone(), alg, key)))
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl JwtVerifier {
    /// A verifier from the flags; `None` when no JWT key is configured. A JWKS (a cluster's
    /// service-account keys sign tokens for every audience) needs `--jwt-audience` unless
    /// `allow_any_audience` (`--jwt-allow-any-audience`) says otherwise.
    pub fn from_flags(
        hs256_secret_file: Option<&Path>,
        jwks_file: Option<&Path>,
        issuer: Option<String>,
        audience: Option<String>,
        allow_any_audience: bool,
    ) -> Result<Option<JwtVerifier>, String> {
        if jwks_file.is_some() && audience.is_none() && !allow_any_audience {
            return Err(
                "--jwt-jwks-file needs --jwt-audience: without it a token minted for any other service \
                 (every Kubernetes service-account token) would be accepted here; pass --jwt-allow-any-audience \
                 to accept that deliberately"
                    .into(),
            );
        }
        let keys = match (hs256_secret_file, jwks_file) {
            (Some(f), None) => {
                let secret = std::fs::read(f)
                    .map_err(|e| format!("cannot read --jwt-hs256-secret-file {}: {e}", f.display()))?;
                // A trailing newline from `echo > file` is not part of the secret; anything else is.
                let secret = secret.strip_suffix(b"\n").unwrap_or(&secret);
                let secret = secret.strip_suffix(b"\r").unwrap_or(secret);
                if secret.len() < 32 {
                    return Err(format!(
                        "--jwt-hs256-secret-file {} holds {} bytes; use at least 32 random bytes",
                        f.display(),
                        secret.len()
                    ));
                }
                Keys::Hs256(DecodingKey::from_secret(secret))
            }
            (None, Some(f)) => {
                let keys = load_jwks(f)?;
                Keys::Jwks {
                    path: f.to_path_buf(),
                    cache: Mutex::new(JwksCache {
                        keys,
                        stamp: stamp(f),
                        checked: Some(Instant::now()),
                    }),
                }
            }
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err("--jwt-hs256-secret-file and --jwt-jwks-file exclude each other: choose one".into());
            }
        };
        Ok(Some(JwtVerifier { keys, issuer, audience }))
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        // A configured issuer or audience is a claim the token must carry, not one it may omit.
        let mut required = vec!["exp", "sub"];
        if self.issuer.is_some() {
            required.push("iss");
        }
        if self.audience.is_some() {
            required.push("aud");
        }
        v.set_required_spec_claims(&required);
        match &self.issuer {
            Some(i) => v.set_issuer(&[i]),
            None => v.iss = None,
        }
        match &self.audience {
            Some(a) => v.set_audience(&[a]),
            None => v.validate_aud = false,
        }
        v
    }

    /// Verifies `token` and returns its subject and expiry.
    pub fn verify(&self, token: &str) -> Result<Verified, JwtReject> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| {
            reject(
                "malformed_token",
                "the bearer token is not a well-formed JWT with a supported algorithm (alg \"none\" is never accepted)",
            )
        })?;
        let (alg, key) = match &self.keys {
            Keys::Hs256(k) => {
                if header.alg != Algorithm::HS256 {
                    return Err(reject(
                        "algorithm_not_allowed",
                        format!("JWT algorithm {:?} is not accepted here (HS256 only)", header.alg),
                    ));
                }
                (Algorithm::HS256, k.clone())
            }
            Keys::Jwks { path, cache } => {
                if matches!(header.alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
                    return Err(reject(
                        "algorithm_not_allowed",
                        "JWT algorithm HS* is not accepted with public keys (algorithm confusion)",
                    ));
                }
                let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
                if c.checked.is_none_or(|t| t.elapsed() >= JWKS_CHECK) {
                    c.checked = Some(Instant::now());
                    let now = stamp(path);
                    if now != c.stamp {
                        match load_jwks(path) {
                            Ok(keys) => {
                                tracing::info!(path = %path.display(), keys = keys.len(), "JWKS reloaded");
                                c.keys = keys;
                                c.stamp = now;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "JWKS changed but cannot be loaded; keeping the previous keys")
                            }
                        }
                    }
                }
                let found = c.keys.iter().find(|(kid, alg, _)| {
                    *alg == header.alg && (header.kid.is_none() || kid.as_deref() == header.kid.as_deref())
                });
                match found {
                    Some((_, alg, key)) => (*alg, key.clone()),
                    None => {
                        return Err(reject(
                            "unknown_key",
                            "no key in the configured JWKS matches the token's kid and algorithm",
                        ));
                    }
                }
            }
        };
        let data = jsonwebtoken::decode::<Claims>(token, &key, &self.validation(alg)).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => reject("expired", "the JWT has expired"),
            ErrorKind::ImmatureSignature => reject("not_yet_valid", "the JWT is not valid yet (nbf)"),
            ErrorKind::InvalidIssuer => reject("wrong_issuer", "the JWT's issuer is not the configured --jwt-issuer"),
            ErrorKind::InvalidAudience => {
                reject("wrong_audience", "the JWT's audience does not include --jwt-audience")
            }
            ErrorKind::InvalidSignature => reject("bad_signature", "the JWT's signature does not verify"),
            ErrorKind::MissingRequiredClaim(c) => reject("missing_claim", format!("the JWT lacks the '{c}' claim")),
            ErrorKind::InvalidAlgorithm => {
                reject("algorithm_not_allowed", "the JWT's algorithm does not match its key")
            }
            _ => reject("malformed_token", "the bearer token is not a valid JWT"),
        })?;
        Ok(Verified {
            subject: data.claims.sub,
            expires: std::time::UNIX_EPOCH + Duration::from_secs(data.claims.exp),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn hs_verifier(dir: &Path, secret: &[u8]) -> JwtVerifier {
        let f = dir.join("secret");
        std::fs::write(&f, secret).unwrap();
        JwtVerifier::from_flags(Some(&f), None, Some("iss1".into()), Some("peervault".into()), false)
            .unwrap()
            .unwrap()
    }

    fn token(secret: &[u8], claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[test]
    fn hs256_claims_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let secret = [7u8; 32];
        let v = hs_verifier(dir.path(), &secret);
        let ok = serde_json::json!({"sub": "alice", "exp": now() + 60, "iss": "iss1", "aud": "peervault"});
        assert_eq!(v.verify(&token(&secret, ok.clone())).unwrap().subject, "alice");
        // A configured audience or issuer must be present, not merely not wrong.
        for claim in ["aud", "iss"] {
            let mut c = ok.clone();
            c.as_object_mut().unwrap().remove(claim);
            assert_eq!(
                v.verify(&token(&secret, c)).unwrap_err().reason,
                "missing_claim",
                "token without {claim}"
            );
        }
        let mut c = ok.clone();
        c["exp"] = serde_json::json!(now() - 3600);
        assert_eq!(v.verify(&token(&secret, c)).unwrap_err().reason, "expired");
        let mut c = ok.clone();
        c["nbf"] = serde_json::json!(now() + 3600);
        assert_eq!(v.verify(&token(&secret, c)).unwrap_err().reason, "not_yet_valid");
        let mut c = ok.clone();
        c["aud"] = serde_json::json!("someone-else");
        assert_eq!(v.verify(&token(&secret, c)).unwrap_err().reason, "wrong_audience");
        let mut c = ok.clone();
        c["iss"] = serde_json::json!("evil");
        assert_eq!(v.verify(&token(&secret, c)).unwrap_err().reason, "wrong_issuer");
        assert_eq!(v.verify(&token(&[8u8; 32], ok)).unwrap_err().reason, "bad_signature");
        // alg "none": header {"alg":"none"} and no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSJ9.";
        assert_eq!(v.verify(none).unwrap_err().reason, "malformed_token");
        assert_eq!(v.verify("garbage").unwrap_err().reason, "malformed_token");
    }

    fn ec_jwk(kid: &str) -> serde_json::Value {
        use base64::Engine;
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        serde_json::json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": kid,
            "x": b64(&raw[1..33]), "y": b64(&raw[33..65])})
    }

    #[test]
    fn a_jwks_without_an_audience_is_refused_unless_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("jwks.json");
        std::fs::write(&f, serde_json::json!({"keys": [ec_jwk("k1")]}).to_string()).unwrap();
        let err = JwtVerifier::from_flags(None, Some(&f), None, None, false)
            .err()
            .unwrap();
        assert!(
            err.contains("--jwt-audience") && err.contains("--jwt-allow-any-audience"),
            "{err}"
        );
        assert!(
            JwtVerifier::from_flags(None, Some(&f), None, None, true)
                .unwrap()
                .is_some()
        );
        assert!(
            JwtVerifier::from_flags(None, Some(&f), None, Some("pv".into()), false)
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn a_jwks_with_an_unknown_key_type_loads_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("jwks.json");
        let unknown = serde_json::json!({"kty": "PQC", "kid": "future", "pub": "AAAA"});
        let okp = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"});
        let symmetric = serde_json::json!({"kty": "oct", "kid": "sym", "k": "c2VjcmV0"});
        std::fs::write(
            &f,
            serde_json::json!({"keys": [unknown, okp, symmetric, ec_jwk("k1")]}).to_string(),
        )
        .unwrap();
        let keys = load_jwks(&f).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].0.as_deref(), Some("k1"));
        std::fs::write(&f, serde_json::json!({"keys": [symmetric_only()]}).to_string()).unwrap();
        assert!(load_jwks(&f).err().unwrap().contains("no usable"));
    }

    fn symmetric_only() -> serde_json::Value {
        serde_json::json!({"kty": "oct", "kid": "sym", "k": "c2VjcmV0"})
    }

    #[test]
    fn short_secrets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s");
        std::fs::write(&f, "short").unwrap();
        assert!(
            JwtVerifier::from_flags(Some(&f), None, None, None, false)
                .err()
                .unwrap()
                .contains("32")
        );
    }
}
