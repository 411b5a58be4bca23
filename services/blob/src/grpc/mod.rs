//! gRPC adapters of the blob service: thin conversions between protobuf messages and the store,
//! errors mapped to status through `From<BlobError> for Status`.

pub mod auth;
mod blobs;
mod files;
pub mod replication;
mod upload;
mod upload_relay;

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use peervault_events_client::{EventBuilder, EventPublisher};
use peervault_proto::v1::{FileOperationEvent, FileReplica, FileResponse, event::Payload};
use peervault_runtime::ServiceContext;

use crate::store::{Store, hex, records::FileRec};

/// Largest data field in one streamed message: well under every client's default 4 MiB limit.
pub const MAX_FRAME: usize = 1024 * 1024;

/// Messages buffered per download stream beyond the one being produced (flow control: a slow
/// reader stops the producer here instead of growing memory).
const STREAM_BUFFER: usize = 2;

/// The blob service's gRPC face. Cheap to clone.
#[derive(Clone)]
pub struct BlobApi {
    store: Store,
    cluster: crate::cluster::Cluster,
    events: EventPublisher,
    node_id: String,
    grpc_addr: SocketAddr,
}

impl BlobApi {
    /// Serves `store`, announcing changes through `events`.
    pub fn new(
        store: Store,
        events: EventPublisher,
        node_id: String,
        grpc_addr: SocketAddr,
        cluster: crate::cluster::Cluster,
    ) -> Self {
        BlobApi {
            store,
            cluster,
            events,
            node_id,
            grpc_addr,
        }
    }

    /// The store behind the API.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The response for `f` with the replicas a coordinated call reported (none: this pod).
    fn file_response_with(&self, f: &FileRec, replicas: &crate::cluster::Replicas) -> FileResponse {
        let mut r = self.file_response(f);
        if !replicas.is_empty() {
            let layout = self.cluster.layout();
            r.replicas = replicas
                .iter()
                .map(|(id, st)| FileReplica {
                    peer_id: id.clone(),
                    status: st.as_str().into(),
                    created_at: r.created_at,
                    address: layout.peers.get(id).map(|p| p.endpoint.clone()).unwrap_or_default(),
                    updated_at: r.updated_at,
                })
                .collect();
        }
        r
    }

    fn file_response(&self, f: &FileRec) -> FileResponse {
        let created = timestamp(f.created_ns);
        let updated = timestamp(f.updated_ns);
        FileResponse {
            key: f.key.clone(),
            name: f.name.clone(),
            size: f.size as i64,
            content_type: f.content_type.clone(),
            hash: hex(&f.blob_key),
            created_at: Some(created),
            updated_at: Some(updated),
            metadata: f.metadata.clone(),
            replicas: vec![FileReplica {
                peer_id: self.node_id.clone(),
                status: "synced".into(),
                created_at: Some(created),
                address: self.grpc_addr.to_string(),
                updated_at: Some(updated),
            }],
            blob_key: Bytes::copy_from_slice(&f.blob_key),
        }
    }

    fn publish_file_event(&self, kind: &str, short: &str, f: &FileRec) {
        let ts = peervault_runtime::time::now_timestamp();
        let when = peervault_runtime::time::rfc3339(&ts);
        let mut data = serde_json::json!({
            "key": f.key,
            "node": self.node_id,
            "timestamp": when,
        });
        if kind != "file_deleted" {
            data["size"] = serde_json::json!(f.size);
            data["hash"] = serde_json::json!(hex(&f.blob_key));
        }
        self.events.publish(
            EventBuilder::new("file_operations", kind)
                .data(data)
                .payload(Payload::FileOperation(FileOperationEvent {
                    event_type: short.into(),
                    file_key: f.key.clone(),
                    peer_id: self.node_id.clone(),
                    timestamp: Some(ts),
                    metadata: f.metadata.clone(),
                    size: f.size as i64,
                }))
                .build(),
        );
    }
}

/// One piece of content on its way to a client.
pub(crate) struct Piece {
    /// Absolute offset in the object.
    pub offset: u64,
    /// The bytes (a slice of a verified chunk).
    pub data: Bytes,
    /// Whether this piece ends the requested range.
    pub last: bool,
    /// The chunk's hash when the piece is one whole chunk (it then doubles as a checksum).
    pub whole_chunk: Option<[u8; 32]>,
}

