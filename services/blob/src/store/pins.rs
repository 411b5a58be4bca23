//! Pins: chunks being written or read, which garbage collection must not remove.

use super::{Store, records::BlobRec};

impl Store {
    pub(super) fn pin(&self, hash: [u8; 32]) {
        *self
            .inner
            .pins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(hash)
            .or_insert(0) += 1;
    }

    pub(super) fn unpin(&self, hash: &[u8; 32]) {
        let mut pins = self.inner.pins.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = pins.get_mut(hash) {
            *n -= 1;
            if *n == 0 {
                pins.remove(hash);
            }
        }
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
