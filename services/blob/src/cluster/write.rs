//! The write path. Chunks stream to the file's remote owners while the upload is still being
//! received (a bounded window per replica, never the whole object); then the record goes to
//! every owner as *pending* (invisible), and once a majority holds it, a second round commits
//! it. The client is acknowledged when a majority committed durably; owners that missed it are
//! in the persisted hand-off queue before the acknowledgement.

use std::{
    collections::{HashSet, VecDeque},
    time::Duration,
};

use bytes::Bytes;
use peervault_proto::v1::{ChunkData, CommitRecordRequest, FileRecord, PutChunksResponse, PutRecordRequest};
use tokio::{sync::mpsc, task::JoinHandle};
use tonic::Code;

use super::{Cluster, Layout, ReplicaState, handoff, majority};
use crate::{
    error::{BlobError, Result},
    store::{
        ChunkMeta, Finished, Ingest,
        records::FileRec,
        replica::{hlc_from_wire, hlc_key, hlc_to_wire, live_record},
    },
};

/// How long the slower replicas may still answer once enough have: a paused replica (one the
/// peer service has not yet found down) costs this, not the replication timeout.
const STRAGGLER_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

/// Runs `calls` concurrently; once `enough(successes)` holds, waits at most
/// [`STRAGGLER_GRACE`] for the rest (those still running are dropped and count as failed).
async fn gather<T, E, F>(calls: Vec<F>, enough: impl Fn(usize) -> bool) -> Vec<(String, Result<T, E>)>
where
    F: std::future::Future<Output = (String, Result<T, E>)>,
{
    use futures_util::StreamExt;
    let mut pending: futures_util::stream::FuturesUnordered<F> = calls.into_iter().collect();
    let mut out = Vec::new();
    let mut ok = 0;
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        if deadline.is_none() && enough(ok) {
            deadline = Some(tokio::time::Instant::now() + STRAGGLER_GRACE);
        }
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d, pending.next()).await {
                Ok(n) => n,
                Err(_) => break,
            },
            None => pending.next().await,
        };
        let Some((id, r)) = next else { break };
        if r.is_ok() {
            ok += 1;
        }
        out.push((id, r));
    }
    out
}

fn clock_of(h: Option<&peervault_proto::v1::HybridTimestamp>) -> (u64, u32, String) {
    h.map(|h| (h.physical_ms, h.logical, h.node_id.clone()))
        .unwrap_or_default()
}

struct RemoteStream {
    id: String,
    tx: Option<mpsc::Sender<ChunkData>>,
    task: JoinHandle<Result<PutChunksResponse, tonic::Status>>,
    failed: bool,
}

/// Streams an upload's chunks to the file's remote owners as they are sealed. Created before
/// the first byte; [`Replicator::forward`] runs on the upload's writer thread after every
/// write. The PutChunks streams are opened with the first chunk to send, so a small object
/// (its content inside the record) costs no stream at all.
pub struct Replicator {
    cluster: Cluster,
    key: String,
    /// Remote owners to stream to.
    targets: Vec<String>,
    streams: Vec<RemoteStream>,
    opened: bool,
    /// Chunks sent (or handed to the streams) so far.
    sent: usize,
    /// Chunks of the upload made durable locally so far.
    durable: usize,
    /// Received bytes from the start of chunk `sent` on, not yet sent.
    buf: VecDeque<Bytes>,
    buffered: usize,
    timeout: Duration,
}

impl Cluster {
    /// A replicator for a new upload of `key`; `None` when this pod is alone (pass-through).
    pub fn replicator(&self, key: &str) -> Option<Replicator> {
        let layout = self.layout();
        if layout.is_solo() {
            return None;
        }
        // Owners the peer service reports down are still tried: under load a health check
        // can time out while the pod is fine, and a pod that is really gone fails fast.
        let targets = layout
            .owners(key)
            .into_iter()
            .filter(|id| !layout.is_self(id))
            .collect();
        Some(Replicator {
            cluster: self.clone(),
            key: key.to_string(),
            targets,
            streams: Vec::new(),
            opened: false,
            sent: 0,
            durable: 0,
            buf: VecDeque::new(),
            buffered: 0,
            timeout: self.inner.cfg.replication_timeout,
        })
    }
}

