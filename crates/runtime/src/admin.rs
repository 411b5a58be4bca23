//! The admin HTTP port: `/metrics` for Prometheus, `/healthz` (alive) and `/readyz` (ready to
//! serve) for kubelet probes, which cannot speak gRPC over TLS.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio::net::TcpListener;

use crate::metrics::Metrics;

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    ready: Arc<AtomicBool>,
}

async fn metrics_handler(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AdminState>) -> (StatusCode, &'static str) {
    if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` fires.
///
/// Slow clients cannot hold connections: the request head must arrive within `read_timeout`,
/// every connection serves one request and closes (no idle keep-alive connections), and no
/// connection lives longer than three times `read_timeout`.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
    read_timeout: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AdminState {
            metrics: metrics.clone(),
            ready,
        });
    let lifetime = read_timeout.saturating_mul(3);
    loop {
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "admin HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
        };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(read_timeout)
                .keep_alive(false)
                .serve_connection(TokioIo::new(tcp), svc);
            match tokio::time::timeout(lifetime, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let reason = if e.is_timeout() { "header_timeout" } else { "error" };
                    metrics.connections_refused.with_label_values(&["admin", reason]).inc();
                    tracing::debug!(remote = %remote, error = %e, "admin HTTP connection ended");
                }
                Err(_) => {
                    metrics
                        .connections_refused
                        .with_label_values(&["admin", "lifetime"])
                        .inc();
                    tracing::info!(remote = %remote, "admin HTTP connection outlived its time: closed");
                }
            }
        });
    }
}
