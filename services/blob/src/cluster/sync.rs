//! Bringing one replica up to date with one record: the chunks it lacks (from this pod or any
//! other that holds them), then the record, applied there only if newer. Used by the hand-off
//! queue, read repair and anti-entropy; throttled by `--repair-bytes-per-second`.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use bytes::Bytes;
use peervault_proto::v1::{ChunkData, FileRecord, GetRecordRequest, HasChunksRequest, PutRecordRequest};

use super::Cluster;
use crate::{
    error::{BlobError, Result},
    store::INLINE_MAX,
};

/// Chunks sent to a replica in one PutChunks stream while repairing (bounded, so that one call
/// stays well inside the replication timeout; memory is a few chunks whatever this is).
const CHUNKS_PER_CALL: usize = 8;

/// A token bucket over bytes per second (0: unlimited), shared by every repair worker.
pub struct Throttle {
    rate: u64,
    state: Mutex<(f64, Instant)>,
}

impl Throttle {
    /// A bucket of `rate` bytes per second holding at most one second's worth.
    pub fn new(rate: u64) -> Self {
        Throttle {
            rate,
            state: Mutex::new((rate as f64, Instant::now())),
        }
    }

    /// How long to wait before sending `n` bytes (the bytes are taken now).
    pub fn take(&self, n: u64) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * self.rate as f64;
        s.0 = (s.0 + refill).min(self.rate as f64);
        s.1 = now;
        s.0 -= n as f64;
        if s.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.0 / self.rate as f64)
        }
    }
}

impl Cluster {
    /// Makes sure `target` holds `rec` (or something newer). Returns whether it applied it.
    pub(super) async fn sync_record_to(&self, target: &str, rec: &FileRecord, reason: &'static str) -> Result<bool> {
        let started = Instant::now();
        let layout = self.layout();
        let mut rec = rec.clone();
        // A small object travels inside the record.
        if !rec.deleted
            && rec.inline_data.is_empty()
            && rec.chunk_hashes.len() == 1
            && rec.size as usize <= INLINE_MAX
            && rec.size > 0
            && let (Some(h), Some(&size)) = (rec.chunk_hashes.first(), rec.chunk_sizes.first())
            && let Ok(hash) = <[u8; 32]>::try_from(h.as_ref())
        {
            rec.inline_data = self.fetch_chunk(&rec.key, hash, size).await?;
        }
        let chunked = !rec.deleted && rec.inline_data.is_empty() && !rec.chunk_hashes.is_empty();
        if layout.is_self(target) {
            if reason != "handoff" && self.tombstone_expired(&rec) {
                // As below for a remote replica: not back where it was collected.
                let (s, key) = (self.store().clone(), rec.key.clone());
                let held = tokio::task::spawn_blocking(move || s.replica_record(&key, false))
                    .await
                    .map_err(|e| BlobError::Unavailable(format!("read task failed: {e}")))??;
                if !super::tombstones::push_expired_tombstone(held.as_ref()) {
                    return Ok(false);
                }
            }
            if chunked {
                for (h, &size) in rec.chunk_hashes.iter().zip(&rec.chunk_sizes) {
                    let Ok(hash) = <[u8; 32]>::try_from(h.as_ref()) else {
                        continue;
                    };
                    let s = self.store().clone();
                    if tokio::task::spawn_blocking(move || s.has_chunk(&hash))
                        .await
                        .unwrap_or(Ok(false))?
                    {
                        continue;
                    }
                    let data = self.fetch_chunk(&rec.key, hash, size).await?;
                    self.throttle(reason, data.len() as u64).await;
                    let s = self.store().clone();
                    tokio::task::spawn_blocking(move || s.put_chunk(&hash, &data))
                        .await
                        .map_err(|e| BlobError::Unavailable(format!("write task failed: {e}")))??;
                }
            }
            let (applied, _) = self.store().apply_record(rec, None).await?;
            self.inner
                .metrics
                .repair_duration
                .observe(started.elapsed().as_secs_f64());
            return Ok(applied);
        }
        let mut client = self
            .client(target)
            .ok_or_else(|| BlobError::Unavailable(format!("{target} is not in the membership view")))?;
        if reason != "handoff" && self.tombstone_expired(&rec) {
            // A tombstone past its grace period goes only where an older copy of the file
            // still lives: a replica holding nothing has collected it already (sending it back,
            // e.g. from a read's repair, would undo that) or never held the file. The hand-off
            // queue still delivers it (its target missed the delete).
            let held = self
                .timed(client.get_record(GetRecordRequest { key: rec.key.clone() }))
                .await
                .map_err(|st| BlobError::Unavailable(format!("{target}: {}", st.message())))?
                .record;
            if !super::tombstones::push_expired_tombstone(held.as_ref()) {
                return Ok(false);
            }
        }
        if chunked {
            let mut hashes: Vec<Bytes> = Vec::new();
            let mut sizes: Vec<u32> = Vec::new();
            for (h, &s) in rec.chunk_hashes.iter().zip(&rec.chunk_sizes) {
                if !hashes.contains(h) {
                    hashes.push(h.clone());
                    sizes.push(s);
                }
            }
            for (hs, ss) in hashes.chunks(10_000).zip(sizes.chunks(10_000)) {
                let present = self
                    .timed(client.has_chunks(HasChunksRequest { hashes: hs.to_vec() }))
                    .await
                    .map_err(|st| BlobError::Unavailable(format!("{target}: {}", st.message())))?
                    .present;
                let missing: Vec<([u8; 32], u32)> = hs
                    .iter()
                    .zip(ss)
                    .zip(present.iter().chain(std::iter::repeat(&false)))
                    .filter(|(_, have)| !**have)
                    .filter_map(|((h, &size), _)| <[u8; 32]>::try_from(h.as_ref()).ok().map(|h| (h, size)))
                    .collect();
                for group in missing.chunks(CHUNKS_PER_CALL) {
                    self.send_chunks_to(&mut client, target, &rec.key, group, reason)
                        .await?;
                }
            }
        }
        let applied = self
            .timed(client.put_record(PutRecordRequest {
                record: Some(rec.clone()),
                pending: false,
            }))
            .await
            .map_err(|st| BlobError::Unavailable(format!("{target} refused the record: {}", st.message())))?
            .applied;
        self.inner
            .metrics
            .repair_duration
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(target, key = %rec.key, applied, reason, "replica brought up to date");
        Ok(applied)
    }

