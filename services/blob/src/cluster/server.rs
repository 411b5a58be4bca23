//! What a replica does when another pod calls it: take chunks (verified, durable, one chunk in
//! memory at a time), hold pending records, commit them, apply records if newer, and answer
//! record and digest queries.

use bytes::{Bytes, BytesMut};
use peervault_proto::v1::{ChunkData, FileRecord, HybridTimestamp};

use super::Cluster;
use crate::{
    error::{BlobError, Result},
    store::{
        hex,
        replica::{PARTITIONS, check_record, hlc_from_wire},
    },
};

/// Largest chunk a replica accepts (the largest `--chunk-size`).
pub const MAX_CHUNK: usize = 16 * 1024 * 1024;

/// Most hashes in one HasChunks call.
pub const MAX_HASHES: usize = 10_000;

fn hash32(b: &[u8]) -> Result<[u8; 32]> {
    <[u8; 32]>::try_from(b).map_err(|_| BlobError::invalid(format!("a chunk hash is 32 bytes, not {}", b.len())))
}

/// Assembles PutChunks pieces into chunks and stores each as it completes.
pub struct ChunkSink {
    cluster: Cluster,
    cur: Option<([u8; 32], BytesMut)>,
    /// Chunks newly stored.
    pub stored: u32,
    /// Bytes newly stored.
    pub bytes: u64,
}

impl Cluster {
    /// A sink for one PutChunks stream.
    pub fn chunk_sink(&self) -> ChunkSink {
        ChunkSink {
            cluster: self.clone(),
            cur: None,
            stored: 0,
            bytes: 0,
        }
    }

    fn observe(&self, h: Option<&HybridTimestamp>) -> Result<()> {
        let Some(h) = h else {
            return Err(BlobError::invalid("record without a clock"));
        };
        if let Err(e) = self.clock().observe(&hlc_from_wire(h)) {
            self.inner.metrics.clock_refusals.inc();
            tracing::error!(error = %e, "clock reading refused");
            self.inner.events.publish(
                peervault_events_client::EventBuilder::new("alerts", "storage_alert")
                    .data(serde_json::json!({
                        "alert": "clock_skew",
                        "severity": "critical",
                        "message": e.to_string(),
                        "node": self.inner.ctx.node_id,
                    }))
                    .build(),
            );
            return Err(BlobError::FailedPrecondition(e.to_string()));
        }
        Ok(())
    }

    /// PutRecord: holds the record pending (unless a newer one is held: its clock is
    /// returned), or applies it now if newer.
    pub async fn serve_put_record(&self, r: FileRecord, pending: bool) -> Result<(bool, Option<HybridTimestamp>)> {
        check_record(&r)?;
        self.observe(r.hlc.as_ref())?;
        if pending {
            let s = self.store().clone();
            let k = r.key.clone();
            let held = tokio::task::spawn_blocking(move || s.replica_record(&k, false))
                .await
                .map_err(|e| BlobError::Unavailable(format!("read task failed: {e}")))??;
            let clock = |h: Option<&HybridTimestamp>| h.map(|h| (h.physical_ms, h.logical, h.node_id.clone()));
            if let Some(h) = held
                && clock(h.hlc.as_ref()) >= clock(r.hlc.as_ref())
            {
                return Ok((false, h.hlc));
            }
            self.hold_pending(r)?;
            return Ok((true, None));
        }
        Ok((self.apply_checked(r).await?, None))
    }

    async fn apply_checked(&self, r: FileRecord) -> Result<bool> {
        let s = self.store().clone();
        let probe = r.clone();
        let has = tokio::task::spawn_blocking(move || s.has_content(&probe))
            .await
            .map_err(|e| BlobError::Unavailable(format!("check task failed: {e}")))??;
        if !has {
            return Err(BlobError::FailedPrecondition(format!(
                "record '{}' references chunks this pod does not hold: send them with PutChunks first",
                r.key
            )));
        }
        let (applied, _) = self.store().apply_record(r, None).await?;
        Ok(applied)
    }

    /// CommitRecord: applies the pending record named by key and clock.
    pub async fn serve_commit(&self, key: &str, hlc: Option<&HybridTimestamp>) -> Result<bool> {
        if key.is_empty() {
            return Err(BlobError::invalid("commit without a key"));
        }
        let h = hlc.ok_or_else(|| BlobError::invalid("commit without a clock"))?;
        self.observe(Some(h))?;
        let Some(r) = self.take_pending(key, &hlc_from_wire(h)) else {
            return Err(BlobError::NotFound(format!(
                "no pending record of '{key}' at that clock (expired or this pod restarted): send it with PutRecord"
            )));
        };
        self.apply_checked(r).await
    }

