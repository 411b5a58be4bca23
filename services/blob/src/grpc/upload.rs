//! UploadService (Graviton): bidirectional, resumable uploads acknowledged as data becomes
//! durable.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures_util::FutureExt;
use peervault_proto::v1::{
    UploadAck, UploadComplete, UploadMessage, UploadResponse, upload_message::Message as In,
    upload_response::Response as Out, upload_service_server::UploadService,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming, codegen::BoxStream};
use tracing::Instrument;

use super::{
    BlobApi,
    upload_relay::{RELAYED_HEADER, SessionOrigin, holder_of},
};
use crate::{
    error::BlobError,
    store::{Durable, Finished, Ingest, hex, now_ns},
    validate,
};

static UPLOAD_SEQ: AtomicU64 = AtomicU64::new(0);

/// A new upload id: 32 random-looking hex characters and, on a pod that knows its member id,
/// `.` and that id in hex, so that a session resumed through another pod (a Kubernetes Service
/// picks any) is relayed to the one that holds the upload.
fn new_upload_id(node: &str, member: Option<&str>) -> String {
    let n = UPLOAD_SEQ.fetch_add(1, Ordering::Relaxed);
    let seed = format!("{node}/{}/{n}/{}", now_ns(), std::process::id());
    let id = blake3::hash(seed.as_bytes()).to_hex()[..32].to_string();
    match member {
        Some(m) => format!("{id}.{}", hex(m.as_bytes())),
        None => id,
    }
}

fn ack(id: &str, received: u64) -> Result<UploadResponse, Status> {
    Ok(UploadResponse {
        response: Some(Out::Ack(UploadAck {
            upload_id: id.to_string(),
            received_bytes: received,
        })),
    })
}

/// Parses an expected hash: 32 raw bytes or 64 hex characters.
fn expected_hash(raw: &Bytes) -> Result<Option<[u8; 32]>, Status> {
    if raw.is_empty() {
        return Ok(None);
    }
    validate::blob_key(raw).map(Some).map_err(|_| {
        Status::invalid_argument("expected_hash must be the 32-byte BLAKE3 hash or its 64-character hex form")
    })
}

/// While data keeps streaming in, sealed chunks are made durable (and acknowledged) once this
/// many bytes are pending; when the client pauses, at once.
const ACK_EVERY: u64 = 8 * 1024 * 1024;

/// Appends `data`: on the blocking pool, unless it stays in memory (a small object: no disk
/// I/O, so no thread hand-off either).
pub(super) async fn write(ing: Ingest, data: Bytes) -> Result<Ingest, BlobError> {
    let mut ing = ing;
    let span = tracing::debug_span!("chunk_write", bytes = data.len());
    if ing.stays_in_memory(data.len()) {
        return span.in_scope(|| ing.write(&data)).map(|()| ing);
    }
    tokio::task::spawn_blocking(move || span.in_scope(|| ing.write(&data).map(|()| ing)))
        .await
        .map_err(|e| BlobError::Unavailable(format!("write task failed: {e}")))?
}

/// Seals the content ([`Ingest::finish`]): on the blocking pool, unless it is all in memory.
pub(super) async fn finish(ing: Ingest) -> Result<(Finished, Durable), BlobError> {
    let span = tracing::debug_span!("finish");
    if ing.stays_in_memory(0) {
        return span.in_scope(|| ing.finish());
    }
    tokio::task::spawn_blocking(move || span.in_scope(|| ing.finish()))
        .await
        .map_err(|e| BlobError::Unavailable(format!("write task failed: {e}")))?
}

async fn make_durable(ing: Ingest) -> Result<(Ingest, Durable), BlobError> {
    let mut ing = ing;
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(|| ing.make_durable().map(|done| (ing, done))))
        .await
        .map_err(|e| BlobError::Unavailable(format!("sync task failed: {e}")))?
}