    /// Sends `chunks` of record `key` to `target` in one PutChunks stream: each fetched
    /// (local-first) and throttled as the stream needs it, so the replica stores one chunk
    /// while the next arrives, and at most a few chunks are in memory. The call answers once
    /// every chunk is durable there.
    async fn send_chunks_to(
        &self,
        client: &mut super::Client,
        target: &str,
        key: &str,
        chunks: &[([u8; 32], u32)],
        reason: &'static str,
    ) -> Result<()> {
        let (tx, rx) = tokio::sync::mpsc::channel::<ChunkData>(4);
        let (me, owned_key, list) = (self.clone(), key.to_string(), chunks.to_vec());
        let producer = tokio::spawn(async move {
            let mut sent = 0u64;
            for (hash, size) in list {
                let data = me.fetch_chunk(&owned_key, hash, size).await?;
                me.throttle(reason, data.len() as u64).await;
                let h = Bytes::copy_from_slice(&hash);
                for i in (0..data.len().max(1)).step_by(super::MAX_PIECE) {
                    let piece = ChunkData {
                        hash: h.clone(),
                        data: data.slice(i..(i + super::MAX_PIECE).min(data.len())),
                    };
                    if tx.send(piece).await.is_err() {
                        return Ok(sent); // the call ended; its status says why
                    }
                }
                sent += data.len() as u64;
            }
            Ok::<u64, BlobError>(sent)
        });
        let call = self
            .timed(client.put_chunks(tokio_stream::wrappers::ReceiverStream::new(rx)))
            .await;
        let produced = producer
            .await
            .map_err(|e| BlobError::Unavailable(format!("chunk reader failed: {e}")))?;
        // A chunk that could not be read is the cause to report, not the stream cut short.
        let sent = produced?;
        call.map_err(|st| {
            BlobError::Unavailable(format!(
                "{target} refused chunks of '{}': {}",
                crate::store::replica::display_key(key),
                st.message()
            ))
        })?;
        self.inner.metrics.bytes_sent.with_label_values(&[reason]).inc_by(sent);
        Ok(())
    }

    pub(super) async fn throttle(&self, reason: &str, n: u64) {
        if reason == "write" {
            return;
        }
        let wait = self.inner.throttle.take(n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}
