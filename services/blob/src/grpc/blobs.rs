//! BlobService (Graviton): ranged reads, stat, delete and listing of content-addressed blobs.

use bytes::Bytes;
use peervault_proto::v1::{
    BlobChunk, BlobMetadata, DeleteBlobRequest, DeleteBlobResponse, FileRecord, GetBlobRequest, ListBlobsRequest,
    StatBlobRequest, blob_service_server::BlobService,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, codegen::BoxStream};

use super::{BlobApi, STREAM_BUFFER, check_unlimited, key_limit, stream_range, timestamp};
use crate::{
    cluster::blob_key_of,
    error::BlobError,
    store::{hex, records::BlobRec},
    validate,
};

/// Blobs read from the index per page while streaming ListBlobs.
const LIST_PAGE: usize = 1000;

/// The size of the next ListBlobs page once `sent` of `limit` (0: no limit) were streamed.
fn next_page(limit: usize, sent: usize) -> usize {
    if limit == 0 {
        LIST_PAGE
    } else {
        (limit - sent).min(LIST_PAGE)
    }
}

fn metadata(key: &[u8; 32], b: &BlobRec) -> BlobMetadata {
    BlobMetadata {
        key: Bytes::copy_from_slice(key),
        size: b.size as i64,
        content_type: b.content_type.clone(),
        attributes: b.attributes.clone(),
        created_at: Some(timestamp(b.created_ns)),
    }
}

/// The byte range [start, end) of a blob of `size` bytes, checked.
pub(crate) fn resolve_range(size: u64, start: i64, end: Option<i64>) -> Result<(u64, u64), BlobError> {
    if start < 0 || end.is_some_and(|e| e < 0) {
        return Err(BlobError::invalid("range bounds must not be negative"));
    }
    let start = start as u64;
    if start > size {
        return Err(BlobError::OutOfRange(format!(
            "range starts at {start}, past the end of the blob ({size} bytes)"
        )));
    }
    let end = end.map(|e| e as u64).unwrap_or(size);
    if end < start {
        return Err(BlobError::invalid(format!(
            "inverted range: end {end} is before start {start}"
        )));
    }
    if end > size {
        return Err(BlobError::OutOfRange(format!(
            "range {start}..{end} reaches past the end of the blob ({size} bytes)"
        )));
    }
    Ok((start, end))
}

/// The metadata of a replicated blob record.
fn record_metadata(key: &[u8; 32], r: &FileRecord) -> BlobMetadata {
    BlobMetadata {
        key: Bytes::copy_from_slice(key),
        size: r.size,
        content_type: r.content_type.clone(),
        attributes: r.metadata.clone(),
        created_at: r.created_at,
    }
}

impl BlobApi {
    /// GetBlob with other members: the blob's record from a majority, content local-first
    /// with failover; content this pod holds without a record (a file's, or a blob stored
    /// before the pod joined a cluster) is served as on one pod.
    async fn get_blob_replicated(&self, req: GetBlobRequest) -> Result<BoxStream<BlobChunk>, Status> {
        let key = validate::blob_key(&req.key).map_err(Status::from)?;
        let rec = match self.cluster.blob_record(&key, true).await {
            Ok(r) => r,
            Err(BlobError::NotFound(_)) => return self.get_blob_stream(req),
            Err(e) => return Err(e.into()),
        };
        let size = rec.size.max(0) as u64;
        let (start, end) = match &req.range {
            Some(r) => resolve_range(size, r.start, r.end).map_err(Status::from)?,
            None => (0, size),
        };
        if start == end {
            return Ok(Box::pin(tokio_stream::empty()));
        }
        if rec.inline_data.len() as u64 == size {
            let data = rec.inline_data.slice(start as usize..end as usize);
            let msg = BlobChunk {
                data,
                offset: start as i64,
            };
            return Ok(Box::pin(tokio_stream::once(Ok(msg))));
        }
        Ok(self
            .cluster
            .stream_content(rec, start, end, |offset, data, _, _| BlobChunk {
                data,
                offset: offset as i64,
            }))
    }