impl BlobApi {
    /// Runs one upload session; every reply goes to `out`. Returns the error to end with.
    async fn upload_session(
        &self,
        mut input: Streaming<UploadMessage>,
        out: &mpsc::Sender<Result<UploadResponse, Status>>,
        origin: SessionOrigin,
    ) -> Result<(), Status> {
        let start = match input.message().await? {
            Some(UploadMessage {
                message: Some(In::Start(s)),
            }) => s,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first message of an upload must be `start`",
                ));
            }
            None => return Ok(()),
        };
        if start.total_size < 0 {
            return Err(Status::invalid_argument("total_size must not be negative"));
        }
        validate::metadata(&start.attributes).map_err(Status::from)?;
        // Relayed only when held elsewhere: an upload this pod holds is served here even if the
        // id names a member id this pod had before (a restart with a new address).
        if !origin.relayed
            && let Some(holder) = holder_of(&start.upload_id)
            && !self.cluster.layout().is_self(&holder)
            && matches!(self.store.get_upload(&start.upload_id), Err(BlobError::NotFound(_)))
        {
            return self.relay_session(&holder, start, input, out, &origin).await;
        }
        let store = self.store.clone();
        let (id, session, attributes, mut ingest) = if start.upload_id.is_empty() {
            let member = self.cluster.layout().self_id.clone();
            let id = new_upload_id(&self.node_id, member.as_deref());
            let declared = (start.total_size > 0).then_some(start.total_size as u64);
            let ing = store.ingest(declared).map_err(|e| self.status(e))?;
            let session = store
                .create_upload(&id, start.total_size as u64, start.attributes.clone())
                .await
                .map_err(|e| self.status(e))?;
            tracing::info!(upload_id = %id, total_size = start.total_size, "upload started");
            (id, session, start.attributes.clone(), ing)
        } else {
            let id = start.upload_id.clone();
            // This stream becomes the upload's one live session: an older stream still running
            // on the same id is refused from its next append on.
            let (rec, rows) = store.claim_upload(&id).await.map_err(|e| self.status(e))?;
            let s = store.clone();
            let total = rec.total_size;
            let ing = tokio::task::spawn_blocking(move || s.resume_ingest(total, &rows))
                .await
                .map_err(|e| Status::internal(format!("resume task failed: {e}")))?
                .map_err(|e| self.status(e))?;
            tracing::info!(upload_id = %id, session = rec.session, received = ing.len(), "upload resumed");
            (id, rec.session, rec.attributes, ing)
        };
        tracing::Span::current().record("upload_id", id.as_str());
        if out.send(ack(&id, ingest.len())).await.is_err() {
            return Ok(());
        }

        // Protocol errors end the upload for good; a dropped stream leaves it resumable.
        let mut peeked = None;
        loop {
            let next = match peeked.take() {
                Some(r) => r,
                None => input.message().await,
            };
            let msg = match next {
                Ok(Some(m)) => m,
                Ok(None) => {
                    tracing::info!(upload_id = %id, received = ingest.len(), "upload stream closed before complete; resumable");
                    return Ok(());
                }
                Err(e) => {
                    tracing::info!(upload_id = %id, received = ingest.len(), error = %e, "upload stream broken; resumable");
                    return Err(e);
                }
            };
            match msg.message {
                Some(In::Chunk(c)) => {
                    let at = ingest.len();
                    if c.offset < 0 || c.offset as u64 != at {
                        let _ = store.abort_upload(&id, Some(session)).await;
                        return Err(Status::invalid_argument(format!(
                            "chunk offset {} but {at} bytes were received: offsets must be contiguous ({}); the upload was abandoned",
                            c.offset,
                            if c.offset > at as i64 { "gap" } else { "overlap" }
                        )));
                    }
                    ingest = match write(ingest, c.data).await {
                        Ok(x) => x,
                        Err(e) => {
                            let _ = store.abort_upload(&id, Some(session)).await;
                            return Err(self.status(e));
                        }
                    };
                    if ingest.pending_bytes() == 0 {
                        continue;
                    }
                    if ingest.pending_bytes() < ACK_EVERY {
                        // More data already waiting: keep streaming and sync later in one go.
                        if let Some(r) = input.message().now_or_never() {
                            peeked = Some(r);
                            continue;
                        }
                    }
                    let (ing, done) = make_durable(ingest).await.map_err(|e| self.status(e))?;
                    ingest = ing;
                    if !done.is_empty() {
                        let received = match store.append_upload(&id, session, &done).await {
                            Ok(n) => n,
                            Err(e) => {
                                if matches!(e, BlobError::Aborted(_)) {
                                    store.metrics().sessions_superseded.inc();
                                    tracing::info!(upload_id = %id, session, error = %e, "upload session superseded; stream ended");
                                }
                                return Err(self.status(e));
                            }
                        };
                        ingest.committed(&done);
                        if out.send(ack(&id, received)).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                Some(In::Complete(c)) => {
                    let expected = match expected_hash(&c.expected_hash) {
                        Ok(e) => e,
                        Err(e) => {
                            let _ = store.abort_upload(&id, Some(session)).await;
                            return Err(e);
                        }
                    };
                    let (mut finished, _) = match finish(ingest).await {
                        Ok(f) => f,
                        Err(e) => {
                            let _ = store.abort_upload(&id, Some(session)).await;
                            return Err(self.status(e));
                        }
                    };
                    if let Some(want) = expected
                        && want != finished.blob.key
                    {
                        let got = hex(&finished.blob.key);
                        finished.discard();
                        let _ = store.abort_upload(&id, Some(session)).await;
                        return Err(Status::invalid_argument(format!(
                            "content hashes to {got} but expected_hash is {}; nothing was stored",
                            hex(&want)
                        )));
                    }
                    finished.blob.content_type = attributes
                        .get("content-type")
                        .or_else(|| attributes.get("content_type"))
                        .cloned()
                        .unwrap_or_else(|| "application/octet-stream".into());
                    finished.blob.attributes = attributes.clone();
                    let elapsed = finished.elapsed();
                    let key = finished.blob.key;
                    let size = finished.blob.size;
                    if self.cluster.replicates() {
                        // A replicated blob is a record on its owners; until that write
                        // succeeds the upload stays resumable (its chunks are still its own).
                        let (_, replicas) = match self.cluster.put_blob(finished).await {
                            Ok(x) => x,
                            Err(BlobError::Unavailable(m)) => {
                                return Err(Status::unavailable(format!(
                                    "{m}; the upload stays resumable: start again with upload_id {id} and complete it once the pods are back"
                                )));
                            }
                            Err(e) => return Err(self.status(e)),
                        };
                        if let Err(e) = store.abort_upload(&id, Some(session)).await {
                            tracing::debug!(upload_id = %id, error = %e, "upload record already gone after its blob was stored");
                        }
                        tracing::debug!(upload_id = %id, replicas = replicas.len(), "blob replicated");
                    } else {
                        store
                            .complete_upload(&id, session, finished)
                            .await
                            .map_err(|e| self.status(e))?;
                    }
                    store
                        .metrics()
                        .upload_duration
                        .with_label_values(&["blob"])
                        .observe(elapsed.as_secs_f64());
                    tracing::info!(upload_id = %id, blob = %hex(&key), size, "blob stored");
                    let _ = out.send(ack(&id, size)).await;
                    let _ = out
                        .send(Ok(UploadResponse {
                            response: Some(Out::Complete(UploadComplete {
                                key: Bytes::copy_from_slice(&key),
                                size: size as i64,
                                hash: Bytes::copy_from_slice(&key),
                            })),
                        }))
                        .await;
                    return Ok(());
                }
                Some(In::Ack(_)) => {} // acknowledgements flow server → client; ignore echoes
                Some(In::Start(_)) => {
                    let _ = store.abort_upload(&id, Some(session)).await;
                    return Err(Status::invalid_argument("a second `start` in one upload stream"));
                }
                None => {
                    let _ = store.abort_upload(&id, Some(session)).await;
                    return Err(Status::invalid_argument("an upload message with no content"));
                }
            }
        }
    }
}

