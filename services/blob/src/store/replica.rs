//! What a local replica needs from the store: records in their replicated form (with their
//! hybrid logical clock), applying a record only when it is newer, chunks received from other
//! pods (verified, durable), and listings and digests by partition for anti-entropy.

use bytes::Bytes;
use peervault_proto::v1::{FileRecord, HybridTimestamp};
use redb::{ReadableDatabase, ReadableTable};

use super::{
    ChunkMeta, Finished, INLINE_MAX, NewBlob, Store, hex,
    index::{self, Op, Reply},
    records::{BlobRec, ChunkRec, FileRec, Hlc, Tombstone, decode},
};
use crate::error::{BlobError, Result};

/// Number of partitions the key and chunk spaces are split into.
pub const PARTITIONS: usize = 256;

/// The partition of a file key.
pub fn key_partition(key: &str) -> u32 {
    blake3::hash(key.as_bytes()).as_bytes()[0] as u32
}

/// The partition of a chunk.
pub fn chunk_partition(hash: &[u8; 32]) -> u32 {
    hash[0] as u32
}

/// Prefix of the records that stand for blobs uploaded through the Graviton UploadService on
/// a blob pod that replicates: such a blob is kept as a record under this prefix and its hex
/// content key, so placement, majority writes, the hand-off queue, anti-entropy and tombstones
/// treat it as they treat a file. User keys cannot contain control characters
/// ([`crate::validate::file_key`]), so no file collides with these and listings of files skip
/// them ([`is_internal_key`]).
pub const BLOB_RECORD_PREFIX: &str = "\u{1}blob/";

/// The record key of the blob with content key `key`.
pub fn blob_record_key(key: &[u8; 32]) -> String {
    format!("{BLOB_RECORD_PREFIX}{}", hex(key))
}

/// Whether `key` is one of the store's own records (a blob record) rather than a user's file.
pub fn is_internal_key(key: &str) -> bool {
    key.starts_with(|c: char| c.is_control())
}

/// How a record key is shown to people (logs, events): a blob record as `blob:<hex>`.
pub fn display_key(key: &str) -> std::borrow::Cow<'_, str> {
    match key.strip_prefix(BLOB_RECORD_PREFIX) {
        Some(hex) => format!("blob:{hex}").into(),
        None => key.into(),
    }
}

/// Orders clock readings: physical time, then the counter, then the pod id. A record without a
/// clock (written before replication) is older than any with one.
pub fn hlc_key(h: Option<&Hlc>) -> (u64, u32, &str) {
    match h {
        Some(h) => (h.physical_ms, h.logical, h.node_id.as_str()),
        None => (0, 0, ""),
    }
}

/// The stored clock of a wire clock.
pub fn hlc_from_wire(h: &HybridTimestamp) -> Hlc {
    Hlc {
        physical_ms: h.physical_ms,
        logical: h.logical,
        node_id: h.node_id.clone(),
    }
}

/// The wire clock of a stored clock.
pub fn hlc_to_wire(h: &Hlc) -> HybridTimestamp {
    HybridTimestamp {
        physical_ms: h.physical_ms,
        logical: h.logical,
        node_id: h.node_id.clone(),
    }
}

fn ts(ns: i64) -> Option<prost_types::Timestamp> {
    Some(peervault_runtime::time::timestamp_from_ns(ns))
}

fn ns(t: Option<&prost_types::Timestamp>) -> i64 {
    t.map(|t| t.seconds.saturating_mul(1_000_000_000).saturating_add(t.nanos as i64))
        .unwrap_or(0)
}

/// The replicated form of a live file and its blob.
pub fn live_record(f: &FileRec, b: &BlobRec, inline: Option<Bytes>) -> FileRecord {
    FileRecord {
        key: f.key.clone(),
        blob_key: Bytes::copy_from_slice(&f.blob_key),
        size: f.size as i64,
        content_type: f.content_type.clone(),
        name: f.name.clone(),
        metadata: f.metadata.clone(),
        created_at: ts(f.created_ns),
        updated_at: ts(f.updated_ns),
        hlc: f.hlc.as_ref().map(hlc_to_wire),
        deleted: false,
        chunk_hashes: b.chunk_hashes.iter().map(|h| Bytes::copy_from_slice(h)).collect(),
        chunk_sizes: b.chunk_sizes.clone(),
        inline_data: inline.unwrap_or_default(),
    }
}

