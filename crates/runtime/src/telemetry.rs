//! Logs and traces: `tracing` with JSON lines (or text on a terminal), OpenTelemetry OTLP export
//! configured by the standard `OTEL_*` variables, and W3C trace context carried in gRPC metadata
//! in both directions.

use std::{
    io::IsTerminal,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use opentelemetry::{
    propagation::{Extractor, Injector},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tower_layer::Layer;
use tower_service::Service;
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer as _,
    filter::{FilterExt as _, Targets},
    layer::SubscriberExt,
    util::SubscriberInitExt,
};

use crate::config::LogFormat;

mod json_fields;

/// Keeps the tracer provider alive; call [`Telemetry::shutdown`] at exit to flush spans.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Whether the `OTEL_*` environment asks for trace export.
fn otlp_requested() -> bool {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return false;
    }
    match var("OTEL_TRACES_EXPORTER") {
        Some(v) if v.eq_ignore_ascii_case("none") => false,
        Some(v) if v.eq_ignore_ascii_case("otlp") => true,
        _ => var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() || var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some(),
    }
}

/// Installs the global subscriber. Must run inside the Tokio runtime (the OTLP exporter needs it).
/// Export is on when `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set
/// or `OTEL_TRACES_EXPORTER=otlp`; the service name is `OTEL_SERVICE_NAME` or `peervault-<role>`.
pub fn init(filter: &str, format: LogFormat, role: &str) -> Result<Telemetry, String> {
    let env_filter = EnvFilter::try_new(filter).map_err(|e| format!("invalid --log filter '{filter}': {e}"))?;
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .fmt_fields(json_fields::AppendingJsonFields::default())
            .boxed()
    } else {
        tracing_subscriber::fmt::layer().boxed()
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let (otel, provider) = if otlp_requested() {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| format!("cannot configure the OTLP exporter from OTEL_* variables: {e}"))?;
        let service_name = std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("peervault-{role}"));
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                Resource::builder()
                    .with_service_name(service_name)
                    .with_attribute(opentelemetry::KeyValue::new(
                        "service.version",
                        env!("CARGO_PKG_VERSION"),
                    ))
                    .build(),
            )
            .build();
        let tracer = provider.tracer("peervault");
        // The exporter's own transport must not feed spans back into the exporter.
        // Health probes (the peer service's `peer_probe` spans around each check) stay out of
        // tracing like the checks themselves: see `is_health_path`.
        let no_probes = tracing_subscriber::filter::filter_fn(|m| !(m.is_span() && m.name() == "peer_probe"));
        let quiet = Targets::new()
            .with_default(tracing::Level::TRACE)
            .with_target("h2", tracing::level_filters::LevelFilter::OFF)
            .with_target("hyper", tracing::level_filters::LevelFilter::OFF)
            .with_target("hyper_util", tracing::level_filters::LevelFilter::OFF)
            .with_target("tonic", tracing::level_filters::LevelFilter::OFF)
            .with_target("tower", tracing::level_filters::LevelFilter::OFF)
            .with_target("opentelemetry", tracing::level_filters::LevelFilter::OFF)
            .with_target("opentelemetry_sdk", tracing::level_filters::LevelFilter::OFF)
            .with_target("opentelemetry_otlp", tracing::level_filters::LevelFilter::OFF);
        (
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(quiet.and(no_probes)),
            ),
            Some(provider),
        )
    } else {
        (None, None)
    };
    tracing_subscriber::registry()
        .with(env_filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| format!("cannot install the log subscriber: {e}"))?;
    if provider.is_some() {
        tracing::info!("OpenTelemetry trace export enabled (OTLP/gRPC)");
    }
    Ok(Telemetry { provider })
}

impl Telemetry {
    /// Flushes and stops trace export; bounded so an unreachable collector cannot delay exit.
    pub async fn shutdown(self) {
        if let Some(p) = self.provider {
            let r = tokio::task::spawn_blocking(move || p.shutdown_with_timeout(Duration::from_secs(2))).await;
            if let Ok(Err(e)) = r {
                tracing::debug!(error = %e, "trace export shutdown");
            }
        }
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(key.as_bytes()), HeaderValue::from_str(&value)) {
            self.0.insert(k, v);
        }
    }
}

/// Whether a gRPC path is a health check. Probes run every few seconds against every member;
/// they are kept out of tracing (no span, so never sampled) so traces show requests, not probes.
pub fn is_health_path(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
}

/// Most links one span gets (the SDK's default span link limit).
pub const MAX_LINKS: usize = 128;

/// The W3C `traceparent` of the current span, when it belongs to a trace (export on).
pub fn current_traceparent() -> Option<String> {
    let cx = Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid()
        .then(|| format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8()))
}

