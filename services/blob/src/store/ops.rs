//! Changes to files, blobs and resumable uploads, each one committed through the committer.

use std::collections::HashMap;

use super::{
    Durable, Finished, MetadataPatch, Store,
    index::{Op, Reply},
    now_ns,
    records::{BlobRec, FileRec, UploadChunkRec, UploadRec},
};
use crate::error::{BlobError, Result};

impl Store {
    /// Commits a finished ingest as the file `rec.key` (replacing any previous content).
    /// Returns the stored record and the one it replaced.
    pub async fn put_file(&self, mut rec: FileRec, content: Finished) -> Result<(FileRec, Option<FileRec>)> {
        rec.blob_key = content.blob.key.to_vec();
        rec.size = content.blob.size;
        let blob = content.blob.clone();
        let reply = self.commit_with(Op::PutFile { rec, blob }, Some(content)).await;
        match reply? {
            Reply::File(f, old) => Ok((f, old)),
            other => Err(BlobError::Corrupt(format!("unexpected reply {other:?}"))),
        }
    }

    /// Deletes a file; its content goes when nothing else uses it (after the GC grace period).
    pub async fn delete_file(&self, key: &str) -> Result<FileRec> {
        match self
            .commit(Op::DeleteFile {
                key: key.to_string(),
                now_ns: now_ns(),
            })
            .await?
        {
            Reply::Deleted(f) => Ok(f),
            other => Err(BlobError::Corrupt(format!("unexpected reply {other:?}"))),
        }
    }

    /// Changes a file's metadata, name or content type.
    pub async fn update_file(&self, key: &str, patch: MetadataPatch) -> Result<FileRec> {
        match self
            .commit(Op::UpdateFile {
                key: key.to_string(),
                patch,
                now_ns: now_ns(),
            })
            .await?
        {
            Reply::File(f, _) => Ok(f),
            other => Err(BlobError::Corrupt(format!("unexpected reply {other:?}"))),
        }
    }

    /// Deletes a blob uploaded directly; refused while files use it.
    pub async fn delete_blob(&self, key: [u8; 32]) -> Result<u64> {
        match self.commit(Op::DeleteBlob { key, now_ns: now_ns() }).await? {
            Reply::Freed(n) => Ok(n),
            other => Err(BlobError::Corrupt(format!("unexpected reply {other:?}"))),
        }
    }

    /// Registers a resumable upload; returns its first session number.
    pub async fn create_upload(&self, id: &str, total_size: u64, attributes: HashMap<String, String>) -> Result<u64> {
        let now = now_ns();
        let rec = UploadRec {
            total_size,
            attributes,
            created_ns: now,
            updated_ns: now,
            session: 1,
            ..Default::default()
        };
        self.commit(Op::CreateUpload {
            id: id.to_string(),
            rec,
        })
        .await?;
        Ok(1)
    }

    /// Makes the caller the live session of upload `id` (any older session's appends and
    /// completion are refused from now on) and returns the record and its durable chunks.
    pub async fn claim_upload(&self, id: &str) -> Result<(UploadRec, Vec<UploadChunkRec>)> {
        match self
            .commit(Op::ClaimUpload {
                id: id.to_string(),
                now_ns: now_ns(),
            })
            .await?
        {
            Reply::Claimed(rec, rows) => Ok((rec, rows)),
            other => Err(BlobError::Corrupt(format!("unexpected reply {other:?}"))),
        }
    }

    /// Records durable chunks of a resumable upload for `session`, refused unless the upload's
    /// durable length is `durable.offset`; returns the durable byte count.
    pub async fn append_upload(&self, id: &str, session: u64, durable: &Durable) -> Result<u64> {
        let chunks = durable
            .chunks
            .iter()
            .cloned()
            .zip(durable.cvs.iter().copied())
            .collect();
        match self
            .commit(Op::AppendUpload {
                id: id.to_string(),
                session,
                offset: durable.offset,
                chunks,
                now_ns: now_ns(),
            })
            .await?
        {
            Reply::Received(n) => Ok(n),
            other => Err(BlobError::Corrupt(format!("unexpected reply {other:?}"))),
        }
    }

    /// Turns a resumable upload into a blob (for the live `session` only).
    pub async fn complete_upload(&self, id: &str, session: u64, content: Finished) -> Result<BlobRec> {
        let blob = content.blob.clone();
        let r = self
            .commit_with(
                Op::CompleteUpload {
                    id: id.to_string(),
                    session,
                    blob,
                    now_ns: now_ns(),
                },
                Some(content),
            )
            .await;
        match r? {
            Reply::Blob(b) => Ok(b),
            other => Err(BlobError::Corrupt(format!("unexpected reply {other:?}"))),
        }
    }

    /// Abandons a resumable upload and releases its chunks.
    /// With a `session`, only while it is still the live one.
    pub async fn abort_upload(&self, id: &str, session: Option<u64>) -> Result<()> {
        self.commit(Op::AbortUpload {
            id: id.to_string(),
            session,
            now_ns: now_ns(),
        })
        .await?;
        Ok(())
    }
}
