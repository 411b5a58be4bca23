//! The PeerVault client library: what in-cluster programs embed and what the `pvault` CLI is
//! built on. It links no server code, only the generated protocol (`peervault-proto`).
//!
//! - **Connection**: mutual TLS from certificate files ([`TlsConfig::from_dir`] reads the
//!   `ca.crt`, `client.crt`, `client.key` that `peervault serve all` creates in `./data/tls`),
//!   and/or a bearer token (`authorization: Bearer …` on every call). One HTTP/2 channel,
//!   connected lazily and reconnected by itself, is shared by every call.
//! - **Deadlines** on every unary call ([`ClientConfig::timeout`]) and an idle limit on every
//!   stream ([`ClientConfig::stream_idle_timeout`]).
//! - **Retries** with exponential backoff and jitter for UNAVAILABLE, DEADLINE_EXCEEDED and
//!   RESOURCE_EXHAUSTED only ([`is_retryable`], [`RetryPolicy`]); never for INVALID_ARGUMENT or
//!   a TLS handshake failure.
//! - **Streaming** upload from any `AsyncRead` and download into any `AsyncWrite` with bounded
//!   memory ([`Client::put_file`], [`Client::get_file`]); **resumable** uploads with the
//!   Graviton upload id and acknowledged bytes ([`Client::upload_blob`]); downloads that resume
//!   from the byte they reached after a retryable failure.
//! - Optional gzip/zstd **compression** ([`Compression`]) and W3C **trace context** injection
//!   ([`ClientConfig::traceparent`]).
//!
//! ```no_run
//! # async fn run() -> Result<(), peervault_client::Error> {
//! use peervault_client::{Client, ClientConfig, PutOptions, TlsConfig};
//!
//! let config = ClientConfig::new("localhost:8082").tls(TlsConfig::from_dir("data/tls"));
//! let client = Client::connect(config)?;
//! let file = client
//!     .put_file("docs/hello.txt", &b"hello"[..], PutOptions::default())
//!     .await?;
//! println!("stored {} bytes, hash {}", file.size, file.hash);
//! let mut out = Vec::new();
//! client.get_file("docs/hello.txt", &mut out, None).await?;
//! assert_eq!(out, b"hello");
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod events;
mod retry;
mod transfer;

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

pub use error::{Error, ErrorKind, is_retryable};
pub use events::{EventFilter, EventWatch};
pub use peervault_proto::v1 as proto;
pub use retry::{RetryObserver, RetryPolicy};
pub use tonic;
pub use transfer::{BlobUpload, Download, Progress, PutOptions, UploadIdCallback, UploadOptions};

use peervault_proto::v1::{
    AddPeerRequest, DeleteFileResponse, FileRequest, FileResponse, HealthResponse, ListFilesRequest, ListFilesResponse,
    ListPeersResponse, MetricsResponse, PeerHealthResponse, PeerRequest, PeerResponse, SystemInfoResponse,
    UpdateFileMetadataRequest, blob_service_client::BlobServiceClient, event_service_client::EventServiceClient,
    file_service_client::FileServiceClient, peer_service_client::PeerServiceClient,
    system_service_client::SystemServiceClient, upload_service_client::UploadServiceClient,
};
use tonic::{
    Request, Status,
    codec::CompressionEncoding,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

/// Largest gRPC message the client accepts (the server's default limit).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Where the TLS material comes from. Every path is optional: a missing CA means the
/// connection cannot be verified (an error at connect), a missing certificate/key pair means no
/// client certificate is presented (then a token is needed).
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    /// PEM CA bundle that signed the server's certificate.
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain.
    pub cert: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub key: Option<PathBuf>,
    /// Name to verify the server certificate against; default: the host of the address.
    pub server_name: Option<String>,
}

impl TlsConfig {
    /// The `ca.crt`, `client.crt` and `client.key` of a folder such as the `data/tls` that
    /// `peervault serve all` creates.
    pub fn from_dir(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        TlsConfig {
            ca: Some(dir.join("ca.crt")),
            cert: Some(dir.join("client.crt")),
            key: Some(dir.join("client.key")),
            server_name: None,
        }
    }
}

/// Compression of the messages the client sends (and accepts back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// No compression (the default: blob content is often already compressed).
    #[default]
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

