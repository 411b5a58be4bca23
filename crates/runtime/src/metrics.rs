//! Prometheus metrics: one registry per process, every metric name listed once in [`names`], and
//! the tower layer that records the conventional gRPC server metrics.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Buf;
use http::{Request, Response};
use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tower_layer::Layer;
use tower_service::Service;

/// The runtime's metric names (every process exports them). The one list of every name the
/// services export is the union of this and each crate's `names::ALL`, built in the binary
/// (`src/metric_names.rs`, printed by `peervault metrics names`); dashboards and alert rules
/// use only names from it.
pub mod names {
    /// RPCs started on the server.
    pub const GRPC_SERVER_STARTED_TOTAL: &str = "grpc_server_started_total";
    /// RPCs completed on the server, by status code.
    pub const GRPC_SERVER_HANDLED_TOTAL: &str = "grpc_server_handled_total";
    /// Time from the request's arrival to the end of the response, in seconds.
    pub const GRPC_SERVER_HANDLING_SECONDS: &str = "grpc_server_handling_seconds";
    /// Messages received from clients.
    pub const GRPC_SERVER_MSG_RECEIVED_TOTAL: &str = "grpc_server_msg_received_total";
    /// Messages sent to clients.
    pub const GRPC_SERVER_MSG_SENT_TOTAL: &str = "grpc_server_msg_sent_total";
    /// Build information: constant 1 with `version` and `role` labels.
    pub const BUILD_INFO: &str = "peervault_build_info";
    /// 1 when the process is ready to serve (the same as `/readyz`).
    pub const READY: &str = "peervault_ready";
    /// Open client connections on the gRPC port.
    pub const GRPC_CONNECTIONS: &str = "peervault_grpc_connections";
    /// Connections accepted on the gRPC port (after the TLS handshake).
    pub const GRPC_CONNECTIONS_TOTAL: &str = "peervault_grpc_connections_total";
    /// TLS handshakes that failed, by reason.
    pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "peervault_tls_handshake_failures_total";
    /// Certificate reloads from disk, by result.
    pub const TLS_RELOADS_TOTAL: &str = "peervault_tls_reloads_total";
    /// Calls refused by the auth layer, by reason.
    pub const AUTH_FAILURES_TOTAL: &str = "peervault_auth_failures_total";
    /// Streams ended because the credential that opened them was revoked or expired, by reason.
    pub const AUTH_STREAMS_ENDED_TOTAL: &str = "peervault_auth_streams_ended_total";
    /// Connections closed before serving: over `--max-connections`, or slow on the admin port.
    pub const CONNECTIONS_REFUSED_TOTAL: &str = "peervault_connections_refused_total";
    /// Process start time, seconds since the epoch (also `process_start_time_seconds`).
    pub const START_TIME_SECONDS: &str = "peervault_start_time_seconds";

    /// Every name above, for tests that check dashboards and `/metrics` against this list.
    pub const ALL: &[&str] = &[
        GRPC_SERVER_STARTED_TOTAL,
        GRPC_SERVER_HANDLED_TOTAL,
        GRPC_SERVER_HANDLING_SECONDS,
        GRPC_SERVER_MSG_RECEIVED_TOTAL,
        GRPC_SERVER_MSG_SENT_TOTAL,
        BUILD_INFO,
        READY,
        GRPC_CONNECTIONS,
        GRPC_CONNECTIONS_TOTAL,
        TLS_HANDSHAKE_FAILURES_TOTAL,
        TLS_RELOADS_TOTAL,
        AUTH_FAILURES_TOTAL,
        AUTH_STREAMS_ENDED_TOTAL,
        CONNECTIONS_REFUSED_TOTAL,
        START_TIME_SECONDS,
    ];
}

const RPC_LABELS: &[&str] = &["grpc_type", "grpc_service", "grpc_method"];

