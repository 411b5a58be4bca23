//! The storage engine: content split into chunks addressed by BLAKE3 and appended to segment
//! files (fdatasynced before the commit that references them; replica writes and older data
//! dirs use one file per chunk); an embedded transactional index (redb) committed durably
//! before any reply; start-up recovery; verified reads; garbage collection of unreferenced
//! chunks after a grace period and compaction of mostly dead segments.
//!
//! Objects up to [`INLINE_MAX`] bytes are kept inside the index, so a small put is one grouped
//! index commit and no file at all.

mod committer;
pub mod disk;
mod gc;
pub mod index;
mod ingest;
mod journal;
pub mod keys;
mod ops;
mod pins;
mod read;
pub mod records;
pub mod replica;
mod replica_chunks;
pub use replica_chunks::ReplicaChunks;
mod segments;
mod tree;

use std::{
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
pub use ingest::{Durable, Finished, Ingest};
pub use pins::{Pins, ReadPin};
pub use read::FileQuery;

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
    disk: Arc<dyn disk::Disk>,
    cfg: BlobConfig,
    db: Arc<Database>,
    commit_tx: mpsc::Sender<Job>,
    metrics: BlobMetrics,
    /// Chunks that are on disk but not yet referenced in the index, or being read: GC skips them
    /// (and compaction keeps the segments they are pinned in).
    pins: Mutex<pins::PinTable>,
    /// Segment files and the pool of open ones.
    segs: Mutex<segments::SegTable>,
    counters: Mutex<Counters>,
    /// Bytes of uploads in flight, counted against the quota before they are committed.
    reserved: AtomicU64,
    tmp_seq: AtomicU64,
    /// Recent ListFiles counts and page ends.
    list_cache: Mutex<read::ListCache>,
    /// The next chunk folder the orphan scan looks at.
    orphan_cursor: std::sync::atomic::AtomicUsize,
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Committer commits so far (bumped once each is visible to readers). Every write of file
    /// records and tombstones goes through the committer, so the record digests are current while
    /// this stands still (API keys, written directly, are not part of them).
    commits: AtomicU64,
    /// The last per-partition record digests and the commit count they were computed at.
    digests: Mutex<Option<DigestsAt>>,
    /// Test builds: named points where a test can stop the engine to drive a race.
    #[cfg(any(test, feature = "test-hooks"))]
    hook: Mutex<Option<Hook>>,
}

/// Per-partition record digests and the commit count they were computed at.
type DigestsAt = (u64, Vec<[u8; 32]>);

/// A test hook: called with the name of each hook point reached.
#[cfg(any(test, feature = "test-hooks"))]
pub type Hook = Arc<dyn Fn(&str) + Send + Sync>;

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

/// The committer cannot go on: acknowledged writes are durable already, so the process exits
/// (non-zero) to fail readiness at once and restart clean rather than answer UNAVAILABLE forever.
fn fatal(what: &str) {
    tracing::error!(panic = %what, "blob store failed; exiting so the process restarts clean");
    eprintln!("peervault: blob store committer failed ({what}); exiting");
    std::process::exit(70);
}

fn chunk_rel_path(hash: &[u8; 32]) -> PathBuf {
    let h = hex(hash);
    PathBuf::from(&h[..2]).join(h)
}

impl Store {
    /// Opens (or creates) the store under `root`, recovers from an interrupted run and starts
    /// the committer thread. Blocking: call from `spawn_blocking` or before serving.
    pub fn open(root: &Path, cfg: BlobConfig, metrics: BlobMetrics) -> Result<Store> {
        Self::open_on(Arc::new(disk::OsDisk), root, cfg, metrics)
    }

