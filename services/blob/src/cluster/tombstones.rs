//! Tombstone collection (DESIGN.md: "deletes are tombstones, collected only after every replica
//! holds them and a grace period has passed"). Anti-entropy records what every other owner of
//! each partition was seen to hold in its round; afterwards a tombstone older than
//! `--tombstone-grace` (by its clock) is dropped only when every current owner of its partition
//! confirmed it holds it, a newer record, or nothing of the key (collected there already, or
//! never held: either way it cannot bring the file back). An owner that still holds an older
//! live copy (it was down during the delete) is not a confirmation: the tombstone is pushed to
//! it first and collected in a later round. Nothing is collected while the placement is
//! moving, while an owner is unreachable, or while this pod's hand-off queue still has an entry
//! for the key.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use peervault_proto::v1::FileRecord;

use super::{Cluster, Layout, handoff};
use crate::{
    error::{BlobError, Result},
    store::replica::{hlc_from_wire, hlc_key, key_partition},
};

/// What one other owner was seen to hold of one partition in an anti-entropy round.
#[derive(Clone)]
pub(super) enum Seen {
    /// Its digest equalled this pod's: it holds exactly the same records.
    InSync,
    /// Its records of the partition, listed (before this round's pushes).
    Listed(Arc<HashMap<String, FileRecord>>),
}

/// The confirmations one anti-entropy round gathered, by partition and peer.
#[derive(Default)]
pub(super) struct Confirmations {
    seen: HashMap<u32, HashMap<String, Seen>>,
    failed: HashSet<u32>,
}

impl Confirmations {
    /// `peer` was seen holding `seen` of partition `p`.
    pub(super) fn saw(&mut self, p: u32, peer: &str, seen: Seen) {
        self.seen.entry(p).or_default().insert(peer.to_string(), seen);
    }

    /// `peer` could not be compared for these partitions: nothing of them is collected.
    pub(super) fn failed(&mut self, parts: &[u32]) {
        self.failed.extend(parts.iter().copied());
    }
}

/// Whether a tombstone past its grace period should still be pushed to a peer that holds
/// `theirs` of its key: only to replace an older live copy; a peer holding nothing has either
/// collected it already (pushing it back would undo the collection) or never held the file.
pub(super) fn push_expired_tombstone(theirs: Option<&FileRecord>) -> bool {
    theirs.is_some()
}

/// Whether `seen` confirms that the peer can no longer bring back the file `tomb` deleted.
fn confirms(seen: &Seen, tomb: &FileRecord) -> bool {
    match seen {
        Seen::InSync => true,
        Seen::Listed(m) => match m.get(&tomb.key) {
            None => true,
            Some(t) => {
                let theirs = t.hlc.as_ref().map(hlc_from_wire);
                let mine = tomb.hlc.as_ref().map(hlc_from_wire);
                hlc_key(theirs.as_ref()) >= hlc_key(mine.as_ref())
            }
        },
    }
}

impl Cluster {
    /// Whether `r` is a tombstone older than the grace period.
    pub(super) fn tombstone_expired(&self, r: &FileRecord) -> bool {
        let grace = self.inner.cfg.tombstone_grace.as_millis() as u64;
        r.deleted
            && r.hlc
                .as_ref()
                .is_some_and(|h| h.physical_ms.saturating_add(grace) < handoff::now_ms())
    }

