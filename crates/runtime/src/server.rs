//! Server assembly: one function stacks every layer of every PeerVault gRPC server, binds the
//! ports, accepts TLS connections with the current (reloadable) certificate, reports health and
//! readiness, and drains on SIGTERM/SIGINT.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::{service::RoutesBuilder, transport::server::Connected};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    auth::AuthLayer,
    client::{ClientError, ServiceChannel, service_channel},
    config::ServeConfig,
    identity::ConnInfo,
    metrics::{GrpcMetricsLayer, Metrics},
    system::SystemApi,
    telemetry::{ServerTraceLayer, Telemetry},
    tls::{ReloadableServerConfig, TlsError, TlsFiles, ensure_dev_certs},
};

/// Why the server could not start or run.
#[derive(Debug, Error)]
pub enum StartError {
    /// A listen address could not be bound.
    #[error("cannot listen on {flag} {addr}: {source}{hint}")]
    Bind {
        /// The flag.
        flag: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Flags that contradict each other.
    #[error("{0}")]
    Config(String),
    /// Logging/tracing could not be set up.
    #[error("{0}")]
    Telemetry(String),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A channel to another service could not be set up.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Applies the limits every PeerVault gRPC service shares to a generated server: maximum
/// message size both ways, and gzip/zstd accepted (and used for replies when the client asks).
#[macro_export]
macro_rules! configure_service {
    ($server:expr, $max_message_size:expr) => {
        $server
            .max_decoding_message_size($max_message_size)
            .max_encoding_message_size($max_message_size)
            .accept_compressed(::tonic::codec::CompressionEncoding::Gzip)
            .accept_compressed(::tonic::codec::CompressionEncoding::Zstd)
            .send_compressed(::tonic::codec::CompressionEncoding::Gzip)
            .send_compressed(::tonic::codec::CompressionEncoding::Zstd)
    };
}

/// Adds one service to the router being assembled.
type AddRoute = Box<dyn FnOnce(&mut RoutesBuilder) + Send>;

/// The gRPC services a role contributes, and the names its health reports.
#[derive(Default)]
pub struct Services {
    adders: Vec<AddRoute>,
    health_names: Vec<String>,
}

impl Services {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a configured, generated service server; health reports it under its name.
    pub fn add<S>(&mut self, svc: S) -> &mut Self
    where
        S: tower_service::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.health_names.push(S::NAME.to_string());
        self.adders.push(Box::new(move |r: &mut RoutesBuilder| {
            r.add_service(svc);
        }));
        self
    }

    /// Adds every service of `other` (for `serve all`, which hosts several roles' services).
    pub fn extend(&mut self, other: Services) -> &mut Self {
        self.adders.extend(other.adders);
        self.health_names.extend(other.health_names);
        self
    }
}

/// What a role's services get from the runtime.
#[derive(Clone)]
pub struct ServiceContext {
    /// The process's metrics registry.
    pub metrics: Metrics,
    /// The process's flags.
    pub config: Arc<ServeConfig>,
    /// The role (`all`, `blob`, `peer`, `events`).
    pub role: String,
    /// The node's stable id.
    pub node_id: String,
    /// The bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// The SystemService implementation, for services that answer system calls too.
    pub system: SystemApi,
    /// The auth layer's decision maker (the blob service installs its API key store here).
    pub authorizer: Arc<crate::auth::Authorizer>,
    tls: Option<TlsFiles>,
    tls_state: Option<Arc<ReloadableServerConfig>>,
    draining: watch::Receiver<bool>,
}

impl ServiceContext {
    /// A channel to another PeerVault service at `endpoint`, with mutual TLS unless `--insecure`.
    /// `flag` names where the endpoint came from, for error messages.
    /// Every connection the channel opens uses the certificates current at that moment.
    pub fn channel(&self, flag: &'static str, endpoint: &str) -> Result<ServiceChannel, ClientError> {
        service_channel(flag, endpoint, self.tls_state.as_ref(), Duration::from_secs(5))
    }

    /// As [`ServiceContext::channel`], dialling `addr` and verifying the server's certificate
    /// against `domain` (the name `addr` was resolved from).
    pub fn channel_to(
        &self,
        flag: &'static str,
        addr: SocketAddr,
        domain: &str,
    ) -> Result<ServiceChannel, ClientError> {
        crate::client::service_channel_to(flag, addr, domain, self.tls_state.as_ref(), Duration::from_secs(5))
    }

