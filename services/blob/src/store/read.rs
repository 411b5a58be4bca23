//! Reads: chunks (verified against their hash) and index records.

use std::fs;

use bytes::Bytes;
use redb::ReadableDatabase;

use super::{
    INLINE_MAX, Store, hex, index,
    records::{self, BlobRec, ChunkRec, FileRec, UploadRec, decode},
};
use crate::error::{BlobError, Result};

impl Store {
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
    pub(super) fn verify(&self, hash: &[u8; 32], size: u32, data: Bytes) -> Result<Bytes> {
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

    pub(super) fn inline_chunk(&self, hash: &[u8; 32]) -> Result<Option<Bytes>> {
        let txn = self.inner.db.begin_read()?;
        let t = txn.open_table(index::INLINE)?;
        Ok(t.get(&hash[..])?.map(|v| Bytes::copy_from_slice(v.value())))
    }

    /// A file's record.
    pub fn get_file(&self, key: &str) -> Result<FileRec> {
        let txn = self.inner.db.begin_read()?;
        let t = txn.open_table(index::FILES)?;
        match t.get(key)? {
            Some(v) => decode::<FileRec>("file", v.value()),
            None => Err(BlobError::NotFound(format!("file '{key}' not found"))),
        }
    }

    /// A blob's record.
    pub fn get_blob(&self, key: &[u8; 32]) -> Result<BlobRec> {
        let txn = self.inner.db.begin_read()?;
        let t = txn.open_table(index::BLOBS)?;
        match t.get(&key[..])? {
            Some(v) => decode::<BlobRec>("blob", v.value()),
            None => Err(BlobError::NotFound(format!("blob {} not found", hex(key)))),
        }
    }

    /// A file, its blob and, for small objects kept in the index, the verified content — all
    /// from one snapshot, so a small read needs no other I/O.
    pub fn get_small_file(&self, key: &str) -> Result<(FileRec, BlobRec, Option<Bytes>)> {
        let txn = self.inner.db.begin_read()?;
        let files = txn.open_table(index::FILES)?;
        let f = match files.get(key)? {
            Some(v) => decode::<FileRec>("file", v.value())?,
            None => return Err(BlobError::NotFound(format!("file '{key}' not found"))),
        };
        let blobs = txn.open_table(index::BLOBS)?;
        let b = match blobs.get(f.blob_key.as_slice())? {
            Some(v) => decode::<BlobRec>("blob", v.value())?,
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
            out.push(decode::<FileRec>("file", v.value())?);
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
            out.push((key, decode::<BlobRec>("blob", v.value())?));
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
            Some(v) => decode::<UploadRec>("upload", v.value()),
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
            .map(|v| decode::<records::Tombstone>("tombstone", v.value()))
            .transpose()
    }

    /// Chunk record (for tests and scrubbing).
    pub fn chunk_record(&self, hash: &[u8; 32]) -> Result<Option<ChunkRec>> {
        let txn = self.inner.db.begin_read()?;
        let t = txn.open_table(index::CHUNKS)?;
        t.get(&hash[..])?
            .map(|v| decode::<ChunkRec>("chunk", v.value()))
            .transpose()
    }
}
