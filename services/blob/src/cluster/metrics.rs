//! Replication metrics (`peervault_replication_*`).

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Metric names of replication, listed once for code and dashboards.
pub mod names {
    /// Entries in the persisted hand-off queue (replicas still to be written).
    pub const HANDOFF_QUEUE_DEPTH: &str = "peervault_replication_handoff_queue_depth";
    /// Files this pod knows to have fewer than R synced replicas (hand-off entries by key).
    pub const UNDER_REPLICATED: &str = "peervault_replication_under_replicated";
    /// Bytes of chunks sent to other pods, by reason (`write`, `handoff`, `repair`).
    pub const BYTES_SENT_TOTAL: &str = "peervault_replication_bytes_sent_total";
    /// Bytes of chunks received from other pods.
    pub const BYTES_RECEIVED_TOTAL: &str = "peervault_replication_bytes_received_total";
    /// Coordinated writes by outcome (`ok`, `unavailable`, `unknown`).
    pub const WRITES_TOTAL: &str = "peervault_replication_writes_total";
    /// Record reads answered by fewer than a majority of owners.
    pub const DEGRADED_READS_TOTAL: &str = "peervault_replication_degraded_reads_total";
    /// Stale or missing replicas repaired by reads.
    pub const READ_REPAIRS_TOTAL: &str = "peervault_replication_read_repairs_total";
    /// Chunk reads that failed over to another replica (error or hash mismatch).
    pub const FAILOVERS_TOTAL: &str = "peervault_replication_failovers_total";
    /// Time to bring one replica of a file up to date (hand-off, anti-entropy).
    pub const REPAIR_DURATION_SECONDS: &str = "peervault_replication_repair_duration_seconds";
    /// Anti-entropy digest comparisons, by result (`in_sync`, `differ`, `error`).
    pub const DIGEST_ROUNDS_TOTAL: &str = "peervault_replication_digest_rounds_total";
    /// Clock readings refused for being too far in the future.
    pub const CLOCK_REFUSALS_TOTAL: &str = "peervault_replication_clock_refusals_total";
    /// Members in the placement this pod uses.
    pub const MEMBERS: &str = "peervault_replication_members";
    /// Replication factor in force (R capped by the member count).
    pub const FACTOR: &str = "peervault_replication_factor";
    /// Chunks found corrupt by scrub and repaired from a replica.
    pub const SCRUB_REPAIRED_TOTAL: &str = "peervault_replication_scrub_repaired_total";
    /// Tombstones collected by anti-entropy after every owner confirmed them and the grace
    /// period passed.
    pub const TOMBSTONES_COLLECTED_TOTAL: &str = "peervault_replication_tombstones_collected_total";
    /// Items per coalesced replication call, by call (`get_records`, `put_records`,
    /// `commit_records`).
    pub const BATCH_SIZE: &str = "peervault_replication_batch_size";
    /// Resumed Graviton upload sessions relayed to the pod that holds the upload, by result
    /// (`ok`, `error`: the holder refused, failed or could not be reached).
    pub const UPLOADS_FORWARDED_TOTAL: &str = "peervault_replication_uploads_forwarded_total";

    /// Every name above.
    pub const ALL: &[&str] = &[
        HANDOFF_QUEUE_DEPTH,
        UNDER_REPLICATED,
        BYTES_SENT_TOTAL,
        BYTES_RECEIVED_TOTAL,
        WRITES_TOTAL,
        DEGRADED_READS_TOTAL,
        READ_REPAIRS_TOTAL,
        FAILOVERS_TOTAL,
        REPAIR_DURATION_SECONDS,
        DIGEST_ROUNDS_TOTAL,
        CLOCK_REFUSALS_TOTAL,
        MEMBERS,
        FACTOR,
        SCRUB_REPAIRED_TOTAL,
        TOMBSTONES_COLLECTED_TOTAL,
        BATCH_SIZE,
        UPLOADS_FORWARDED_TOTAL,
    ];
}

/// The replication metrics. Cheap to clone.
#[derive(Clone)]
pub struct ClusterMetrics {
    /// See [`names::HANDOFF_QUEUE_DEPTH`].
    pub handoff_depth: IntGauge,
    /// See [`names::UNDER_REPLICATED`].
    pub under_replicated: IntGauge,
    /// See [`names::BYTES_SENT_TOTAL`].
    pub bytes_sent: IntCounterVec,
    /// See [`names::BYTES_RECEIVED_TOTAL`].
    pub bytes_received: IntCounter,
    /// See [`names::WRITES_TOTAL`].
    pub writes: IntCounterVec,
    /// See [`names::DEGRADED_READS_TOTAL`].
    pub degraded_reads: IntCounter,
    /// See [`names::READ_REPAIRS_TOTAL`].
    pub read_repairs: IntCounter,
    /// See [`names::FAILOVERS_TOTAL`].
    pub failovers: IntCounter,
    /// See [`names::REPAIR_DURATION_SECONDS`].
    pub repair_duration: Histogram,
    /// See [`names::DIGEST_ROUNDS_TOTAL`].
    pub digest_rounds: IntCounterVec,
    /// See [`names::CLOCK_REFUSALS_TOTAL`].
    pub clock_refusals: IntCounter,
    /// See [`names::MEMBERS`].
    pub members: IntGauge,
    /// See [`names::FACTOR`].
    pub factor: IntGauge,
    /// See [`names::SCRUB_REPAIRED_TOTAL`].
    pub scrub_repaired: IntCounter,
    /// See [`names::TOMBSTONES_COLLECTED_TOTAL`].
    pub tombstones_collected: IntCounter,
    /// See [`names::BATCH_SIZE`].
    pub batch_size: HistogramVec,
    /// See [`names::UPLOADS_FORWARDED_TOTAL`].
    pub uploads_forwarded: IntCounterVec,
}