/// The process's metrics. Cheap to clone: every collector is shared.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    started: IntCounterVec,
    handled: IntCounterVec,
    handling: HistogramVec,
    msg_received: IntCounterVec,
    msg_sent: IntCounterVec,
    /// `peervault_ready`.
    pub ready: IntGauge,
    /// `peervault_grpc_connections`.
    pub connections: IntGauge,
    /// `peervault_grpc_connections_total`.
    pub connections_total: IntCounter,
    /// `peervault_tls_handshake_failures_total{reason}`.
    pub tls_handshake_failures: IntCounterVec,
    /// `peervault_tls_reloads_total{result}`.
    pub tls_reloads: IntCounterVec,
    /// `peervault_auth_failures_total{reason}`.
    pub auth_failures: IntCounterVec,
    /// `peervault_auth_streams_ended_total{reason}`.
    pub streams_ended: IntCounterVec,
    /// `peervault_connections_refused_total{port,reason}`.
    pub connections_refused: IntCounterVec,
    requests: Arc<RequestCounter>,
    methods: Arc<HashMap<String, (&'static str, String, String)>>,
}

/// Counts requests in total and over the last minute, for `GetMetrics`.
struct RequestCounter {
    total: AtomicU64,
    window: Mutex<RateWindow>,
}

/// Requests per second over the last 60 seconds, as a ring of one-second buckets.
struct RateWindow {
    buckets: [u64; 60],
    /// The second (since the epoch) each bucket holds.
    seconds: [u64; 60],
}

impl RateWindow {
    fn add(&mut self, now: u64) {
        let i = (now % 60) as usize;
        if self.seconds[i] != now {
            self.seconds[i] = now;
            self.buckets[i] = 0;
        }
        self.buckets[i] += 1;
    }

    fn last_minute(&self, now: u64) -> u64 {
        (0..60)
            .filter(|&i| now.saturating_sub(self.seconds[i]) < 60)
            .map(|i| self.buckets[i])
            .sum()
    }
}

fn epoch_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

