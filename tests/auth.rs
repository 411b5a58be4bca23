//! Access control through real processes: API keys (scopes, prefix limits, revocation that
//! survives a restart), JWTs (HS256 and a JWKS file swapped on disk), and every kind of bad
//! credential with its status — health and reflection still need none.

mod common;

use std::{path::Path, time::Duration};

use base64::Engine;
use bytes::Bytes;
use common::{Node, NodeBuilder, WAIT, try_channel};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use peervault_proto::v1::{
    CreateApiKeyRequest, FileChunk, FileRequest, GetBlobRequest, ListApiKeysRequest, ListFilesRequest,
    RevokeApiKeyRequest, auth_service_client::AuthServiceClient, blob_service_client::BlobServiceClient,
    file_service_client::FileServiceClient, system_service_client::SystemServiceClient,
};
use tonic::{Code, Status, service::interceptor::InterceptedService, transport::Channel};

/// Adds one metadata entry to every call.
#[derive(Clone)]
struct AddHeader(&'static str, tonic::metadata::AsciiMetadataValue);

impl tonic::service::Interceptor for AddHeader {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        r.metadata_mut().insert(self.0, self.1.clone());
        Ok(r)
    }
}

type Authed = InterceptedService<Channel, AddHeader>;

/// A channel without a client certificate that sends `header: value` on every call.
async fn with_header(node: &Node, header: &'static str, value: String) -> Authed {
    let ch = try_channel(node.grpc, Some(&node.tls_dir().join("ca.crt")), None)
        .await
        .unwrap();
    InterceptedService::new(ch, AddHeader(header, value.parse().unwrap()))
}

async fn bearer(node: &Node, token: &str) -> Authed {
    with_header(node, "authorization", format!("Bearer {token}")).await
}

fn optional_node(dir: &Path, extra: &[&str]) -> Node {
    let mut b = NodeBuilder::new("all")
        .data_dir(dir)
        .arg("--tls-client-auth")
        .arg("optional");
    for a in extra {
        b = b.arg(*a);
    }
    b.start()
}

async fn put(ch: impl Into<Option<Authed>>, admin: &Channel, key: &str) -> Result<(), Status> {
    let msg = FileChunk {
        file_key: key.into(),
        data: Bytes::from_static(b"hello"),
        is_last: true,
        ..Default::default()
    };
    match ch.into() {
        Some(c) => FileServiceClient::new(c)
            .upload_file(tokio_stream::iter([msg]))
            .await
            .map(|_| ()),
        None => FileServiceClient::new(admin.clone())
            .upload_file(tokio_stream::iter([msg]))
            .await
            .map(|_| ()),
    }
}

