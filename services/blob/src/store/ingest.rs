//! Ingest: new content hashed, cut into chunks and written durably before it is committed.

use std::{
    collections::HashMap,
    fs::{self, File},
    io::Write,
    path::PathBuf,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use bytes::BytesMut;

use super::{ChunkMeta, INLINE_MAX, NewBlob, Store, records::UploadRec, sync_dir};
use crate::error::{BlobError, Result};

impl Store {
    pub(super) fn tmp_path(&self) -> PathBuf {
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
    pub(super) fn release(self, store: &Store) {
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