    /// StatBlob on a pod that replicates (see [`BlobApi::get_blob_replicated`]).
    async fn stat_replicated(&self, key: [u8; 32]) -> Result<BlobMetadata, Status> {
        match self.cluster.blob_record(&key, false).await {
            Ok(r) => Ok(record_metadata(&key, &r)),
            Err(BlobError::NotFound(_)) => {
                let b = self.store.get_blob(&key).map_err(Status::from)?;
                Ok(metadata(&key, &b))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// DeleteBlob on a pod that replicates: a tombstone for the blob's record on a majority of
    /// its owners (files with the same content keep theirs); a blob stored before the pod
    /// joined a cluster is deleted as on one pod.
    async fn delete_replicated(&self, key: [u8; 32]) -> Result<u64, Status> {
        match self.cluster.delete_blob(&key).await {
            Ok(f) => Ok(f.size),
            Err(BlobError::NotFound(_)) => self.store.delete_blob(key).await.map_err(Status::from),
            Err(e) => Err(e.into()),
        }
    }

    fn get_blob_stream(&self, req: GetBlobRequest) -> Result<BoxStream<BlobChunk>, Status> {
        let key = validate::blob_key(&req.key).map_err(Status::from)?;
        let blob = self.store.get_blob(&key).map_err(Status::from)?;
        let (start, end) = match &req.range {
            Some(r) => resolve_range(blob.size, r.start, r.end).map_err(Status::from)?,
            None => (0, blob.size),
        };
        Ok(stream_range(&self.store, blob, start, end, |p| BlobChunk {
            data: p.data,
            offset: p.offset as i64,
        }))
    }
}

#[tonic::async_trait]
impl BlobService for BlobApi {
    async fn get_blob(&self, req: Request<GetBlobRequest>) -> Result<Response<BoxStream<BlobChunk>>, Status> {
        check_unlimited(key_limit(&req).as_deref())?;
        // Alone, every blob this pod can serve is in its own store (pinned while it streams).
        if !self.cluster.is_solo() {
            return Ok(Response::new(self.get_blob_replicated(req.into_inner()).await?));
        }
        Ok(Response::new(self.get_blob_stream(req.into_inner())?))
    }

    async fn stat_blob(&self, req: Request<StatBlobRequest>) -> Result<Response<BlobMetadata>, Status> {
        check_unlimited(key_limit(&req).as_deref())?;
        let key = validate::blob_key(&req.into_inner().key).map_err(Status::from)?;
        if self.cluster.replicates() {
            return Ok(Response::new(self.stat_replicated(key).await?));
        }
        let b = self.store.get_blob(&key).map_err(Status::from)?;
        Ok(Response::new(metadata(&key, &b)))
    }

    async fn delete_blob(&self, req: Request<DeleteBlobRequest>) -> Result<Response<DeleteBlobResponse>, Status> {
        check_unlimited(key_limit(&req).as_deref())?;
        let key = validate::blob_key(&req.into_inner().key).map_err(Status::from)?;
        let freed = if self.cluster.replicates() {
            self.delete_replicated(key).await?
        } else {
            self.store.delete_blob(key).await.map_err(Status::from)?
        };
        tracing::info!(blob = %hex(&key), freed, "blob deleted");
        Ok(Response::new(DeleteBlobResponse {
            deleted: true,
            freed_bytes: freed as i64,
        }))
    }

    async fn list_blobs(&self, req: Request<ListBlobsRequest>) -> Result<Response<BoxStream<BlobMetadata>>, Status> {
        check_unlimited(key_limit(&req).as_deref())?;
        let req = req.into_inner();
        let limit = req.limit as usize;
        let store = self.store.clone();
        let (tx, rx) = mpsc::channel::<Result<BlobMetadata, Status>>(STREAM_BUFFER * 16);
        if !self.cluster.is_solo() {
            tokio::spawn(list_replicated(self.cluster.clone(), req, tx));
            return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
        }
        tokio::spawn(async move {
            let mut after = req.start_after.to_vec();
            let mut sent = 0usize;
            loop {
                let page = next_page(limit, sent);
                let (s, prefix, a) = (store.clone(), req.prefix.to_vec(), after.clone());
                let batch = match tokio::task::spawn_blocking(move || s.list_blobs(&prefix, &a, page)).await {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(format!("list task failed: {e}")))).await;
                        return;
                    }
                };
                let done = batch.len() < page;
                for (k, b) in &batch {
                    if tx.send(Ok(metadata(k, b))).await.is_err() {
                        return;
                    }
                    sent += 1;
                }
                match batch.last() {
                    Some((k, _)) if !done && (limit == 0 || sent < limit) => after = k.to_vec(),
                    _ => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// ListBlobs with other members: the blob records of the whole store (blobs uploaded through
/// UploadService), merged across members, a page at a time. Alone, a pod lists every blob in
/// its store, files' content included.
async fn list_replicated(
    cluster: crate::cluster::Cluster,
    req: ListBlobsRequest,
    tx: mpsc::Sender<Result<BlobMetadata, Status>>,
) {
    let limit = req.limit as usize;
    let mut after = req.start_after.to_vec();
    let mut sent = 0usize;
    loop {
        let page = next_page(limit, sent);
        let (records, more) = match cluster.list_blobs(&req.prefix, &after, page).await {
            Ok(x) => x,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        for r in &records {
            let Some(key) = blob_key_of(r) else { continue };
            if tx.send(Ok(record_metadata(&key, r))).await.is_err() {
                return;
            }
            sent += 1;
            after = key.to_vec();
        }
        if !more || records.is_empty() || (limit > 0 && sent >= limit) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(resolve_range(10, 0, None).unwrap(), (0, 10));
        assert_eq!(resolve_range(10, 3, Some(7)).unwrap(), (3, 7));
        assert_eq!(resolve_range(10, 10, None).unwrap(), (10, 10));
        assert_eq!(resolve_range(0, 0, None).unwrap(), (0, 0));
        assert!(matches!(resolve_range(10, 11, None), Err(BlobError::OutOfRange(_))));
        assert!(matches!(resolve_range(10, 0, Some(11)), Err(BlobError::OutOfRange(_))));
        assert!(matches!(
            resolve_range(10, 7, Some(3)),
            Err(BlobError::InvalidArgument(_))
        ));
        assert!(matches!(
            resolve_range(10, -1, None),
            Err(BlobError::InvalidArgument(_))
        ));
    }
}
