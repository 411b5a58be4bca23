//! gRPC adapters of the blob service: thin conversions between protobuf messages and the store,
//! errors mapped to status through `From<BlobError> for Status`.

pub mod auth;
mod blobs;
mod files;
mod upload;

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
    events: EventPublisher,
    node_id: String,
    grpc_addr: SocketAddr,
}

impl BlobApi {
    /// Serves `store`, announcing changes through `events`.
    pub fn new(store: Store, events: EventPublisher, node_id: String, grpc_addr: SocketAddr) -> Self {
        BlobApi {
            store,
            events,
            node_id,
            grpc_addr,
        }
    }

    /// The store behind the API.
    pub fn store(&self) -> &Store {
        &self.store
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
        let ts = peervault_events_client::now_timestamp();
        let when = rfc3339(ts.seconds, ts.nanos);
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

/// The key prefix the request's caller is limited to, if any.
pub fn key_limit<T>(req: &tonic::Request<T>) -> Option<String> {
    req.extensions()
        .get::<peervault_runtime::Caller>()
        .and_then(|c| c.key_prefix.clone())
}

/// Refuses `key` outside the caller's prefix.
pub fn check_key(limit: Option<&str>, key: &str) -> Result<(), tonic::Status> {
    match limit {
        Some(p) if !key.starts_with(p) => Err(tonic::Status::permission_denied(format!(
            "this credential is limited to keys under '{p}'"
        ))),
        _ => Ok(()),
    }
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

/// A protobuf timestamp from nanoseconds since the epoch.
pub fn timestamp(ns: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

/// RFC 3339 UTC time for JSON payloads.
pub fn rfc3339(seconds: i64, nanos: i32) -> String {
    // Civil-from-days (Howard Hinnant's algorithm): no date crate needed for one format.
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60,
        nanos / 1_000_000
    )
}

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

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(super::rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339(1_704_067_200, 5_000_000), "2024-01-01T00:00:00.005Z");
        assert_eq!(super::rfc3339(951_782_400, 0), "2000-02-29T00:00:00.000Z");
    }
}
