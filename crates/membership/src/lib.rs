//! The blob side of membership: subscribes to the peer service's WatchMembership stream, keeps
//! the view it has (also while the peer service is unreachable), and exposes it as a
//! [`tokio::sync::watch::Receiver<MembershipView>`]. Reconnects with exponential backoff and
//! resumes from the last applied version, so a short outage costs only the changes missed.
//!
//! ```ignore
//! let membership = MembershipClient::start(&ctx, "peer:8082", &ctx.node_id)?;
//! let view = membership.view().borrow().clone();
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use peervault_proto::v1::{
    Member, MembershipUpdate, MembershipUpdateKind, PeerHealthState, WatchMembershipRequest,
    peer_service_client::PeerServiceClient,
};
use peervault_runtime::{ServiceContext, client::ServiceChannel};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};
use tokio::sync::watch;

/// Metric names of this crate (listed with the runtime's in the dashboards).
pub mod names {
    /// Members in the view this pod uses.
    pub const VIEW_SIZE: &str = "peervault_membership_view_size";
    /// Ready members in the view this pod uses.
    pub const VIEW_READY: &str = "peervault_membership_view_ready";
    /// Version of the view this pod uses.
    pub const VIEW_VERSION: &str = "peervault_membership_view_version";
    /// 1 while the WatchMembership stream is open.
    pub const CONNECTED: &str = "peervault_membership_connected";
    /// Updates applied, by kind (`snapshot`, `upsert`, `remove`).
    pub const UPDATES_TOTAL: &str = "peervault_membership_updates_total";
    /// Times the stream was (re)opened after a failure or an end.
    pub const RECONNECTS_TOTAL: &str = "peervault_membership_reconnects_total";

    /// Every name above.
    pub const ALL: &[&str] = &[
        VIEW_SIZE,
        VIEW_READY,
        VIEW_VERSION,
        CONNECTED,
        UPDATES_TOTAL,
        RECONNECTS_TOTAL,
    ];
}

/// First wait before reconnecting; doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between two reconnection attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The membership as this pod knows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MembershipView {
    /// Version of the latest applied update (0: nothing received yet).
    pub version: u64,
    /// Members by id.
    pub members: BTreeMap<String, Member>,
}

/// Why an update could not be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApplyError {
    /// The update's kind is unknown or unset.
    #[error("update {version} has an unknown kind {kind}")]
    UnknownKind {
        /// The update's version.
        version: u64,
        /// The kind received.
        kind: i32,
    },
    /// A change that does not follow the held version (only snapshots may jump).
    #[error("update {version} is not newer than the held version {held}")]
    Stale {
        /// The update's version.
        version: u64,
        /// The version held.
        held: u64,
    },
}

impl MembershipView {
    /// Applies one update. A snapshot replaces everything; an upsert or remove must be newer
    /// than the held version.
    pub fn apply(&mut self, u: &MembershipUpdate) -> Result<(), ApplyError> {
        let kind = MembershipUpdateKind::try_from(u.kind).unwrap_or(MembershipUpdateKind::Unspecified);
        if kind != MembershipUpdateKind::Snapshot && u.version <= self.version {
            return Err(ApplyError::Stale {
                version: u.version,
                held: self.version,
            });
        }
        match kind {
            MembershipUpdateKind::Snapshot => {
                self.members = u.members.iter().map(|m| (m.id.clone(), m.clone())).collect();
            }
            MembershipUpdateKind::Upsert => {
                for m in &u.members {
                    self.members.insert(m.id.clone(), m.clone());
                }
            }
            MembershipUpdateKind::Remove => {
                for m in &u.members {
                    self.members.remove(&m.id);
                }
            }
            MembershipUpdateKind::Unspecified => {
                return Err(ApplyError::UnknownKind {
                    version: u.version,
                    kind: u.kind,
                });
            }
        }
        self.version = u.version;
        Ok(())
    }

    /// Members that are ready (discovery readiness and not down), ordered by id.
    pub fn ready(&self) -> impl Iterator<Item = &Member> {
        self.members.values().filter(|m| m.ready)
    }

