//! SystemService: version, uptime, request counts and health of this process, served by every
//! role (and by PeerVaultService's system calls through the same code).

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use peervault_proto::v1::{HealthResponse, MetricsResponse, SystemInfoResponse, system_service_server::SystemService};
use tonic::{Request, Response, Status};
use tonic_health::server::HealthReporter;

use crate::{metrics::Metrics, time::timestamp};

/// Storage and membership figures a service contributes to SystemService answers.
pub trait SystemStats: Send + Sync + 'static {
    /// Bytes stored.
    fn storage_used(&self) -> u64 {
        0
    }
    /// Bytes the store may use (quota, or the volume's size).
    fn storage_total(&self) -> u64 {
        0
    }
    /// Files stored.
    fn file_count(&self) -> u64 {
        0
    }
    /// Members in this node's view of the cluster.
    fn peer_count(&self) -> u64 {
        0
    }
}

/// The SystemService implementation. Cheap to clone.
#[derive(Clone)]
pub struct SystemApi {
    inner: Arc<Inner>,
}

struct Inner {
    metrics: Metrics,
    role: String,
    node_id: String,
    start: SystemTime,
    health: HealthReporter,
    ready: Arc<AtomicBool>,
    stats: RwLock<Vec<Arc<dyn SystemStats>>>,
}

fn clamp_i32(v: u64) -> i32 {
    v.min(i32::MAX as u64) as i32
}

impl SystemApi {
    pub(crate) fn new(
        metrics: Metrics,
        role: String,
        node_id: String,
        start: SystemTime,
        health: HealthReporter,
        ready: Arc<AtomicBool>,
    ) -> Self {
        SystemApi {
            inner: Arc::new(Inner {
                metrics,
                role,
                node_id,
                start,
                health,
                ready,
                stats: RwLock::new(Vec::new()),
            }),
        }
    }

    /// Adds a source of storage/membership figures; figures of all sources are summed.
    pub fn add_stats(&self, stats: Arc<dyn SystemStats>) {
        self.inner.stats.write().unwrap_or_else(|p| p.into_inner()).push(stats);
    }

    fn sum(&self, f: impl Fn(&dyn SystemStats) -> u64) -> u64 {
        let stats = self.inner.stats.read().unwrap_or_else(|p| p.into_inner());
        stats.iter().map(|s| f(s.as_ref())).sum()
    }

    /// GetSystemInfo's answer.
    pub fn system_info(&self) -> SystemInfoResponse {
        let uptime = SystemTime::now()
            .duration_since(self.inner.start)
            .unwrap_or(Duration::ZERO);
        SystemInfoResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: uptime.as_secs() as i64,
            start_time: Some(timestamp(self.inner.start)),
            storage_used: self.sum(|s| s.storage_used()) as i64,
            storage_total: self.sum(|s| s.storage_total()) as i64,
            peer_count: clamp_i32(self.sum(|s| s.peer_count())),
            file_count: clamp_i32(self.sum(|s| s.file_count())),
            role: self.inner.role.clone(),
            node_id: self.inner.node_id.clone(),
        }
    }

    /// GetMetrics's answer.
    pub fn metrics(&self) -> MetricsResponse {
        let used = self.sum(|s| s.storage_used());
        let total = self.sum(|s| s.storage_total());
        MetricsResponse {
            requests_total: self.inner.metrics.requests_total() as i64,
            requests_per_minute: self.inner.metrics.requests_last_minute() as f64,
            active_connections: clamp_i32(self.inner.metrics.connections.get().max(0) as u64),
            storage_usage_percent: if total > 0 {
                used as f64 * 100.0 / total as f64
            } else {
                0.0
            },
            last_updated: Some(timestamp(SystemTime::now())),
        }
    }

    /// HealthCheck's answer: the process's readiness and each service's health status.
    pub async fn health(&self) -> HealthResponse {
        let mut services = HashMap::new();
        for name in peervault_proto::service_names() {
            // Services a role does not host are simply absent from the health registry.
            if let Ok(status) = self.status_of(&name).await {
                services.insert(name, status);
            }
        }
        let ready = self.inner.ready.load(Ordering::Acquire);
        HealthResponse {
            status: if ready { "SERVING" } else { "NOT_SERVING" }.to_string(),
            timestamp: Some(timestamp(SystemTime::now())),
            version: env!("CARGO_PKG_VERSION").to_string(),
            services,
        }
    }

    async fn status_of(&self, name: &str) -> Result<String, ()> {
        // The reporter exposes statuses only through the health service itself.
        use tonic_health::pb::{HealthCheckRequest, health_server::Health};
        let svc = tonic_health::server::HealthService::from_health_reporter(self.inner.health.clone());
        let resp = svc
            .check(Request::new(HealthCheckRequest {
                service: name.to_string(),
            }))
            .await
            .map_err(|_| ())?;
        Ok(match resp.into_inner().status() {
            tonic_health::pb::health_check_response::ServingStatus::Serving => "SERVING",
            tonic_health::pb::health_check_response::ServingStatus::NotServing => "NOT_SERVING",
            _ => "UNKNOWN",
        }
        .to_string())
    }
}

#[tonic::async_trait]
impl SystemService for SystemApi {
    async fn get_system_info(&self, _req: Request<()>) -> Result<Response<SystemInfoResponse>, Status> {
        Ok(Response::new(self.system_info()))
    }

    async fn get_metrics(&self, _req: Request<()>) -> Result<Response<MetricsResponse>, Status> {
        Ok(Response::new(self.metrics()))
    }

    async fn health_check(&self, _req: Request<()>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(self.health().await))
    }
}