impl Replicator {
    /// Opens one PutChunks stream per remote owner (once).
    fn open(&mut self) {
        if std::mem::replace(&mut self.opened, true) {
            return;
        }
        for id in &self.targets {
            let Some(mut client) = self.cluster.client(id) else {
                continue;
            };
            let (tx, rx) = mpsc::channel::<ChunkData>(super::WINDOW);
            let task = tokio::spawn(async move {
                client
                    .put_chunks(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .map(tonic::Response::into_inner)
            });
            self.streams.push(RemoteStream {
                id: id.clone(),
                tx: Some(tx),
                task,
                failed: false,
            });
        }
    }

    /// Sends one chunk, as `pieces` (each at most [`super::MAX_PIECE`]), to every stream still
    /// taking chunks.
    async fn send_chunk(&mut self, c: &ChunkMeta, pieces: Vec<Bytes>) {
        self.open();
        let metrics = self.cluster.inner.metrics.clone();
        let hash = Bytes::copy_from_slice(&c.hash);
        for s in &mut self.streams {
            let Some(tx) = &s.tx else { continue };
            let mut ok = true;
            for piece in &pieces {
                let n = piece.len() as u64;
                let msg = ChunkData {
                    hash: hash.clone(),
                    data: piece.clone(),
                };
                if tx.send_timeout(msg, self.timeout).await.is_err() {
                    ok = false;
                    break;
                }
                metrics.bytes_sent.with_label_values(&["write"]).inc_by(n);
            }
            if !ok {
                tracing::warn!(key = %self.key, replica = %s.id, "replica stopped taking chunks; it gets the file from the hand-off queue");
                s.tx = None;
                s.failed = true;
            }
        }
    }

    fn all_stopped(&self) -> bool {
        self.opened && self.streams.iter().all(|s| s.tx.is_none())
    }

    /// The next `size` received bytes as pieces of at most [`super::MAX_PIECE`] (slices, no
    /// copy); `None` when fewer were received through [`Replicator::forward`].
    fn take(&mut self, size: usize) -> Option<Vec<Bytes>> {
        if self.buffered < size {
            return None;
        }
        let mut out = Vec::new();
        let mut left = size;
        while left > 0 {
            let front = self.buf.front_mut()?;
            let n = left.min(front.len()).min(super::MAX_PIECE);
            if n > 0 {
                out.push(front.split_to(n));
            }
            if front.is_empty() {
                self.buf.pop_front();
            }
            left -= n;
        }
        self.buffered -= size;
        if out.is_empty() {
            out.push(Bytes::new());
        }
        Some(out)
    }

    /// The content of chunk `c`: from the bytes received, else read back from the local copy
    /// (a one-message upload, whose chunks are durable by then).
    async fn pieces_of(&mut self, c: &ChunkMeta) -> Option<Vec<Bytes>> {
        if let Some(p) = self.take(c.size as usize) {
            return Some(p);
        }
        self.buf.clear();
        self.buffered = 0;
        let data = match &c.inline {
            Some(d) => d.clone(),
            None => {
                // Through the store: the chunk may be in a segment file, not a file of its own.
                let (s, h) = (self.cluster.store().clone(), c.hash);
                match tokio::task::spawn_blocking(move || s.read_chunk_any(&h)).await {
                    Ok(Ok(d)) => d,
                    _ => return None,
                }
            }
        };
        Some(
            (0..data.len().max(1))
                .step_by(super::MAX_PIECE)
                .map(|i| data.slice(i..(i + super::MAX_PIECE).min(data.len())))
                .collect(),
        )
    }

    async fn send_chunks(&mut self, chunks: &[ChunkMeta]) {
        for c in chunks {
            if self.all_stopped() {
                return;
            }
            match self.pieces_of(c).await {
                Some(p) => self.send_chunk(c, p).await,
                None => {
                    // Without the content no replica gets this chunk now.
                    self.open();
                    for s in &mut self.streams {
                        s.tx = None;
                        s.failed = true;
                    }
                    return;
                }
            }
        }
    }

    /// Takes `data`, just written to `ing`, and hands every chunk `ing` sealed since the last
    /// call to the replica streams straight from memory; every [`super::WINDOW`] chunks the
    /// local copies are made durable here while the streams carry the window to the replicas
    /// (durability on this pod is needed only before the record is committed, not before the
    /// replicas receive the bytes: they verify each chunk against its hash themselves). The
    /// streams' bounded channels are the only buffering. Blocking (writer thread).
    pub fn forward(&mut self, ing: &mut Ingest, data: Bytes) -> Result<()> {
        self.buffered += data.len();
        self.buf.push_back(data);
        let sealed = ing.chunks().len();
        if sealed > self.sent {
            let new: Vec<ChunkMeta> = ing
                .chunks()
                .get(self.sent..)
                .map(<[ChunkMeta]>::to_vec)
                .unwrap_or_default();
            self.sent = sealed;
            let handle = tokio::runtime::Handle::current();
            handle.block_on(self.send_chunks(&new));
        }
        if sealed >= self.durable + super::WINDOW {
            ing.make_durable()?;
            self.durable = sealed;
        }
        Ok(())
    }

    /// Sends what is left of a finished upload's chunks, closes the streams and returns the
    /// remote owners that confirmed every chunk durable (every remote owner when there was
    /// nothing to send).
    async fn finish(mut self, content: &Finished) -> (Cluster, HashSet<String>) {
        let rest: Vec<ChunkMeta> = content
            .blob
            .chunks
            .get(self.sent..)
            .map(<[ChunkMeta]>::to_vec)
            .unwrap_or_default()
            .into_iter()
            // A small object's content rides in the record itself.
            .filter(|c| c.inline.is_none())
            .collect();
        self.send_chunks(&rest).await;
        if !self.opened {
            return (self.cluster, self.targets.into_iter().collect());
        }
        let mut ok = HashSet::new();
        for s in self.streams {
            drop(s.tx);
            match tokio::time::timeout(self.timeout, s.task).await {
                Ok(Ok(Ok(_))) if !s.failed => {
                    ok.insert(s.id);
                }
                Ok(Ok(Err(st))) => {
                    tracing::warn!(key = %self.key, replica = %s.id, code = ?st.code(), error = %st.message(), "replica refused chunks");
                }
                _ => {
                    tracing::warn!(key = %self.key, replica = %s.id, "replica chunk stream failed or timed out");
                }
            }
        }
        (self.cluster, ok)
    }
}

/// What a coordinated write did.
#[derive(Debug, Clone)]
pub struct Written {
    /// The record as written.
    pub record: FileRecord,
    /// The live file it replaced on this pod, when this pod is an owner.
    pub replaced: Option<FileRec>,
    /// Each owner and its state after the write.
    pub replicas: Vec<(String, ReplicaState)>,
}

impl Cluster {
    fn has_quorum(layout: &Layout, key: &str, acked: &HashSet<String>) -> bool {
        let part = crate::store::replica::key_partition(key);
        let check = |owners: &[String]| {
            let live: Vec<&String> = owners.iter().filter(|o| layout.peers.contains_key(*o)).collect();
            live.is_empty() || live.iter().filter(|o| acked.contains(**o)).count() >= majority(live.len())
        };
        check(layout.placement.owners(part)) && layout.previous.as_ref().is_none_or(|p| check(p.owners(part)))
    }