    /// Members whose health is `healthy`.
    pub fn healthy(&self) -> impl Iterator<Item = &Member> {
        self.members
            .values()
            .filter(|m| m.health == PeerHealthState::Healthy as i32)
    }
}

#[derive(Clone)]
struct ClientMetrics {
    size: IntGauge,
    ready: IntGauge,
    version: IntGauge,
    connected: IntGauge,
    updates: IntCounterVec,
    reconnects: IntCounter,
}

impl ClientMetrics {
    fn new() -> Result<Self, prometheus::Error> {
        Ok(ClientMetrics {
            size: IntGauge::new(names::VIEW_SIZE, "Members in the membership view this pod uses.")?,
            ready: IntGauge::new(names::VIEW_READY, "Ready members in the membership view this pod uses.")?,
            version: IntGauge::new(names::VIEW_VERSION, "Version of the membership view this pod uses.")?,
            connected: IntGauge::new(names::CONNECTED, "1 while the WatchMembership stream is open.")?,
            updates: IntCounterVec::new(
                Opts::new(names::UPDATES_TOTAL, "Membership updates applied, by kind."),
                &["kind"],
            )?,
            reconnects: IntCounter::new(names::RECONNECTS_TOTAL, "WatchMembership streams reopened.")?,
        })
    }

