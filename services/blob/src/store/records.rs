//! Records kept in the index, encoded with protobuf (prost derive) so fields can be added later
//! without a migration.

use std::collections::HashMap;

use crate::error::{BlobError, Result};

/// Decodes a stored record; a record that does not decode is a corrupt index (`what` names it).
pub(crate) fn decode<M: prost::Message + Default>(what: &str, bytes: &[u8]) -> Result<M> {
    M::decode(bytes).map_err(|e| BlobError::Corrupt(format!("{what}: {e}")))
}

/// A file: a user key pointing at a blob, plus its descriptive fields.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FileRec {
    /// The user key.
    #[prost(string, tag = "1")]
    pub key: String,
    /// The blob (BLAKE3 of the content).
    #[prost(bytes = "vec", tag = "2")]
    pub blob_key: Vec<u8>,
    /// Content length in bytes.
    #[prost(uint64, tag = "3")]
    pub size: u64,
    /// MIME type.
    #[prost(string, tag = "4")]
    pub content_type: String,
    /// Display name.
    #[prost(string, tag = "5")]
    pub name: String,
    /// User metadata.
    #[prost(map = "string, string", tag = "6")]
    pub metadata: HashMap<String, String>,
    /// Creation time, nanoseconds since the epoch.
    #[prost(int64, tag = "7")]
    pub created_ns: i64,
    /// Last change time, nanoseconds since the epoch.
    #[prost(int64, tag = "8")]
    pub updated_ns: i64,
    /// Hybrid logical clock of the write that produced this record (replication: the newer
    /// record wins). Unset (zero) on records written before replication existed.
    #[prost(message, optional, tag = "9")]
    pub hlc: Option<Hlc>,
}

/// A hybrid logical clock reading as stored in the index: ordered by physical time, then the
/// logical counter, then the writing pod's id.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct Hlc {
    /// Wall-clock milliseconds since the epoch.
    #[prost(uint64, tag = "1")]
    pub physical_ms: u64,
    /// Counter within one millisecond.
    #[prost(uint32, tag = "2")]
    pub logical: u32,
    /// Id of the pod that made the reading.
    #[prost(string, tag = "3")]
    pub node_id: String,
}

/// A blob: content as an ordered list of chunks.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BlobRec {
    /// Content length in bytes.
    #[prost(uint64, tag = "1")]
    pub size: u64,
    /// Chunk hashes in content order (a chunk may repeat).
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub chunk_hashes: Vec<Vec<u8>>,
    /// Chunk lengths in content order.
    #[prost(uint32, repeated, tag = "3")]
    pub chunk_sizes: Vec<u32>,
    /// MIME type given at upload.
    #[prost(string, tag = "4")]
    pub content_type: String,
    /// Attributes given at upload.
    #[prost(map = "string, string", tag = "5")]
    pub attributes: HashMap<String, String>,
    /// Creation time, nanoseconds since the epoch.
    #[prost(int64, tag = "6")]
    pub created_ns: i64,
    /// Files pointing at this blob.
    #[prost(uint64, tag = "7")]
    pub file_refs: u64,
    /// Uploaded directly (UploadService): kept until DeleteBlob even without files.
    #[prost(bool, tag = "8")]
    pub pinned: bool,
}

/// A stored chunk's bookkeeping.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ChunkRec {
    /// References from blobs and uploads in progress.
    #[prost(uint64, tag = "1")]
    pub refs: u64,
    /// Length in bytes.
    #[prost(uint32, tag = "2")]
    pub size: u32,
    /// Stored in the index rather than as a file.
    #[prost(bool, tag = "3")]
    pub inline: bool,
    /// Where the chunk's bytes are in a segment file (`None`: a per-chunk file under
    /// `chunks/`, as written before segments and by replica writes, or inline).
    #[prost(message, optional, tag = "4")]
    pub loc: Option<SegLoc>,
}

/// A chunk's place in a segment file: the segment's id and the byte offset (the length is the
/// chunk's size).
#[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
pub struct SegLoc {
    /// Segment id (`segments/<id:016x>.seg`).
    #[prost(uint64, tag = "1")]
    pub segment: u64,
    /// Byte offset of the chunk in the segment.
    #[prost(uint64, tag = "2")]
    pub offset: u64,
}

/// A resumable upload in progress.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UploadRec {
    /// Declared total size (0: unknown).
    #[prost(uint64, tag = "1")]
    pub total_size: u64,
    /// Attributes from the start message.
    #[prost(map = "string, string", tag = "2")]
    pub attributes: HashMap<String, String>,
    /// Bytes durably received (sum of chunk sizes).
    #[prost(uint64, tag = "3")]
    pub received: u64,
    /// Durable chunks of records written before per-chunk rows (read only, to release them).
    #[prost(bytes = "vec", repeated, tag = "4")]
    pub chunk_hashes: Vec<Vec<u8>>,
    /// Their lengths.
    #[prost(uint32, repeated, tag = "5")]
    pub chunk_sizes: Vec<u32>,
    /// Start time, nanoseconds since the epoch.
    #[prost(int64, tag = "6")]
    pub created_ns: i64,
    /// Last progress, nanoseconds since the epoch (expiry counts from here).
    #[prost(int64, tag = "7")]
    pub updated_ns: i64,
    /// The live session: each resume takes a new number, and appends or a completion from an
    /// older session are refused.
    #[prost(uint64, tag = "8")]
    pub session: u64,
    /// Durable chunks, kept as rows of their own (`upload_chunks`).
    #[prost(uint64, tag = "9")]
    pub chunk_count: u64,
}

/// One durable chunk of a resumable upload (a row of its own, so an append writes one row).
#[derive(Clone, PartialEq, prost::Message)]
pub struct UploadChunkRec {
    /// BLAKE3 of the chunk (its address).
    #[prost(bytes = "vec", tag = "1")]
    pub hash: Vec<u8>,
    /// Length.
    #[prost(uint32, tag = "2")]
    pub size: u32,
    /// BLAKE3 chaining value of the chunk at its offset in the object: the whole-content key
    /// is derived from these without re-reading the chunks.
    #[prost(bytes = "vec", tag = "3")]
    pub cv: Vec<u8>,
}

/// What remains of a deleted file, for replication to order deletes against writes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Tombstone {
    /// Deletion time, nanoseconds since the epoch.
    #[prost(int64, tag = "1")]
    pub deleted_ns: i64,
    /// The blob the file pointed at.
    #[prost(bytes = "vec", tag = "2")]
    pub blob_key: Vec<u8>,
    /// Clock reading of the delete (replication orders it against writes).
    #[prost(message, optional, tag = "3")]
    pub hlc: Option<Hlc>,
}
