//! The read path. Records: asked of a majority of the owners (this pod's copy first), the
//! newest clock wins, stale owners are repaired in the background. Chunks: the local copy first,
//! then the healthiest owner, failing over on error or hash mismatch; a corrupt local copy is
//! replaced by a good one.

use std::{collections::HashSet, time::Duration};

use bytes::Bytes;
use futures_util::{StreamExt, stream::FuturesUnordered};
use peervault_proto::v1::{FileRecord, GetChunkRequest, ListRecordsRequest, RecordQuery};

use super::{Cluster, Layout, majority};
use crate::{
    error::{BlobError, Result},
    store::{hex, replica::is_internal_key},
};

/// A key past every record of the store's own (they start with `\u{1}`) and before every user
/// key (no user key holds a control character): file listings start after it.
const LAST_INTERNAL: &str = "\u{1f}";

/// A replica's state as FileResponse.replicas reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// Holds the newest record.
    Synced,
    /// Holds an older record or none; the hand-off queue or read repair brings it up to date.
    Pending,
    /// Did not answer.
    Unreachable,
}

impl ReplicaState {
    /// The published status string.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Synced => "synced",
            ReplicaState::Pending => "pending",
            ReplicaState::Unreachable => "unreachable",
        }
    }
}

/// The result of a majority read.
#[derive(Debug, Clone)]
pub struct ReadOutcome {
    /// The newest record found (a tombstone included); `None` when no owner knows the key.
    pub record: Option<FileRecord>,
    /// Owners and their states.
    pub replicas: Vec<(String, ReplicaState)>,
    /// Whether this pod holds the newest record.
    pub local_current: bool,
}

fn clock(r: &FileRecord) -> (u64, u32, String) {
    match &r.hlc {
        Some(h) => (h.physical_ms, h.logical, h.node_id.clone()),
        None => (0, 0, String::new()),
    }
}

fn newer(a: &FileRecord, b: &FileRecord) -> bool {
    clock(a) > clock(b)
}