    /// Writes `rec` to its owners: pending round, commit round, hand-off for the rest.
    /// `local` is this pod's ingested content (applied if this pod is an owner, else dropped);
    /// `eligible` are the remote owners that hold the content (every owner for a record
    /// without chunks to send).
    #[tracing::instrument(name = "replicate_record", skip_all, fields(key = %rec.key, deleted = rec.deleted))]
    pub async fn replicate(
        &self,
        rec: FileRecord,
        local: Option<Finished>,
        eligible: Option<&HashSet<String>>,
    ) -> Result<Written> {
        let layout = self.layout();
        let owners = layout.owners(&rec.key);
        let me_owner = owners.iter().any(|o| layout.is_self(o));
        // Round 1: pending everywhere reachable. A replica holding a newer record answers with
        // its clock; the write then takes a later reading and tries again, so it orders after
        // everything a majority has committed.
        let mut rec = rec;
        let mut pending_ok: HashSet<String> = HashSet::new();
        for attempt in 0..3 {
            pending_ok.clear();
            let mut calls = Vec::new();
            for o in &owners {
                if layout.is_self(o) || eligible.is_some_and(|e| !e.contains(o)) {
                    continue;
                }
                let Some(c) = self.calls(o) else { continue };
                let req = PutRecordRequest {
                    record: Some(rec.clone()),
                    pending: true,
                };
                let id = o.clone();
                calls.push(async move { (id, c.put.call(req).await) });
            }
            let mut newer: Option<crate::store::records::Hlc> = None;
            if me_owner && let Some(id) = &layout.self_id {
                let s = self.store().clone();
                let k = rec.key.clone();
                let held = tokio::task::spawn_blocking(move || s.replica_record(&k, false))
                    .await
                    .map_err(|e| BlobError::Unavailable(format!("read task failed: {e}")))??;
                match held.and_then(|h| h.hlc) {
                    Some(h) if clock_of(Some(&h)) >= clock_of(rec.hlc.as_ref()) => newer = Some(hlc_from_wire(&h)),
                    _ => {
                        pending_ok.insert(id.clone());
                    }
                }
            }
            let have = pending_ok.len();
            for (id, r) in gather(calls, |n| n + have >= majority(owners.len())).await {
                match r {
                    Ok(resp) if resp.applied => {
                        pending_ok.insert(id);
                    }
                    Ok(resp) => {
                        if let Some(h) = resp.held {
                            let h = hlc_from_wire(&h);
                            if newer.as_ref().is_none_or(|n| hlc_key(Some(&h)) > hlc_key(Some(n))) {
                                newer = Some(h);
                            }
                        }
                    }
                    Err(st) => {
                        tracing::warn!(key = %rec.key, replica = %id, code = ?st.code(), error = %st.message(), "replica refused the pending record");
                    }
                }
            }
            match newer {
                Some(h) if attempt < 2 => {
                    let _ = self.clock().observe(&h);
                    rec.hlc = Some(hlc_to_wire(&self.now()));
                    tracing::debug!(key = %rec.key, "a replica holds a newer record; writing again with a later clock");
                }
                _ => break,
            }
        }
        if !Self::has_quorum(&layout, &rec.key, &pending_ok) {
            if let Some(f) = local {
                f.discard();
            }
            self.inner.metrics.writes.with_label_values(&["unavailable"]).inc();
            tracing::warn!(key = %rec.key, reached = pending_ok.len(), owners = owners.len(), "write refused: no majority of owners reachable");
            return Err(BlobError::Unavailable(format!(
                "only {} of {} owners of '{}' could be reached (a majority is needed); nothing was stored",
                pending_ok.len(),
                owners.len(),
                crate::store::replica::display_key(&rec.key)
            )));
        }
        crate::pause::point("replicate.before_commit").await;
        // Round 2: commit, this pod's copy at the same time as the remote ones (each owner's
        // fsync is on the critical path once, not one after the other).
        let mut committed: HashSet<String> = HashSet::new();
        let mut calls = Vec::new();
        for o in &pending_ok {
            if layout.is_self(o) {
                continue;
            }
            let Some(c) = self.calls(o) else { continue };
            let req = CommitRecordRequest {
                key: rec.key.clone(),
                hlc: rec.hlc.clone(),
            };
            let full = PutRecordRequest {
                record: Some(rec.clone()),
                pending: false,
            };
            let id = o.clone();
            calls.push(async move {
                let r = match c.commit.call(req).await {
                    // The pending copy expired or the replica restarted: send it whole.
                    Err(st) if st.code() == Code::NotFound => c.put.call(full).await.map(|_| ()),
                    r => r.map(|_| ()),
                };
                (id, r)
            });
        }
        let local_commit = async {
            if me_owner {
                Some(self.store().apply_record(rec.clone(), local).await)
            } else {
                if let Some(f) = local {
                    f.discard();
                }
                None
            }
        };
        // This pod's own commit is counted as if it succeeds (it nearly always does); if it
        // fails, the quorum check below sees it.
        let have = usize::from(me_owner);
        let (local_result, remote) = tokio::join!(local_commit, gather(calls, |n| n + have >= majority(owners.len())));
        let mut replaced = None;
        match local_result {
            Some(Ok((_, old))) => {
                replaced = old;
                if let Some(id) = &layout.self_id {
                    committed.insert(id.clone());
                }
            }
            Some(Err(e)) => tracing::warn!(key = %rec.key, error = %e, "local replica could not apply the record"),
            None => {}
        }
        for (id, r) in remote {
            match r {
                Ok(()) => {
                    committed.insert(id);
                }
                Err(st) => {
                    tracing::warn!(key = %rec.key, replica = %id, code = ?st.code(), error = %st.message(), "replica did not commit the record");
                }
            }
        }
        // Everyone who does not hold it now gets it from the queue, before the client hears.
        let missing: Vec<handoff::Entry> = owners
            .iter()
            .filter(|o| !committed.contains(*o))
            .map(|o| handoff::Entry {
                target: o.clone(),
                record: Some(rec.clone()),
                attempts: 0,
                next_ms: 0,
            })
            .collect();
        let queued = self.enqueue(missing).await;
        let replicas: Vec<(String, ReplicaState)> = owners
            .iter()
            .map(|o| {
                let st = if committed.contains(o) {
                    ReplicaState::Synced
                } else {
                    ReplicaState::Pending
                };
                (o.clone(), st)
            })
            .collect();
        if !Self::has_quorum(&layout, &rec.key, &committed) {
            self.inner.metrics.writes.with_label_values(&["unknown"]).inc();
            tracing::error!(key = %rec.key, committed = committed.len(), owners = owners.len(), "write outcome unknown: fewer than a majority committed");
            return Err(BlobError::Unavailable(format!(
                "the write of '{}' reached {} of {} owners before they stopped answering: its outcome is unknown (it may appear later); retry it",
                crate::store::replica::display_key(&rec.key),
                committed.len(),
                owners.len()
            )));
        }
        queued?;
        self.inner.metrics.writes.with_label_values(&["ok"]).inc();
        if committed.len() == owners.len() {
            self.publish_replicated(&rec.key, "all");
        }
        tracing::debug!(key = %rec.key, committed = committed.len(), owners = owners.len(), "record replicated");
        Ok(Written {
            record: rec,
            replaced,
            replicas,
        })
    }

