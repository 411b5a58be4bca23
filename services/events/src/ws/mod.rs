//! The PeerVault WebSocket gateway: `/ws` (the published WebSocket API) and `/ws/health`,
//! `/ws/metrics`, `/ws/status` on the events HTTP port.
//!
//! The port speaks TLS with the process's reloadable certificates (plaintext only with
//! `--insecure`). Per connection: an origin check before the upgrade; a connection slot, globally
//! and per client address (refused with CONNECTION_REFUSED beyond either limit); authentication
//! through a [`TokenValidator`] — a verified client certificate, or a token (`?token=`,
//! `Authorization: Bearer`, or an `auth` message within the read timeout; AUTH_FAILED
//! otherwise) — unless anonymous access was asked for; the caller's key prefix narrows its file
//! events; a revoked or expired credential closes the connection (1008) within seconds; a
//! message size limit (INVALID_MESSAGE, then close 1009); a rate limit (RATE_LIMIT_EXCEEDED with
//! `retryAfter`, the message dropped, the connection kept); pings every
//! ping period and a close after the pong wait without a word from the client; a write timeout
//! that closes a client that does not read. Memory per connection is bounded: the subscription
//! reads the shared broadcast ring and writes are bounded by the write buffer and the timeout.

pub mod auth;
pub mod protocol;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Extension, Json, Router,
    extract::{
        Query, State,
        ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade},
    },
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use futures_util::SinkExt;
use peervault_runtime::{Caller, Identity, auth::ScopeSet, identity::ConnInfo, tls::ReloadableTls};
use serde_json::json;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::watch,
};

use crate::{
    core::EventsCore,
    error::EventsError,
    hub::{Delivery, Filter, Subscription},
    settings::WsSettings,
    topics::{TOPICS, TopicSet},
};
use protocol::ClientMessage;

/// Authenticates WebSocket clients. The binary plugs in the runtime's authorizer
/// ([`auth::RuntimeAuth`]: the same API keys, JWTs and certificates as gRPC).
pub trait TokenValidator: Send + Sync + 'static {
    /// The caller a token stands for (its key prefix included), or why it is refused. Async: the
    /// key may have to be verified by a blob node.
    fn validate<'a>(&'a self, token: &'a str) -> futures_util::future::BoxFuture<'a, Result<Caller, String>>;

    /// The caller a connection's verified client certificate stands for; `None` when the
    /// connection presented none.
    fn certificate(&self, _conn: &ConnInfo) -> Option<Result<Caller, String>> {
        None
    }

    /// Err once the caller's credential has been revoked or has expired.
    fn revalidate(&self, _caller: &Caller) -> Result<(), String> {
        Ok(())
    }
}

/// The caller of a connection admitted without credentials (`--ws-allow-anonymous`).
fn anonymous(remote: SocketAddr) -> Caller {
    Caller {
        identity: Identity::Anonymous,
        remote_addr: Some(remote),
        scopes: ScopeSet::of(&[peervault_runtime::auth::Scope::Read]),
        key_prefix: None,
        valid_until: None,
    }
}

/// Whether a caller's credential can lapse (and so is checked again while it is connected).
fn lapses(c: &Caller) -> bool {
    c.valid_until.is_some() || matches!(c.identity, Identity::ApiKey { .. })
}

/// Close codes of RFC 6455 the gateway uses.
mod close {
    pub const AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const SIZE: u16 = 1009;
    pub const AGAIN: u16 = 1013;
}

/// Most queued deliveries written in one batch before a flush.
const WRITE_BATCH: usize = 64;

/// The client's address and TLS facts, inserted per connection by the server loop.
#[derive(Debug, Clone)]
struct Remote(SocketAddr, ConnInfo);

struct GatewayState {
    core: EventsCore,
    ws: WsSettings,
    validator: Arc<dyn TokenValidator>,
    connections: AtomicUsize,
    per_address: Mutex<HashMap<IpAddr, usize>>,
    next_client: AtomicU64,
    received: AtomicU64,
    sent: AtomicU64,
    subscriptions: [AtomicUsize; 4],
    started: Instant,
    shutdown: watch::Receiver<bool>,
}

/// The gateway. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    st: Arc<GatewayState>,
}

