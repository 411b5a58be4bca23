//! Ingest: new content hashed, cut into chunks and written durably before it is committed.
//!
//! Chunks of objects too big to be inline are written straight from the received buffers into
//! the ingest's open segment (`segments.rs`), one after another. When a chunk is sealed and the
//! index already holds it, the stored copy is verified (read and hashed): a sound one is used
//! and the new bytes are written over by the next chunk (deduplicated content is stored once);
//! a copy that fails verification is replaced by the new one (a re-upload repairs a rotted
//! chunk). [`Ingest::make_durable`] fdatasyncs the segment — one call for every chunk since the
//! last — before the index commit that references them.
//!
//! Chunks received from other pods (`write_chunk_durably`) keep one file per chunk: written to
//! `tmp/`, fsynced, published under its hash name with `link` (never replacing a sound copy),
//! the folder fsynced.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use blake3::hazmat::{ChainingValue, HasherExt};
use bytes::BytesMut;

use super::{
    ChunkMeta, INLINE_MAX, NewBlob, Store,
    disk::SegmentFile,
    pins::Pins,
    records::{SegLoc, UploadChunkRec},
    segments::{SEGMENT_MAX, SegWriter},
    tree::TreeHasher,
};
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
            addr: blake3::Hasher::new(),
            cv: None,
            tree: TreeHasher::default(),
            last_cv: None,
            cur_len: 0,
            mem: BytesMut::new(),
            seg: None,
            cur_start: None,
            to_sync: Vec::new(),
            dirty: false,
            failed: false,
            chunks: Vec::new(),
            pins: Pins::new(self),
            pending: Vec::new(),
            pending_from: 0,
            checked_space: false,
            started: Instant::now(),
            finished: false,
        })
    }

    /// Continues a resumable upload from its durable chunks (`rows`, in order): the
    /// whole-content hash continues from their stored chaining values, so nothing stored is
    /// read again.
    pub fn resume_ingest(&self, total_size: u64, rows: &[UploadChunkRec]) -> Result<Ingest> {
        let declared = (total_size > 0).then_some(total_size);
        let received: u64 = rows.iter().map(|r| r.size as u64).sum();
        let mut ing = self.ingest(declared.map(|d| d.saturating_sub(received)))?;
        ing.declared = declared;
        let chunk_size = self.inner.cfg.chunk_size;
        for r in rows {
            let hash = <[u8; 32]>::try_from(r.hash.as_slice())
                .map_err(|_| BlobError::Corrupt("upload chunk hash length".into()))?;
            let cv = <[u8; 32]>::try_from(r.cv.as_slice())
                .map_err(|_| BlobError::Corrupt("upload chunk chaining value length".into()))?;
            if r.size != chunk_size {
                return Err(BlobError::Corrupt(format!(
                    "upload chunk of {} bytes with a chunk size of {chunk_size}",
                    r.size
                )));
            }
            if let Some(prev) = ing.last_cv.replace(cv) {
                ing.tree.push(prev);
            }
            ing.total += r.size as u64;
            ing.chunks.push(ChunkMeta::new(hash, r.size));
        }
        ing.pending_from = ing.total;
        ing.cv = ing.next_cv_hasher();
        Ok(ing)
    }

    /// Refuses new content while the volume has less free space than `--volume-reserve`, which
    /// is kept for deletes and garbage collection to commit on a full disk.
    pub(crate) fn check_space(&self) -> Result<()> {
        let reserve = self.inner.cfg.volume_reserve;
        if reserve == 0 {
            return Ok(());
        }
        if let Some(free) = self.inner.disk.free_bytes(&self.inner.root)
            && free < reserve
        {
            return Err(self.volume_full(format!(
                "{free} bytes free, below the {reserve}-byte reserve (--volume-reserve)"
            )));
        }
        Ok(())
    }
}

/// Chunks that became durable together, for a resumable upload's record.
#[derive(Debug, Default)]
pub struct Durable {
    /// Byte offset of the first of them in the object.
    pub offset: u64,
    /// The chunks, in order.
    pub chunks: Vec<ChunkMeta>,
    /// Their chaining values at their offsets.
    pub cvs: Vec<ChainingValue>,
}

impl Durable {
    /// Whether no chunk became durable.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
}