/// Produces the W3C `traceparent` value to send with a call, for example from the current
/// tracing span's OpenTelemetry context; `None` sends none.
pub type TraceparentProvider = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// How to reach and talk to a PeerVault server.
#[derive(Clone)]
pub struct ClientConfig {
    /// `host:port` of the server (a `https://` or `http://` prefix is accepted).
    pub server: String,
    /// TLS material; `None` with [`ClientConfig::insecure`] unset still uses TLS with no CA,
    /// which fails, so set one of them.
    pub tls: Option<TlsConfig>,
    /// Plaintext HTTP/2 (only for a server started with `--insecure`).
    pub insecure: bool,
    /// Bearer token sent as `authorization: Bearer <token>` (an API key `pvk_…` or a JWT).
    pub token: Option<String>,
    /// Deadline of each unary call.
    pub timeout: Duration,
    /// Longest wait for the next message of a stream (upload acknowledgement, download chunk).
    pub stream_idle_timeout: Duration,
    /// Limit on establishing a connection.
    pub connect_timeout: Duration,
    /// Retry policy for retryable failures.
    pub retry: RetryPolicy,
    /// Compression of requests and accepted compression of responses.
    pub compression: Compression,
    /// Source of the W3C trace context sent with each call.
    pub traceparent: Option<TraceparentProvider>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("server", &self.server)
            .field("tls", &self.tls)
            .field("insecure", &self.insecure)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .field("compression", &self.compression)
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    /// A configuration for `server` (`host:port`) with defaults: 30 s deadlines, the default
    /// [`RetryPolicy`], no compression, no TLS material yet.
    pub fn new(server: impl Into<String>) -> Self {
        ClientConfig {
            server: server.into(),
            tls: None,
            insecure: false,
            token: None,
            timeout: Duration::from_secs(30),
            stream_idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            compression: Compression::None,
            traceparent: None,
        }
    }

    /// Sets the TLS material.
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets a bearer token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sets the unary call deadline.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the retry policy.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the compression.
    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// Sets the trace context provider.
    pub fn traceparent(mut self, provider: TraceparentProvider) -> Self {
        self.traceparent = Some(provider);
        self
    }
}

/// A PeerVault client: one channel shared by every call, cheap to clone.
#[derive(Clone)]
pub struct Client {
    channel: Channel,
    inner: Arc<Inner>,
}

struct Inner {
    server: String,
    client_cert: bool,
    auth: Option<MetadataValue<tonic::metadata::Ascii>>,
    config: ClientConfig,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("server", &self.inner.server).finish()
    }
}

fn read_file(what: &str, flag: &str, path: &PathBuf) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| {
        Error::Config(format!(
            "cannot read the {what} {} ({e}); pass {flag} or --tls-dir pointing at a folder with ca.crt, client.crt and client.key (PEERVAULT_TLS_DIR)",
            path.display()
        ))
    })
}

