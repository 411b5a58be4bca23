//! The peer service's own metrics. Names are listed once in [`names`] (dashboards use only
//! these, beside the runtime's list).

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, core::Collector};

/// Metric names of the peer service.
pub mod names {
    /// 1 when the peer's latest state is `healthy` or `degraded`, 0 when `down` or `unknown`.
    pub const PEER_UP: &str = "peervault_peer_up";
    /// Health checks by result (`ok`, `slow`, `failed`, `timeout`, `not_serving`).
    pub const PEER_PROBES_TOTAL: &str = "peervault_peer_probes_total";
    /// Round-trip time of passing health checks, in seconds.
    pub const PEER_PROBE_DURATION_SECONDS: &str = "peervault_peer_probe_duration_seconds";
    /// Health state changes, by the state entered.
    pub const PEER_HEALTH_TRANSITIONS_TOTAL: &str = "peervault_peer_health_transitions_total";
    /// Members in the membership view (removed peers excluded).
    pub const MEMBERSHIP_SIZE: &str = "peervault_peer_membership_size";
    /// Version of the membership view.
    pub const MEMBERSHIP_VERSION: &str = "peervault_peer_membership_version";
    /// Discovery errors (failed lookups, watch errors), by provider.
    pub const DISCOVERY_ERRORS_TOTAL: &str = "peervault_peer_discovery_errors_total";
    /// Endpoints the discovery provider reports, by provider.
    pub const DISCOVERED: &str = "peervault_peer_discovered";
    /// Open WatchMembership streams.
    pub const WATCHERS: &str = "peervault_peer_watchers";

    /// Every name above.
    pub const ALL: &[&str] = &[
        PEER_UP,
        PEER_PROBES_TOTAL,
        PEER_PROBE_DURATION_SECONDS,
        PEER_HEALTH_TRANSITIONS_TOTAL,
        MEMBERSHIP_SIZE,
        MEMBERSHIP_VERSION,
        DISCOVERY_ERRORS_TOTAL,
        DISCOVERED,
        WATCHERS,
    ];
}

/// The peer service's collectors. Cheap to clone.
#[derive(Clone)]
pub struct PeerMetrics {
    /// `peervault_peer_up{peer}`.
    pub up: IntGaugeVec,
    /// `peervault_peer_probes_total{result}`.
    pub probes: IntCounterVec,
    /// `peervault_peer_probe_duration_seconds`.
    pub probe_duration: Histogram,
    /// `peervault_peer_health_transitions_total{state}`.
    pub transitions: IntCounterVec,
    /// `peervault_peer_membership_size`.
    pub size: IntGauge,
    /// `peervault_peer_membership_version`.
    pub version: IntGauge,
    /// `peervault_peer_discovery_errors_total{provider}`.
    pub discovery_errors: IntCounterVec,
    /// `peervault_peer_discovered{provider}`.
    pub discovered: IntGaugeVec,
    /// `peervault_peer_watchers`.
    pub watchers: IntGauge,
}

impl PeerMetrics {
    /// New, unregistered collectors.
    pub fn new() -> Result<Self, prometheus::Error> {
        Ok(PeerMetrics {
            up: IntGaugeVec::new(
                Opts::new(
                    names::PEER_UP,
                    "1 when the peer answers its health checks, 0 otherwise.",
                ),
                &["peer"],
            )?,
            probes: IntCounterVec::new(
                Opts::new(names::PEER_PROBES_TOTAL, "Health checks by result."),
                &["result"],
            )?,
            probe_duration: Histogram::with_opts(
                HistogramOpts::new(
                    names::PEER_PROBE_DURATION_SECONDS,
                    "Round-trip time of passing health checks, in seconds.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
            )?,
            transitions: IntCounterVec::new(
                Opts::new(
                    names::PEER_HEALTH_TRANSITIONS_TOTAL,
                    "Health state changes, by the state entered.",
                ),
                &["state"],
            )?,
            size: IntGauge::new(names::MEMBERSHIP_SIZE, "Members in the membership view.")?,
            version: IntGauge::new(names::MEMBERSHIP_VERSION, "Version of the membership view.")?,
            discovery_errors: IntCounterVec::new(
                Opts::new(names::DISCOVERY_ERRORS_TOTAL, "Discovery errors, by provider."),
                &["provider"],
            )?,
            discovered: IntGaugeVec::new(
                Opts::new(names::DISCOVERED, "Endpoints the discovery provider reports."),
                &["provider"],
            )?,
            watchers: IntGauge::new(names::WATCHERS, "Open WatchMembership streams.")?,
        })
    }

    /// Every collector, for registering in the process registry.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.up.clone()),
            Box::new(self.probes.clone()),
            Box::new(self.probe_duration.clone()),
            Box::new(self.transitions.clone()),
            Box::new(self.size.clone()),
            Box::new(self.version.clone()),
            Box::new(self.discovery_errors.clone()),
            Box::new(self.discovered.clone()),
            Box::new(self.watchers.clone()),
        ]
    }
}
