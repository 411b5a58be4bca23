//! Garbage collection of unreferenced chunks and expired uploads, and the orphan-file scan.

use std::{collections::HashSet, fs};

use redb::ReadableDatabase;

use super::{
    Store,
    index::{self, Op, Reply},
    now_ns,
};
use crate::error::{BlobError, Result};

impl Store {
    /// One garbage-collection pass: expires abandoned uploads and deletes chunks unreferenced
    /// for longer than the grace period. Returns (chunks, bytes) collected.
    pub async fn collect_garbage(&self) -> Result<(usize, u64)> {
        let pinned: HashSet<[u8; 32]> = self
            .inner
            .pins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        let cfg = &self.inner.cfg;
        let reply = self
            .commit(Op::Gc {
                now_ns: now_ns(),
                grace_ns: cfg.gc_grace.as_nanos() as i64,
                expiry_ns: cfg.upload_expiry.as_nanos() as i64,
                pinned,
            })
            .await?;
        let Reply::Collected {
            files,
            inline,
            bytes,
            expired,
        } = reply
        else {
            return Err(BlobError::Corrupt("unexpected GC reply".into()));
        };
        let store = self.clone();
        let n_files = files.len();
        tokio::task::spawn_blocking(move || {
            for (hash, _) in files {
                // Holding the pin lock while unlinking: an upload that pins this hash now will
                // write the file again after we are done.
                let pins = store.inner.pins.lock().unwrap_or_else(|p| p.into_inner());
                if pins.contains_key(&hash) {
                    continue;
                }
                let path = store.chunk_path(&hash);
                if let Err(e) = fs::remove_file(&path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(path = %path.display(), error = %e, "cannot delete collected chunk");
                }
            }
        })
        .await
        .map_err(|e| BlobError::Unavailable(format!("GC task failed: {e}")))?;
        let m = &self.inner.metrics;
        m.gc_chunks.inc_by((n_files + inline) as u64);
        m.gc_bytes.inc_by(bytes);
        m.uploads_expired.inc_by(expired as u64);
        if n_files + inline > 0 || expired > 0 {
            tracing::info!(
                chunks = n_files + inline,
                bytes,
                uploads_expired = expired,
                "garbage collected"
            );
        }
        Ok((n_files + inline, bytes))
    }

    /// Deletes chunk files the index does not know, older than the grace period (left by a
    /// crash between rename and commit). Blocking.
    pub fn remove_orphan_chunk_files(&self) -> Result<usize> {
        let grace = self.inner.cfg.gc_grace;
        let chunks_dir = self.inner.root.join("chunks");
        let mut removed = 0;
        for sub in fs::read_dir(&chunks_dir).map_err(|e| BlobError::io("list chunks", e))? {
            let sub = sub.map_err(|e| BlobError::io("list chunks", e))?.path();
            let Ok(entries) = fs::read_dir(&sub) else { continue };
            let names: Vec<_> = entries.filter_map(|e| e.ok()).collect();
            let txn = self.inner.db.begin_read()?;
            let t = txn.open_table(index::CHUNKS)?;
            for e in names {
                let Some(hash) = e
                    .file_name()
                    .to_str()
                    .and_then(|n| blake3::Hash::from_hex(n).ok())
                    .map(|h| *h.as_bytes())
                else {
                    continue;
                };
                if t.get(&hash[..])?.is_some() {
                    continue;
                }
                let old_enough = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > grace);
                let pins = self.inner.pins.lock().unwrap_or_else(|p| p.into_inner());
                if old_enough && !pins.contains_key(&hash) && fs::remove_file(e.path()).is_ok() {
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
