//! Chunks received from other pods, written the way an upload writes large objects: verified,
//! appended to a segment, fdatasynced every few MiB, then recorded by one index commit
//! ([`Op::AddChunks`]: unreferenced, in the GC queue until a record uses them) — instead of a
//! file of its own and two fsyncs per chunk.

use std::collections::HashSet;

use super::{
    ChunkMeta, Store, hex,
    index::{Op, Reply},
    ingest::Existing,
    now_ns,
    pins::Pins,
    records::SegLoc,
    segments::{SEGMENT_MAX, SegWriter},
};
use crate::error::{BlobError, Result};

/// The segment is fdatasynced once this many bytes were appended since the last sync, so the
/// page cache never holds much of a long stream unwritten (the final sync stays short).
const SYNC_EVERY: u64 = 8 << 20;

/// A batch of chunks from other pods on their way into this pod's segments. Blocking methods:
/// drive it from `spawn_blocking`. Dropping it before [`ReplicaChunks::commit`] leaves what it
/// wrote as dead bytes (compaction reclaims them) and releases its pins and reservation.
pub struct ReplicaChunks {
    store: Store,
    seg: Option<SegWriter>,
    pins: Pins,
    written: Vec<ChunkMeta>,
    /// Hashes in `written` (a stream may repeat a chunk; a long one holds thousands).
    seen: HashSet<[u8; 32]>,
    /// Bytes appended since the last fdatasync.
    unsynced: u64,
    failed: bool,
    reserved: u64,
    checked_space: bool,
}

impl Store {
    /// An empty batch of received chunks.
    pub fn replica_chunks(&self) -> ReplicaChunks {
        ReplicaChunks {
            store: self.clone(),
            seg: None,
            pins: Pins::new(self),
            written: Vec::new(),
            seen: HashSet::new(),
            unsynced: 0,
            failed: false,
            reserved: 0,
            checked_space: false,
        }
    }
}

impl ReplicaChunks {
    /// Verifies `data` against `hash` and appends it, unless the index holds the chunk already.
    /// Returns whether it was new. Blocking.
    pub fn put(&mut self, hash: &[u8; 32], data: &[u8]) -> Result<bool> {
        if blake3::hash(data).as_bytes() != hash {
            return Err(BlobError::DataLoss(format!(
                "chunk {} does not match its hash: nothing of it was stored",
                hex(hash)
            )));
        }
        if self.seen.contains(hash) {
            return Ok(false);
        }
        let size = u32::try_from(data.len())
            .map_err(|_| BlobError::invalid(format!("chunk {} is larger than 4 GiB", hex(hash))))?;
        if self.store.chunk_record(hash)?.is_some() {
            // Held already: kept from GC while this stream lasts, as an upload's chunks are.
            self.pins.add(*hash);
            return Ok(false);
        }
        if !self.checked_space {
            self.store.check_space()?;
            self.checked_space = true;
        }
        self.store.reserve(size as u64)?;
        self.reserved += size as u64;
        let loc = self.append(data)?;
        match self.store.pin_for_seal(&mut self.pins, *hash, size, loc)? {
            Existing::Sound(_) => {
                // Another writer recorded it meanwhile: its copy stays, these bytes go back.
                if let Some(w) = &mut self.seg
                    && w.end == loc.offset + size as u64
                {
                    w.end = loc.offset;
                }
                Ok(false)
            }
            found => {
                let mut meta = ChunkMeta::new(*hash, size);
                meta.loc = Some(loc);
                meta.repair = matches!(found, Existing::Rotted);
                self.written.push(meta);
                self.seen.insert(*hash);
                if self.unsynced >= SYNC_EVERY {
                    self.sync()?;
                }
                Ok(true)
            }
        }
    }

    /// Appends `data` at the end of this batch's segment (a new one once it is full).
    fn append(&mut self, data: &[u8]) -> Result<SegLoc> {
        if self.seg.as_ref().is_some_and(|w| w.end >= SEGMENT_MAX) {
            self.sync()?;
            if let Some(w) = self.seg.take() {
                self.store.put_writer(w, true);
            }
        }
        if self.seg.is_none() {
            self.seg = Some(self.store.take_writer()?);
        }
        let Some(w) = &mut self.seg else {
            return Err(BlobError::Corrupt("no open segment".into()));
        };
        let loc = SegLoc {
            segment: w.id,
            offset: w.end,
        };
        if let Err(e) = w.file.write_at(w.end, data) {
            self.failed = true;
            return Err(self.store.io_error("write segment", e));
        }
        w.end += data.len() as u64;
        self.unsynced += data.len() as u64;
        Ok(loc)
    }

    /// Makes every appended byte durable. Blocking.
    pub fn sync(&mut self) -> Result<()> {
        if self.unsynced == 0 {
            return Ok(());
        }
        if let Some(w) = &self.seg
            && let Err(e) = w.file.sync_data()
        {
            self.failed = true;
            return Err(self.store.io_error("fsync segment", e));
        }
        self.unsynced = 0;
        Ok(())
    }

    /// Records every new chunk in one index commit; call after [`ReplicaChunks::sync`] (the
    /// bytes are durable before the index points at them). Returns how many were recorded.
    pub async fn commit(mut self) -> Result<u64> {
        if self.unsynced > 0 {
            return Err(BlobError::Corrupt(
                "replica chunks committed before they were synced".into(),
            ));
        }
        if let Some(w) = self.seg.take() {
            self.store.put_writer(w, !self.failed);
        }
        let chunks = std::mem::take(&mut self.written);
        if chunks.is_empty() {
            return Ok(0);
        }
        match self
            .store
            .commit(Op::AddChunks {
                chunks,
                now_ns: now_ns(),
            })
            .await?
        {
            Reply::Freed(n) => Ok(n),
            other => Err(BlobError::Corrupt(format!("unexpected reply {other:?}"))),
        }
    }
}

impl Drop for ReplicaChunks {
    fn drop(&mut self) {
        if let Some(w) = self.seg.take() {
            self.store.put_writer(w, !self.failed);
        }
        self.store.unreserve(self.reserved);
    }
}
