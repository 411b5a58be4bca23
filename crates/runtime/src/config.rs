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

    /// File holding the HS256 secret that signs accepted JWTs.
    #[arg(
        long,
        env = "PEERVAULT_JWT_HS256_SECRET_FILE",
        value_name = "FILE",
        conflicts_with = "jwt_jwks_file"
    )]
    pub jwt_hs256_secret_file: Option<PathBuf>,

    /// JWKS file with the RS256/ES256 public keys of accepted JWTs (e.g. a Kubernetes cluster's
    /// service-account issuer keys); re-read when it changes.
    #[arg(long, env = "PEERVAULT_JWT_JWKS_FILE", value_name = "FILE")]
    pub jwt_jwks_file: Option<PathBuf>,

    /// Required `iss` of accepted JWTs.
    #[arg(long, env = "PEERVAULT_JWT_ISSUER", value_name = "ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` of accepted JWTs (one of the token's audiences must match; a token without
    /// `aud` is refused). Required with `--jwt-jwks-file` unless `--jwt-allow-any-audience`.
    #[arg(long, env = "PEERVAULT_JWT_AUDIENCE", value_name = "AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Accept JWTs from `--jwt-jwks-file` for any audience (otherwise `--jwt-audience` is
    /// required: a cluster's service-account keys sign tokens meant for every other service too).
    #[arg(long, env = "PEERVAULT_JWT_ALLOW_ANY_AUDIENCE", default_value_t = false)]
    pub jwt_allow_any_audience: bool,

    /// gRPC address of a blob node (`HOST:PORT`, e.g. the blob client Service) that verifies API
    /// keys for a process without a key store (`serve peer`, `serve events`). Blob nodes use
    /// their own.
    #[arg(long, env = "PEERVAULT_AUTH_ENDPOINT", value_name = "HOST:PORT")]
    pub auth_endpoint: Option<String>,

    /// How long an API key verified through `--auth-endpoint` is trusted before it is asked
    /// about again (revocation takes effect within this time).
    #[arg(long, env = "PEERVAULT_AUTH_CACHE_TTL", default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub auth_cache_ttl: Duration,

    /// YAML file mapping certificate SANs and JWT subjects to scopes (`read`, `write`, `admin`).
    #[arg(long, env = "PEERVAULT_AUTH_CONFIG", value_name = "FILE")]
    pub auth_config: Option<PathBuf>,

    /// WebSocket clients must present credentials with the `read` scope: a client certificate,
    /// or an API key or JWT (`?token=`, `Authorization: Bearer`, or an `auth` message). This is
    /// the default; the flag is kept so existing scripts still parse.
    #[arg(long, env = "PEERVAULT_WS_TOKEN_AUTH", default_value_t = true)]
    pub ws_token_auth: bool,

    /// Admit WebSocket clients without credentials (they see every event but file events
    /// outside no prefix). Not combinable with `--ws-cors-origins '*'`.
    #[arg(long, env = "PEERVAULT_WS_ALLOW_ANONYMOUS", default_value_t = false)]
    pub ws_allow_anonymous: bool,

    /// Most open connections on the gRPC port; further ones are closed at once.
    #[arg(long, env = "PEERVAULT_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..), value_name = "N")]
    pub max_connections: u32,

    /// Time a client has to complete the TLS handshake on the gRPC and WebSocket ports.
    #[arg(long, env = "PEERVAULT_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub tls_handshake_timeout: Duration,

    /// Time a client of the admin port has to send its request head; a connection serves one
    /// request and closes, and no request may take longer than three times this.
    #[arg(long, env = "PEERVAULT_ADMIN_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub admin_read_timeout: Duration,

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

    /// How the peer service finds blob pods: `static` (`--peers`), `dns` (`--dns-name`) or
    /// `kubernetes` (EndpointSlices of `--kube-service`).
    #[arg(long, env = "PEERVAULT_DISCOVERY", value_enum, default_value = "static")]
    pub discovery: DiscoveryKind,

    /// Static list of blob pods (`host:port,…`) for `--discovery static`. `serve all` with an
    /// empty list uses itself.
    #[arg(long, env = "PEERVAULT_PEERS", value_delimiter = ',', value_name = "HOST:PORT,…")]
    pub peers: Vec<String>,

    /// DNS name of the blob pods for `--discovery dns`: SRV records give host and port; with
    /// `--dns-port`, A/AAAA records are used instead.
    #[arg(long, env = "PEERVAULT_DNS_NAME", value_name = "NAME")]
    pub dns_name: Option<String>,

    /// gRPC port of the blob pods when `--dns-name` is resolved through A/AAAA records.
    #[arg(long, env = "PEERVAULT_DNS_PORT", value_parser = clap::value_parser!(u16).range(1..), value_name = "PORT")]
    pub dns_port: Option<u16>,

    /// How often `--dns-name` is resolved again.
    #[arg(long, env = "PEERVAULT_DNS_INTERVAL", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub dns_interval: Duration,

    /// DNS server (`ip:port`) to resolve `--dns-name` with, instead of the system's resolv.conf.
    #[arg(long, env = "PEERVAULT_DNS_SERVER", value_name = "IP:PORT")]
    pub dns_server: Option<SocketAddr>,

    /// Headless Service of the blob pods for `--discovery kubernetes` (EndpointSlices labelled
    /// `kubernetes.io/service-name=<this>`).
    #[arg(long, env = "PEERVAULT_KUBE_SERVICE", value_name = "NAME")]
    pub kube_service: Option<String>,

    /// Namespace of `--kube-service` (default: the pod's own namespace).
    #[arg(long, env = "PEERVAULT_KUBE_NAMESPACE", value_name = "NAMESPACE")]
    pub kube_namespace: Option<String>,

    /// Name of the EndpointSlice port that is the blob gRPC port (else the slice's first port).
    #[arg(long, env = "PEERVAULT_KUBE_PORT_NAME", default_value = "grpc", value_name = "NAME")]
    pub kube_port_name: String,

    /// Interval between two health checks of one peer.
    #[arg(long, env = "PEERVAULT_PROBE_INTERVAL", default_value = "2s", value_parser = parse_duration, value_name = "DURATION")]
    pub probe_interval: Duration,

    /// Deadline of one health check (connection included).
    #[arg(long, env = "PEERVAULT_PROBE_TIMEOUT", default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    pub probe_timeout: Duration,

    /// Consecutive failed checks after which a peer is `down`.
    #[arg(long, env = "PEERVAULT_PROBE_DOWN_AFTER", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..), value_name = "N")]
    pub probe_down_after: u32,

    /// Consecutive passing checks after which a `down` or `degraded` peer is `healthy` again.
    #[arg(long, env = "PEERVAULT_PROBE_UP_AFTER", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..), value_name = "N")]
    pub probe_up_after: u32,

    /// A passing check slower than this counts as slow; two slow or failed checks in a row make a
    /// `healthy` peer `degraded`.
    #[arg(long, env = "PEERVAULT_PROBE_SLOW", default_value = "500ms", value_parser = parse_duration, value_name = "DURATION")]
    pub probe_slow: Duration,

    /// Events service, WebSocket gateway, alert thresholds and metrics events.
    #[command(flatten)]
    pub events: EventsFlags,

    /// Where the peer service keeps peers added and removed by hand: `file`
    /// (`<data-dir>/peer/peers.json`) or `configmap` (`--peer-configmap`, shared by replicas).
    #[arg(long, env = "PEERVAULT_PEER_STORE", value_enum, default_value = "file")]
    pub peer_store: PeerStoreKind,

    /// Name of the ConfigMap of `--peer-store configmap` (in `--kube-namespace`).
    #[arg(
        long,
        env = "PEERVAULT_PEER_CONFIGMAP",
        default_value = "peervault-peers",
        value_name = "NAME"
    )]
    pub peer_configmap: String,
}

