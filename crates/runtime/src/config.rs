//! The operator contract: flags shared by every role, each readable from a `PEERVAULT_*`
//! environment variable. Names and defaults are public interface (DESIGN.md, "Operator contract").

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};

/// Whether a TLS client must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClientAuth {
    /// Every connection must present a certificate signed by the client CA.
    Required,
    /// Connections without a certificate are admitted; such callers need a token.
    Optional,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// JSON lines when stdout is not a terminal, readable text when it is.
    Auto,
    /// Always JSON lines.
    Json,
    /// Always readable text.
    Text,
}

/// Flags every `peervault serve <role>` accepts. A role ignores the listen flags it does not use,
/// so scripts can pass the same set to any role.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Directory for stored data and the generated development certificates.
    #[arg(long, env = "PEERVAULT_DATA_DIR", default_value = "./data", value_name = "DIR")]
    pub data_dir: PathBuf,

    /// Address of the gRPC port (every service of the role on one port). Port 0 binds a free port.
    #[arg(
        long,
        env = "PEERVAULT_GRPC_LISTEN",
        default_value = "0.0.0.0:8082",
        value_name = "ADDR"
    )]
    pub grpc_listen: SocketAddr,

    /// Address of the events WebSocket/HTTP port. Port 0 binds a free port.
    #[arg(
        long,
        env = "PEERVAULT_HTTP_LISTEN",
        default_value = "0.0.0.0:8083",
        value_name = "ADDR"
    )]
    pub http_listen: SocketAddr,

    /// Address of the admin HTTP port (`/metrics`, `/healthz`, `/readyz`). Port 0 binds a free port.
    #[arg(
        long,
        env = "PEERVAULT_ADMIN_LISTEN",
        default_value = "0.0.0.0:9090",
        value_name = "ADDR"
    )]
    pub admin_listen: SocketAddr,

    /// PEM certificate chain this server presents (and uses as its identity towards other services).
    #[arg(long, env = "PEERVAULT_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "PEERVAULT_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM bundle of the CAs that client certificates (and other services' certificates) must chain to.
    #[arg(long, env = "PEERVAULT_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,

    /// Whether clients must present a certificate (`optional` admits token-only clients).
    #[arg(long, env = "PEERVAULT_TLS_CLIENT_AUTH", value_enum, default_value = "required")]
    pub tls_client_auth: ClientAuth,

    /// How often certificate and key files are checked for changes (they are reloaded without a restart).
    #[arg(long, env = "PEERVAULT_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub tls_reload_interval: Duration,

    /// Serve plaintext gRPC without TLS. Every caller is then trusted: only for local experiments.
    #[arg(long, env = "PEERVAULT_INSECURE", default_value_t = false)]
    pub insecure: bool,

    /// SPIFFE trust domain of service identities (`spiffe://<domain>/peervault/<service>`).
    #[arg(
        long,
        env = "PEERVAULT_TRUST_DOMAIN",
        default_value = "peervault.local",
        value_name = "DOMAIN"
    )]
    pub trust_domain: String,

    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "PEERVAULT_MAX_MESSAGE_SIZE", default_value_t = 16 * 1024 * 1024, value_parser = clap::value_parser!(u32).range(1024..), value_name = "BYTES")]
    pub max_message_size: u32,

    /// Most concurrent HTTP/2 streams (calls) per connection.
    #[arg(long, env = "PEERVAULT_MAX_CONCURRENT_STREAMS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..), value_name = "N")]
    pub max_concurrent_streams: u32,

    /// Interval of HTTP/2 keepalive pings on idle connections.
    #[arg(long, env = "PEERVAULT_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "PEERVAULT_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub keepalive_timeout: Duration,

    /// On SIGTERM/SIGINT, how long in-flight calls may take to finish before the process exits.
    #[arg(long, env = "PEERVAULT_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub shutdown_grace: Duration,

    /// gRPC address of the peer service, for calls that blob forwards (`serve all`: itself).
    #[arg(long, env = "PEERVAULT_PEER_ENDPOINT", value_name = "HOST:PORT")]
    pub peer_endpoint: Option<String>,

    /// gRPC address of the events service, for streams that blob forwards (`serve all`: itself).
    #[arg(long, env = "PEERVAULT_EVENTS_ENDPOINT", value_name = "HOST:PORT")]
    pub events_endpoint: Option<String>,

    /// Stable id of this node (defaults to the host name).
    #[arg(long, env = "PEERVAULT_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,

    /// Log format.
    #[arg(long, env = "PEERVAULT_LOG_FORMAT", value_enum, default_value = "auto")]
    pub log_format: LogFormat,

    /// Log filter in `tracing` EnvFilter syntax (e.g. `info,peervault_blob=debug`).
    #[arg(long, env = "PEERVAULT_LOG", default_value = "info", value_name = "FILTER")]
    pub log: String,
}

impl ServeConfig {
    /// The node id: `--node-id`, else the host name, else `peervault`.
    pub fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            hostname::get()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "peervault".to_string())
        })
    }
}

/// Parses `30s`, `500ms`, `2m` and the like.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 10s, 2m)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        cfg: ServeConfig,
    }

    #[test]
    fn defaults_match_the_operator_contract() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.cfg.data_dir, PathBuf::from("./data"));
        assert_eq!(cli.cfg.grpc_listen.to_string(), "0.0.0.0:8082");
        assert_eq!(cli.cfg.http_listen.to_string(), "0.0.0.0:8083");
        assert_eq!(cli.cfg.admin_listen.to_string(), "0.0.0.0:9090");
        assert_eq!(cli.cfg.tls_client_auth, ClientAuth::Required);
        assert_eq!(cli.cfg.max_concurrent_streams, 100);
        assert!(!cli.cfg.insecure);
    }

    #[test]
    fn a_bad_value_names_the_flag() {
        let err = Cli::try_parse_from(["x", "--grpc-listen", "nowhere"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--grpc-listen"), "{err}");
        let err = Cli::try_parse_from(["x", "--shutdown-grace", "soon"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--shutdown-grace"), "{err}");
    }
}
