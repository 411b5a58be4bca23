//! WebSocket and HTTPS clients for the events port, which speaks TLS with the node's
//! certificates and requires credentials by default: a real rustls client, then a real
//! tungstenite handshake over it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, http::HeaderValue};

use super::{Node, NodeBuilder};

/// A WebSocket over TLS.
pub type Wss = tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>;

/// Where a node's WebSocket port is and the TLS folder to trust and authenticate with.
#[derive(Debug, Clone)]
pub struct WsTarget {
    pub addr: SocketAddr,
    pub tls_dir: PathBuf,
}

/// What a client presents.
#[derive(Debug, Clone)]
pub enum Cred {
    /// Nothing at all.
    None,
    /// The development client certificate (holds every scope without `--auth-config`).
    DevCert,
    /// A certificate and key of one's own.
    Cert(PathBuf, PathBuf),
    /// `?token=…`.
    Query(String),
    /// `Authorization: Bearer …`.
    Bearer(String),
}

impl NodeBuilder {
    /// As `start_events`, returning the WebSocket target.
    pub fn start_events_ws(self) -> (Node, WsTarget) {
        let (node, http) = self.start_events();
        let t = node.ws(http);
        (node, t)
    }
}

impl Node {
    /// The WebSocket target of this node's events port `http`.
    pub fn ws(&self, http: SocketAddr) -> WsTarget {
        WsTarget {
            addr: http,
            tls_dir: self.tls_dir(),
        }
    }
}

fn pem_certs(p: &Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    rustls_pemfile::certs(&mut std::fs::read(p).unwrap().as_slice())
        .collect::<Result<_, _>>()
        .unwrap()
}

fn client_config(tls_dir: &Path, identity: Option<(&Path, &Path)>, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in pem_certs(&tls_dir.join("ca.crt")) {
        roots.add(c).unwrap();
    }
    let b = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut cfg = match identity {
        Some((c, k)) => {
            let key = rustls_pemfile::private_key(&mut std::fs::read(k).unwrap().as_slice())
                .unwrap()
                .unwrap();
            b.with_client_auth_cert(pem_certs(c), key).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(cfg)
}

/// A TLS connection to `t` presenting the certificate `cred` names, if any.
pub async fn tls_connect(t: &WsTarget, cred: &Cred, alpn: &[u8]) -> std::io::Result<TlsStream<TcpStream>> {
    let dev = (t.tls_dir.join("client.crt"), t.tls_dir.join("client.key"));
    let identity = match cred {
        Cred::DevCert => Some((dev.0.as_path(), dev.1.as_path())),
        Cred::Cert(c, k) => Some((c.as_path(), k.as_path())),
        _ => None,
    };
    let tcp = TcpStream::connect(t.addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    TlsConnector::from(client_config(&t.tls_dir, identity, alpn))
        .connect(name, tcp)
        .await
}

/// Opens `wss://…/ws` with `cred`, and `origin` as the Origin header when given.
pub async fn wss_connect(t: &WsTarget, cred: &Cred, origin: Option<&str>) -> Result<Wss, tungstenite::Error> {
    let query = match cred {
        Cred::Query(tok) => format!("?token={tok}"),
        _ => String::new(),
    };
    let mut req = format!("wss://localhost:{}/ws{query}", t.addr.port())
        .into_client_request()
        .unwrap();
    if let Cred::Bearer(tok) = cred {
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {tok}")).unwrap(),
        );
    }
    if let Some(o) = origin {
        req.headers_mut().insert("origin", HeaderValue::from_str(o).unwrap());
    }
    let io = tls_connect(t, cred, b"http/1.1")
        .await
        .map_err(tungstenite::Error::Io)?;
    let (ws, _) = tokio_tungstenite::client_async(req, io).await?;
    Ok(ws)
}

/// GET over HTTPS on the events port: (status, body).
pub async fn https_get(t: &WsTarget, path: &str) -> (u16, String) {
    let mut s = tls_connect(t, &Cred::None, b"http/1.1").await.expect("TLS connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(super::WAIT, s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