    /// The process's reloadable TLS state (None with `--insecure`), for services that run their
    /// own TLS listeners (the events WebSocket port).
    pub fn tls_state(&self) -> Option<&Arc<ReloadableServerConfig>> {
        self.tls_state.as_ref()
    }

    /// Completes when the process starts to shut down (SIGTERM/SIGINT): background tasks and
    /// long-lived streams should finish up then.
    pub async fn draining(&self) {
        let mut rx = self.draining.clone();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// The TLS files this process uses (None with `--insecure`), for services that run their
    /// own listeners.
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// This process's own gRPC address as other code in it should dial it (`serve all` calls
    /// itself for forwarded calls).
    pub fn self_endpoint(&self) -> String {
        let ip = if self.grpc_addr.ip().is_unspecified() {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            self.grpc_addr.ip()
        };
        SocketAddr::new(ip, self.grpc_addr.port()).to_string()
    }
}

/// A started process: telemetry on, TLS loaded, ports bound, not yet serving.
pub struct Runtime {
    ctx: ServiceContext,
    shutdown_tx: watch::Sender<bool>,
    grpc_listener: TcpListener,
    admin_listener: TcpListener,
    admin_addr: SocketAddr,
    tls: Option<Arc<ReloadableServerConfig>>,
    ready: Arc<AtomicBool>,
    health: HealthReporter,
    telemetry: Telemetry,
    started: Instant,
}

/// Binds `addr` for `flag` and returns the listener with the address actually bound (port 0
/// picks a free one).
async fn bind(flag: &'static str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let failed = |source: io::Error| {
        let hint = match source.kind() {
            io::ErrorKind::AddrInUse => {
                " (another process uses this port: stop it or choose another port; port 0 picks a free one)"
            }
            io::ErrorKind::AddrNotAvailable => {
                " (this machine has no such address: use 0.0.0.0 or one of its addresses)"
            }
            io::ErrorKind::PermissionDenied => " (ports below 1024 need privileges: choose a higher port)",
            _ => "",
        };
        StartError::Bind {
            flag,
            addr,
            source,
            hint,
        }
    };
    let listener = TcpListener::bind(addr).await.map_err(failed)?;
    let bound = listener.local_addr().map_err(failed)?;
    Ok((listener, bound))
}

impl Runtime {
    /// Sets up logging and tracing, loads or creates TLS material, and binds the gRPC and admin
    /// ports. Every failure names the flag or file at fault.
    pub async fn start(config: ServeConfig, role: &str) -> Result<Runtime, StartError> {
        let started = Instant::now();
        let telemetry = crate::telemetry::init(&config.log, config.log_format, role).map_err(StartError::Telemetry)?;
        // Both ring and aws-lc could be compiled in by some dependency; pick one explicitly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let metrics = Metrics::new(role, env!("CARGO_PKG_VERSION"))?;

        let tls_files = if config.insecure {
            if config.tls_cert.is_some() || config.tls_client_ca.is_some() {
                return Err(StartError::Config(
                    "--insecure cannot be combined with --tls-cert/--tls-client-ca: choose one".into(),
                ));
            }
            tracing::warn!(
                "--insecure: serving plaintext gRPC; every caller is trusted. Never use this outside a laptop"
            );
            None
        } else {
            let files = match (&config.tls_cert, &config.tls_key, &config.tls_client_ca) {
                (Some(cert), Some(key), Some(ca)) => TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: ca.clone(),
                },
                (Some(_), Some(_), None) => {
                    return Err(StartError::Config(
                        "--tls-client-ca is required with --tls-cert: name the CA bundle that client and service certificates chain to".into(),
                    ));
                }
                (None, None, Some(_)) => {
                    return Err(StartError::Config(
                        "--tls-client-ca was given without --tls-cert/--tls-key: give all three, or none for development certificates".into(),
                    ));
                }
                _ => ensure_dev_certs(&config.data_dir.join("tls"), &config.trust_domain)?,
            };
            Some(files)
        };
        let tls = match &tls_files {
            Some(f) => Some(ReloadableServerConfig::load(f.clone(), config.tls_client_auth)?),
            None => None,
        };
        let (grpc_listener, grpc_addr) = bind("--grpc-listen", config.grpc_listen).await?;
        let (admin_listener, admin_addr) = bind("--admin-listen", config.admin_listen).await?;
        let ready = Arc::new(AtomicBool::new(false));
        let (health, _) = tonic_health::server::health_reporter();
        // The overall status starts NOT_SERVING; it flips once every service is registered.
        health.set_service_status("", ServingStatus::NotServing).await;
        let node_id = config.node_id();
        let (shutdown_tx, draining) = watch::channel(false);
        let scopes = match &config.auth_config {
            Some(p) => crate::auth::ScopeConfig::load(p, &config.trust_domain).map_err(StartError::Config)?,
            None => crate::auth::ScopeConfig::defaults(&config.trust_domain),
        };
        let jwt = crate::auth::jwt::JwtVerifier::from_flags(
            config.jwt_hs256_secret_file.as_deref(),
            config.jwt_jwks_file.as_deref(),
            config.jwt_issuer.clone(),
            config.jwt_audience.clone(),
            config.jwt_allow_any_audience,
        )
        .map_err(StartError::Config)?;
        let authorizer = Arc::new(
            crate::auth::Authorizer::new(config.trust_domain.clone(), scopes, jwt).with_metrics(metrics.clone()),
        );
        let system = SystemApi::new(
            metrics.clone(),
            role.to_string(),
            node_id.clone(),
            SystemTime::now(),
            health.clone(),
            ready.clone(),
        );
        if let Some(ep) = &config.auth_endpoint {
            // A blob node answers for API keys here; `serve blob`/`all` install their own store
            // over this.
            let ch = service_channel("--auth-endpoint", ep, tls.as_ref(), Duration::from_secs(5))?;
            let remote = crate::auth::remote::RemoteKeys::new(ch, config.auth_cache_ttl);
            authorizer.set_api_key_verifier(Arc::new(crate::auth::remote::CachedRemoteKeys(remote)));
            tracing::info!(endpoint = %ep, ttl_secs = config.auth_cache_ttl.as_secs_f64(), "API keys are verified by the blob node at --auth-endpoint");
        }
        let ctx = ServiceContext {
            metrics,
            config: Arc::new(config),
            role: role.to_string(),
            node_id,
            grpc_addr,
            system,
            authorizer,
            tls: tls_files,
            tls_state: tls.clone(),
            draining,
        };
        Ok(Runtime {
            ctx,
            shutdown_tx,
            grpc_listener,
            admin_listener,
            admin_addr,
            tls,
            ready,
            health,
            telemetry,
            started,
        })
    }

