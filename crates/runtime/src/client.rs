//! Channels for calls from one PeerVault service to another: mutual TLS with this server's
//! service identity, trace context injected, connected lazily so a peer that is down does not
//! stop start-up.
//!
//! Every connection a channel opens (the first one and every reconnection) takes the process's
//! *current* TLS state ([`ReloadableTls::client_current`]): certificates and CAs rotated on disk
//! apply to outgoing calls without a restart, exactly as they do for the servers. This is the one
//! way services dial each other (membership watch, event publishing, health probes, facade
//! forwarding, replication).

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};
use tower_layer::Layer;

use crate::{
    telemetry::{ClientTrace, ClientTraceLayer},
    tls::{ReloadableTls, TlsError},
};

/// A channel to another service with trace propagation; hand it to any generated client.
pub type ServiceChannel = ClientTrace<Channel>;

/// Why a channel could not be set up.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The endpoint is not `host:port`.
    #[error("invalid endpoint '{endpoint}' for {flag}: {reason} (expected HOST:PORT)")]
    Endpoint {
        /// The flag that named it.
        flag: &'static str,
        /// What was given.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
    /// The TLS files could not be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Dials TCP and performs the TLS handshake with the TLS state current at that moment.
#[derive(Clone)]
pub struct RotatingTlsConnector {
    tls: Arc<ReloadableTls>,
    server_name: ServerName<'static>,
    /// Dial this address instead of the URI's host (a name resolved elsewhere).
    addr: Option<SocketAddr>,
}

impl RotatingTlsConnector {
    /// A connector verifying the server's certificate against `domain`.
    pub fn new(tls: Arc<ReloadableTls>, domain: &str, addr: Option<SocketAddr>) -> Result<Self, String> {
        let server_name = ServerName::try_from(domain.to_string()).map_err(|e| format!("bad server name: {e}"))?;
        Ok(RotatingTlsConnector { tls, server_name, addr })
    }
}

type ConnectFuture =
    Pin<Box<dyn Future<Output = io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>> + Send>>;

impl tower_service::Service<Uri> for RotatingTlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let cfg = self.tls.client_current();
        let name = self.server_name.clone();
        let addr = self.addr;
        Box::pin(async move {
            let tcp = match addr {
                Some(a) => TcpStream::connect(a).await?,
                None => {
                    let host = uri
                        .host()
                        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host in the endpoint"))?;
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    let port = uri.port_u16().unwrap_or(443);
                    TcpStream::connect((host, port)).await?
                }
            };
            let _ = tcp.set_nodelay(true);
            let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// Builds a lazily connecting channel to `endpoint` (`host:port`). With `tls` it uses mutual TLS
/// with the certificates current at each connection and verifies the server's name against
/// `host`; without, plaintext (`--insecure`).
pub fn service_channel(
    flag: &'static str,
    endpoint: &str,
    tls: Option<&Arc<ReloadableTls>>,
    connect_timeout: Duration,
) -> Result<ServiceChannel, ClientError> {
    let bad = |reason: String| ClientError::Endpoint {
        flag,
        endpoint: endpoint.to_string(),
        reason,
    };
    let (host, port) = endpoint.rsplit_once(':').ok_or_else(|| bad("missing port".into()))?;
    port.parse::<u16>().map_err(|e| bad(format!("bad port: {e}")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("missing host".into()));
    }
    build(flag, endpoint, host, None, tls, connect_timeout)
}

/// As [`service_channel`], dialling `addr` and verifying the server certificate against
/// `domain` (the DNS name the address was resolved from).
pub fn service_channel_to(
    flag: &'static str,
    addr: SocketAddr,
    domain: &str,
    tls: Option<&Arc<ReloadableTls>>,
    connect_timeout: Duration,
) -> Result<ServiceChannel, ClientError> {
    build(flag, &addr.to_string(), domain, Some(addr), tls, connect_timeout)
}

fn build(
    flag: &'static str,
    endpoint: &str,
    domain: &str,
    addr: Option<SocketAddr>,
    tls: Option<&Arc<ReloadableTls>>,
    connect_timeout: Duration,
) -> Result<ServiceChannel, ClientError> {
    let bad = |reason: String| ClientError::Endpoint {
        flag,
        endpoint: endpoint.to_string(),
        reason,
    };
    // The scheme stays `http`: TLS is done by the connector below, not by tonic, so that every
    // connection picks the current certificates.
    let ep = Endpoint::from_shared(format!("http://{endpoint}"))
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let channel = match tls {
        Some(tls) => {
            let connector = RotatingTlsConnector::new(tls.clone(), domain, addr).map_err(bad)?;
            ep.connect_with_connector_lazy(connector)
        }
        None => ep.connect_lazy(),
    };
    Ok(ClientTraceLayer.layer(channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoints_must_be_host_and_port() {
        for bad in ["nohost", ":80", "host:notaport"] {
            let err = service_channel("--peer-endpoint", bad, None, Duration::from_secs(1))
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("--peer-endpoint"), "{err}");
        }
        assert!(service_channel("--peer-endpoint", "127.0.0.1:1", None, Duration::from_secs(1)).is_ok());
    }
}