    fn register(&self, ctx: &ServiceContext) -> Result<(), prometheus::Error> {
        for c in [
            Box::new(self.size.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(self.ready.clone()),
            Box::new(self.version.clone()),
            Box::new(self.connected.clone()),
            Box::new(self.updates.clone()),
            Box::new(self.reconnects.clone()),
        ] {
            match ctx.metrics.register(c) {
                Ok(()) | Err(prometheus::Error::AlreadyReg) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Why the subscriber could not start.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The peer endpoint is unusable.
    #[error(transparent)]
    Client(#[from] peervault_runtime::client::ClientError),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// A running subscription. Dropping it does not stop the task; the task stops when the process
/// drains.
#[derive(Clone)]
pub struct MembershipClient {
    view: watch::Receiver<MembershipView>,
    endpoint: Arc<str>,
}

impl MembershipClient {
    /// Starts subscribing to the peer service at `endpoint` (`host:port`) as `watcher_id`.
    pub fn start(ctx: &ServiceContext, endpoint: &str, watcher_id: &str) -> Result<Self, MembershipError> {
        let channel = ctx.channel("--peer-endpoint", endpoint)?;
        let metrics = ClientMetrics::new()?;
        metrics.register(ctx)?;
        let (tx, view) = watch::channel(MembershipView::default());
        let endpoint: Arc<str> = Arc::from(endpoint);
        let task = tokio::spawn(run(
            PeerServiceClient::new(channel),
            endpoint.clone(),
            watcher_id.to_string(),
            tx,
            metrics,
        ));
        let drain = ctx.clone();
        tokio::spawn(async move {
            drain.draining().await;
            task.abort();
        });
        Ok(MembershipClient { view, endpoint })
    }

    /// The current view; `changed().await` on it waits for the next change.
    pub fn view(&self) -> watch::Receiver<MembershipView> {
        self.view.clone()
    }

    /// The peer service endpoint subscribed to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

fn kind_label(kind: i32) -> &'static str {
    match MembershipUpdateKind::try_from(kind) {
        Ok(MembershipUpdateKind::Snapshot) => "snapshot",
        Ok(MembershipUpdateKind::Upsert) => "upsert",
        Ok(MembershipUpdateKind::Remove) => "remove",
        _ => "unknown",
    }
}

/// Subscribes, applies, and on any failure keeps the view and reconnects with backoff,
/// resuming from the held version.
async fn run(
    mut client: PeerServiceClient<ServiceChannel>,
    endpoint: Arc<str>,
    watcher_id: String,
    tx: watch::Sender<MembershipView>,
    metrics: ClientMetrics,
) {
    let mut backoff = BACKOFF_MIN;
    let mut attempts: u64 = 0;
    loop {
        let since = tx.borrow().version;
        if attempts > 0 {
            metrics.reconnects.inc();
        }
        attempts += 1;
        let req = WatchMembershipRequest {
            since_version: since,
            watcher_id: watcher_id.clone(),
        };
        let reason = match client.watch_membership(req).await {
            Ok(resp) => {
                metrics.connected.set(1);
                tracing::info!(peer_endpoint = %endpoint, since, "membership stream open");
                let mut stream = resp.into_inner();
                let reason = loop {
                    match stream.message().await {
                        Ok(Some(u)) => {
                            backoff = BACKOFF_MIN;
                            apply(&tx, &u, &metrics);
                        }
                        Ok(None) => break "the peer service ended the stream".to_string(),
                        Err(status) => break format!("{:?}: {}", status.code(), status.message()),
                    }
                };
                metrics.connected.set(0);
                reason
            }
            Err(status) => format!("{:?}: {}", status.code(), status.message()),
        };
        let held = tx.borrow().clone();
        tracing::warn!(
            peer_endpoint = %endpoint,
            reason = %reason,
            version = held.version,
            members = held.members.len(),
            retry_in = ?backoff,
            "membership stream lost; keeping the last view"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn apply(tx: &watch::Sender<MembershipView>, u: &MembershipUpdate, metrics: &ClientMetrics) {
    let mut result = Ok(());
    tx.send_if_modified(|view| {
        let before = view.clone();
        result = view.apply(u);
        *view != before
    });
    if let Err(e) = result {
        tracing::warn!(error = %e, "membership update ignored");
        return;
    }
    metrics.updates.with_label_values(&[kind_label(u.kind)]).inc();
    let view = tx.borrow();
    metrics.size.set(view.members.len() as i64);
    metrics.ready.set(view.ready().count() as i64);
    metrics.version.set(view.version as i64);
    let ready: Vec<&str> = view.ready().map(|m| m.id.as_str()).collect();
    tracing::info!(
        version = view.version,
        kind = kind_label(u.kind),
        members = view.members.len(),
        ready = ?ready,
        "membership view changed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, ready: bool) -> Member {
        Member {
            id: id.into(),
            address: "10.0.0.1".into(),
            port: 8082,
            ready,
            ..Default::default()
        }
    }

    fn u(version: u64, kind: MembershipUpdateKind, members: Vec<Member>) -> MembershipUpdate {
        MembershipUpdate {
            version,
            kind: kind as i32,
            members,
        }
    }

    #[test]
    fn snapshots_upserts_and_removes_apply_in_order() {
        let mut v = MembershipView::default();
        v.apply(&u(
            10,
            MembershipUpdateKind::Snapshot,
            vec![m("a", true), m("b", false)],
        ))
        .unwrap();
        assert_eq!(v.members.len(), 2);
        assert_eq!(v.ready().count(), 1);
        v.apply(&u(11, MembershipUpdateKind::Upsert, vec![m("b", true), m("c", true)]))
            .unwrap();
        assert_eq!(v.ready().count(), 3);
        v.apply(&u(12, MembershipUpdateKind::Remove, vec![m("a", false)]))
            .unwrap();
        assert_eq!(v.members.keys().collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(v.version, 12);
        // A stale change is refused and changes nothing.
        let before = v.clone();
        assert!(matches!(
            v.apply(&u(12, MembershipUpdateKind::Upsert, vec![m("z", true)])),
            Err(ApplyError::Stale { .. })
        ));
        assert_eq!(v, before);
        // A snapshot from a restarted peer service may carry any version and replaces all.
        v.apply(&u(5, MembershipUpdateKind::Snapshot, vec![m("x", true)]))
            .unwrap();
        assert_eq!(v.members.keys().collect::<Vec<_>>(), ["x"]);
        assert!(v.apply(&u(6, MembershipUpdateKind::Unspecified, vec![])).is_err());
    }
}