fn tombstone_record(key: &str, t: &Tombstone) -> FileRecord {
    FileRecord {
        key: key.to_string(),
        blob_key: Bytes::copy_from_slice(&t.blob_key),
        updated_at: ts(t.deleted_ns),
        hlc: t.hlc.as_ref().map(hlc_to_wire),
        deleted: true,
        ..Default::default()
    }
}

/// Whether a record's content is one chunk small enough to live inside the index.
fn single_inline_chunk(r: &FileRecord) -> bool {
    r.chunk_hashes.len() == 1
        && r.chunk_sizes.first().is_some_and(|s| *s as usize <= INLINE_MAX)
        && r.size as usize <= INLINE_MAX
}

/// Whether a live record carries all its content inline (one chunk up to the inline limit).
fn inline_only(r: &FileRecord) -> bool {
    !r.deleted && single_inline_chunk(r) && r.size >= 0 && r.inline_data.len() as i64 == r.size
}

/// Applies a replicated record inside an index transaction if it is newer (by clock) than the
/// one held; `local_locs` are where this pod's own copies of its chunks are. Deterministic
/// given the index and the record (its timestamps travel in it), so a journal replay
/// rebuilds what was acknowledged.
pub(crate) fn apply_record_in(
    txn: &index::Batch<'_>,
    r: &FileRecord,
    local_locs: &std::collections::HashMap<[u8; 32], (super::records::SegLoc, bool)>,
) -> Result<Reply> {
    let blob_key = check_record(r)?;
    let incoming = r.hlc.as_ref().map(hlc_from_wire);
    let key = r.key.clone();
    let cur: Option<Hlc> = {
        let files = txn.open_table(index::FILES)?;
        match files.get(key.as_str())? {
            Some(v) => Some(decode::<FileRec>("file", v.value())?.hlc.unwrap_or_default()),
            None => {
                let tombs = txn.open_table(index::TOMBSTONES)?;
                match tombs.get(key.as_str())? {
                    Some(v) => Some(decode::<Tombstone>("tombstone", v.value())?.hlc.unwrap_or_default()),
                    None => None,
                }
            }
        }
    };
    if let Some(c) = &cur
        && hlc_key(incoming.as_ref()) <= hlc_key(Some(c))
    {
        return Ok(Reply::Applied(false, None));
    }
    let when = ns(r.updated_at.as_ref());
    if r.deleted {
        let exists = txn.open_table(index::FILES)?.get(key.as_str())?.is_some();
        let old = if exists {
            match index::apply(
                txn,
                Op::DeleteFile {
                    key: key.clone(),
                    now_ns: when,
                },
            )? {
                Reply::Deleted(f) => Some(f),
                _ => None,
            }
        } else {
            None
        };
        let tomb = Tombstone {
            deleted_ns: when,
            blob_key: r.blob_key.to_vec(),
            hlc: incoming,
        };
        index::tombstone_put(txn, &key, &tomb)?;
        return Ok(Reply::Applied(true, old));
    }
    let single_inline = single_inline_chunk(r);
    let chunks = r
        .chunk_hashes
        .iter()
        .zip(&r.chunk_sizes)
        .map(|(h, &size)| {
            let hash = <[u8; 32]>::try_from(h.as_ref()).unwrap_or([0; 32]);
            let mut c = ChunkMeta::new(hash, size);
            c.inline = (single_inline && !r.inline_data.is_empty()).then(|| r.inline_data.clone());
            if let Some((l, repair)) = local_locs.get(&hash) {
                c.loc = Some(*l);
                c.repair = *repair;
            }
            c
        })
        .collect();
    let blob = NewBlob {
        key: blob_key,
        size: r.size.max(0) as u64,
        chunks,
        content_type: String::new(),
        attributes: Default::default(),
    };
    match index::apply(txn, Op::PutFile { rec: file_rec(r), blob })? {
        Reply::File(_, old) => Ok(Reply::Applied(true, old)),
        other => Err(BlobError::Corrupt(format!("unexpected reply {other:?}"))),
    }
}