/// Content being written. Blocking methods: drive it from `spawn_blocking`. Dropping it
/// unfinished removes its temporary files and the chunks it put in place that nothing
/// references, and releases its pins and quota reservation.
pub struct Ingest {
    store: Store,
    declared: Option<u64>,
    reserved: u64,
    total: u64,
    /// The current chunk's own hash (its address).
    addr: blake3::Hasher,
    /// The current chunk's chaining value at its offset in the object (`None` for the first
    /// chunk, whose chaining value comes from `addr`).
    cv: Option<blake3::Hasher>,
    tree: TreeHasher,
    /// The chaining value of the last sealed chunk, pushed into `tree` once another follows.
    last_cv: Option<ChainingValue>,
    cur_len: usize,
    /// The beginning of the object while it may still be small enough to keep inline.
    mem: BytesMut,
    /// The open segment this ingest writes (taken once the object is too big to be inline).
    seg: Option<SegWriter>,
    /// Offset in `seg` where the current chunk starts, once its bytes go there.
    cur_start: Option<u64>,
    /// Segments this ingest filled and gave back with bytes not yet synced.
    to_sync: Vec<std::sync::Arc<dyn SegmentFile>>,
    /// `seg` holds bytes not yet synced.
    dirty: bool,
    /// A segment write or sync failed: the segment is not reused.
    failed: bool,
    chunks: Vec<ChunkMeta>,
    /// Chunks sealed and not yet referenced by a committed record.
    pins: Pins,
    /// Chunks sealed since the last `make_durable`, with their chaining values.
    pending: Vec<(ChunkMeta, ChainingValue)>,
    /// Offset of the first pending chunk.
    pending_from: u64,
    checked_space: bool,
    started: Instant,
    /// Set once `finish` handed everything over to [`Finished`].
    finished: bool,
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // What it wrote into its segment is dead bytes now (compaction reclaims them).
        if let Some(w) = self.seg.take() {
            self.store.put_writer(w, !self.failed);
        }
        // Chunks this ingest published that no committed record references go now rather
        // than wait for the orphan scan.
        let removed = self.pins.release_and_remove_unreferenced();
        if removed > 0 {
            tracing::debug!(removed, "removed chunks of an abandoned upload");
        }
        self.store.unreserve(self.reserved);
        self.store.inner.metrics.uploads_in_progress.dec();
    }
}

/// Content fully written and durable on disk, ready to be committed. Dropping it (committed,
/// discarded or abandoned on a cancelled call) releases its pins and quota reservation.
pub struct Finished {
    /// The blob it forms.
    pub blob: NewBlob,
    store: Store,
    pins: Pins,
    reserved: u64,
    started: Instant,
    committed: bool,
}

impl Drop for Finished {
    fn drop(&mut self) {
        if self.committed {
            drop(std::mem::replace(&mut self.pins, Pins::new(&self.store)));
            self.store.inner.metrics.bytes_written.inc_by(self.blob.size);
        } else {
            self.pins.release_and_remove_unreferenced();
        }
        self.store.unreserve(self.reserved);
        self.store.inner.metrics.uploads_in_progress.dec();
    }
}

impl Finished {
    /// Marks the content as referenced by a committed record.
    pub(super) fn set_committed(&mut self) {
        self.committed = true;
    }

    /// Time since the first byte.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Drops the content without committing it (e.g. a wrong expected hash).
    pub fn discard(self) {}
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

    /// Chunks complete so far.
    pub fn chunks(&self) -> &[ChunkMeta] {
        &self.chunks
    }

    fn next_cv_hasher(&self) -> Option<blake3::Hasher> {
        if self.chunks.is_empty() {
            return None;
        }
        let mut h = blake3::Hasher::new();
        h.set_input_offset(self.chunks.len() as u64 * self.store.inner.cfg.chunk_size as u64);
        Some(h)
    }

    /// Marks chunks as referenced by the index (a resumable upload recorded them): they are no
    /// longer this ingest's to pin or clean up, and their bytes now count as stored rather than
    /// reserved.
    pub fn committed(&mut self, durable: &Durable) {
        for c in &durable.chunks {
            self.pins.release(&c.hash);
            let n = (c.size as u64).min(self.reserved);
            self.reserved -= n;
            self.store.unreserve(n);
        }
    }

