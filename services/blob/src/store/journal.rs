//! The index journal: how a batch of small puts becomes durable with one append and one
//! `fdatasync` instead of a durable index commit.
//!
//! Journaled: puts of inline content (objects up to 64 KiB, kept inside the index) and
//! replicated records carrying such content (`Op::ApplyInlineRecord`, what a replica applies
//! for a small write), each entry one kind or the other.
//!
//! A durable redb commit with quick repair costs two fsyncs plus one page write per dirty
//! B-tree page — about fifty `pwrite`s for ten 4 KiB puts, whose hash-keyed rows land on random
//! pages. So a batch whose every operation is a put of inline content (the small objects that
//! live inside the index) is instead appended to `index.journal` as one checksummed entry and
//! fdatasynced; its index transaction then commits with `Durability::None` (in memory and the
//! page cache, visible to readers at once). Any other batch commits durably, which persists
//! every earlier non-durable commit too (redb's contract), and then the journal is emptied.
//! A batch also commits durably once the journal holds [`CHECKPOINT_BYTES`], so a restart never
//! replays more than that.
//!
//! The file is written once with zeros to [`PREALLOC_BYTES`] and then only overwritten: emptying
//! it after a durable commit just starts again at offset 0. An overwrite of blocks that exist
//! needs no file-system journal commit, so each `fdatasync` flushes just the entry — and does
//! not drag along the index file's own dirty pages, which an ext4 journal commit (data=ordered)
//! would write out first.
//!
//! Every commit records the last journal sequence number it covers in the `meta` table. After
//! a crash redb opens at its last durable commit; the entries after the number recorded there
//! are applied again, in order, in one durable transaction, before the store serves. The apply
//! of a put is deterministic given the index state and the operation (timestamps travel in the
//! record), so the replay rebuilds exactly what was acknowledged.
//!
//! Entry format: `len: u32 LE | check: 8 bytes (BLAKE3 of the payload) | payload` where the
//! payload is a protobuf [`Entry`]. Reading stops at the first short, unverifiable or
//! out-of-sequence entry: a torn tail (never acknowledged, since acks follow the fdatasync),
//! zeros, or older entries that the current run has not overwritten yet.

use std::{collections::HashMap, path::Path, sync::Arc};

use bytes::Bytes;
use prost::Message;
use redb::{Database, ReadableTable, WriteTransaction};

use super::{
    disk::{Disk, SegmentFile},
    index::{self, ChunkMeta, NewBlob, Op},
    records::FileRec,
};
use crate::error::{BlobError, Result};

/// Journal bytes after which the next batch commits durably and the journal starts over.
const CHECKPOINT_BYTES: u64 = 1024 * 1024;
/// The journal file's size, written once (entries past it extend the file, more slowly).
const PREALLOC_BYTES: u64 = 2 * CHECKPOINT_BYTES;
/// The `meta` row holding the last journal sequence number an index commit covers.
const META_SEQ: &str = "journal_seq";
/// Header of each entry: length and check.
const HEADER: usize = 12;

