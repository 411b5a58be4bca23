//! What a replica does when another pod calls it: take chunks (verified, durable, one chunk in
//! memory at a time), hold pending records, commit them, apply records if newer, and answer
//! record and digest queries.

use bytes::{Bytes, BytesMut};
use peervault_proto::v1::{
    ChunkData, CommitRecordRequest, FileRecord, GetRecordsResult, HybridTimestamp, PutRecordRequest, PutRecordResponse,
    PutRecordsResult, RecordQuery,
};
use tokio::task::JoinHandle;
use tonic::Status;

use super::{Cluster, batch};
use crate::{
    error::{BlobError, Result},
    store::{
        ReplicaChunks, hex,
        replica::{PARTITIONS, check_record, hlc_from_wire},
    },
};

fn missing_content(key: &str) -> BlobError {
    BlobError::FailedPrecondition(format!(
        "record '{key}' references chunks this pod does not hold: send them with PutChunks first"
    ))
}

/// Largest chunk a replica accepts (the largest `--chunk-size`).
pub const MAX_CHUNK: usize = 16 * 1024 * 1024;

/// Most hashes in one HasChunks call.
pub const MAX_HASHES: usize = 10_000;

fn hash32(b: &[u8]) -> Result<[u8; 32]> {
    <[u8; 32]>::try_from(b).map_err(|_| BlobError::invalid(format!("a chunk hash is 32 bytes, not {}", b.len())))
}

fn check_batch(n: usize) -> Result<()> {
    if n > batch::MAX_ITEMS {
        return Err(BlobError::invalid(format!(
            "{n} items in one batched call; at most {}",
            batch::MAX_ITEMS
        )));
    }
    Ok(())
}

fn clock(h: Option<&HybridTimestamp>) -> Option<(u64, u32, String)> {
    h.map(|h| (h.physical_ms, h.logical, h.node_id.clone()))
}

/// A pending record's answer given what this pod holds: refused with the held clock when that
/// is as new or newer, else held.
fn pending_verdict(cluster: &Cluster, held: Option<FileRecord>, r: FileRecord) -> Result<PutRecordResponse> {
    if let Some(h) = held
        && clock(h.hlc.as_ref()) >= clock(r.hlc.as_ref())
    {
        return Ok(PutRecordResponse {
            applied: false,
            held: h.hlc,
        });
    }
    cluster.hold_pending(r)?;
    Ok(PutRecordResponse {
        applied: true,
        held: None,
    })
}

fn put_result(r: Result<PutRecordResponse>) -> PutRecordsResult {
    match r {
        Ok(resp) => PutRecordsResult {
            response: Some(resp),
            status: None,
        },
        Err(e) => PutRecordsResult {
            response: None,
            status: batch::item_status(&Err(Status::from(e))),
        },
    }
}

/// The writer of a PutChunks stream: held here between chunks, or by the blocking task that
/// stores the latest one (while the next is received).
enum SinkWriter {
    Idle(Option<ReplicaChunks>),
    Writing(JoinHandle<(ReplicaChunks, Result<(bool, u64)>)>),
}