/// The file record a live replicated record stands for.
pub fn file_rec(r: &FileRecord) -> FileRec {
    FileRec {
        key: r.key.clone(),
        blob_key: r.blob_key.to_vec(),
        size: r.size.max(0) as u64,
        content_type: r.content_type.clone(),
        name: r.name.clone(),
        metadata: r.metadata.clone(),
        created_ns: ns(r.created_at.as_ref()),
        updated_ns: ns(r.updated_at.as_ref()),
        hlc: r.hlc.as_ref().map(hlc_from_wire),
    }
}

/// Checks a record's shape before it goes near the index.
pub fn check_record(r: &FileRecord) -> Result<[u8; 32]> {
    if r.key.is_empty() {
        return Err(BlobError::invalid("record without a key"));
    }
    if r.hlc.is_none() {
        return Err(BlobError::invalid(format!("record '{}' has no clock", r.key)));
    }
    if r.deleted {
        return Ok([0; 32]);
    }
    if r.chunk_hashes.len() != r.chunk_sizes.len() {
        return Err(BlobError::invalid(format!(
            "record '{}' has {} chunk hashes but {} sizes",
            r.key,
            r.chunk_hashes.len(),
            r.chunk_sizes.len()
        )));
    }
    let blob = <[u8; 32]>::try_from(r.blob_key.as_ref())
        .map_err(|_| BlobError::invalid(format!("record '{}' has a blob key that is not 32 bytes", r.key)))?;
    let total: u64 = r.chunk_sizes.iter().map(|s| *s as u64).sum();
    if total != r.size.max(0) as u64 {
        return Err(BlobError::invalid(format!(
            "record '{}' says {} bytes but its chunks add up to {total}",
            r.key, r.size
        )));
    }
    for h in &r.chunk_hashes {
        if h.len() != 32 {
            return Err(BlobError::invalid(format!(
                "record '{}' has a chunk hash that is not 32 bytes",
                r.key
            )));
        }
    }
    Ok(blob)
}

/// A record as one pod lists it: its key, clock and whether it is a tombstone.
fn digest_leaf(h: &mut blake3::Hasher, r: &FileRecord) {
    h.update(&(r.key.len() as u64).to_le_bytes());
    h.update(r.key.as_bytes());
    let (p, l, n) = match &r.hlc {
        Some(c) => (c.physical_ms, c.logical, c.node_id.as_str()),
        None => (0, 0, ""),
    };
    h.update(&p.to_le_bytes());
    h.update(&l.to_le_bytes());
    h.update(&(n.len() as u64).to_le_bytes());
    h.update(n.as_bytes());
    h.update(&[r.deleted as u8]);
}

impl Store {
    /// Applies API key records from another pod: new ids are added, a revocation is taken over
    /// (never undone). Returns how many changed the table. Blocking.
    pub fn apply_api_keys(&self, recs: &[Bytes]) -> Result<u32> {
        use super::keys::{API_KEY_HASHES, API_KEYS, ApiKeyRec};
        let decoded: Vec<ApiKeyRec> = recs
            .iter()
            .map(|b| decode::<ApiKeyRec>("api key", b).map_err(|e| BlobError::invalid(e.to_string())))
            .collect::<Result<_>>()?;
        if decoded.iter().any(|r| r.id.is_empty() || r.secret_hash.len() != 32) {
            return Err(BlobError::invalid(
                "an API key record without an id or a 32-byte secret hash",
            ));
        }
        let txn = self.inner.db.begin_write()?;
        let mut applied = 0;
        {
            let mut keys = txn.open_table(API_KEYS)?;
            let mut hashes = txn.open_table(API_KEY_HASHES)?;
            for r in decoded {
                let cur: Option<ApiKeyRec> = match keys.get(r.id.as_str())? {
                    Some(v) => Some(decode("api key", v.value())?),
                    None => None,
                };
                let take = match &cur {
                    None => true,
                    Some(c) => r.revoked && !c.revoked,
                };
                if take {
                    keys.insert(r.id.as_str(), prost::Message::encode_to_vec(&r).as_slice())?;
                    hashes.insert(r.secret_hash.as_slice(), r.id.as_str())?;
                    applied += 1;
                }
            }
        }
        txn.commit()?;
        if applied > 0 {
            tracing::info!(applied, "API keys taken over from another pod");
        }
        Ok(applied)
    }

