//! The storage engine: content split into chunks addressed by BLAKE3, chunk files written to a
//! temporary name, fsynced, renamed and their directory fsynced; an embedded transactional
//! index (redb) committed durably before any reply; start-up recovery; verified reads; garbage
//! collection of unreferenced chunks after a grace period.
//!
//! Objects up to [`INLINE_MAX`] bytes are kept inside the index, so a small put is one grouped
//! index commit and no file at all.

mod gc;
pub mod index;
mod ingest;
pub mod keys;
mod ops;
mod pins;
mod read;
pub mod records;
pub mod replica;

use std::{
    collections::HashMap,
    fs::{self, File},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redb::Database;
use tokio::sync::{mpsc, oneshot};

pub use index::{ChunkMeta, MetadataPatch, NewBlob, hex};
use index::{Counters, Job, Op, Reply};
pub use ingest::{Finished, Ingest};
pub use pins::ReadPin;

use crate::{
    config::BlobConfig,
    error::{BlobError, Result},
    metrics::BlobMetrics,
};

/// Objects up to this size are stored inside the index instead of as chunk files.
pub const INLINE_MAX: usize = 64 * 1024;

/// Nanoseconds since the epoch.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_nanos() as i64
}

/// The store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    cfg: BlobConfig,
    db: Arc<Database>,
    commit_tx: mpsc::Sender<Job>,
    metrics: BlobMetrics,
    /// Chunks that are on disk but not yet referenced in the index, or being read: GC skips them.
    pins: Mutex<HashMap<[u8; 32], usize>>,
    counters: Mutex<Counters>,
    /// Bytes of uploads in flight, counted against the quota before they are committed.
    reserved: AtomicU64,
    tmp_seq: AtomicU64,
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the committer; joining it releases the database file so the
        // store can be opened again in this process.
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.commit_tx, closed));
        if let Some(h) = self.committer.lock().unwrap_or_else(|p| p.into_inner()).take()
            // The committer itself may drop the last handle (after a commit); it then just ends.
            && h.thread().id() != std::thread::current().id()
        {
            let _ = h.join();
        }
    }
}

/// Statistics for SystemService and metrics.
#[derive(Debug, Clone, Copy)]
pub struct StoreStats {
    /// Unique chunk bytes stored.
    pub storage_used: u64,
    /// Bytes of all blobs before deduplication.
    pub logical_bytes: u64,
    /// Files.
    pub files: u64,
    /// Blobs.
    pub blobs: u64,
    /// Unique chunks.
    pub chunks: u64,
    /// Quota (0: none).
    pub quota: u64,
}