    /// Whether [`Ingest::write`] of `more` bytes keeps everything in memory (an object small
    /// enough to live in the index). Such a write, and [`Ingest::finish`] after it, do no disk
    /// I/O beyond a `statfs`, so async code may call them directly instead of on the blocking
    /// pool (a small put then costs no thread hand-offs before its commit).
    pub fn stays_in_memory(&self, more: usize) -> bool {
        // Below a whole chunk too: a chunk that fills up is sealed, which writes.
        self.inline_room(more) && self.cur_len + more < self.store.inner.cfg.chunk_size as usize
    }

    /// Whether `more` bytes still fit in memory as the beginning of a small object.
    fn inline_room(&self, more: usize) -> bool {
        self.seg.is_none() && self.chunks.is_empty() && self.mem.len() + more <= INLINE_MAX
    }

    /// Appends data. Chunks that fill up are sealed into `tmp/`; they become durable and
    /// published under their hash with [`Ingest::make_durable`] (or [`Ingest::finish`]).
    /// Blocking.
    pub fn write(&mut self, mut data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
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
        if !self.checked_space {
            self.store.check_space()?;
            self.checked_space = true;
        }
        self.total = new_total;
        let chunk_size = self.store.inner.cfg.chunk_size as usize;
        while !data.is_empty() {
            let room = chunk_size - self.cur_len;
            let (now, rest) = data.split_at(room.min(data.len()));
            self.addr.update(now);
            if let Some(cv) = &mut self.cv {
                cv.update(now);
            }
            self.cur_len += now.len();
            if self.inline_room(now.len()) {
                self.mem.extend_from_slice(now);
            } else {
                if self.cur_start.is_none() {
                    self.start_chunk()?;
                }
                self.append(now)?;
            }
            if self.cur_len == chunk_size {
                self.seal_chunk()?;
            }
            data = rest;
        }
        Ok(())
    }

    /// Where the current chunk's bytes go: the ingest's segment (taken now if need be, or a
    /// new one once the current is full), with whatever of the chunk is still in memory.
    fn start_chunk(&mut self) -> Result<()> {
        if self.seg.as_ref().is_some_and(|w| w.end >= SEGMENT_MAX)
            && let Some(w) = self.seg.take()
        {
            if self.dirty {
                self.to_sync.push(w.file.clone());
                self.dirty = false;
            }
            self.store.put_writer(w, true);
        }
        if self.seg.is_none() {
            self.seg = Some(self.store.take_writer()?);
        }
        let Some(w) = &mut self.seg else {
            return Err(BlobError::Corrupt("no open segment".into()));
        };
        self.cur_start = Some(w.end);
        if !self.mem.is_empty() {
            let mem = std::mem::take(&mut self.mem);
            self.append(&mem)?;
        }
        Ok(())
    }

    /// Writes bytes of the current chunk at the end of the segment.
    fn append(&mut self, data: &[u8]) -> Result<()> {
        let Some(w) = &mut self.seg else {
            return Err(BlobError::Corrupt("no open segment".into()));
        };
        if let Err(e) = w.file.write_at(w.end, data) {
            self.failed = true;
            return Err(self.store.io_error("write segment", e));
        }
        w.end += data.len() as u64;
        self.dirty = true;
        Ok(())
    }

    /// Closes the current chunk: its hash and chaining value are final. If the index already
    /// holds the chunk and its copy verifies, that copy is used and the new bytes are given back
    /// to the segment; otherwise the new bytes are this chunk's copy (made durable by
    /// [`Ingest::make_durable`]).
    fn seal_chunk(&mut self) -> Result<()> {
        let hash = *self.addr.finalize().as_bytes();
        let cv = match &self.cv {
            Some(h) => h.finalize_non_root(),
            None => self.addr.finalize_non_root(),
        };
        let size = self.cur_len as u32;
        self.cur_len = 0;
        if self.cur_start.is_none() {
            // A chunk still in memory (the object outgrew the inline limit exactly here).
            self.start_chunk()?;
        }
        let (Some(start), Some(w)) = (self.cur_start.take(), &mut self.seg) else {
            return Err(BlobError::Corrupt("no open segment".into()));
        };
        let new = SegLoc {
            segment: w.id,
            offset: start,
        };
        // Pinned from now on (both copies) so GC and compaction never remove what the index
        // is about to reference.
        let mut meta = ChunkMeta::new(hash, size);
        meta.loc = Some(new);
        // A chunk this ingest wrote already (content repeating itself) is stored once.
        let earlier = self
            .chunks
            .iter()
            .find(|c| c.hash == hash && c.loc.is_some() && !c.repair)
            .map(|c| Existing::Sound(c.loc));
        let existing = match earlier {
            Some(e) => e,
            None => self.store.pin_for_seal(&mut self.pins, hash, size, new)?,
        };
        match existing {
            Existing::None => {}
            Existing::Sound(loc) => {
                meta.loc = loc;
                if let Some(w) = &mut self.seg
                    && w.end == start + size as u64
                {
                    w.end = start;
                }
            }
            Existing::Rotted => meta.repair = true,
        }
        self.chunks.push(meta.clone());
        self.pending.push((meta, cv));
        if let Some(prev) = self.last_cv.replace(cv) {
            self.tree.push(prev);
        }
        self.addr = blake3::Hasher::new();
        self.cv = self.next_cv_hasher();
        Ok(())
    }

