//! The persisted hand-off queue: replicas a write could not reach before it was acknowledged
//! (or that read repair and anti-entropy found stale), retried in the background with backoff.
//! Its own redb file beside the index, so an acknowledged write's missing copies survive a
//! restart of the coordinator.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use peervault_proto::v1::FileRecord;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::error::{BlobError, Result};

const QUEUE: TableDefinition<u64, &[u8]> = TableDefinition::new("handoff");

/// One replica still to be written.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Entry {
    /// Member id of the pod that lacks the record.
    #[prost(string, tag = "1")]
    pub target: String,
    /// The record (small content inline); its chunks are fetched from wherever they are.
    #[prost(message, optional, tag = "2")]
    pub record: Option<FileRecord>,
    /// Attempts so far.
    #[prost(uint32, tag = "3")]
    pub attempts: u32,
    /// Not before this time (ms since the epoch).
    #[prost(uint64, tag = "4")]
    pub next_ms: u64,
}

/// Longest wait between two attempts for one entry.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// When an entry that failed `attempts` times is tried next: 250 ms doubling to
/// [`BACKOFF_MAX`].
pub fn backoff(attempts: u32) -> Duration {
    let ms = 250u64.saturating_mul(1u64 << attempts.min(16));
    Duration::from_millis(ms).min(BACKOFF_MAX)
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

/// The queue. Cheap to clone.
#[derive(Clone)]
pub struct Handoff {
    db: Arc<Database>,
}

impl Handoff {
    /// Opens (or creates) the queue file. Blocking.
    pub fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path).map_err(|e| BlobError::Index(e.into()))?;
        let txn = db.begin_write()?;
        txn.open_table(QUEUE)?;
        txn.commit()?;
        Ok(Handoff { db: Arc::new(db) })
    }

    /// Adds entries in one durable transaction. Blocking.
    pub fn push(&self, entries: &[Entry]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(QUEUE)?;
            let first = t.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1);
            for (id, e) in (first..).zip(entries) {
                t.insert(id, e.encode_to_vec().as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Up to `limit` entries due at `now_ms`, oldest first. Blocking.
    pub fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<(u64, Entry)>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(QUEUE)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            let entry = Entry::decode(v.value()).map_err(|e| BlobError::Corrupt(format!("hand-off entry: {e}")))?;
            if entry.next_ms <= now_ms {
                out.push((k.value(), entry));
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Every entry (for status and tests). Blocking.
    pub fn all(&self) -> Result<Vec<Entry>> {
        Ok(self.due(u64::MAX, usize::MAX)?.into_iter().map(|(_, e)| e).collect())
    }

    /// Removes a finished entry. Blocking.
    pub fn done(&self, id: u64) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(QUEUE)?.remove(id)?;
        txn.commit()?;
        Ok(())
    }

    /// Puts a failed entry back with its next attempt time. Blocking.
    pub fn retry(&self, id: u64, mut e: Entry) -> Result<()> {
        e.attempts = e.attempts.saturating_add(1);
        e.next_ms = now_ms() + backoff(e.attempts).as_millis() as u64;
        let txn = self.db.begin_write()?;
        txn.open_table(QUEUE)?.insert(id, e.encode_to_vec().as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Puts an entry back untouched for `after` (its target is known to be down: that is not
    /// an attempt). Blocking.
    pub fn postpone(&self, id: u64, mut e: Entry, after: Duration) -> Result<()> {
        e.next_ms = now_ms() + after.as_millis() as u64;
        let txn = self.db.begin_write()?;
        txn.open_table(QUEUE)?.insert(id, e.encode_to_vec().as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Entries waiting. Blocking.
    pub fn len(&self) -> Result<u64> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(QUEUE)?.len()?)
    }

    /// Whether nothing waits. Blocking.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_reopening_and_back_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handoff.redb");
        {
            let q = Handoff::open(&path).unwrap();
            q.push(&[
                Entry {
                    target: "a".into(),
                    record: Some(FileRecord {
                        key: "k".into(),
                        ..Default::default()
                    }),
                    attempts: 0,
                    next_ms: 0,
                },
                Entry {
                    target: "b".into(),
                    record: None,
                    attempts: 0,
                    next_ms: 0,
                },
            ])
            .unwrap();
        }
        let q = Handoff::open(&path).unwrap();
        assert_eq!(q.len().unwrap(), 2);
        let due = q.due(now_ms(), 10).unwrap();
        assert_eq!(due.len(), 2);
        assert_eq!(due[0].1.record.as_ref().unwrap().key, "k");
        q.retry(due[0].0, due[0].1.clone()).unwrap();
        // Backed off: not due now, due later.
        assert_eq!(q.due(now_ms(), 10).unwrap().len(), 1);
        assert_eq!(q.due(now_ms() + 1_000, 10).unwrap().len(), 2);
        q.done(due[1].0).unwrap();
        assert_eq!(q.len().unwrap(), 1);
        assert!(backoff(1) < backoff(3) && backoff(40) == BACKOFF_MAX);
    }
}
