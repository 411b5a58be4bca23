//! Segment files: the chunks of large objects are appended to a few append-only files
//! (`segments/<id:016x>.seg`) instead of one file per chunk, and the index records each chunk's
//! place (segment, offset; the length is its size).
//!
//! - **Writers.** An ingest takes a segment from a small pool of open ones (or creates one) and
//!   is its only writer until it gives it back, so chunks never interleave and a deduplicated
//!   chunk's bytes can be written over by the next chunk. A segment past [`SEGMENT_MAX`] (or
//!   one whose writer hit an I/O error) is sealed: never written again.
//! - **Durability.** A new segment's directory entry is fsynced once, when it is created; its
//!   data is fdatasynced (one call per batch of chunks) before the index commit that references
//!   it. Bytes past what the index references (a crash before the commit, a torn tail, an
//!   abandoned upload) are garbage that compaction reclaims; at start-up a segment the index
//!   references nothing in is deleted.
//! - **Dead bytes and compaction.** The index keeps each segment's live bytes; GC of a chunk
//!   makes its bytes dead. Compaction copies the live chunks of sealed segments that are at
//!   least [`COMPACT_DEAD_RATIO`] dead into an open segment (verified, fdatasynced), commits
//!   their new places (a chunk moves only if its record still points at the old place), and
//!   deletes a segment once the index references nothing in it and no upload pins it (decided
//!   under the pin lock, after re-reading the index). Each pass copies at most
//!   [`COMPACT_BYTES_PER_PASS`].

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, MutexGuard},
};

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable};

use super::{
    Store,
    disk::{Disk, SegmentFile},
    hex,
    index::{self, Op, Reply, SEGMENT_CHUNKS, SEGMENT_LIVE},
    records::{ChunkRec, SegLoc, decode},
};
use crate::{
    error::{BlobError, Result},
    metrics::BlobMetrics,
};

/// A segment is sealed (no more appends) once it reaches this size.
pub(crate) const SEGMENT_MAX: u64 = 256 << 20;
/// Sealed segments at least this dead (dead bytes / length) are compacted.
pub(crate) const COMPACT_DEAD_RATIO: f64 = 0.5;
/// Most live bytes one compaction pass copies.
pub(crate) const COMPACT_BYTES_PER_PASS: u64 = 64 << 20;

/// An open segment in the hands of one writer: appends go at `end`.
pub(crate) struct SegWriter {
    pub id: u64,
    pub file: Arc<dyn SegmentFile>,
    pub end: u64,
}

struct SegInfo {
    file: Arc<dyn SegmentFile>,
    /// Bytes written (the file may be longer after a rewind: garbage).
    len: u64,
    /// In the pool or held by a writer: never compacted.
    open: bool,
}

/// Every known segment and the pool of open ones.
#[derive(Default)]
pub(crate) struct SegTable {
    files: HashMap<u64, SegInfo>,
    pool: Vec<SegWriter>,
    next_id: u64,
}

/// The file name of segment `id`.
pub(crate) fn segment_name(id: u64) -> String {
    format!("{id:016x}.seg")
}

fn parse_name(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let hexid = name.strip_suffix(".seg")?;
    (hexid.len() == 16).then(|| u64::from_str_radix(hexid, 16).ok())?
}

/// Start-up: the segments on disk. One the index references nothing in (created, then the
/// process stopped before a commit; or emptied by compaction before its file went) is deleted.
pub(crate) fn load(disk: &dyn Disk, dir: &Path, db: &Database, metrics: &BlobMetrics) -> Result<SegTable> {
    let txn = db.begin_read()?;
    let live = txn.open_table(SEGMENT_LIVE)?;
    let mut t = SegTable::default();
    let mut max_id = None::<u64>;
    if let Some(e) = live.last()? {
        max_id = Some(e.0.value());
    }
    let mut removed = 0u64;
    for (path, _) in disk
        .list(dir)
        .map_err(|e| BlobError::io(format!("list {}", dir.display()), e))?
    {
        let Some(id) = parse_name(&path) else { continue };
        max_id = Some(max_id.map_or(id, |m| m.max(id)));
        if live.get(id)?.is_none() {
            disk.remove_file(&path)
                .map_err(|e| BlobError::io(format!("remove {}", path.display()), e))?;
            removed += 1;
            continue;
        }
        let file = disk
            .open_segment(&path, false)
            .map_err(|e| BlobError::io(format!("open {}", path.display()), e))?;
        let len = file
            .len()
            .map_err(|e| BlobError::io(format!("stat {}", path.display()), e))?;
        t.files.insert(id, SegInfo { file, len, open: false });
    }
    t.next_id = max_id.map_or(1, |m| m + 1);
    if removed > 0 {
        metrics.recovery_removed.with_label_values(&["segment"]).inc_by(removed);
        tracing::info!(removed, "recovery removed segment files nothing references");
    }
    metrics.segments.set(t.files.len() as i64);
    Ok(t)
}