    /// Bytes in chunks sealed since the last [`Ingest::make_durable`].
    pub fn pending_bytes(&self) -> u64 {
        self.pending.iter().map(|(c, _)| c.size as u64).sum()
    }

    /// Makes every sealed chunk durable — fsynced in `tmp/`, published under its hash without
    /// replacing anything, each chunk folder fsynced once — and returns the chunks sealed since
    /// the last call. Deferring this from every chunk to a batch lets the kernel write back
    /// while the upload continues. Blocking.
    pub fn make_durable(&mut self) -> Result<Durable> {
        let _span = tracing::debug_span!("fsync", chunks = self.pending.len()).entered();
        // Segments filled earlier, then the open one: one fdatasync each for every chunk since
        // the last call (no per-chunk files, links or folder fsyncs).
        for f in std::mem::take(&mut self.to_sync) {
            if let Err(e) = f.sync_data() {
                self.failed = true;
                return Err(self.store.io_error("fsync segment", e));
            }
        }
        if self.dirty
            && let Some(w) = &self.seg
        {
            if let Err(e) = w.file.sync_data() {
                self.failed = true;
                return Err(self.store.io_error("fsync segment", e));
            }
            self.dirty = false;
        }
        let pending = std::mem::take(&mut self.pending);
        let offset = self.pending_from;
        self.pending_from = self.total - self.cur_len as u64;
        let (chunks, cvs) = pending.into_iter().unzip();
        Ok(Durable { offset, chunks, cvs })
    }

    /// Seals the last chunk and returns the content ready to commit, plus the chunks that became
    /// durable now. Checks the declared total size. Blocking.
    pub fn finish(mut self) -> Result<(Finished, Durable)> {
        if let Some(d) = self.declared
            && self.total != d
        {
            return Err(BlobError::invalid(format!(
                "received {} bytes but the declared total size is {d}",
                self.total
            )));
        }
        let mut key = None;
        if self.chunks.is_empty() && self.seg.is_none() {
            // Small object: one inline chunk (or none for empty content).
            let hash = *self.addr.finalize().as_bytes();
            if self.cur_len > 0 {
                let data = std::mem::take(&mut self.mem).freeze();
                let mut meta = ChunkMeta::new(hash, data.len() as u32);
                meta.inline = Some(data);
                self.chunks.push(meta);
                self.cur_len = 0;
            }
            key = Some(hash);
        } else if self.cur_len > 0 {
            self.seal_chunk()?;
        }
        let last = self.make_durable()?;
        // The segment goes back to the pool; its chunks stay pinned until the commit.
        if let Some(w) = self.seg.take() {
            self.store.put_writer(w, true);
        }
        let key = match (key, self.chunks.as_slice()) {
            (Some(k), _) => k,
            (None, [only]) => only.hash,
            (None, _) => {
                let last_cv = self
                    .last_cv
                    .ok_or_else(|| BlobError::Corrupt("no chaining value for the last chunk".into()))?;
                self.tree
                    .finalize(last_cv)
                    .ok_or_else(|| BlobError::Corrupt("content key of a multi-chunk object".into()))?
            }
        };
        let blob = NewBlob {
            key,
            size: self.total,
            chunks: std::mem::take(&mut self.chunks),
            content_type: String::new(),
            attributes: HashMap::new(),
        };
        let mut pins = Pins::new(&self.store);
        self.pins.move_into(&mut pins);
        let finished = Finished {
            blob,
            store: self.store.clone(),
            pins,
            reserved: std::mem::take(&mut self.reserved),
            started: self.started,
            committed: false,
        };
        // Ownership of pins, reservation and the in-progress gauge moved to `finished`.
        self.finished = true;
        Ok((finished, last))
    }
}

