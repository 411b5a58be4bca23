//! The periodic metrics events every service publishes (`system` topic): `system_metrics` in
//! the published shape (`storage`, `network`, `performance`, plus `memory` and `security`), and
//! `storage_metrics`, `network_metrics`, `performance_metrics` with the same figures flat.

use std::time::Instant;

use peervault_proto::v1::Event;
use peervault_runtime::ServiceContext;
use serde_json::{Value, json};

use crate::{EventBuilder, now_timestamp};

/// Samples a process's figures; rates are computed between two samples.
pub struct MetricsSampler {
    ctx: ServiceContext,
    last: Option<(Instant, f64, f64, f64)>,
    memory_limit: Option<f64>,
}

/// Sums every sample of a metric family in the registry (`_sum`/`_count` of histograms).
fn gather(families: &[prometheus::proto::MetricFamily], name: &str) -> (f64, f64) {
    let mut value = 0.0;
    let mut count = 0.0;
    use prometheus::proto::MetricType;
    for f in families.iter().filter(|f| f.name() == name) {
        let kind = f.get_field_type();
        for m in f.get_metric() {
            match kind {
                MetricType::COUNTER => value += m.get_counter().get_value(),
                MetricType::GAUGE => value += m.get_gauge().get_value(),
                MetricType::HISTOGRAM => {
                    value += m.get_histogram().get_sample_sum();
                    count += m.get_histogram().get_sample_count() as f64;
                }
                _ => {}
            }
        }
    }
    (value, count)
}

/// The memory this process may use: its cgroup limit, else the machine's memory.
fn memory_limit() -> Option<f64> {
    if let Ok(s) = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        && let Ok(v) = s.trim().parse::<f64>()
    {
        return Some(v);
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0)
}

fn round(v: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (v * p).round() / p
}

impl MetricsSampler {
    /// A sampler of `ctx`'s process.
    pub fn new(ctx: &ServiceContext) -> Self {
        MetricsSampler {
            ctx: ctx.clone(),
            last: None,
            memory_limit: memory_limit(),
        }
    }

    /// The four metrics events of this moment, stamped with `source`.
    pub fn sample(&mut self, source: &str) -> Vec<Event> {
        let info = self.ctx.system.system_info();
        let m = self.ctx.system.metrics();
        let families = self.ctx.metrics.registry.gather();
        let rss = gather(&families, "process_resident_memory_bytes").0;
        let cpu = gather(&families, "process_cpu_seconds_total").0;
        let (handling_sum, handling_count) = gather(&families, "grpc_server_handling_seconds");
        let auth_failures = gather(&families, "peervault_auth_failures_total").0;
        let ws = gather(&families, "peervault_events_ws_connections").0;
        let now = Instant::now();
        let requests = m.requests_total as f64;
        let (rps, avg) = match self.last {
            Some((t, r, s, c)) => {
                let secs = now.duration_since(t).as_secs_f64().max(1e-3);
                let avg = if handling_count > c {
                    (handling_sum - s) / (handling_count - c)
                } else {
                    0.0
                };
                ((requests - r).max(0.0) / secs, avg)
            }
            None => (m.requests_per_minute / 60.0, 0.0),
        };
        self.last = Some((now, requests, handling_sum, handling_count));
        let (used, total) = (info.storage_used.max(0) as f64, info.storage_total.max(0) as f64);
        let storage = json!({
            "totalSpace": total as u64,
            "usedSpace": used as u64,
            "availableSpace": (total - used).max(0.0) as u64,
            "usagePercent": if total > 0.0 { round(used * 100.0 / total, 2) } else { 0.0 },
            "fileCount": info.file_count,
        });
        let network = json!({
            "activeConnections": m.active_connections as i64 + ws as i64,
            "peerCount": info.peer_count,
        });
        let performance = json!({
            "averageResponseTime": round(avg, 6),
            "requestsPerSecond": round(rps, 3),
            "requestsTotal": m.requests_total,
            "cpuSeconds": round(cpu, 3),
        });
        let memory = json!({
            "residentBytes": rss as u64,
            "limitBytes": self.memory_limit.unwrap_or(0.0) as u64,
            "usagePercent": match self.memory_limit {
                Some(l) if l > 0.0 => round(rss * 100.0 / l, 2),
                _ => 0.0,
            },
        });
        let security = json!({ "authFailures": auth_failures as u64 });
        let ts = now_timestamp();
        let common = |kind: &str, data: Value| {
            let mut e = EventBuilder::new("system", kind).data(data).build();
            e.timestamp = Some(ts);
            e.source = source.to_string();
            e.id = format!("{source}-{kind}-{}-{}", ts.seconds, ts.nanos);
            e
        };
        let mut flat_network = network.clone();
        flat_network["security"] = security.clone();
        let mut flat_perf = performance.clone();
        flat_perf["memory"] = memory.clone();
        vec![
            common(
                "system_metrics",
                json!({
                    "storage": storage,
                    "network": network,
                    "performance": performance,
                    "memory": memory,
                    "security": security,
                    "uptimeSeconds": info.uptime_seconds,
                    "role": info.role,
                    "node": info.node_id,
                }),
            ),
            common("storage_metrics", storage),
            common("network_metrics", flat_network),
            common("performance_metrics", flat_perf),
        ]
    }
}