    /// Every API key record, encoded, and a digest over (id, revoked) of them. Blocking.
    pub fn api_key_records(&self) -> Result<(Vec<Bytes>, [u8; 32])> {
        let mut h = blake3::Hasher::new();
        let mut out = Vec::new();
        for r in self.list_api_keys(true)? {
            h.update(&(r.id.len() as u64).to_le_bytes());
            h.update(r.id.as_bytes());
            h.update(&[r.revoked as u8]);
            out.push(Bytes::from(prost::Message::encode_to_vec(&r)));
        }
        Ok((out, *h.finalize().as_bytes()))
    }

    /// The folder the store lives in.
    pub fn root(&self) -> &std::path::Path {
        &self.inner.root
    }

    /// This pod's committed record of `key` in replicated form (a tombstone included); `None`
    /// when it knows nothing of the key. With `with_data`, a small object's content rides along.
    pub fn replica_record(&self, key: &str, with_data: bool) -> Result<Option<FileRecord>> {
        let txn = self.inner.db.begin_read()?;
        let files = txn.open_table(index::FILES)?;
        if let Some(v) = files.get(key)? {
            let f: FileRec = decode("file", v.value())?;
            let blobs = txn.open_table(index::BLOBS)?;
            let b: BlobRec = match blobs.get(f.blob_key.as_slice())? {
                Some(v) => decode("blob", v.value())?,
                None => return Err(BlobError::Corrupt(format!("file '{key}' points at a missing blob"))),
            };
            let mut inline = None;
            if with_data
                && let ([h], [size]) = (b.chunk_hashes.as_slice(), b.chunk_sizes.as_slice())
                && *size as usize <= INLINE_MAX
                && let Some(v) = txn.open_table(index::INLINE)?.get(h.as_slice())?
            {
                inline = Some(Bytes::copy_from_slice(v.value()));
            }
            return Ok(Some(live_record(&f, &b, inline)));
        }
        let tombs = txn.open_table(index::TOMBSTONES)?;
        match tombs.get(key)? {
            Some(v) => Ok(Some(tombstone_record(key, &decode("tombstone", v.value())?))),
            None => Ok(None),
        }
    }