impl Gateway {
    /// A gateway over `core` with `ws` settings; `shutdown` turning true closes every connection
    /// with 1001 (going away).
    pub fn new(
        core: EventsCore,
        ws: WsSettings,
        validator: Arc<dyn TokenValidator>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Gateway {
            st: Arc::new(GatewayState {
                core,
                ws,
                validator,
                connections: AtomicUsize::new(0),
                per_address: Mutex::new(HashMap::new()),
                next_client: AtomicU64::new(1),
                received: AtomicU64::new(0),
                sent: AtomicU64::new(0),
                subscriptions: Default::default(),
                started: Instant::now(),
                shutdown,
            }),
        }
    }

    /// Open WebSocket connections.
    pub fn connections(&self) -> usize {
        self.st.connections.load(Ordering::Relaxed)
    }

    fn router(&self) -> Router {
        Router::new()
            .route("/ws", get(upgrade))
            .route("/ws/health", get(health))
            .route("/ws/metrics", get(ws_metrics))
            .route("/ws/status", get(status))
            .with_state(self.st.clone())
    }

    /// Serves HTTP/1.1 on `listener` until `shutdown` turns true: over TLS with the current
    /// certificates of `tls` (each connection takes the config in force when it arrives), or
    /// plaintext when `tls` is `None` (`--insecure`). The TLS handshake and the request head must
    /// arrive within the read timeout (slow-loris clients are cut off).
    pub async fn serve(self, listener: TcpListener, tls: Option<Arc<ReloadableTls>>) {
        let router = self.router();
        let mut shutdown = self.st.shutdown.clone();
        let read_timeout = self.st.ws.read_timeout;
        loop {
            let (tcp, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning.
                        tracing::warn!(error = %e, "events HTTP accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stopped(&mut shutdown) => break,
            };
            let _ = tcp.set_nodelay(true);
            let router = router.clone();
            let stop = self.st.shutdown.clone();
            let st = self.st.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let Some(tls) = tls else {
                    let info = ConnInfo::new(Some(remote), None, true);
                    return serve_http(tcp, router, Remote(remote, info), read_timeout, stop).await;
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.http_current());
                match tokio::time::timeout(read_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let certs = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect::<Vec<_>>()));
                        let info = ConnInfo::new(Some(remote), certs, false);
                        serve_http(stream, router, Remote(remote, info), read_timeout, stop).await
                    }
                    Ok(Err(e)) => {
                        st.core
                            .hub
                            .metrics()
                            .ws_rejects
                            .with_label_values(&["tls_handshake"])
                            .inc();
                        tracing::info!(remote = %remote, error = %e, "events HTTP TLS handshake refused");
                    }
                    Err(_) => {
                        st.core
                            .hub
                            .metrics()
                            .ws_rejects
                            .with_label_values(&["tls_handshake"])
                            .inc();
                        tracing::info!(remote = %remote, "events HTTP TLS handshake timed out");
                    }
                }
            });
        }
        tracing::info!("events HTTP port closed");
    }
}

/// Serves one HTTP/1.1 connection (with upgrades) until it ends or the gateway stops.
async fn serve_http<I>(io: I, router: Router, remote: Remote, read_timeout: Duration, mut stop: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    let addr = remote.0;
    let svc = hyper_util::service::TowerToHyperService::new(router.layer(Extension(remote)));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(remote = %addr, error = %e, "events HTTP connection ended");
            }
        }
        _ = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

/// Completes once `rx` turns true (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn reject(st: &GatewayState, status: StatusCode, e: &EventsError) -> Response {
    let m = &st.core.hub.metrics();
    m.ws_rejects.with_label_values(&[e.metric_label()]).inc();
    m.ws_errors.with_label_values(&[e.ws_code()]).inc();
    (status, Json(e.ws_message())).into_response()
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_string())
}

/// Holds one connection slot (global and of its client address); frees both when the
/// connection ends.
struct Slot(Arc<GatewayState>, IpAddr);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
        self.0.core.hub.metrics().ws_connections.dec();
        let mut per = self.0.per_address.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per.remove(&self.1);
            }
        }
    }
}

