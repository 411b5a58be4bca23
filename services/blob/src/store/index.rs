//! The index: redb tables, the operations that change them, and the committer thread that
//! applies concurrent operations in one transaction (group commit: one fsync for many writes).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Instant,
};

use bytes::Bytes;
use prost::Message;
use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use super::records::{BlobRec, ChunkRec, FileRec, Tombstone, UploadRec, decode};
use crate::error::{BlobError, Result};

pub(crate) const FILES: TableDefinition<&str, &[u8]> = TableDefinition::new("files");
pub(crate) const BLOBS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blobs");
pub(crate) const CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunks");
pub(crate) const INLINE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("inline_chunks");
pub(crate) const UPLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("uploads");
pub(crate) const TOMBSTONES: TableDefinition<&str, &[u8]> = TableDefinition::new("tombstones");
/// Chunks whose reference count reached zero, with the time it did (ns since the epoch).
pub(crate) const GC: TableDefinition<&[u8], i64> = TableDefinition::new("gc_queue");
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Counters kept in [`META`].
pub(crate) mod meta {
    pub const STORAGE_USED: &str = "storage_used";
    pub const LOGICAL_BYTES: &str = "logical_bytes";
    pub const FILE_COUNT: &str = "file_count";
    pub const BLOB_COUNT: &str = "blob_count";
    pub const CHUNK_COUNT: &str = "chunk_count";
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
    AppendUpload {
        id: String,
        chunk: ChunkMeta,
        now_ns: i64,
    },
    CompleteUpload {
        id: String,
        blob: NewBlob,
        now_ns: i64,
    },
    AbortUpload {
        id: String,
        now_ns: i64,
    },
    Gc {
        now_ns: i64,
        grace_ns: i64,
        expiry_ns: i64,
        pinned: HashSet<[u8; 32]>,
    },
    /// An operation composed elsewhere in the store (replica: apply a record if newer) from
    /// [`apply`] and the tables, committed in the same batches as everything else.
    Custom(CustomOp),
}

/// The body of [`Op::Custom`].
pub(crate) type CustomOp = Box<dyn FnOnce(&WriteTransaction) -> Result<Reply> + Send>;

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
    /// Collected chunk files to unlink (hash, bytes), and uploads expired.
    Collected {
        files: Vec<([u8; 32], u64)>,
        inline: usize,
        bytes: u64,
        expired: usize,
    },
    /// A replicated record: whether it was applied, and the live file it replaced.
    Applied(bool, Option<FileRec>),
    Done,
}

/// A job's reply channel and its outcome, sent once the batch has committed.
type Answer = (oneshot::Sender<Result<Reply>>, Result<Reply>);

pub(crate) struct Job {
    pub op: Op,
    pub reply: oneshot::Sender<Result<Reply>>,
}

fn meta_add(txn: &WriteTransaction, name: &str, delta: i64) -> Result<()> {
    let mut t = txn.open_table(META)?;
    let cur = t.get(name)?.map(|v| v.value()).unwrap_or(0);
    let next = if delta >= 0 {
        cur.saturating_add(delta as u64)
    } else {
        cur.saturating_sub(delta.unsigned_abs())
    };
    t.insert(name, next)?;
    Ok(())
}

/// Adds one reference to a chunk, creating its record (and inline data) if new.
fn chunk_ref(txn: &WriteTransaction, c: &ChunkMeta) -> Result<()> {
    let mut chunks = txn.open_table(CHUNKS)?;
    let existing = chunks.get(&c.hash[..])?.map(|v| v.value().to_vec());
    match existing {
        Some(bytes) => {
            let mut rec: ChunkRec = decode("chunk", &bytes)?;
            if rec.refs == 0 {
                txn.open_table(GC)?.remove(&c.hash[..])?;
            }
            rec.refs += 1;
            chunks.insert(&c.hash[..], rec.encode_to_vec().as_slice())?;
        }
        None => {
            let rec = ChunkRec {
                refs: 1,
                size: c.size,
                inline: c.inline.is_some(),
            };
            chunks.insert(&c.hash[..], rec.encode_to_vec().as_slice())?;
            if let Some(data) = &c.inline {
                txn.open_table(INLINE)?.insert(&c.hash[..], data.as_ref())?;
            }
            drop(chunks);
            meta_add(txn, meta::STORAGE_USED, c.size as i64)?;
            meta_add(txn, meta::CHUNK_COUNT, 1)?;
        }
    }
    Ok(())
}

