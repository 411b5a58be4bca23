//! The index: redb tables and the operations that change them (applied in batches by the
//! committer thread, `committer.rs`).

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use prost::Message;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use tokio::sync::oneshot;

use super::records::{BlobRec, ChunkRec, FileRec, SegLoc, Tombstone, UploadChunkRec, UploadRec, decode};
use crate::error::{BlobError, Result};

pub(crate) const FILES: TableDefinition<&str, &[u8]> = TableDefinition::new("files");
pub(crate) const BLOBS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blobs");
pub(crate) const CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunks");
pub(crate) const INLINE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("inline_chunks");
pub(crate) const UPLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("uploads");
pub(crate) const TOMBSTONES: TableDefinition<&str, &[u8]> = TableDefinition::new("tombstones");
/// Chunks whose reference count reached zero, with the time it did (ns since the epoch).
pub(crate) const GC: TableDefinition<&[u8], i64> = TableDefinition::new("gc_queue");
/// The GC queue in time order: (time, hash) → (), so a pass reads only what is due.
pub(crate) const GC_BY_TIME: TableDefinition<&[u8], ()> = TableDefinition::new("gc_by_time");
/// A resumable upload's durable chunks, one row each: `{id}/{index:016x}` → [`UploadChunkRec`].
pub(crate) const UPLOAD_CHUNKS: TableDefinition<&str, &[u8]> = TableDefinition::new("upload_chunks");
/// Uploads by last progress: (time, id) → (), for expiry without decoding every upload.
pub(crate) const UPLOADS_BY_TIME: TableDefinition<&[u8], ()> = TableDefinition::new("uploads_by_time");
/// Tombstones by deletion time: (time, key) → (), for expiry.
pub(crate) const TOMBSTONES_BY_TIME: TableDefinition<&[u8], ()> = TableDefinition::new("tombstones_by_time");

/// Most chunk entries one GC pass collects (one write transaction stays short).
pub(crate) const GC_BATCH: usize = 2048;
/// Most uploads one pass expires.
pub(crate) const EXPIRE_BATCH: usize = 64;
/// Most tombstones one pass expires.
pub(crate) const TOMBSTONE_BATCH: usize = 2048;

/// A key of a time-ordered table: big-endian time first, then the item.
pub(crate) fn time_key(ns: i64, item: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + item.len());
    k.extend_from_slice(&(ns.max(0) as u64).to_be_bytes());
    k.extend_from_slice(item);
    k
}

pub(crate) fn split_time_key(k: &[u8]) -> Option<(i64, &[u8])> {
    let (t, item) = k.split_at_checked(8)?;
    let t = u64::from_be_bytes(t.try_into().ok()?);
    Some((t.min(i64::MAX as u64) as i64, item))
}

/// The key of an upload's chunk row.
pub(crate) fn upload_chunk_key(id: &str, index: u64) -> String {
    format!("{id}/{index:016x}")
}

/// Every chunk row of an upload, in order.
pub(crate) fn upload_rows<T: ReadableTable<&'static str, &'static [u8]>>(
    t: &T,
    id: &str,
) -> Result<Vec<UploadChunkRec>> {
    let lo = format!("{id}/");
    let hi = format!("{id}0"); // '0' follows '/'
    let mut out = Vec::new();
    for e in t.range(lo.as_str()..hi.as_str())? {
        let (_, v) = e?;
        out.push(decode("upload chunk", v.value())?);
    }
    Ok(out)
}
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Bytes of chunks the index references in each segment file: segment id → live bytes. A
/// segment without a row holds nothing the index references.
pub(crate) const SEGMENT_LIVE: TableDefinition<u64, u64> = TableDefinition::new("segment_live");
/// The chunks of each segment in offset order: (segment, offset) big-endian → chunk hash, for
/// compaction to find what is live in a segment without scanning every chunk record.
pub(crate) const SEGMENT_CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("segment_chunks");

/// The key of a chunk in [`SEGMENT_CHUNKS`].
pub(crate) fn seg_key(loc: &SegLoc) -> [u8; 16] {
    let mut k = [0; 16];
    k[..8].copy_from_slice(&loc.segment.to_be_bytes());
    k[8..].copy_from_slice(&loc.offset.to_be_bytes());
    k
}

/// A chunk's bytes now count as live in its segment.
fn loc_add(txn: &Batch<'_>, loc: &SegLoc, hash: &[u8], size: u32) -> Result<()> {
    let mut live = txn.open_table(SEGMENT_LIVE)?;
    let cur = live.get(loc.segment)?.map(|v| v.value()).unwrap_or(0);
    live.insert(loc.segment, cur + size as u64)?;
    txn.open_table(SEGMENT_CHUNKS)?.insert(&seg_key(loc)[..], hash)?;
    Ok(())
}

/// A chunk's bytes are dead in its segment (compaction reclaims them); a segment with nothing
/// live loses its row.
fn loc_remove(txn: &Batch<'_>, loc: &SegLoc, size: u32) -> Result<()> {
    let mut live = txn.open_table(SEGMENT_LIVE)?;
    let cur = live.get(loc.segment)?.map(|v| v.value()).unwrap_or(0);
    let next = cur.saturating_sub(size as u64);
    if next == 0 {
        live.remove(loc.segment)?;
    } else {
        live.insert(loc.segment, next)?;
    }
    txn.open_table(SEGMENT_CHUNKS)?.remove(&seg_key(loc)[..])?;
    Ok(())
}

