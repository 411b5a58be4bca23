//! Pins: chunks being written or read, which garbage collection must not remove. One path for
//! every holder (reads, ingests, finished content): a [`Pins`] set that releases on drop, and one
//! unlink rule, [`Store::unlink_if_unreferenced`], used by GC, the orphan scan and abandoned
//! ingests alike.

use std::collections::{HashMap, HashSet};

use super::{
    Store,
    records::{BlobRec, SegLoc},
};
use crate::error::Result;

/// A pinned chunk: its holders, and where (and how long) a writer last pinned it.
type ChunkPin = (usize, Option<(SegLoc, u32)>);

/// Every pin: per chunk the number of holders and the latest segment place a writer pinned it
/// at (where an uncommitted chunk can be read), and per segment the number of pins in it (a
/// pinned segment is never deleted by compaction).
#[derive(Default)]
pub(crate) struct PinTable {
    chunks: HashMap<[u8; 32], ChunkPin>,
    segments: HashMap<u64, usize>,
}

impl PinTable {
    /// Whether `hash` is pinned.
    pub(crate) fn pins_chunk(&self, hash: &[u8; 32]) -> bool {
        self.chunks.contains_key(hash)
    }

    /// Whether anything pins a place in segment `id`.
    pub(crate) fn pins_segment(&self, id: u64) -> bool {
        self.segments.contains_key(&id)
    }

    /// Where a pinned, not yet committed chunk was written.
    pub(crate) fn pending_loc(&self, hash: &[u8; 32]) -> Option<(SegLoc, u32)> {
        self.chunks.get(hash).and_then(|e| e.1)
    }

    fn pin(&mut self, hash: [u8; 32], loc: Option<SegLoc>, size: u32) {
        let e = self.chunks.entry(hash).or_insert((0, None));
        e.0 += 1;
        if let Some(l) = loc {
            e.1 = Some((l, size));
        }
        if let Some(l) = loc {
            *self.segments.entry(l.segment).or_insert(0) += 1;
        }
    }

    fn unpin(&mut self, hash: &[u8; 32], loc: Option<SegLoc>) {
        if let Some(e) = self.chunks.get_mut(hash) {
            e.0 = e.0.saturating_sub(1);
            if e.0 == 0 {
                self.chunks.remove(hash);
            }
        }
        if let Some(l) = loc
            && let Some(n) = self.segments.get_mut(&l.segment)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.segments.remove(&l.segment);
            }
        }
    }
}

/// Chunks pinned by one holder (each with the segment place it pins, if any); dropping it
/// releases them.
pub struct Pins {
    store: Store,
    held: Vec<([u8; 32], Option<SegLoc>)>,
}

/// Keeps a blob's chunks pinned while a read streams them.
pub type ReadPin = Pins;

impl Pins {
    pub(super) fn new(store: &Store) -> Pins {
        Pins {
            store: store.clone(),
            held: Vec::new(),
        }
    }

    /// Pins one more chunk.
    pub(super) fn add(&mut self, hash: [u8; 32]) {
        self.store.pin_table().pin(hash, None, 0);
        self.held.push((hash, None));
    }

    /// Pins a chunk (and its place in a segment, if given) with the pin table already locked.
    pub(super) fn add_in(&mut self, table: &mut PinTable, hash: [u8; 32], loc: Option<SegLoc>, size: u32) {
        table.pin(hash, loc, size);
        self.held.push((hash, loc));
    }

    /// Releases this holder's pins on `hash`, if it holds any.
    pub(super) fn release(&mut self, hash: &[u8; 32]) {
        let mut t = self.store.pin_table();
        while let Some(i) = self.held.iter().position(|h| &h.0 == hash) {
            let (h, loc) = self.held.swap_remove(i);
            t.unpin(&h, loc);
        }
    }

    /// Releases every pin and removes the chunk files nothing references or pins any more (the
    /// chunks an abandoned upload put in place; what it wrote into segments is dead bytes that
    /// compaction reclaims). Returns how many files went.
    pub(super) fn release_and_remove_unreferenced(&mut self) -> usize {
        let held = std::mem::take(&mut self.held);
        let mut removed = 0;
        for (h, loc) in held {
            self.store.pin_table().unpin(&h, loc);
            if loc.is_none() && matches!(self.store.unlink_if_unreferenced(&h), Ok(true)) {
                removed += 1;
            }
        }
        removed
    }

    /// Moves every pin to `other` (ownership changes hands without a gap).
    pub(super) fn move_into(&mut self, other: &mut Pins) {
        other.held.append(&mut self.held);
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let mut pins = self.store.pin_table();
        for (h, loc) in &self.held {
            pins.unpin(h, *loc);
        }
    }
}

impl Store {
    pub(super) fn pin_table(&self) -> std::sync::MutexGuard<'_, PinTable> {
        self.inner.pins.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The chunks pinned right now.
    pub(super) fn pinned_snapshot(&self) -> HashSet<[u8; 32]> {
        self.pin_table().chunks.keys().copied().collect()
    }

    /// Unlinks a chunk file if no holder pins it and the index has no record of it, deciding
    /// under the pin lock: a writer pins before it publishes a chunk, so it either sees this
    /// unlink finished (and writes the file again) or makes it skip. The record is read afresh
    /// here, after any commit that re-created it. Blocking.
    pub(crate) fn unlink_if_unreferenced(&self, hash: &[u8; 32]) -> Result<bool> {
        let pins = self.pin_table();
        if pins.pins_chunk(hash) {
            return Ok(false);
        }
        if self.chunk_record(hash)?.is_some() {
            return Ok(false);
        }
        let path = self.chunk_path(hash);
        match self.inner.disk.remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete an unreferenced chunk");
                Ok(false)
            }
        }
    }

    /// Gives back the space of a collected chunk's range in its segment if no holder pins the
    /// chunk and the index does not point at that range again, deciding under the pin lock
    /// like [`Store::unlink_if_unreferenced`]. Blocking.
    pub(crate) fn punch_if_unreferenced(&self, hash: &[u8; 32], loc: &SegLoc, size: u32) -> Result<bool> {
        let pins = self.pin_table();
        // A place holds one chunk, so a pin of the chunk covers every pin of the place.
        if pins.pins_chunk(hash) {
            return Ok(false);
        }
        if self.chunk_record(hash)?.is_some_and(|r| r.loc == Some(*loc)) {
            return Ok(false);
        }
        Ok(self.punch_segment(loc, size))
    }

    /// Pins a blob's chunks for the duration of a read so GC cannot remove them mid-stream.
    pub fn pin_blob(&self, blob: &BlobRec) -> ReadPin {
        let mut pins = Pins::new(self);
        for h in &blob.chunk_hashes {
            if let Ok(h) = <[u8; 32]>::try_from(h.as_slice()) {
                pins.add(h);
            }
        }
        pins
    }
}