#[derive(Clone, PartialEq, prost::Message)]
struct Entry {
    #[prost(uint64, tag = "1")]
    seq: u64,
    #[prost(message, repeated, tag = "2")]
    puts: Vec<PutEntry>,
    /// Replicated records with inline content, applied if newer. An entry holds puts or
    /// records, never both, so each replays in the order it was applied.
    #[prost(message, repeated, tag = "3")]
    records: Vec<peervault_proto::v1::FileRecord>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PutEntry {
    #[prost(message, optional, tag = "1")]
    rec: Option<FileRec>,
    #[prost(bytes = "vec", tag = "2")]
    blob_key: Vec<u8>,
    #[prost(uint64, tag = "3")]
    size: u64,
    #[prost(string, tag = "4")]
    content_type: String,
    #[prost(map = "string, string", tag = "5")]
    attributes: HashMap<String, String>,
    #[prost(message, repeated, tag = "6")]
    chunks: Vec<InlineChunk>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct InlineChunk {
    #[prost(bytes = "vec", tag = "1")]
    hash: Vec<u8>,
    #[prost(bytes = "bytes", tag = "2")]
    data: Bytes,
}

/// Whether an operation can be made durable through the journal: a file put whose every
/// chunk is inline content (nothing on disk outside the index to depend on).
fn journalable(op: &Op) -> bool {
    match op {
        Op::ApplyInlineRecord { .. } => true,
        Op::PutFile { blob, .. } => blob
            .chunks
            .iter()
            .all(|c| c.inline.as_ref().is_some_and(|d| d.len() == c.size as usize) && c.loc.is_none() && !c.repair),
        _ => false,
    }
}

fn put_entry(op: &Op) -> Option<PutEntry> {
    let Op::PutFile { rec, blob } = op else { return None };
    Some(PutEntry {
        rec: Some(rec.clone()),
        blob_key: blob.key.to_vec(),
        size: blob.size,
        content_type: blob.content_type.clone(),
        attributes: blob.attributes.clone(),
        chunks: blob
            .chunks
            .iter()
            .map(|c| InlineChunk {
                hash: c.hash.to_vec(),
                data: c.inline.clone().unwrap_or_default(),
            })
            .collect(),
    })
}

fn put_op(p: PutEntry) -> Result<Op> {
    let bad = |what: &str| BlobError::Corrupt(format!("index journal entry: {what}"));
    let rec = p.rec.ok_or_else(|| bad("put without a file record"))?;
    let key = <[u8; 32]>::try_from(p.blob_key.as_slice()).map_err(|_| bad("blob key"))?;
    let mut chunks = Vec::with_capacity(p.chunks.len());
    for c in p.chunks {
        let hash = <[u8; 32]>::try_from(c.hash.as_slice()).map_err(|_| bad("chunk hash"))?;
        let size = u32::try_from(c.data.len()).map_err(|_| bad("chunk size"))?;
        let mut m = ChunkMeta::new(hash, size);
        m.inline = Some(c.data);
        chunks.push(m);
    }
    Ok(Op::PutFile {
        rec,
        blob: NewBlob {
            key,
            size: p.size,
            chunks,
            content_type: p.content_type,
            attributes: p.attributes,
        },
    })
}

fn check(payload: &[u8]) -> [u8; 8] {
    let h = blake3::hash(payload);
    let mut c = [0u8; 8];
    c.copy_from_slice(&h.as_bytes()[..8]);
    c
}

/// An encoded entry with its header; `None` past 4 GiB (the batch then commits durably).
fn frame(entry: &Entry) -> Option<Vec<u8>> {
    let payload = entry.encode_to_vec();
    let len = u32::try_from(payload.len()).ok()?;
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&check(&payload));
    out.extend_from_slice(&payload);
    Some(out)
}

/// The entries of a journal's bytes that follow `after`, in order: the valid, contiguous run.
fn parse(buf: &[u8], after: u64) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let mut expect: Option<u64> = None;
    while let Some(head) = buf.get(pos..pos + HEADER) {
        let mut len = [0u8; 4];
        len.copy_from_slice(&head[..4]);
        let len = u32::from_le_bytes(len) as usize;
        let Some(payload) = buf.get(pos + HEADER..pos + HEADER + len) else {
            break; // torn tail
        };
        if head[4..] != check(payload) {
            break;
        }
        let e = Entry::decode(payload).map_err(|e| BlobError::Corrupt(format!("index journal entry: {e}")))?;
        match expect {
            Some(n) if e.seq != n => break, // old bytes past a truncation
            _ => {}
        }
        expect = Some(e.seq + 1);
        if e.seq > after {
            if out.is_empty() && e.seq != after + 1 {
                break; // a gap: not the continuation of this index
            }
            out.push(e);
        }
        pos += HEADER + len;
    }
    Ok(out)
}

/// The last journal sequence number an index commit covers.
fn covered_seq(txn: &WriteTransaction) -> Result<u64> {
    Ok(txn
        .open_table(index::META)?
        .get(META_SEQ)?
        .map(|v| v.value())
        .unwrap_or(0))
}