fn chunk_rel_path(hash: &[u8; 32]) -> PathBuf {
    let h = hex(hash);
    PathBuf::from(&h[..2]).join(h)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Store {
    /// Opens (or creates) the store under `root`, recovers from an interrupted run and starts
    /// the committer thread. Blocking: call from `spawn_blocking` or before serving.
    pub fn open(root: &Path, cfg: BlobConfig, metrics: BlobMetrics) -> Result<Store> {
        let chunks = root.join("chunks");
        let tmp = root.join("tmp");
        for d in [root, &chunks, &tmp] {
            fs::create_dir_all(d).map_err(|e| BlobError::io(format!("create {}", d.display()), e))?;
        }
        for i in 0..=255u8 {
            let d = chunks.join(format!("{i:02x}"));
            fs::create_dir_all(&d).map_err(|e| BlobError::io(format!("create {}", d.display()), e))?;
        }
        // Leftovers of writes that never committed: nothing in the index points at them.
        let mut removed = 0u64;
        for e in fs::read_dir(&tmp).map_err(|e| BlobError::io(format!("list {}", tmp.display()), e))? {
            let e = e.map_err(|e| BlobError::io("list tmp", e))?;
            fs::remove_file(e.path()).map_err(|err| BlobError::io(format!("remove {}", e.path().display()), err))?;
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&tmp).map_err(|e| BlobError::io("sync tmp", e))?;
            metrics
                .recovery_removed
                .with_label_values(&["temp_file"])
                .inc_by(removed);
            tracing::info!(removed, "recovery removed temporary files of interrupted writes");
        }
        let db_path = root.join("index.redb");
        let db = Database::builder()
            .set_cache_size(64 * 1024 * 1024)
            .create(&db_path)
            .map_err(|e| BlobError::Index(e.into()))?;
        let db = Arc::new(db);
        index::init_tables(&db)?;
        let counters = index::read_counters(&db)?;
        let (commit_tx, commit_rx) = mpsc::channel(1024);
        let inner = Arc::new(Inner {
            root: root.to_path_buf(),
            cfg,
            db: db.clone(),
            commit_tx,
            metrics: metrics.clone(),
            pins: Mutex::new(HashMap::new()),
            counters: Mutex::new(counters),
            reserved: AtomicU64::new(0),
            tmp_seq: AtomicU64::new(0),
            committer: Mutex::new(None),
        });
        let store = Store { inner };
        store.publish_counters(counters);
        let weak = Arc::downgrade(&store.inner);
        let handle = index::spawn_committer(db, commit_rx, metrics, move |c| {
            if let Some(inner) = weak.upgrade() {
                Store { inner }.publish_counters(c);
            }
        })
        .map_err(|e| BlobError::io("start the committer thread", e))?;
        *store.inner.committer.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        store
            .inner
            .metrics
            .storage_quota
            .set(store.inner.cfg.quota_bytes.min(i64::MAX as u64) as i64);
        tracing::info!(
            root = %root.display(),
            files = counters.files,
            blobs = counters.blobs,
            chunks = counters.chunks,
            storage_used = counters.storage_used,
            "blob store open"
        );
        Ok(store)
    }

    fn publish_counters(&self, c: Counters) {
        *self.inner.counters.lock().unwrap_or_else(|p| p.into_inner()) = c;
        let m = &self.inner.metrics;
        let clamp = |v: u64| v.min(i64::MAX as u64) as i64;
        m.files.set(clamp(c.files));
        m.blobs.set(clamp(c.blobs));
        m.chunks.set(clamp(c.chunks));
        m.storage_used.set(clamp(c.storage_used));
        m.logical_bytes.set(clamp(c.logical_bytes));
        m.dedup_ratio.set(if c.storage_used > 0 {
            c.logical_bytes as f64 / c.storage_used as f64
        } else {
            1.0
        });
    }

    /// Current statistics.
    pub fn stats(&self) -> StoreStats {
        let c = *self.inner.counters.lock().unwrap_or_else(|p| p.into_inner());
        StoreStats {
            storage_used: c.storage_used,
            logical_bytes: c.logical_bytes,
            files: c.files,
            blobs: c.blobs,
            chunks: c.chunks,
            quota: self.inner.cfg.quota_bytes,
        }
    }

    /// Size of the volume holding the store, in bytes (0 if unknown).
    pub fn volume_size(&self) -> u64 {
        rustix::fs::statvfs(&self.inner.root)
            .map(|s| s.f_blocks.saturating_mul(s.f_frsize))
            .unwrap_or(0)
    }

    /// The configuration in force.
    pub fn config(&self) -> &BlobConfig {
        &self.inner.cfg
    }

    /// The metrics.
    pub fn metrics(&self) -> &BlobMetrics {
        &self.inner.metrics
    }

    /// Where a chunk file lives.
    pub fn chunk_path(&self, hash: &[u8; 32]) -> PathBuf {
        self.inner.root.join("chunks").join(chunk_rel_path(hash))
    }

    pub(crate) async fn commit(&self, op: Op) -> Result<Reply> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .commit_tx
            .send(Job { op, reply: tx })
            .await
            .map_err(|_| BlobError::Unavailable("the store is shutting down".into()))?;
        rx.await
            .map_err(|_| BlobError::Unavailable("index commit failed; retry the request".into()))?
    }

    /// Reserves `n` more bytes against the quota, or refuses before anything is written.
    fn reserve(&self, n: u64) -> Result<()> {
        let quota = self.inner.cfg.quota_bytes;
        if quota == 0 {
            self.inner.reserved.fetch_add(n, Ordering::Relaxed);
            return Ok(());
        }
        let used = self.stats().storage_used;
        let prev = self.inner.reserved.fetch_add(n, Ordering::AcqRel);
        if used + prev + n > quota {
            self.inner.reserved.fetch_sub(n, Ordering::AcqRel);
            return Err(BlobError::QuotaExceeded(format!(
                "storage quota of {quota} bytes would be exceeded ({used} bytes stored, {prev} bytes being uploaded): delete files or raise --quota-bytes"
            )));
        }
        Ok(())
    }

    fn unreserve(&self, n: u64) {
        self.inner.reserved.fetch_sub(n, Ordering::AcqRel);
    }

    fn check_size(&self, size: u64) -> Result<()> {
        let max = self.inner.cfg.max_object_size;
        if size > max {
            return Err(BlobError::invalid(format!(
                "object of {size} bytes exceeds the maximum object size of {max} bytes (--max-object-size)"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