    /// HasChunks.
    pub async fn serve_has_chunks(&self, hashes: Vec<Bytes>) -> Result<Vec<bool>> {
        if hashes.len() > MAX_HASHES {
            return Err(BlobError::invalid(format!(
                "{} hashes in one call; at most {MAX_HASHES}",
                hashes.len()
            )));
        }
        let hs: Vec<[u8; 32]> = hashes.iter().map(|h| hash32(h)).collect::<Result<_>>()?;
        let s = self.store().clone();
        tokio::task::spawn_blocking(move || hs.iter().map(|h| s.has_chunk(h)).collect::<Result<Vec<bool>>>())
            .await
            .map_err(|e| BlobError::Unavailable(format!("check task failed: {e}")))?
    }

    /// GetChunk: the whole verified chunk (the adapter splits it into messages).
    pub async fn serve_get_chunk(&self, hash: &[u8]) -> Result<Bytes> {
        let h = hash32(hash)?;
        let s = self.store().clone();
        tokio::task::spawn_blocking(move || s.read_chunk_any(&h))
            .await
            .map_err(|e| BlobError::Unavailable(format!("read task failed: {e}")))?
    }

    /// GetRecord.
    pub async fn serve_get_record(&self, key: &str) -> Result<Option<FileRecord>> {
        if key.is_empty() {
            return Err(BlobError::invalid("empty key"));
        }
        let s = self.store().clone();
        let k = key.to_string();
        tokio::task::spawn_blocking(move || s.replica_record(&k, true))
            .await
            .map_err(|e| BlobError::Unavailable(format!("read task failed: {e}")))?
    }

    /// PutApiKeys.
    pub async fn serve_put_api_keys(&self, records: Vec<Bytes>) -> Result<u32> {
        let s = self.store().clone();
        tokio::task::spawn_blocking(move || s.apply_api_keys(&records))
            .await
            .map_err(|e| BlobError::Unavailable(format!("key task failed: {e}")))?
    }

    /// Sends every API key record of this pod to every other member (after a key was created
    /// or revoked here); anti-entropy compares key tables too, so a pod missed now catches up.
    pub async fn spread_api_keys(&self) {
        let s = self.store().clone();
        let Ok(Ok((records, _))) = tokio::task::spawn_blocking(move || s.api_key_records()).await else {
            return;
        };
        let layout = self.layout();
        if layout.is_solo() {
            return;
        }
        let calls = layout.peers.keys().filter(|id| !layout.is_self(id)).filter_map(|id| {
            let mut c = self.client(id)?;
            let req = peervault_proto::v1::PutApiKeysRequest {
                records: records.clone(),
            };
            let me = self.clone();
            let id = id.clone();
            Some(async move {
                if let Err(st) = me.timed(c.put_api_keys(req)).await {
                    tracing::debug!(peer = %id, error = %st.message(), "API keys not sent; anti-entropy will");
                }
            })
        });
        futures_util::future::join_all(calls).await;
    }

    /// Digests of the given partitions (all when empty).
    pub async fn serve_digests(&self, partitions: Vec<u32>) -> Result<(Vec<u32>, Vec<Bytes>)> {
        if partitions.iter().any(|p| *p as usize >= PARTITIONS) {
            return Err(BlobError::invalid(format!("partitions are 0..{PARTITIONS}")));
        }
        let s = self.store().clone();
        let all = tokio::task::spawn_blocking(move || s.record_digests())
            .await
            .map_err(|e| BlobError::Unavailable(format!("digest task failed: {e}")))??;
        let parts: Vec<u32> = if partitions.is_empty() {
            (0..PARTITIONS as u32).collect()
        } else {
            partitions
        };
        let digests = parts
            .iter()
            .map(|p| Bytes::copy_from_slice(all.get(*p as usize).map(|d| &d[..]).unwrap_or(&[])))
            .collect();
        Ok((parts, digests))
    }
}

impl ChunkSink {
    /// Takes one PutChunks message.
    pub async fn push(&mut self, m: ChunkData) -> Result<()> {
        let h = hash32(&m.hash)?;
        let same = self.cur.as_ref().is_some_and(|(c, _)| *c == h);
        if !same {
            self.flush().await?;
            self.cur = Some((h, BytesMut::new()));
        }
        if let Some((_, buf)) = &mut self.cur {
            if buf.len() + m.data.len() > MAX_CHUNK {
                return Err(BlobError::invalid(format!(
                    "chunk {} exceeds the largest chunk size of {MAX_CHUNK} bytes",
                    hex(&h)
                )));
            }
            buf.extend_from_slice(&m.data);
        }
        Ok(())
    }

    /// Stores the chunk being assembled, if any.
    pub async fn flush(&mut self) -> Result<()> {
        let Some((h, buf)) = self.cur.take() else { return Ok(()) };
        let data = buf.freeze();
        let n = data.len() as u64;
        let s = self.cluster.store().clone();
        let new = tokio::task::spawn_blocking(move || s.put_chunk(&h, &data))
            .await
            .map_err(|e| BlobError::Unavailable(format!("write task failed: {e}")))??;
        self.cluster.inner.metrics.bytes_received.inc_by(n);
        if new {
            self.stored += 1;
            self.bytes += n;
        }
        Ok(())
    }
}