    /// Commits an upload: the local content and the record, replicated when there are other
    /// members. Returns the stored record and the replicas' states.
    pub async fn put_file(
        &self,
        mut rec: FileRec,
        content: Finished,
        replicator: Option<Replicator>,
    ) -> Result<(FileRec, Vec<(String, ReplicaState)>)> {
        let hlc = self.now();
        rec.hlc = Some(hlc.clone());
        if self.is_solo() && replicator.is_none() {
            let (stored, _) = self.store().put_file(rec, content).await?;
            return Ok((stored, vec![]));
        }
        let eligible = match replicator {
            Some(r) => {
                let (_, ok) = r.finish(&content).await;
                Some(ok)
            }
            None => None,
        };
        rec.blob_key = content.blob.key.to_vec();
        rec.size = content.blob.size;
        let blob = crate::store::records::BlobRec {
            size: content.blob.size,
            chunk_hashes: content.blob.chunks.iter().map(|c| c.hash.to_vec()).collect(),
            chunk_sizes: content.blob.chunks.iter().map(|c| c.size).collect(),
            ..Default::default()
        };
        let inline = match content.blob.chunks.as_slice() {
            [c] => c.inline.clone(),
            _ => None,
        };
        let mut wire = live_record(&rec, &blob, inline);
        wire.hlc = Some(hlc_to_wire(&hlc));
        let eligible = eligible.map(|mut e| {
            // Owners that need no chunks (a small or empty object) are always eligible.
            if content.blob.chunks.iter().all(|c| c.inline.is_some()) {
                for o in self.layout().owners(&rec.key) {
                    e.insert(o);
                }
            }
            e
        });
        let w = self.replicate(wire, Some(content), eligible.as_ref()).await?;
        let stored = crate::store::replica::file_rec(&w.record);
        Ok((stored, w.replicas))
    }
}