async fn create_key(admin: &Channel, name: &str, scopes: &[&str], prefix: &str) -> (String, String) {
    let r = AuthServiceClient::new(admin.clone())
        .create_api_key(CreateApiKeyRequest {
            name: name.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            key_prefix: prefix.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let key = r.key.unwrap();
    assert!(r.secret.starts_with("pvk_"), "recognisable prefix");
    (key.id, r.secret)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_work_for_their_scope_and_revocation_survives_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let node = optional_node(&dir, &[]);
    let admin = node.channel().await;
    put(None, &admin, "docs/a").await.unwrap();
    put(None, &admin, "other/b").await.unwrap();

    let (reader_id, reader) = create_key(&admin, "reader", &["read"], "").await;
    let (_, writer) = create_key(&admin, "writer", &["write", "read"], "").await;
    let (_, scoped) = create_key(&admin, "scoped", &["read", "write"], "docs/").await;
    // Names are unique among live keys.
    let st = AuthServiceClient::new(admin.clone())
        .create_api_key(CreateApiKeyRequest {
            name: "reader".into(),
            scopes: vec!["read".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::AlreadyExists);
    let listed = AuthServiceClient::new(admin.clone())
        .list_api_keys(ListApiKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.keys.len(), 3);

    // Read key: reads through Bearer and x-api-key; refused for writes and admin calls.
    let r = bearer(&node, &reader).await;
    FileServiceClient::new(r.clone())
        .get_file(FileRequest {
            key: "docs/a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let x = with_header(&node, "x-api-key", reader.clone()).await;
    FileServiceClient::new(x)
        .get_file(FileRequest {
            key: "docs/a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let st = put(r.clone(), &admin, "docs/new").await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    assert!(!st.message().contains(&reader), "the secret must not be echoed");
    let st = AuthServiceClient::new(r.clone())
        .list_api_keys(ListApiKeysRequest::default())
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);
    put(bearer(&node, &writer).await, &admin, "docs/w").await.unwrap();

    // Prefix-limited key: sees and touches only its prefix, also in listings; no blob API.
    let s = bearer(&node, &scoped).await;
    let list = FileServiceClient::new(s.clone())
        .list_files(ListFilesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        list.files.iter().all(|f| f.key.starts_with("docs/")),
        "{:?}",
        list.files
    );
    assert_eq!(list.files.len(), 2);
    let st = FileServiceClient::new(s.clone())
        .get_file(FileRequest {
            key: "other/b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);
    let st = put(s.clone(), &admin, "other/c").await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);
    let st = BlobServiceClient::new(s.clone())
        .get_blob(GetBlobRequest {
            key: Bytes::from(vec![0u8; 32]),
            range: None,
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);
    put(s, &admin, "docs/by-scoped").await.unwrap();

    // Revocation applies on the next call...
    AuthServiceClient::new(admin.clone())
        .revoke_api_key(RevokeApiKeyRequest { id: reader_id.clone() })
        .await
        .unwrap();
    let st = FileServiceClient::new(r)
        .get_file(FileRequest {
            key: "docs/a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated);
    assert!(st.message().contains("revoked"), "{}", st.message());
    // ...and survives a restart, while live keys keep working.
    drop(node);
    let node = optional_node(&dir, &[]);
    let st = FileServiceClient::new(bearer(&node, &reader).await)
        .get_file(FileRequest {
            key: "docs/a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated);
    FileServiceClient::new(bearer(&node, &writer).await)
        .get_file(FileRequest {
            key: "docs/a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    node.wait_metric("peervault_auth_failures_total", &["revoked_key"], |v| v >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_get_their_status_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let secret_file = tmp.path().join("jwt.secret");
    std::fs::write(&secret_file, [9u8; 32]).unwrap();
    let node = optional_node(
        &tmp.path().join("data"),
        &["--jwt-hs256-secret-file", secret_file.to_str().unwrap()],
    );
    let admin = node.channel().await;
    put(None, &admin, "keep").await.unwrap();
    let files = || node.metric("peervault_blob_files", &[]);
    let before = files();

    let huge = "a".repeat(20_000);
    let cases: Vec<(&'static str, String)> = vec![
        ("authorization", "Basic dXNlcjpwYXNz".into()),
        ("authorization", "Bearer".into()),
        ("authorization", "Bearer    ".into()),
        ("authorization", "Bearer pvk_not_a_real_key".into()),
        ("authorization", "Bearer not.a.jwt".into()),
        // alg "none"
        (
            "authorization",
            "Bearer eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhZG1pbiJ9.".into(),
        ),
        ("x-api-key", "pvk_unknown".into()),
        ("authorization", format!("Bearer {huge}")),
    ];
    for (h, v) in cases {
        let ch = with_header(&node, h, v.clone()).await;
        let r = put(ch, &admin, "keep").await;
        let st = r.expect_err("bad credential accepted");
        if v.len() > 16_000 {
            // A header beyond HTTP/2's header-list limit may be refused by the transport itself.
            assert!(
                matches!(
                    st.code(),
                    Code::Unauthenticated | Code::Internal | Code::Unavailable | Code::Unknown
                ),
                "huge header -> {st:?}"
            );
        } else {
            assert_eq!(st.code(), Code::Unauthenticated, "{h}: {v} -> {st:?}");
        }
        if st.code() == Code::Unauthenticated {
            assert!(!st.message().contains("dXNlcjpwYXNz"));
        }
    }
    // Expired and not-yet-valid JWTs.
    let now = jsonwebtoken::get_current_timestamp();
    for claims in [
        serde_json::json!({"sub": "x", "exp": now - 3600}),
        serde_json::json!({"sub": "x", "exp": now + 3600, "nbf": now + 3000}),
    ] {
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&[9u8; 32]),
        )
        .unwrap();
        let st = put(bearer(&node, &t).await, &admin, "keep").await.unwrap_err();
        assert_eq!(st.code(), Code::Unauthenticated, "{claims}");
    }
    // A valid JWT whose subject has no scopes: authenticated, but not permitted.
    let t = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"sub": "nobody", "exp": now + 3600}),
        &EncodingKey::from_secret(&[9u8; 32]),
    )
    .unwrap();
    let st = put(bearer(&node, &t).await, &admin, "keep").await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);

    // The service survived every attempt and nothing stored changed.
    assert_eq!(files(), before);
    SystemServiceClient::new(admin.clone())
        .get_system_info(())
        .await
        .unwrap();
    node.wait_metric("peervault_auth_failures_total", &["malformed_credential"], |v| v >= 3.0);
    node.wait_metric("peervault_auth_failures_total", &["expired"], |v| v >= 1.0);
    // Health needs no credentials even with garbage ones.
    let ch = try_channel(node.grpc, Some(&node.tls_dir().join("ca.crt")), None)
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .unwrap();
}

/// An ES256 key as (PKCS#8 PEM for signing, JWK for the JWKS file).
fn es256_key(kid: &str) -> (String, serde_json::Value) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = kp.public_key_raw(); // 0x04 || X || Y
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk = serde_json::json!({
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
        "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
    });
    (kp.serialize_pem(), jwk)
}

fn es_token(pem: &str, kid: &str, sub: &str, aud: &str) -> String {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(kid.into());
    let claims = serde_json::json!({
        "sub": sub, "aud": aud, "iss": "https://kubernetes.default.svc",
        "exp": jsonwebtoken::get_current_timestamp() + 600,
    });
    jsonwebtoken::encode(&h, &claims, &EncodingKey::from_ec_pem(pem.as_bytes()).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_jwts_verify_against_a_jwks_file_that_can_be_swapped() {
    let tmp = tempfile::tempdir().unwrap();
    let jwks = tmp.path().join("jwks.json");
    let (pem1, jwk1) = es256_key("k1");
    std::fs::write(&jwks, serde_json::json!({"keys": [jwk1]}).to_string()).unwrap();
    let auth = tmp.path().join("auth.yaml");
    std::fs::write(
        &auth,
        "subjects:\n  system:serviceaccount:apps:uploader: [write, read]\n  system:serviceaccount:apps:viewer: [read]\n",
    )
    .unwrap();
    let node = optional_node(
        &tmp.path().join("data"),
        &[
            "--jwt-jwks-file",
            jwks.to_str().unwrap(),
            "--jwt-issuer",
            "https://kubernetes.default.svc",
            "--jwt-audience",
            "peervault",
            "--auth-config",
            auth.to_str().unwrap(),
        ],
    );
    let admin = node.channel().await;
    let uploader = es_token(&pem1, "k1", "system:serviceaccount:apps:uploader", "peervault");
    put(bearer(&node, &uploader).await, &admin, "from-pod").await.unwrap();
    let viewer = es_token(&pem1, "k1", "system:serviceaccount:apps:viewer", "peervault");
    assert_eq!(
        put(bearer(&node, &viewer).await, &admin, "x").await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // Wrong audience, another key, and an HS256 token (algorithm confusion) are refused.
    let wrong_aud = es_token(&pem1, "k1", "system:serviceaccount:apps:uploader", "someone-else");
    assert_eq!(
        put(bearer(&node, &wrong_aud).await, &admin, "x")
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let (pem2, jwk2) = es256_key("k2");
    let other = es_token(&pem2, "k2", "system:serviceaccount:apps:uploader", "peervault");
    assert_eq!(
        put(bearer(&node, &other).await, &admin, "x").await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"sub": "system:serviceaccount:apps:uploader", "exp": jsonwebtoken::get_current_timestamp() + 60}),
        &EncodingKey::from_secret(jwk1.to_string().as_bytes()),
    )
    .unwrap();
    let st = put(bearer(&node, &hs).await, &admin, "x").await.unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated);
    assert!(st.message().contains("algorithm"), "{}", st.message());

    // The cluster rotates its keys: the JWKS file is replaced on disk.
    std::fs::write(&jwks, serde_json::json!({"keys": [jwk2]}).to_string()).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match put(bearer(&node, &other).await, &admin, "after-rotation").await {
            Ok(()) => break,
            Err(e) => assert!(std::time::Instant::now() < deadline, "new key never accepted: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.wait_log(WAIT, |v| v["message"] == "JWKS reloaded");
    assert_eq!(
        put(bearer(&node, &uploader).await, &admin, "x")
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
}

/// The next text message of a WebSocket as JSON, or None when the server closed.
async fn ws_text(ws: &mut common::ws::Wss) -> Option<serde_json::Value> {
    use futures_util::StreamExt;
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("WebSocket went silent")
        {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                return Some(serde_json::from_str(&t).unwrap());
            }
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_gateway_accepts_the_same_api_keys() {
    use common::ws::{Cred, wss_connect};
    // Token auth is the default: no flag needed.
    let (node, http) = NodeBuilder::new("all").start_events_ws();
    let admin = node.channel().await;
    let (_, key) = create_key(&admin, "dashboard", &["read"], "").await;
    let mut ok = wss_connect(&http, &Cred::Query(key.clone()), None).await.unwrap();
    assert_eq!(ws_text(&mut ok).await.unwrap()["type"], "connected");
    let mut ok = wss_connect(&http, &Cred::Bearer(key), None).await.unwrap();
    assert_eq!(ws_text(&mut ok).await.unwrap()["type"], "connected");
    let mut bad = wss_connect(&http, &Cred::Query("pvk_wrong".into()), None)
        .await
        .unwrap();
    let mut codes = Vec::new();
    while let Some(m) = ws_text(&mut bad).await {
        codes.push(m["data"]["code"].clone());
    }
    assert!(codes.iter().any(|c| c == "AUTH_FAILED"), "{codes:?}");
    node.wait_metric("peervault_auth_failures_total", &["unknown_key"], |v| v >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_limited_key_sees_only_its_file_events() {
    use peervault_proto::v1::{SubscribeRequest, event::Payload, event_service_client::EventServiceClient};
    let tmp = tempfile::tempdir().unwrap();
    let node = optional_node(&tmp.path().join("data"), &[]);
    let admin = node.channel().await;
    let (_, scoped) = create_key(&admin, "scoped", &["read"], "team-a/").await;
    let mut events = EventServiceClient::new(bearer(&node, &scoped).await)
        .subscribe(SubscribeRequest {
            topics: vec!["file_operations".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Another team's upload first, then ours: the first event the key sees must be ours.
    put(None, &admin, "team-b/secret").await.unwrap();
    put(None, &admin, "team-a/report").await.unwrap();
    let e = tokio::time::timeout(WAIT, events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match e.payload {
        Some(Payload::FileOperation(f)) => assert_eq!(f.file_key, "team-a/report"),
        other => panic!("unexpected event {other:?}"),
    }
}
