//! The membership view: what discovery reports, plus peers added by hand, minus peers removed by
//! hand, each with its health. Every change of the view gets a new version, is kept in a bounded
//! log (so a reconnecting watcher can resume), and is broadcast to WatchMembership streams.
//!
//! All state sits behind one mutex that is never held across an `.await`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use peervault_proto::v1::{Member, MemberSource, MembershipUpdate, MembershipUpdateKind, PeerHealthState};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::{
    error::PeerError,
    events::{EventSink, peer_event},
    health::{HealthPolicy, HealthRecord, ProbeOutcome, status_word},
    metrics::PeerMetrics,
};

/// Changes kept for resuming watchers; older ones force a snapshot.
pub const LOG_CAPACITY: usize = 1024;
/// Updates buffered per watcher before it lags (and then gets a snapshot).
pub const BROADCAST_CAPACITY: usize = 256;

/// One endpoint reported by a discovery provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// Stable id (pod name, SRV target, or `host:port`).
    pub id: String,
    /// Host name or IP to dial.
    pub address: String,
    /// gRPC port.
    pub port: u16,
    /// Whether discovery says it is ready (EndpointSlice condition; always true for DNS/static).
    pub ready: bool,
    /// Zone, when known.
    pub zone: String,
    /// Kubernetes node name, when known.
    pub node_name: String,
    /// Labels from discovery.
    pub metadata: BTreeMap<String, String>,
    /// The provider.
    pub source: MemberSource,
}

impl Discovered {
    /// An endpoint known only by `host:port`, with `host:port` as its id.
    pub fn plain(address: &str, port: u16, source: MemberSource) -> Self {
        Discovered {
            id: join_host_port(address, port),
            address: address.to_string(),
            port,
            ready: true,
            zone: String::new(),
            node_name: String::new(),
            metadata: BTreeMap::new(),
            source,
        }
    }
}

/// `host:port`, bracketing IPv6 literals.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A peer added with AddPeer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManualPeer {
    /// Host name or IP.
    pub address: String,
    /// gRPC port.
    pub port: u16,
    /// Metadata given to AddPeer.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// When it was added, milliseconds since the epoch.
    pub created_at_ms: u64,
}

/// Peers added and removed by hand: what the store persists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManualPeers {
    /// Added peers by id.
    #[serde(default)]
    pub added: BTreeMap<String, ManualPeer>,
    /// Ids excluded from the membership even when discovery reports them.
    #[serde(default)]
    pub removed: BTreeSet<String>,
}

/// A peer as the API shows it.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The member as watchers see it.
    pub member: Member,
    /// When it first became known.
    pub created_at: SystemTime,
    /// Its health.
    pub health: HealthRecord,
}

struct Inner {
    discovered: BTreeMap<String, Discovered>,
    manual: ManualPeers,
    created: HashMap<String, SystemTime>,
    health: HashMap<String, HealthRecord>,
    /// The view as last published (last_seen as of that moment).
    view: BTreeMap<String, Member>,
    version: u64,
    log: VecDeque<MembershipUpdate>,
}

/// The membership view and its change stream. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Mutex<Inner>>,
    updates: broadcast::Sender<MembershipUpdate>,
    targets: watch::Sender<BTreeMap<String, (String, u16)>>,
    metrics: PeerMetrics,
    events: Arc<dyn EventSink>,
    policy: HealthPolicy,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

pub use peervault_runtime::time::timestamp;

/// A member without its last_seen, for deciding whether it changed.
fn same_member(a: &Member, b: &Member) -> bool {
    let mut a = a.clone();
    a.last_seen = None;
    let mut b = b.clone();
    b.last_seen = None;
    a == b
}