    /// What the role's services need from the runtime.
    pub fn context(&self) -> &ServiceContext {
        &self.ctx
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.ctx.grpc_addr
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Serves `services` (plus SystemService, health and reflection) until SIGTERM/SIGINT, then
    /// drains in-flight calls for up to `--shutdown-grace`.
    pub async fn serve(self, services: Services) -> Result<(), StartError> {
        let signal = async {
            shutdown_signal().await;
        };
        self.serve_until(services, signal).await
    }

    /// As [`Runtime::serve`], stopping when `signal` completes.
    pub async fn serve_until(self, mut services: Services, signal: impl Future<Output = ()>) -> Result<(), StartError> {
        let Runtime {
            ctx,
            shutdown_tx,
            grpc_listener,
            admin_listener,
            admin_addr,
            tls,
            ready,
            health,
            telemetry,
            started,
        } = self;
        let cfg = ctx.config.clone();
        let max_msg = cfg.max_message_size as usize;
        services.add(crate::configure_service!(
            peervault_proto::v1::system_service_server::SystemServiceServer::new(ctx.system.clone()),
            max_msg
        ));
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(peervault_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| StartError::Config(format!("reflection: {e}")))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(peervault_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| StartError::Config(format!("reflection: {e}")))?;
        let health_names = services.health_names.clone();
        for name in &health_names {
            health.set_service_status(name, ServingStatus::NotServing).await;
        }
        let mut routes = RoutesBuilder::default();
        for add in services.adders {
            add(&mut routes);
        }
        routes
            .add_service(tonic_health::pb::health_server::HealthServer::from_arc(Arc::new(
                tonic_health::server::HealthService::from_health_reporter(health.clone()),
            )))
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);

        // `draining` stops accepting and lets tonic drain; `stopped` ends the admin port and the
        // certificate watcher afterwards, so probes see /readyz 503 throughout the drain.
        let shutdown_rx = shutdown_tx.subscribe();
        let (stopped_tx, stopped_rx) = watch::channel(false);

        // The layer stack, outermost first. Order matters:
        let layers = tower::ServiceBuilder::new()
            // 0. compatibility: clients generated from the published `peervault` package call
            //    `/peervault.PeerVaultService/…`; the same messages are served under `peervault.v1`;
            .map_request(legacy_package_path)
            // 1. tracing: a span per call continuing the caller's trace, so every later layer's
            //    logs (auth refusals included) carry the trace id;
            .layer(ServerTraceLayer)
            // 2. metrics: count every call, refused ones too, with its final status code;
            .layer(GrpcMetricsLayer::new(ctx.metrics.clone()))
            // 3. auth: establish the caller from the TLS connection and enforce the access table
            //    before any handler runs.
            .layer(AuthLayer::new(ctx.authorizer.clone(), ctx.metrics.clone()));
        let server = tonic::transport::Server::builder()
            // Per-connection stream cap bounds the work one client can queue.
            .max_concurrent_streams(cfg.max_concurrent_streams)
            // Keepalive pings detect dead peers behind NATs and load balancers.
            .http2_keepalive_interval(Some(cfg.keepalive_interval))
            .http2_keepalive_timeout(Some(cfg.keepalive_timeout))
            // Small unary calls must not wait for Nagle.
            .tcp_nodelay(true)
            // Large windows let one stream fill a fast link without a round trip per 64 KiB.
            .initial_stream_window_size(Some(4 * 1024 * 1024))
            .initial_connection_window_size(Some(8 * 1024 * 1024))
            .layer(layers)
            .add_routes(routes.routes());

        // Accepting runs in its own task so a slow TLS handshake never delays another client.
        let (conn_tx, conn_rx) = mpsc::channel::<io::Result<Conn>>(64);
        tokio::spawn(accept_loop(
            grpc_listener,
            tls.clone(),
            AcceptLimits {
                max_connections: cfg.max_connections as usize,
                handshake_timeout: cfg.tls_handshake_timeout,
            },
            ctx.metrics.clone(),
            conn_tx,
            shutdown_rx.clone(),
        ));
        let admin = tokio::spawn(crate::admin::serve(
            admin_listener,
            ctx.metrics.clone(),
            ready.clone(),
            cfg.admin_read_timeout,
            stopped_rx.clone(),
        ));
        if let Some(tls) = &tls {
            tokio::spawn(
                tls.clone()
                    .watch(cfg.tls_reload_interval, ctx.metrics.clone(), stopped_rx.clone()),
            );
        }

        let incoming = tokio_stream::wrappers::ReceiverStream::new(conn_rx);
        let mut stop_rx = shutdown_rx.clone();
        let serve = server.serve_with_incoming_shutdown(incoming, async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        });
        tokio::pin!(serve);