    /// Whether every chunk of `r` is here (or its blob is), so the record can be applied.
    /// Blocking.
    pub fn has_content(&self, r: &FileRecord) -> Result<bool> {
        if r.deleted {
            return Ok(true);
        }
        let txn = self.inner.db.begin_read()?;
        if txn.open_table(index::BLOBS)?.get(r.blob_key.as_ref())?.is_some() {
            return Ok(true);
        }
        let inline_ok = !r.inline_data.is_empty();
        let chunks = txn.open_table(index::CHUNKS)?;
        for (h, &size) in r.chunk_hashes.iter().zip(&r.chunk_sizes) {
            if chunks.get(h.as_ref())?.is_some() {
                continue;
            }
            if size as usize <= INLINE_MAX && r.chunk_hashes.len() == 1 {
                if inline_ok {
                    continue;
                }
                return Ok(false);
            }
            let Ok(hash) = <[u8; 32]>::try_from(h.as_ref()) else {
                return Ok(false);
            };
            if !self.chunk_path(&hash).exists() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether this pod holds the chunk (in the index, inline, or as a file). Blocking.
    pub fn has_chunk(&self, hash: &[u8; 32]) -> Result<bool> {
        if self.chunk_record(hash)?.is_some() {
            return Ok(true);
        }
        Ok(self.chunk_path(hash).exists())
    }

    /// Stores a chunk received from another pod: verified against its hash, written to a
    /// temporary file, fsynced, renamed into place and its folder fsynced. Returns whether it was
    /// new. It stays unreferenced until a record uses it (the orphan scan removes it after the
    /// GC grace period otherwise). Blocking.
    pub fn put_chunk(&self, hash: &[u8; 32], data: &[u8]) -> Result<bool> {
        if blake3::hash(data).as_bytes() != hash {
            return Err(BlobError::DataLoss(format!(
                "chunk {} does not match its hash: nothing of it was stored",
                hex(hash)
            )));
        }
        if self.has_chunk(hash)? {
            return Ok(false);
        }
        self.reserve(data.len() as u64)?;
        let out = self.write_chunk_durably(hash, data).map(|()| true);
        self.unreserve(data.len() as u64);
        out
    }

    /// A chunk's content by hash alone (its size from the index or the file), verified: a
    /// committed chunk, or one an upload on this pod made durable and has not committed yet
    /// (what replication forwards while the upload goes on). Blocking.
    pub fn read_chunk_any(&self, hash: &[u8; 32]) -> Result<Bytes> {
        if let Some(rec) = self.chunk_record(hash)? {
            return self.read_chunk(hash, rec.size);
        }
        let pending = self.pin_table().pending_loc(hash);
        if let Some((l, size)) = pending
            && let Ok(d) = self.read_pending(&l, size, hash)
        {
            return Ok(d);
        }
        match self.inner.disk.read(&self.chunk_path(hash)) {
            Ok(d) => self.verify(hash, d.len() as u32, Bytes::from(d)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(BlobError::NotFound(format!("chunk {} is not on this pod", hex(hash))))
            }
            Err(e) => Err(BlobError::io(format!("read chunk {}", hex(hash)), e)),
        }
    }

    /// An uncommitted chunk at its pinned place, verified.
    fn read_pending(&self, l: &super::records::SegLoc, size: u32, hash: &[u8; 32]) -> Result<Bytes> {
        let data = self
            .read_segment(l, size)
            .map_err(|e| BlobError::io(format!("read chunk {}", hex(hash)), e))?;
        if blake3::hash(&data).as_bytes() == hash {
            return Ok(data);
        }
        Err(BlobError::NotFound(format!("chunk {} is not on this pod", hex(hash))))
    }

    /// Replaces a corrupt or missing chunk file with a verified copy (from another pod).
    /// Blocking.
    pub fn repair_chunk(&self, hash: &[u8; 32], data: &[u8]) -> Result<()> {
        if blake3::hash(data).as_bytes() != hash {
            return Err(BlobError::DataLoss(format!(
                "repair copy of chunk {} is corrupt",
                hex(hash)
            )));
        }
        if matches!(self.chunk_record(hash)?, Some(ChunkRec { inline: true, .. })) {
            // Inline chunks live in the index, whose pages are checksummed by redb.
            return Ok(());
        }
        self.write_chunk_durably(hash, data)?;
        tracing::warn!(chunk = %hex(hash), "chunk repaired from a replica");
        Ok(())
    }

    /// Applies a replicated record if it is newer (by clock) than the one held, in one grouped
    /// index commit. `local` is content this pod ingested itself for the record (released
    /// after the commit). Returns whether it was applied and the live file it replaced.
    pub async fn apply_record(&self, r: FileRecord, local: Option<Finished>) -> Result<(bool, Option<FileRec>)> {
        check_record(&r)?;
        // Where this pod's own copies of the chunks are (segments), so the records point there.
        let local_locs: std::collections::HashMap<[u8; 32], (super::records::SegLoc, bool)> = local
            .iter()
            .flat_map(|f| f.blob.chunks.iter())
            .filter_map(|c| c.loc.map(|l| (c.hash, (l, c.repair))))
            .collect();
        // Inline content with nothing ingested here: a journaled put like one pod's small puts
        // (one append and one fdatasync per batch instead of a durable index commit).
        let op = if local_locs.is_empty() && inline_only(&r) {
            Op::ApplyInlineRecord { record: r }
        } else {
            Op::Custom(Box::new(move |txn| apply_record_in(txn, &r, &local_locs)))
        };
        match self.commit_with(op, local).await? {
            Reply::Applied(applied, old) => Ok((applied, old)),
            other => Err(BlobError::Corrupt(format!("unexpected reply {other:?}"))),
        }
    }

    /// Forgets this pod's copy of `key` (its partition moved to other owners that confirmed
    /// they hold it): the record goes without a tombstone, content when nothing else uses it.
    pub async fn forget_record(&self, key: &str) -> Result<()> {
        let key = key.to_string();
        let op: index::CustomOp = Box::new(move |txn| {
            let live = txn.open_table(index::FILES)?.get(key.as_str())?.is_some();
            if live {
                index::apply(
                    txn,
                    Op::DeleteFile {
                        key: key.clone(),
                        now_ns: super::now_ns(),
                    },
                )?;
            }
            txn.open_table(index::TOMBSTONES)?.remove(key.as_str())?;
            Ok(Reply::Applied(true, None))
        });
        self.commit(Op::Custom(op)).await?;
        Ok(())
    }

    /// Collects the tombstone of `key` if it is still the one with clock `hlc` (a newer write
    /// or delete since keeps its record), with its time-index entry. The cluster calls this
    /// once every owner of the key's partition confirmed it holds the tombstone (or newer).
    /// Returns whether it was removed.
    pub async fn collect_tombstone(&self, key: &str, hlc: &Hlc) -> Result<bool> {
        let key = key.to_string();
        let want = hlc.clone();
        let op: index::CustomOp = Box::new(move |txn| {
            let cur = match txn.open_table(index::TOMBSTONES)?.get(key.as_str())? {
                Some(v) => decode::<Tombstone>("tombstone", v.value())?,
                None => return Ok(Reply::Applied(false, None)),
            };
            if cur.hlc.as_ref() != Some(&want) || txn.open_table(index::FILES)?.get(key.as_str())?.is_some() {
                return Ok(Reply::Applied(false, None));
            }
            txn.open_table(index::TOMBSTONES)?.remove(key.as_str())?;
            txn.open_table(index::TOMBSTONES_BY_TIME)?
                .remove(index::time_key(cur.deleted_ns, key.as_bytes()).as_slice())?;
            Ok(Reply::Applied(true, None))
        });
        match self.commit(Op::Custom(op)).await? {
            Reply::Applied(removed, _) => Ok(removed),
            other => Err(BlobError::Corrupt(format!("unexpected reply {other:?}"))),
        }
    }

    /// Records (tombstones included) in key order after `start_after`, with `prefix`, in
    /// `partitions` (empty: all), at most `limit`. Blocking.
    pub fn list_records(
        &self,
        prefix: &str,
        start_after: &str,
        partitions: &[u32],
        limit: usize,
        with_data: bool,
    ) -> Result<Vec<FileRecord>> {
        let txn = self.inner.db.begin_read()?;
        let files = txn.open_table(index::FILES)?;
        let tombs = txn.open_table(index::TOMBSTONES)?;
        let blobs = txn.open_table(index::BLOBS)?;
        let inline = txn.open_table(index::INLINE)?;
        let start = if start_after > prefix { start_after } else { prefix };
        let mut fi = files.range(start..)?.peekable();
        let mut ti = tombs.range(start..)?.peekable();
        let mut out = Vec::new();
        let wanted = |k: &str| partitions.is_empty() || partitions.contains(&key_partition(k));
        // One rule for both tables: past the prefix ends the listing; the page's start key and
        // keys of other partitions are skipped.
        let step = |key: &str| {
            if !key.starts_with(prefix) {
                Step::End
            } else if key == start_after || !wanted(key) {
                Step::Skip
            } else {
                Step::Take
            }
        };
        while out.len() < limit {
            if matches!(fi.peek(), Some(Err(_)))
                && let Some(Err(e)) = fi.next()
            {
                return Err(e.into());
            }
            if matches!(ti.peek(), Some(Err(_)))
                && let Some(Err(e)) = ti.next()
            {
                return Err(e.into());
            }
            let fk = match fi.peek() {
                Some(Ok((k, _))) => Some(k.value().to_string()),
                _ => None,
            };
            let tk = match ti.peek() {
                Some(Ok((k, _))) => Some(k.value().to_string()),
                _ => None,
            };
            let take_file = match (&fk, &tk) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some(a), Some(b)) => a <= b,
            };
            let rec = if take_file {
                let Some(item) = fi.next() else { break };
                let (k, v) = item?;
                let key = k.value().to_string();
                match step(&key) {
                    Step::End => break,
                    Step::Skip => continue,
                    Step::Take => {}
                }
                let f: FileRec = decode("file", v.value())?;
                let b: BlobRec = match blobs.get(f.blob_key.as_slice())? {
                    Some(v) => decode("blob", v.value())?,
                    None => return Err(BlobError::Corrupt(format!("file '{key}' points at a missing blob"))),
                };
                let mut data = None;
                if with_data
                    && let ([h], [size]) = (b.chunk_hashes.as_slice(), b.chunk_sizes.as_slice())
                    && *size as usize <= INLINE_MAX
                    && let Some(v) = inline.get(h.as_slice())?
                {
                    data = Some(Bytes::copy_from_slice(v.value()));
                }
                live_record(&f, &b, data)
            } else {
                let Some(item) = ti.next() else { break };
                let (k, v) = item?;
                let key = k.value().to_string();
                match step(&key) {
                    Step::End => break,
                    Step::Skip => continue,
                    Step::Take => {}
                }
                let t: Tombstone = decode("tombstone", v.value())?;
                tombstone_record(&key, &t)
            };
            out.push(rec);
        }
        Ok(out)
    }