impl Store {
    fn seg_table(&self) -> MutexGuard<'_, SegTable> {
        self.inner.segs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn segments_dir(&self) -> PathBuf {
        self.inner.root.join("segments")
    }

    /// Where segment `id` lives.
    pub fn segment_path(&self, id: u64) -> PathBuf {
        self.segments_dir().join(segment_name(id))
    }

    /// An open segment for one writer: one from the pool, or a new one whose directory entry is
    /// made durable before anything is written to it. Blocking.
    pub(crate) fn take_writer(&self) -> Result<SegWriter> {
        let id = {
            let mut t = self.seg_table();
            if let Some(w) = t.pool.pop() {
                return Ok(w);
            }
            let id = t.next_id;
            t.next_id += 1;
            id
        };
        self.check_space()?;
        let path = self.segment_path(id);
        let disk = &self.inner.disk;
        let file = disk
            .open_segment(&path, true)
            .map_err(|e| self.io_error(format!("create {}", path.display()), e))?;
        let dir = self.segments_dir();
        disk.sync_dir(&dir)
            .map_err(|e| self.io_error(format!("fsync {}", dir.display()), e))?;
        let mut t = self.seg_table();
        t.files.insert(
            id,
            SegInfo {
                file: file.clone(),
                len: 0,
                open: true,
            },
        );
        self.inner.metrics.segments.set(t.files.len() as i64);
        tracing::debug!(segment = id, "segment created");
        Ok(SegWriter { id, file, end: 0 })
    }

    /// Gives a writer's segment back: to the pool if `healthy` and not full, else sealed.
    pub(crate) fn put_writer(&self, w: SegWriter, healthy: bool) {
        let mut t = self.seg_table();
        let full = w.end >= SEGMENT_MAX;
        if let Some(info) = t.files.get_mut(&w.id) {
            info.len = info.len.max(w.end);
            if !healthy || full {
                info.open = false;
            }
        }
        if healthy && !full {
            t.pool.push(w);
        }
    }

    /// Test builds: every open segment is sealed (so compaction may take it).
    #[cfg(test)]
    pub(crate) fn seal_segments(&self) {
        let mut t = self.seg_table();
        let pool = std::mem::take(&mut t.pool);
        for w in pool {
            if let Some(info) = t.files.get_mut(&w.id) {
                info.len = info.len.max(w.end);
                info.open = false;
            }
        }
    }

    /// Test builds: whether segment `id` is known (its file not deleted).
    #[cfg(test)]
    pub(crate) fn has_segment(&self, id: u64) -> bool {
        self.seg_table().files.contains_key(&id)
    }

    /// Test builds: a chunk's segment file, offset and size, if it lives in a segment.
    #[cfg(test)]
    pub(crate) fn chunk_place(&self, hash: &[u8; 32]) -> Option<(PathBuf, u64, u32)> {
        let rec = self.chunk_record(hash).ok()??;
        let l = rec.loc?;
        Some((self.segment_path(l.segment), l.offset, rec.size))
    }