        for name in &health_names {
            health.set_service_status(name, ServingStatus::Serving).await;
        }
        health.set_service_status("", ServingStatus::Serving).await;
        ready.store(true, Ordering::Release);
        ctx.metrics.ready.set(1);
        tracing::info!(
            role = %ctx.role,
            node_id = %ctx.node_id,
            grpc_addr = %ctx.grpc_addr,
            admin_addr = %admin_addr,
            tls = tls.is_some(),
            services = ?health_names,
            startup_ms = started.elapsed().as_millis() as u64,
            "peervault ready"
        );

        tokio::pin!(signal);
        let result = tokio::select! {
            r = &mut serve => r,
            _ = &mut signal => {
                // Readiness drops before the log line says so: whoever reads the line (a test,
                // an operator) finds /readyz answering 503 already.
                ready.store(false, Ordering::Release);
                ctx.metrics.ready.set(0);
                tracing::info!(grace_secs = cfg.shutdown_grace.as_secs_f64(), "shutdown requested: refusing new connections, draining in-flight calls");
                for name in &health_names {
                    health.set_service_status(name, ServingStatus::NotServing).await;
                }
                health.set_service_status("", ServingStatus::NotServing).await;
                let _ = shutdown_tx.send(true);
                match tokio::time::timeout(cfg.shutdown_grace, &mut serve).await {
                    Ok(r) => {
                        tracing::info!("all calls drained");
                        r
                    }
                    Err(_) => {
                        tracing::warn!(grace_secs = cfg.shutdown_grace.as_secs_f64(), "grace period over: closing the remaining calls");
                        Ok(())
                    }
                }
            }
        };
        let _ = shutdown_tx.send(true);
        let _ = stopped_tx.send(true);
        let _ = admin.await;
        telemetry.shutdown().await;
        result.map_err(StartError::Serve)
    }
}

