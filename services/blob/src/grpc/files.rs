//! FileService: the PeerVault file operations.

use bytes::Bytes;
use peervault_proto::v1::{
    DeleteFileResponse, FileChunk, FileRequest, FileResponse, ListFilesRequest, ListFilesResponse,
    UpdateFileMetadataRequest, file_service_server::FileService,
};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming, codegen::BoxStream};

use super::{BlobApi, MAX_FRAME, check_key, key_limit, stream_range};
use crate::{
    cluster::{Replicas, Replicator},
    error::BlobError,
    store::{FileQuery, Ingest, MetadataPatch, hex, now_ns, records::FileRec},
    validate,
};

/// Messages queued for an upload's writer thread.
const WRITE_QUEUE: usize = 2;

/// The queue to an upload's writer thread and the thread's outcome.
type WriterPipe = (
    mpsc::Sender<Bytes>,
    tokio::task::JoinHandle<Result<(Ingest, Option<Replicator>), BlobError>>,
);

/// Default and largest page of ListFiles.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// Furthest a page number may reach (page × page_size) in one call.
const MAX_PAGE_REACH: u64 = 1_000_000;

fn status(e: BlobError) -> Status {
    e.into()
}

/// Seconds since the epoch of the last volume-full alert (one a minute at most).
static LAST_FULL_ALERT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl BlobApi {
    /// Maps a store error to its status; a full volume also raises a `storage_alert` (at most
    /// one a minute) so operators see it without reading logs.
    pub(super) fn status(&self, e: BlobError) -> Status {
        if e.is_volume_full() {
            let now = (now_ns() / 1_000_000_000).max(0) as u64;
            let last = LAST_FULL_ALERT.load(std::sync::atomic::Ordering::Relaxed);
            if now >= last + 60
                && LAST_FULL_ALERT
                    .compare_exchange(
                        last,
                        now,
                        std::sync::atomic::Ordering::AcqRel,
                        std::sync::atomic::Ordering::Relaxed,
                    )
                    .is_ok()
            {
                let stats = self.store.stats();
                let message = format!("Volume full on {}: {e}", self.node_id);
                self.events.publish(
                    peervault_events_client::EventBuilder::new("alerts", "storage_alert")
                        .data(serde_json::json!({
                            "level": "critical",
                            "type": "storage_alert",
                            "metric": "volume_full",
                            "value": stats.storage_used,
                            "threshold": self.store.config().volume_reserve,
                            "message": message,
                            "node": self.node_id,
                        }))
                        .payload(peervault_proto::v1::event::Payload::Alert(peervault_proto::v1::Alert {
                            level: "critical".into(),
                            r#type: "storage_alert".into(),
                            metric: "volume_full".into(),
                            value: stats.storage_used as f64,
                            threshold: self.store.config().volume_reserve as f64,
                            message,
                        }))
                        .build(),
                );
            }
        }
        e.into()
    }

    /// UploadFile: a client stream of contiguous chunks ending with `is_last`.
    pub async fn upload_file_stream(
        &self,
        mut stream: Streaming<FileChunk>,
        limit: Option<&str>,
    ) -> Result<FileResponse, Status> {
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty upload: send FileChunk messages ending with is_last"))?;
        let key = first.file_key.clone();
        validate::file_key(&key).map_err(status)?;
        check_key(limit, &key)?;
        validate::metadata(&first.metadata).map_err(status)?;
        validate::short_text("name", &first.name).map_err(status)?;
        validate::short_text("content_type", &first.content_type).map_err(status)?;
        let expected_hash = first.expected_hash.clone();
        let name = if first.name.is_empty() {
            key.rsplit('/').next().unwrap_or(&key).to_string()
        } else {
            first.name.clone()
        };
        let content_type = if first.content_type.is_empty() {
            validate::sniff_content_type(&name).to_string()
        } else {
            first.content_type.clone()
        };
        let metadata = first.metadata.clone();
        let mut ingest = Some(self.store.ingest(None).map_err(|e| self.status(e))?);
        // Chunks stream to the file's other owners while the upload is received.
        let mut repl = self.cluster.replicator(&key);
        let mut pipe: Option<WriterPipe> = None;
        let mut next = Some(first);
        let mut offset: i64 = 0;
        let mut saw_last = false;
        loop {
            let msg = match next.take() {
                Some(m) => m,
                None => match stream.message().await? {
                    Some(m) => m,
                    None => break,
                },
            };
            if saw_last {
                return Err(Status::invalid_argument(
                    "data after the chunk marked is_last; nothing was stored",
                ));
            }
            if !msg.file_key.is_empty() && msg.file_key != key {
                return Err(Status::invalid_argument(format!(
                    "chunk for key '{}' in an upload of '{key}': one stream uploads one file; nothing was stored",
                    msg.file_key
                )));
            }
            if msg.offset != offset {
                return Err(Status::invalid_argument(format!(
                    "chunk offset {} but {offset} bytes were received: offsets must be contiguous ({}); nothing was stored",
                    msg.offset,
                    if msg.offset > offset { "gap" } else { "overlap" }
                )));
            }
            if !msg.checksum.is_empty() {
                let got = blake3::hash(&msg.data);
                if !msg.checksum.eq_ignore_ascii_case(&got.to_hex()) {
                    return Err(Status::invalid_argument(format!(
                        "checksum mismatch for the chunk at offset {offset}: expected {}, data hashes to {} (BLAKE3, hex); nothing was stored",
                        msg.checksum,
                        got.to_hex()
                    )));
                }
            }
            offset += msg.data.len() as i64;
            saw_last = msg.is_last;
            if msg.data.is_empty() {
                continue;
            }
            if let Some((tx, _)) = &pipe {
                if tx.send(msg.data).await.is_err() {
                    break; // the writer stopped on an error, collected below
                }
            } else if msg.is_last {
                // A one-message object (the common small put): write it right here.
                let ing = ingest.take().ok_or_else(|| Status::internal("upload state lost"))?;
                let ing = super::upload::write(ing, msg.data).await.map_err(|e| self.status(e))?;
                ingest = Some(ing);
            } else {
                // A stream: hash and write on a thread of its own so receiving (and TLS) goes on
                // while the disk works; the small queue is the only buffering.
                let mut ing = ingest.take().ok_or_else(|| Status::internal("upload state lost"))?;
                let (tx, mut rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
                let mut r = repl.take();
                let span = tracing::debug_span!("chunk_writes");
                let handle = tokio::task::spawn_blocking(move || {
                    let _e = span.enter();
                    while let Some(data) = rx.blocking_recv() {
                        ing.write(&data)?;
                        if let Some(r) = &mut r {
                            r.forward(&mut ing, data)?;
                        }
                    }
                    Ok::<_, BlobError>((ing, r))
                });
                if tx.send(msg.data).await.is_err() {
                    pipe = Some((tx, handle));
                    break;
                }
                pipe = Some((tx, handle));
            }
        }
        if let Some((tx, handle)) = pipe.take() {
            drop(tx);
            let (ing, r) = handle
                .await
                .map_err(|e| Status::internal(format!("write task failed: {e}")))?
                .map_err(|e| self.status(e))?;
            ingest = Some(ing);
            repl = r;
        }
        if !saw_last {
            return Err(Status::invalid_argument(
                "the stream ended before a chunk marked is_last: the upload is incomplete and nothing was stored",
            ));
        }
        let ing = ingest.take().ok_or_else(|| Status::internal("upload state lost"))?;
        let (finished, _) = super::upload::finish(ing).await.map_err(|e| self.status(e))?;
        if !expected_hash.is_empty() {
            let got = hex(&finished.blob.key);
            if !expected_hash.eq_ignore_ascii_case(&got) {
                finished.discard();
                return Err(Status::invalid_argument(format!(
                    "content hashes to {got} but expected_hash is {expected_hash} (BLAKE3, hex); nothing was stored"
                )));
            }
        }
        let elapsed = finished.elapsed();
        let now = now_ns();
        let rec = FileRec {
            key: key.clone(),
            blob_key: vec![],
            size: 0,
            content_type,
            name,
            metadata,
            created_ns: now,
            updated_ns: now,
            hlc: None,
        };
        let (stored, replicas) = self
            .cluster
            .put_file(rec, finished, repl)
            .await
            .map_err(|e| self.status(e))?;
        self.store
            .metrics()
            .upload_duration
            .with_label_values(&["file"])
            .observe(elapsed.as_secs_f64());
        tracing::info!(key = %stored.key, size = stored.size, hash = %hex(&stored.blob_key), "file stored");
        self.publish_file_event("file_uploaded", "upload", &stored);
        Ok(self.file_response_with(&stored, &replicas))
    }

    /// DownloadFile: the content from `req.offset` on as a stream of chunks with offsets, the
    /// last flagged; refused when `req.expected_hash` names other content.
    pub async fn download_file_stream(
        &self,
        req: &FileRequest,
        limit: Option<&str>,
    ) -> Result<BoxStream<FileChunk>, Status> {
        let key = req.key.as_str();
        validate::file_key(key).map_err(status)?;
        check_key(limit, key)?;
        let want = DownloadFrom::of(req).map_err(status)?;
        if !self.cluster.is_solo() {
            return self.download_replicated(key, &want).await;
        }
        let (f, blob, small) = self.store.get_small_file(key).map_err(status)?;
        let start = want.check(&f.blob_key, blob.size).map_err(status)?;
        if let Some(data) = small {
            // Small objects come out of the index in one message: no task, no queue.
            return Ok(one_message(&f.key, &f.blob_key, data, start));
        }
        if blob.size == 0 || start == blob.size {
            return Ok(one_message(&f.key, &f.blob_key, Bytes::new(), start));
        }
        let key = f.key;
        let size = blob.size;
        Ok(stream_range(&self.store, blob, start, size, move |p| FileChunk {
            file_key: key.clone(),
            data: p.data,
            offset: p.offset as i64,
            is_last: p.last,
            checksum: p.whole_chunk.map(|h| hex(&h)).unwrap_or_default(),
            ..Default::default()
        }))
    }

    /// DownloadFile when there are other members: the newest record from a majority, content
    /// local-first with failover.
    async fn download_replicated(&self, key: &str, want: &DownloadFrom<'_>) -> Result<BoxStream<FileChunk>, Status> {
        let (rec, small) = self.cluster.open_download(key).await.map_err(status)?;
        let size = rec.size.max(0) as u64;
        let start = want.check(&rec.blob_key, size).map_err(status)?;
        if let Some(data) = small.filter(|d| d.len() as u64 == size) {
            return Ok(one_message(&rec.key, &rec.blob_key, data, start));
        }
        if size == 0 || start == size {
            return Ok(one_message(&rec.key, &rec.blob_key, Bytes::new(), start));
        }
        let key = rec.key.clone();
        Ok(self
            .cluster
            .stream_content(rec, start, size, move |offset, data, last, whole| FileChunk {
                file_key: key.clone(),
                data,
                offset: offset as i64,
                is_last: last,
                checksum: whole.map(|h| hex(&h)).unwrap_or_default(),
                ..Default::default()
            }))
    }

    /// ListFiles on this pod or, with other members, across the whole store.
    pub async fn list_files_any(
        &self,
        req: ListFilesRequest,
        limit: Option<String>,
    ) -> Result<ListFilesResponse, Status> {
        if !self.cluster.is_solo() {
            return self.list_replicated(req, limit.as_deref()).await;
        }
        let api = self.clone();
        tokio::task::spawn_blocking(move || api.list_files_page(req, limit.as_deref()))
            .await
            .map_err(|e| Status::internal(format!("list task failed: {e}")))?
    }

    /// ListFiles merged across every member: newest record per key, tombstones left out.
    async fn list_replicated(
        &self,
        mut req: ListFilesRequest,
        limit: Option<&str>,
    ) -> Result<ListFilesResponse, Status> {
        if let Some(p) = limit {
            if p.starts_with(req.prefix.as_str()) {
                req.prefix = p.to_string();
            } else if !req.prefix.starts_with(p) {
                return Ok(ListFilesResponse {
                    page: req.page.max(1),
                    page_size: req.page_size,
                    ..Default::default()
                });
            }
        }
        let size = match req.page_size {
            n if n <= 0 => DEFAULT_PAGE,
            n => (n as usize).min(MAX_PAGE),
        };
        if crate::store::replica::is_internal_key(&req.prefix) {
            // No file key starts with a control character; the store's own records do.
            return Ok(ListFilesResponse {
                page: req.page.max(1),
                page_size: size as i32,
                ..Default::default()
            });
        }
        let after = if req.page_token.is_empty() {
            None
        } else {
            Some(decode_token(&req.page_token)?)
        };
        let skip = if after.is_none() && req.page > 1 {
            (req.page as usize - 1).saturating_mul(size)
        } else {
            0
        };
        // `total` counts every match of the filter: a listing from the start counts them in the
        // same merged pass that cuts the page; a page after a token needs a pass of its own.
        let from_start = after.is_none();
        let (records, more, counted) = self
            .cluster
            .list_merged(&req.prefix, after.as_deref(), skip, size, &req.filter, from_start)
            .await
            .map_err(status)?;
        let total = if from_start {
            counted
        } else {
            let (_, _, total) = self
                .cluster
                .list_merged(&req.prefix, None, 0, 0, &req.filter, true)
                .await
                .map_err(status)?;
            total
        };
        let files: Vec<FileRec> = records.iter().map(crate::store::replica::file_rec).collect();
        let next = if more {
            files.last().map(|f| encode_token(&f.key)).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(ListFilesResponse {
            total: total.min(i32::MAX as u64) as i32,
            page: req.page.max(1),
            page_size: size as i32,
            files: files.iter().map(|f| self.file_response(f)).collect(),
            next_page_token: next,
        })
    }

    /// ListFiles.
    pub fn list_files_page(&self, mut req: ListFilesRequest, limit: Option<&str>) -> Result<ListFilesResponse, Status> {
        // A caller limited to a prefix sees only files under it.
        if let Some(p) = limit {
            if p.starts_with(req.prefix.as_str()) {
                req.prefix = p.to_string();
            } else if !req.prefix.starts_with(p) {
                return Ok(ListFilesResponse {
                    page: req.page.max(1),
                    page_size: req.page_size,
                    ..Default::default()
                });
            }
        }
        let size = match req.page_size {
            n if n <= 0 => DEFAULT_PAGE,
            n => (n as usize).min(MAX_PAGE),
        };
        let q = FileQuery {
            prefix: &req.prefix,
            filter: &req.filter,
        };
        let page = req.page.max(1) as u64;
        let after = if !req.page_token.is_empty() {
            Some(decode_token(&req.page_token)?)
        } else if page > 1 {
            // The published API pages by number; tokens are cheaper, numbers still work, up to
            // a bound on how far one call may skip.
            if page.saturating_mul(size as u64) > MAX_PAGE_REACH {
                return Err(Status::invalid_argument(format!(
                    "page {page} × page_size {size} reaches past {MAX_PAGE_REACH} files: page with next_page_token instead"
                )));
            }
            match self.store.page_start(&q, size, page).map_err(status)? {
                Some(a) => a,
                None => {
                    return Ok(ListFilesResponse {
                        files: vec![],
                        total: self.store.count_query(&q).map_err(status)?.min(i32::MAX as u64) as i32,
                        page: req.page,
                        page_size: size as i32,
                        next_page_token: String::new(),
                    });
                }
            }
        } else {
            None
        };
        let (files, more) = self.store.query_files(&q, after.as_deref(), size).map_err(status)?;
        let next = if more {
            files.last().map(|f| encode_token(&f.key)).unwrap_or_default()
        } else {
            String::new()
        };
        if more
            && req.page_token.is_empty()
            && let Some(last) = files.last()
        {
            self.store.remember_page_end(&q, size, page, &last.key);
        }
        Ok(ListFilesResponse {
            total: self.store.count_query(&q).map_err(status)?.min(i32::MAX as u64) as i32,
            page: req.page.max(1),
            page_size: size as i32,
            files: files.iter().map(|f| self.file_response(f)).collect(),
            next_page_token: next,
        })
    }

    /// UpdateFileMetadata.
    pub async fn update_metadata(
        &self,
        req: UpdateFileMetadataRequest,
        limit: Option<&str>,
    ) -> Result<FileResponse, Status> {
        validate::file_key(&req.key).map_err(status)?;
        check_key(limit, &req.key)?;
        validate::metadata(&req.metadata).map_err(status)?;
        if let Some(n) = &req.name {
            validate::short_text("name", n).map_err(status)?;
        }
        if let Some(ct) = &req.content_type {
            validate::short_text("content_type", ct).map_err(status)?;
        }
        let patch = MetadataPatch {
            set: req.metadata,
            replace: req.replace,
            remove: req.remove_keys,
            name: req.name,
            content_type: req.content_type,
        };
        let (f, replicas) = self.cluster.update_file(&req.key, patch).await.map_err(status)?;
        self.publish_file_event("file_updated", "update", &f);
        Ok(self.file_response_with(&f, &replicas))
    }

    /// DeleteFile.
    pub async fn delete(&self, key: &str, limit: Option<&str>) -> Result<DeleteFileResponse, Status> {
        validate::file_key(key).map_err(status)?;
        check_key(limit, key)?;
        let f = self.cluster.delete_file(key).await.map_err(status)?;
        tracing::info!(key = %key, "file deleted");
        self.publish_file_event("file_deleted", "delete", &f);
        Ok(DeleteFileResponse {
            success: true,
            message: format!("deleted '{key}'"),
        })
    }

    /// GetFile.
    pub async fn get(&self, key: &str, limit: Option<&str>) -> Result<FileResponse, Status> {
        validate::file_key(key).map_err(status)?;
        check_key(limit, key)?;
        let (f, replicas): (FileRec, Replicas) = self.cluster.get_file(key).await.map_err(status)?;
        Ok(self.file_response_with(&f, &replicas))
    }
}

/// Splits a chunk into message-sized slices without copying.
pub(super) fn split(data: Bytes) -> Vec<Bytes> {
    if data.len() <= MAX_FRAME {
        return vec![data];
    }
    (0..data.len())
        .step_by(MAX_FRAME)
        .map(|i| data.slice(i..(i + MAX_FRAME).min(data.len())))
        .collect()
}

fn encode_token(key: &str) -> String {
    hex(key.as_bytes())
}

fn decode_token(token: &str) -> Result<String, Status> {
    let bad = || Status::invalid_argument("page_token is not one this server issued: start again without it");
    if !token.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes: Result<Vec<u8>, _> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2).unwrap_or("zz"), 16))
        .collect();
    String::from_utf8(bytes.map_err(|_| bad())?).map_err(|_| bad())
}