impl ClusterMetrics {
    /// Creates the metrics and registers them in `registry` when given.
    pub fn new(registry: Option<&Registry>) -> Result<Self, prometheus::Error> {
        let m = ClusterMetrics {
            handoff_depth: IntGauge::new(names::HANDOFF_QUEUE_DEPTH, "Entries in the persisted hand-off queue.")?,
            under_replicated: IntGauge::new(names::UNDER_REPLICATED, "Files with replicas still to be written.")?,
            bytes_sent: IntCounterVec::new(
                Opts::new(names::BYTES_SENT_TOTAL, "Chunk bytes sent to other pods, by reason."),
                &["reason"],
            )?,
            bytes_received: IntCounter::new(names::BYTES_RECEIVED_TOTAL, "Chunk bytes received from other pods.")?,
            writes: IntCounterVec::new(
                Opts::new(names::WRITES_TOTAL, "Coordinated writes by outcome."),
                &["result"],
            )?,
            degraded_reads: IntCounter::new(
                names::DEGRADED_READS_TOTAL,
                "Record reads answered by fewer than a majority of owners.",
            )?,
            read_repairs: IntCounter::new(names::READ_REPAIRS_TOTAL, "Stale replicas repaired by reads.")?,
            failovers: IntCounter::new(
                names::FAILOVERS_TOTAL,
                "Chunk reads that failed over to another replica.",
            )?,
            repair_duration: Histogram::with_opts(
                HistogramOpts::new(
                    names::REPAIR_DURATION_SECONDS,
                    "Time to bring one replica of a file up to date.",
                )
                .buckets(prometheus::exponential_buckets(0.001, 4.0, 10)?),
            )?,
            digest_rounds: IntCounterVec::new(
                Opts::new(names::DIGEST_ROUNDS_TOTAL, "Anti-entropy digest comparisons by result."),
                &["result"],
            )?,
            clock_refusals: IntCounter::new(
                names::CLOCK_REFUSALS_TOTAL,
                "Clock readings refused for being too far in the future.",
            )?,
            members: IntGauge::new(names::MEMBERS, "Members in the placement this pod uses.")?,
            factor: IntGauge::new(names::FACTOR, "Replication factor in force.")?,
            scrub_repaired: IntCounter::new(names::SCRUB_REPAIRED_TOTAL, "Corrupt chunks repaired by scrub.")?,
            tombstones_collected: IntCounter::new(
                names::TOMBSTONES_COLLECTED_TOTAL,
                "Tombstones collected once every owner held them and the grace period passed.",
            )?,
            batch_size: HistogramVec::new(
                HistogramOpts::new(names::BATCH_SIZE, "Items per coalesced replication call, by call.")
                    .buckets(prometheus::exponential_buckets(1.0, 2.0, 9)?),
                &["call"],
            )?,
            uploads_forwarded: IntCounterVec::new(
                Opts::new(
                    names::UPLOADS_FORWARDED_TOTAL,
                    "Resumed upload sessions relayed to the pod holding the upload, by result.",
                ),
                &["result"],
            )?,
        };
        if let Some(r) = registry {
            let all: Vec<Box<dyn prometheus::core::Collector>> = vec![
                Box::new(m.handoff_depth.clone()),
                Box::new(m.under_replicated.clone()),
                Box::new(m.bytes_sent.clone()),
                Box::new(m.bytes_received.clone()),
                Box::new(m.writes.clone()),
                Box::new(m.degraded_reads.clone()),
                Box::new(m.read_repairs.clone()),
                Box::new(m.failovers.clone()),
                Box::new(m.repair_duration.clone()),
                Box::new(m.digest_rounds.clone()),
                Box::new(m.clock_refusals.clone()),
                Box::new(m.members.clone()),
                Box::new(m.factor.clone()),
                Box::new(m.scrub_repaired.clone()),
                Box::new(m.tombstones_collected.clone()),
                Box::new(m.batch_size.clone()),
                Box::new(m.uploads_forwarded.clone()),
            ];
            for c in all {
                match r.register(c) {
                    Ok(()) | Err(prometheus::Error::AlreadyReg) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        // Labelled series exist from the start so dashboards and tests see them.
        for reason in ["write", "handoff", "repair"] {
            m.bytes_sent.with_label_values(&[reason]);
        }
        for result in ["ok", "unavailable", "unknown"] {
            m.writes.with_label_values(&[result]);
        }
        for call in ["get_records", "put_records", "commit_records"] {
            m.batch_size.with_label_values(&[call]);
        }
        for result in ["in_sync", "differ", "error"] {
            m.digest_rounds.with_label_values(&[result]);
        }
        for result in ["ok", "error"] {
            m.uploads_forwarded.with_label_values(&[result]);
        }
        Ok(m)
    }
}
