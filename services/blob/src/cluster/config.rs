//! Replication flags (each also a `PEERVAULT_*` environment variable).

use std::time::Duration;

use clap::Args;
use peervault_runtime::config::parse_duration;

/// How the blob pods replicate.
#[derive(Debug, Clone, Args)]
pub struct ClusterConfig {
    /// Copies of every file (capped by the number of blob pods in the membership).
    #[arg(long, env = "PEERVAULT_REPLICATION_FACTOR", default_value_t = 3, value_name = "N")]
    pub replication_factor: usize,

    /// Bytes per second background repair (hand-off, anti-entropy) may send; 0 means no limit.
    #[arg(long, env = "PEERVAULT_REPAIR_BYTES_PER_SECOND", default_value_t = 64 * 1024 * 1024, value_name = "BYTES")]
    pub repair_bytes_per_second: u64,

    /// Files repaired in parallel by background repair.
    #[arg(long, env = "PEERVAULT_REPAIR_WORKERS", default_value_t = 4, value_name = "N")]
    pub repair_workers: usize,

    /// How long one replication call may take before the replica counts as failed.
    #[arg(long, env = "PEERVAULT_REPLICATION_TIMEOUT", default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub replication_timeout: Duration,

    /// How often anti-entropy compares digests with the other owners (also on every
    /// membership change).
    #[arg(long, env = "PEERVAULT_ANTI_ENTROPY_INTERVAL", default_value = "2m", value_parser = parse_duration, value_name = "DURATION")]
    pub anti_entropy_interval: Duration,

    /// Mean time between two scrub passes (each re-verifies every local chunk against its hash
    /// and repairs a bad one from a replica); each wait is randomised between half and one and
    /// a half times this.
    #[arg(long, env = "PEERVAULT_SCRUB_INTERVAL", default_value = "24h", value_parser = parse_duration, value_name = "DURATION")]
    pub scrub_interval: Duration,

    /// How old a tombstone (what remains of a deleted file) must be before anti-entropy may
    /// collect it; it is collected only once every owner of its partition confirmed it holds
    /// it (or a newer record), so a pod that missed the delete cannot bring the file back.
    #[arg(long, env = "PEERVAULT_TOMBSTONE_GRACE", default_value = "24h", value_parser = parse_duration, value_name = "DURATION")]
    pub tombstone_grace: Duration,

    /// Refuse reads that fewer than a majority of a file's owners answered (default: serve the
    /// newest record among those that did, counted as a degraded read).
    #[arg(long, env = "PEERVAULT_STRICT_READS", default_value_t = false)]
    pub strict_reads: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            replication_factor: 3,
            repair_bytes_per_second: 64 * 1024 * 1024,
            repair_workers: 4,
            replication_timeout: Duration::from_secs(5),
            anti_entropy_interval: Duration::from_secs(120),
            scrub_interval: Duration::from_secs(24 * 3600),
            tombstone_grace: Duration::from_secs(24 * 3600),
            strict_reads: false,
        }
    }
}