#[tonic::async_trait]
impl FileService for BlobApi {
    async fn upload_file(&self, req: Request<Streaming<FileChunk>>) -> Result<Response<FileResponse>, Status> {
        let limit = key_limit(&req);
        Ok(Response::new(
            self.upload_file_stream(req.into_inner(), limit.as_deref()).await?,
        ))
    }

    async fn download_file(&self, req: Request<FileRequest>) -> Result<Response<BoxStream<FileChunk>>, Status> {
        let limit = key_limit(&req);
        Ok(Response::new(
            self.download_file_stream(req.get_ref(), limit.as_deref()).await?,
        ))
    }

    async fn list_files(&self, req: Request<ListFilesRequest>) -> Result<Response<ListFilesResponse>, Status> {
        let limit = key_limit(&req);
        Ok(Response::new(self.list_files_any(req.into_inner(), limit).await?))
    }

    async fn get_file(&self, req: Request<FileRequest>) -> Result<Response<FileResponse>, Status> {
        let limit = key_limit(&req);
        Ok(Response::new(self.get(&req.into_inner().key, limit.as_deref()).await?))
    }

    async fn delete_file(&self, req: Request<FileRequest>) -> Result<Response<DeleteFileResponse>, Status> {
        let limit = key_limit(&req);
        Ok(Response::new(
            self.delete(&req.into_inner().key, limit.as_deref()).await?,
        ))
    }

