//! The blob service's metrics (`peervault_blob_*`), registered in the process registry.

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts};

/// Metric names of the blob service, listed once for code and dashboards.
pub mod names {
    /// Bytes accepted into storage by uploads (before deduplication).
    pub const BYTES_WRITTEN_TOTAL: &str = "peervault_blob_bytes_written_total";
    /// Bytes served by downloads and blob reads.
    pub const BYTES_READ_TOTAL: &str = "peervault_blob_bytes_read_total";
    /// Files stored.
    pub const FILES: &str = "peervault_blob_files";
    /// Blobs stored.
    pub const BLOBS: &str = "peervault_blob_blobs";
    /// Unique chunks stored.
    pub const CHUNKS: &str = "peervault_blob_chunks";
    /// Bytes of unique chunks stored (what the quota counts).
    pub const STORAGE_USED_BYTES: &str = "peervault_blob_storage_used_bytes";
    /// The quota in bytes (0: none).
    pub const STORAGE_QUOTA_BYTES: &str = "peervault_blob_storage_quota_bytes";
    /// Bytes of all blobs as if stored without deduplication.
    pub const LOGICAL_BYTES: &str = "peervault_blob_logical_bytes";
    /// Logical bytes divided by stored bytes (1 when nothing is shared).
    pub const DEDUP_RATIO: &str = "peervault_blob_dedup_ratio";
    /// Chunks that failed their hash check (or were missing) on read.
    pub const INTEGRITY_FAILURES_TOTAL: &str = "peervault_blob_integrity_failures_total";
    /// Upload duration from first byte to durable commit, by API.
    pub const UPLOAD_DURATION_SECONDS: &str = "peervault_blob_upload_duration_seconds";
    /// Uploads being received now.
    pub const UPLOADS_IN_PROGRESS: &str = "peervault_blob_uploads_in_progress";
    /// Operations committed per index transaction (group commit).
    pub const COMMIT_BATCH_SIZE: &str = "peervault_blob_commit_batch_size";
    /// Time per index commit including fsync.
    pub const COMMIT_SECONDS: &str = "peervault_blob_commit_seconds";
    /// Chunks deleted by garbage collection.
    pub const GC_CHUNKS_COLLECTED_TOTAL: &str = "peervault_blob_gc_chunks_collected_total";
    /// Bytes freed by garbage collection.
    pub const GC_BYTES_FREED_TOTAL: &str = "peervault_blob_gc_bytes_freed_total";
    /// Abandoned resumable uploads expired.
    pub const UPLOADS_EXPIRED_TOTAL: &str = "peervault_blob_uploads_expired_total";
    /// Requests that failed, by error kind.
    pub const ERRORS_TOTAL: &str = "peervault_blob_errors_total";
    /// Leftovers removed by start-up recovery (temporary files, orphaned chunk files).
    pub const RECOVERY_REMOVED_TOTAL: &str = "peervault_blob_recovery_removed_total";
    /// Writes refused because the volume is full (ENOSPC, EDQUOT or below `--volume-reserve`).
    pub const VOLUME_FULL_TOTAL: &str = "peervault_blob_volume_full_total";
    /// Tombstones removed after `--tombstone-expiry`.
    pub const TOMBSTONES_EXPIRED_TOTAL: &str = "peervault_blob_tombstones_expired_total";
    /// Resumable upload sessions ended because a newer session took the upload id over.
    pub const UPLOAD_SESSIONS_SUPERSEDED_TOTAL: &str = "peervault_blob_upload_sessions_superseded_total";
    /// Segment files holding chunks of large objects.
    pub const SEGMENTS: &str = "peervault_blob_segments";
    /// Bytes in segment files the index no longer references (reclaimed by compaction).
    pub const SEGMENT_DEAD_BYTES: &str = "peervault_blob_segment_dead_bytes";
    /// Compaction passes that moved chunks or freed segments.
    pub const COMPACTION_RUNS_TOTAL: &str = "peervault_blob_compaction_runs_total";
    /// Live chunk bytes copied by compaction.
    pub const COMPACTION_BYTES_TOTAL: &str = "peervault_blob_compaction_bytes_total";
    /// Segment files deleted by compaction.
    pub const SEGMENTS_FREED_TOTAL: &str = "peervault_blob_segments_freed_total";
    /// Batches of small puts made durable by an index-journal append, by outcome (ok, failed).
    pub const JOURNAL_APPENDS_TOTAL: &str = "peervault_blob_journal_appends_total";
    /// Bytes appended to the index journal.
    pub const JOURNAL_BYTES_TOTAL: &str = "peervault_blob_journal_bytes_total";
    /// Puts applied again from the index journal at start-up (after a crash).
    pub const JOURNAL_REPLAYED_PUTS_TOTAL: &str = "peervault_blob_journal_replayed_puts_total";
    /// Walks over every record to compute the per-partition digests anti-entropy compares (a
    /// round with nothing committed since the last walk reuses it).
    pub const RECORD_DIGEST_SCANS_TOTAL: &str = "peervault_blob_record_digest_scans_total";