impl Metrics {
    /// Creates the registry with process metrics and every runtime metric, labelled for `role`.
    pub fn new(role: &str, version: &str) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let started = IntCounterVec::new(
            Opts::new(
                names::GRPC_SERVER_STARTED_TOTAL,
                "Total number of RPCs started on the server.",
            ),
            RPC_LABELS,
        )?;
        let handled = IntCounterVec::new(
            Opts::new(
                names::GRPC_SERVER_HANDLED_TOTAL,
                "Total number of RPCs completed on the server, regardless of success or failure.",
            ),
            &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
        )?;
        let handling = HistogramVec::new(
            HistogramOpts::new(
                names::GRPC_SERVER_HANDLING_SECONDS,
                "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            RPC_LABELS,
        )?;
        let msg_received = IntCounterVec::new(
            Opts::new(
                names::GRPC_SERVER_MSG_RECEIVED_TOTAL,
                "Total number of RPC stream messages received on the server.",
            ),
            RPC_LABELS,
        )?;
        let msg_sent = IntCounterVec::new(
            Opts::new(
                names::GRPC_SERVER_MSG_SENT_TOTAL,
                "Total number of gRPC stream messages sent by the server.",
            ),
            RPC_LABELS,
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(names::BUILD_INFO, "PeerVault build information."),
            &["version", "role"],
        )?;
        build_info.with_label_values(&[version, role]).set(1);
        let ready = IntGauge::new(names::READY, "1 when the process is ready to serve.")?;
        let connections = IntGauge::new(names::GRPC_CONNECTIONS, "Open client connections on the gRPC port.")?;
        let connections_total = IntCounter::new(
            names::GRPC_CONNECTIONS_TOTAL,
            "Connections accepted on the gRPC port after the TLS handshake.",
        )?;
        let tls_handshake_failures = IntCounterVec::new(
            Opts::new(
                names::TLS_HANDSHAKE_FAILURES_TOTAL,
                "TLS handshakes that failed, by reason.",
            ),
            &["reason"],
        )?;
        let tls_reloads = IntCounterVec::new(
            Opts::new(names::TLS_RELOADS_TOTAL, "Certificate reloads from disk, by result."),
            &["result"],
        )?;
        let auth_failures = IntCounterVec::new(
            Opts::new(
                names::AUTH_FAILURES_TOTAL,
                "Calls refused by the auth layer, by reason.",
            ),
            &["reason"],
        )?;
        let streams_ended = IntCounterVec::new(
            Opts::new(
                names::AUTH_STREAMS_ENDED_TOTAL,
                "Streams ended because their credential was revoked or expired, by reason.",
            ),
            &["reason"],
        )?;
        let connections_refused = IntCounterVec::new(
            Opts::new(
                names::CONNECTIONS_REFUSED_TOTAL,
                "Connections closed before being served (connection cap, handshake or header timeout), by port and reason.",
            ),
            &["port", "reason"],
        )?;
        let start_time = prometheus::Gauge::new(
            names::START_TIME_SECONDS,
            "Process start time, seconds since the epoch.",
        )?;
        start_time.set(epoch_seconds() as f64);
        registry.register(Box::new(started.clone()))?;
        registry.register(Box::new(handled.clone()))?;
        registry.register(Box::new(handling.clone()))?;
        registry.register(Box::new(msg_received.clone()))?;
        registry.register(Box::new(msg_sent.clone()))?;
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(ready.clone()))?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(connections_total.clone()))?;
        registry.register(Box::new(tls_handshake_failures.clone()))?;
        registry.register(Box::new(tls_reloads.clone()))?;
        registry.register(Box::new(auth_failures.clone()))?;
        registry.register(Box::new(streams_ended.clone()))?;
        registry.register(Box::new(connections_refused.clone()))?;
        registry.register(Box::new(start_time))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;

        let mut methods = HashMap::new();
        for m in peervault_proto::methods() {
            methods.insert(m.path(), (m.grpc_type(), m.service.clone(), m.method.clone()));
        }
        for (path, kind) in [
            ("/grpc.health.v1.Health/Check", "unary"),
            ("/grpc.health.v1.Health/Watch", "server_stream"),
            (
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                "bidi_stream",
            ),
            (
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                "bidi_stream",
            ),
        ] {
            let (svc, method) = path[1..].split_once('/').unwrap_or((path, ""));
            methods.insert(path.to_string(), (kind, svc.to_string(), method.to_string()));
        }
        Ok(Metrics {
            registry,
            started,
            handled,
            handling,
            msg_received,
            msg_sent,
            ready,
            connections,
            connections_total,
            tls_handshake_failures,
            tls_reloads,
            auth_failures,
            streams_ended,
            connections_refused,
            requests: Arc::new(RequestCounter {
                total: AtomicU64::new(0),
                window: Mutex::new(RateWindow {
                    buckets: [0; 60],
                    seconds: [0; 60],
                }),
            }),
            methods: Arc::new(methods),
        })
    }

    /// Registers a service's own collector in the process registry.
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) -> Result<(), prometheus::Error> {
        self.registry.register(c)
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// gRPC requests started since the process began.
    pub fn requests_total(&self) -> u64 {
        self.requests.total.load(Ordering::Relaxed)
    }

    /// gRPC requests started during the last 60 seconds.
    pub fn requests_last_minute(&self) -> u64 {
        let w = self.requests.window.lock().unwrap_or_else(|p| p.into_inner());
        w.last_minute(epoch_seconds())
    }

    /// Labels for a path; paths outside the protocol share one label set so that probing random
    /// paths cannot grow the metric's cardinality.
    fn labels(&self, path: &str) -> [String; 3] {
        match self.methods.get(path) {
            Some((kind, svc, method)) => [kind.to_string(), svc.clone(), method.clone()],
            None => ["unary".into(), "unknown".into(), "unknown".into()],
        }
    }
}

/// Records `grpc_server_*` metrics for every call.
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    metrics: Metrics,
}

