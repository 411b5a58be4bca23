//! The blob service's flags (each also a `PEERVAULT_*` environment variable).

use std::time::Duration;

use clap::Args;
use peervault_runtime::config::parse_duration;

/// Storage limits and background work of a blob node.
#[derive(Debug, Clone, Args)]
pub struct BlobConfig {
    /// Bytes this node may store (unique chunk bytes after deduplication); 0 means no quota.
    #[arg(long, env = "PEERVAULT_QUOTA_BYTES", default_value_t = 0, value_name = "BYTES")]
    pub quota_bytes: u64,

    /// Largest object (file or blob) accepted, in bytes.
    #[arg(long, env = "PEERVAULT_MAX_OBJECT_SIZE", default_value_t = 64 * 1024 * 1024 * 1024, value_name = "BYTES")]
    pub max_object_size: u64,

    /// Size of the content chunks objects are split into (a power of two from 64 KiB to 16 MiB).
    #[arg(long, env = "PEERVAULT_CHUNK_SIZE", default_value_t = 1024 * 1024, value_parser = parse_chunk_size, value_name = "BYTES")]
    pub chunk_size: u32,

    /// How long an unreferenced chunk is kept before it is deleted.
    #[arg(long, env = "PEERVAULT_GC_GRACE", default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
    pub gc_grace: Duration,

    /// How often garbage collection and upload expiry run.
    #[arg(long, env = "PEERVAULT_GC_INTERVAL", default_value = "1m", value_parser = parse_duration, value_name = "DURATION")]
    pub gc_interval: Duration,

    /// How long an interrupted resumable upload is kept before it expires.
    #[arg(long, env = "PEERVAULT_UPLOAD_EXPIRY", default_value = "24h", value_parser = parse_duration, value_name = "DURATION")]
    pub upload_expiry: Duration,

    /// Replication between blob pods.
    #[command(flatten)]
    pub cluster: crate::cluster::ClusterConfig,
    /// How long a tombstone (what remains of a deleted file, for replication) is kept.
    #[arg(long, env = "PEERVAULT_TOMBSTONE_EXPIRY", default_value = "7d", value_parser = parse_duration, value_name = "DURATION")]
    pub tombstone_expiry: Duration,

    /// Free space kept on the data volume for deletes and garbage collection: new content is
    /// refused with RESOURCE_EXHAUSTED ("volume full") below it. 0 disables the check.
    #[arg(long, env = "PEERVAULT_VOLUME_RESERVE", default_value_t = 16 * 1024 * 1024, value_name = "BYTES")]
    pub volume_reserve: u64,

    /// Memory for the index's page cache (redb), in bytes; the default fits a 256 MiB pod.
    #[arg(long, env = "PEERVAULT_INDEX_CACHE", default_value_t = 32 * 1024 * 1024, value_name = "BYTES")]
    pub index_cache: u64,
}

fn parse_chunk_size(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if !v.is_power_of_two() || !(64 * 1024..=16 * 1024 * 1024).contains(&v) {
        return Err("must be a power of two between 65536 and 16777216".into());
    }
    Ok(v)
}

impl Default for BlobConfig {
    fn default() -> Self {
        BlobConfig {
            quota_bytes: 0,
            max_object_size: 64 * 1024 * 1024 * 1024,
            chunk_size: 1024 * 1024,
            gc_grace: Duration::from_secs(600),
            gc_interval: Duration::from_secs(60),
            upload_expiry: Duration::from_secs(24 * 3600),
            cluster: Default::default(),
            tombstone_expiry: Duration::from_secs(7 * 24 * 3600),
            volume_reserve: 16 * 1024 * 1024,
            index_cache: 32 * 1024 * 1024,
        }
    }
}
