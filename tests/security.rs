//! The findings of the security read (issue 12), each tried from outside as a user and an
//! attacker would, against real processes with real TLS and a real WebSocket client:
//! the WebSocket port secure by default, key-prefix confinement through the facade and the
//! WebSocket gateway, forged caller headers, JWT claims, revoked credentials ending open streams,
//! outgoing certificates that rotate, connection-level limits and the privilege rules.

mod common;

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{
    Node, NodeBuilder, WAIT, free_port, try_channel,
    ws::{Cred, wss_connect},
};
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use peervault_proto::v1::{
    CreateApiKeyRequest, Event, FileChunk, FileRequest, ListApiKeysRequest, PublishRequest, RevokeApiKeyRequest,
    SubscribeRequest, auth_service_client::AuthServiceClient, event_service_client::EventServiceClient,
    file_service_client::FileServiceClient, peer_vault_service_client::PeerVaultServiceClient,
};
use peervault_runtime::tls::CaIssuer;
use rcgen::SanType;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tonic::{Code, Status, service::interceptor::InterceptedService, transport::Channel};

/// Adds metadata entries to every call.
#[derive(Clone)]
struct AddHeaders(Vec<(&'static str, tonic::metadata::AsciiMetadataValue)>);

impl tonic::service::Interceptor for AddHeaders {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        for (k, v) in &self.0 {
            r.metadata_mut().insert(*k, v.clone());
        }
        Ok(r)
    }
}

type Authed = InterceptedService<Channel, AddHeaders>;

fn headers(ch: Channel, h: &[(&'static str, String)]) -> Authed {
    InterceptedService::new(
        ch,
        AddHeaders(h.iter().map(|(k, v)| (*k, v.parse().unwrap())).collect()),
    )
}

/// A channel without a client certificate sending `Bearer token`.
async fn bearer(node: &Node, token: &str) -> Authed {
    let ch = try_channel(node.grpc, Some(&node.tls_dir().join("ca.crt")), None)
        .await
        .unwrap();
    headers(ch, &[("authorization", format!("Bearer {token}"))])
}

async fn put(ch: Channel, key: &str) {
    FileServiceClient::new(ch)
        .upload_file(tokio_stream::iter([FileChunk {
            file_key: key.into(),
            data: Bytes::from_static(b"hello"),
            is_last: true,
            ..Default::default()
        }]))
        .await
        .unwrap();
}

async fn create_key(
    admin: impl Into<AnyChannel>,
    name: &str,
    scopes: &[&str],
    prefix: &str,
) -> Result<(String, String), Status> {
    let req = CreateApiKeyRequest {
        name: name.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        key_prefix: prefix.into(),
        ..Default::default()
    };
    let r = match admin.into() {
        AnyChannel::Plain(c) => AuthServiceClient::new(c).create_api_key(req).await?,
        AnyChannel::Authed(c) => AuthServiceClient::new(c).create_api_key(req).await?,
    }
    .into_inner();
    Ok((r.key.unwrap().id, r.secret))
}

enum AnyChannel {
    Plain(Channel),
    Authed(Authed),
}

impl From<Channel> for AnyChannel {
    fn from(c: Channel) -> Self {
        AnyChannel::Plain(c)
    }
}

impl From<Authed> for AnyChannel {
    fn from(c: Authed) -> Self {
        AnyChannel::Authed(c)
    }
}

/// `NodeBuilder::arg` for several arguments.
trait Args {
    fn args<S: AsRef<str>>(self, a: &[S]) -> Self;
}

impl Args for NodeBuilder {
    fn args<S: AsRef<str>>(mut self, a: &[S]) -> Self {
        for x in a {
            self = self.arg(x.as_ref());
        }
        self
    }
}

/// How a stream ended: `Ok` while it still delivers.
fn end_code<T>(r: Result<Option<T>, Status>) -> Code {
    match r {
        Err(st) => st.code(),
        Ok(Some(_)) => Code::Ok,
        Ok(None) => Code::Cancelled,
    }
}

/// A `serve all` admitting token-only clients.
fn optional_all() -> NodeBuilder {
    NodeBuilder::new("all")
        .arg("--tls-client-auth")
        .arg("optional")
        .arg("--metrics-interval")
        .arg("0s")
}

/// The next JSON text message of a WebSocket, or `{"closed": code}`.
async fn ws_next(ws: &mut common::ws::Wss) -> Value {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("WebSocket silent") {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
            Some(Ok(Message::Close(f))) => return json!({"closed": f.map(|f| u16::from(f.code))}),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return json!({"closed": null, "error": e.to_string()}),
            None => return json!({"closed": null}),
        }
    }
}

/// The next file event key a WebSocket receives (control messages skipped).
async fn ws_next_file_key(ws: &mut common::ws::Wss) -> String {
    loop {
        let m = ws_next(ws).await;
        if m["topic"] == "file_operations" {
            return m["data"]["key"].as_str().unwrap_or_default().to_string();
        }
        assert!(m.get("closed").is_none(), "closed: {m}");
    }
}

async fn ws_subscribe(ws: &mut common::ws::Wss, topic: &str) -> Value {
    ws.send(Message::text(json!({"type": "subscribe", "topic": topic}).to_string()))
        .await
        .unwrap();
    ws_next(ws).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_port_is_tls_and_needs_credentials_by_default() {
    let (node, http) = NodeBuilder::new("all")
        .arg("--ws-read-timeout")
        .arg("2s")
        .arg("--metrics-interval")
        .arg("0s")
        .start_events_ws();
    // Plain ws:// no longer reaches the gateway: the port speaks TLS only.
    let plain = tokio_tungstenite::connect_async(format!("ws://{}/ws", http.addr)).await;
    assert!(plain.is_err(), "a plaintext WebSocket was accepted");
    // TLS without any credential: told to authenticate, nothing delivered, closed after the
    // read timeout.
    let mut anon = wss_connect(&http, &Cred::None, None).await.unwrap();
    let hello = ws_next(&mut anon).await;
    assert_eq!(
        (hello["type"].as_str(), hello["data"]["authRequired"].as_bool()),
        (Some("connected"), Some(true)),
        "{hello}"
    );
    let e = ws_subscribe(&mut anon, "file_operations").await;
    assert_eq!(e["data"]["code"], "AUTH_FAILED", "{e}");
    put(node.channel().await, "secret/report").await;
    let mut seen = Vec::new();
    loop {
        let m = ws_next(&mut anon).await;
        if m.get("closed").is_some() {
            assert_eq!(m["closed"], 1008, "{m}");
            break;
        }
        seen.push(m);
    }
    assert!(
        seen.iter().all(|m| m["type"] == "error"),
        "an anonymous client received {seen:?}"
    );
    // Bad credentials are refused at the upgrade.
    let mut bad = wss_connect(&http, &Cred::Query("pvk_nope".into()), None).await.unwrap();
    assert_eq!(ws_next(&mut bad).await["data"]["code"], "AUTH_FAILED");
    // A client certificate is a credential.
    let mut ok = wss_connect(&http, &Cred::DevCert, None).await.unwrap();
    assert_eq!(ws_next(&mut ok).await["data"]["authRequired"], false);
    assert_eq!(ws_subscribe(&mut ok, "file_operations").await["type"], "subscribed");
    put(node.channel().await, "secret/again").await;
    assert_eq!(ws_next_file_key(&mut ok).await, "secret/again");
    // Foreign origins are refused by default, with or without credentials.
    match wss_connect(&http, &Cred::DevCert, Some("https://evil.example")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("a foreign origin was admitted: {:?}", other.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_websockets_are_an_explicit_exception_never_with_every_origin() {
    // `*` with anonymous access does not start.
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::peervault_bin())
        .args(["serve", "events", "--data-dir"])
        .arg(tmp.path())
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(["--ws-allow-anonymous", "--ws-cors-origins", "*"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ws-allow-anonymous"), "{err}");
    // Asked for explicitly, anonymous clients are admitted (still over TLS).
    let (_node, http) = NodeBuilder::new("events").arg("--ws-allow-anonymous").start_events_ws();
    let mut anon = wss_connect(&http, &Cred::None, None).await.unwrap();
    assert_eq!(ws_next(&mut anon).await["data"]["authRequired"], false);
    assert_eq!(ws_subscribe(&mut anon, "system").await["type"], "subscribed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_limited_key_sees_only_its_events_through_the_facade_and_the_websocket() {
    let (node, http) = optional_all().start_events_ws();
    let admin = node.channel().await;
    let (_, key) = create_key(admin.clone(), "team-a", &["read"], "team-a/").await.unwrap();
    // Through PeerVaultService (blob forwards to events) ...
    let mut facade = PeerVaultServiceClient::new(bearer(&node, &key).await)
        .stream_file_operations(())
        .await
        .unwrap()
        .into_inner();
    // Another team's upload first, then ours: the first event the facade relays must be ours.
    put(admin.clone(), "team-b/secret").await;
    put(admin.clone(), "team-a/report").await;
    let e = tokio::time::timeout(WAIT, facade.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(e.file_key, "team-a/report", "the facade leaked another prefix's event");
    // ... and over the WebSocket gateway, with the key as token.
    let mut ws = wss_connect(&http, &Cred::Query(key.clone()), None).await.unwrap();
    ws_next(&mut ws).await;
    assert_eq!(ws_subscribe(&mut ws, "file_operations").await["type"], "subscribed");
    put(admin.clone(), "team-b/secret2").await;
    put(admin.clone(), "team-a/report2").await;
    assert_eq!(ws_next_file_key(&mut ws).await, "team-a/report2");
    // The same key is refused the content-addressed blob API by the auth layer.
    let st = peervault_proto::v1::blob_service_client::BlobServiceClient::new(bearer(&node, &key).await)
        .list_blobs(peervault_proto::v1::ListBlobsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    node.wait_metric("peervault_auth_failures_total", &["outside_prefix"], |v| v >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_caller_header_is_refused_and_only_services_may_forward() {
    let node = optional_all().start();
    let admin = node.channel().await;
    put(admin.clone(), "a/x").await;
    put(admin.clone(), "b/y").await;
    // A client claiming, in the forwarding header, to be a service with every scope.
    let forged = peervault_runtime::auth::forward::encode(&peervault_runtime::Caller {
        identity: peervault_runtime::Identity::Service {
            service: "blob".into(),
            id: "spiffe://peervault.local/peervault/blob".into(),
        },
        remote_addr: None,
        scopes: peervault_runtime::auth::ScopeSet::ALL,
        key_prefix: None,
        valid_until: None,
    })
    .unwrap()
    .to_str()
    .unwrap()
    .to_string();
    let h = || vec![("x-peervault-caller", forged.clone())];
    let st = AuthServiceClient::new(headers(node.channel().await, &h()))
        .list_api_keys(ListApiKeysRequest::default())
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    assert!(st.message().contains("x-peervault-caller"), "{}", st.message());
    let anon = try_channel(node.grpc, Some(&node.tls_dir().join("ca.crt")), None)
        .await
        .unwrap();
    let st = FileServiceClient::new(headers(anon, &h()))
        .get_file(FileRequest {
            key: "a/x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    // Even a valid key cannot lift itself with the header.
    let (_, key) = create_key(admin.clone(), "ro", &["read"], "a/").await.unwrap();
    let ch = try_channel(node.grpc, Some(&node.tls_dir().join("ca.crt")), None)
        .await
        .unwrap();
    let mut with_both = h();
    with_both.push(("authorization", format!("Bearer {key}")));
    let st = FileServiceClient::new(headers(ch, &with_both))
        .get_file(FileRequest {
            key: "b/y".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    node.wait_metric("peervault_auth_failures_total", &["forged_caller_header"], |v| v >= 3.0);
    // From a service identity the header is the caller: its prefix applies.
    let limited = peervault_runtime::auth::forward::encode(&peervault_runtime::Caller {
        identity: peervault_runtime::Identity::ApiKey {
            id: "k".into(),
            name: "limited".into(),
        },
        remote_addr: None,
        scopes: peervault_runtime::auth::ScopeSet::parse(&["read"]).unwrap(),
        key_prefix: Some("a/".into()),
        valid_until: None,
    })
    .unwrap()
    .to_str()
    .unwrap()
    .to_string();
    let svc = headers(node.service_channel().await, &[("x-peervault-caller", limited)]);
    FileServiceClient::new(svc.clone())
        .get_file(FileRequest {
            key: "a/x".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let st = FileServiceClient::new(svc)
        .get_file(FileRequest {
            key: "b/y".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
}

fn hs_token(secret: &[u8], claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_without_the_configured_audience_or_issuer_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = [5u8; 32];
    let sf = tmp.path().join("s");
    std::fs::write(&sf, secret).unwrap();
    let auth = tmp.path().join("auth.yaml");
    std::fs::write(&auth, "subjects:\n  alice: [read]\n").unwrap();
    let node = optional_all()
        .data_dir(&tmp.path().join("data"))
        .args(&[
            "--jwt-hs256-secret-file",
            sf.to_str().unwrap(),
            "--jwt-issuer",
            "https://issuer",
            "--jwt-audience",
            "peervault",
            "--auth-config",
            auth.to_str().unwrap(),
        ])
        .start();
    let base = json!({"sub": "alice", "exp": now() + 600, "iss": "https://issuer", "aud": "peervault"});
    let call = |t: String| {
        let node = &node;
        async move {
            let ch = bearer(node, &t).await;
            peervault_proto::v1::system_service_client::SystemServiceClient::new(ch)
                .get_system_info(())
                .await
        }
    };
    call(hs_token(&secret, base.clone())).await.unwrap();
    for claim in ["aud", "iss"] {
        let mut c = base.clone();
        c.as_object_mut().unwrap().remove(claim);
        let st = call(hs_token(&secret, c)).await.unwrap_err();
        assert_eq!(st.code(), Code::Unauthenticated, "without {claim}: {st:?}");
        assert!(st.message().contains(claim), "{}", st.message());
    }
    node.wait_metric("peervault_auth_failures_total", &["missing_claim"], |v| v >= 2.0);
}

#[test]
fn a_jwks_without_an_audience_does_not_start_unless_any_audience_is_asked_for() {
    let tmp = tempfile::tempdir().unwrap();
    let jwks = tmp.path().join("jwks.json");
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = kp.public_key_raw();
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk =
        json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": "k", "x": b64(&raw[1..33]), "y": b64(&raw[33..65])});
    // One key of a type nobody knows beside a good one: the good one loads.
    let unknown = json!({"kty": "PQC", "kid": "future"});
    std::fs::write(&jwks, json!({"keys": [unknown, jwk]}).to_string()).unwrap();
    let out = std::process::Command::new(common::peervault_bin())
        .args(["serve", "events", "--data-dir"])
        .arg(tmp.path().join("d"))
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--jwt-jwks-file")
        .arg(&jwks)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--jwt-audience") && err.contains("--jwt-allow-any-audience"),
        "{err}"
    );
    let (node, logs) = NodeBuilder::new("events")
        .data_dir(&tmp.path().join("d2"))
        .arg("--jwt-jwks-file")
        .arg(jwks.to_str().unwrap())
        .arg("--jwt-allow-any-audience")
        .start_listening("127.0.0.1:0", "127.0.0.1:0");
    let skipped: Vec<_> = logs
        .iter()
        .filter(|v| v["message"].as_str().is_some_and(|m| m.starts_with("JWKS key skipped")))
        .collect();
    assert_eq!(skipped.len(), 1, "{logs:?}");
    assert_eq!(skipped[0]["kty"], "PQC", "{:?}", skipped[0]);
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_ends_the_streams_it_opened() {
    let (node, http) = optional_all().start_events_ws();
    let admin = node.channel().await;
    let (id, key) = create_key(admin.clone(), "watcher", &["read"], "").await.unwrap();
    let mut direct = EventServiceClient::new(bearer(&node, &key).await)
        .subscribe(SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut facade = PeerVaultServiceClient::new(bearer(&node, &key).await)
        .stream_file_operations(())
        .await
        .unwrap()
        .into_inner();
    let mut ws = wss_connect(&http, &Cred::Bearer(key.clone()), None).await.unwrap();
    ws_next(&mut ws).await;
    assert_eq!(ws_subscribe(&mut ws, "file_operations").await["type"], "subscribed");
    // The streams work ...
    put(admin.clone(), "before").await;
    assert_eq!(ws_next_file_key(&mut ws).await, "before");
    let e = tokio::time::timeout(WAIT, facade.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(e.file_key, "before");
    // ... until the key is revoked.
    AuthServiceClient::new(admin.clone())
        .revoke_api_key(RevokeApiKeyRequest { id })
        .await
        .unwrap();
    let revoked = Instant::now();
    let mut code = Code::Ok;
    while code == Code::Ok {
        code = end_code(tokio::time::timeout(WAIT, direct.message()).await.unwrap());
    }
    assert_eq!(code, Code::Unauthenticated);
    let mut code = Code::Ok;
    while code == Code::Ok {
        code = end_code(tokio::time::timeout(WAIT, facade.message()).await.unwrap());
    }
    assert_eq!(code, Code::Unauthenticated);
    loop {
        let m = ws_next(&mut ws).await;
        if m.get("closed").is_some() {
            assert_eq!(m["closed"], 1008, "{m}");
            break;
        }
    }
    assert!(revoked.elapsed() < Duration::from_secs(5), "{:?}", revoked.elapsed());
    node.wait_metric("peervault_auth_streams_ended_total", &["revoked_key"], |v| v >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_jwt_ends_its_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = [7u8; 32];
    let sf = tmp.path().join("s");
    std::fs::write(&sf, secret).unwrap();
    let auth = tmp.path().join("auth.yaml");
    std::fs::write(&auth, "subjects:\n  dash: [read]\n").unwrap();
    let (node, http) = optional_all()
        .data_dir(&tmp.path().join("data"))
        .args(&[
            "--jwt-hs256-secret-file",
            sf.to_str().unwrap(),
            "--auth-config",
            auth.to_str().unwrap(),
        ])
        .start_events_ws();
    let token = hs_token(&secret, json!({"sub": "dash", "exp": now() + 3}));
    let mut grpc = EventServiceClient::new(bearer(&node, &token).await)
        .subscribe(SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut ws = wss_connect(&http, &Cred::Query(token), None).await.unwrap();
    assert_eq!(ws_next(&mut ws).await["type"], "connected");
    let started = Instant::now();
    let end = loop {
        match tokio::time::timeout(WAIT, grpc.message()).await.unwrap() {
            Ok(Some(_)) => continue,
            Ok(None) => break Code::Ok,
            Err(st) => break st.code(),
        }
    };
    assert_eq!(end, Code::Unauthenticated);
    loop {
        let m = ws_next(&mut ws).await;
        if m.get("closed").is_some() {
            assert_eq!(m["closed"], 1008, "{m}");
            break;
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(8),
        "{took:?}"
    );
}

/// A CA of the test's own, with leaves for servers and clients, written as PEM files.
struct Pki {
    ca: CaIssuer,
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let ca = CaIssuer::generate(name).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
        Pki {
            ca,
            dir: dir.to_path_buf(),
        }
    }

    /// Writes `<name>.crt` / `<name>.key` with the URI SANs given, plus localhost and
    /// 127.0.0.1; returns the paths.
    fn leaf(&self, name: &str, uris: &[&str]) -> (PathBuf, PathBuf) {
        let mut sans = vec![
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::IpAddress([127, 0, 0, 1].into()),
        ];
        for u in uris {
            sans.push(SanType::URI((*u).try_into().unwrap()));
        }
        let (c, k) = self.ca.leaf(name, sans).unwrap();
        let (cp, kp) = (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&cp, c).unwrap();
        std::fs::write(&kp, k).unwrap();
        (cp, kp)
    }

    /// Writes the leaf into fixed paths (rotation in place).
    fn leaf_into(&self, name: &str, uris: &[&str], cert: &Path, key: &Path, ca: &Path) {
        let (c, k) = self.leaf(name, uris);
        // Key first, then certificate, then CA: a reader between two writes sees a mismatch
        // and keeps the previous set.
        std::fs::copy(k, key).unwrap();
        std::fs::copy(c, cert).unwrap();
        std::fs::copy(self.dir.join("ca.crt"), ca).unwrap();
    }
}

const BLOB: &str = "spiffe://peervault.local/peervault/blob";
const PEER: &str = "spiffe://peervault.local/peervault/peer";

fn tls_args(cert: &Path, key: &Path, ca: &Path) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
        "--tls-client-ca".into(),
        ca.display().to_string(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_membership_watcher_presents_a_rotated_client_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let old = Pki::new(&tmp.path().join("pki-old"), "old CA");
    let new = Pki::new(&tmp.path().join("pki-new"), "new CA");
    // Files in place, as cert-manager mounts them.
    let pdir = tmp.path().join("peer-tls");
    let bdir = tmp.path().join("blob-tls");
    std::fs::create_dir_all(&pdir).unwrap();
    std::fs::create_dir_all(&bdir).unwrap();
    let (pc, pk, pca) = (pdir.join("tls.crt"), pdir.join("tls.key"), pdir.join("ca.crt"));
    let (bc, bk, bca) = (bdir.join("tls.crt"), bdir.join("tls.key"), bdir.join("ca.crt"));
    old.leaf_into("peer", &[PEER], &pc, &pk, &pca);
    old.leaf_into("blob", &[BLOB], &bc, &bk, &bca);
    let peer_port = free_port();
    let peer_addr = format!("127.0.0.1:{peer_port}");
    let start_peer = |tag: &str| {
        NodeBuilder::new("peer")
            .data_dir(&tmp.path().join(format!("peer-data-{tag}")))
            .args(&tls_args(&pc, &pk, &pca))
            .args(&["--metrics-interval", "0s", "--peers", "127.0.0.1:1"])
            .start_listening(&peer_addr, "127.0.0.1:0")
            .0
    };
    let peer = start_peer("1");
    let blob = NodeBuilder::new("blob")
        .data_dir(&tmp.path().join("blob-data"))
        .args(&tls_args(&bc, &bk, &bca))
        .args(&[
            "--peer-endpoint",
            &peer_addr,
            "--tls-reload-interval",
            "200ms",
            "--metrics-interval",
            "0s",
        ])
        .start();
    blob.wait_metric("peervault_membership_connected", &[], |v| v == 1.0);

    // Rotation to a new CA: blob's files are replaced and picked up by its watcher...
    new.leaf_into("blob", &[BLOB], &bc, &bk, &bca);
    blob.wait_metric("peervault_tls_reloads_total", &["result=\"ok\""], |v| v >= 1.0);
    // ... and the peer service comes back trusting only the new CA (the old certificates are
    // no longer valid anywhere).
    drop(peer);
    new.leaf_into("peer", &[PEER], &pc, &pk, &pca);
    blob.wait_metric("peervault_membership_connected", &[], |v| v == 0.0);
    let peer = start_peer("2");
    // The watcher reconnects with the new certificate, which the new peer accepts.
    blob.wait_metric("peervault_membership_connected", &[], |v| v == 1.0);
    assert_eq!(
        peer.metric(
            "peervault_tls_handshake_failures_total",
            &["untrusted_client_certificate"]
        )
        .unwrap_or(0.0),
        0.0,
        "the watcher presented a certificate of the old CA"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_three_services_are_service_identities_and_the_dev_certificate_loses_admin_with_a_mapping() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"), "test CA");
    let (sc, sk) = pki.leaf("server", &[BLOB, PEER, "spiffe://peervault.local/peervault/events"]);
    let (ec, ek) = pki.leaf("evil", &["spiffe://peervault.local/peervault/admin"]);
    let (dc, dk) = pki.leaf("dev", &["spiffe://peervault.local/client/dev"]);
    let (oc, ok) = pki.leaf("ops", &["spiffe://peervault.local/client/ops"]);
    // A certificate that maps to nothing: the token it carries decides.
    let (nc, nk) = pki.leaf("nobody", &["spiffe://peervault.local/client/nobody"]);
    let auth = tmp.path().join("auth.yaml");
    std::fs::write(&auth, "certificates:\n  spiffe://peervault.local/client/ops: [admin]\n").unwrap();
    let ca = pki.dir.join("ca.crt");
    let node = NodeBuilder::new("all")
        .data_dir(&tmp.path().join("data"))
        .args(&tls_args(&sc, &sk, &ca))
        .args(&["--auth-config", auth.to_str().unwrap(), "--metrics-interval", "0s"])
        .start();
    let connect = |c: PathBuf, k: PathBuf| {
        let ca = ca.clone();
        async move { common::channel_with(node.grpc, Some(&ca), Some((&c, &k))).await }
    };
    // `…/peervault/admin` is a client, not a service: internal RPCs refuse it.
    let st = EventServiceClient::new(connect(ec.clone(), ek.clone()).await)
        .publish(PublishRequest {
            events: vec![Event {
                id: "x".into(),
                topic: "alerts".into(),
                r#type: "security_alert".into(),
                data_json: "{}".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    // The development client SAN holds nothing once a mapping is given; the mapped one does.
    let st = AuthServiceClient::new(connect(dc, dk).await)
        .list_api_keys(ListApiKeysRequest::default())
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    let ops = connect(oc, ok).await;
    AuthServiceClient::new(ops.clone())
        .list_api_keys(ListApiKeysRequest::default())
        .await
        .unwrap();

    // A prefix-limited admin cannot mint a key broader than itself.
    let (_, limited_admin) = create_key(ops.clone(), "team-admin", &["admin"], "team/")
        .await
        .unwrap();
    let la = || async { with_token(&node, &ca, (&nc, &nk), &limited_admin).await };
    for (scopes, prefix) in [(&["read"][..], ""), (&["read"][..], "other/"), (&["admin"][..], "")] {
        let st = create_key(la().await, "broader", scopes, prefix).await.unwrap_err();
        assert_eq!(st.code(), Code::PermissionDenied, "{scopes:?} {prefix:?}: {st:?}");
    }
    create_key(la().await, "narrower", &["read"], "team/sub/")
        .await
        .unwrap();
    // A key limited to read (no admin) cannot create keys at all.
    let (_, reader) = create_key(ops, "reader", &["read"], "").await.unwrap();
    let st = create_key(with_token(&node, &ca, (&nc, &nk), &reader).await, "x", &["read"], "")
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);
}

/// A channel with the client certificate `id` (mapped to no scope) sending `Bearer token`.
async fn with_token(node: &Node, ca: &Path, id: (&Path, &Path), token: &str) -> Authed {
    let ch = common::channel_with(node.grpc, Some(ca), Some(id)).await;
    headers(ch, &[("authorization", format!("Bearer {token}"))])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_on_the_admin_and_grpc_ports() {
    let node = NodeBuilder::new("events")
        .args(&[
            "--admin-read-timeout",
            "1s",
            "--tls-handshake-timeout",
            "1s",
            "--max-connections",
            "3",
            "--metrics-interval",
            "0s",
        ])
        .start();
    // Slowloris on the admin port: a header trickled byte by byte is cut off by the timeout.
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect(node.admin).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").unwrap();
    let closed = loop {
        if started.elapsed() > Duration::from_secs(10) {
            break false;
        }
        if s.write_all(b"X").is_err() {
            break true;
        }
        let mut b = [0u8; 256];
        match s.read(&mut b) {
            Ok(0) => break true,
            Ok(_) => break true, // a 408 answer, then the close
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break true,
        }
    };
    assert!(closed, "a slow client held the admin connection for 10 s");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    // A connection that sends nothing at all is closed too, and the port still answers.
    let mut idle = std::net::TcpStream::connect(node.admin).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    let mut b = [0u8; 16];
    let r = idle.read(&mut b);
    assert!(
        !matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "an idle admin connection stayed open: {r:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert_eq!(node.admin_get("/healthz").0, 200);

    // gRPC: a stalled TLS handshake loses its slot; beyond --max-connections, connections are
    // closed at once while the admitted ones keep working.
    let mut stalled = std::net::TcpStream::connect(node.grpc).unwrap();
    stalled.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    assert!(matches!(stalled.read(&mut b), Ok(0) | Err(_)));
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    let mut held = Vec::new();
    for _ in 0..3 {
        let ch = node.channel().await;
        peervault_proto::v1::system_service_client::SystemServiceClient::new(ch.clone())
            .get_system_info(())
            .await
            .unwrap();
        held.push(ch);
    }
    let d = node.tls_dir();
    let over = try_channel(
        node.grpc,
        Some(&d.join("ca.crt")),
        Some((&d.join("client.crt"), &d.join("client.key"))),
    )
    .await;
    assert!(over.is_err(), "a connection beyond --max-connections was served");
    node.wait_metric("peervault_connections_refused_total", &["max_connections"], |v| {
        v >= 1.0
    });
    peervault_proto::v1::system_service_client::SystemServiceClient::new(held[0].clone())
        .get_system_info(())
        .await
        .unwrap();
    node.wait_metric("peervault_connections_refused_total", &["port=\"admin\""], |v| v >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_types_list_is_refused_while_publishing_continues() {
    let node = NodeBuilder::new("events").arg("--metrics-interval").arg("0s").start();
    let mut fine = EventServiceClient::new(node.channel().await)
        .subscribe(SubscribeRequest {
            topics: vec!["file_operations".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let huge = SubscribeRequest {
        types: vec!["file_uploaded".to_string(); 200_000],
        since_sequence: Some(0),
        ..Default::default()
    };
    let publisher = EventServiceClient::new(node.service_channel().await);
    let attack = {
        let ch = node.channel().await;
        tokio::spawn(async move {
            let mut c = EventServiceClient::new(ch);
            let mut codes = Vec::new();
            for _ in 0..5 {
                codes.push(c.subscribe(huge.clone()).await.map(|_| ()).unwrap_err().code());
            }
            codes
        })
    };
    let t = Instant::now();
    for i in 0..50 {
        publisher
            .clone()
            .publish(PublishRequest {
                events: vec![Event {
                    id: format!("e{i}"),
                    topic: "file_operations".into(),
                    r#type: "file_uploaded".into(),
                    source: "blob/t".into(),
                    data_json: json!({"key": format!("k{i}")}).to_string(),
                    ..Default::default()
                }],
            })
            .await
            .unwrap();
    }
    for i in 0..50 {
        let e = tokio::time::timeout(WAIT, fine.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(e.id, format!("e{i}"));
    }
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let codes = attack.await.unwrap();
    assert!(codes.iter().all(|c| *c == Code::InvalidArgument), "{codes:?}");
    let st = EventServiceClient::new(node.channel().await)
        .subscribe(SubscribeRequest {
            topics: vec!["alerts".into(); 17],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(st.message().contains("topics"), "{}", st.message());
    node.wait_metric("peervault_events_rejected_total", &["filter_too_long"], |v| v >= 6.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_events_verifies_api_keys_through_blob_and_honours_their_revocation() {
    let tmp = tempfile::tempdir().unwrap();
    let blob = NodeBuilder::new("blob")
        .data_dir(&tmp.path().join("blob"))
        .args(&["--tls-client-auth", "optional", "--metrics-interval", "0s"])
        .start();
    // The events pod shares the blob pod's certificates, as pods of one cluster do.
    let tls = tmp.path().join("events").join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    for f in ["ca.crt", "server.crt", "server.key", "client.crt", "client.key"] {
        std::fs::copy(blob.tls_dir().join(f), tls.join(f)).unwrap();
    }
    let blob_ep = blob.grpc.to_string();
    let (events, http) = NodeBuilder::new("events")
        .data_dir(&tmp.path().join("events"))
        .args(&[
            "--tls-client-auth",
            "optional",
            "--auth-endpoint",
            &blob_ep,
            "--auth-cache-ttl",
            "1s",
            "--metrics-interval",
            "0s",
        ])
        .start_events_ws();
    let admin = blob.channel().await;
    let (id, key) = create_key(admin.clone(), "dashboard", &["read"], "").await.unwrap();
    // The key works on the events pod, over gRPC and WebSocket; a wrong one does not.
    let mut sub = EventServiceClient::new(bearer(&events, &key).await)
        .subscribe(SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut ws = wss_connect(&http, &Cred::Query(key.clone()), None).await.unwrap();
    assert_eq!(ws_next(&mut ws).await["data"]["authRequired"], false);
    let st = EventServiceClient::new(bearer(&events, "pvk_wrong").await)
        .subscribe(SubscribeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    EventServiceClient::new(events.service_channel().await)
        .publish(PublishRequest {
            events: vec![Event {
                id: "hello".into(),
                topic: "alerts".into(),
                r#type: "security_alert".into(),
                source: "test".into(),
                data_json: "{}".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    let e = tokio::time::timeout(WAIT, sub.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(e.id, "hello");
    // Revoked on blob: the events pod's open streams end and new calls are refused within the
    // cache TTL (1 s here) and the re-check interval.
    AuthServiceClient::new(admin)
        .revoke_api_key(RevokeApiKeyRequest { id })
        .await
        .unwrap();
    let revoked = Instant::now();
    let mut code = Code::Ok;
    while code == Code::Ok {
        code = end_code(tokio::time::timeout(WAIT, sub.message()).await.unwrap());
    }
    assert_eq!(code, Code::Unauthenticated);
    loop {
        let m = ws_next(&mut ws).await;
        if m.get("closed").is_some() {
            assert_eq!(m["closed"], 1008, "{m}");
            break;
        }
    }
    assert!(revoked.elapsed() < Duration::from_secs(6), "{:?}", revoked.elapsed());
    let st = EventServiceClient::new(bearer(&events, &key).await)
        .subscribe(SubscribeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    assert!(st.message().contains("revoked"), "{}", st.message());
    // VerifyApiKey is internal: a client certificate may not call it.
    let st = AuthServiceClient::new(blob.channel().await)
        .verify_api_key(peervault_proto::v1::VerifyApiKeyRequest {
            secret: key,
            id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
}