impl GrpcMetricsLayer {
    /// A layer recording into `metrics`.
    pub fn new(metrics: Metrics) -> Self {
        GrpcMetricsLayer { metrics }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service produced by [`GrpcMetricsLayer`].
#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Metrics,
}

impl<S, RB> Service<Request<tonic::body::Body>> for GrpcMetricsService<S>
where
    S: Service<Request<tonic::body::Body>, Response = Response<RB>>,
    S::Future: Send + 'static,
    RB: Body<Data = bytes::Bytes> + Send + 'static,
{
    type Response = Response<MetricsBody<RB>>;
    type Error = S::Error;
    type Future = futures_util::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> Self::Future {
        let labels = self.metrics.labels(req.uri().path());
        let l = [labels[0].as_str(), labels[1].as_str(), labels[2].as_str()];
        self.metrics.started.with_label_values(&l).inc();
        self.metrics.requests.total.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .requests
            .window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(epoch_seconds());
        let received = self.metrics.msg_received.with_label_values(&l);
        let sent = self.metrics.msg_sent.with_label_values(&l);
        let handled = {
            let m = self.metrics.handled.clone();
            let labels = labels.clone();
            move |code: &str| {
                m.with_label_values(&[&labels[0], &labels[1], &labels[2], code]).inc();
            }
        };
        let hist = self.metrics.handling.with_label_values(&l);
        let start = Instant::now();
        let req = req.map(|b| {
            tonic::body::Body::new(CountingBody {
                inner: b,
                frames: FrameCounter::default(),
                counter: received,
            })
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            let header_code = res
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            Ok(res.map(|b| MetricsBody {
                inner: b,
                frames: FrameCounter::default(),
                sent,
                recorder: Recorder {
                    done: None,
                    start,
                    code: header_code,
                    hist,
                    handled: Box::new(handled),
                },
            }))
        })
    }
}

/// Counts gRPC messages in a byte stream by following the 5-byte length prefixes.
#[derive(Default)]
struct FrameCounter {
    header: [u8; 5],
    header_len: usize,
    remaining: u64,
}

impl FrameCounter {
    /// Feeds a chunk and adds the messages that began in it to `counter`.
    fn count(&mut self, data: &[u8], counter: &IntCounter) {
        let n = self.feed(data);
        if n > 0 {
            counter.inc_by(n);
        }
    }

    /// Feeds a chunk; returns how many messages began in it.
    fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut started = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = (self.remaining.min(data.len() as u64)) as usize;
                self.remaining -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len == 5 {
                started += 1;
                self.header_len = 0;
                self.remaining =
                    u32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]) as u64;
            }
        }
        started
    }
}

pin_project! {
    /// A request body that counts the gRPC messages passing through it.
    struct CountingBody<B> {
        #[pin]
        inner: B,
        frames: FrameCounter,
        counter: IntCounter,
    }
}

impl<B> Body for CountingBody<B>
where
    B: Body<Data = bytes::Bytes>,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let res = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &res
            && let Some(data) = frame.data_ref()
        {
            this.frames.count(data.chunk(), this.counter);
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Records completion once: when the response ends, or when it is dropped unfinished.
struct Recorder {
    done: Option<()>,
    start: Instant,
    code: Option<String>,
    hist: Histogram,
    handled: Box<dyn Fn(&str) + Send>,
}

impl Recorder {
    fn finish(&mut self, dropped: bool) {
        if self.done.is_some() {
            return;
        }
        self.done = Some(());
        let code = match (&self.code, dropped) {
            (Some(c), _) => code_name(c),
            // The client went away before the server finished.
            (None, true) => "Canceled",
            (None, false) => "Unknown",
        };
        self.hist.observe(self.start.elapsed().as_secs_f64());
        (self.handled)(code);
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.finish(true);
    }
}

/// The conventional label for a numeric `grpc-status`.
fn code_name(code: &str) -> &'static str {
    match code.parse::<i32>().map(tonic::Code::from) {
        Ok(tonic::Code::Ok) => "OK",
        Ok(tonic::Code::Cancelled) => "Canceled",
        Ok(tonic::Code::Unknown) => "Unknown",
        Ok(tonic::Code::InvalidArgument) => "InvalidArgument",
        Ok(tonic::Code::DeadlineExceeded) => "DeadlineExceeded",
        Ok(tonic::Code::NotFound) => "NotFound",
        Ok(tonic::Code::AlreadyExists) => "AlreadyExists",
        Ok(tonic::Code::PermissionDenied) => "PermissionDenied",
        Ok(tonic::Code::ResourceExhausted) => "ResourceExhausted",
        Ok(tonic::Code::FailedPrecondition) => "FailedPrecondition",
        Ok(tonic::Code::Aborted) => "Aborted",
        Ok(tonic::Code::OutOfRange) => "OutOfRange",
        Ok(tonic::Code::Unimplemented) => "Unimplemented",
        Ok(tonic::Code::Internal) => "Internal",
        Ok(tonic::Code::Unavailable) => "Unavailable",
        Ok(tonic::Code::DataLoss) => "DataLoss",
        Ok(tonic::Code::Unauthenticated) => "Unauthenticated",
        Err(_) => "Unknown",
    }
}