    /// Test builds: flips one bit of a stored chunk (in its segment, else its file).
    #[cfg(test)]
    pub(crate) fn flip_chunk_bit(&self, hash: &[u8; 32], at: u64) {
        use std::os::unix::fs::FileExt;
        let (path, off) = match self.chunk_place(hash) {
            Some((p, o, _)) => (p, o + at),
            None => (self.chunk_path(hash), at),
        };
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, off).unwrap();
        b[0] ^= 1;
        f.write_all_at(&b, off).unwrap();
    }

    /// Gives back the space of a dead range (best effort: compaction reclaims it anyway).
    /// Blocking.
    pub(crate) fn punch_segment(&self, loc: &SegLoc, size: u32) -> bool {
        let file = self.seg_table().files.get(&loc.segment).map(|i| i.file.clone());
        let Some(file) = file else { return false };
        match file.punch_hole(loc.offset, size as u64) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(segment = loc.segment, error = %e, "cannot punch a dead range");
                false
            }
        }
    }

    /// Takes an idle segment out of the pool and seals it; `false` if a writer took it.
    fn take_from_pool(&self, id: u64) -> bool {
        let mut t = self.seg_table();
        let Some(i) = t.pool.iter().position(|w| w.id == id) else {
            return false;
        };
        let w = t.pool.swap_remove(i);
        if let Some(info) = t.files.get_mut(&id) {
            info.len = info.len.max(w.end);
            info.open = false;
        }
        true
    }

    /// Reads `size` bytes at `loc` (not verified). Blocking.
    pub(crate) fn read_segment(&self, loc: &SegLoc, size: u32) -> std::io::Result<Bytes> {
        let file = self.seg_table().files.get(&loc.segment).map(|i| i.file.clone());
        let Some(file) = file else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("segment {} is gone", loc.segment),
            ));
        };
        file.read_bytes(loc.offset, size as usize)
    }

    /// One compaction pass: sealed segments that are mostly dead have their live chunks copied
    /// to an open segment and are deleted once nothing references or pins them. Returns
    /// (segments deleted, bytes copied).
    pub async fn compact_segments(&self) -> Result<(usize, u64)> {
        let span = tracing::info_span!("compaction");
        let _e = span.enter();
        let s = self.clone();
        let plan = tokio::task::spawn_blocking(move || s.compaction_plan())
            .await
            .map_err(|e| BlobError::Unavailable(format!("compaction task failed: {e}")))??;
        let (mut freed, mut copied, mut moved_chunks) = (0usize, 0u64, 0usize);
        for (id, live) in plan {
            if live > 0 {
                let budget = COMPACT_BYTES_PER_PASS.saturating_sub(copied);
                if budget == 0 {
                    break;
                }
                let s = self.clone();
                let moves = tokio::task::spawn_blocking(move || s.copy_live(id, budget))
                    .await
                    .map_err(|e| BlobError::Unavailable(format!("compaction task failed: {e}")))??;
                if moves.is_empty() {
                    continue;
                }
                #[cfg(any(test, feature = "test-hooks"))]
                self.hook("compact.before_commit");
                let reply = self.commit(Op::Relocate { moves }).await?;
                if let Reply::Moved(n, bytes) = reply {
                    moved_chunks += n;
                    copied += bytes;
                }
            }
            #[cfg(any(test, feature = "test-hooks"))]
            self.hook("compact.before_delete");
            let s = self.clone();
            if tokio::task::spawn_blocking(move || s.delete_segment_if_dead(id))
                .await
                .map_err(|e| BlobError::Unavailable(format!("compaction task failed: {e}")))??
            {
                freed += 1;
            }
        }
        let m = &self.inner.metrics;
        m.compaction_bytes.inc_by(copied);
        m.segments_freed.inc_by(freed as u64);
        if freed > 0 || copied > 0 {
            m.compaction_runs.inc();
            tracing::info!(
                segments_freed = freed,
                chunks_moved = moved_chunks,
                bytes_copied = copied,
                "segments compacted"
            );
        }
        Ok((freed, copied))
    }

    /// Sealed segments worth compacting, emptiest first, with their live bytes; publishes the
    /// segment and dead-byte gauges. Blocking.
    fn compaction_plan(&self) -> Result<Vec<(u64, u64)>> {
        let segs: Vec<(u64, u64, bool, bool)> = {
            let t = self.seg_table();
            t.files
                .iter()
                .map(|(id, i)| (*id, i.len, i.open, t.pool.iter().any(|w| w.id == *id)))
                .collect()
        };
        let txn = self.inner.db.begin_read()?;
        let live_t = txn.open_table(SEGMENT_LIVE)?;
        let mut dead_total = 0u64;
        let mut plan = Vec::new();
        for (id, len, open, pooled) in &segs {
            let live = live_t.get(*id)?.map(|v| v.value()).unwrap_or(0);
            let dead = len.saturating_sub(live);
            dead_total += dead;
            // A segment a writer holds is never compacted; an idle one in the pool is taken out
            // of it (sealed) when it qualifies.
            if *open && !*pooled {
                continue;
            }
            if *len > 0 && (live == 0 || dead as f64 / *len as f64 >= COMPACT_DEAD_RATIO) {
                if *open && !self.take_from_pool(*id) {
                    continue;
                }
                plan.push((*id, live, dead as f64 / (*len).max(1) as f64));
            } else if live == 0 && !*open {
                plan.push((*id, live, 1.0));
            }
        }
        let m = &self.inner.metrics;
        m.segments.set(segs.len() as i64);
        m.segment_dead_bytes.set(dead_total.min(i64::MAX as u64) as i64);
        plan.sort_by(|a, b| (a.1 > 0).cmp(&(b.1 > 0)).then(b.2.total_cmp(&a.2)));
        Ok(plan.into_iter().map(|(id, live, _)| (id, live)).collect())
    }

    /// Copies up to `budget` bytes of segment `id`'s live chunks (verified) to open segments
    /// and makes the copies durable. Returns the moves to commit. Blocking.
    fn copy_live(&self, id: u64, budget: u64) -> Result<Vec<([u8; 32], SegLoc, SegLoc)>> {
        let chunks: Vec<(SegLoc, [u8; 32], u32)> = {
            let txn = self.inner.db.begin_read()?;
            let by_seg = txn.open_table(SEGMENT_CHUNKS)?;
            let recs = txn.open_table(index::CHUNKS)?;
            let lo = index::seg_key(&SegLoc { segment: id, offset: 0 });
            let hi = index::seg_key(&SegLoc {
                segment: id,
                offset: u64::MAX,
            });
            let mut v = Vec::new();
            let mut total = 0u64;
            for e in by_seg.range(&lo[..]..=&hi[..])? {
                let (k, h) = e?;
                let (Some(off), Ok(hash)) = (
                    k.value().get(8..16).and_then(|b| <[u8; 8]>::try_from(b).ok()),
                    <[u8; 32]>::try_from(h.value()),
                ) else {
                    continue;
                };
                let loc = SegLoc {
                    segment: id,
                    offset: u64::from_be_bytes(off),
                };
                let Some(rec) = recs.get(&hash[..])? else { continue };
                let rec: ChunkRec = decode("chunk", rec.value())?;
                if rec.loc != Some(loc) {
                    continue;
                }
                v.push((loc, hash, rec.size));
                total += rec.size as u64;
                if total >= budget {
                    break;
                }
            }
            v
        };
        let mut moves = Vec::with_capacity(chunks.len());
        let mut w: Option<SegWriter> = None;
        let mut full: Vec<SegWriter> = Vec::new();
        let out = (|| {
            for (loc, hash, size) in chunks {
                let data = match self.read_segment(&loc, size) {
                    Ok(d) if d.len() == size as usize && blake3::hash(&d).as_bytes() == &hash => d,
                    other => {
                        // Left where it is: a read of it answers DATA_LOSS (and replication
                        // repairs it); the segment stays until it is gone.
                        self.inner.metrics.integrity_failures.inc();
                        tracing::error!(chunk = %hex(&hash), segment = id, error = ?other.err(), "chunk failed verification during compaction; not moved");
                        continue;
                    }
                };
                if w.as_ref().is_some_and(|w| w.end >= SEGMENT_MAX) {
                    full.extend(w.take());
                }
                let wr = match &mut w {
                    Some(wr) => wr,
                    None => w.insert(self.take_writer()?),
                };
                wr.file
                    .write_at(wr.end, &data)
                    .map_err(|e| self.io_error("write segment", e))?;
                moves.push((
                    hash,
                    loc,
                    SegLoc {
                        segment: wr.id,
                        offset: wr.end,
                    },
                ));
                wr.end += size as u64;
            }
            for wr in full.iter().chain(w.as_ref()) {
                wr.file.sync_data().map_err(|e| self.io_error("fsync segment", e))?;
            }
            Ok(())
        })();
        let healthy = out.is_ok();
        for wr in full.into_iter().chain(w) {
            self.put_writer(wr, healthy);
        }
        out.map(|()| moves)
    }

    /// Deletes segment `id` if the index references nothing in it and no upload pins it,
    /// deciding under the pin lock after reading the index afresh. Blocking.
    fn delete_segment_if_dead(&self, id: u64) -> Result<bool> {
        let pins = self.pin_table();
        if pins.pins_segment(id) {
            return Ok(false);
        }
        let txn = self.inner.db.begin_read()?;
        if txn.open_table(SEGMENT_LIVE)?.get(id)?.is_some() {
            return Ok(false);
        }
        {
            let mut t = self.seg_table();
            match t.files.get(&id) {
                Some(i) if !i.open => {}
                _ => return Ok(false),
            }
            t.files.remove(&id);
            self.inner.metrics.segments.set(t.files.len() as i64);
        }
        let path = self.segment_path(id);
        match self.inner.disk.remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // Forgotten here; start-up removes the file (nothing references it).
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot delete an empty segment"),
        }
        drop(pins);
        tracing::debug!(segment = id, "segment deleted");
        Ok(true)
    }
}
