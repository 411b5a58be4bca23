//! Garbage collection of unreferenced chunks, expired uploads and tombstones, the orphan
//! scan, and (each pass) segment compaction (`segments.rs`). Every pass is bounded: the queues are time-ordered, each commit takes at most a capped
//! batch (puts interleave between batches), and the orphan scan covers a few chunk folders per
//! call, resuming where the last call stopped.

use std::sync::atomic::Ordering;

use super::{
    Store,
    index::{Op, Reply},
    now_ns,
};
use crate::error::{BlobError, Result};

/// Most GC batches (each its own commit) one [`Store::collect_garbage`] call runs.
const MAX_BATCHES_PER_PASS: usize = 16;

/// Chunk folders (of 256) one orphan scan call covers.
const ORPHAN_DIRS_PER_CALL: usize = 16;

impl Store {
    /// One garbage-collection pass: expires abandoned uploads and old tombstones and deletes
    /// chunks unreferenced for longer than the grace period, in capped batches. Also scans one
    /// chunk folder for orphaned files. Returns (chunks, bytes) collected.
    pub async fn collect_garbage(&self) -> Result<(usize, u64)> {
        let span = tracing::info_span!("gc_pass");
        let _e = span.enter();
        let mut total_chunks = 0;
        let mut total_bytes = 0;
        for _ in 0..MAX_BATCHES_PER_PASS {
            let (chunks, bytes, more) = self.gc_batch().await?;
            total_chunks += chunks;
            total_bytes += bytes;
            if !more {
                break;
            }
        }
        let s = self.clone();
        tokio::task::spawn_blocking(move || s.scan_orphans(1))
            .await
            .map_err(|e| BlobError::Unavailable(format!("orphan scan task failed: {e}")))??;
        // Dead bytes in segments (collected chunks, abandoned uploads) are reclaimed here, a
        // bounded amount per pass.
        self.compact_segments().await?;
        Ok((total_chunks, total_bytes))
    }

    /// One GC commit and its unlinks (no compaction, no orphan scan).
    pub(super) async fn gc_batch(&self) -> Result<(usize, u64, bool)> {
        let cfg = &self.inner.cfg;
        let nanos = |d: std::time::Duration| d.as_nanos().min(i64::MAX as u128) as i64;
        let reply = self
            .commit(Op::Gc {
                now_ns: now_ns(),
                grace_ns: nanos(cfg.gc_grace),
                expiry_ns: nanos(cfg.upload_expiry),
                tombstone_expiry_ns: nanos(cfg.tombstone_expiry),
                pinned: self.pinned_snapshot(),
            })
            .await?;
        let Reply::Collected {
            files,
            holes,
            inline,
            bytes,
            expired,
            tombstones,
            more,
        } = reply
        else {
            return Err(BlobError::Corrupt("unexpected GC reply".into()));
        };
        #[cfg(any(test, feature = "test-hooks"))]
        self.hook("gc.before_unlink");
        let store = self.clone();
        let n_files = files.len();
        tokio::task::spawn_blocking(move || {
            for (hash, _) in files {
                // A commit since the GC transaction may have re-created the chunk: the unlink
                // re-checks the record (and pins) under the pin lock.
                let _ = store.unlink_if_unreferenced(&hash);
            }
            // Dead ranges of segments give their space back now (a full volume recovers
            // without waiting for compaction), under the same rule.
            for (hash, loc, size) in holes {
                let _ = store.punch_if_unreferenced(&hash, &loc, size);
            }
        })
        .await
        .map_err(|e| BlobError::Unavailable(format!("GC task failed: {e}")))?;
        let m = &self.inner.metrics;
        m.gc_chunks.inc_by((n_files + inline) as u64);
        m.gc_bytes.inc_by(bytes);
        m.uploads_expired.inc_by(expired as u64);
        m.tombstones_expired.inc_by(tombstones as u64);
        if n_files + inline > 0 || expired > 0 || tombstones > 0 {
            tracing::info!(
                chunks = n_files + inline,
                bytes,
                uploads_expired = expired,
                tombstones_expired = tombstones,
                more,
                "garbage collected"
            );
        }
        Ok((n_files + inline, bytes, more))
    }

    /// Deletes chunk files the index does not know, older than the grace period (left by a
    /// crash between publishing and commit), in the next [`ORPHAN_DIRS_PER_CALL`] chunk folders.
    /// Blocking.
    pub fn remove_orphan_chunk_files(&self) -> Result<usize> {
        self.scan_orphans(ORPHAN_DIRS_PER_CALL)
    }

    /// The orphan scan over the next `dirs` chunk folders.
    fn scan_orphans(&self, dirs: usize) -> Result<usize> {
        let grace = self.inner.cfg.gc_grace;
        let chunks_dir = self.inner.root.join("chunks");
        let mut removed = 0;
        for _ in 0..dirs.min(256) {
            let i = self.inner.orphan_cursor.fetch_add(1, Ordering::Relaxed) % 256;
            let sub = chunks_dir.join(format!("{i:02x}"));
            let Ok(entries) = self.inner.disk.list(&sub) else {
                continue;
            };
            for (path, mtime) in entries {
                let Some(hash) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| blake3::Hash::from_hex(n).ok())
                    .map(|h| *h.as_bytes())
                else {
                    continue;
                };
                let old_enough = mtime.and_then(|t| t.elapsed().ok()).is_some_and(|age| age > grace);
                if old_enough && self.unlink_if_unreferenced(&hash)? {
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            self.inner
                .metrics
                .recovery_removed
                .with_label_values(&["orphan_chunk"])
                .inc_by(removed as u64);
            tracing::info!(removed, "removed orphaned chunk files");
        }
        Ok(removed)
    }
}