/// Streams `[start, end)` of `blob` as pieces of at most [`MAX_FRAME`] bytes: each chunk is read
/// and verified on the blocking pool, the queue to the client is [`STREAM_BUFFER`] deep (a slow
/// reader stops the producer), and the blob's chunks stay pinned until the stream ends. A failed
/// read ends the stream with its status (DATA_LOSS for a corrupt or missing chunk).
pub(crate) fn stream_range<M: Send + 'static>(
    store: &Store,
    blob: crate::store::records::BlobRec,
    start: u64,
    end: u64,
    to_message: impl Fn(Piece) -> M + Send + 'static,
) -> tonic::codegen::BoxStream<M> {
    let pin = store.pin_blob(&blob);
    let store = store.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<M, tonic::Status>>(STREAM_BUFFER);
    tokio::spawn(async move {
        let _pin = pin;
        let mut chunk_start = 0u64;
        for (h, &size) in blob.chunk_hashes.iter().zip(&blob.chunk_sizes) {
            let chunk_end = chunk_start + size as u64;
            if chunk_end <= start || chunk_start >= end {
                chunk_start = chunk_end;
                continue;
            }
            let Ok(hash) = <[u8; 32]>::try_from(h.as_slice()) else {
                let _ = tx.send(Err(tonic::Status::data_loss("corrupt chunk reference"))).await;
                return;
            };
            let s = store.clone();
            let data = match tokio::task::spawn_blocking(move || s.read_chunk(&hash, size)).await {
                Ok(Ok(d)) => d,
                Ok(Err(e)) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(tonic::Status::internal(format!("read task failed: {e}"))))
                        .await;
                    return;
                }
            };
            let from = start.max(chunk_start) - chunk_start;
            let to = end.min(chunk_end) - chunk_start;
            let whole = from == 0 && to == size as u64 && data.len() <= MAX_FRAME;
            let mut offset = chunk_start + from;
            for piece in files::split(data.slice(from as usize..to as usize)) {
                let len = piece.len() as u64;
                let msg = to_message(Piece {
                    offset,
                    data: piece,
                    last: offset + len == end,
                    whole_chunk: whole.then_some(hash),
                });
                if tx.send(Ok(msg)).await.is_err() {
                    return; // the client went away
                }
                offset += len;
            }
            chunk_start = chunk_end;
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// The key prefix the request's caller is limited to, if any.
pub fn key_limit<T>(req: &tonic::Request<T>) -> Option<String> {
    req.extensions()
        .get::<peervault_runtime::Caller>()
        .and_then(|c| c.key_prefix.clone())
}

/// Refuses `key` outside the caller's prefix (the runtime's confinement rule).
pub fn check_key(limit: Option<&str>, key: &str) -> Result<(), tonic::Status> {
    peervault_runtime::auth::confine::check_key(limit, key)
}

/// Refuses content-addressed access for callers limited to a key prefix (a blob key would
/// reach content outside it).
pub fn check_unlimited(limit: Option<&str>) -> Result<(), tonic::Status> {
    match limit {
        Some(p) => Err(tonic::Status::permission_denied(format!(
            "this credential is limited to keys under '{p}' and cannot use the content-addressed blob API"
        ))),
        None => Ok(()),
    }
}

pub use peervault_runtime::time::timestamp_from_ns as timestamp;

/// Runs garbage collection every `--gc-interval` (and removes orphaned chunk files at start-up
/// and every tenth pass) until shutdown.
pub fn spawn_gc(ctx: ServiceContext, store: Store) {
    let interval = store.config().gc_interval.max(Duration::from_millis(100));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pass = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = ctx.draining() => return,
            }
            if pass.is_multiple_of(10) {
                let s = store.clone();
                match tokio::task::spawn_blocking(move || s.remove_orphan_chunk_files()).await {
                    Ok(Err(e)) => tracing::warn!(error = %e, "orphan scan failed"),
                    Err(e) => tracing::warn!(error = %e, "orphan scan task failed"),
                    Ok(Ok(_)) => {}
                }
            }
            pass += 1;
            if let Err(e) = store.collect_garbage().await {
                tracing::warn!(error = %e, "garbage collection pass failed");
            }
        }
    });
}
