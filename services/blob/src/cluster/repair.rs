//! Background repair: the hand-off queue worker, anti-entropy (per-partition digests compared
//! with the other owners on every membership change and periodically; differing partitions
//! are listed and the newer records pushed), and rebalancing (records of partitions this pod no
//! longer owns are pushed to their new owners).

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures_util::StreamExt;
use peervault_proto::v1::{DigestsRequest, FileRecord, ListRecordsRequest};

use super::{
    Cluster, handoff,
    tombstones::{Confirmations, Seen, push_expired_tombstone},
};
use crate::store::replica::{PARTITIONS, key_partition};

/// Starts the hand-off worker and the anti-entropy loop.
pub(super) fn spawn_workers(c: &Cluster) {
    let me = c.clone();
    tokio::spawn(async move { me.handoff_loop().await });
    let me = c.clone();
    tokio::spawn(async move { me.anti_entropy_loop().await });
    let me = c.clone();
    tokio::spawn(async move { me.scrub_loop().await });
}

/// A factor in [0.5, 1.5) that differs between pods and passes.
fn jitter() -> f64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let h = blake3::hash(&t.to_le_bytes());
    0.5 + (h.as_bytes()[0] as f64 / 256.0)
}

impl Cluster {
    async fn handoff_loop(self) {
        let workers = self.inner.cfg.repair_workers.max(1);
        loop {
            let q = self.inner.handoff.clone();
            let due = tokio::task::spawn_blocking(move || q.due(handoff::now_ms(), 256))
                .await
                .unwrap_or_else(|e| Err(crate::error::BlobError::Unavailable(e.to_string())));
            let due = match due {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the hand-off queue");
                    Vec::new()
                }
            };
            if due.is_empty() {
                tokio::select! {
                    _ = self.inner.handoff_wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = self.inner.ctx.draining() => return,
                }
                continue;
            }
            let layout = self.layout();
            let results: Vec<_> = futures_util::stream::iter(due)
                .map(|(id, e)| {
                    let me = self.clone();
                    let layout = layout.clone();
                    async move {
                        let Some(rec) = e.record.clone() else {
                            return (id, e, Ok(false));
                        };
                        if !layout.peers.contains_key(&e.target) {
                            // Removed from the membership: its copy is not wanted any more.
                            return (id, e, Ok(true));
                        }
                        if layout.peers.get(&e.target).is_some_and(|p| !p.ready) {
                            return (id, e, Err(crate::error::BlobError::Unavailable("not ready".into())));
                        }
                        let r = me.sync_record_to(&e.target, &rec, "handoff").await.map(|_| true);
                        (id, e, r)
                    }
                })
                .buffer_unordered(workers)
                .collect()
                .await;
            let mut progressed = false;
            for (id, e, r) in results {
                let q = self.inner.handoff.clone();
                match r {
                    Ok(false) => {
                        let _ =
                            tokio::task::spawn_blocking(move || q.postpone(id, e, Duration::from_millis(500))).await;
                    }
                    Ok(true) => {
                        progressed = true;
                        let key = e.record.as_ref().map(|r| r.key.clone()).unwrap_or_default();
                        tracing::info!(target = %e.target, key = %key, attempts = e.attempts, "hand-off delivered");
                        self.publish_replicated(&key, &e.target);
                        let _ = tokio::task::spawn_blocking(move || q.done(id)).await;
                        self.inner.metrics.handoff_depth.dec();
                        self.inner.metrics.under_replicated.dec();
                    }
                    Err(err) => {
                        tracing::debug!(target = %e.target, error = %err, attempts = e.attempts, "hand-off failed; backing off");
                        let _ = tokio::task::spawn_blocking(move || q.retry(id, e)).await;
                    }
                }
            }
            if !progressed {
                tokio::select! {
                    _ = self.inner.handoff_wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = self.inner.ctx.draining() => return,
                }
            }
        }
    }

    async fn anti_entropy_loop(self) {
        let interval = self.inner.cfg.anti_entropy_interval.max(Duration::from_millis(200));
        // Let the first view arrive before the first round.
        tokio::time::sleep(Duration::from_millis(500)).await;
        loop {
            let layout = self.layout();
            if !layout.is_solo() && layout.self_id.is_some() {
                match self.anti_entropy_round().await {
                    Ok(clean) if clean => self.settle(layout.version),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "anti-entropy round failed"),
                }
            } else if layout.self_id.is_some() {
                // The only member of a view: no owner to ask, the grace period alone decides.
                if let Err(e) = self.collect_tombstones(&layout, &Confirmations::default()).await {
                    tracing::warn!(error = %e, "tombstone collection failed");
                }
            }
            let changed = self.inner.layout_changed.notified();
            tokio::select! {
                _ = changed => {
                    // Let a burst of membership changes settle into one round.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                _ = tokio::time::sleep(interval) => {}
                _ = self.inner.ctx.draining() => return,
            }
        }
    }

    /// Runs one anti-entropy round now (also used by tests through the periodic loop).
    /// Returns whether every owner of every partition this pod holds was reached and is in sync
    /// after the round.
    pub async fn anti_entropy_round(&self) -> crate::error::Result<bool> {
        let layout = self.layout();
        let Some(me) = layout.self_id.clone() else {
            return Ok(false);
        };
        let s = self.store().clone();
        let local = tokio::task::spawn_blocking(move || s.record_digests())
            .await
            .map_err(|e| crate::error::BlobError::Unavailable(e.to_string()))??;
        let empty = *blake3::Hasher::new().finalize().as_bytes();
        let mut clean = true;
        // What every other owner was seen to hold, for tombstone collection.
        let mut conf = Confirmations::default();
        // Partitions this pod holds but no longer owns: dropped once every owner confirmed.
        let mut leaving: HashMap<u32, bool> = HashMap::new();
        // Which partitions to compare with which peer: those both own now, plus partitions this
        // pod holds data of but no longer owns (they go to their new owners).
        let mut plan: HashMap<String, Vec<u32>> = HashMap::new();
        for p in 0..PARTITIONS as u32 {
            let owners = layout.placement.owners(p);
            let mine = owners.contains(&me);
            let holds = local.get(p as usize).is_some_and(|d| *d != empty);
            if !mine && !holds {
                continue;
            }
            if !mine {
                leaving.insert(p, true);
            }
            for o in owners {
                if *o != me {
                    plan.entry(o.clone()).or_default().push(p);
                }
            }
        }
        for (peer, parts) in plan {
            let fail = |leaving: &mut HashMap<u32, bool>| {
                for p in &parts {
                    if let Some(ok) = leaving.get_mut(p) {
                        *ok = false;
                    }
                }
            };
            if layout.peers.get(&peer).is_some_and(|p| !p.ready) {
                clean = false;
                fail(&mut leaving);
                conf.failed(&parts);
                continue;
            }
            let Some(mut client) = self.client(&peer) else {
                clean = false;
                fail(&mut leaving);
                conf.failed(&parts);
                continue;
            };
            let theirs = match self
                .timed(client.digests(DigestsRequest {
                    partitions: parts.clone(),
                }))
                .await
            {
                Ok(r) => r,
                Err(st) => {
                    self.inner.metrics.digest_rounds.with_label_values(&["error"]).inc();
                    tracing::debug!(peer = %peer, error = %st.message(), "digest exchange failed");
                    clean = false;
                    fail(&mut leaving);
                    conf.failed(&parts);
                    continue;
                }
            };
            let s = self.store().clone();
            if let Ok(Ok((records, mine))) = tokio::task::spawn_blocking(move || s.api_key_records()).await
                && theirs.api_keys.as_ref() != mine
            {
                let req = peervault_proto::v1::PutApiKeysRequest { records };
                if let Err(st) = self.timed(client.put_api_keys(req)).await {
                    tracing::debug!(peer = %peer, error = %st.message(), "API key exchange failed");
                }
            }
            let mut differ = Vec::new();
            for (p, d) in theirs.partitions.iter().zip(&theirs.digests) {
                if local.get(*p as usize).map(|x| &x[..]) != Some(d.as_ref()) {
                    differ.push(*p);
                } else {
                    conf.saw(*p, &peer, Seen::InSync);
                }
            }
            if differ.is_empty() {
                self.inner.metrics.digest_rounds.with_label_values(&["in_sync"]).inc();
                continue;
            }
            self.inner.metrics.digest_rounds.with_label_values(&["differ"]).inc();
            tracing::info!(peer = %peer, partitions = differ.len(), "anti-entropy: partitions differ");
            match self.push_newer(&peer, &differ).await {
                Ok(listed) => {
                    let listed = Arc::new(listed);
                    for p in &differ {
                        conf.saw(*p, &peer, Seen::Listed(listed.clone()));
                    }
                }
                Err(e) => {
                    tracing::debug!(peer = %peer, error = %e, "anti-entropy push failed");
                    clean = false;
                    fail(&mut leaving);
                    conf.failed(&differ);
                }
            }
        }
        if self.layout().version == layout.version
            && let Err(e) = self.collect_tombstones(&layout, &conf).await
        {
            tracing::warn!(error = %e, "tombstone collection failed");
        }
        // Every owner of these partitions confirmed it holds what this pod has (or newer).
        for (p, ok) in leaving {
            if ok && self.layout().version == layout.version {
                self.drop_partition(p).await?;
            }
        }
        Ok(clean)
    }

    /// Forgets every local record of partition `p` (it moved to owners that confirmed).
    async fn drop_partition(&self, p: u32) -> crate::error::Result<()> {
        let mut dropped = 0usize;
        // Each page goes on after the last key of the one before: starting again from the
        // beginning would walk every other partition's keys once per page.
        let mut after = String::new();
        loop {
            let s = self.store().clone();
            let a = std::mem::take(&mut after);
            let batch = tokio::task::spawn_blocking(move || s.list_records("", &a, &[p], 256, false))
                .await
                .map_err(|e| crate::error::BlobError::Unavailable(e.to_string()))??;
            let Some(last) = batch.last() else { break };
            after = last.key.clone();
            for r in batch {
                self.store().forget_record(&r.key).await?;
                dropped += 1;
            }
        }
        if dropped > 0 {
            tracing::info!(
                partition = p,
                records = dropped,
                "rebalance: dropped a partition its new owners confirmed"
            );
        }
        Ok(())
    }

    async fn scrub_loop(self) {
        loop {
            let wait = self
                .inner
                .cfg
                .scrub_interval
                .mul_f64(jitter())
                .max(Duration::from_millis(100));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.inner.ctx.draining() => return,
            }
            if let Err(e) = self.scrub_pass().await {
                tracing::warn!(error = %e, "scrub pass failed");
            }
        }
    }

    /// Re-verifies every local chunk; a corrupt or missing one is replaced from a replica.
    /// Returns the chunks repaired.
    pub async fn scrub_pass(&self) -> crate::error::Result<usize> {
        let s = self.store().clone();
        let chunks = tokio::task::spawn_blocking(move || s.chunk_hashes(&[]))
            .await
            .map_err(|e| crate::error::BlobError::Unavailable(e.to_string()))??;
        let mut repaired = 0;
        for (hash, rec) in chunks {
            if rec.inline {
                continue;
            }
            self.throttle("repair", rec.size as u64).await;
            let s = self.store().clone();
            let ok = tokio::task::spawn_blocking(move || s.read_chunk(&hash, rec.size))
                .await
                .map_err(|e| crate::error::BlobError::Unavailable(e.to_string()))?;
            match ok {
                Ok(_) => continue,
                Err(crate::error::BlobError::DataLoss(msg)) => {
                    tracing::error!(chunk = %crate::store::hex(&hash), error = %msg, "scrub found a bad chunk");
                }
                Err(e) => return Err(e),
            }
            let layout = self.layout();
            let mut peers: Vec<_> = layout.peers.values().filter(|p| !layout.is_self(&p.id)).collect();
            peers.sort_by_key(|p| p.rank);
            for p in peers {
                let Ok(data) = self.get_chunk_from(&p.id, hash).await else {
                    continue;
                };
                let s = self.store().clone();
                let fixed = tokio::task::spawn_blocking(move || s.repair_chunk(&hash, &data))
                    .await
                    .map_err(|e| crate::error::BlobError::Unavailable(e.to_string()))?;
                if fixed.is_ok() {
                    repaired += 1;
                    self.inner.metrics.scrub_repaired.inc();
                    tracing::warn!(chunk = %crate::store::hex(&hash), replica = %p.id, "scrub repaired a chunk from a replica");
                    break;
                }
            }
        }
        Ok(repaired)
    }

    /// Sends `peer` every record of `partitions` this pod has newer than it (or that it lacks;
    /// a tombstone past its grace period only to replace an older live copy, so a collected
    /// tombstone is not sent back). Returns what the peer held before the pushes.
    async fn push_newer(&self, peer: &str, partitions: &[u32]) -> crate::error::Result<HashMap<String, FileRecord>> {
        let mut client = self
            .client(peer)
            .ok_or_else(|| crate::error::BlobError::Unavailable(format!("no channel to {peer}")))?;
        let parts: Arc<Vec<u32>> = Arc::new(partitions.to_vec());
        let mut theirs: HashMap<String, FileRecord> = HashMap::new();
        let mut after = String::new();
        loop {
            let req = ListRecordsRequest {
                start_after: after.clone(),
                limit: 1000,
                prefix: String::new(),
                partitions: parts.to_vec(),
                without_data: true,
            };
            let fut = async {
                let mut s = client.list_records(req).await?.into_inner();
                let mut v = Vec::new();
                while let Some(r) = s.message().await? {
                    v.push(r);
                }
                Ok::<_, tonic::Status>(v)
            };
            let batch = tokio::time::timeout(self.inner.cfg.replication_timeout, fut)
                .await
                .map_err(|_| crate::error::BlobError::Unavailable(format!("{peer} did not list in time")))?
                .map_err(|st| crate::error::BlobError::Unavailable(st.message().to_string()))?;
            let n = batch.len();
            if let Some(l) = batch.last() {
                after = l.key.clone();
            }
            for r in batch {
                theirs.insert(r.key.clone(), r);
            }
            if n < 1000 {
                break;
            }
        }
        let mut after = String::new();
        loop {
            let s = self.store().clone();
            let (a, p) = (after.clone(), parts.clone());
            let mine = tokio::task::spawn_blocking(move || s.list_records("", &a, &p, 1000, false))
                .await
                .map_err(|e| crate::error::BlobError::Unavailable(e.to_string()))??;
            let n = mine.len();
            if let Some(l) = mine.last() {
                after = l.key.clone();
            }
            let todo: Vec<FileRecord> = mine
                .into_iter()
                .filter(|r| {
                    let owners = self.layout().placement.owners(key_partition(&r.key)).to_vec();
                    let held = theirs.get(&r.key);
                    owners.iter().any(|o| o == peer)
                        && (!self.tombstone_expired(r) || push_expired_tombstone(held))
                        && held.is_none_or(|t| {
                            crate::store::replica::hlc_key(
                                r.hlc.as_ref().map(crate::store::replica::hlc_from_wire).as_ref(),
                            ) > crate::store::replica::hlc_key(
                                t.hlc.as_ref().map(crate::store::replica::hlc_from_wire).as_ref(),
                            )
                        })
                })
                .collect();
            let workers = self.inner.cfg.repair_workers.max(1);
            let errors: Vec<_> = futures_util::stream::iter(todo)
                .map(|r| {
                    let me = self.clone();
                    let peer = peer.to_string();
                    async move { me.sync_record_to(&peer, &r, "repair").await.err() }
                })
                .buffer_unordered(workers)
                .filter_map(|e| async move { e })
                .collect()
                .await;
            if let Some(e) = errors.into_iter().next() {
                return Err(e);
            }
            if n < 1000 {
                break;
            }
        }
        Ok(theirs)
    }
}
