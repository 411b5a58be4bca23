//! Changes to files, blobs and resumable uploads, each one committed through the committer.

use std::collections::HashMap;

use super::{
    ChunkMeta, Finished, MetadataPatch, Store,
    index::{Op, Reply},
    now_ns,
    records::{BlobRec, FileRec, UploadRec},
};
use crate::error::{BlobError, Result};

impl Store {
    /// Commits a finished ingest as the file `rec.key` (replacing any previous content).
    /// Returns the stored record and the one it replaced.
    pub async fn put_file(&self, mut rec: FileRec, content: Finished) -> Result<(FileRec, Option<FileRec>)> {
        rec.blob_key = content.blob.key.to_vec();
        rec.size = content.blob.size;
        let blob = content.blob.clone();
        let reply = self.commit(Op::PutFile { rec, blob }).await;
        content.release(self);
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

    /// Registers a resumable upload.
    pub async fn create_upload(&self, id: &str, total_size: u64, attributes: HashMap<String, String>) -> Result<()> {
        let now = now_ns();
        let rec = UploadRec {
            total_size,
            attributes,
            received: 0,
            chunk_hashes: vec![],
            chunk_sizes: vec![],
            created_ns: now,
            updated_ns: now,
        };
        self.commit(Op::CreateUpload {
            id: id.to_string(),
            rec,
        })
        .await?;
        Ok(())
    }

    /// Records durable chunks of a resumable upload; returns the durable byte count.
    pub async fn append_upload(&self, id: &str, chunks: Vec<ChunkMeta>) -> Result<u64> {
        let mut received = None;
        for chunk in chunks {
            let r = self
                .commit(Op::AppendUpload {
                    id: id.to_string(),
                    chunk,
                    now_ns: now_ns(),
                })
                .await;
            match r? {
                Reply::Received(n) => received = Some(n),
                other => return Err(BlobError::Corrupt(format!("unexpected reply {other:?}"))),
            }
        }
        match received {
            Some(n) => Ok(n),
            None => Ok(self.get_upload(id)?.received),
        }
    }

    /// Turns a resumable upload into a blob.
    pub async fn complete_upload(&self, id: &str, content: Finished) -> Result<BlobRec> {
        let blob = content.blob.clone();
        let r = self
            .commit(Op::CompleteUpload {
                id: id.to_string(),
                blob,
                now_ns: now_ns(),
            })
            .await;
        content.release(self);
        match r? {
            Reply::Blob(b) => Ok(b),
            other => Err(BlobError::Corrupt(format!("unexpected reply {other:?}"))),
        }
    }

    /// Abandons a resumable upload and releases its chunks.
    pub async fn abort_upload(&self, id: &str) -> Result<()> {
        self.commit(Op::AbortUpload {
            id: id.to_string(),
            now_ns: now_ns(),
        })
        .await?;
        Ok(())
    }
}