/// Counters kept in [`META`].
pub(crate) mod meta {
    pub const STORAGE_USED: &str = "storage_used";
    pub const LOGICAL_BYTES: &str = "logical_bytes";
    pub const FILE_COUNT: &str = "file_count";
    pub const BLOB_COUNT: &str = "blob_count";
    pub const CHUNK_COUNT: &str = "chunk_count";
    /// Bumped whenever the set of file keys changes (cached list counts key on it).
    pub const FILE_GEN: &str = "file_gen";
}

/// One chunk of new content.
#[derive(Debug, Clone)]
pub struct ChunkMeta {
    /// BLAKE3 of the chunk.
    pub hash: [u8; 32],
    /// Length.
    pub size: u32,
    /// Content kept in the index instead of a file (small objects).
    pub inline: Option<Bytes>,
    /// Where the chunk's durable bytes are in a segment (`None`: inline, or a per-chunk file).
    pub loc: Option<SegLoc>,
    /// The stored copy failed verification: the record moves to `loc`, this new copy.
    pub repair: bool,
}

impl ChunkMeta {
    /// A chunk known by hash and size only (its bytes are wherever the index says, or a
    /// per-chunk file).
    pub fn new(hash: [u8; 32], size: u32) -> ChunkMeta {
        ChunkMeta {
            hash,
            size,
            inline: None,
            loc: None,
            repair: false,
        }
    }
}

/// A blob about to be referenced.
#[derive(Debug, Clone)]
pub struct NewBlob {
    /// BLAKE3 of the whole content.
    pub key: [u8; 32],
    /// Length.
    pub size: u64,
    /// Chunks in order.
    pub chunks: Vec<ChunkMeta>,
    /// MIME type.
    pub content_type: String,
    /// Attributes.
    pub attributes: HashMap<String, String>,
}

/// Changes to a file's descriptive fields.
#[derive(Debug, Clone, Default)]
pub struct MetadataPatch {
    /// Entries to set (merged unless `replace`).
    pub set: HashMap<String, String>,
    /// Replace the whole map with `set`.
    pub replace: bool,
    /// Keys to remove.
    pub remove: Vec<String>,
    /// New display name.
    pub name: Option<String>,
    /// New content type.
    pub content_type: Option<String>,
}

/// An operation for the committer.
pub(crate) enum Op {
    PutFile {
        rec: FileRec,
        blob: NewBlob,
    },
    /// A replicated record whose content is inline (one chunk, carried in the record), applied
    /// if newer than the one held: deterministic given the index, so it can be journaled.
    ApplyInlineRecord {
        record: peervault_proto::v1::FileRecord,
    },
    DeleteFile {
        key: String,
        now_ns: i64,
    },
    UpdateFile {
        key: String,
        patch: MetadataPatch,
        now_ns: i64,
    },
    DeleteBlob {
        key: [u8; 32],
        now_ns: i64,
    },
    CreateUpload {
        id: String,
        rec: UploadRec,
    },
    /// Makes the caller the upload's live session and returns its record and chunk rows.
    ClaimUpload {
        id: String,
        now_ns: i64,
    },
    /// Records durable chunks, starting at `offset`, for the live `session` only.
    AppendUpload {
        id: String,
        session: u64,
        offset: u64,
        chunks: Vec<(ChunkMeta, [u8; 32])>,
        now_ns: i64,
    },
    CompleteUpload {
        id: String,
        session: u64,
        blob: NewBlob,
        now_ns: i64,
    },
    AbortUpload {
        id: String,
        /// `None`: whatever session; else only if it is still the live one.
        session: Option<u64>,
        now_ns: i64,
    },
    Gc {
        now_ns: i64,
        grace_ns: i64,
        expiry_ns: i64,
        tombstone_expiry_ns: i64,
        pinned: HashSet<[u8; 32]>,
    },
    /// Compaction: chunks copied (durably) from `from` to `to`; each moves only if its record
    /// still points at `from`.
    Relocate {
        moves: Vec<([u8; 32], SegLoc, SegLoc)>,
    },
    /// Chunks received from another pod and written (durably) into segments: each becomes a
    /// record with no references, waiting in the GC queue until a record uses it. A chunk the
    /// index holds already keeps its copy (unless `repair` marks that copy as rotted).
    AddChunks {
        chunks: Vec<ChunkMeta>,
        now_ns: i64,
    },
    /// An operation composed elsewhere in the store (replica: apply a record if newer) from
    /// [`apply`] and the tables, committed in the same batches as everything else.
    Custom(CustomOp),
}

/// The body of [`Op::Custom`].
pub(crate) type CustomOp = Box<dyn FnOnce(&Batch<'_>) -> Result<Reply> + Send>;

/// What an operation answers.
// A reply lives for one commit on its way back to one caller: boxing would cost more than the
// size difference does.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Reply {
    /// The file as stored now, and the one it replaced.
    File(FileRec, Option<FileRec>),
    /// The deleted file.
    Deleted(FileRec),
    /// The blob as stored now.
    Blob(BlobRec),
    /// Bytes whose last reference went away.
    Freed(u64),
    /// Durable bytes of an upload.
    Received(u64),
    /// An upload claimed by a new session.
    Claimed(UploadRec, Vec<UploadChunkRec>),
    /// Collected chunk files to unlink (hash, bytes), and uploads expired.
    Collected {
        files: Vec<([u8; 32], u64)>,
        /// Collected chunks in segments: their ranges' space can be given back.
        holes: Vec<([u8; 32], SegLoc, u32)>,
        inline: usize,
        bytes: u64,
        expired: usize,
        tombstones: usize,
        /// Whether any queue had more due than one pass takes.
        more: bool,
    },
    /// A replicated record: whether it was applied, and the live file it replaced.
    Applied(bool, Option<FileRec>),
    /// Compaction: chunks and bytes whose records moved.
    Moved(usize, u64),
    Done,
}