/// Assembles PutChunks pieces into chunks and appends each to a segment as it completes (one
/// at a time, while the next is received); the stream's chunks become durable together at the
/// end — one fdatasync (and one every few MiB on the way) and one index commit, instead of a
/// file and two fsyncs per chunk.
pub struct ChunkSink {
    cluster: Cluster,
    cur: Option<([u8; 32], BytesMut)>,
    writer: SinkWriter,
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
            writer: SinkWriter::Idle(Some(self.store().replica_chunks())),
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
            let v = pending_verdict(self, held, r)?;
            return Ok((v.applied, v.held));
        }
        Ok((self.apply_checked(r).await?, None))
    }

    /// PutRecords: every request as PutRecord would answer it, the pending ones checked against
    /// the held records in one read of the index.
    pub async fn serve_put_records(&self, reqs: Vec<PutRecordRequest>) -> Result<Vec<PutRecordsResult>> {
        check_batch(reqs.len())?;
        let mut out: Vec<Option<Result<PutRecordResponse>>> = (0..reqs.len()).map(|_| None).collect();
        let mut pending = Vec::new();
        let mut whole = Vec::new();
        for (i, q) in reqs.into_iter().enumerate() {
            let Some(r) = q.record else {
                out[i] = Some(Err(BlobError::invalid("PutRecord without a record")));
                continue;
            };
            if let Err(e) = check_record(&r).and_then(|_| self.observe(r.hlc.as_ref())) {
                out[i] = Some(Err(e));
                continue;
            }
            if q.pending {
                pending.push((i, r));
            } else {
                whole.push((i, r));
            }
        }
        if !pending.is_empty() {
            let s = self.store().clone();
            let keys: Vec<String> = pending.iter().map(|(_, r)| r.key.clone()).collect();
            let held: Vec<Result<Option<FileRecord>>> =
                tokio::task::spawn_blocking(move || keys.iter().map(|k| s.replica_record(k, false)).collect())
                    .await
                    .map_err(|e| BlobError::Unavailable(format!("read task failed: {e}")))?;
            for ((i, r), h) in pending.into_iter().zip(held) {
                out[i] = Some(h.and_then(|h| pending_verdict(self, h, r)));
            }
        }
        // Whole records are applied together: the store groups them into one commit.
        let applied = futures_util::future::join_all(whole.into_iter().map(|(i, r)| async move {
            (
                i,
                self.apply_checked(r)
                    .await
                    .map(|applied| PutRecordResponse { applied, held: None }),
            )
        }))
        .await;
        for (i, r) in applied {
            out[i] = Some(r);
        }
        Ok(item_results(out))
    }

    /// CommitRecords: every pending record named is applied; all in one grouped index commit
    /// (one fsync for the batch) before the reply.
    pub async fn serve_commit_records(&self, reqs: Vec<CommitRecordRequest>) -> Result<Vec<PutRecordsResult>> {
        check_batch(reqs.len())?;
        let mut out: Vec<Option<Result<PutRecordResponse>>> = (0..reqs.len()).map(|_| None).collect();
        let mut taken = Vec::new();
        for (i, q) in reqs.into_iter().enumerate() {
            match self.take_pending_checked(&q.key, q.hlc.as_ref()) {
                Ok(r) => taken.push((i, r)),
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        if !taken.is_empty() {
            let s = self.store().clone();
            let probes: Vec<FileRecord> = taken.iter().map(|(_, r)| r.clone()).collect();
            let has: Vec<Result<bool>> =
                tokio::task::spawn_blocking(move || probes.iter().map(|r| s.has_content(r)).collect())
                    .await
                    .map_err(|e| BlobError::Unavailable(format!("check task failed: {e}")))?;
            let applied = futures_util::future::join_all(taken.into_iter().zip(has).map(|((i, r), has)| async move {
                let res = match has {
                    Ok(true) => self
                        .store()
                        .apply_record(r, None)
                        .await
                        .map(|(applied, _)| PutRecordResponse { applied, held: None }),
                    Ok(false) => Err(missing_content(&r.key)),
                    Err(e) => Err(e),
                };
                (i, res)
            }))
            .await;
            for (i, r) in applied {
                out[i] = Some(r);
            }
        }
        Ok(item_results(out))
    }

    /// GetRecords: every query answered from one blocking task.
    pub async fn serve_get_records(&self, queries: Vec<RecordQuery>) -> Result<Vec<GetRecordsResult>> {
        check_batch(queries.len())?;
        let s = self.store().clone();
        let got: Vec<Result<Option<FileRecord>>> = tokio::task::spawn_blocking(move || {
            queries
                .iter()
                .map(|q| {
                    if q.key.is_empty() {
                        return Err(BlobError::invalid("empty key"));
                    }
                    s.replica_record(&q.key, !q.without_data)
                })
                .collect()
        })
        .await
        .map_err(|e| BlobError::Unavailable(format!("read task failed: {e}")))?;
        Ok(got
            .into_iter()
            .map(|r| match r {
                Ok(record) => GetRecordsResult { record, status: None },
                Err(e) => GetRecordsResult {
                    record: None,
                    status: batch::item_status(&Err(Status::from(e))),
                },
            })
            .collect())
    }

    async fn apply_checked(&self, r: FileRecord) -> Result<bool> {
        let s = self.store().clone();
        let probe = r.clone();
        let has = tokio::task::spawn_blocking(move || s.has_content(&probe))
            .await
            .map_err(|e| BlobError::Unavailable(format!("check task failed: {e}")))??;
        if !has {
            return Err(missing_content(&r.key));
        }
        let (applied, _) = self.store().apply_record(r, None).await?;
        Ok(applied)
    }

    /// The pending record named by key and clock, taken out to be committed.
    fn take_pending_checked(&self, key: &str, hlc: Option<&HybridTimestamp>) -> Result<FileRecord> {
        if key.is_empty() {
            return Err(BlobError::invalid("commit without a key"));
        }
        let h = hlc.ok_or_else(|| BlobError::invalid("commit without a clock"))?;
        self.observe(Some(h))?;
        self.take_pending(key, &hlc_from_wire(h)).ok_or_else(|| {
            BlobError::NotFound(format!(
                "no pending record of '{key}' at that clock (expired or this pod restarted): send it with PutRecord"
            ))
        })
    }

    /// CommitRecord: applies the pending record named by key and clock.
    pub async fn serve_commit(&self, key: &str, hlc: Option<&HybridTimestamp>) -> Result<bool> {
        let r = self.take_pending_checked(key, hlc)?;
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
            self.seal().await?;
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

    /// Starts storing the chunk being assembled, if any, once the previous one is stored
    /// (memory stays bounded by two chunks).
    async fn seal(&mut self) -> Result<()> {
        let Some((h, buf)) = self.cur.take() else {
            return Ok(());
        };
        let mut w = self.wait().await?;
        let data = buf.freeze();
        let n = data.len() as u64;
        self.writer = SinkWriter::Writing(tokio::task::spawn_blocking(move || {
            let r = w.put(&h, &data).map(|new| (new, n));
            (w, r)
        }));
        Ok(())
    }

    /// Waits for the chunk being stored, counts it, and takes the writer back.
    async fn wait(&mut self) -> Result<ReplicaChunks> {
        let w = match std::mem::replace(&mut self.writer, SinkWriter::Idle(None)) {
            SinkWriter::Idle(Some(w)) => w,
            SinkWriter::Idle(None) => return Err(BlobError::Unavailable("chunk writer lost after a failure".into())),
            SinkWriter::Writing(t) => {
                let (w, r) = t
                    .await
                    .map_err(|e| BlobError::Unavailable(format!("write task failed: {e}")))?;
                let (new, n) = r?;
                self.cluster.inner.metrics.bytes_received.inc_by(n);
                if new {
                    self.stored += 1;
                    self.bytes += n;
                }
                w
            }
        };
        Ok(w)
    }

    /// Stores the chunk being assembled, if any, and makes every chunk of the stream durable
    /// (bytes first, then the index records).
    pub async fn flush(&mut self) -> Result<()> {
        self.seal().await?;
        let mut w = self.wait().await?;
        let w = tokio::task::spawn_blocking(move || w.sync().map(|()| w))
            .await
            .map_err(|e| BlobError::Unavailable(format!("sync task failed: {e}")))??;
        w.commit().await?;
        Ok(())
    }
}

/// The per-item answers of a batched put or commit, in request order; an item left without an
/// answer (never processed) is UNAVAILABLE rather than silently missing.
fn item_results(out: Vec<Option<Result<PutRecordResponse>>>) -> Vec<PutRecordsResult> {
    out.into_iter()
        .map(|r| put_result(r.unwrap_or_else(|| Err(BlobError::Unavailable("item not processed".into())))))
        .collect()
}