#[tonic::async_trait]
impl UploadService for BlobApi {
    async fn upload(
        &self,
        req: Request<Streaming<UploadMessage>>,
    ) -> Result<Response<BoxStream<UploadResponse>>, Status> {
        super::check_unlimited(super::key_limit(&req).as_deref())?;
        let origin = SessionOrigin {
            caller: req.extensions().get::<peervault_runtime::Caller>().cloned(),
            timeout: req.metadata().get("grpc-timeout").cloned(),
            relayed: req.metadata().contains_key(RELAYED_HEADER),
        };
        let input = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let api = self.clone();
        let span = tracing::info_span!("upload_session", upload_id = tracing::field::Empty);
        tokio::spawn(
            async move {
                if let Err(status) = api.upload_session(input, &tx, origin).await {
                    let _ = tx.send(Err(status)).await;
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_ids_name_their_holder_and_garbage_names_none() {
        let id = new_upload_id("blob-0", Some("10.0.0.5:8080"));
        assert_eq!(holder_of(&id).as_deref(), Some("10.0.0.5:8080"));
        let plain = new_upload_id("blob-0", None);
        assert_eq!(plain.len(), 32);
        assert_eq!(holder_of(&plain), None);
        for bad in ["abc.", "abc.0", "abc.zz", "abc.ff", "abc.4"] {
            assert_eq!(holder_of(bad), None, "{bad}");
        }
        assert_ne!(new_upload_id("blob-0", None), new_upload_id("blob-0", None));
    }
}