impl Registry {
    /// An empty view with `manual` peers loaded from the store. Versions start at the current
    /// time in microseconds, so a restarted service always has higher versions than before and
    /// a watcher that resumes from an old version gets a snapshot.
    pub fn new(manual: ManualPeers, policy: HealthPolicy, metrics: PeerMetrics, events: Arc<dyn EventSink>) -> Self {
        let base = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_micros() as u64;
        let (updates, _) = broadcast::channel(BROADCAST_CAPACITY);
        let (targets, _) = watch::channel(BTreeMap::new());
        let reg = Registry {
            inner: Arc::new(Mutex::new(Inner {
                discovered: BTreeMap::new(),
                manual,
                created: HashMap::new(),
                health: HashMap::new(),
                view: BTreeMap::new(),
                version: base,
                log: VecDeque::new(),
            })),
            updates,
            targets,
            metrics,
            events,
            policy,
        };
        {
            let mut g = reg.lock();
            reg.recompute(&mut g, "start");
        }
        reg
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The health thresholds in force.
    pub fn policy(&self) -> HealthPolicy {
        self.policy
    }

    /// The metrics this registry records into.
    pub fn metrics(&self) -> &PeerMetrics {
        &self.metrics
    }

    /// Members to probe (id → address, port); changes whenever the view's set or addresses do.
    pub fn targets(&self) -> watch::Receiver<BTreeMap<String, (String, u16)>> {
        self.targets.subscribe()
    }

    /// Replaces what discovery reports.
    pub fn set_discovered(&self, provider: &'static str, endpoints: Vec<Discovered>) {
        self.metrics
            .discovered
            .with_label_values(&[provider])
            .set(endpoints.len() as i64);
        let mut g = self.lock();
        let mut map = BTreeMap::new();
        for e in endpoints {
            // The first report of an id wins (a pod in two slices, a name with two records).
            map.entry(e.id.clone()).or_insert(e);
        }
        if map == g.discovered {
            return;
        }
        g.discovered = map;
        self.recompute(&mut g, "discovery");
    }

    /// The peers added and removed by hand.
    pub fn manual(&self) -> ManualPeers {
        self.lock().manual.clone()
    }

    /// Installs a new set of manual peers (after the store accepted it).
    pub fn set_manual(&self, manual: ManualPeers) {
        let mut g = self.lock();
        if g.manual == manual {
            return;
        }
        g.manual = manual;
        self.recompute(&mut g, "manual");
    }

    /// Checks that a peer with this id or address is not in the view yet.
    pub fn check_new(&self, id: &str, address: &str, port: u16) -> Result<(), PeerError> {
        let g = self.lock();
        if g.view.contains_key(id) {
            return Err(PeerError::AlreadyExists(format!(
                "a peer with id '{id}' is already known: choose another id or RemovePeer it first"
            )));
        }
        if let Some(m) = g
            .view
            .values()
            .find(|m| m.address.eq_ignore_ascii_case(address) && m.port == i32::from(port))
        {
            return Err(PeerError::AlreadyExists(format!(
                "{} is already known as peer '{}'",
                join_host_port(address, port),
                m.id
            )));
        }
        Ok(())
    }

    /// Whether `id` is in the view.
    pub fn contains(&self, id: &str) -> bool {
        self.lock().view.contains_key(id)
    }

    /// Every peer in the view, ordered by id.
    pub fn list(&self) -> Vec<PeerInfo> {
        let g = self.lock();
        g.view.keys().filter_map(|id| Self::info(&g, id)).collect()
    }

    /// One peer.
    pub fn get(&self, id: &str) -> Result<PeerInfo, PeerError> {
        let g = self.lock();
        Self::info(&g, id).ok_or_else(|| PeerError::NotFound(id.to_string()))
    }

    fn info(g: &Inner, id: &str) -> Option<PeerInfo> {
        let mut member = g.view.get(id)?.clone();
        let health = g.health.get(id).cloned().unwrap_or_default();
        member.last_seen = health.last_seen.map(timestamp);
        Some(PeerInfo {
            member,
            created_at: g.created.get(id).copied().unwrap_or(UNIX_EPOCH),
            health,
        })
    }

    /// The whole view as a SNAPSHOT update at the current version.
    pub fn snapshot(&self) -> MembershipUpdate {
        let g = self.lock();
        Self::snapshot_locked(&g)
    }

    fn snapshot_locked(g: &Inner) -> MembershipUpdate {
        MembershipUpdate {
            version: g.version,
            kind: MembershipUpdateKind::Snapshot as i32,
            members: g
                .view
                .keys()
                .filter_map(|id| Self::info(g, id))
                .map(|p| p.member)
                .collect(),
        }
    }

    /// The current version.
    pub fn version(&self) -> u64 {
        self.lock().version
    }

    /// What a watcher that has applied `since` needs first, and a receiver for the changes
    /// after that. Both are taken under one lock, so nothing falls between them.
    pub fn watch(&self, since: u64) -> (Vec<MembershipUpdate>, broadcast::Receiver<MembershipUpdate>) {
        let g = self.lock();
        let rx = self.updates.subscribe();
        let first = if since == g.version {
            Vec::new()
        } else if since != 0 && since < g.version && g.log.front().is_some_and(|u| u.version <= since + 1) {
            g.log.iter().filter(|u| u.version > since).cloned().collect()
        } else {
            vec![Self::snapshot_locked(&g)]
        };
        (first, rx)
    }

    /// Records one health check of `id`.
    pub fn record_probe(&self, id: &str, outcome: &ProbeOutcome) {
        match outcome {
            ProbeOutcome::Serving(rtt) => {
                self.metrics.probe_duration.observe(rtt.as_secs_f64());
                let label = if *rtt > self.policy.slow { "slow" } else { "ok" };
                self.metrics.probes.with_label_values(&[label]).inc();
            }
            ProbeOutcome::Failed { reason, .. } => self.metrics.probes.with_label_values(&[reason]).inc(),
        }
        let mut g = self.lock();
        if !g.view.contains_key(id) {
            return;
        }
        let policy = self.policy;
        let rec = g.health.entry(id.to_string()).or_default();
        let changed = rec.apply(outcome, &policy);
        let rec = rec.clone();
        let up = matches!(rec.state, PeerHealthState::Healthy | PeerHealthState::Degraded);
        self.metrics.up.with_label_values(&[id]).set(i64::from(up));
        let Some(prev) = changed else { return };
        let state = rec.state;
        self.metrics.transitions.with_label_values(&[status_word(state)]).inc();
        let (address, port) = g.view.get(id).map(|m| (m.address.clone(), m.port)).unwrap_or_default();
        let reason = match outcome {
            ProbeOutcome::Failed { reason, .. } => *reason,
            ProbeOutcome::Serving(_) => "",
        };
        tracing::info!(
            peer = id,
            address = %address,
            port,
            from = status_word(prev),
            to = status_word(state),
            consecutive_failures = rec.consecutive_failures,
            latency_ms = rec.latency_last_ms,
            reason,
            last_error = %rec.last_error,
            "peer health changed"
        );
        let mut meta = BTreeMap::from([
            ("address".to_string(), address.clone()),
            ("port".to_string(), port.to_string()),
            ("status".to_string(), status_word(state).to_string()),
            ("previous_status".to_string(), status_word(prev).to_string()),
            ("latency_ms".to_string(), format!("{:.3}", rec.latency_avg_ms)),
        ]);
        if !reason.is_empty() {
            meta.insert("reason".into(), reason.to_string());
        }
        self.events.publish(peer_event(
            "peer_health_changed",
            id,
            &meta,
            serde_json::json!({
                "id": id,
                "address": address,
                "port": port,
                "status": status_word(state),
                "previous_status": status_word(prev),
                "latency_ms": rec.latency_avg_ms,
                "consecutive_failures": rec.consecutive_failures,
            }),
        ));
        let was_up = matches!(prev, PeerHealthState::Healthy | PeerHealthState::Degraded);
        if up && !was_up {
            self.events.publish(peer_event(
                "peer_connected",
                id,
                &meta,
                serde_json::json!({"id": id, "address": address, "port": port, "capabilities": ["storage"]}),
            ));
        } else if state == PeerHealthState::Down && was_up {
            let reason = if reason.is_empty() { "unreachable" } else { reason };
            meta.insert("reason".into(), reason.to_string());
            self.events.publish(peer_event(
                "peer_disconnected",
                id,
                &meta,
                serde_json::json!({"id": id, "reason": reason}),
            ));
        }
        self.recompute(&mut g, "health");
    }

    /// Rebuilds the view from discovery, manual peers and health; publishes what changed.
    fn recompute(&self, g: &mut Inner, cause: &'static str) {
        let now = SystemTime::now();
        let mut next: BTreeMap<String, Member> = BTreeMap::new();
        for d in g.discovered.values() {
            if g.manual.removed.contains(&d.id) || g.manual.added.contains_key(&d.id) {
                continue;
            }
            next.insert(
                d.id.clone(),
                Member {
                    id: d.id.clone(),
                    address: d.address.clone(),
                    port: i32::from(d.port),
                    ready: d.ready,
                    zone: d.zone.clone(),
                    node_name: d.node_name.clone(),
                    health: 0,
                    source: d.source as i32,
                    last_seen: None,
                    metadata: d.metadata.clone().into_iter().collect(),
                },
            );
        }
        for (id, m) in &g.manual.added {
            next.insert(
                id.clone(),
                Member {
                    id: id.clone(),
                    address: m.address.clone(),
                    port: i32::from(m.port),
                    ready: true,
                    zone: m.metadata.get("zone").cloned().unwrap_or_default(),
                    node_name: m.metadata.get("node").cloned().unwrap_or_default(),
                    health: 0,
                    source: MemberSource::Manual as i32,
                    last_seen: None,
                    metadata: m.metadata.clone().into_iter().collect(),
                },
            );
            let created = UNIX_EPOCH + Duration::from_millis(m.created_at_ms);
            g.created.entry(id.clone()).or_insert(created);
        }
        for (id, m) in next.iter_mut() {
            let h = g.health.get(id).cloned().unwrap_or_default();
            m.health = h.state as i32;
            m.ready = m.ready && h.state != PeerHealthState::Down;
            m.last_seen = h.last_seen.map(timestamp);
            g.created.entry(id.clone()).or_insert(now);
        }

        let upserts: Vec<Member> = next
            .values()
            .filter(|m| g.view.get(&m.id).is_none_or(|old| !same_member(old, m)))
            .cloned()
            .collect();
        let removed: Vec<Member> = g
            .view
            .values()
            .filter(|m| !next.contains_key(&m.id))
            .map(|m| Member {
                id: m.id.clone(),
                ..Default::default()
            })
            .collect();
        let joined: Vec<String> = next.keys().filter(|id| !g.view.contains_key(*id)).cloned().collect();
        // Forget what is known about members that left, so one that comes back starts afresh.
        for m in &removed {
            g.health.remove(&m.id);
            g.created.remove(&m.id);
            let _ = self.metrics.up.remove_label_values(&[m.id.as_str()]);
        }
        for id in &joined {
            self.metrics.up.with_label_values(&[id.as_str()]).set(0);
        }
        g.view = next;
        for (kind, members) in [
            (MembershipUpdateKind::Upsert, upserts),
            (MembershipUpdateKind::Remove, removed.clone()),
        ] {
            if members.is_empty() {
                continue;
            }
            g.version += 1;
            let update = MembershipUpdate {
                version: g.version,
                kind: kind as i32,
                members,
            };
            if g.log.len() == LOG_CAPACITY {
                g.log.pop_front();
            }
            g.log.push_back(update.clone());
            // No receivers is fine: nobody watches yet.
            let _ = self.updates.send(update);
        }
        self.metrics.size.set(g.view.len() as i64);
        self.metrics.version.set(g.version as i64);

        if !joined.is_empty() || !removed.is_empty() {
            let left: Vec<&str> = removed.iter().map(|m| m.id.as_str()).collect();
            tracing::info!(
                cause,
                version = g.version,
                members = g.view.len(),
                joined = ?joined,
                left = ?left,
                "membership changed"
            );
            for id in &left {
                let reason = if g.manual.removed.contains(*id) {
                    "removed"
                } else {
                    "left_discovery"
                };
                self.events.publish(peer_event(
                    "peer_disconnected",
                    id,
                    &BTreeMap::from([("reason".to_string(), reason.to_string())]),
                    serde_json::json!({"id": id, "reason": reason}),
                ));
            }
            let members: Vec<&str> = g.view.keys().map(String::as_str).collect();
            self.events.publish(peer_event(
                "network_topology_changed",
                "",
                &BTreeMap::from([
                    ("members".to_string(), g.view.len().to_string()),
                    ("version".to_string(), g.version.to_string()),
                    ("cause".to_string(), cause.to_string()),
                ]),
                serde_json::json!({
                    "members": members,
                    "joined": joined,
                    "left": left,
                    "version": g.version,
                }),
            ));
        }
        let targets: BTreeMap<String, (String, u16)> = g
            .view
            .values()
            .map(|m| (m.id.clone(), (m.address.clone(), m.port as u16)))
            .collect();
        self.targets.send_if_modified(|t| {
            if *t == targets {
                false
            } else {
                *t = targets;
                true
            }
        });
    }

    /// Milliseconds since the epoch, for stamping manual peers.
    pub fn now_ms() -> u64 {
        now_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::testing::Collect;

    fn registry() -> (Registry, Arc<Collect>) {
        let events = Arc::new(Collect::default());
        let r = Registry::new(
            ManualPeers::default(),
            HealthPolicy {
                down_after: 2,
                up_after: 1,
                ..Default::default()
            },
            PeerMetrics::new().unwrap(),
            events.clone(),
        );
        (r, events)
    }

    fn d(id: &str, port: u16) -> Discovered {
        Discovered {
            id: id.into(),
            ..Discovered::plain("10.0.0.1", port, MemberSource::Static)
        }
    }

    fn apply(view: &mut BTreeMap<String, Member>, u: &MembershipUpdate) {
        match MembershipUpdateKind::try_from(u.kind).unwrap() {
            MembershipUpdateKind::Snapshot => {
                view.clear();
                for m in &u.members {
                    view.insert(m.id.clone(), m.clone());
                }
            }
            MembershipUpdateKind::Upsert => {
                for m in &u.members {
                    view.insert(m.id.clone(), m.clone());
                }
            }
            MembershipUpdateKind::Remove => {
                for m in &u.members {
                    view.remove(&m.id);
                }
            }
            MembershipUpdateKind::Unspecified => panic!("unspecified"),
        }
    }

    #[test]
    fn discovery_manual_and_removal_combine_into_one_view() {
        let (r, events) = registry();
        r.set_discovered("static", vec![d("a", 1), d("b", 2)]);
        assert_eq!(r.list().len(), 2);
        let mut manual = r.manual();
        manual.added.insert(
            "m".into(),
            ManualPeer {
                address: "10.0.0.9".into(),
                port: 9,
                metadata: BTreeMap::from([("zone".into(), "z1".into())]),
                created_at_ms: 1,
            },
        );
        manual.removed.insert("a".into());
        r.set_manual(manual);
        let ids: Vec<String> = r.list().into_iter().map(|p| p.member.id).collect();
        assert_eq!(ids, ["b", "m"]);
        assert_eq!(r.get("m").unwrap().member.zone, "z1");
        assert!(matches!(r.get("a"), Err(PeerError::NotFound(_))));
        // Discovery reporting a removed peer again does not bring it back.
        r.set_discovered("static", vec![d("a", 1), d("b", 2), d("c", 3)]);
        let ids: Vec<String> = r.list().into_iter().map(|p| p.member.id).collect();
        assert_eq!(ids, ["b", "c", "m"]);
        assert!(matches!(r.check_new("b", "x", 1), Err(PeerError::AlreadyExists(_))));
        assert!(matches!(
            r.check_new("new", "10.0.0.1", 2),
            Err(PeerError::AlreadyExists(_))
        ));
        assert!(r.check_new("new", "10.0.0.1", 4).is_ok());
        let kinds = events.kinds();
        assert!(kinds.contains(&"network_topology_changed".to_string()), "{kinds:?}");
        assert!(kinds.contains(&"peer_disconnected".to_string()), "{kinds:?}");
    }

    #[test]
    fn watchers_resume_from_the_log_or_get_a_snapshot() {
        let (r, _) = registry();
        let (first, _rx) = r.watch(0);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].kind, MembershipUpdateKind::Snapshot as i32);
        let v0 = first[0].version;
        r.set_discovered("static", vec![d("a", 1)]);
        r.set_discovered("static", vec![d("a", 1), d("b", 2)]);
        r.set_discovered("static", vec![d("b", 2)]);
        // Resuming from v0 replays exactly the three changes.
        let (first, _) = r.watch(v0);
        assert_eq!(first.len(), 3);
        let mut view = BTreeMap::new();
        for u in &first {
            apply(&mut view, u);
        }
        assert_eq!(view.keys().collect::<Vec<_>>(), ["b"]);
        assert!(first.windows(2).all(|w| w[0].version < w[1].version));
        // Up to date: nothing first.
        assert!(r.watch(r.version()).0.is_empty());
        // From another incarnation (newer or unknown version): a snapshot.
        let (first, _) = r.watch(r.version() + 100);
        assert_eq!(first[0].kind, MembershipUpdateKind::Snapshot as i32);
        let (first, _) = r.watch(1);
        assert_eq!(first[0].kind, MembershipUpdateKind::Snapshot as i32);
    }