/// Where manual peer changes are persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PeerStoreKind {
    /// A JSON file in the data directory.
    File,
    /// A Kubernetes ConfigMap, written with optimistic concurrency.
    Configmap,
}

/// Where the peer service learns which blob pods exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiscoveryKind {
    /// The `--peers` list.
    Static,
    /// SRV or A/AAAA records of `--dns-name`, re-resolved every `--dns-interval`.
    Dns,
    /// EndpointSlices of `--kube-service`, watched.
    Kubernetes,
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

/// Flags of the events service (its WebSocket gateway, replay buffer and alert rules) and of
/// the metrics events every role publishes. The `--ws-*` flags are the published
/// `PEERVAULT_WS_*` settings; unset ones fall back to `--events-config`, then to the defaults
/// shown. The WebSocket gateway listens on `--http-listen`; `--ws-host`/`--ws-port` override its
/// host or port.
#[derive(Debug, Clone, Args)]
pub struct EventsFlags {
    /// YAML file with the published `websocket:` section (port, host, cors, timeouts, limits) and
    /// optional `events:` and `alerts:` sections. Flags and environment variables win over it.
    #[arg(long, env = "PEERVAULT_EVENTS_CONFIG", value_name = "FILE")]
    pub events_config: Option<PathBuf>,

    /// Host (name or address) of the WebSocket gateway; overrides the host of `--http-listen`.
    #[arg(long, env = "PEERVAULT_WS_HOST", value_name = "HOST")]
    pub ws_host: Option<String>,

