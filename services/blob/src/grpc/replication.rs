//! ReplicationService: the internal blob-to-blob calls, a thin conversion to the coordinator
//! ([`crate::cluster::server`]). The auth layer admits only service identities.

use bytes::Bytes;
use peervault_proto::v1::{
    ChunkData, CommitRecordRequest, DigestsRequest, DigestsResponse, FileRecord, GetChunkRequest, GetRecordRequest,
    GetRecordResponse, HasChunksRequest, HasChunksResponse, ListRecordsRequest, PutChunksResponse, PutRecordRequest,
    PutRecordResponse, replication_service_server::ReplicationService,
};
use tonic::{Request, Response, Status, Streaming, codegen::BoxStream};

use crate::{cluster::Cluster, error::BlobError};

/// The ReplicationService face of the coordinator.
#[derive(Clone)]
pub struct ReplicationApi {
    cluster: Cluster,
}

impl ReplicationApi {
    /// Serves replication calls for `cluster`.
    pub fn new(cluster: Cluster) -> Self {
        ReplicationApi { cluster }
    }
}

fn status(e: BlobError) -> Status {
    e.into()
}

/// Records per ListRecords read of the index.
const LIST_BATCH: usize = 256;

#[tonic::async_trait]
impl ReplicationService for ReplicationApi {
    async fn has_chunks(&self, req: Request<HasChunksRequest>) -> Result<Response<HasChunksResponse>, Status> {
        let present = self
            .cluster
            .serve_has_chunks(req.into_inner().hashes)
            .await
            .map_err(status)?;
        Ok(Response::new(HasChunksResponse { present }))
    }

    async fn put_chunks(&self, req: Request<Streaming<ChunkData>>) -> Result<Response<PutChunksResponse>, Status> {
        let mut stream = req.into_inner();
        let mut sink = self.cluster.chunk_sink();
        while let Some(m) = stream.message().await? {
            sink.push(m).await.map_err(status)?;
        }
        sink.flush().await.map_err(status)?;
        Ok(Response::new(PutChunksResponse {
            stored: sink.stored,
            bytes: sink.bytes,
        }))
    }

    async fn get_chunk(&self, req: Request<GetChunkRequest>) -> Result<Response<BoxStream<ChunkData>>, Status> {
        let hash = req.into_inner().hash;
        let data = self.cluster.serve_get_chunk(&hash).await.map_err(status)?;
        let pieces: Vec<Result<ChunkData, Status>> = (0..data.len().max(1))
            .step_by(crate::cluster::MAX_PIECE)
            .map(|i| {
                Ok(ChunkData {
                    hash: hash.clone(),
                    data: data.slice(i..(i + crate::cluster::MAX_PIECE).min(data.len())),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(pieces))))
    }

    async fn put_record(&self, req: Request<PutRecordRequest>) -> Result<Response<PutRecordResponse>, Status> {
        let req = req.into_inner();
        let rec = req
            .record
            .ok_or_else(|| Status::invalid_argument("PutRecord without a record"))?;
        let (applied, held) = self.cluster.serve_put_record(rec, req.pending).await.map_err(status)?;
        Ok(Response::new(PutRecordResponse { applied, held }))
    }

    async fn commit_record(&self, req: Request<CommitRecordRequest>) -> Result<Response<PutRecordResponse>, Status> {
        let req = req.into_inner();
        let applied = self
            .cluster
            .serve_commit(&req.key, req.hlc.as_ref())
            .await
            .map_err(status)?;
        Ok(Response::new(PutRecordResponse { applied, held: None }))
    }

    async fn get_record(&self, req: Request<GetRecordRequest>) -> Result<Response<GetRecordResponse>, Status> {
        let record = self
            .cluster
            .serve_get_record(&req.into_inner().key)
            .await
            .map_err(status)?;
        Ok(Response::new(GetRecordResponse { record }))
    }

    async fn get_records(
        &self,
        req: Request<peervault_proto::v1::GetRecordsRequest>,
    ) -> Result<Response<peervault_proto::v1::GetRecordsResponse>, Status> {
        let results = self
            .cluster
            .serve_get_records(req.into_inner().queries)
            .await
            .map_err(status)?;
        Ok(Response::new(peervault_proto::v1::GetRecordsResponse { results }))
    }

    async fn put_records(
        &self,
        req: Request<peervault_proto::v1::PutRecordsRequest>,
    ) -> Result<Response<peervault_proto::v1::PutRecordsResponse>, Status> {
        let results = self
            .cluster
            .serve_put_records(req.into_inner().requests)
            .await
            .map_err(status)?;
        Ok(Response::new(peervault_proto::v1::PutRecordsResponse { results }))
    }

    async fn commit_records(
        &self,
        req: Request<peervault_proto::v1::CommitRecordsRequest>,
    ) -> Result<Response<peervault_proto::v1::PutRecordsResponse>, Status> {
        let results = self
            .cluster
            .serve_commit_records(req.into_inner().requests)
            .await
            .map_err(status)?;
        Ok(Response::new(peervault_proto::v1::PutRecordsResponse { results }))
    }

    async fn list_records(&self, req: Request<ListRecordsRequest>) -> Result<Response<BoxStream<FileRecord>>, Status> {
        let req = req.into_inner();
        if req
            .partitions
            .iter()
            .any(|p| *p as usize >= crate::store::replica::PARTITIONS)
        {
            return Err(Status::invalid_argument("partitions are 0..256"));
        }
        let store = self.cluster.store().clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<FileRecord, Status>>(2);
        tokio::spawn(async move {
            let mut after = req.start_after;
            let mut left = if req.limit == 0 { usize::MAX } else { req.limit as usize };
            while left > 0 {
                let s = store.clone();
                let (p, a, parts, data) = (
                    req.prefix.clone(),
                    after.clone(),
                    req.partitions.clone(),
                    !req.without_data,
                );
                let n = left.min(LIST_BATCH);
                let batch = match tokio::task::spawn_blocking(move || s.list_records(&p, &a, &parts, n, data)).await {
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
                let got = batch.len();
                if let Some(l) = batch.last() {
                    after = l.key.clone();
                }
                for r in batch {
                    if tx.send(Ok(r)).await.is_err() {
                        return;
                    }
                }
                left = left.saturating_sub(got);
                if got < n {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn digests(&self, req: Request<DigestsRequest>) -> Result<Response<DigestsResponse>, Status> {
        let (partitions, digests) = self
            .cluster
            .serve_digests(req.into_inner().partitions)
            .await
            .map_err(status)?;
        let store = self.cluster.store().clone();
        let (_, keys) = tokio::task::spawn_blocking(move || store.api_key_records())
            .await
            .map_err(|e| Status::internal(format!("key task failed: {e}")))?
            .map_err(status)?;
        Ok(Response::new(DigestsResponse {
            partitions,
            digests,
            api_keys: Bytes::copy_from_slice(&keys),
        }))
    }

    async fn put_api_keys(
        &self,
        req: Request<peervault_proto::v1::PutApiKeysRequest>,
    ) -> Result<Response<peervault_proto::v1::PutApiKeysResponse>, Status> {
        let applied = self
            .cluster
            .serve_put_api_keys(req.into_inner().records)
            .await
            .map_err(status)?;
        Ok(Response::new(peervault_proto::v1::PutApiKeysResponse { applied }))
    }
}