/// Drops one reference to a chunk; at zero it waits in the GC queue for the grace period.
fn chunk_unref(txn: &WriteTransaction, hash: &[u8], now_ns: i64) -> Result<()> {
    let mut chunks = txn.open_table(CHUNKS)?;
    let Some(bytes) = chunks.get(hash)?.map(|v| v.value().to_vec()) else {
        return Err(BlobError::Corrupt(format!("unref of unknown chunk {}", hex(hash))));
    };
    let mut rec: ChunkRec = decode("chunk", &bytes)?;
    rec.refs = rec.refs.saturating_sub(1);
    chunks.insert(hash, rec.encode_to_vec().as_slice())?;
    if rec.refs == 0 {
        txn.open_table(GC)?.insert(hash, now_ns)?;
    }
    Ok(())
}

/// Adds a file reference to a blob, creating it (and its chunk references) if new.
fn blob_ref_file(txn: &WriteTransaction, b: &NewBlob, now_ns: i64) -> Result<()> {
    let mut blobs = txn.open_table(BLOBS)?;
    let existing = blobs.get(&b.key[..])?.map(|v| v.value().to_vec());
    match existing {
        Some(bytes) => {
            let mut rec: BlobRec = decode("blob", &bytes)?;
            rec.file_refs += 1;
            blobs.insert(&b.key[..], rec.encode_to_vec().as_slice())?;
        }
        None => {
            let rec = new_blob_rec(b, now_ns, 1, false);
            blobs.insert(&b.key[..], rec.encode_to_vec().as_slice())?;
            drop(blobs);
            for c in &b.chunks {
                chunk_ref(txn, c)?;
            }
            meta_add(txn, meta::BLOB_COUNT, 1)?;
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
fn blob_drop_if_unused(txn: &WriteTransaction, key: &[u8], rec: &BlobRec, now_ns: i64) -> Result<u64> {
    if rec.file_refs > 0 || rec.pinned {
        txn.open_table(BLOBS)?.insert(key, rec.encode_to_vec().as_slice())?;
        return Ok(0);
    }
    txn.open_table(BLOBS)?.remove(key)?;
    for h in &rec.chunk_hashes {
        chunk_unref(txn, h, now_ns)?;
    }
    meta_add(txn, meta::BLOB_COUNT, -1)?;
    Ok(rec.size)
}

/// Drops one file reference from a blob.
fn blob_unref_file(txn: &WriteTransaction, key: &[u8], now_ns: i64) -> Result<()> {
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

fn get_upload(txn: &WriteTransaction, id: &str) -> Result<UploadRec> {
    let bytes = txn.open_table(UPLOADS)?.get(id)?.map(|v| v.value().to_vec());
    match bytes {
        Some(b) => decode("upload", &b),
        None => Err(BlobError::NotFound(format!(
            "upload '{id}' is unknown or expired: start a new upload"
        ))),
    }
}

fn release_upload(txn: &WriteTransaction, id: &str, rec: &UploadRec, now_ns: i64) -> Result<()> {
    for h in &rec.chunk_hashes {
        chunk_unref(txn, h, now_ns)?;
    }
    txn.open_table(UPLOADS)?.remove(id)?;
    Ok(())
}

/// Applies one operation. Operations check before they change anything, so a refused one
/// leaves the transaction as it was and the others in the batch still commit.
pub(crate) fn apply(txn: &WriteTransaction, op: Op) -> Result<Reply> {
    match op {
        Op::Custom(f) => f(txn),
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
            meta_add(txn, meta::LOGICAL_BYTES, rec.size as i64)?;
            if let Some(o) = &old {
                rec.created_ns = o.created_ns;
                blob_unref_file(txn, &o.blob_key, rec.updated_ns)?;
                meta_add(txn, meta::LOGICAL_BYTES, -(o.size as i64))?;
            } else {
                meta_add(txn, meta::FILE_COUNT, 1)?;
            }
            txn.open_table(FILES)?
                .insert(rec.key.as_str(), rec.encode_to_vec().as_slice())?;
            txn.open_table(TOMBSTONES)?.remove(rec.key.as_str())?;
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
            meta_add(txn, meta::FILE_COUNT, -1)?;
            meta_add(txn, meta::LOGICAL_BYTES, -(old.size as i64))?;
            let tomb = Tombstone {
                deleted_ns: now_ns,
                blob_key: old.blob_key.clone(),
                hlc: None,
            };
            txn.open_table(TOMBSTONES)?
                .insert(key.as_str(), tomb.encode_to_vec().as_slice())?;
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
            meta_add(txn, meta::LOGICAL_BYTES, -(rec.size as i64))?;
            Ok(Reply::Freed(blob_drop_if_unused(txn, &key, &rec, now_ns)?))
        }
        Op::CreateUpload { id, rec } => {
            txn.open_table(UPLOADS)?
                .insert(id.as_str(), rec.encode_to_vec().as_slice())?;
            Ok(Reply::Done)
        }
        Op::AppendUpload { id, chunk, now_ns } => {
            let mut rec = get_upload(txn, &id)?;
            chunk_ref(txn, &chunk)?;
            rec.chunk_hashes.push(chunk.hash.to_vec());
            rec.chunk_sizes.push(chunk.size);
            rec.received += chunk.size as u64;
            rec.updated_ns = now_ns;
            txn.open_table(UPLOADS)?
                .insert(id.as_str(), rec.encode_to_vec().as_slice())?;
            Ok(Reply::Received(rec.received))
        }
        Op::CompleteUpload { id, blob, now_ns } => {
            let rec = get_upload(txn, &id)?;
            // The last (partial) chunk was not appended yet; everything before it was.
            let appended = rec.chunk_hashes.len();
            let last = &blob.chunks[appended..];
            for c in last {
                chunk_ref(txn, c)?;
            }
            txn.open_table(UPLOADS)?.remove(id.as_str())?;
            let existing = txn.open_table(BLOBS)?.get(&blob.key[..])?.map(|v| v.value().to_vec());
            let out = match existing {
                Some(bytes) => {
                    let mut b: BlobRec = decode("blob", &bytes)?;
                    if !b.pinned {
                        meta_add(txn, meta::LOGICAL_BYTES, blob.size as i64)?;
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
                    meta_add(txn, meta::BLOB_COUNT, 1)?;
                    meta_add(txn, meta::LOGICAL_BYTES, blob.size as i64)?;
                    b
                }
            };
            Ok(Reply::Blob(out))
        }
        Op::AbortUpload { id, now_ns } => {
            let rec = get_upload(txn, &id)?;
            release_upload(txn, &id, &rec, now_ns)?;
            Ok(Reply::Done)
        }
        Op::Gc {
            now_ns,
            grace_ns,
            expiry_ns,
            pinned,
        } => {
            // Expire abandoned uploads first so their chunks join this or a later collection.
            let expired: Vec<(String, UploadRec)> = {
                let t = txn.open_table(UPLOADS)?;
                let mut v = Vec::new();
                for e in t.iter()? {
                    let (k, val) = e?;
                    let rec: UploadRec = decode("upload", val.value())?;
                    if now_ns - rec.updated_ns > expiry_ns {
                        v.push((k.value().to_string(), rec));
                    }
                }
                v
            };
            for (id, rec) in &expired {
                release_upload(txn, id, rec, now_ns)?;
            }
            let due: Vec<Vec<u8>> = {
                let t = txn.open_table(GC)?;
                let mut v = Vec::new();
                for e in t.iter()? {
                    let (k, since) = e?;
                    if now_ns - since.value() > grace_ns {
                        v.push(k.value().to_vec());
                    }
                }
                v
            };
            let mut files = Vec::new();
            let mut inline = 0;
            let mut bytes = 0u64;
            for h in due {
                let Ok(hash) = <[u8; 32]>::try_from(h.as_slice()) else {
                    txn.open_table(GC)?.remove(h.as_slice())?;
                    continue;
                };
                if pinned.contains(&hash) {
                    continue;
                }
                let rec = txn.open_table(CHUNKS)?.get(&hash[..])?.map(|v| v.value().to_vec());
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
                } else {
                    files.push((hash, rec.size as u64));
                }
                bytes += rec.size as u64;
                meta_add(txn, meta::STORAGE_USED, -(rec.size as i64))?;
                meta_add(txn, meta::CHUNK_COUNT, -1)?;
            }
            Ok(Reply::Collected {
                files,
                inline,
                bytes,
                expired: expired.len(),
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
    })
}

/// Creates every table so read transactions never meet a missing one.
pub(crate) fn init_tables(db: &Database) -> Result<()> {
    let txn = db.begin_write()?;
    txn.open_table(FILES)?;
    txn.open_table(BLOBS)?;
    txn.open_table(CHUNKS)?;
    txn.open_table(INLINE)?;
    txn.open_table(UPLOADS)?;
    txn.open_table(TOMBSTONES)?;
    txn.open_table(GC)?;
    txn.open_table(META)?;
    txn.open_table(super::keys::API_KEYS)?;
    txn.open_table(super::keys::API_KEY_HASHES)?;
    txn.commit()?;
    Ok(())
}

/// Most operations folded into one transaction.
const MAX_BATCH: usize = 256;

/// Runs the committer on its own thread until every sender is gone. Each batch is one durable
/// transaction; `after_commit` sees the counters after each one.
pub(crate) fn spawn_committer(
    db: Arc<Database>,
    mut rx: mpsc::Receiver<Job>,
    metrics: crate::metrics::BlobMetrics,
    after_commit: impl Fn(Counters) + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("blob-committer".into())
        .spawn(move || {
            let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
            while let Some(first) = rx.blocking_recv() {
                batch.push(first);
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(j) => batch.push(j),
                        Err(_) => break,
                    }
                }
                let started = Instant::now();
                metrics.commit_batch.observe(batch.len() as f64);
                let outcome = (|| -> Result<Vec<Answer>> {
                    let txn = db.begin_write()?;
                    let mut replies = Vec::with_capacity(batch.len());
                    for job in batch.drain(..) {
                        match apply(&txn, job.op) {
                            // Storage-level failures may strike half-way through an operation, so
                            // they abort the whole transaction; refusals change nothing and do not.
                            Err(e @ (BlobError::Index(_) | BlobError::Corrupt(_) | BlobError::Io { .. })) => {
                                return Err(e);
                            }
                            r => replies.push((job.reply, r)),
                        }
                    }
                    txn.commit()?;
                    Ok(replies)
                })();
                metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
                match outcome {
                    Ok(replies) => {
                        // Counters first, so a caller that sees its reply also sees its effect.
                        match read_counters(&db) {
                            Ok(c) => after_commit(c),
                            Err(e) => tracing::error!(error = %e, "cannot read index counters"),
                        }
                        for (tx, r) in replies {
                            let _ = tx.send(r);
                        }
                    }
                    Err(e) => {
                        // Every job of the batch sees its reply channel closed and answers UNAVAILABLE.
                        tracing::error!(error = %e, "index commit failed; the batch is refused");
                        batch.clear();
                    }
                }
            }
        })
}