/// The published PeerVault API lives in the proto package `peervault`; ours is `peervault.v1`
/// with the same messages and field numbers. Rewriting the path lets existing clients work.
fn legacy_package_path<B>(mut req: http::Request<B>) -> http::Request<B> {
    const LEGACY: &str = "/peervault.PeerVaultService/";
    if let Some(method) = req.uri().path().strip_prefix(LEGACY) {
        let mut parts = req.uri().clone().into_parts();
        if let Ok(pq) = http::uri::PathAndQuery::try_from(format!("/peervault.v1.PeerVaultService/{method}")) {
            parts.path_and_query = Some(pq);
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
    req
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                tracing::error!("cannot install signal handlers; stop the process with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Connection-level limits of the gRPC port.
struct AcceptLimits {
    /// Open connections (handshaking ones included); beyond, new ones are closed at once.
    max_connections: usize,
    /// A client that stalls mid-handshake loses its slot after this.
    handshake_timeout: Duration,
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<ReloadableServerConfig>>,
    limits: AcceptLimits,
    metrics: Metrics,
    tx: mpsc::Sender<io::Result<Conn>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let handshake_timeout = limits.handshake_timeout;
    let mut last_full_log: Option<Instant> = None;
    loop {
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics
                .connections_refused
                .with_label_values(&["grpc", "max_connections"])
                .inc();
            // One line per second at most: a flood must not flood the log too.
            if last_full_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                last_full_log = Some(Instant::now());
                tracing::warn!(remote = %remote, limit = limits.max_connections, "gRPC connection refused: --max-connections reached");
            }
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let tx = tx.clone();
        let metrics = metrics.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let conn = match tls {
                None => Conn::new(ConnIo::Plain(tcp), ConnInfo::new(Some(remote), None, true), &metrics),
                Some(tls) => {
                    let acceptor = TlsAcceptor::from(tls.current());
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let certs = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect::<Vec<_>>()));
                            Conn::new(
                                ConnIo::Tls(Box::new(stream)),
                                ConnInfo::new(Some(remote), certs, false),
                                &metrics,
                            )
                        }
                        Ok(Err(e)) => {
                            let reason = handshake_reason(&e);
                            metrics.tls_handshake_failures.with_label_values(&[reason]).inc();
                            tracing::info!(remote = %remote, reason, error = %e, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            metrics.tls_handshake_failures.with_label_values(&["timeout"]).inc();
                            metrics
                                .connections_refused
                                .with_label_values(&["grpc", "handshake_timeout"])
                                .inc();
                            tracing::info!(remote = %remote, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            let _ = tx.send(Ok(conn.with_slot(slot))).await;
        });
    }
}

/// A bounded label for a failed handshake.
fn handshake_reason(e: &io::Error) -> &'static str {
    let msg = e.to_string();
    if msg.contains("peer sent no certificates") || msg.contains("NoCertificatesPresented") {
        "no_client_certificate"
    } else if msg.contains("UnknownIssuer") || msg.contains("invalid peer certificate") || msg.contains("BadSignature")
    {
        "untrusted_client_certificate"
    } else if msg.contains("Expired") || msg.contains("NotValidYet") {
        "certificate_validity"
    } else if msg.contains("corrupt message") || msg.contains("InvalidContentType") || msg.contains("HTTP") {
        "not_tls"
    } else {
        "other"
    }
}

enum ConnIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection: the stream, what is known about its peer, and the open-connections
/// gauge held for as long as it lives.
pub struct Conn {
    io: ConnIo,
    info: ConnInfo,
    _guard: ConnGuard,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

struct ConnGuard(prometheus::IntGauge);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Conn {
    fn new(io: ConnIo, info: ConnInfo, metrics: &Metrics) -> Conn {
        metrics.connections.inc();
        metrics.connections_total.inc();
        Conn {
            io,
            info,
            _guard: ConnGuard(metrics.connections.clone()),
            _slot: None,
        }
    }

    /// The connection holding one of the listener's connection slots until it closes.
    fn with_slot(mut self, slot: tokio::sync::OwnedSemaphorePermit) -> Conn {
        self._slot = Some(slot);
        self
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            ConnIo::Plain(s) => s.is_write_vectored(),
            ConnIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