/// Takes a slot for a connection from `ip`, or says which limit is reached.
fn take_slot(st: &Arc<GatewayState>, ip: IpAddr) -> Result<Slot, EventsError> {
    let max = st.ws.max_connections;
    let per_max = st.ws.max_connections_per_address;
    let mut per = st.per_address.lock().unwrap_or_else(|p| p.into_inner());
    let mine = per.get(&ip).copied().unwrap_or(0);
    if mine >= per_max {
        return Err(EventsError::TooManyConnectionsFromAddress { limit: per_max });
    }
    if st
        .connections
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
        .is_err()
    {
        return Err(EventsError::TooManyConnections { limit: max });
    }
    per.insert(ip, mine + 1);
    drop(per);
    st.core.hub.metrics().ws_connections.inc();
    Ok(Slot(st.clone(), ip))
}

/// What the handshake decided before the socket exists.
enum Admission {
    Accept { caller: Option<Caller>, slot: Slot },
    Refuse(EventsError, u16),
}

async fn upgrade(
    State(st): State<Arc<GatewayState>>,
    Extension(Remote(remote, conn)): Extension<Remote>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if !st.ws.origins.allows(origin, host) {
        let e = EventsError::OriginNotAllowed(origin.unwrap_or_default().chars().take(200).collect());
        tracing::info!(remote = %remote, origin = origin.unwrap_or_default(), "WebSocket origin refused");
        return reject(&st, StatusCode::FORBIDDEN, &e);
    }
    if *st.shutdown.borrow() {
        return reject(&st, StatusCode::SERVICE_UNAVAILABLE, &EventsError::ShuttingDown);
    }
    let admission = match take_slot(&st, remote.ip()) {
        Err(e) => Admission::Refuse(e, close::AGAIN),
        Ok(slot) => {
            let token = query.get("token").cloned().or_else(|| bearer(&headers));
            let who = match token {
                Some(t) => st.validator.validate(&t).await.map(Some),
                None => st.validator.certificate(&conn).transpose(),
            };
            match who {
                Ok(Some(caller)) => {
                    tracing::debug!(remote = %remote, identity = %caller.identity, "WebSocket client authenticated");
                    Admission::Accept {
                        caller: Some(caller),
                        slot,
                    }
                }
                Ok(None) if st.ws.allow_anonymous => Admission::Accept {
                    caller: Some(anonymous(remote)),
                    slot,
                },
                // No credential yet: an `auth` message must come within the read timeout.
                Ok(None) => Admission::Accept { caller: None, slot },
                Err(reason) => {
                    st.core.auth_failure(&remote.ip().to_string());
                    drop(slot);
                    Admission::Refuse(EventsError::AuthFailed(reason), close::POLICY)
                }
            }
        }
    };
    let max_msg = st.ws.max_message_size;
    let ws = ws
        .max_message_size(max_msg)
        .max_frame_size(max_msg)
        // Small buffers that grow on demand keep a thousand idle clients cheap.
        .read_buffer_size(8 * 1024)
        .write_buffer_size(16 * 1024)
        // A client that does not read cannot make the server buffer more than this.
        .max_write_buffer_size(1024 * 1024 + max_msg.min(4 * 1024 * 1024));
    ws.on_upgrade(move |socket| async move {
        match admission {
            Admission::Refuse(e, code) => refuse(socket, &st, e, code, remote).await,
            Admission::Accept { caller, slot } => {
                let m = st.core.hub.metrics();
                m.ws_connections_total.inc();
                Connection::new(st.clone(), remote, caller).run(socket).await;
                drop(slot);
            }
        }
    })
}

/// Sends the error, then closes with `code`.
async fn refuse(mut socket: WebSocket, st: &GatewayState, e: EventsError, code: u16, remote: SocketAddr) {
    let m = st.core.hub.metrics();
    m.ws_rejects.with_label_values(&[e.metric_label()]).inc();
    m.ws_errors.with_label_values(&[e.ws_code()]).inc();
    tracing::info!(remote = %remote, code = e.ws_code(), error = %e, "WebSocket connection refused");
    let t = st.ws.write_timeout;
    let _ = tokio::time::timeout(t, socket.send(Message::Text(protocol::error(&e).into()))).await;
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from(e.ws_code()),
    };
    let _ = tokio::time::timeout(t, socket.send(Message::Close(Some(frame)))).await;
}