/// Parses a W3C `traceparent` (by the same propagator that reads gRPC metadata); `None` when
/// it is not a valid one.
pub fn parse_traceparent(value: &str) -> Option<opentelemetry::trace::SpanContext> {
    struct One<'a>(&'a str);
    impl Extractor for One<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            (key == "traceparent").then_some(self.0)
        }
        fn keys(&self) -> Vec<&str> {
            vec!["traceparent"]
        }
    }
    use opentelemetry::propagation::TextMapPropagator;
    let cx = TraceContextPropagator::new().extract(&One(value));
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// Links `span` to the spans named by `traceparents` (each distinct one once, at most
/// [`MAX_LINKS`]); returns how many links were added. Invalid values are ignored.
pub fn link_traceparents<'a>(span: &Span, traceparents: impl IntoIterator<Item = &'a str>) -> usize {
    let mut seen = std::collections::HashSet::new();
    for tp in traceparents {
        if seen.len() >= MAX_LINKS {
            break;
        }
        if tp.is_empty() || seen.contains(tp) {
            continue;
        }
        if let Some(sc) = parse_traceparent(tp) {
            span.add_link(sc);
            seen.insert(tp);
        }
    }
    seen.len()
}

/// Splits a gRPC path into (service, method).
fn split_path(path: &str) -> (&str, &str) {
    path.trim_start_matches('/').split_once('/').unwrap_or((path, ""))
}

/// Server side: a span per call, continuing the caller's trace from its `traceparent` metadata.
#[derive(Clone, Default)]
pub struct ServerTraceLayer;

impl<S> Layer<S> for ServerTraceLayer {
    type Service = ServerTrace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ServerTrace { inner }
    }
}

/// The service produced by [`ServerTraceLayer`].
#[derive(Clone)]
pub struct ServerTrace<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for ServerTrace<S>
where
    S: Service<Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if is_health_path(req.uri().path()) {
            return Box::pin(self.inner.call(req));
        }
        let (service, method) = split_path(req.uri().path());
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = %format!("{service}/{method}"),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
            caller = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(req.headers())));
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
        let trace_id = span.context().span().span_context().trace_id();
        if trace_id != opentelemetry::trace::TraceId::INVALID {
            span.record("trace_id", tracing::field::display(trace_id));
        }
        let fut = {
            let _g = span.enter();
            self.inner.call(req)
        };
        Box::pin(
            async move {
                let started = std::time::Instant::now();
                let res = fut.await;
                let span = Span::current();
                match &res {
                    Ok(r) => {
                        // Trailers-only responses carry the status in the headers; others end in
                        // trailers that the metrics layer reads.
                        let code = r
                            .headers()
                            .get("grpc-status")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("0");
                        span.record("rpc.grpc.status_code", code);
                        if code != "0" {
                            tracing::info!(
                                grpc_status = code,
                                elapsed_ms = started.elapsed().as_millis() as u64,
                                "call failed"
                            );
                        } else {
                            tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "call answered");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "call errored"),
                }
                res
            }
            .instrument(span),
        )
    }
}

/// Client side: a span per outgoing call whose context goes out as `traceparent`. Every client
/// that one PeerVault service uses to call another is wrapped in this layer.
#[derive(Clone, Default)]
pub struct ClientTraceLayer;

impl<S> Layer<S> for ClientTraceLayer {
    type Service = ClientTrace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ClientTrace { inner }
    }
}

/// The service produced by [`ClientTraceLayer`].
#[derive(Clone)]
pub struct ClientTrace<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for ClientTrace<S>
where
    S: Service<Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if is_health_path(req.uri().path()) {
            return Box::pin(self.inner.call(req));
        }
        let (service, method) = split_path(req.uri().path());
        let span = tracing::info_span!(
            "grpc.client",
            otel.name = %format!("{service}/{method}"),
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
        );
        let cx = span.context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut HeaderInjector(req.headers_mut()))
        });
        let fut = self.inner.call(req);
        Box::pin(fut.instrument(span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(
            split_path("/peervault.v1.SystemService/GetMetrics"),
            ("peervault.v1.SystemService", "GetMetrics")
        );
        assert_eq!(split_path("/weird"), ("/weird", ""));
    }

    #[test]
    fn traceparents_parse_only_when_valid() {
        let sc = parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
        assert_eq!(sc.trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(sc.span_id().to_string(), "b7ad6b7169203331");
        assert!(sc.is_sampled() && sc.is_remote());
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?} accepted");
        }
        // Outside a trace (no exporter installed) there is no current traceparent.
        assert!(current_traceparent().is_none());
    }

    #[test]
    fn health_paths_are_recognised() {
        assert!(is_health_path("/grpc.health.v1.Health/Check"));
        assert!(is_health_path("/grpc.health.v1.Health/Watch"));
        assert!(!is_health_path("/peervault.v1.FileService/UploadFile"));
    }
}
