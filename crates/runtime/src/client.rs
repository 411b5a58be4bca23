//! Channels for calls from one PeerVault service to another: mutual TLS with this server's
//! service identity, trace context injected, connected lazily so a peer that is down does not
//! stop start-up.

use std::time::Duration;

use thiserror::Error;
use tonic::transport::{Channel, Endpoint};
use tower_layer::Layer;

use crate::{
    telemetry::{ClientTrace, ClientTraceLayer},
    tls::{TlsError, TlsFiles, service_client_tls},
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

/// Builds a lazily connecting channel to `endpoint` (`host:port`). With `tls` it uses mutual TLS
/// and verifies the server's name against `host`; without, plaintext (`--insecure`).
pub fn service_channel(
    flag: &'static str,
    endpoint: &str,
    tls: Option<&TlsFiles>,
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
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{endpoint}"))
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    if let Some(files) = tls {
        ep = ep
            .tls_config(service_client_tls(files, host)?)
            .map_err(|e| bad(e.to_string()))?;
    }
    Ok(ClientTraceLayer.layer(ep.connect_lazy()))
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
