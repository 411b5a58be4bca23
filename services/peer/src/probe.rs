//! Health probing: one task per member runs grpc.health.v1 `Check` over mutual TLS every
//! interval, with a deadline, and records the outcome in the registry. Tasks start and stop as
//! the view's members (and their addresses) change.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    sync::Arc,
    time::{Duration, Instant},
};

use peervault_runtime::client::ServiceChannel;
use tokio::task::JoinHandle;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
use tracing::Instrument;

use crate::{health::ProbeOutcome, registry::Registry, registry::join_host_port};

/// Makes a channel to `host:port`.
pub type Connect = Arc<dyn Fn(&str) -> Result<ServiceChannel, String> + Send + Sync>;

/// Runs one health check with a deadline.
pub async fn check(client: &mut HealthClient<ServiceChannel>, timeout: Duration) -> ProbeOutcome {
    let start = Instant::now();
    let mut req = tonic::Request::new(HealthCheckRequest { service: String::new() });
    req.set_timeout(timeout);
    match tokio::time::timeout(timeout, client.check(req)).await {
        Err(_) => ProbeOutcome::Failed {
            reason: "timeout",
            detail: format!("no answer within {timeout:?}"),
        },
        Ok(Ok(resp)) => match resp.into_inner().status() {
            ServingStatus::Serving => ProbeOutcome::Serving(start.elapsed()),
            other => ProbeOutcome::Failed {
                reason: "not_serving",
                detail: format!("health status {other:?}"),
            },
        },
        Ok(Err(status)) => ProbeOutcome::Failed {
            reason: match status.code() {
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => "timeout",
                tonic::Code::Unavailable => "unavailable",
                _ => "error",
            },
            detail: format!("{:?}: {}", status.code(), status.message()),
        },
    }
}

/// Probes every member of `registry` until the returned task is aborted.
pub fn spawn(registry: Registry, connect: Connect) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut targets = registry.targets();
        let mut tasks: HashMap<String, ((String, u16), AbortOnDrop)> = HashMap::new();
        loop {
            let current = targets.borrow_and_update().clone();
            tasks.retain(|id, (addr, _)| current.get(id) == Some(addr));
            for (id, addr) in current {
                if tasks.contains_key(&id) {
                    continue;
                }
                let task = tokio::spawn(probe_loop(id.clone(), addr.clone(), registry.clone(), connect.clone()));
                tasks.insert(id, (addr, AbortOnDrop(task)));
            }
            if targets.changed().await.is_err() {
                return;
            }
        }
    })
}

/// Aborts the task when dropped (a member left, or the prober stopped).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn probe_loop(id: String, (host, port): (String, u16), registry: Registry, connect: Connect) {
    let policy = registry.policy();
    let endpoint = join_host_port(&host, port);
    let mut client = match connect(&endpoint) {
        Ok(ch) => HealthClient::new(ch),
        Err(e) => {
            // An endpoint that cannot even be dialled is down; say why once per interval.
            let mut tick = tokio::time::interval(policy.interval);
            loop {
                tick.tick().await;
                registry.record_probe(
                    &id,
                    &ProbeOutcome::Failed {
                        reason: "bad_endpoint",
                        detail: e.clone(),
                    },
                );
            }
        }
    };
    // Spread the members' checks over the interval instead of firing them all at once.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    let offset_ms = h.finish() % (policy.interval.as_millis().max(1) as u64);
    tokio::time::sleep(Duration::from_millis(offset_ms)).await;
    let mut tick = tokio::time::interval(policy.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let span = tracing::debug_span!("peer_probe", peer = %id, endpoint = %endpoint);
        let outcome = check(&mut client, policy.timeout).instrument(span).await;
        registry.record_probe(&id, &outcome);
    }
}