/// Whether a receive error is the size limit.
fn is_too_large(e: &axum::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = src {
        if let Some(tungstenite::Error::Capacity(_)) = err.downcast_ref::<tungstenite::Error>() {
            return true;
        }
        src = err.source();
    }
    false
}

/// The per-second message budget of one client.
struct Rate {
    window: Instant,
    count: u32,
    warned: bool,
}

impl Rate {
    /// Ok, or Err(Some(retry_after)) the first time in a window, Err(None) after that.
    fn check(&mut self, limit: u32) -> Result<(), Option<u64>> {
        let now = Instant::now();
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.count = 0;
            self.warned = false;
        }
        self.count += 1;
        if self.count <= limit {
            return Ok(());
        }
        if self.warned {
            return Err(None);
        }
        self.warned = true;
        let left = Duration::from_secs(1).saturating_sub(now.duration_since(self.window));
        Err(Some(left.as_secs_f64().ceil().max(1.0) as u64))
    }
}

/// Why a connection loop ends.
enum End {
    Closed,
    Close(u16, &'static str),
}

struct Connection {
    st: Arc<GatewayState>,
    remote: SocketAddr,
    client_id: String,
    /// Who is connected; `None` until an `auth` message succeeds.
    caller: Option<Caller>,
    topics: TopicSet,
    sub: Option<Subscription>,
    rate: Rate,
}

async fn next_delivery(sub: &mut Option<Subscription>) -> Option<Delivery> {
    match sub {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

impl Connection {
    fn new(st: Arc<GatewayState>, remote: SocketAddr, caller: Option<Caller>) -> Self {
        let n = st.next_client.fetch_add(1, Ordering::Relaxed);
        Connection {
            client_id: format!("{}-{n}", st.core.hub.node()),
            st,
            remote,
            caller,
            topics: TopicSet::EMPTY,
            sub: None,
            rate: Rate {
                window: Instant::now(),
                count: 0,
                warned: false,
            },
        }
    }

    async fn send(&self, socket: &mut WebSocket, text: Utf8Bytes) -> Result<(), End> {
        match tokio::time::timeout(self.st.ws.write_timeout, socket.send(Message::Text(text))).await {
            Ok(Ok(())) => {
                self.st.sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(Err(_)) => Err(End::Closed),
            Err(_) => {
                self.st
                    .core
                    .hub
                    .metrics()
                    .ws_rejects
                    .with_label_values(&["write_timeout"])
                    .inc();
                tracing::info!(remote = %self.remote, client = %self.client_id, "WebSocket client does not read: closing");
                Err(End::Closed)
            }
        }
    }

    async fn send_error(&self, socket: &mut WebSocket, e: &EventsError) -> Result<(), End> {
        self.st
            .core
            .hub
            .metrics()
            .ws_errors
            .with_label_values(&[e.ws_code()])
            .inc();
        self.send(socket, protocol::error(e).into()).await
    }

    /// Writes a delivery and whatever else is ready (up to a batch), then flushes once.
    async fn deliver(&mut self, socket: &mut WebSocket, first: Delivery) -> Result<(), End> {
        let Some(sub) = &mut self.sub else { return Ok(()) };
        let write = async {
            let mut next = Some(first);
            let mut n = 0;
            while let Some(d) = next {
                let msg = match &d {
                    // The rendering is made from a String, so it is always UTF-8.
                    Delivery::Event(e) => Utf8Bytes::try_from(e.ws_text().clone()).ok(),
                    Delivery::Lagged(missed) => Some(Utf8Bytes::from(protocol::lagged(*missed))),
                    // WebSocket subscriptions never resume, so never replay.
                    Delivery::ReplayStart(_) => None,
                };
                if let Some(msg) = msg {
                    socket.feed(Message::Text(msg)).await?;
                    if let Delivery::Event(e) = &d {
                        sub.record_delivery(e);
                    }
                    n += 1;
                }
                next = if n < WRITE_BATCH { sub.try_next() } else { None };
            }
            socket.flush().await?;
            Ok::<usize, axum::Error>(n)
        };
        match tokio::time::timeout(self.st.ws.write_timeout, write).await {
            Ok(Ok(n)) => {
                self.st.sent.fetch_add(n as u64, Ordering::Relaxed);
                Ok(())
            }
            Ok(Err(_)) => Err(End::Closed),
            Err(_) => {
                self.st
                    .core
                    .hub
                    .metrics()
                    .ws_rejects
                    .with_label_values(&["write_timeout"])
                    .inc();
                tracing::info!(remote = %self.remote, client = %self.client_id, "WebSocket client does not read: closing");
                Err(End::Closed)
            }
        }
    }

    fn set_topics(&mut self, topics: TopicSet) -> Result<(), EventsError> {
        for t in TOPICS {
            match (self.topics.contains(t), topics.contains(t)) {
                (false, true) => self.st.subscriptions[t as usize].fetch_add(1, Ordering::Relaxed),
                (true, false) => self.st.subscriptions[t as usize].fetch_sub(1, Ordering::Relaxed),
                _ => 0,
            };
        }
        self.topics = topics;
        if topics.is_empty() {
            self.sub = None;
        } else if let Some(s) = &mut self.sub {
            s.set_topics(topics);
        } else {
            // The confinement rule: a caller limited to a key prefix sees only its file events.
            let filter =
                Filter::topics(topics).limited_to(peervault_runtime::auth::confine::event_prefix(self.caller.as_ref()));
            self.sub = Some(self.st.core.hub.subscribe(filter, None, "websocket")?);
        }
        Ok(())
    }

    fn topic_names(&self) -> Vec<&'static str> {
        self.topics.iter().map(|t| t.as_str()).collect()
    }

    async fn on_text(&mut self, socket: &mut WebSocket, text: &str) -> Result<(), End> {
        let m = self.st.core.hub.metrics();
        let msg = match protocol::parse(text, self.st.ws.max_message_size) {
            Ok(msg) => msg,
            Err(e) => {
                m.ws_received.with_label_values(&["invalid"]).inc();
                return self.send_error(socket, &e).await;
            }
        };
        m.ws_received.with_label_values(&[msg.kind()]).inc();
        if self.caller.is_none() && !matches!(msg, ClientMessage::Auth(_)) {
            return self.send_error(socket, &EventsError::AuthRequired("")).await;
        }
        match msg {
            ClientMessage::Subscribe(t) | ClientMessage::Unsubscribe(t) => {
                let subscribe = matches!(msg, ClientMessage::Subscribe(_));
                let mut topics = self.topics;
                if subscribe {
                    topics.insert(t);
                } else {
                    topics.remove(t);
                }
                if let Err(e) = self.set_topics(topics) {
                    let _ = self.send_error(socket, &e).await;
                    return Err(End::Close(close::AWAY, "server shutting down"));
                }
                let kind = if subscribe { "subscribed" } else { "unsubscribed" };
                let text = protocol::confirm(kind, t, &self.client_id, &self.topic_names());
                self.send(socket, text.into()).await
            }
            ClientMessage::Auth(token) => match self.st.validator.validate(&token).await {
                Ok(caller) => {
                    tracing::debug!(remote = %self.remote, identity = %caller.identity, "WebSocket client authenticated");
                    let prefix = caller.key_prefix.clone();
                    self.caller = Some(caller);
                    // A subscription made under another credential follows the new one.
                    if let Some(s) = &mut self.sub {
                        s.set_key_prefix(prefix);
                    }
                    self.send(socket, protocol::authenticated(&self.client_id).into()).await
                }
                Err(reason) => {
                    self.st.core.auth_failure(&self.remote.ip().to_string());
                    let e = EventsError::AuthFailed(reason);
                    m.ws_rejects.with_label_values(&[e.metric_label()]).inc();
                    self.send_error(socket, &e).await?;
                    Err(End::Close(close::POLICY, "AUTH_FAILED"))
                }
            },
            ClientMessage::Ping => self.send(socket, protocol::pong(&self.client_id).into()).await,
        }
    }

    async fn run(mut self, mut socket: WebSocket) {
        let ws = self.st.ws.clone();
        let mut shutdown = self.st.shutdown.clone();
        tracing::debug!(remote = %self.remote, client = %self.client_id, "WebSocket connected");
        let end = self.run_loop(&mut socket, &ws, &mut shutdown).await;
        let _ = self.set_topics(TopicSet::EMPTY);
        if let End::Close(code, reason) = end {
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            };
            if let Ok(Ok(())) = tokio::time::timeout(ws.write_timeout, socket.send(Message::Close(Some(frame)))).await {
                // The closing handshake: give the client a moment to read what is pending and
                // answer the close, so it sees the code rather than a reset.
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while let Some(Ok(m)) = socket.recv().await {
                        if matches!(m, Message::Close(_)) {
                            break;
                        }
                    }
                })
                .await;
            }
        }
        tracing::debug!(remote = %self.remote, client = %self.client_id, "WebSocket closed");
    }

