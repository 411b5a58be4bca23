//! File operations as the adapters call them: each one a pass-through to the store when this
//! pod is alone, else a majority read or a coordinated write.

use bytes::Bytes;
use peervault_proto::v1::FileRecord;

use super::{Cluster, ReplicaState};
use crate::{
    error::{BlobError, Result},
    store::{
        MetadataPatch, now_ns,
        records::FileRec,
        replica::{file_rec, hlc_to_wire},
    },
    validate,
};

/// Replicas as the adapters report them (empty: this pod alone).
pub type Replicas = Vec<(String, ReplicaState)>;

fn not_found(key: &str) -> BlobError {
    BlobError::NotFound(format!("file '{key}' not found"))
}

impl Cluster {
    /// The live record of `key` from a majority of its owners (from every owner that answers
    /// in time with `every_owner`, for a full replica report).
    pub async fn live_record(
        &self,
        key: &str,
        with_data: bool,
        every_owner: bool,
    ) -> Result<(FileRecord, Replicas, bool)> {
        let out = self.read_record(key, with_data, every_owner).await?;
        match out.record {
            Some(r) if !r.deleted => Ok((r, out.replicas, out.local_current)),
            _ => Err(not_found(key)),
        }
    }

    /// GetFile.
    pub async fn get_file(&self, key: &str) -> Result<(FileRec, Replicas)> {
        if self.is_solo() {
            return Ok((self.store().get_file(key)?, vec![]));
        }
        let (r, replicas, _) = self.live_record(key, false, true).await?;
        Ok((file_rec(&r), replicas))
    }

    /// DeleteFile: a tombstone written to a majority of the owners.
    pub async fn delete_file(&self, key: &str) -> Result<FileRec> {
        if self.is_solo() {
            return self.store().delete_file(key).await;
        }
        let (live, _, _) = self.live_record(key, false, false).await?;
        let now = now_ns();
        let tomb = FileRecord {
            key: key.to_string(),
            blob_key: live.blob_key.clone(),
            updated_at: Some(peervault_runtime::time::timestamp_from_ns(now)),
            hlc: Some(hlc_to_wire(&self.now())),
            deleted: true,
            ..Default::default()
        };
        self.replicate(tomb, None, None).await?;
        Ok(file_rec(&live))
    }

    /// UpdateFileMetadata: the patched record written to a majority of the owners.
    pub async fn update_file(&self, key: &str, patch: MetadataPatch) -> Result<(FileRec, Replicas)> {
        if self.is_solo() {
            return Ok((self.store().update_file(key, patch).await?, vec![]));
        }
        let (mut r, _, _) = self.live_record(key, true, false).await?;
        if patch.replace {
            r.metadata = patch.set;
        } else {
            r.metadata.extend(patch.set);
        }
        for k in &patch.remove {
            r.metadata.remove(k);
        }
        validate::metadata(&r.metadata)?;
        if let Some(n) = patch.name {
            r.name = n;
        }
        if let Some(ct) = patch.content_type {
            r.content_type = ct;
        }
        let old = file_rec(&r).updated_ns;
        r.updated_at = Some(peervault_runtime::time::timestamp_from_ns(now_ns().max(old + 1)));
        r.hlc = Some(hlc_to_wire(&self.now()));
        let w = self.replicate(r, None, None).await?;
        Ok((file_rec(&w.record), w.replicas))
    }

    /// The content of `key` for a download: the record and, for a small object, its bytes.
    pub async fn open_download(&self, key: &str) -> Result<(FileRecord, Option<Bytes>)> {
        let (r, _, _) = self.live_record(key, true, false).await?;
        let small = (!r.inline_data.is_empty()).then(|| r.inline_data.clone());
        Ok((r, small))
    }

    /// Streams bytes `start..end` of `rec`'s content (`end` at most its size) as messages made
    /// by `to_message` (offset, data, last, chunk hash when the piece is a whole chunk), each
    /// chunk fetched local-first with failover. Chunks wholly outside the range are not fetched.
    pub fn stream_content<M: Send + 'static>(
        &self,
        rec: FileRecord,
        start: u64,
        end: u64,
        to_message: impl Fn(u64, Bytes, bool, Option<[u8; 32]>) -> M + Send + 'static,
    ) -> tonic::codegen::BoxStream<M> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<M, tonic::Status>>(2);
        let me = self.clone();
        tokio::spawn(async move {
            let total = end.min(rec.size.max(0) as u64);
            let mut chunk_start = 0u64;
            for (h, &size) in rec.chunk_hashes.iter().zip(&rec.chunk_sizes) {
                if chunk_start >= total {
                    return;
                }
                let chunk_end = chunk_start + size as u64;
                if chunk_end <= start {
                    chunk_start = chunk_end;
                    continue;
                }
                let Ok(hash) = <[u8; 32]>::try_from(h.as_ref()) else {
                    let _ = tx.send(Err(tonic::Status::data_loss("corrupt chunk reference"))).await;
                    return;
                };
                let data = match me.fetch_chunk(&rec.key, hash, size).await {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                let from = start.saturating_sub(chunk_start).min(data.len() as u64) as usize;
                let to = (total - chunk_start).min(data.len() as u64) as usize;
                let whole = from == 0 && to == data.len() && data.len() <= crate::grpc::MAX_FRAME;
                let mut offset = chunk_start + from as u64;
                for i in (from..to).step_by(crate::grpc::MAX_FRAME) {
                    let piece = data.slice(i..(i + crate::grpc::MAX_FRAME).min(to));
                    let len = piece.len() as u64;
                    let msg = to_message(offset, piece, offset + len == total, whole.then_some(hash));
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    offset += len;
                }
                chunk_start = chunk_end;
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}