pub(crate) struct Job {
    pub op: Op,
    pub reply: oneshot::Sender<Result<Reply>>,
    /// Content the operation references: released by the committer once the outcome is known,
    /// so a caller that goes away mid-commit cannot release (and delete) what just committed.
    pub content: Option<super::Finished>,
}

/// The write transaction of one batch of operations, with the changes to the [`META`]
/// counters gathered in memory and written once, by [`Batch::finish`]: every put changes five or
/// six counters, and a table open, lookup and insert each would cost more than the rest of a
/// small put's index work. Nothing reads these counters inside a write transaction, so deferring the
/// writes changes no outcome. Derefs to the transaction for everything else.
pub(crate) struct Batch<'a> {
    txn: &'a WriteTransaction,
    meta: std::cell::RefCell<Vec<(&'static str, i64)>>,
}

impl<'a> Batch<'a> {
    /// A batch applied in `txn`.
    pub(crate) fn new(txn: &'a WriteTransaction) -> Batch<'a> {
        Batch {
            txn,
            meta: Default::default(),
        }
    }

    /// Writes the gathered counter changes; call once, after the last operation and before the
    /// commit (dropping a batch without it loses them: the transaction must then not commit).
    pub(crate) fn finish(self) -> Result<()> {
        let deltas = self.meta.into_inner();
        if deltas.is_empty() {
            return Ok(());
        }
        let mut t = self.txn.open_table(META)?;
        for (name, delta) in deltas {
            if delta == 0 {
                continue;
            }
            let cur = t.get(name)?.map(|v| v.value()).unwrap_or(0);
            let next = if delta >= 0 {
                cur.saturating_add(delta as u64)
            } else {
                cur.saturating_sub(delta.unsigned_abs())
            };
            t.insert(name, next)?;
        }
        Ok(())
    }
}

impl std::ops::Deref for Batch<'_> {
    type Target = WriteTransaction;
    fn deref(&self) -> &WriteTransaction {
        self.txn
    }
}

fn meta_add(txn: &Batch<'_>, name: &'static str, delta: i64) {
    let mut m = txn.meta.borrow_mut();
    match m.iter_mut().find(|(n, _)| *n == name) {
        Some((_, d)) => *d = d.saturating_add(delta),
        None => m.push((name, delta)),
    }
}

/// Adds one reference to a chunk, creating its record (and inline data) if new.
fn chunk_ref(txn: &Batch<'_>, c: &ChunkMeta) -> Result<()> {
    let mut chunks = txn.open_table(CHUNKS)?;
    let existing = chunks.get(&c.hash[..])?.map(|v| v.value().to_vec());
    match existing {
        Some(bytes) => {
            let mut rec: ChunkRec = decode("chunk", &bytes)?;
            if rec.refs == 0 {
                gc_dequeue(txn, &c.hash)?;
            }
            rec.refs += 1;
            chunks.insert(&c.hash[..], rec.encode_to_vec().as_slice())?;
            drop(chunks);
            chunk_repair(txn, c)?;
        }
        None => {
            let loc = if c.inline.is_some() { None } else { c.loc };
            let rec = ChunkRec {
                refs: 1,
                size: c.size,
                inline: c.inline.is_some(),
                loc,
            };
            chunks.insert(&c.hash[..], rec.encode_to_vec().as_slice())?;
            if let Some(l) = &loc {
                loc_add(txn, l, &c.hash, c.size)?;
            }
            if let Some(data) = &c.inline {
                txn.open_table(INLINE)?.insert(&c.hash[..], data.as_ref())?;
            }
            drop(chunks);
            meta_add(txn, meta::STORAGE_USED, c.size as i64);
            meta_add(txn, meta::CHUNK_COUNT, 1);
        }
    }
    Ok(())
}

/// A new copy written because the stored one failed verification takes the stored one's place
/// (whether or not the content's blob exists already).
fn chunk_repair(txn: &Batch<'_>, c: &ChunkMeta) -> Result<()> {
    let (true, Some(new)) = (c.repair, c.loc) else {
        return Ok(());
    };
    let mut chunks = txn.open_table(CHUNKS)?;
    let Some(bytes) = chunks.get(&c.hash[..])?.map(|v| v.value().to_vec()) else {
        return Ok(());
    };
    let mut rec: ChunkRec = decode("chunk", &bytes)?;
    if rec.inline || rec.loc == Some(new) {
        return Ok(());
    }
    let old = rec.loc.replace(new);
    chunks.insert(&c.hash[..], rec.encode_to_vec().as_slice())?;
    drop(chunks);
    if let Some(old) = old {
        loc_remove(txn, &old, rec.size)?;
    }
    loc_add(txn, &new, &c.hash, rec.size)?;
    Ok(())
}