    async fn run_loop(&mut self, socket: &mut WebSocket, ws: &WsSettings, shutdown: &mut watch::Receiver<bool>) -> End {
        let welcome = protocol::welcome(&self.client_id, self.caller.is_none());
        if let Err(end) = self.send(socket, welcome.into()).await {
            return end;
        }
        let start = tokio::time::Instant::now();
        let mut ping = tokio::time::interval_at(start + ws.ping_period, ws.ping_period);
        let silence = tokio::time::sleep(ws.pong_wait);
        tokio::pin!(silence);
        let auth_deadline = tokio::time::sleep(ws.read_timeout);
        tokio::pin!(auth_deadline);
        let mut recheck = tokio::time::interval_at(
            start + peervault_runtime::auth::REVALIDATE_INTERVAL,
            peervault_runtime::auth::REVALIDATE_INTERVAL,
        );
        loop {
            let watched = self.caller.as_ref().is_some_and(lapses);
            let step = tokio::select! {
                _ = stopped(shutdown) => return End::Close(close::AWAY, "server shutting down"),
                msg = socket.recv() => {
                    silence.as_mut().reset(tokio::time::Instant::now() + ws.pong_wait);
                    match msg {
                        None | Some(Ok(Message::Close(_))) => return End::Closed,
                        Some(Err(e)) => {
                            if is_too_large(&e) {
                                let err = EventsError::MessageTooLarge { limit: ws.max_message_size };
                                let _ = self.send_error(socket, &err).await;
                                self.st.core.hub.metrics().ws_rejects.with_label_values(&[err.metric_label()]).inc();
                                return End::Close(close::SIZE, "message too large");
                            }
                            return End::Closed;
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(()),
                        Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                            self.st.received.fetch_add(1, Ordering::Relaxed);
                            match self.rate.check(ws.messages_per_second) {
                                Err(Some(retry_after)) => {
                                    let e = EventsError::RateLimited { retry_after };
                                    self.st.core.hub.metrics().ws_received.with_label_values(&["rate_limited"]).inc();
                                    self.send_error(socket, &e).await
                                }
                                Err(None) => {
                                    self.st.core.hub.metrics().ws_received.with_label_values(&["rate_limited"]).inc();
                                    Ok(())
                                }
                                Ok(()) => match m {
                                    Message::Text(t) => self.on_text(socket, t.as_str()).await,
                                    _ => {
                                        self.st.core.hub.metrics().ws_received.with_label_values(&["invalid"]).inc();
                                        self.send_error(socket, &EventsError::Binary).await
                                    }
                                },
                            }
                        }
                    }
                }
                d = next_delivery(&mut self.sub) => match d {
                    Some(d) => self.deliver(socket, d).await,
                    None => Err(End::Close(close::AWAY, "server shutting down")),
                },
                _ = ping.tick() => {
                    match tokio::time::timeout(ws.write_timeout, socket.send(Message::Ping(Default::default()))).await {
                        Ok(Ok(())) => Ok(()),
                        _ => Err(End::Closed),
                    }
                }
                _ = &mut silence => {
                    self.st.core.hub.metrics().ws_rejects.with_label_values(&["pong_timeout"]).inc();
                    tracing::info!(remote = %self.remote, client = %self.client_id, "WebSocket client silent past the pong wait: closing");
                    Err(End::Close(close::AWAY, "pong timeout"))
                }
                _ = recheck.tick(), if watched => {
                    match self.caller.as_ref().map(|c| self.st.validator.revalidate(c)) {
                        Some(Err(reason)) => {
                            let e = EventsError::AuthFailed(reason);
                            self.st.core.hub.metrics().ws_rejects.with_label_values(&["credential_lapsed"]).inc();
                            tracing::info!(remote = %self.remote, client = %self.client_id, error = %e, "WebSocket credential revoked or expired: closing");
                            let _ = self.send_error(socket, &e).await;
                            Err(End::Close(close::POLICY, "AUTH_FAILED"))
                        }
                        _ => Ok(()),
                    }
                }
                _ = &mut auth_deadline, if self.caller.is_none() => {
                    self.st.core.auth_failure(&self.remote.ip().to_string());
                    let e = EventsError::AuthRequired(" (the read timeout passed)");
                    self.st.core.hub.metrics().ws_rejects.with_label_values(&[e.metric_label()]).inc();
                    let _ = self.send_error(socket, &e).await;
                    Err(End::Close(close::POLICY, "AUTH_FAILED"))
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }
}

fn draining(st: &GatewayState) -> bool {
    *st.shutdown.borrow()
}

async fn health(State(st): State<Arc<GatewayState>>) -> Response {
    let (code, status) = if draining(&st) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else {
        (StatusCode::OK, "healthy")
    };
    let body = json!({
        "status": status,
        "connections": st.connections.load(Ordering::Relaxed),
        "timestamp": crate::model::rfc3339_now(),
    });
    (code, Json(body)).into_response()
}

fn counter_map(v: &prometheus::IntCounterVec, label: &str) -> serde_json::Map<String, serde_json::Value> {
    use prometheus::core::Collector;
    let mut out = serde_json::Map::new();
    for mf in v.collect() {
        for m in mf.get_metric() {
            let name = m
                .get_label()
                .iter()
                .find(|l| l.name() == label)
                .map(|l| l.value().to_string())
                .unwrap_or_default();
            out.insert(name, (m.get_counter().get_value() as u64).into());
        }
    }
    out
}

async fn ws_metrics(State(st): State<Arc<GatewayState>>) -> Json<serde_json::Value> {
    let m = st.core.hub.metrics();
    let delivered: u64 = counter_map(&m.delivered, "transport")
        .into_iter()
        .filter(|(k, _)| k == "websocket")
        .filter_map(|(_, v)| v.as_u64())
        .sum();
    Json(json!({
        "connections": st.connections.load(Ordering::Relaxed),
        "maxConnections": st.ws.max_connections,
        "connectionsTotal": m.ws_connections_total.get(),
        "messagesReceived": st.received.load(Ordering::Relaxed),
        "messagesSent": st.sent.load(Ordering::Relaxed),
        "eventsDelivered": delivered,
        "errors": counter_map(&m.ws_errors, "code"),
        "rejected": counter_map(&m.ws_rejects, "reason"),
        "timestamp": crate::model::rfc3339_now(),
    }))
}

async fn status(State(st): State<Arc<GatewayState>>) -> Json<serde_json::Value> {
    let hub = &st.core.hub;
    let subs: serde_json::Map<String, serde_json::Value> = TOPICS
        .iter()
        .map(|t| {
            (
                t.as_str().to_string(),
                st.subscriptions[*t as usize].load(Ordering::Relaxed).into(),
            )
        })
        .collect();
    let ws = &st.ws;
    Json(json!({
        "status": if draining(&st) { "draining" } else { "running" },
        "node": hub.node(),
        "uptimeSeconds": st.started.elapsed().as_secs(),
        "connections": st.connections.load(Ordering::Relaxed),
        "subscriptions": subs,
        "authRequired": !st.ws.allow_anonymous,
        "maxConnectionsPerAddress": st.ws.max_connections_per_address,
        "lastSequence": hub.last_sequence(),
        "firstAvailableSequence": hub.first_available(),
        "buffered": hub.buffered(),
        "replayBuffer": hub.config().replay_capacity,
        "subscriberQueue": hub.config().subscriber_queue,
        "limits": {
            "maxConnections": ws.max_connections,
            "maxMessageSize": ws.max_message_size,
            "messagesPerSecond": ws.messages_per_second,
        },
        "timeouts": {
            "read": humantime::format_duration(ws.read_timeout).to_string(),
            "write": humantime::format_duration(ws.write_timeout).to_string(),
            "pingPeriod": humantime::format_duration(ws.ping_period).to_string(),
            "pongWait": humantime::format_duration(ws.pong_wait).to_string(),
        },
        "timestamp": crate::model::rfc3339_now(),
    }))
}