impl Client {
    /// Builds the client. Certificate files are read now (so a missing file is reported at
    /// once); the connection itself is made on the first call and remade after failures.
    pub fn connect(config: ClientConfig) -> Result<Client, Error> {
        let raw = config.server.trim();
        let hostport = raw
            .strip_prefix("https://")
            .or_else(|| raw.strip_prefix("http://"))
            .unwrap_or(raw)
            .trim_end_matches('/')
            .to_string();
        let (host, port) = hostport
            .rsplit_once(':')
            .ok_or_else(|| Error::Config(format!("server address '{raw}' has no port; expected HOST:PORT")))?;
        if port.parse::<u16>().is_err() || host.is_empty() {
            return Err(Error::Config(format!("server address '{raw}' is not HOST:PORT")));
        }
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let scheme = if config.insecure { "http" } else { "https" };
        let client_cert = !config.insecure && config.tls.as_ref().is_some_and(|t| t.cert.is_some());
        let mut ep = Endpoint::from_shared(format!("{scheme}://{hostport}"))
            .map_err(|e| Error::Config(format!("server address '{raw}' is not valid: {e}")))?
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .initial_stream_window_size(Some(4 * 1024 * 1024))
            .initial_connection_window_size(Some(8 * 1024 * 1024));
        if !config.insecure {
            let files = config.tls.clone().unwrap_or_default();
            let mut tls = ClientTlsConfig::new().domain_name(files.server_name.clone().unwrap_or(host));
            match &files.ca {
                Some(ca) => tls = tls.ca_certificate(Certificate::from_pem(read_file("CA certificate", "--ca", ca)?)),
                None => {
                    return Err(Error::Config(
                        "no CA certificate to verify the server with; pass --ca or --tls-dir (PEERVAULT_TLS_DIR), or --insecure for a plaintext server".into(),
                    ));
                }
            }
            match (&files.cert, &files.key) {
                (Some(c), Some(k)) => {
                    let cert = read_file("client certificate", "--cert", c)?;
                    let key = read_file("client key", "--key", k)?;
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                (None, None) => {}
                _ => return Err(Error::Config("--cert and --key must be given together".into())),
            }
            ep = ep
                .tls_config(tls)
                .map_err(|e| Error::Config(format!("unusable TLS configuration: {e}")))?;
        }
        let auth = match &config.token {
            Some(t) => Some(
                MetadataValue::try_from(format!("Bearer {}", t.trim()))
                    .map_err(|_| Error::Config("the token contains characters not allowed in a header".into()))?,
            ),
            None => None,
        };
        Ok(Client {
            channel: ep.connect_lazy(),
            inner: Arc::new(Inner {
                server: hostport,
                client_cert,
                auth,
                config,
            }),
        })
    }

    /// The `host:port` this client talks to.
    pub fn server(&self) -> &str {
        &self.inner.server
    }

    /// The configuration the client was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Wraps a message into a request with credentials, trace context and (for unary calls)
    /// the deadline.
    pub(crate) fn request<T>(&self, msg: T, unary: bool) -> Request<T> {
        let mut req = Request::new(msg);
        if unary {
            req.set_timeout(self.inner.config.timeout);
        }
        if let Some(a) = &self.inner.auth {
            req.metadata_mut().insert("authorization", a.clone());
        }
        if let Some(tp) = self.inner.config.traceparent.as_ref().and_then(|p| p())
            && let Ok(v) = MetadataValue::try_from(tp)
        {
            req.metadata_mut().insert("traceparent", v);
        }
        req
    }

    fn encoding(&self) -> Option<CompressionEncoding> {
        match self.inner.config.compression {
            Compression::None => None,
            Compression::Gzip => Some(CompressionEncoding::Gzip),
            Compression::Zstd => Some(CompressionEncoding::Zstd),
        }
    }

    pub(crate) fn err(&self, status: Status) -> Error {
        Error::from_status(status, &self.inner.server, self.inner.client_cert)
    }

    /// Runs a unary call under the deadline, with retries.
    pub(crate) async fn unary<T, F, Fut>(&self, what: &str, f: F) -> Result<T, Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let timeout = self.inner.config.timeout;
        self.inner
            .config
            .retry
            .run(what, || async {
                match tokio::time::timeout(timeout, f()).await {
                    Ok(r) => r,
                    Err(_) => Err(Status::deadline_exceeded(format!("no answer within {timeout:?}"))),
                }
            })
            .await
            .map_err(|s| self.err(s))
    }

    pub(crate) fn files(&self) -> FileServiceClient<Channel> {
        let mut c = FileServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        if let Some(e) = self.encoding() {
            c = c.send_compressed(e).accept_compressed(e);
        }
        c
    }