    /// Every name above.
    pub const ALL: &[&str] = &[
        BYTES_WRITTEN_TOTAL,
        BYTES_READ_TOTAL,
        FILES,
        BLOBS,
        CHUNKS,
        STORAGE_USED_BYTES,
        STORAGE_QUOTA_BYTES,
        LOGICAL_BYTES,
        DEDUP_RATIO,
        INTEGRITY_FAILURES_TOTAL,
        UPLOAD_DURATION_SECONDS,
        UPLOADS_IN_PROGRESS,
        COMMIT_BATCH_SIZE,
        COMMIT_SECONDS,
        GC_CHUNKS_COLLECTED_TOTAL,
        GC_BYTES_FREED_TOTAL,
        UPLOADS_EXPIRED_TOTAL,
        ERRORS_TOTAL,
        RECOVERY_REMOVED_TOTAL,
        VOLUME_FULL_TOTAL,
        TOMBSTONES_EXPIRED_TOTAL,
        UPLOAD_SESSIONS_SUPERSEDED_TOTAL,
        SEGMENTS,
        SEGMENT_DEAD_BYTES,
        COMPACTION_RUNS_TOTAL,
        COMPACTION_BYTES_TOTAL,
        SEGMENTS_FREED_TOTAL,
        JOURNAL_APPENDS_TOTAL,
        JOURNAL_BYTES_TOTAL,
        JOURNAL_REPLAYED_PUTS_TOTAL,
        RECORD_DIGEST_SCANS_TOTAL,
    ];
}

/// Handles to every blob metric. Cheap to clone.
#[derive(Clone)]
pub struct BlobMetrics {
    /// See [`names::BYTES_WRITTEN_TOTAL`].
    pub bytes_written: IntCounter,
    /// See [`names::BYTES_READ_TOTAL`].
    pub bytes_read: IntCounter,
    /// See [`names::FILES`].
    pub files: IntGauge,
    /// See [`names::BLOBS`].
    pub blobs: IntGauge,
    /// See [`names::CHUNKS`].
    pub chunks: IntGauge,
    /// See [`names::STORAGE_USED_BYTES`].
    pub storage_used: IntGauge,
    /// See [`names::STORAGE_QUOTA_BYTES`].
    pub storage_quota: IntGauge,
    /// See [`names::LOGICAL_BYTES`].
    pub logical_bytes: IntGauge,
    /// See [`names::DEDUP_RATIO`].
    pub dedup_ratio: prometheus::Gauge,
    /// See [`names::INTEGRITY_FAILURES_TOTAL`].
    pub integrity_failures: IntCounter,
    /// See [`names::UPLOAD_DURATION_SECONDS`].
    pub upload_duration: HistogramVec,
    /// See [`names::UPLOADS_IN_PROGRESS`].
    pub uploads_in_progress: IntGauge,
    /// See [`names::COMMIT_BATCH_SIZE`].
    pub commit_batch: Histogram,
    /// See [`names::COMMIT_SECONDS`].
    pub commit_seconds: Histogram,
    /// See [`names::GC_CHUNKS_COLLECTED_TOTAL`].
    pub gc_chunks: IntCounter,
    /// See [`names::GC_BYTES_FREED_TOTAL`].
    pub gc_bytes: IntCounter,
    /// See [`names::UPLOADS_EXPIRED_TOTAL`].
    pub uploads_expired: IntCounter,
    /// See [`names::ERRORS_TOTAL`].
    pub errors: IntCounterVec,
    /// See [`names::RECOVERY_REMOVED_TOTAL`].
    pub recovery_removed: IntCounterVec,
    /// See [`names::VOLUME_FULL_TOTAL`].
    pub volume_full: IntCounter,
    /// See [`names::TOMBSTONES_EXPIRED_TOTAL`].
    pub tombstones_expired: IntCounter,
    /// See [`names::UPLOAD_SESSIONS_SUPERSEDED_TOTAL`].
    pub sessions_superseded: IntCounter,
    /// See [`names::SEGMENTS`].
    pub segments: IntGauge,
    /// See [`names::SEGMENT_DEAD_BYTES`].
    pub segment_dead_bytes: IntGauge,
    /// See [`names::COMPACTION_RUNS_TOTAL`].
    pub compaction_runs: IntCounter,
    /// See [`names::COMPACTION_BYTES_TOTAL`].
    pub compaction_bytes: IntCounter,
    /// See [`names::SEGMENTS_FREED_TOTAL`].
    pub segments_freed: IntCounter,
    /// See [`names::JOURNAL_APPENDS_TOTAL`].
    pub journal_appends: IntCounterVec,
    /// See [`names::JOURNAL_BYTES_TOTAL`].
    pub journal_bytes: IntCounter,
    /// See [`names::JOURNAL_REPLAYED_PUTS_TOTAL`].
    pub journal_replayed: IntCounter,
    /// See [`names::RECORD_DIGEST_SCANS_TOTAL`].
    pub record_digest_scans: IntCounter,
}

