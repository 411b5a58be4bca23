//! Threshold rules that turn measurements into `alerts` events: storage usage, memory usage,
//! replication backlog, peers going down, and repeated authentication failures.
//!
//! Rules are edge-triggered per source: an alert is raised when a value crosses its threshold
//! (or escalates from `warning` to `critical`) and re-armed once the value is back below, so a
//! full disk raises one alert, not one per metrics interval.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use peervault_proto::v1::{Event, event::Payload};
use serde_json::json;

use crate::{hub::StoredEvent, metrics::EventsMetrics, model, settings::AlertSettings, topics::Topic};

/// Bound on remembered sources, so a flood of distinct sources cannot grow memory.
const MAX_TRACKED: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Ok,
    Warning,
    Critical,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "info",
            Level::Warning => "warning",
            Level::Critical => "critical",
        }
    }
}

#[derive(Default)]
struct State {
    levels: HashMap<(String, &'static str), Level>,
    auth_totals: HashMap<String, f64>,
    auth_times: HashMap<String, VecDeque<Instant>>,
}

/// The alert rules of one events pod.
pub struct AlertEngine {
    cfg: AlertSettings,
    source: String,
    state: Mutex<State>,
    counter: AtomicU64,
    metrics: EventsMetrics,
}

/// Looks up a figure by any of `keys` in a SystemEvent's flattened metadata.
fn figure(meta: &HashMap<String, String>, keys: &[&str]) -> Option<f64> {
    keys.iter()
        .find_map(|k| meta.get(*k).and_then(|v| v.parse::<f64>().ok()))
}

impl AlertEngine {
    /// Rules with `cfg`'s thresholds; alerts carry `source` (`events/<node>`).
    pub fn new(cfg: AlertSettings, source: String, metrics: EventsMetrics) -> Self {
        AlertEngine {
            cfg,
            source,
            state: Mutex::new(State::default()),
            counter: AtomicU64::new(0),
            metrics,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[allow(clippy::too_many_arguments)]
    fn alert(
        &self,
        kind: &str,
        level: Level,
        metric: &str,
        value: f64,
        threshold: f64,
        message: String,
        subject: &str,
    ) -> Event {
        self.metrics.alerts.with_label_values(&[kind, level.as_str()]).inc();
        tracing::warn!(
            alert = kind,
            level = level.as_str(),
            metric,
            value,
            threshold,
            subject,
            "{message}"
        );
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let ts = model::now_timestamp();
        Event {
            id: format!("{}-alert-{}-{n}", self.source, ts.seconds),
            topic: Topic::Alerts.as_str().into(),
            r#type: kind.into(),
            timestamp: Some(ts),
            source: self.source.clone(),
            data_json: json!({
                "level": level.as_str(),
                "message": message,
                "metric": metric,
                "value": value,
                "threshold": threshold,
                "subject": subject,
                "timestamp": model::rfc3339(&ts),
            })
            .to_string(),
            ..Default::default()
        }
    }

    /// Edge-triggered threshold check of one figure of one source.
    #[allow(clippy::too_many_arguments)]
    fn threshold(
        &self,
        out: &mut Vec<Event>,
        subject: &str,
        kind: &str,
        metric: &'static str,
        value: f64,
        threshold: f64,
        critical_at: f64,
        what: &str,
    ) {
        let level = if value >= critical_at {
            Level::Critical
        } else if value >= threshold {
            Level::Warning
        } else {
            Level::Ok
        };
        let mut st = self.state();
        if st.levels.len() >= MAX_TRACKED {
            st.levels.clear();
        }
        let prev = st
            .levels
            .insert((subject.to_string(), metric), level)
            .unwrap_or(Level::Ok);
        drop(st);
        if level > prev {
            out.push(self.alert(
                kind,
                level,
                metric,
                value,
                threshold,
                format!("{what} on {subject}: {value:.1} (threshold {threshold})"),
                subject,
            ));
        }
    }

    /// Checks one accepted event against the rules; returns the alerts to publish.
    pub fn observe(&self, e: &StoredEvent) -> Vec<Event> {
        let mut out = Vec::new();
        let subject = e.event.source.as_str();
        match (&e.topic, &e.event.payload) {
            (Topic::System, Some(Payload::System(s))) => {
                let m = &s.metadata;
                let used = figure(m, &["storage.usedSpace", "usedSpace"]);
                let total = figure(m, &["storage.totalSpace", "totalSpace"]);
                let pct = figure(m, &["storage.usagePercent", "usagePercent"]).or(match (used, total) {
                    (Some(u), Some(t)) if t > 0.0 => Some(u * 100.0 / t),
                    _ => None,
                });
                let c = &self.cfg;
                if let Some(p) = pct {
                    let t = c.storage_usage_percent;
                    self.threshold(
                        &mut out,
                        subject,
                        "storage_alert",
                        "storage_usage_percent",
                        p,
                        t,
                        t + (100.0 - t) / 2.0,
                        "Storage usage high",
                    );
                }
                if let Some(p) = figure(m, &["memory.usagePercent", "memoryUsagePercent"]) {
                    let t = c.memory_usage_percent;
                    self.threshold(
                        &mut out,
                        subject,
                        "performance_alert",
                        "memory_usage",
                        p,
                        t,
                        t + (100.0 - t) / 2.0,
                        "High memory usage detected",
                    );
                }
                if let Some(b) = figure(m, &["replication.backlog", "replicationBacklog"]) {
                    let t = c.replication_backlog;
                    self.threshold(
                        &mut out,
                        subject,
                        "storage_alert",
                        "replication_backlog",
                        b,
                        t,
                        t * 4.0,
                        "Replication backlog high",
                    );
                }
                if let Some(total) = figure(m, &["security.authFailures", "authFailures"]) {
                    let prev = {
                        let mut st = self.state();
                        if st.auth_totals.len() >= MAX_TRACKED {
                            st.auth_totals.clear();
                        }
                        st.auth_totals.insert(subject.to_string(), total)
                    };
                    // A counter that went down means the process restarted: count from zero.
                    let delta = match prev {
                        Some(p) if total >= p => total - p,
                        Some(_) => total,
                        None => 0.0,
                    };
                    if delta > 0.0
                        && let Some(a) = self.auth_failures(subject, delta.min(u32::MAX as f64) as u32)
                    {
                        out.push(a);
                    }
                }
            }
            (Topic::PeerNetwork, Some(Payload::Peer(p))) => {
                let status = p.metadata.get("status").map(String::as_str).unwrap_or_default();
                if p.event_type == "health_changed" && status == "down" {
                    let failures = p
                        .metadata
                        .get("consecutive_failures")
                        .and_then(|v| v.parse::<f64>().ok());
                    let (metric, value) = match failures {
                        Some(f) => ("peer_consecutive_failures", f),
                        None => ("peer_down", 1.0),
                    };
                    out.push(self.alert(
                        "network_alert",
                        Level::Critical,
                        metric,
                        value,
                        1.0,
                        format!("Peer {} is down", p.peer_id),
                        &p.peer_id,
                    ));
                }
            }
            _ => {}
        }
        out
    }

    /// Records `n` authentication failures by `who` (a client address or a source); returns a
    /// security_alert when the window's count reaches the threshold (then starts counting anew).
    pub fn auth_failures(&self, who: &str, n: u32) -> Option<Event> {
        let limit = self.cfg.auth_failures.max(1);
        let window = self.cfg.auth_failure_window;
        let now = Instant::now();
        let count = {
            let mut st = self.state();
            if st.auth_times.len() >= MAX_TRACKED && !st.auth_times.contains_key(who) {
                st.auth_times.clear();
            }
            let times = st.auth_times.entry(who.to_string()).or_default();
            while times.front().is_some_and(|t| now.duration_since(*t) > window) {
                times.pop_front();
            }
            for _ in 0..n.min(limit) {
                times.push_back(now);
            }
            let count = times.len();
            if count >= limit as usize {
                times.clear();
            }
            count
        };
        (count >= limit as usize).then(|| {
            self.alert(
                "security_alert",
                Level::Warning,
                "auth_failures",
                count as f64,
                limit as f64,
                format!(
                    "Repeated authentication failures from {who}: {count} within {}",
                    humantime::format_duration(window)
                ),
                who,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{Filter, Hub, HubConfig};
    use std::time::Duration;

    fn engine() -> AlertEngine {
        AlertEngine::new(
            AlertSettings {
                storage_usage_percent: 90.0,
                memory_usage_percent: 80.0,
                replication_backlog: 100.0,
                auth_failures: 3,
                auth_failure_window: Duration::from_secs(60),
            },
            "events/e0".into(),
            EventsMetrics::unregistered(),
        )
    }

    fn stored(topic: &str, kind: &str, data: serde_json::Value) -> std::sync::Arc<StoredEvent> {
        let h = Hub::new(
            HubConfig {
                node: "e0".into(),
                replay_capacity: 10,
                subscriber_queue: 10,
            },
            EventsMetrics::unregistered(),
        );
        let _ = Filter::all();
        let e = Event {
            id: "x".into(),
            topic: topic.into(),
            r#type: kind.into(),
            source: "blob/b0".into(),
            data_json: data.to_string(),
            ..Default::default()
        };
        h.publish(vec![e]).unwrap().accepted.remove(0)
    }

    #[test]
    fn storage_usage_alerts_once_per_crossing() {
        let a = engine();
        let full = stored(
            "system",
            "system_metrics",
            json!({"storage": {"totalSpace": 100, "usedSpace": 92}}),
        );
        let alerts = a.observe(&full);
        assert_eq!(alerts.len(), 1);
        let d: serde_json::Value = serde_json::from_str(&alerts[0].data_json).unwrap();
        assert_eq!(alerts[0].r#type, "storage_alert");
        assert_eq!(
            (d["level"].as_str(), d["metric"].as_str()),
            (Some("warning"), Some("storage_usage_percent"))
        );
        assert_eq!((d["value"].as_f64(), d["threshold"].as_f64()), (Some(92.0), Some(90.0)));
        assert!(a.observe(&full).is_empty(), "no repeat while still above");
        let crit = stored("system", "storage_metrics", json!({"totalSpace": 100, "usedSpace": 99}));
        assert_eq!(a.observe(&crit).len(), 1, "escalation to critical");
        assert!(
            a.observe(&stored(
                "system",
                "storage_metrics",
                json!({"totalSpace": 100, "usedSpace": 10})
            ))
            .is_empty()
        );
        assert_eq!(a.observe(&full).len(), 1, "re-armed after recovery");
    }

    #[test]
    fn memory_backlog_and_peer_down() {
        let a = engine();
        let m = stored(
            "system",
            "system_metrics",
            json!({"memory": {"usagePercent": 85.5}, "replication": {"backlog": 150}}),
        );
        let kinds: Vec<String> = a.observe(&m).into_iter().map(|e| e.r#type).collect();
        assert_eq!(kinds, ["performance_alert", "storage_alert"]);
        let down = stored(
            "peer_network",
            "peer_health_changed",
            json!({"id": "blob-1", "status": "down"}),
        );
        let alerts = a.observe(&down);
        assert_eq!(alerts[0].r#type, "network_alert");
        assert!(
            a.observe(&stored(
                "peer_network",
                "peer_health_changed",
                json!({"id": "b", "status": "healthy"})
            ))
            .is_empty()
        );
    }

    #[test]
    fn repeated_auth_failures_raise_a_security_alert() {
        let a = engine();
        assert!(a.auth_failures("10.0.0.1", 1).is_none());
        assert!(a.auth_failures("10.0.0.1", 1).is_none());
        assert!(a.auth_failures("10.0.0.2", 1).is_none());
        let e = a.auth_failures("10.0.0.1", 1).unwrap();
        assert_eq!(e.r#type, "security_alert");
        // From published counters: deltas count.
        let s = |n: u32| stored("system", "network_metrics", json!({"security": {"authFailures": n}}));
        assert!(a.observe(&s(5)).is_empty(), "first sample is a baseline");
        assert_eq!(a.observe(&s(9)).len(), 1);
    }
}
