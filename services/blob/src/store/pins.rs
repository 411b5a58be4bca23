//! Pins: chunks being written or read, which garbage collection must not remove. One path for
//! every holder (reads, ingests, finished content): a [`Pins`] set that releases on drop, and one
//! unlink rule, [`Store::unlink_if_unreferenced`], used by GC, the orphan scan and abandoned
//! ingests alike.

use std::collections::HashSet;

use super::{Store, records::BlobRec};
use crate::error::Result;

/// Chunks pinned by one holder; dropping it releases them.
pub struct Pins {
    store: Store,
    held: Vec<[u8; 32]>,
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
        *self.store.pin_table().entry(hash).or_insert(0) += 1;
        self.held.push(hash);
    }

    /// Releases this holder's pin on `hash` (once), if it holds one.
    pub(super) fn release(&mut self, hash: &[u8; 32]) {
        if let Some(i) = self.held.iter().position(|h| h == hash) {
            self.held.swap_remove(i);
            unpin(&mut self.store.pin_table(), hash);
        }
    }

    /// Releases every pin and removes the chunk files nothing references or pins any more (the
    /// chunks an abandoned upload put in place). Returns how many files went.
    pub(super) fn release_and_remove_unreferenced(&mut self) -> usize {
        let held = std::mem::take(&mut self.held);
        let mut removed = 0;
        for h in held {
            unpin(&mut self.store.pin_table(), &h);
            if matches!(self.store.unlink_if_unreferenced(&h), Ok(true)) {
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
        for h in &self.held {
            unpin(&mut pins, h);
        }
    }
}

fn unpin(pins: &mut std::collections::HashMap<[u8; 32], usize>, hash: &[u8; 32]) {
    if let Some(n) = pins.get_mut(hash) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            pins.remove(hash);
        }
    }
}

impl Store {
    pub(super) fn pin_table(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<[u8; 32], usize>> {
        self.inner.pins.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The chunks pinned right now.
    pub(super) fn pinned_snapshot(&self) -> HashSet<[u8; 32]> {
        self.pin_table().keys().copied().collect()
    }

    /// Unlinks a chunk file if no holder pins it and the index has no record of it, deciding
    /// under the pin lock: a writer pins before it publishes a chunk, so it either sees this
    /// unlink finished (and writes the file again) or makes it skip. The record is read afresh
    /// here, after any commit that re-created it. Blocking.
    pub(crate) fn unlink_if_unreferenced(&self, hash: &[u8; 32]) -> Result<bool> {
        let pins = self.pin_table();
        if pins.contains_key(hash) {
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