    /// Port of the WebSocket gateway; overrides the port of `--http-listen`.
    #[arg(long, env = "PEERVAULT_WS_PORT", value_name = "PORT")]
    pub ws_port: Option<u16>,

    /// Origins allowed to open WebSockets besides the page's own, comma-separated, or `*` for
    /// all (refused together with --ws-allow-anonymous) [default: none beyond same-origin].
    #[arg(long, env = "PEERVAULT_WS_CORS_ORIGINS", value_name = "ORIGINS")]
    pub ws_cors_origins: Option<String>,

    /// Time allowed to send the upgrade request, and the auth message when token auth is on [default: 30s].
    #[arg(long, env = "PEERVAULT_WS_READ_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub ws_read_timeout: Option<Duration>,

    /// Time allowed for each write to a client; a client that does not read is closed [default: 30s].
    #[arg(long, env = "PEERVAULT_WS_WRITE_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub ws_write_timeout: Option<Duration>,

    /// Interval of server pings [default: 54s].
    #[arg(long, env = "PEERVAULT_WS_PING_PERIOD", value_parser = parse_duration, value_name = "DURATION")]
    pub ws_ping_period: Option<Duration>,

    /// A connection that sends nothing (not even a pong) for this long is closed [default: 60s].
    #[arg(long, env = "PEERVAULT_WS_PONG_WAIT", value_parser = parse_duration, value_name = "DURATION")]
    pub ws_pong_wait: Option<Duration>,

    /// Most concurrent WebSocket connections [default: 1000].
    #[arg(long, env = "PEERVAULT_WS_MAX_CONNECTIONS", value_name = "N")]
    pub ws_max_connections: Option<u32>,

    /// Most concurrent WebSocket connections from one client address [default: 100].
    #[arg(long, env = "PEERVAULT_WS_MAX_CONNECTIONS_PER_ADDRESS", value_name = "N")]
    pub ws_max_connections_per_address: Option<u32>,

    /// Largest message a client may send, in bytes [default: 1048576].
    #[arg(long, env = "PEERVAULT_WS_MAX_MESSAGE_SIZE", value_name = "BYTES")]
    pub ws_max_message_size: Option<u32>,

    /// Messages per second a client may send [default: 100].
    #[arg(long, env = "PEERVAULT_WS_MESSAGES_PER_SECOND", value_name = "N")]
    pub ws_messages_per_second: Option<u32>,

    /// Events the events service keeps for replay (Subscribe with since_sequence) [default: 10000].
    #[arg(long, env = "PEERVAULT_EVENTS_REPLAY_BUFFER", value_name = "N")]
    pub events_replay_buffer: Option<u32>,

    /// Events a subscriber may fall behind before it is told it lagged [default: 1024].
    #[arg(long, env = "PEERVAULT_EVENTS_SUBSCRIBER_QUEUE", value_name = "N")]
    pub events_subscriber_queue: Option<u32>,

    /// How often each service publishes system, storage, network and performance metrics
    /// events; 0s turns them off.
    #[arg(long, env = "PEERVAULT_METRICS_INTERVAL", default_value = "15s", value_parser = parse_duration, value_name = "DURATION")]
    pub metrics_interval: Duration,

    /// Storage usage (percent of capacity) that raises a storage_alert [default: 90].
    #[arg(long, env = "PEERVAULT_ALERT_STORAGE_USAGE_PERCENT", value_name = "PERCENT")]
    pub alert_storage_usage_percent: Option<f64>,

    /// Memory usage (percent of the limit) that raises a performance_alert [default: 90].
    #[arg(long, env = "PEERVAULT_ALERT_MEMORY_USAGE_PERCENT", value_name = "PERCENT")]
    pub alert_memory_usage_percent: Option<f64>,

    /// Replication backlog (items waiting) that raises a storage_alert [default: 1000].
    #[arg(long, env = "PEERVAULT_ALERT_REPLICATION_BACKLOG", value_name = "N")]
    pub alert_replication_backlog: Option<f64>,

    /// Authentication failures within --alert-auth-failure-window that raise a security_alert [default: 10].
    #[arg(long, env = "PEERVAULT_ALERT_AUTH_FAILURES", value_name = "N")]
    pub alert_auth_failures: Option<u32>,

    /// Window for --alert-auth-failures [default: 60s].
    #[arg(long, env = "PEERVAULT_ALERT_AUTH_FAILURE_WINDOW", value_parser = parse_duration, value_name = "DURATION")]
    pub alert_auth_failure_window: Option<Duration>,
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
        assert!(cli.cfg.ws_token_auth && !cli.cfg.ws_allow_anonymous);
        assert!(!cli.cfg.jwt_allow_any_audience);
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