    #[test]
    fn live_changes_reach_subscribers_in_version_order() {
        let (r, _) = registry();
        let (first, mut rx) = r.watch(0);
        let mut view = BTreeMap::new();
        apply(&mut view, &first[0]);
        r.set_discovered("static", vec![d("a", 1), d("b", 2)]);
        r.record_probe("a", &ProbeOutcome::Serving(Duration::from_millis(1)));
        r.set_discovered("static", vec![d("a", 1)]);
        let mut last = first[0].version;
        while let Ok(u) = rx.try_recv() {
            assert!(u.version > last);
            last = u.version;
            apply(&mut view, &u);
        }
        assert_eq!(view.len(), 1);
        assert_eq!(view["a"].health, PeerHealthState::Healthy as i32);
        assert_eq!(last, r.version());
    }

    #[test]
    fn health_changes_update_the_view_and_emit_events() {
        let (r, events) = registry();
        r.set_discovered("static", vec![d("a", 1)]);
        let v = r.version();
        // Probes that change nothing keep the version.
        r.record_probe("a", &ProbeOutcome::Serving(Duration::from_millis(1)));
        let v1 = r.version();
        assert!(v1 > v);
        r.record_probe("a", &ProbeOutcome::Serving(Duration::from_millis(1)));
        assert_eq!(r.version(), v1);
        let fail = ProbeOutcome::Failed {
            reason: "timeout",
            detail: "deadline".into(),
        };
        r.record_probe("a", &fail);
        r.record_probe("a", &fail);
        let p = r.get("a").unwrap();
        assert_eq!(p.health.state, PeerHealthState::Down);
        assert!(!p.member.ready);
        assert!(p.member.last_seen.is_some());
        assert_eq!(r.metrics().up.with_label_values(&["a"]).get(), 0);
        r.record_probe("a", &ProbeOutcome::Serving(Duration::from_millis(1)));
        assert_eq!(r.get("a").unwrap().health.state, PeerHealthState::Healthy);
        assert_eq!(r.metrics().up.with_label_values(&["a"]).get(), 1);
        let kinds = events.kinds();
        for k in ["peer_connected", "peer_health_changed", "peer_disconnected"] {
            assert!(kinds.iter().any(|x| x == k), "{k} missing from {kinds:?}");
        }
        // Probes of unknown ids are ignored.
        r.record_probe("zzz", &fail);
        assert!(r.get("zzz").is_err());
    }

    #[test]
    fn targets_follow_the_view() {
        let (r, _) = registry();
        let mut t = r.targets();
        r.set_discovered("static", vec![d("a", 1)]);
        assert!(t.has_changed().unwrap());
        assert_eq!(t.borrow_and_update().get("a"), Some(&("10.0.0.1".to_string(), 1)));
        r.record_probe("a", &ProbeOutcome::Serving(Duration::from_millis(1)));
        assert!(!t.has_changed().unwrap(), "health changes do not restart probes");
    }
}