    /// Tombstones this pod stored before `before_ns`, oldest first, after the time-index
    /// position `after` (empty: from the oldest), at most `limit`; with the position of the last
    /// one to continue from when more may follow. Reads only tombstones (the time index), never live records: the
    /// cost of collecting tombstones follows how many are due, not the size of the store.
    /// Blocking.
    pub fn tombstones_stored_before(
        &self,
        before_ns: i64,
        after: &[u8],
        limit: usize,
    ) -> Result<(Vec<FileRecord>, Option<Vec<u8>>)> {
        let txn = self.inner.db.begin_read()?;
        let by_time = txn.open_table(index::TOMBSTONES_BY_TIME)?;
        let tombs = txn.open_table(index::TOMBSTONES)?;
        let mut out = Vec::new();
        let mut last = after.to_vec();
        let mut more = false;
        for e in by_time.range(after..)? {
            let (k, _) = e?;
            let k = k.value();
            if k == after {
                continue;
            }
            let Some((at, key)) = index::split_time_key(k) else {
                continue;
            };
            if at >= before_ns {
                break;
            }
            if out.len() == limit {
                more = true;
                break;
            }
            last = k.to_vec();
            let key = String::from_utf8_lossy(key);
            // A time entry whose tombstone is gone (or replaced by a newer one) is skipped.
            if let Some(v) = tombs.get(key.as_ref())? {
                let t: Tombstone = decode("tombstone", v.value())?;
                if t.deleted_ns == at {
                    out.push(tombstone_record(&key, &t));
                }
            }
        }
        Ok((out, more.then_some(last)))
    }