    async fn update_file_metadata(
        &self,
        req: Request<UpdateFileMetadataRequest>,
    ) -> Result<Response<FileResponse>, Status> {
        let limit = key_limit(&req);
        Ok(Response::new(
            self.update_metadata(req.into_inner(), limit.as_deref()).await?,
        ))
    }
}

/// Where a DownloadFile starts and which content it expects (`FileRequest.offset` and
/// `FileRequest.expected_hash`), checked against the file once its record is read.
pub(crate) struct DownloadFrom<'a> {
    offset: u64,
    expected_hash: &'a str,
}

impl<'a> DownloadFrom<'a> {
    /// Reads the request's start and expected hash; a negative offset is refused.
    pub(crate) fn of(req: &'a FileRequest) -> Result<Self, BlobError> {
        let offset =
            u64::try_from(req.offset).map_err(|_| BlobError::invalid(format!("offset {} is negative", req.offset)))?;
        Ok(DownloadFrom {
            offset,
            expected_hash: req.expected_hash.as_str(),
        })
    }

    /// The first byte to send of a file with content key `blob_key` and `size` bytes.
    pub(crate) fn check(&self, blob_key: &[u8], size: u64) -> Result<u64, BlobError> {
        if !self.expected_hash.is_empty() && !self.expected_hash.eq_ignore_ascii_case(&hex(blob_key)) {
            return Err(BlobError::FailedPrecondition(format!(
                "the file's content is now {}, not the expected {}: it was replaced; start the download again",
                hex(blob_key),
                self.expected_hash
            )));
        }
        if self.offset > size {
            return Err(BlobError::OutOfRange(format!(
                "offset {} is past the end of the file ({size} bytes)",
                self.offset
            )));
        }
        Ok(self.offset)
    }
}

/// The whole answer in one message: a small object's content from `start`, or the empty last
/// message of an empty file or of a download that starts at the end.
fn one_message(key: &str, blob_key: &[u8], data: Bytes, start: u64) -> BoxStream<FileChunk> {
    let from = (start as usize).min(data.len());
    let msg = FileChunk {
        file_key: key.to_string(),
        checksum: if from == 0 && !data.is_empty() {
            hex(blob_key)
        } else {
            String::new()
        },
        data: data.slice(from..),
        offset: start as i64,
        is_last: true,
        ..Default::default()
    };
    Box::pin(tokio_stream::once(Ok(msg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let t = encode_token("a/b ü");
        assert_eq!(decode_token(&t).unwrap(), "a/b ü");
        assert!(decode_token("xyz").is_err());
        assert!(decode_token("zz").is_err());
    }

    #[test]
    fn split_keeps_bytes_in_order() {
        let data = Bytes::from(vec![7u8; MAX_FRAME * 2 + 5]);
        let parts = split(data.clone());
        assert_eq!(parts.len(), 3);
        assert_eq!(parts.concat(), data.to_vec());
    }
}
