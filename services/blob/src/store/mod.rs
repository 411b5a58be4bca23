//! The storage engine: content split into chunks addressed by BLAKE3, chunk files written to a
//! temporary name, fsynced, renamed and their directory fsynced; an embedded transactional
//! index (redb) committed durably before any reply; start-up recovery; verified reads; garbage
//! collection of unreferenced chunks after a grace period.
//!
//! Objects up to [`INLINE_MAX`] bytes are kept inside the index, so a small put is one grouped
//! index commit and no file at all.

pub mod index;
pub mod keys;
pub mod records;

use std::{
    collections::{HashMap, HashSet},
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::{Bytes, BytesMut};
use prost::Message;
use redb::{Database, ReadableDatabase};
use tokio::sync::{mpsc, oneshot};

pub use index::{ChunkMeta, MetadataPatch, NewBlob, hex};
use index::{Counters, Job, Op, Reply};
use records::{BlobRec, ChunkRec, FileRec, UploadRec};

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

    fn pin(&self, hash: [u8; 32]) {
        *self
            .inner
            .pins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(hash)
            .or_insert(0) += 1;
    }

    fn unpin(&self, hash: &[u8; 32]) {
        let mut pins = self.inner.pins.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = pins.get_mut(hash) {
            *n -= 1;
            if *n == 0 {
                pins.remove(hash);
            }
        }
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

    fn tmp_path(&self) -> PathBuf {
        let n = self.inner.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.inner
            .root
            .join("tmp")
            .join(format!("{}-{n}.part", std::process::id()))
    }

    /// Starts writing new content. `declared` is the total size if the client said it.
    pub fn ingest(&self, declared: Option<u64>) -> Result<Ingest> {
        if let Some(d) = declared {
            self.check_size(d)?;
            self.reserve(d)?;
        }
        self.inner.metrics.uploads_in_progress.inc();
        Ok(Ingest {
            store: self.clone(),
            declared,
            reserved: declared.unwrap_or(0),
            total: 0,
            whole: blake3::Hasher::new(),
            cur_hasher: blake3::Hasher::new(),
            cur_len: 0,
            mem: BytesMut::new(),
            file: None,
            chunks: Vec::new(),
            pinned: Vec::new(),
            unsynced: Vec::new(),
            pending: Vec::new(),
            started: Instant::now(),
            finished: false,
        })
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

    /// Reads one chunk and verifies its hash; a mismatch or a missing chunk is DATA_LOSS.
    /// Blocking.
    pub fn read_chunk(&self, hash: &[u8; 32], size: u32) -> Result<Bytes> {
        let inline = if size as usize <= INLINE_MAX {
            self.inline_chunk(hash)?
        } else {
            None
        };
        let data = if let Some(d) = inline {
            d
        } else {
            match fs::read(self.chunk_path(hash)) {
                Ok(d) => Bytes::from(d),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.inner.metrics.integrity_failures.inc();
                    tracing::error!(chunk = %hex(hash), "chunk file missing");
                    return Err(BlobError::DataLoss(format!(
                        "chunk {} is missing from this node's storage",
                        hex(hash)
                    )));
                }
                Err(e) => return Err(BlobError::io(format!("read chunk {}", hex(hash)), e)),
            }
        };
        self.verify(hash, size, data)
    }

    /// Checks data read for a chunk against its hash and length.
    fn verify(&self, hash: &[u8; 32], size: u32, data: Bytes) -> Result<Bytes> {
        if data.len() != size as usize || blake3::hash(&data).as_bytes() != hash {
            self.inner.metrics.integrity_failures.inc();
            tracing::error!(chunk = %hex(hash), expected_len = size, len = data.len(), "chunk failed its hash check");
            return Err(BlobError::DataLoss(format!(
                "chunk {} failed its integrity check (stored data is corrupt)",
                hex(hash)
            )));
        }
        self.inner.metrics.bytes_read.inc_by(data.len() as u64);
        Ok(data)
    }

    fn inline_chunk(&self, hash: &[u8; 32]) -> Result<Option<Bytes>> {
        let txn = self.inner.db.begin_read()?;
        let t = txn.open_table(index::INLINE)?;
        Ok(t.get(&hash[..])?.map(|v| Bytes::copy_from_slice(v.value())))
    }

    /// A file's record.
    pub fn get_file(&self, key: &str) -> Result<FileRec> {
        let txn = self.inner.db.begin_read()?;
        let t = txn.open_table(index::FILES)?;
        match t.get(key)? {
            Some(v) => FileRec::decode(v.value()).map_err(|e| BlobError::Corrupt(e.to_string())),
            None => Err(BlobError::NotFound(format!("file '{key}' not found"))),
        }
    }

    /// A blob's record.
    pub fn get_blob(&self, key: &[u8; 32]) -> Result<BlobRec> {
        let txn = self.inner.db.begin_read()?;
        let t = txn.open_table(index::BLOBS)?;
        match t.get(&key[..])? {
            Some(v) => BlobRec::decode(v.value()).map_err(|e| BlobError::Corrupt(e.to_string())),
            None => Err(BlobError::NotFound(format!("blob {} not found", hex(key)))),
        }
    }

    /// A file, its blob and, for small objects kept in the index, the verified content — all
    /// from one snapshot, so a small read needs no other I/O.
    pub fn get_small_file(&self, key: &str) -> Result<(FileRec, BlobRec, Option<Bytes>)> {
        let txn = self.inner.db.begin_read()?;
        let files = txn.open_table(index::FILES)?;
        let f = match files.get(key)? {
            Some(v) => FileRec::decode(v.value()).map_err(|e| BlobError::Corrupt(e.to_string()))?,
            None => return Err(BlobError::NotFound(format!("file '{key}' not found"))),
        };
        let blobs = txn.open_table(index::BLOBS)?;
        let b = match blobs.get(f.blob_key.as_slice())? {
            Some(v) => BlobRec::decode(v.value()).map_err(|e| BlobError::Corrupt(e.to_string()))?,
            None => return Err(BlobError::Corrupt(format!("file '{key}' points at a missing blob"))),
        };
        let mut inline = None;
        if let ([h], [size]) = (b.chunk_hashes.as_slice(), b.chunk_sizes.as_slice())
            && *size as usize <= INLINE_MAX
            && let Ok(hash) = <[u8; 32]>::try_from(h.as_slice())
            && let Some(v) = txn.open_table(index::INLINE)?.get(&hash[..])?
        {
            inline = Some(self.verify(&hash, *size, Bytes::copy_from_slice(v.value()))?);
        }
        Ok((f, b, inline))
    }

    /// Files with `prefix`, after `after` (exclusive), at most `limit`, in key order; and
    /// whether more follow.
    pub fn list_files(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<(Vec<FileRec>, bool)> {
        let txn = self.inner.db.begin_read()?;
        let t = txn.open_table(index::FILES)?;
        let start = match after {
            Some(a) if a >= prefix => a,
            _ => prefix,
        };
        let mut out = Vec::new();
        for e in t.range(start..)? {
            let (k, v) = e?;
            let key = k.value();
            if Some(key) == after {
                continue;
            }
            if !key.starts_with(prefix) {
                break;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push(FileRec::decode(v.value()).map_err(|e| BlobError::Corrupt(e.to_string()))?);
        }
        Ok((out, false))
    }

    /// Number of files with `prefix`.
    pub fn count_files(&self, prefix: &str) -> Result<u64> {
        if prefix.is_empty() {
            return Ok(self.stats().files);
        }
        let txn = self.inner.db.begin_read()?;
        let t = txn.open_table(index::FILES)?;
        let mut n = 0;
        for e in t.range(prefix..)? {
            let (k, _) = e?;
            if !k.value().starts_with(prefix) {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Blobs in key order after `start_after`, with keys starting with `prefix`, at most `limit`
    /// (0: no limit).
    pub fn list_blobs(&self, prefix: &[u8], start_after: &[u8], limit: usize) -> Result<Vec<([u8; 32], BlobRec)>> {
        let txn = self.inner.db.begin_read()?;
        let t = txn.open_table(index::BLOBS)?;
        let start: &[u8] = if start_after > prefix { start_after } else { prefix };
        let mut out = Vec::new();
        for e in t.range(start..)? {
            let (k, v) = e?;
            let key = k.value();
            if key == start_after {
                continue;
            }
            if !key.starts_with(prefix) {
                break;
            }
            let Ok(key) = <[u8; 32]>::try_from(key) else { continue };
            out.push((
                key,
                BlobRec::decode(v.value()).map_err(|e| BlobError::Corrupt(e.to_string()))?,
            ));
            if limit > 0 && out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// An upload in progress.
    pub fn get_upload(&self, id: &str) -> Result<UploadRec> {
        let txn = self.inner.db.begin_read()?;
        let t = txn.open_table(index::UPLOADS)?;
        match t.get(id)? {
            Some(v) => UploadRec::decode(v.value()).map_err(|e| BlobError::Corrupt(e.to_string())),
            None => Err(BlobError::NotFound(format!(
                "upload '{id}' is unknown or expired: start a new upload"
            ))),
        }
    }

    /// Whether a tombstone exists for `key` (the file was deleted).
    pub fn tombstone(&self, key: &str) -> Result<Option<records::Tombstone>> {
        let txn = self.inner.db.begin_read()?;
        let t = txn.open_table(index::TOMBSTONES)?;
        t.get(key)?
            .map(|v| records::Tombstone::decode(v.value()).map_err(|e| BlobError::Corrupt(e.to_string())))
            .transpose()
    }

    /// Commits a finished ingest as the file `rec.key` (replacing any previous content).
    /// Returns the stored record and the one it replaced.
    pub async fn put_file(&self, mut rec: FileRec, content: Finished) -> Result<(FileRec, Option<FileRec>)> {
        rec.blob_key = content.blob.key.to_vec();
        rec.size = content.blob.size;
        let blob = content.blob.clone();
        let reply = self.commit(Op::PutFile { rec, blob }).await;
        content.release(self);
        match reply? {
            Reply::File(f, old) => Ok((f, old)),
            other => Err(BlobError::Corrupt(format!("unexpected reply {other:?}"))),
        }
    }

    /// Deletes a file; its content goes when nothing else uses it (after the GC grace period).
    pub async fn delete_file(&self, key: &str) -> Result<FileRec> {
        match self
            .commit(Op::DeleteFile {
                key: key.to_string(),
                now_ns: now_ns(),
            })
            .await?
        {
            Reply::Deleted(f) => Ok(f),
            other => Err(BlobError::Corrupt(format!("unexpected reply {other:?}"))),
        }
    }

    /// Changes a file's metadata, name or content type.
    pub async fn update_file(&self, key: &str, patch: MetadataPatch) -> Result<FileRec> {
        match self
            .commit(Op::UpdateFile {
                key: key.to_string(),
                patch,
                now_ns: now_ns(),
            })
            .await?
        {
            Reply::File(f, _) => Ok(f),
            other => Err(BlobError::Corrupt(format!("unexpected reply {other:?}"))),
        }
    }

    /// Deletes a blob uploaded directly; refused while files use it.
    pub async fn delete_blob(&self, key: [u8; 32]) -> Result<u64> {
        match self.commit(Op::DeleteBlob { key, now_ns: now_ns() }).await? {
            Reply::Freed(n) => Ok(n),
            other => Err(BlobError::Corrupt(format!("unexpected reply {other:?}"))),
        }
    }

    /// Registers a resumable upload.
    pub async fn create_upload(&self, id: &str, total_size: u64, attributes: HashMap<String, String>) -> Result<()> {
        let now = now_ns();
        let rec = UploadRec {
            total_size,
            attributes,
            received: 0,
            chunk_hashes: vec![],
            chunk_sizes: vec![],
            created_ns: now,
            updated_ns: now,
        };
        self.commit(Op::CreateUpload {
            id: id.to_string(),
            rec,
        })
        .await?;
        Ok(())
    }

    /// Records durable chunks of a resumable upload; returns the durable byte count.
    pub async fn append_upload(&self, id: &str, chunks: Vec<ChunkMeta>) -> Result<u64> {
        let mut received = None;
        for chunk in chunks {
            let r = self
                .commit(Op::AppendUpload {
                    id: id.to_string(),
                    chunk,
                    now_ns: now_ns(),
                })
                .await;
            match r? {
                Reply::Received(n) => received = Some(n),
                other => return Err(BlobError::Corrupt(format!("unexpected reply {other:?}"))),
            }
        }
        match received {
            Some(n) => Ok(n),
            None => Ok(self.get_upload(id)?.received),
        }
    }

    /// Turns a resumable upload into a blob.
    pub async fn complete_upload(&self, id: &str, content: Finished) -> Result<BlobRec> {
        let blob = content.blob.clone();
        let r = self
            .commit(Op::CompleteUpload {
                id: id.to_string(),
                blob,
                now_ns: now_ns(),
            })
            .await;
        content.release(self);
        match r? {
            Reply::Blob(b) => Ok(b),
            other => Err(BlobError::Corrupt(format!("unexpected reply {other:?}"))),
        }
    }

    /// Abandons a resumable upload and releases its chunks.
    pub async fn abort_upload(&self, id: &str) -> Result<()> {
        self.commit(Op::AbortUpload {
            id: id.to_string(),
            now_ns: now_ns(),
        })
        .await?;
        Ok(())
    }

    /// Continues a resumable upload: an ingest positioned after its durable chunks, with the
    /// whole-content hash rebuilt by re-reading them. Blocking.
    pub fn resume_ingest(&self, rec: &UploadRec) -> Result<Ingest> {
        let declared = (rec.total_size > 0).then_some(rec.total_size);
        let mut ing = self.ingest(declared.map(|d| d.saturating_sub(rec.received)))?;
        ing.declared = declared;
        for (h, &size) in rec.chunk_hashes.iter().zip(&rec.chunk_sizes) {
            let hash =
                <[u8; 32]>::try_from(h.as_slice()).map_err(|_| BlobError::Corrupt("chunk hash length".into()))?;
            let data = self.read_chunk(&hash, size)?;
            ing.whole.update(&data);
            ing.total += size as u64;
            ing.chunks.push(ChunkMeta {
                hash,
                size,
                inline: None,
            });
        }
        Ok(ing)
    }

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

    /// Pins a blob's chunks for the duration of a read so GC cannot remove them mid-stream.
    pub fn pin_blob(&self, blob: &BlobRec) -> ReadPin {
        let hashes: Vec<[u8; 32]> = blob
            .chunk_hashes
            .iter()
            .filter_map(|h| <[u8; 32]>::try_from(h.as_slice()).ok())
            .collect();
        for h in &hashes {
            self.pin(*h);
        }
        ReadPin {
            store: self.clone(),
            hashes,
        }
    }

    /// Chunk record (for tests and scrubbing).
    pub fn chunk_record(&self, hash: &[u8; 32]) -> Result<Option<ChunkRec>> {
        let txn = self.inner.db.begin_read()?;
        let t = txn.open_table(index::CHUNKS)?;
        t.get(&hash[..])?
            .map(|v| ChunkRec::decode(v.value()).map_err(|e| BlobError::Corrupt(e.to_string())))
            .transpose()
    }
}

/// Keeps chunks pinned while a read streams them.
pub struct ReadPin {
    store: Store,
    hashes: Vec<[u8; 32]>,
}

impl Drop for ReadPin {
    fn drop(&mut self) {
        for h in &self.hashes {
            self.store.unpin(h);
        }
    }
}

/// Content being written. Blocking methods: drive it from `spawn_blocking`. Dropping it
/// unfinished removes its temporary file and releases its pins and quota reservation.
pub struct Ingest {
    store: Store,
    declared: Option<u64>,
    reserved: u64,
    total: u64,
    whole: blake3::Hasher,
    cur_hasher: blake3::Hasher,
    cur_len: usize,
    /// The beginning of the object while it may still be small enough to keep inline.
    mem: BytesMut,
    /// The current chunk's temporary file once the object is too big to be inline.
    file: Option<(File, PathBuf)>,
    chunks: Vec<ChunkMeta>,
    /// Chunks this ingest renamed into place and that the index does not reference yet.
    pinned: Vec<[u8; 32]>,
    /// Chunks renamed into place by this ingest and not fsynced yet.
    unsynced: Vec<[u8; 32]>,
    /// Chunks sealed since the last `make_durable`.
    pending: Vec<ChunkMeta>,
    started: Instant,
    /// Set once `finish` handed everything over to [`Finished`].
    finished: bool,
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Some((_, path)) = self.file.take() {
            let _ = fs::remove_file(path);
        }
        // Chunks this ingest put in place that no committed record references are removed now
        // rather than left for the orphan scan. Under the pin lock, as in GC: another upload of
        // the same content either pinned it already (kept) or will write it again.
        let mut removed = 0;
        {
            let mut pins = self.store.inner.pins.lock().unwrap_or_else(|p| p.into_inner());
            for h in &self.pinned {
                if let Some(n) = pins.get_mut(h) {
                    *n -= 1;
                    if *n == 0 {
                        pins.remove(h);
                    }
                }
                if !pins.contains_key(h)
                    && matches!(self.store.chunk_record(h), Ok(None))
                    && fs::remove_file(self.store.chunk_path(h)).is_ok()
                {
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            tracing::debug!(removed, "removed chunks of an abandoned upload");
        }
        self.store.unreserve(self.reserved);
        self.store.inner.metrics.uploads_in_progress.dec();
    }
}

/// Content fully written and durable on disk, ready to be committed.
pub struct Finished {
    /// The blob it forms.
    pub blob: NewBlob,
    pinned: Vec<[u8; 32]>,
    reserved: u64,
    started: Instant,
}

impl Finished {
    fn release(self, store: &Store) {
        for h in &self.pinned {
            store.unpin(h);
        }
        store.unreserve(self.reserved);
        store.inner.metrics.uploads_in_progress.dec();
        store.inner.metrics.bytes_written.inc_by(self.blob.size);
    }

    /// Time since the first byte.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Drops the content without committing it (e.g. a wrong expected hash).
    pub fn discard(self, store: &Store) {
        for h in &self.pinned {
            store.unpin(h);
        }
        store.unreserve(self.reserved);
        store.inner.metrics.uploads_in_progress.dec();
    }
}

impl Ingest {
    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Chunks complete and durable on disk.
    pub fn chunks(&self) -> &[ChunkMeta] {
        &self.chunks
    }

    /// Marks chunks as referenced by the index (a resumable upload recorded them): they are no
    /// longer this ingest's to pin or clean up.
    pub fn committed(&mut self, chunks: &[ChunkMeta]) {
        for c in chunks {
            if let Some(i) = self.pinned.iter().position(|h| *h == c.hash) {
                self.pinned.swap_remove(i);
                self.store.unpin(&c.hash);
            }
        }
    }

    /// Appends data. Chunks that fill up are renamed into place under their hash; they become
    /// durable with [`Ingest::make_durable`] (or [`Ingest::finish`]). Blocking.
    pub fn write(&mut self, mut data: &[u8]) -> Result<()> {
        let new_total = self.total + data.len() as u64;
        match self.declared {
            Some(d) if new_total > d => {
                return Err(BlobError::invalid(format!(
                    "received {new_total} bytes but the declared total size is {d}"
                )));
            }
            Some(_) => {}
            None => {
                self.store.check_size(new_total)?;
                self.store.reserve(data.len() as u64)?;
                self.reserved += data.len() as u64;
            }
        }
        self.whole.update(data);
        self.total = new_total;
        let chunk_size = self.store.inner.cfg.chunk_size as usize;
        while !data.is_empty() {
            let room = chunk_size - self.cur_len;
            let (now, rest) = data.split_at(room.min(data.len()));
            self.cur_hasher.update(now);
            self.cur_len += now.len();
            if self.file.is_none() && self.chunks.is_empty() && self.mem.len() + now.len() <= INLINE_MAX {
                self.mem.extend_from_slice(now);
            } else {
                if self.file.is_none() {
                    let path = self.store.tmp_path();
                    let mut f =
                        File::create(&path).map_err(|e| BlobError::io(format!("create {}", path.display()), e))?;
                    f.write_all(&self.mem).map_err(|e| BlobError::io("write chunk", e))?;
                    self.mem.clear();
                    self.file = Some((f, path));
                }
                if let Some((f, _)) = &mut self.file {
                    f.write_all(now).map_err(|e| BlobError::io("write chunk", e))?;
                }
            }
            if self.cur_len == chunk_size {
                self.seal_chunk()?;
            }
            data = rest;
        }
        Ok(())
    }

    /// Makes the current chunk durable under its hash.
    fn seal_chunk(&mut self) -> Result<ChunkMeta> {
        let hash = *std::mem::take(&mut self.cur_hasher).finalize().as_bytes();
        let size = self.cur_len as u32;
        self.cur_len = 0;
        let (f, tmp) = match self.file.take() {
            Some(x) => x,
            None => {
                // A chunk that was still in memory (the object outgrew the inline limit exactly here).
                let path = self.store.tmp_path();
                let mut f = File::create(&path).map_err(|e| BlobError::io(format!("create {}", path.display()), e))?;
                f.write_all(&self.mem).map_err(|e| BlobError::io("write chunk", e))?;
                self.mem.clear();
                (f, path)
            }
        };
        drop(f);
        // Pin before anything else so GC never deletes a file the index is about to reference.
        self.store.pin(hash);
        self.pinned.push(hash);
        let stored = matches!(self.store.chunk_record(&hash)?, Some(r) if r.refs > 0);
        if stored {
            // Already durable under its name: never replace a committed chunk with a copy that
            // is not yet on disk.
            let _ = fs::remove_file(&tmp);
        } else {
            let dest = self.store.chunk_path(&hash);
            fs::rename(&tmp, &dest).map_err(|e| BlobError::io(format!("rename to {}", dest.display()), e))?;
            self.unsynced.push(hash);
        }
        let meta = ChunkMeta {
            hash,
            size,
            inline: None,
        };
        self.chunks.push(meta.clone());
        self.pending.push(meta.clone());
        Ok(meta)
    }

    /// Bytes in chunks sealed since the last [`Ingest::make_durable`].
    pub fn pending_bytes(&self) -> u64 {
        self.pending.iter().map(|c| c.size as u64).sum()
    }

    /// Makes every sealed chunk durable — data fsynced (by path, so whichever complete copy
    /// holds the name is the one synced) and each chunk folder fsynced once — and returns the
    /// chunks sealed since the last call. Deferring this from every chunk to a batch lets the
    /// kernel write back while the upload continues. Blocking.
    pub fn make_durable(&mut self) -> Result<Vec<ChunkMeta>> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for hash in self.unsynced.drain(..) {
            let path = self.store.chunk_path(&hash);
            File::open(&path)
                .and_then(|f| f.sync_data())
                .map_err(|e| BlobError::io(format!("fsync {}", path.display()), e))?;
            if let Some(d) = path.parent()
                && !dirs.iter().any(|x| x == d)
            {
                dirs.push(d.to_path_buf());
            }
        }
        for d in dirs {
            sync_dir(&d).map_err(|e| BlobError::io(format!("fsync {}", d.display()), e))?;
        }
        Ok(std::mem::take(&mut self.pending))
    }

    /// Seals the last chunk and returns the content ready to commit, plus the chunks that became
    /// durable now. Checks the declared total size. Blocking.
    pub fn finish(mut self) -> Result<(Finished, Vec<ChunkMeta>)> {
        if let Some(d) = self.declared
            && self.total != d
        {
            return Err(BlobError::invalid(format!(
                "received {} bytes but the declared total size is {d}",
                self.total
            )));
        }
        if self.chunks.is_empty() && self.file.is_none() {
            // Small object: one inline chunk (or none for empty content).
            if self.cur_len > 0 {
                let hash = *std::mem::take(&mut self.cur_hasher).finalize().as_bytes();
                let data = std::mem::take(&mut self.mem).freeze();
                self.chunks.push(ChunkMeta {
                    hash,
                    size: data.len() as u32,
                    inline: Some(data),
                });
                self.cur_len = 0;
            }
        } else if self.cur_len > 0 {
            self.seal_chunk()?;
        }
        let last = self.make_durable()?;
        let key = *self.whole.finalize().as_bytes();
        let blob = NewBlob {
            key,
            size: self.total,
            chunks: std::mem::take(&mut self.chunks),
            content_type: String::new(),
            attributes: HashMap::new(),
        };
        let finished = Finished {
            blob,
            pinned: std::mem::take(&mut self.pinned),
            reserved: std::mem::take(&mut self.reserved),
            started: self.started,
        };
        // Ownership of pins, reservation and the in-progress gauge moved to `finished`.
        self.finished = true;
        Ok((finished, last))
    }
}

#[cfg(test)]
mod tests;