impl Cluster {
    /// Reads the record of `key` from a majority of its owners, repairing stale ones. With
    /// fewer than a majority answering, the newest of those that did is served (a degraded
    /// read) unless `--strict-reads`.
    ///
    /// Only as many remote owners as a majority needs are asked (the healthiest first, ties
    /// spread by key), each through the per-peer batcher; another is asked when one fails or
    /// has not answered within [`HEDGE_AFTER`]. When this pod holds a copy, the remote owners
    /// send only the record (its clock), never a small object's content: the content comes from
    /// the local copy when it is the newest, else from the owner that has the newest.
    ///
    /// `every_owner` (GetFile, which reports each replica's state) asks all owners at once and,
    /// once a majority has answered, gives the others [`HEDGE_AFTER`] more: an owner reported
    /// `unreachable` then really did not answer, rather than was not asked.
    pub async fn read_record(&self, key: &str, with_data: bool, every_owner: bool) -> Result<ReadOutcome> {
        let layout = self.layout();
        let owners = layout.owners(key);
        let me_owner = owners.iter().any(|o| layout.is_self(o));
        let mut answers: Vec<(String, Option<FileRecord>)> = Vec::new();
        let local_read = me_owner || owners.is_empty();
        if local_read {
            let s = self.store().clone();
            let k = key.to_string();
            let local = tokio::task::spawn_blocking(move || s.replica_record(&k, with_data))
                .await
                .map_err(|e| BlobError::Unavailable(format!("read task failed: {e}")))??;
            answers.push((layout.self_id.clone().unwrap_or_default(), local));
        }
        let need = majority(owners.len().max(1));
        let mut remote: Vec<&Peer> = owners
            .iter()
            .filter(|o| !layout.is_self(o))
            .filter_map(|o| layout.peers.get(o))
            .collect();
        remote.sort_by_key(|p| (p.rank, spread(key, &p.id)));
        let without_data = !with_data || local_read;
        let mut queue = remote.into_iter().map(|p| p.id.clone());
        let mut calls = FuturesUnordered::new();
        let first = if every_owner { owners.len() } else { need };
        while answers.len() + calls.len() < first {
            let Some(id) = queue.next() else { break };
            calls.push(self.ask_record(id, key, without_data));
        }
        let mut failed: HashSet<String> = HashSet::new();
        let hedge = tokio::time::sleep(HEDGE_AFTER);
        tokio::pin!(hedge);
        while answers.len() < need {
            if calls.is_empty() {
                let Some(id) = queue.next() else { break };
                calls.push(self.ask_record(id, key, without_data));
                continue;
            }
            tokio::select! {
                next = calls.next() => {
                    let Some((id, r)) = next else { continue };
                    match r {
                        Ok(rec) => answers.push((id, rec)),
                        Err(st) => {
                            tracing::debug!(key, replica = %id, code = ?st.code(), "replica did not answer a record read");
                            failed.insert(id);
                            if let Some(id) = queue.next() {
                                calls.push(self.ask_record(id, key, without_data));
                            }
                        }
                    }
                }
                () = &mut hedge => {
                    if let Some(id) = queue.next() {
                        tracing::debug!(key, replica = %id, "record read is slow; asking another owner too");
                        calls.push(self.ask_record(id, key, without_data));
                    }
                    hedge.as_mut().reset(tokio::time::Instant::now() + HEDGE_AFTER);
                }
            }
        }
        if every_owner && !calls.is_empty() {
            let late = tokio::time::timeout(HEDGE_AFTER, async {
                let mut late = Vec::new();
                while let Some((id, r)) = calls.next().await {
                    late.push((id, r));
                }
                late
            });
            // Whatever has not answered by the deadline stays unanswered (reported unreachable).
            let late = late.await.unwrap_or_default();
            for (id, r) in late {
                match r {
                    Ok(rec) => answers.push((id, rec)),
                    Err(_) => {
                        failed.insert(id);
                    }
                }
            }
        }
        drop(calls);
        let newest = answers
            .iter()
            .filter_map(|(_, r)| r.as_ref())
            .fold(None::<&FileRecord>, |acc, r| match acc {
                Some(a) if !newer(r, a) => Some(a),
                _ => Some(r),
            })
            .cloned();
        let newest = match newest {
            Some(n) if with_data && lacks_data(&n) => Some(self.with_content(n, &answers).await),
            other => other,
        };
        let mut replicas = Vec::new();
        let mut local_current = false;
        for o in &owners {
            let st = match answers.iter().find(|(id, _)| id == o) {
                Some((_, Some(r))) if newest.as_ref().is_some_and(|n| clock(n) == clock(r)) => ReplicaState::Synced,
                Some(_) => ReplicaState::Pending,
                None if failed.contains(o) => ReplicaState::Unreachable,
                None => ReplicaState::Unreachable,
            };
            if layout.is_self(o) && st == ReplicaState::Synced {
                local_current = true;
            }
            replicas.push((o.clone(), st));
        }
        if owners.is_empty() && newest.is_some() {
            local_current = true;
        }
        // Read repair: answers that were stale get the newest record in the background.
        if let Some(n) = &newest {
            let stale: Vec<String> = answers
                .iter()
                .filter(|(_, r)| r.as_ref().is_none_or(|r| newer(n, r)))
                .map(|(id, _)| id.clone())
                .filter(|id| !id.is_empty())
                .collect();
            for id in stale {
                let me = self.clone();
                let rec = n.clone();
                self.inner.metrics.read_repairs.inc();
                tokio::spawn(async move {
                    if let Err(e) = me.sync_record_to(&id, &rec, "repair").await {
                        tracing::debug!(replica = %id, key = %rec.key, error = %e, "read repair failed; queued");
                        let _ = me
                            .enqueue(vec![super::handoff::Entry {
                                target: id,
                                record: Some(rec),
                                attempts: 0,
                                next_ms: 0,
                            }])
                            .await;
                    }
                });
            }
        }
        Ok(ReadOutcome {
            record: newest,
            replicas,
            local_current,
        })
    }

    /// One owner's record of `key` through its batcher.
    async fn ask_record(
        &self,
        id: String,
        key: &str,
        without_data: bool,
    ) -> (String, Result<Option<FileRecord>, tonic::Status>) {
        let q = RecordQuery {
            key: key.to_string(),
            without_data,
        };
        let r = match self.calls(&id) {
            Some(c) => c.get.call(q).await,
            None => Err(tonic::Status::unavailable(format!("no channel to {id}"))),
        };
        (id, r)
    }

    /// `newest` with its small object's content, asked of an owner that answered with it (a
    /// remote owner held a newer record than this pod). Without an answer the record is served
    /// as it is and the content is fetched by chunk hash, with failover.
    async fn with_content(&self, newest: FileRecord, answers: &[(String, Option<FileRecord>)]) -> FileRecord {
        let layout = self.layout();
        let holders = answers
            .iter()
            .filter(|(id, r)| {
                !id.is_empty() && !layout.is_self(id) && r.as_ref().is_some_and(|r| clock(r) == clock(&newest))
            })
            .map(|(id, _)| id.clone());
        for id in holders {
            match self.ask_record(id.clone(), &newest.key, false).await {
                (_, Ok(Some(r))) if clock(&r) == clock(&newest) => return r,
                (_, r) => {
                    tracing::debug!(key = %newest.key, replica = %id, ok = r.is_ok(), "replica did not send the newest record's content")
                }
            }
        }
        newest
    }