    /// Collects the expired tombstones of the partitions this pod owns whose every other owner
    /// confirmed them in `conf` (with no other owner, as when this pod is the only member,
    /// after the grace period alone). Returns how many were collected.
    pub(super) async fn collect_tombstones(&self, layout: &Layout, conf: &Confirmations) -> Result<usize> {
        let Some(me) = layout.self_id.clone() else {
            return Ok(0);
        };
        if layout.previous.is_some() {
            return Ok(0); // data is moving: the owners to ask are not settled
        }
        // Only tombstones stored longer ago than the grace period can be due (their clock is
        // never later than when this pod stored them, give or take skew, which
        // `tombstone_expired` settles): read those from the time index, not every record.
        let grace_ns = i64::try_from(self.inner.cfg.tombstone_grace.as_nanos()).unwrap_or(i64::MAX);
        let before_ns = crate::store::now_ns().saturating_sub(grace_ns);
        let mut candidates = Vec::new();
        let mut after = Vec::new();
        loop {
            let s = self.store().clone();
            let a = std::mem::take(&mut after);
            let (batch, next) = tokio::task::spawn_blocking(move || s.tombstones_stored_before(before_ns, &a, 1000))
                .await
                .map_err(|e| BlobError::Unavailable(e.to_string()))??;
            for r in batch {
                let p = key_partition(&r.key);
                let owners = layout.placement.owners(p);
                if !owners.contains(&me) || conf.failed.contains(&p) || !self.tombstone_expired(&r) {
                    continue;
                }
                let seen = conf.seen.get(&p);
                let mut others = owners.iter().filter(|o| **o != me);
                // Every other owner must have been compared this round and confirm it.
                let ok = others.all(|o| seen.and_then(|s| s.get(o)).is_some_and(|s| confirms(s, &r)));
                if ok {
                    candidates.push(r);
                }
            }
            match next {
                Some(n) => after = n,
                None => break,
            }
        }
        if candidates.is_empty() {
            return Ok(0);
        }
        // A hand-off entry for the key (its tombstone or an older write still to deliver)
        // means some owner may not have the final word yet.
        let q = self.inner.handoff.clone();
        let queued: HashSet<String> = tokio::task::spawn_blocking(move || q.all())
            .await
            .map_err(|e| BlobError::Unavailable(e.to_string()))??
            .into_iter()
            .filter_map(|e| e.record.map(|r| r.key))
            .collect();
        let mut collected = 0;
        for r in candidates {
            if queued.contains(&r.key) {
                continue;
            }
            let Some(h) = r.hlc.as_ref().map(hlc_from_wire) else {
                continue;
            };
            if self.store().collect_tombstone(&r.key, &h).await? {
                collected += 1;
                tracing::debug!(key = %r.key, "tombstone collected");
            }
        }
        if collected > 0 {
            self.inner.metrics.tombstones_collected.inc_by(collected as u64);
            tracing::info!(
                collected,
                grace = ?self.inner.cfg.tombstone_grace,
                "tombstones collected: every owner holds them and the grace period passed"
            );
        }
        Ok(collected)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use peervault_proto::v1::HybridTimestamp;

    use super::*;

    fn rec(key: &str, ms: u64, deleted: bool) -> FileRecord {
        FileRecord {
            key: key.into(),
            deleted,
            blob_key: Bytes::from_static(&[0; 32]),
            hlc: Some(HybridTimestamp {
                physical_ms: ms,
                logical: 0,
                node_id: "a".into(),
            }),
            ..Default::default()
        }
    }

    fn open_store(dir: &std::path::Path) -> crate::store::Store {
        crate::store::Store::open(
            dir,
            crate::config::BlobConfig::default(),
            crate::metrics::BlobMetrics::new(None).unwrap(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn the_store_collects_a_tombstone_only_while_it_is_the_one_confirmed() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        let tomb = rec("k", 100, true);
        assert!(store.apply_record(tomb.clone(), None).await.unwrap().0);
        let h = hlc_from_wire(tomb.hlc.as_ref().unwrap());
        let other = crate::store::records::Hlc {
            physical_ms: 99,
            ..h.clone()
        };
        // Another clock (a newer delete replaced the confirmed one): kept.
        assert!(!store.collect_tombstone("k", &other).await.unwrap());
        assert!(store.replica_record("k", false).unwrap().is_some_and(|r| r.deleted));
        assert!(store.collect_tombstone("k", &h).await.unwrap());
        assert!(store.replica_record("k", false).unwrap().is_none());
        // Nothing left: nothing to collect.
        assert!(!store.collect_tombstone("k", &h).await.unwrap());
    }

    #[tokio::test]
    async fn due_tombstones_come_from_the_time_index_oldest_first_in_bounded_pages_without_live_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        // Live records around the tombstones in key order: none of them may come back.
        for k in ["a", "m", "z"] {
            assert!(store.apply_record(rec(k, 50, false), None).await.unwrap().0);
        }
        let tombs = ["b", "c", "d", "e", "f"];
        for (i, k) in tombs.iter().enumerate() {
            assert!(store.apply_record(rec(k, 100 + i as u64, true), None).await.unwrap().0);
        }
        let mut seen = Vec::new();
        let mut after = Vec::new();
        let mut pages = 0;
        loop {
            let (batch, next) = store.tombstones_stored_before(i64::MAX, &after, 2).unwrap();
            assert!(batch.len() <= 2);
            pages += 1;
            seen.extend(batch.into_iter().map(|r| {
                assert!(r.deleted);
                r.key
            }));
            match next {
                Some(n) => after = n,
                None => break,
            }
        }
        // Stored in this order, so the time index gives them back in it.
        assert_eq!(seen, tombs.iter().map(|k| k.to_string()).collect::<Vec<_>>());
        assert!(pages >= 3, "five tombstones in pages of two");
        // Nothing was stored before the epoch: nothing is due.
        let (none, next) = store.tombstones_stored_before(0, &[], 10).unwrap();
        assert!(none.is_empty() && next.is_none());
        // A collected tombstone leaves the time index too.
        let h = hlc_from_wire(rec("b", 100, true).hlc.as_ref().unwrap());
        assert!(store.collect_tombstone("b", &h).await.unwrap());
        let (left, _) = store.tombstones_stored_before(i64::MAX, &[], 10).unwrap();
        assert_eq!(left.len(), 4);
        assert!(left.iter().all(|r| r.key != "b"));
    }

    #[tokio::test]
    async fn a_tombstone_stored_without_its_time_entry_is_indexed_again_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        for k in ["x", "y"] {
            assert!(store.apply_record(rec(k, 100, true), None).await.unwrap().0);
        }
        drop(store);
        // What the replica path used to leave behind: a tombstone with no time entry.
        {
            let db = redb::Database::create(dir.path().join("index.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(crate::store::index::TOMBSTONES_BY_TIME).unwrap();
                use redb::ReadableTable;
                let first = t.iter().unwrap().next().unwrap().unwrap().0.value().to_vec();
                t.remove(first.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = open_store(dir.path());
        let (due, _) = store.tombstones_stored_before(i64::MAX, &[], 10).unwrap();
        let mut keys: Vec<String> = due.into_iter().map(|r| r.key).collect();
        keys.sort();
        assert_eq!(keys, ["x", "y"]);
    }

    #[tokio::test]
    async fn record_digests_are_walked_again_only_after_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        let scans = || store.metrics().record_digest_scans.get();
        assert!(store.apply_record(rec("a", 100, false), None).await.unwrap().0);
        let first = store.record_digests().unwrap();
        let walked = scans();
        assert_eq!(
            store.record_digests().unwrap(),
            first,
            "nothing committed: the same digests"
        );
        assert_eq!(scans(), walked, "and no second walk");
        // A newer clock for the same key changes its partition's digest.
        assert!(store.apply_record(rec("a", 200, false), None).await.unwrap().0);
        let second = store.record_digests().unwrap();
        assert_eq!(scans(), walked + 1);
        assert_ne!(second, first);
        let p = crate::store::replica::key_partition("a") as usize;
        assert_ne!(second.get(p), first.get(p));
        // A refused (older) record commits too: walked again, and the digests stay.
        assert!(!store.apply_record(rec("a", 150, false), None).await.unwrap().0);
        assert_eq!(store.record_digests().unwrap(), second);
        assert_eq!(scans(), walked + 2);
        // A tombstone changes it again.
        assert!(store.apply_record(rec("a", 300, true), None).await.unwrap().0);
        assert_ne!(store.record_digests().unwrap(), second);
    }

    /// A commit that lands after a walk read its snapshot but before the walk's result is kept:
    /// the kept result is older than the index, and the next call must walk again.
    #[tokio::test]
    async fn a_commit_racing_a_digest_walk_is_never_hidden_by_the_kept_digests() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        assert!(store.apply_record(rec("a", 100, false), None).await.unwrap().0);
        let armed = Arc::new(AtomicBool::new(true));
        let (s, a) = (store.clone(), armed.clone());
        store.set_hook(Some(Arc::new(move |p: &str| {
            if p == "replica.digests_walked" && a.swap(false, Ordering::SeqCst) {
                // From the walking (blocking) thread; the committer is a thread of its own.
                let r = tokio::runtime::Handle::current().block_on(s.apply_record(rec("b", 100, false), None));
                assert!(r.unwrap().0);
            }
        })));
        let s = store.clone();
        let racing = tokio::task::spawn_blocking(move || s.record_digests())
            .await
            .unwrap()
            .unwrap();
        store.set_hook(None);
        let after = store.record_digests().unwrap();
        assert_ne!(after, racing, "the record committed during the walk shows");
        let p = crate::store::replica::key_partition("b") as usize;
        assert_ne!(after.get(p), racing.get(p));
        assert_eq!(store.metrics().record_digest_scans.get(), 2);
    }

    #[test]
    fn only_an_owner_holding_an_older_live_copy_withholds_confirmation() {
        let tomb = rec("k", 100, true);
        assert!(confirms(&Seen::InSync, &tomb));
        let listed = |r: Option<FileRecord>| {
            let mut m = HashMap::new();
            if let Some(r) = r {
                m.insert(r.key.clone(), r);
            }
            Seen::Listed(Arc::new(m))
        };
        assert!(
            confirms(&listed(None), &tomb),
            "nothing of the key: collected or never held"
        );
        assert!(confirms(&listed(Some(tomb.clone())), &tomb), "holds the tombstone");
        assert!(
            confirms(&listed(Some(rec("k", 200, false))), &tomb),
            "holds a newer write"
        );
        assert!(!confirms(&listed(Some(rec("k", 50, false))), &tomb), "older live copy");
        // The older live copy gets the tombstone pushed; a peer with nothing does not.
        assert!(push_expired_tombstone(Some(&rec("k", 50, false))));
        assert!(!push_expired_tombstone(None));
    }
}