/// What the index already holds of a chunk being sealed.
pub(super) enum Existing {
    /// Nothing: the new bytes are the chunk's copy.
    None,
    /// A copy that verifies: in a segment (`Some`), or inline or a per-chunk file (`None`).
    Sound(Option<SegLoc>),
    /// A copy that fails verification: the new bytes replace it.
    Rotted,
}

impl Store {
    /// Pins a chunk being sealed at its new place `new` and, if the index already holds it, at
    /// the stored copy's place too — reading the record under the pin lock, so compaction
    /// either has moved the copy already (the record says where to) or sees the pin and keeps
    /// its segment — then verifies the stored copy. Blocking.
    pub(super) fn pin_for_seal(&self, pins: &mut Pins, hash: [u8; 32], size: u32, new: SegLoc) -> Result<Existing> {
        let rec = {
            let mut t = self.pin_table();
            let rec = self.chunk_record(&hash)?;
            pins.add_in(&mut t, hash, Some(new), size);
            if let Some(r) = &rec
                && let Some(l) = r.loc
            {
                pins.add_in(&mut t, hash, Some(l), size);
            }
            rec
        };
        let Some(rec) = rec else { return Ok(Existing::None) };
        let sound = if rec.inline {
            true
        } else if let Some(l) = rec.loc {
            self.read_segment(&l, rec.size)
                .is_ok_and(|d| d.len() == size as usize && blake3::hash(&d).as_bytes() == &hash)
        } else {
            self.existing_chunk_is_sound(&self.chunk_path(&hash), &hash, size)
        };
        if sound {
            Ok(Existing::Sound(rec.loc))
        } else {
            self.inner.metrics.integrity_failures.inc();
            tracing::warn!(chunk = %super::hex(&hash), "stored chunk failed verification; replaced by the new upload's copy");
            Ok(Existing::Rotted)
        }
    }

    /// Publishes the fsynced temporary file `tmp` as chunk `hash` at `dest` without replacing a
    /// file already there: an existing copy is verified and fsynced instead, and one that fails
    /// verification is replaced by the durable new copy. Blocking.
    pub(super) fn publish_chunk(&self, tmp: &Path, dest: &Path, hash: &[u8; 32], size: u32) -> Result<()> {
        let disk = &self.inner.disk;
        match disk.hard_link(tmp, dest) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if self.existing_chunk_is_sound(dest, hash, size) {
                    disk.sync_file(dest)
                        .map_err(|e| self.io_error(format!("fsync {}", dest.display()), e))
                } else {
                    self.inner.metrics.integrity_failures.inc();
                    tracing::warn!(chunk = %super::hex(hash), "stored chunk failed verification; replaced by the new upload's copy");
                    disk.rename(tmp, dest)
                        .map_err(|e| self.io_error(format!("rename to {}", dest.display()), e))
                }
            }
            Err(e) => Err(self.io_error(format!("link {}", dest.display()), e)),
        }
    }

    /// Writes a whole, already verified chunk (one received from another pod) the way an
    /// upload does: fsynced in `tmp/`, published without replacing a sound copy (a corrupt one
    /// is replaced), its folder fsynced. Blocking.
    pub(super) fn write_chunk_durably(&self, hash: &[u8; 32], data: &[u8]) -> Result<()> {
        let disk = &self.inner.disk;
        let tmp = self.tmp_path();
        let written = (|| {
            let mut f = disk
                .create(&tmp)
                .map_err(|e| self.io_error(format!("create {}", tmp.display()), e))?;
            f.write_all(data).map_err(|e| self.io_error("write chunk", e))?;
            f.sync_data().map_err(|e| self.io_error("fsync chunk", e))?;
            drop(f);
            let dest = self.chunk_path(hash);
            self.publish_chunk(&tmp, &dest, hash, data.len() as u32)?;
            if let Some(d) = dest.parent() {
                disk.sync_dir(d)
                    .map_err(|e| self.io_error(format!("fsync {}", d.display()), e))?;
            }
            Ok(())
        })();
        let _ = disk.remove_file(&tmp);
        written
    }

    fn existing_chunk_is_sound(&self, path: &Path, hash: &[u8; 32], size: u32) -> bool {
        match self.inner.disk.read(path) {
            Ok(data) => data.len() == size as usize && blake3::hash(&data).as_bytes() == hash,
            Err(_) => false,
        }
    }
}