    pub(crate) fn blobs(&self) -> BlobServiceClient<Channel> {
        let mut c = BlobServiceClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE);
        if let Some(e) = self.encoding() {
            c = c.send_compressed(e).accept_compressed(e);
        }
        c
    }

    pub(crate) fn uploads(&self) -> UploadServiceClient<Channel> {
        let mut c = UploadServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        if let Some(e) = self.encoding() {
            c = c.send_compressed(e).accept_compressed(e);
        }
        c
    }

    pub(crate) fn events_client(&self) -> EventServiceClient<Channel> {
        EventServiceClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE)
    }

    fn peers(&self) -> PeerServiceClient<Channel> {
        PeerServiceClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE)
    }

    fn auth(&self) -> peervault_proto::v1::auth_service_client::AuthServiceClient<Channel> {
        peervault_proto::v1::auth_service_client::AuthServiceClient::new(self.channel.clone())
    }

    /// Creates an API key (needs scope `admin`); the response holds its secret, shown only once.
    /// `ttl` of `None` means it never expires.
    pub async fn create_api_key(
        &self,
        name: &str,
        scopes: Vec<String>,
        key_prefix: &str,
        ttl: Option<Duration>,
    ) -> Result<peervault_proto::v1::CreateApiKeyResponse, Error> {
        use peervault_proto::v1::{CreateApiKeyRequest, create_api_key_request::Expiry};
        self.unary("CreateApiKey", || {
            let mut c = self.auth();
            let req = self.request(
                CreateApiKeyRequest {
                    name: name.to_string(),
                    scopes: scopes.clone(),
                    key_prefix: key_prefix.to_string(),
                    expiry: ttl.map(|t| {
                        Expiry::Ttl(prost_types::Duration {
                            seconds: t.as_secs() as i64,
                            nanos: t.subsec_nanos() as i32,
                        })
                    }),
                },
                true,
            );
            async move { c.create_api_key(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Lists API keys (never their secrets), newest first.
    pub async fn list_api_keys(&self, include_revoked: bool) -> Result<Vec<peervault_proto::v1::ApiKey>, Error> {
        self.unary("ListApiKeys", || {
            let mut c = self.auth();
            let req = self.request(peervault_proto::v1::ListApiKeysRequest { include_revoked }, true);
            async move { c.list_api_keys(req).await.map(|r| r.into_inner().keys) }
        })
        .await
    }

    /// Revokes an API key by id.
    pub async fn revoke_api_key(&self, id: &str) -> Result<(), Error> {
        self.unary("RevokeApiKey", || {
            let mut c = self.auth();
            let req = self.request(peervault_proto::v1::RevokeApiKeyRequest { id: id.to_string() }, true);
            async move { c.revoke_api_key(req).await.map(|_| ()) }
        })
        .await
    }

    fn system(&self) -> SystemServiceClient<Channel> {
        SystemServiceClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE)
    }

    /// Describes one file (no content). NOT_FOUND when no file has the key.
    pub async fn stat(&self, key: &str) -> Result<FileResponse, Error> {
        self.unary("GetFile", || {
            let mut c = self.files();
            let req = self.request(
                FileRequest {
                    key: key.to_string(),
                    ..Default::default()
                },
                true,
            );
            async move { c.get_file(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Deletes one file. NOT_FOUND when no file has the key.
    pub async fn delete(&self, key: &str) -> Result<DeleteFileResponse, Error> {
        self.unary("DeleteFile", || {
            let mut c = self.files();
            let req = self.request(
                FileRequest {
                    key: key.to_string(),
                    ..Default::default()
                },
                true,
            );
            async move { c.delete_file(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// One page of files whose key starts with `prefix`; pass the previous page's
    /// `next_page_token` to continue.
    pub async fn list_page(&self, prefix: &str, page_size: i32, page_token: &str) -> Result<ListFilesResponse, Error> {
        self.unary("ListFiles", || {
            let mut c = self.files();
            let req = self.request(
                ListFilesRequest {
                    prefix: prefix.to_string(),
                    page_size,
                    page_token: page_token.to_string(),
                    ..Default::default()
                },
                true,
            );
            async move { c.list_files(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Every file whose key starts with `prefix`, following pages to the end (`limit` 0 means
    /// no limit).
    pub async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<FileResponse>, Error> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let page = self.list_page(prefix, 1000, &token).await?;
            out.extend(page.files);
            if limit > 0 && out.len() >= limit {
                out.truncate(limit);
                return Ok(out);
            }
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            token = page.next_page_token;
        }
    }

    /// Merges `set` into a file's metadata and removes `remove` (or, with `replace`, makes the
    /// metadata exactly `set`).
    pub async fn update_metadata(
        &self,
        key: &str,
        set: HashMap<String, String>,
        remove: Vec<String>,
        replace: bool,
    ) -> Result<FileResponse, Error> {
        self.unary("UpdateFileMetadata", || {
            let mut c = self.files();
            let req = self.request(
                UpdateFileMetadataRequest {
                    key: key.to_string(),
                    metadata: set.clone(),
                    replace,
                    remove_keys: remove.clone(),
                    ..Default::default()
                },
                true,
            );
            async move { c.update_file_metadata(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Lists the peers the peer service knows.
    pub async fn list_peers(&self) -> Result<ListPeersResponse, Error> {
        self.unary("ListPeers", || {
            let mut c = self.peers();
            let req = self.request((), true);
            async move { c.list_peers(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Adds a peer outside discovery (`address` may be `host:port` with `port` 0).
    pub async fn add_peer(
        &self,
        address: &str,
        port: i32,
        id: &str,
        metadata: HashMap<String, String>,
    ) -> Result<PeerResponse, Error> {
        self.unary("AddPeer", || {
            let mut c = self.peers();
            let req = self.request(
                AddPeerRequest {
                    address: address.to_string(),
                    port,
                    metadata: metadata.clone(),
                    id: id.to_string(),
                },
                true,
            );
            async move { c.add_peer(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Removes a peer.
    pub async fn remove_peer(&self, id: &str) -> Result<peervault_proto::v1::RemovePeerResponse, Error> {
        self.unary("RemovePeer", || {
            let mut c = self.peers();
            let req = self.request(PeerRequest { id: id.to_string() }, true);
            async move { c.remove_peer(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// A peer's latest health check result.
    pub async fn peer_health(&self, id: &str) -> Result<PeerHealthResponse, Error> {
        self.unary("GetPeerHealth", || {
            let mut c = self.peers();
            let req = self.request(PeerRequest { id: id.to_string() }, true);
            async move { c.get_peer_health(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Version, role, uptime and storage figures of the server process.
    pub async fn system_info(&self) -> Result<SystemInfoResponse, Error> {
        self.unary("GetSystemInfo", || {
            let mut c = self.system();
            let req = self.request((), true);
            async move { c.get_system_info(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Request and storage figures of the server process.
    pub async fn metrics(&self) -> Result<MetricsResponse, Error> {
        self.unary("GetMetrics", || {
            let mut c = self.system();
            let req = self.request((), true);
            async move { c.get_metrics(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Health of the server process and each service it hosts (needs no credentials).
    pub async fn health(&self) -> Result<HealthResponse, Error> {
        self.unary("HealthCheck", || {
            let mut c = self.system();
            let req = self.request((), true);
            async move { c.health_check(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Describes a blob (no content). `key` is the 64-character hex form or 32 raw bytes.
    pub async fn stat_blob(&self, key: &[u8]) -> Result<peervault_proto::v1::BlobMetadata, Error> {
        self.unary("StatBlob", || {
            let mut c = self.blobs();
            let req = self.request(
                peervault_proto::v1::StatBlobRequest {
                    key: bytes::Bytes::copy_from_slice(key),
                },
                true,
            );
            async move { c.stat_blob(req).await.map(|r| r.into_inner()) }
        })
        .await
    }
}

/// Lowercase hex of bytes (blob keys are shown this way).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_addresses_and_missing_files_are_config_errors() {
        for bad in ["localhost", "localhost:notaport", ":8082"] {
            let e = Client::connect(ClientConfig::new(bad).tls(TlsConfig::default())).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config, "{bad}: {e}");
        }
        let e =
            Client::connect(ClientConfig::new("localhost:1").tls(TlsConfig::from_dir("/nonexistent/tls"))).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("/nonexistent/tls/ca.crt"), "{e}");
        assert!(e.to_string().contains("--tls-dir"), "{e}");
    }

    #[tokio::test]
    async fn requests_carry_token_traceparent_and_deadline() {
        let mut cfg = ClientConfig::new("http://127.0.0.1:1").token("pvk_abc");
        cfg.insecure = true;
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string();
        let tp2 = tp.clone();
        let cfg = cfg.traceparent(Arc::new(move || Some(tp2.clone())));
        let client = Client::connect(cfg).unwrap();
        let req = client.request((), true);
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer pvk_abc");
        assert_eq!(req.metadata().get("traceparent").unwrap(), tp.as_str());
        assert!(req.metadata().get("grpc-timeout").is_some());
        let streaming = client.request((), false);
        assert!(streaming.metadata().get("grpc-timeout").is_none());
    }

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
    }
}