/// Records in `txn` that it covers the journal up to `seq`.
pub(crate) fn set_covered(txn: &WriteTransaction, seq: u64) -> Result<()> {
    txn.open_table(index::META)?.insert(META_SEQ, seq)?;
    Ok(())
}

/// The journal file, owned by the committer thread.
pub(crate) struct Journal {
    file: Arc<dyn SegmentFile>,
    /// Where the next entry goes.
    len: u64,
    /// The last sequence number written (or covered by the index).
    seq: u64,
    /// An append or a cut failed: no journaling until a durable commit empties it.
    broken: bool,
}

/// What opening the journal did.
pub(crate) struct Replayed {
    /// Entries applied again.
    pub entries: usize,
    /// Puts in them.
    pub puts: usize,
}

impl Journal {
    /// Opens (or creates) `root/index.journal`, applies the entries the index's durable state
    /// lacks in one durable transaction, and empties the journal. Blocking.
    pub(crate) fn open(disk: &dyn Disk, root: &Path, db: &Database) -> Result<(Journal, Replayed)> {
        let path = root.join("index.journal");
        let file = match disk.open_segment(&path, false) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let f = disk
                    .open_segment(&path, true)
                    .map_err(|e| BlobError::io(format!("create {}", path.display()), e))?;
                // The name is durable before any entry in the file is acknowledged.
                disk.sync_dir(root)
                    .map_err(|e| BlobError::io(format!("fsync {}", root.display()), e))?;
                f
            }
            Err(e) => return Err(BlobError::io(format!("open {}", path.display()), e)),
        };
        let len = file
            .len()
            .map_err(|e| BlobError::io(format!("stat {}", path.display()), e))?;
        let mut buf = vec![0u8; usize::try_from(len).map_err(|_| BlobError::Corrupt("index journal size".into()))?];
        file.read_at(0, &mut buf)
            .map_err(|e| BlobError::io(format!("read {}", path.display()), e))?;
        let mut txn = db.begin_write()?;
        txn.set_quick_repair(true);
        let covered = covered_seq(&txn)?;
        let entries = parse(&buf, covered)?;
        let commit = !entries.is_empty();
        let mut replayed = Replayed {
            entries: entries.len(),
            puts: 0,
        };
        let mut seq = covered;
        let batch = index::Batch::new(&txn);
        for e in entries {
            seq = e.seq;
            let ops = e
                .puts
                .into_iter()
                .map(put_op)
                .chain(e.records.into_iter().map(|record| Ok(Op::ApplyInlineRecord { record })));
            for op in ops {
                replayed.puts += 1;
                // A refusal now was a refusal then (the apply is deterministic): only a
                // storage failure stops the replay.
                if let Err(e) = index::apply(&batch, op?)
                    && super::committer::aborts(&e)
                {
                    return Err(e);
                }
            }
        }
        batch.finish()?;
        if commit {
            set_covered(&txn, seq)?;
            txn.commit()?;
        } else {
            // Nothing to apply: no commit (and no fsyncs) at start-up.
            txn.abort()?;
        }
        if len < PREALLOC_BYTES {
            // Not fatal: a store on a full volume must still start (to serve and delete); the
            // journal then grows by appending, and an append that fails makes its batch wait
            // for a durable commit instead.
            let zeros = vec![0u8; (PREALLOC_BYTES - len) as usize];
            if let Err(e) = file.write_at(len, &zeros).and_then(|()| file.sync_data()) {
                tracing::warn!(path = %path.display(), error = %e, "cannot preallocate the index journal; appends will grow it");
            }
        }
        // Everything in the file is covered now: the next entry goes at the start.
        Ok((
            Journal {
                file,
                len: 0,
                seq,
                broken: false,
            },
            replayed,
        ))
    }

    /// The entry for a batch, if every operation in it can go through the journal and the
    /// journal has room; `None`: the batch commits durably.
    pub(crate) fn entry_for(&self, ops: &[Op]) -> Option<(u64, Vec<u8>)> {
        if self.broken || self.len >= CHECKPOINT_BYTES || ops.is_empty() || !ops.iter().all(journalable) {
            return None;
        }
        let records: Vec<peervault_proto::v1::FileRecord> = ops
            .iter()
            .filter_map(|op| match op {
                Op::ApplyInlineRecord { record } => Some(record.clone()),
                _ => None,
            })
            .collect();
        if !records.is_empty() && records.len() != ops.len() {
            return None; // puts and records mixed: one entry could not keep their order
        }
        let seq = self.seq + 1;
        let entry = Entry {
            seq,
            puts: ops.iter().filter_map(put_entry).collect(),
            records,
        };
        Some((seq, frame(&entry)?))
    }

    /// The sequence number the next durable commit covers.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// Appends an entry made by [`Journal::entry_for`] and makes it durable. On failure the
    /// entry is cut off again (so it can never be replayed) and the journal stays unused until
    /// a durable commit empties it.
    pub(crate) fn append(&mut self, seq: u64, entry: &[u8]) -> std::io::Result<()> {
        let at = self.len;
        let r = self.file.write_at(at, entry).and_then(|()| self.file.sync_data());
        match r {
            Ok(()) => {
                self.len += entry.len() as u64;
                self.seq = seq;
                Ok(())
            }
            Err(e) => {
                // The number is used up: if the cut fails too, the next durable commit covers
                // it, so a replay skips whatever of the entry reached the disk.
                self.seq = seq;
                self.cut(at);
                Err(e)
            }
        }
    }

    /// Takes back the entry just appended (its index commit failed), so a replay never
    /// applies what the caller was told failed.
    pub(crate) fn unappend(&mut self, entry_len: usize) {
        // The sequence number stays used up (see `append`).
        let at = self.len.saturating_sub(entry_len as u64);
        self.cut(at);
    }

    /// Ends the journal at `at`: zeros over the header there make the entry unreadable (and
    /// with it everything after it).
    fn cut(&mut self, at: u64) {
        match self
            .file
            .write_at(at, &[0u8; HEADER])
            .and_then(|()| self.file.sync_data())
        {
            Ok(()) => self.len = at,
            Err(e) => {
                tracing::error!(error = %e, "cannot cut the index journal; small puts commit durably until it is emptied");
            }
        }
        // Durable commits from now until one empties the journal: an entry that could not be
        // cut must be covered by the index before anything is appended after it.
        self.broken = true;
    }

    /// Empties the journal after a durable commit covered everything in it: the next entry
    /// goes at the start (what is left after it is older and stops a replay).
    pub(crate) fn reset(&mut self) {
        self.len = 0;
        self.broken = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(seq: u64) -> Vec<u8> {
        frame(&Entry {
            seq,
            puts: vec![],
            records: vec![],
        })
        .unwrap()
    }

    #[test]
    fn parse_keeps_the_contiguous_run_after_the_covered_number() {
        let mut buf = Vec::new();
        for s in 5..=9 {
            buf.extend(framed(s));
        }
        let seqs = |after| parse(&buf, after).unwrap().iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(6), vec![7, 8, 9]);
        assert_eq!(seqs(9), Vec::<u64>::new());
        // A gap between the index and the journal: nothing of it belongs to this index.
        assert_eq!(seqs(2), Vec::<u64>::new());
    }

    #[test]
    fn parse_stops_at_a_torn_or_stale_tail() {
        let mut buf = Vec::new();
        buf.extend(framed(1));
        buf.extend(framed(2));
        let whole = buf.len();
        // Old bytes past a truncation that did not reach the disk.
        buf.extend(framed(40));
        assert_eq!(parse(&buf, 0).unwrap().len(), 2);
        buf.truncate(whole);
        // A torn entry: short, then with a flipped byte.
        let mut torn = framed(3);
        buf.extend_from_slice(&torn[..torn.len() - 1]);
        assert_eq!(parse(&buf, 0).unwrap().len(), 2);
        buf.truncate(whole);
        let last = torn.len() - 1;
        torn[last] ^= 1;
        buf.extend(torn);
        assert_eq!(parse(&buf, 0).unwrap().len(), 2);
    }
}