    /// [`Store::open`] on a given disk (tests use a simulated one).
    pub fn open_on(disk: Arc<dyn disk::Disk>, root: &Path, cfg: BlobConfig, metrics: BlobMetrics) -> Result<Store> {
        let _span = tracing::info_span!("store_open", root = %root.display()).entered();
        let chunks = root.join("chunks");
        let tmp = root.join("tmp");
        let segs_dir = root.join("segments");
        let new_segs_dir = !disk.is_dir(&segs_dir);
        for d in [root, &chunks, &tmp, &segs_dir] {
            disk.create_dir_all(d)
                .map_err(|e| BlobError::io(format!("create {}", d.display()), e))?;
        }
        let mut created = false;
        for i in 0..=255u8 {
            let d = chunks.join(format!("{i:02x}"));
            if !disk.is_dir(&d) {
                disk.create_dir_all(&d)
                    .map_err(|e| BlobError::io(format!("create {}", d.display()), e))?;
                created = true;
            }
        }
        if created || new_segs_dir {
            // New folders are durable before any chunk inside them is acknowledged.
            for d in [&chunks, root] {
                disk.sync_dir(d)
                    .map_err(|e| BlobError::io(format!("fsync {}", d.display()), e))?;
            }
        }
        // The index first: it is locked by this process, so a second process on the same volume
        // stops here instead of deleting the first one's in-flight files below.
        let db_path = root.join("index.redb");
        let repaired = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = repaired.clone();
        let started = std::time::Instant::now();
        let mut builder = Database::builder();
        builder
            .set_cache_size(cfg.index_cache.min(usize::MAX as u64) as usize)
            .set_repair_callback(move |_| flag.store(true, Ordering::Relaxed));
        let db = disk.open_index(&db_path, &builder).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => BlobError::Unavailable(format!(
                "{} is in use by another process: one blob process per data directory",
                db_path.display()
            )),
            e => BlobError::from(e),
        })?;
        let index_open_ms = started.elapsed().as_millis() as u64;
        if repaired.load(Ordering::Relaxed) {
            tracing::warn!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "index repaired after an unclean shutdown"
            );
        }
        let db = Arc::new(db);
        // Leftovers of writes that never committed: nothing in the index points at them.
        let mut removed = 0u64;
        for (path, _) in disk
            .list(&tmp)
            .map_err(|e| BlobError::io(format!("list {}", tmp.display()), e))?
        {
            disk.remove_file(&path)
                .map_err(|err| BlobError::io(format!("remove {}", path.display()), err))?;
            removed += 1;
        }
        if removed > 0 {
            disk.sync_dir(&tmp).map_err(|e| BlobError::io("sync tmp", e))?;
            metrics
                .recovery_removed
                .with_label_values(&["temp_file"])
                .inc_by(removed);
            tracing::info!(removed, "recovery removed temporary files of interrupted writes");
        }
        index::init_tables(&db)?;
        // Small puts acknowledged through the journal after the index's last durable commit
        // are applied again before anything reads the index.
        let (journal, replayed) = journal::Journal::open(disk.as_ref(), root, &db)?;
        if replayed.puts > 0 {
            metrics.journal_replayed.inc_by(replayed.puts as u64);
            tracing::info!(
                entries = replayed.entries,
                puts = replayed.puts,
                "recovery applied small puts from the index journal"
            );
        }
        let segs = segments::load(disk.as_ref(), &segs_dir, &db, &metrics)?;
        let init_ms = started.elapsed().as_millis() as u64 - index_open_ms;
        let counters = index::read_counters(&db)?;
        let (commit_tx, commit_rx) = mpsc::channel(1024);
        let inner = Arc::new(Inner {
            root: root.to_path_buf(),
            disk,
            cfg,
            db: db.clone(),
            commit_tx,
            metrics: metrics.clone(),
            pins: Mutex::new(pins::PinTable::default()),
            segs: Mutex::new(segs),
            counters: Mutex::new(counters),
            reserved: AtomicU64::new(0),
            tmp_seq: AtomicU64::new(0),
            orphan_cursor: std::sync::atomic::AtomicUsize::new(0),
            list_cache: Mutex::new(read::ListCache::default()),
            committer: Mutex::new(None),
            commits: AtomicU64::new(0),
            digests: Mutex::new(None),
            #[cfg(any(test, feature = "test-hooks"))]
            hook: Mutex::new(None),
        });
        let store = Store { inner };
        store.publish_counters(counters);
        let weak = Arc::downgrade(&store.inner);
        #[cfg(any(test, feature = "test-hooks"))]
        let weak_hook = Arc::downgrade(&store.inner);
        #[cfg(any(test, feature = "test-hooks"))]
        let weak_fatal = Arc::downgrade(&store.inner);
        let hooks = committer::CommitterHooks {
            after_commit: Box::new(move |c| {
                if let Some(inner) = weak.upgrade() {
                    inner.commits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    Store { inner }.publish_counters(c);
                }
            }),
            before_batch: Box::new(move || {
                #[cfg(any(test, feature = "test-hooks"))]
                if let Some(inner) = weak_hook.upgrade() {
                    Store { inner }.hook("committer.batch");
                }
            }),
            on_fatal: Box::new(move |what| {
                #[cfg(any(test, feature = "test-hooks"))]
                if let Some(inner) = weak_fatal.upgrade()
                    && inner.hook.lock().unwrap_or_else(|p| p.into_inner()).is_some()
                {
                    Store { inner }.hook("committer.fatal");
                    return;
                }
                fatal(&what);
            }),
        };
        let handle = committer::spawn_committer(db, commit_rx, metrics, hooks, journal)
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
            index_open_ms,
            init_ms,
            open_ms = started.elapsed().as_millis() as u64,
            "blob store open"
        );
        Ok(store)
    }

    /// Test builds: sets the hook called at each hook point.
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn set_hook(&self, hook: Option<Hook>) {
        *self.inner.hook.lock().unwrap_or_else(|p| p.into_inner()) = hook;
    }

    /// Test builds: a named point where a test may stop the engine.
    #[cfg(any(test, feature = "test-hooks"))]
    pub(crate) fn hook(&self, point: &str) {
        let h = self.inner.hook.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(h) = h {
            h(point);
        }
    }

    /// A full-volume refusal: counted, logged, and RESOURCE_EXHAUSTED for the caller.
    pub(crate) fn volume_full(&self, detail: String) -> BlobError {
        self.note_error(BlobError::VolumeFull(detail))
    }

    /// An I/O error with context, noting a full volume.
    pub(crate) fn io_error(&self, context: impl Into<String>, e: std::io::Error) -> BlobError {
        self.note_error(BlobError::io(context, e))
    }

    /// Counts and logs errors a person must act on (a full volume).
    pub(crate) fn note_error(&self, e: BlobError) -> BlobError {
        if e.is_volume_full() {
            self.inner.metrics.volume_full.inc();
            tracing::warn!(error = %e, "write refused: the volume is full");
        }
        e
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
        self.inner.disk.total_bytes(&self.inner.root).unwrap_or(0)
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
        self.commit_with(op, None).await
    }

    /// Commits `op`, handing `content` to the committer, which releases it once the outcome is
    /// known (committed or not) — whether or not this caller is still waiting.
    pub(crate) async fn commit_with(&self, op: Op, content: Option<Finished>) -> Result<Reply> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .commit_tx
            .send(Job { op, reply: tx, content })
            .await
            .map_err(|_| BlobError::Unavailable("the store is shutting down".into()))?;
        rx.await
            .map_err(|_| BlobError::Unavailable("index commit failed; retry the request".into()))?
            .map_err(|e| self.note_error(e))
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
mod sim_disk;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_defects;
#[cfg(test)]
mod tests_power;
#[cfg(test)]
mod tests_scale;
#[cfg(test)]
mod tests_segments;