impl BlobMetrics {
    /// Creates the metrics; `register` adds each to a registry (`None` for tests).
    pub fn new(registry: Option<&prometheus::Registry>) -> Result<Self, prometheus::Error> {
        let m = BlobMetrics {
            bytes_written: IntCounter::new(names::BYTES_WRITTEN_TOTAL, "Bytes accepted into storage by uploads.")?,
            bytes_read: IntCounter::new(names::BYTES_READ_TOTAL, "Bytes served by downloads and blob reads.")?,
            files: IntGauge::new(names::FILES, "Files stored.")?,
            blobs: IntGauge::new(names::BLOBS, "Blobs stored.")?,
            chunks: IntGauge::new(names::CHUNKS, "Unique chunks stored.")?,
            storage_used: IntGauge::new(names::STORAGE_USED_BYTES, "Bytes of unique chunks stored.")?,
            storage_quota: IntGauge::new(names::STORAGE_QUOTA_BYTES, "Storage quota in bytes (0: none).")?,
            logical_bytes: IntGauge::new(names::LOGICAL_BYTES, "Bytes of all blobs before deduplication.")?,
            dedup_ratio: prometheus::Gauge::new(names::DEDUP_RATIO, "Logical bytes per stored byte.")?,
            integrity_failures: IntCounter::new(
                names::INTEGRITY_FAILURES_TOTAL,
                "Chunks that failed their hash check or were missing on read.",
            )?,
            upload_duration: HistogramVec::new(
                HistogramOpts::new(names::UPLOAD_DURATION_SECONDS, "Upload duration until durable commit.")
                    .buckets(prometheus::exponential_buckets(0.001, 4.0, 10)?),
                &["api"],
            )?,
            uploads_in_progress: IntGauge::new(names::UPLOADS_IN_PROGRESS, "Uploads being received now.")?,
            commit_batch: Histogram::with_opts(
                HistogramOpts::new(names::COMMIT_BATCH_SIZE, "Operations per index commit.")
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
            )?,
            commit_seconds: Histogram::with_opts(
                HistogramOpts::new(names::COMMIT_SECONDS, "Index commit time including fsync.")
                    .buckets(prometheus::exponential_buckets(0.0001, 2.5, 12)?),
            )?,
            gc_chunks: IntCounter::new(
                names::GC_CHUNKS_COLLECTED_TOTAL,
                "Chunks deleted by garbage collection.",
            )?,
            gc_bytes: IntCounter::new(names::GC_BYTES_FREED_TOTAL, "Bytes freed by garbage collection.")?,
            uploads_expired: IntCounter::new(names::UPLOADS_EXPIRED_TOTAL, "Abandoned uploads expired.")?,
            errors: IntCounterVec::new(
                Opts::new(names::ERRORS_TOTAL, "Failed requests by error kind."),
                &["kind"],
            )?,
            recovery_removed: IntCounterVec::new(
                Opts::new(names::RECOVERY_REMOVED_TOTAL, "Leftovers removed by recovery, by kind."),
                &["kind"],
            )?,
            volume_full: IntCounter::new(names::VOLUME_FULL_TOTAL, "Writes refused because the volume is full.")?,
            tombstones_expired: IntCounter::new(names::TOMBSTONES_EXPIRED_TOTAL, "Tombstones expired.")?,
            sessions_superseded: IntCounter::new(
                names::UPLOAD_SESSIONS_SUPERSEDED_TOTAL,
                "Upload sessions ended by a newer session on the same upload id.",
            )?,
            segments: IntGauge::new(names::SEGMENTS, "Segment files holding chunks of large objects.")?,
            segment_dead_bytes: IntGauge::new(
                names::SEGMENT_DEAD_BYTES,
                "Bytes in segment files the index no longer references.",
            )?,
            compaction_runs: IntCounter::new(
                names::COMPACTION_RUNS_TOTAL,
                "Compaction passes that moved chunks or freed segments.",
            )?,
            compaction_bytes: IntCounter::new(names::COMPACTION_BYTES_TOTAL, "Live chunk bytes copied by compaction.")?,
            segments_freed: IntCounter::new(names::SEGMENTS_FREED_TOTAL, "Segment files deleted by compaction.")?,
            journal_appends: IntCounterVec::new(
                Opts::new(
                    names::JOURNAL_APPENDS_TOTAL,
                    "Batches of small puts made durable by an index-journal append, by outcome.",
                ),
                &["outcome"],
            )?,
            journal_bytes: IntCounter::new(names::JOURNAL_BYTES_TOTAL, "Bytes appended to the index journal.")?,
            journal_replayed: IntCounter::new(
                names::JOURNAL_REPLAYED_PUTS_TOTAL,
                "Puts applied again from the index journal at start-up.",
            )?,
            record_digest_scans: IntCounter::new(
                names::RECORD_DIGEST_SCANS_TOTAL,
                "Walks over every record to compute the per-partition digests for anti-entropy.",
            )?,
        };
        // Both outcomes exist from the start, so a dashboard's rate is 0 rather than empty.
        for o in ["ok", "failed"] {
            m.journal_appends.with_label_values(&[o]);
        }
        if let Some(r) = registry {
            r.register(Box::new(m.bytes_written.clone()))?;
            r.register(Box::new(m.bytes_read.clone()))?;
            r.register(Box::new(m.files.clone()))?;
            r.register(Box::new(m.blobs.clone()))?;
            r.register(Box::new(m.chunks.clone()))?;
            r.register(Box::new(m.storage_used.clone()))?;
            r.register(Box::new(m.storage_quota.clone()))?;
            r.register(Box::new(m.logical_bytes.clone()))?;
            r.register(Box::new(m.dedup_ratio.clone()))?;
            r.register(Box::new(m.integrity_failures.clone()))?;
            r.register(Box::new(m.upload_duration.clone()))?;
            r.register(Box::new(m.uploads_in_progress.clone()))?;
            r.register(Box::new(m.commit_batch.clone()))?;
            r.register(Box::new(m.commit_seconds.clone()))?;
            r.register(Box::new(m.gc_chunks.clone()))?;
            r.register(Box::new(m.gc_bytes.clone()))?;
            r.register(Box::new(m.uploads_expired.clone()))?;
            r.register(Box::new(m.errors.clone()))?;
            r.register(Box::new(m.recovery_removed.clone()))?;
            r.register(Box::new(m.volume_full.clone()))?;
            r.register(Box::new(m.tombstones_expired.clone()))?;
            r.register(Box::new(m.sessions_superseded.clone()))?;
            r.register(Box::new(m.segments.clone()))?;
            r.register(Box::new(m.segment_dead_bytes.clone()))?;
            r.register(Box::new(m.compaction_runs.clone()))?;
            r.register(Box::new(m.compaction_bytes.clone()))?;
            r.register(Box::new(m.segments_freed.clone()))?;
            r.register(Box::new(m.journal_appends.clone()))?;
            r.register(Box::new(m.journal_bytes.clone()))?;
            r.register(Box::new(m.journal_replayed.clone()))?;
            r.register(Box::new(m.record_digest_scans.clone()))?;
        }
        Ok(m)
    }
}