pin_project! {
    /// A response body that counts messages sent and records the call's completion.
    pub struct MetricsBody<B> {
        #[pin]
        inner: B,
        frames: FrameCounter,
        sent: IntCounter,
        recorder: Recorder,
    }
}

impl<B> Body for MetricsBody<B>
where
    B: Body<Data = bytes::Bytes>,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let res = this.inner.poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.frames.count(data.chunk(), this.sent);
                } else if let Some(trailers) = frame.trailers_ref() {
                    if let Some(code) = trailers.get("grpc-status").and_then(|v| v.to_str().ok()) {
                        this.recorder.code = Some(code.to_string());
                    }
                    this.recorder.finish(false);
                }
            }
            Poll::Ready(None) => this.recorder.finish(false),
            Poll::Ready(Some(Err(_))) => {
                this.recorder.code.get_or_insert_with(|| "2".to_string());
                this.recorder.finish(false);
            }
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_counter_follows_length_prefixes_across_chunks() {
        let mut msg = vec![0u8, 0, 0, 0, 3, b'a', b'b', b'c'];
        msg.extend_from_slice(&[0, 0, 0, 0, 0]); // an empty message
        msg.extend_from_slice(&[0, 0, 0, 0, 2, b'x', b'y']);
        for split in 0..msg.len() {
            let mut c = FrameCounter::default();
            let n = c.feed(&msg[..split]) + c.feed(&msg[split..]);
            assert_eq!(n, 3, "split at {split}");
        }
    }

    #[test]
    fn rate_window_forgets_old_seconds() {
        let mut w = RateWindow {
            buckets: [0; 60],
            seconds: [0; 60],
        };
        w.add(1000);
        w.add(1000);
        w.add(1030);
        assert_eq!(w.last_minute(1030), 3);
        assert_eq!(w.last_minute(1061), 1);
        assert_eq!(w.last_minute(1200), 0);
    }

    #[test]
    fn every_listed_name_is_exported() {
        let m = Metrics::new("all", "test").unwrap();
        m.started.with_label_values(&["unary", "s", "m"]).inc();
        m.handled.with_label_values(&["unary", "s", "m", "OK"]).inc();
        m.handling.with_label_values(&["unary", "s", "m"]).observe(0.1);
        m.msg_received.with_label_values(&["unary", "s", "m"]).inc();
        m.msg_sent.with_label_values(&["unary", "s", "m"]).inc();
        m.tls_handshake_failures.with_label_values(&["x"]).inc();
        m.tls_reloads.with_label_values(&["ok"]).inc();
        m.auth_failures.with_label_values(&["x"]).inc();
        m.streams_ended.with_label_values(&["x"]).inc();
        m.connections_refused.with_label_values(&["grpc", "x"]).inc();
        let text = m.encode();
        for name in names::ALL {
            assert!(text.contains(name), "{name} missing from /metrics");
        }
    }
}
