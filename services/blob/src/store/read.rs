//! Reads: chunks (verified against their hash) and index records.

use bytes::Bytes;
use redb::ReadableDatabase;

use super::{
    INLINE_MAX, Store, hex, index,
    records::{self, BlobRec, ChunkRec, FileRec, UploadRec, decode},
};
use crate::error::{BlobError, Result};

/// Whether `data` is the chunk `hash` of `size` bytes (the one integrity rule of every read).
fn sound(hash: &[u8; 32], size: u32, data: &[u8]) -> bool {
    data.len() == size as usize && blake3::hash(data).as_bytes() == hash
}

impl Store {
    /// Reads one chunk and verifies its hash; a mismatch or a missing chunk is DATA_LOSS.
    /// The chunk is where its record says: inline, in a segment (read with one `pread` on a
    /// cached handle), or a per-chunk file (older data dirs and repair copies). Blocking.
    pub fn read_chunk(&self, hash: &[u8; 32], size: u32) -> Result<Bytes> {
        if size as usize <= INLINE_MAX
            && let Some(d) = self.inline_chunk(hash)?
        {
            return self.verify(hash, size, d);
        }
        let mut loc = self.chunk_record(hash)?.and_then(|r| r.loc);
        // Compaction may move the chunk between reading its record and its bytes: a failed
        // read looks again and follows the record (a few times at most).
        for _ in 0..3 {
            let Some(l) = loc else { break };
            let got = self.read_segment(&l, size);
            if let Ok(d) = &got
                && sound(hash, size, d)
            {
                return Ok(self.served(d.clone()));
            }
            let now = self.chunk_record(hash)?.and_then(|r| r.loc);
            if now != Some(l) {
                loc = now;
                continue;
            }
            // A copy written by repair (from a replica) takes over from a bad segment copy.
            if let Ok(d) = self.inner.disk.read(&self.chunk_path(hash)) {
                return self.verify(hash, size, Bytes::from(d));
            }
            return match got {
                Ok(d) => self.verify(hash, size, d),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof
                    ) =>
                {
                    self.inner.metrics.integrity_failures.inc();
                    tracing::error!(chunk = %hex(hash), segment = l.segment, offset = l.offset, error = %e, "chunk missing from its segment");
                    Err(BlobError::DataLoss(format!(
                        "chunk {} is missing from this node's storage",
                        hex(hash)
                    )))
                }
                Err(e) => Err(BlobError::io(format!("read chunk {}", hex(hash)), e)),
            };
        }
        let data = match self.inner.disk.read(&self.chunk_path(hash)) {
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
        };
        self.verify(hash, size, data)
    }

    /// Checks data read for a chunk against its hash and length.
    pub(super) fn verify(&self, hash: &[u8; 32], size: u32, data: Bytes) -> Result<Bytes> {
        if !sound(hash, size, &data) {
            self.inner.metrics.integrity_failures.inc();
            tracing::error!(chunk = %hex(hash), expected_len = size, len = data.len(), "chunk failed its hash check");
            return Err(BlobError::DataLoss(format!(
                "chunk {} failed its integrity check (stored data is corrupt)",
                hex(hash)
            )));
        }
        Ok(self.served(data))
    }

    /// Counts verified bytes on their way out.
    fn served(&self, data: Bytes) -> Bytes {
        self.inner.metrics.bytes_read.inc_by(data.len() as u64);
        data
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
        self.query_files(&FileQuery { prefix, filter: "" }, after, limit)
    }

    /// Files matching `q` after `after` (exclusive), at most `limit`, in key order, and whether
    /// more follow. The filter is applied before the page is cut, on keys alone: a record is
    /// decoded only when it is returned.
    pub fn query_files(&self, q: &FileQuery<'_>, after: Option<&str>, limit: usize) -> Result<(Vec<FileRec>, bool)> {
        let txn = self.inner.db.begin_read()?;
        let t = txn.open_table(index::FILES)?;
        let start = match after {
            Some(a) if a >= q.start() => a,
            _ => q.start(),
        };
        let mut out = Vec::new();
        for e in t.range(start..)? {
            let (k, v) = e?;
            let key = k.value();
            if Some(key) == after {
                continue;
            }
            if !key.starts_with(q.prefix) {
                break;
            }
            if !q.matches(key) {
                continue;
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
        self.count_query(&FileQuery { prefix, filter: "" })
    }

    /// Number of files matching `q`: the file counter for everything, else one key-only scan
    /// per change of the key set (cached until a file is added or removed).
    pub fn count_query(&self, q: &FileQuery<'_>) -> Result<u64> {
        let c = *self.inner.counters.lock().unwrap_or_else(|p| p.into_inner());
        if q.prefix.is_empty() && q.filter.is_empty() {
            return Ok(c.files);
        }
        let id = (q.prefix.to_string(), q.filter.to_string());
        if let Some(&(gen_, n)) = self.list_cache().counts.get(&id)
            && gen_ == c.file_gen
        {
            return Ok(n);
        }
        let txn = self.inner.db.begin_read()?;
        let t = txn.open_table(index::FILES)?;
        let mut n = 0;
        for e in t.range(q.start()..)? {
            let (k, _) = e?;
            let key = k.value();
            if !key.starts_with(q.prefix) {
                break;
            }
            if q.matches(key) {
                n += 1;
            }
        }
        let mut cache = self.list_cache();
        if cache.counts.len() >= LIST_CACHE_ENTRIES {
            cache.counts.clear();
        }
        cache.counts.insert(id, (c.file_gen, n));
        Ok(n)
    }

    /// Where page `page` (1-based) of `size` matching files starts: the key it follows (`None`
    /// for the first page), or `Err(())`-like `Ok(None)` past the end. Consecutive pages reuse
    /// the previous page's last key; other pages skip keys without decoding records.
    pub fn page_start(&self, q: &FileQuery<'_>, size: usize, page: u64) -> Result<Option<Option<String>>> {
        if page <= 1 {
            return Ok(Some(None));
        }
        let file_gen = self.inner.counters.lock().unwrap_or_else(|p| p.into_inner()).file_gen;
        let id = (q.prefix.to_string(), q.filter.to_string(), size, page - 1);
        if let Some((g, k)) = self.list_cache().page_ends.get(&id)
            && *g == file_gen
        {
            return Ok(Some(Some(k.clone())));
        }
        let skip = (page - 1).saturating_mul(size as u64);
        let txn = self.inner.db.begin_read()?;
        let t = txn.open_table(index::FILES)?;
        let mut seen = 0u64;
        for e in t.range(q.start()..)? {
            let (k, _) = e?;
            let key = k.value();
            if !key.starts_with(q.prefix) {
                break;
            }
            if !q.matches(key) {
                continue;
            }
            seen += 1;
            if seen == skip {
                return Ok(Some(Some(key.to_string())));
            }
        }
        Ok(None)
    }

    /// Remembers where page `page` ended, so the next page starts without a scan.
    pub fn remember_page_end(&self, q: &FileQuery<'_>, size: usize, page: u64, last: &str) {
        let file_gen = self.inner.counters.lock().unwrap_or_else(|p| p.into_inner()).file_gen;
        let mut cache = self.list_cache();
        if cache.page_ends.len() >= LIST_CACHE_ENTRIES {
            cache.page_ends.clear();
        }
        cache.page_ends.insert(
            (q.prefix.to_string(), q.filter.to_string(), size, page),
            (file_gen, last.to_string()),
        );
    }

    fn list_cache(&self) -> std::sync::MutexGuard<'_, ListCache> {
        self.inner.list_cache.lock().unwrap_or_else(|p| p.into_inner())
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

/// Most entries in each list cache (cleared when full: a bounded memory cost).
const LIST_CACHE_ENTRIES: usize = 256;

/// A ListFiles query: a key prefix and a key substring filter (empty: every key).
#[derive(Debug, Clone, Copy)]
pub struct FileQuery<'a> {
    /// Keys start with this.
    pub prefix: &'a str,
    /// Keys contain this.
    pub filter: &'a str,
}

impl FileQuery<'_> {
    /// Where a scan for this query starts: at the prefix, and never before the first key a
    /// user can have (the store's own records, which start with a control character, sort
    /// before it).
    fn start(&self) -> &str {
        const FIRST_USER_KEY: &str = " ";
        if self.prefix < FIRST_USER_KEY {
            FIRST_USER_KEY
        } else {
            self.prefix
        }
    }

    /// Whether a user's listing shows `key`: it contains the filter and is not one of the
    /// store's own records.
    fn matches(&self, key: &str) -> bool {
        (self.filter.is_empty() || key.contains(self.filter)) && !super::replica::is_internal_key(key)
    }
}

/// Counts and page ends of recent list queries, valid while the key set's generation holds.
#[derive(Default)]
pub(super) struct ListCache {
    counts: std::collections::HashMap<(String, String), (u64, u64)>,
    page_ends: std::collections::HashMap<(String, String, usize, u64), (u64, String)>,
}