    /// Fetches one chunk of `key`'s content: the local copy first, then the owners by health,
    /// verified against its hash. A corrupt or missing local copy on an owner is replaced.
    pub async fn fetch_chunk(&self, key: &str, hash: [u8; 32], size: u32) -> Result<Bytes> {
        let s = self.store().clone();
        let layout = self.layout();
        // A pod that is not an owner looks locally only if it happens to hold the chunk, so a
        // missing copy it never had is not reported as data loss.
        let owner = layout.is_solo() || layout.owners(key).iter().any(|o| layout.is_self(o));
        let local = tokio::task::spawn_blocking(move || {
            if owner || s.has_chunk(&hash)? {
                s.read_chunk(&hash, size)
            } else {
                Err(BlobError::NotFound(format!("chunk {} is not on this pod", hex(&hash))))
            }
        })
        .await
        .map_err(|e| BlobError::Unavailable(format!("read task failed: {e}")))?;
        let local_err = match local {
            Ok(d) => return Ok(d),
            Err(e) => e,
        };
        if layout.is_solo() {
            return Err(local_err);
        }
        let mut candidates: Vec<&Peer> = layout
            .owners(key)
            .iter()
            .filter(|o| !layout.is_self(o))
            .filter_map(|o| layout.peers.get(o))
            .collect();
        // Any other member may hold it too (a previous owner, a coordinator's copy).
        for p in layout.peers.values() {
            if !layout.is_self(&p.id) && !candidates.iter().any(|c| c.id == p.id) {
                candidates.push(p);
            }
        }
        candidates.sort_by_key(|p| p.rank);
        for p in candidates {
            match self.get_chunk_from(&p.id, hash).await {
                Ok(d) if d.len() == size as usize || size == 0 => {
                    self.inner.metrics.failovers.inc();
                    tracing::info!(key, chunk = %hex(&hash), replica = %p.id, local_error = %local_err, "chunk served by a replica");
                    if matches!(local_err, BlobError::DataLoss(_))
                        && layout.owners(key).iter().any(|o| layout.is_self(o))
                    {
                        let s = self.store().clone();
                        let copy = d.clone();
                        tokio::task::spawn_blocking(move || {
                            if let Err(e) = s.repair_chunk(&hash, &copy) {
                                tracing::warn!(chunk = %hex(&hash), error = %e, "local chunk repair failed");
                            }
                        });
                    }
                    return Ok(d);
                }
                Ok(_) => tracing::warn!(chunk = %hex(&hash), replica = %p.id, "replica's chunk has the wrong length"),
                Err(e) => {
                    tracing::debug!(chunk = %hex(&hash), replica = %p.id, error = %e, "replica could not serve the chunk")
                }
            }
        }
        Err(local_err)
    }