/// Drops one reference to a chunk; at zero it waits in the GC queue for the grace period.
fn chunk_unref(txn: &Batch<'_>, hash: &[u8], now_ns: i64) -> Result<()> {
    let mut chunks = txn.open_table(CHUNKS)?;
    let Some(bytes) = chunks.get(hash)?.map(|v| v.value().to_vec()) else {
        return Err(BlobError::Corrupt(format!("unref of unknown chunk {}", hex(hash))));
    };
    let mut rec: ChunkRec = decode("chunk", &bytes)?;
    rec.refs = rec.refs.saturating_sub(1);
    chunks.insert(hash, rec.encode_to_vec().as_slice())?;
    if rec.refs == 0 {
        txn.open_table(GC)?.insert(hash, now_ns)?;
        txn.open_table(GC_BY_TIME)?
            .insert(time_key(now_ns, hash).as_slice(), ())?;
    }
    Ok(())
}

/// Takes a chunk out of the GC queue (a new reference revived it).
fn gc_dequeue(txn: &Batch<'_>, hash: &[u8]) -> Result<()> {
    let since = txn.open_table(GC)?.remove(hash)?.map(|v| v.value());
    if let Some(t) = since {
        txn.open_table(GC_BY_TIME)?.remove(time_key(t, hash).as_slice())?;
    }
    Ok(())
}

/// Stores `tomb` as the tombstone of `key` with its time-index entry, replacing any earlier
/// one (and its entry): the one place a tombstone is written, so the two tables stay in step.
pub(crate) fn tombstone_put(txn: &Batch<'_>, key: &str, tomb: &Tombstone) -> Result<()> {
    tombstone_remove(txn, key)?;
    txn.open_table(TOMBSTONES)?
        .insert(key, tomb.encode_to_vec().as_slice())?;
    txn.open_table(TOMBSTONES_BY_TIME)?
        .insert(time_key(tomb.deleted_ns, key.as_bytes()).as_slice(), ())?;
    Ok(())
}

/// Removes a tombstone and its time-index entry.
fn tombstone_remove(txn: &Batch<'_>, key: &str) -> Result<()> {
    let old = txn.open_table(TOMBSTONES)?.remove(key)?.map(|v| v.value().to_vec());
    if let Some(old) = old {
        let t: Tombstone = decode("tombstone", &old)?;
        txn.open_table(TOMBSTONES_BY_TIME)?
            .remove(time_key(t.deleted_ns, key.as_bytes()).as_slice())?;
    }
    Ok(())
}

/// Stores an upload record and keeps its time-index entry in step (`prev_ns`: the time it
/// was indexed under before, if any).
fn upload_put(txn: &Batch<'_>, id: &str, rec: &UploadRec, prev_ns: Option<i64>) -> Result<()> {
    if let Some(p) = prev_ns {
        txn.open_table(UPLOADS_BY_TIME)?
            .remove(time_key(p, id.as_bytes()).as_slice())?;
    }
    txn.open_table(UPLOADS_BY_TIME)?
        .insert(time_key(rec.updated_ns, id.as_bytes()).as_slice(), ())?;
    txn.open_table(UPLOADS)?.insert(id, rec.encode_to_vec().as_slice())?;
    Ok(())
}

/// Adds a file reference to a blob, creating it (and its chunk references) if new.
fn blob_ref_file(txn: &Batch<'_>, b: &NewBlob, now_ns: i64) -> Result<()> {
    let mut blobs = txn.open_table(BLOBS)?;
    let existing = blobs.get(&b.key[..])?.map(|v| v.value().to_vec());
    match existing {
        Some(bytes) => {
            let mut rec: BlobRec = decode("blob", &bytes)?;
            rec.file_refs += 1;
            blobs.insert(&b.key[..], rec.encode_to_vec().as_slice())?;
            drop(blobs);
            for c in b.chunks.iter().filter(|c| c.repair) {
                chunk_repair(txn, c)?;
            }
        }
        None => {
            let rec = new_blob_rec(b, now_ns, 1, false);
            blobs.insert(&b.key[..], rec.encode_to_vec().as_slice())?;
            drop(blobs);
            for c in &b.chunks {
                chunk_ref(txn, c)?;
            }
            meta_add(txn, meta::BLOB_COUNT, 1);
        }
    }
    Ok(())
}

fn new_blob_rec(b: &NewBlob, now_ns: i64, file_refs: u64, pinned: bool) -> BlobRec {
    BlobRec {
        size: b.size,
        chunk_hashes: b.chunks.iter().map(|c| c.hash.to_vec()).collect(),
        chunk_sizes: b.chunks.iter().map(|c| c.size).collect(),
        content_type: b.content_type.clone(),
        attributes: b.attributes.clone(),
        created_ns: now_ns,
        file_refs,
        pinned,
    }
}

/// Removes the blob if nothing references it any more; returns the bytes released.
fn blob_drop_if_unused(txn: &Batch<'_>, key: &[u8], rec: &BlobRec, now_ns: i64) -> Result<u64> {
    if rec.file_refs > 0 || rec.pinned {
        txn.open_table(BLOBS)?.insert(key, rec.encode_to_vec().as_slice())?;
        return Ok(0);
    }
    txn.open_table(BLOBS)?.remove(key)?;
    for h in &rec.chunk_hashes {
        chunk_unref(txn, h, now_ns)?;
    }
    meta_add(txn, meta::BLOB_COUNT, -1);
    Ok(rec.size)
}