    /// Every chunk hash this pod references, in order (for anti-entropy and scrub). Blocking.
    pub fn chunk_hashes(&self, partitions: &[u32]) -> Result<Vec<([u8; 32], ChunkRec)>> {
        let txn = self.inner.db.begin_read()?;
        let t = txn.open_table(index::CHUNKS)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            let Ok(hash) = <[u8; 32]>::try_from(k.value()) else {
                continue;
            };
            if !partitions.is_empty() && !partitions.contains(&chunk_partition(&hash)) {
                continue;
            }
            let rec: ChunkRec = decode("chunk", v.value())?;
            if rec.refs > 0 {
                out.push((hash, rec));
            }
        }
        Ok(out)
    }

    /// One digest per partition over the records (key, clock, tombstone flag) this pod holds.
    /// Two owners with equal digests for a partition hold the same records. Walks every record,
    /// unless nothing was committed since the last walk: an idle pod's periodic anti-entropy
    /// rounds then cost no scan. Blocking.
    pub fn record_digests(&self) -> Result<Vec<[u8; 32]>> {
        // Read before the walk's snapshot: a commit landing during the walk leaves the result
        // labelled older than it is, so it is walked again next time, never reused stale.
        let at = self.inner.commits.load(std::sync::atomic::Ordering::SeqCst);
        if let Some((n, d)) = self.inner.digests.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
            && *n == at
        {
            return Ok(d.clone());
        }
        let d = self.walk_record_digests()?;
        #[cfg(any(test, feature = "test-hooks"))]
        self.hook("replica.digests_walked");
        *self.inner.digests.lock().unwrap_or_else(|p| p.into_inner()) = Some((at, d.clone()));
        Ok(d)
    }

    fn walk_record_digests(&self) -> Result<Vec<[u8; 32]>> {
        self.inner.metrics.record_digest_scans.inc();
        let mut hashers: Vec<blake3::Hasher> = (0..PARTITIONS).map(|_| blake3::Hasher::new()).collect();
        let mut after = String::new();
        loop {
            let batch = self.list_records("", &after, &[], 1024, false)?;
            let Some(last) = batch.last() else { break };
            after = last.key.clone();
            for r in &batch {
                if let Some(h) = hashers.get_mut(key_partition(&r.key) as usize) {
                    digest_leaf(h, r);
                }
            }
        }
        Ok(hashers.into_iter().map(|h| *h.finalize().as_bytes()).collect())
    }
}

/// What a listing does with the next key of a table.
enum Step {
    /// Past the prefix: the listing ends.
    End,
    /// Not wanted (the page's start key, another partition).
    Skip,
    /// Part of the listing.
    Take,
}