    /// One chunk from member `id`, verified.
    pub(super) async fn get_chunk_from(&self, id: &str, hash: [u8; 32]) -> Result<Bytes> {
        let mut c = self
            .client(id)
            .ok_or_else(|| BlobError::Unavailable(format!("no channel to {id}")))?;
        let timeout = self.inner.cfg.replication_timeout;
        let fut = async {
            let mut stream = c
                .get_chunk(GetChunkRequest {
                    hash: Bytes::copy_from_slice(&hash),
                })
                .await?
                .into_inner();
            let mut buf = bytes::BytesMut::new();
            while let Some(m) = stream.message().await? {
                if buf.len() + m.data.len() > 16 * 1024 * 1024 {
                    return Err(tonic::Status::out_of_range("chunk larger than the largest chunk size"));
                }
                buf.extend_from_slice(&m.data);
            }
            Ok::<_, tonic::Status>(buf.freeze())
        };
        let data = tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| BlobError::Unavailable(format!("{id} did not send chunk {} in time", hex(&hash))))?
            .map_err(|st| BlobError::Unavailable(format!("{id}: {}", st.message())))?;
        if blake3::hash(&data).as_bytes() != &hash {
            self.inner.metrics.failovers.inc();
            return Err(BlobError::DataLoss(format!(
                "{id} sent chunk {} with the wrong content",
                hex(&hash)
            )));
        }
        Ok(data)
    }

    /// One page of records of the whole store, merged across members: keys after `after` with
    /// `prefix`, newest record per key, tombstones skipped, at most `limit` plus whether more
    /// follow; `skip` live records are passed over first (page numbers). With `counting`, the
    /// scan goes on to the end and the third value is the number of live records seen.
    pub async fn list_merged(
        &self,
        prefix: &str,
        after: Option<&str>,
        skip: usize,
        limit: usize,
        filter: &str,
        counting: bool,
    ) -> Result<(Vec<FileRecord>, bool, u64)> {
        let layout = self.layout();
        let sources = sources(&layout);
        let batch = (limit + skip).clamp(16, 1000) as u32;
        // A listing of files never shows the store's own records (blob records, which sort
        // before every user key): it starts past them.
        let internal = is_internal_key(prefix);
        let after = match after {
            Some(a) if internal || a >= LAST_INTERNAL => a,
            _ if internal => "",
            _ => LAST_INTERNAL,
        };
        let mut cursors: Vec<Source> = sources
            .into_iter()
            .map(|id| Source {
                id,
                buf: std::collections::VecDeque::new(),
                after: after.to_string(),
                done: false,
            })
            .collect();
        let mut out = Vec::new();
        let mut skipped = 0usize;
        let mut more = false;
        let mut total = 0u64;
        loop {
            // Refill every source whose buffer ran dry.
            for s in cursors.iter_mut() {
                if s.buf.is_empty() && !s.done {
                    match self.list_from(&layout, &s.id, prefix, &s.after, batch).await {
                        Ok(v) => {
                            if (v.len() as u32) < batch {
                                s.done = true;
                            }
                            if let Some(l) = v.last() {
                                s.after = l.key.clone();
                            }
                            s.buf.extend(v);
                        }
                        Err(e) => {
                            tracing::warn!(member = %s.id, error = %e, "member could not list its records; listing the others");
                            s.done = true;
                        }
                    }
                }
            }
            let Some(min) = cursors
                .iter()
                .filter_map(|s| s.buf.front().map(|r| r.key.clone()))
                .min()
            else {
                break;
            };
            let mut best: Option<FileRecord> = None;
            for s in cursors.iter_mut() {
                while s.buf.front().is_some_and(|r| r.key == min) {
                    if let Some(r) = s.buf.pop_front()
                        && best.as_ref().is_none_or(|b| newer(&r, b))
                    {
                        best = Some(r);
                    }
                }
            }
            let Some(r) = best else { continue };
            if r.deleted || (!filter.is_empty() && !r.key.contains(filter)) || (!internal && is_internal_key(&r.key)) {
                continue;
            }
            total += 1;
            if skipped < skip {
                skipped += 1;
                continue;
            }
            if out.len() < limit {
                out.push(r);
            } else {
                more = true;
                if !counting {
                    break;
                }
            }
        }
        Ok((out, more, total))
    }

    async fn list_from(
        &self,
        layout: &Layout,
        id: &str,
        prefix: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<FileRecord>> {
        if layout.is_self(id) || id.is_empty() {
            let s = self.store().clone();
            let (p, a) = (prefix.to_string(), after.to_string());
            return tokio::task::spawn_blocking(move || s.list_records(&p, &a, &[], limit as usize, false))
                .await
                .map_err(|e| BlobError::Unavailable(format!("list task failed: {e}")))?;
        }
        let mut c = self
            .client(id)
            .ok_or_else(|| BlobError::Unavailable(format!("no channel to {id}")))?;
        let req = ListRecordsRequest {
            start_after: after.to_string(),
            limit,
            prefix: prefix.to_string(),
            partitions: vec![],
            without_data: true,
        };
        let fut = async {
            let mut stream = c.list_records(req).await?.into_inner();
            let mut v = Vec::new();
            while let Some(r) = stream.message().await? {
                v.push(r);
            }
            Ok::<_, tonic::Status>(v)
        };
        tokio::time::timeout(self.inner.cfg.replication_timeout, fut)
            .await
            .map_err(|_| BlobError::Unavailable(format!("{id} did not list in time")))?
            .map_err(|st| BlobError::Unavailable(format!("{id}: {}", st.message())))
    }
}

use super::Peer;

/// How long a record read waits for the owners asked first before it asks one more.
pub const HEDGE_AFTER: Duration = Duration::from_millis(100);

/// Orders owners of equal health differently per key, so reads spread over them.
fn spread(key: &str, id: &str) -> u8 {
    let mut h = blake3::Hasher::new();
    h.update(key.as_bytes());
    h.update(id.as_bytes());
    h.finalize().as_bytes()[0]
}

/// Whether `r` is a small object whose content should ride in the record but does not.
fn lacks_data(r: &FileRecord) -> bool {
    !r.deleted
        && r.inline_data.is_empty()
        && r.size > 0
        && r.size as usize <= crate::store::INLINE_MAX
        && r.chunk_hashes.len() == 1
}

struct Source {
    id: String,
    buf: std::collections::VecDeque<FileRecord>,
    after: String,
    done: bool,
}

/// Who to list from: every member (this pod as the empty id when the view does not list it).
fn sources(layout: &Layout) -> Vec<String> {
    let mut v: Vec<String> = layout.peers.keys().cloned().collect();
    if layout.self_id.is_none() {
        v.push(String::new());
    }
    v
}