/// Drops one file reference from a blob.
fn blob_unref_file(txn: &Batch<'_>, key: &[u8], now_ns: i64) -> Result<()> {
    let bytes = txn.open_table(BLOBS)?.get(key)?.map(|v| v.value().to_vec());
    let Some(bytes) = bytes else {
        return Err(BlobError::Corrupt(format!("file points at unknown blob {}", hex(key))));
    };
    let mut rec: BlobRec = decode("blob", &bytes)?;
    rec.file_refs = rec.file_refs.saturating_sub(1);
    blob_drop_if_unused(txn, key, &rec, now_ns)?;
    Ok(())
}

/// Lower-case hex of bytes.
pub fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter().fold(String::with_capacity(b.len() * 2), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn get_upload(txn: &Batch<'_>, id: &str) -> Result<UploadRec> {
    let bytes = txn.open_table(UPLOADS)?.get(id)?.map(|v| v.value().to_vec());
    match bytes {
        Some(b) => decode("upload", &b),
        None => Err(BlobError::NotFound(format!(
            "upload '{id}' is unknown or expired: start a new upload"
        ))),
    }
}

/// A superseded session's refusal.
fn stale(id: &str) -> BlobError {
    BlobError::Aborted(format!(
        "upload '{id}' was resumed by a newer stream; this stream is no longer its session"
    ))
}

/// Removes an upload: its record, time-index entry and chunk rows, and (unless
/// `keep_refs`, when a completed blob takes them over) its chunk references.
fn remove_upload(txn: &Batch<'_>, id: &str, rec: &UploadRec, keep_refs: bool, now_ns: i64) -> Result<()> {
    let rows = upload_rows(&txn.open_table(UPLOAD_CHUNKS)?, id)?;
    if !keep_refs {
        for h in &rec.chunk_hashes {
            chunk_unref(txn, h, now_ns)?;
        }
        for r in &rows {
            chunk_unref(txn, &r.hash, now_ns)?;
        }
    }
    {
        let mut t = txn.open_table(UPLOAD_CHUNKS)?;
        for i in 0..rows.len() as u64 {
            t.remove(upload_chunk_key(id, i).as_str())?;
        }
    }
    txn.open_table(UPLOADS_BY_TIME)?
        .remove(time_key(rec.updated_ns, id.as_bytes()).as_slice())?;
    txn.open_table(UPLOADS)?.remove(id)?;
    Ok(())
}

/// Applies one operation. Operations check before they change anything, so a refused one
/// leaves the transaction as it was and the others in the batch still commit.
pub(crate) fn apply(txn: &Batch<'_>, op: Op) -> Result<Reply> {
    match op {
        Op::Custom(f) => f(txn),
        Op::ApplyInlineRecord { record } => super::replica::apply_record_in(txn, &record, &Default::default()),
        Op::PutFile { rec, blob } => {
            let old = txn
                .open_table(FILES)?
                .get(rec.key.as_str())?
                .map(|v| v.value().to_vec());
            let old: Option<FileRec> = old.map(|b| decode("file", &b)).transpose()?;
            let mut rec = rec;
            // The new reference first, so replacing a file with identical content never drops
            // the blob even for a moment.
            blob_ref_file(txn, &blob, rec.updated_ns)?;
            meta_add(txn, meta::LOGICAL_BYTES, rec.size as i64);
            if let Some(o) = &old {
                rec.created_ns = o.created_ns;
                blob_unref_file(txn, &o.blob_key, rec.updated_ns)?;
                meta_add(txn, meta::LOGICAL_BYTES, -(o.size as i64));
            } else {
                // Blob records are the store's own: the file count is what users listed.
                if !super::replica::is_internal_key(&rec.key) {
                    meta_add(txn, meta::FILE_COUNT, 1);
                }
                meta_add(txn, meta::FILE_GEN, 1);
            }
            txn.open_table(FILES)?
                .insert(rec.key.as_str(), rec.encode_to_vec().as_slice())?;
            tombstone_remove(txn, &rec.key)?;
            Ok(Reply::File(rec, old))
        }
        Op::DeleteFile { key, now_ns } => {
            let old = txn.open_table(FILES)?.get(key.as_str())?.map(|v| v.value().to_vec());
            let Some(old) = old else {
                return Err(BlobError::NotFound(format!("file '{key}' not found")));
            };
            let old: FileRec = decode("file", &old)?;
            txn.open_table(FILES)?.remove(key.as_str())?;
            blob_unref_file(txn, &old.blob_key, now_ns)?;
            if !super::replica::is_internal_key(&key) {
                meta_add(txn, meta::FILE_COUNT, -1);
            }
            meta_add(txn, meta::FILE_GEN, 1);
            meta_add(txn, meta::LOGICAL_BYTES, -(old.size as i64));
            let tomb = Tombstone {
                deleted_ns: now_ns,
                blob_key: old.blob_key.clone(),
                hlc: None,
            };
            tombstone_put(txn, &key, &tomb)?;
            Ok(Reply::Deleted(old))
        }
        Op::UpdateFile { key, patch, now_ns } => {
            let old = txn.open_table(FILES)?.get(key.as_str())?.map(|v| v.value().to_vec());
            let Some(old) = old else {
                return Err(BlobError::NotFound(format!("file '{key}' not found")));
            };
            let mut rec: FileRec = decode("file", &old)?;
            if patch.replace {
                rec.metadata = patch.set;
            } else {
                rec.metadata.extend(patch.set);
            }
            for k in &patch.remove {
                rec.metadata.remove(k);
            }
            crate::validate::metadata(&rec.metadata)?;
            if let Some(n) = patch.name {
                rec.name = n;
            }
            if let Some(ct) = patch.content_type {
                rec.content_type = ct;
            }
            // Time moves forward even if the clock does not.
            rec.updated_ns = now_ns.max(rec.updated_ns + 1);
            txn.open_table(FILES)?
                .insert(key.as_str(), rec.encode_to_vec().as_slice())?;
            Ok(Reply::File(rec, None))
        }
        Op::DeleteBlob { key, now_ns } => {
            let bytes = txn.open_table(BLOBS)?.get(&key[..])?.map(|v| v.value().to_vec());
            let Some(bytes) = bytes else {
                return Err(BlobError::NotFound(format!("blob {} not found", hex(&key))));
            };
            let mut rec: BlobRec = decode("blob", &bytes)?;
            if rec.file_refs > 0 {
                return Err(BlobError::FailedPrecondition(format!(
                    "blob {} is the content of {} file(s): delete those files first",
                    hex(&key),
                    rec.file_refs
                )));
            }
            if !rec.pinned {
                return Err(BlobError::NotFound(format!("blob {} not found", hex(&key))));
            }
            rec.pinned = false;
            meta_add(txn, meta::LOGICAL_BYTES, -(rec.size as i64));
            Ok(Reply::Freed(blob_drop_if_unused(txn, &key, &rec, now_ns)?))
        }
        Op::CreateUpload { id, rec } => {
            upload_put(txn, &id, &rec, None)?;
            Ok(Reply::Done)
        }
        Op::ClaimUpload { id, now_ns } => {
            let mut rec = get_upload(txn, &id)?;
            if !rec.chunk_hashes.is_empty() {
                return Err(BlobError::FailedPrecondition(format!(
                    "upload '{id}' was recorded by an older version and cannot be resumed: start a new upload"
                )));
            }
            let rows = upload_rows(&txn.open_table(UPLOAD_CHUNKS)?, &id)?;
            if rows.len() as u64 != rec.chunk_count {
                return Err(BlobError::Corrupt(format!(
                    "upload '{id}' records {} chunks but has {} rows",
                    rec.chunk_count,
                    rows.len()
                )));
            }
            let prev = rec.updated_ns;
            rec.session += 1;
            rec.updated_ns = now_ns;
            upload_put(txn, &id, &rec, Some(prev))?;
            Ok(Reply::Claimed(rec, rows))
        }
        Op::AppendUpload {
            id,
            session,
            offset,
            chunks,
            now_ns,
        } => {
            let mut rec = get_upload(txn, &id)?;
            if rec.session != session {
                return Err(stale(&id));
            }
            if rec.received != offset {
                return Err(BlobError::Aborted(format!(
                    "upload '{id}' has {} durable bytes but this append starts at {offset}",
                    rec.received
                )));
            }
            let prev = rec.updated_ns;
            for (c, cv) in &chunks {
                chunk_ref(txn, c)?;
                let row = UploadChunkRec {
                    hash: c.hash.to_vec(),
                    size: c.size,
                    cv: cv.to_vec(),
                };
                txn.open_table(UPLOAD_CHUNKS)?.insert(
                    upload_chunk_key(&id, rec.chunk_count).as_str(),
                    row.encode_to_vec().as_slice(),
                )?;
                rec.chunk_count += 1;
                rec.received += c.size as u64;
            }
            rec.updated_ns = now_ns;
            upload_put(txn, &id, &rec, Some(prev))?;
            Ok(Reply::Received(rec.received))
        }
        Op::CompleteUpload {
            id,
            session,
            blob,
            now_ns,
        } => {
            let rec = get_upload(txn, &id)?;
            if rec.session != session {
                return Err(stale(&id));
            }
            // The blob's chunks must start with exactly the recorded ones; the rest (the tail
            // not appended yet) get their references here.
            let rows = upload_rows(&txn.open_table(UPLOAD_CHUNKS)?, &id)?;
            let matches = rows.len() <= blob.chunks.len()
                && rows
                    .iter()
                    .zip(&blob.chunks)
                    .all(|(r, c)| r.hash.as_slice() == c.hash.as_slice() && r.size == c.size);
            if !matches || blob.size < rec.received {
                return Err(BlobError::Aborted(format!(
                    "upload '{id}' records {} chunks ({} bytes) that this completion does not start with",
                    rows.len(),
                    rec.received
                )));
            }
            for c in blob.chunks.get(rows.len()..).unwrap_or_default() {
                chunk_ref(txn, c)?;
            }
            remove_upload(txn, &id, &rec, true, now_ns)?;
            let existing = txn.open_table(BLOBS)?.get(&blob.key[..])?.map(|v| v.value().to_vec());
            let out = match existing {
                Some(bytes) => {
                    let mut b: BlobRec = decode("blob", &bytes)?;
                    if !b.pinned {
                        meta_add(txn, meta::LOGICAL_BYTES, blob.size as i64);
                    }
                    b.pinned = true;
                    txn.open_table(BLOBS)?
                        .insert(&blob.key[..], b.encode_to_vec().as_slice())?;
                    // The blob already holds its own references to these chunks.
                    for c in &blob.chunks {
                        chunk_unref(txn, &c.hash, now_ns)?;
                    }
                    b
                }
                None => {
                    let b = new_blob_rec(&blob, now_ns, 0, true);
                    txn.open_table(BLOBS)?
                        .insert(&blob.key[..], b.encode_to_vec().as_slice())?;
                    meta_add(txn, meta::BLOB_COUNT, 1);
                    meta_add(txn, meta::LOGICAL_BYTES, blob.size as i64);
                    b
                }
            };
            Ok(Reply::Blob(out))
        }
        Op::AddChunks { chunks, now_ns } => {
            let mut added = 0u64;
            for c in &chunks {
                let exists = txn.open_table(CHUNKS)?.get(&c.hash[..])?.is_some();
                if exists {
                    chunk_repair(txn, c)?;
                    continue;
                }
                let Some(loc) = c.loc else { continue };
                let rec = ChunkRec {
                    refs: 0,
                    size: c.size,
                    inline: false,
                    loc: Some(loc),
                };
                txn.open_table(CHUNKS)?
                    .insert(&c.hash[..], rec.encode_to_vec().as_slice())?;
                loc_add(txn, &loc, &c.hash, c.size)?;
                meta_add(txn, meta::STORAGE_USED, c.size as i64);
                meta_add(txn, meta::CHUNK_COUNT, 1);
                txn.open_table(GC)?.insert(&c.hash[..], now_ns)?;
                txn.open_table(GC_BY_TIME)?
                    .insert(time_key(now_ns, &c.hash).as_slice(), ())?;
                added += 1;
            }
            Ok(Reply::Freed(added))
        }
        Op::Relocate { moves } => {
            let (mut n, mut bytes) = (0, 0u64);
            for (hash, from, to) in moves {
                let cur = txn.open_table(CHUNKS)?.get(&hash[..])?.map(|v| v.value().to_vec());
                let Some(cur) = cur else { continue };
                let mut rec: ChunkRec = decode("chunk", &cur)?;
                if rec.loc != Some(from) {
                    // Collected or moved since the copy was made: the copy is dead bytes.
                    continue;
                }
                rec.loc = Some(to);
                txn.open_table(CHUNKS)?
                    .insert(&hash[..], rec.encode_to_vec().as_slice())?;
                loc_remove(txn, &from, rec.size)?;
                loc_add(txn, &to, &hash, rec.size)?;
                n += 1;
                bytes += rec.size as u64;
            }
            Ok(Reply::Moved(n, bytes))
        }
        Op::AbortUpload { id, session, now_ns } => {
            let rec = get_upload(txn, &id)?;
            if session.is_some_and(|s| s != rec.session) {
                return Err(stale(&id));
            }
            remove_upload(txn, &id, &rec, false, now_ns)?;
            Ok(Reply::Done)
        }
        Op::Gc {
            now_ns,
            grace_ns,
            expiry_ns,
            tombstone_expiry_ns,
            pinned,
        } => {
            let mut more = false;
            // Expire abandoned uploads first so their chunks join a later collection. Only
            // the due ones are read, oldest first, a bounded number per pass.
            let expired: Vec<String> = {
                let t = txn.open_table(UPLOADS_BY_TIME)?;
                let mut v = Vec::new();
                for e in t.iter()? {
                    let (k, _) = e?;
                    let Some((at, id)) = split_time_key(k.value()) else {
                        continue;
                    };
                    if now_ns.saturating_sub(at) <= expiry_ns {
                        break;
                    }
                    if v.len() == EXPIRE_BATCH {
                        more = true;
                        break;
                    }
                    v.push(String::from_utf8_lossy(id).into_owned());
                }
                v
            };
            for id in &expired {
                match get_upload(txn, id) {
                    Ok(rec) => remove_upload(txn, id, &rec, false, now_ns)?,
                    Err(BlobError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            // Tombstones past their expiry.
            let tombs: Vec<(Vec<u8>, String)> = {
                let t = txn.open_table(TOMBSTONES_BY_TIME)?;
                let mut v = Vec::new();
                for e in t.iter()? {
                    let (k, _) = e?;
                    let Some((at, key)) = split_time_key(k.value()) else {
                        continue;
                    };
                    if now_ns.saturating_sub(at) <= tombstone_expiry_ns {
                        break;
                    }
                    if v.len() == TOMBSTONE_BATCH {
                        more = true;
                        break;
                    }
                    v.push((k.value().to_vec(), String::from_utf8_lossy(key).into_owned()));
                }
                v
            };
            for (tk, key) in &tombs {
                txn.open_table(TOMBSTONES_BY_TIME)?.remove(tk.as_slice())?;
                txn.open_table(TOMBSTONES)?.remove(key.as_str())?;
            }
            // Chunks unreferenced for longer than the grace period, oldest first.
            let due: Vec<(Vec<u8>, [u8; 32])> = {
                let t = txn.open_table(GC_BY_TIME)?;
                let mut v = Vec::new();
                for e in t.iter()? {
                    let (k, _) = e?;
                    let Some((at, h)) = split_time_key(k.value()) else {
                        continue;
                    };
                    if now_ns.saturating_sub(at) <= grace_ns {
                        break;
                    }
                    if v.len() == GC_BATCH {
                        more = true;
                        break;
                    }
                    if let Ok(h) = <[u8; 32]>::try_from(h) {
                        v.push((k.value().to_vec(), h));
                    }
                }
                v
            };
            let mut files = Vec::new();
            let mut inline = 0;
            let mut holes = Vec::new();
            let mut bytes = 0u64;
            for (tk, hash) in due {
                if pinned.contains(&hash) {
                    // Being written or read: try again next pass (it stays queued).
                    continue;
                }
                let rec = txn.open_table(CHUNKS)?.get(&hash[..])?.map(|v| v.value().to_vec());
                txn.open_table(GC_BY_TIME)?.remove(tk.as_slice())?;
                txn.open_table(GC)?.remove(&hash[..])?;
                let Some(rec) = rec else { continue };
                let rec: ChunkRec = decode("chunk", &rec)?;
                if rec.refs > 0 {
                    continue;
                }
                txn.open_table(CHUNKS)?.remove(&hash[..])?;
                if rec.inline {
                    txn.open_table(INLINE)?.remove(&hash[..])?;
                    inline += 1;
                } else if let Some(l) = &rec.loc {
                    // Dead bytes in its segment from now on; compaction reclaims them.
                    loc_remove(txn, l, rec.size)?;
                    holes.push((hash, *l, rec.size));
                } else {
                    files.push((hash, rec.size as u64));
                }
                bytes += rec.size as u64;
                meta_add(txn, meta::STORAGE_USED, -(rec.size as i64));
                meta_add(txn, meta::CHUNK_COUNT, -1);
            }
            Ok(Reply::Collected {
                files,
                inline: inline + holes.len(),
                holes,
                bytes,
                expired: expired.len(),
                tombstones: tombs.len(),
                more,
            })
        }
    }
}

/// Counters read back after each commit.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counters {
    pub storage_used: u64,
    pub logical_bytes: u64,
    pub files: u64,
    pub blobs: u64,
    pub chunks: u64,
    pub file_gen: u64,
}

pub(crate) fn read_counters(db: &Database) -> Result<Counters> {
    use redb::ReadableDatabase;
    let txn = db.begin_read()?;
    let t = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Counters::default()),
        Err(e) => return Err(e.into()),
    };
    let get = |k: &str| -> Result<u64> { Ok(t.get(k)?.map(|v| v.value()).unwrap_or(0)) };
    Ok(Counters {
        storage_used: get(meta::STORAGE_USED)?,
        logical_bytes: get(meta::LOGICAL_BYTES)?,
        files: get(meta::FILE_COUNT)?,
        blobs: get(meta::BLOB_COUNT)?,
        chunks: get(meta::CHUNK_COUNT)?,
        file_gen: get(meta::FILE_GEN)?,
    })
}

/// Creates every table so read transactions never meet a missing one.
pub(crate) fn init_tables(db: &Database) -> Result<()> {
    let mut txn = db.begin_write()?;
    txn.open_table(FILES)?;
    txn.open_table(BLOBS)?;
    txn.open_table(CHUNKS)?;
    txn.open_table(INLINE)?;
    txn.open_table(UPLOADS)?;
    txn.open_table(TOMBSTONES)?;
    txn.open_table(GC)?;
    txn.open_table(GC_BY_TIME)?;
    txn.open_table(UPLOAD_CHUNKS)?;
    txn.open_table(UPLOADS_BY_TIME)?;
    txn.open_table(TOMBSTONES_BY_TIME)?;
    txn.open_table(META)?;
    txn.open_table(SEGMENT_LIVE)?;
    txn.open_table(SEGMENT_CHUNKS)?;
    txn.open_table(super::keys::API_KEYS)?;
    txn.open_table(super::keys::API_KEY_HASHES)?;
    build_time_indexes(&txn)?;
    txn.set_quick_repair(true);
    txn.commit()?;
    Ok(())
}

/// An index written before the time-ordered tables existed gets them built once.
fn build_time_indexes(txn: &WriteTransaction) -> Result<()> {
    if txn.open_table(GC_BY_TIME)?.is_empty()? {
        let entries: Vec<(Vec<u8>, i64)> = {
            let t = txn.open_table(GC)?;
            let mut v = Vec::new();
            for e in t.iter()? {
                let (k, at) = e?;
                v.push((k.value().to_vec(), at.value()));
            }
            v
        };
        let mut t = txn.open_table(GC_BY_TIME)?;
        for (h, at) in entries {
            t.insert(time_key(at, &h).as_slice(), ())?;
        }
    }
    if txn.open_table(UPLOADS_BY_TIME)?.is_empty()? {
        let entries: Vec<(String, i64)> = {
            let t = txn.open_table(UPLOADS)?;
            let mut v = Vec::new();
            for e in t.iter()? {
                let (k, val) = e?;
                let rec: UploadRec = decode("upload", val.value())?;
                v.push((k.value().to_string(), rec.updated_ns));
            }
            v
        };
        let mut t = txn.open_table(UPLOADS_BY_TIME)?;
        for (id, at) in entries {
            t.insert(time_key(at, id.as_bytes()).as_slice(), ())?;
        }
    }
    // Also rebuilt when the two disagree: replicated tombstones used to be stored without
    // their time entry, which kept them from ever being found due.
    if txn.open_table(TOMBSTONES_BY_TIME)?.len()? != txn.open_table(TOMBSTONES)?.len()? {
        txn.open_table(TOMBSTONES_BY_TIME)?.retain(|_, _| false)?;
        let entries: Vec<(String, i64)> = {
            let t = txn.open_table(TOMBSTONES)?;
            let mut v = Vec::new();
            for e in t.iter()? {
                let (k, val) = e?;
                let rec: Tombstone = decode("tombstone", val.value())?;
                v.push((k.value().to_string(), rec.deleted_ns));
            }
            v
        };
        let mut t = txn.open_table(TOMBSTONES_BY_TIME)?;
        for (key, at) in entries {
            t.insert(time_key(at, key.as_bytes()).as_slice(), ())?;
        }
    }
    Ok(())
}
