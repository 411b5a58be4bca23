//! The committer thread: applies concurrent operations in one index transaction (group commit),
//! made durable either by the transaction itself or, for batches of small puts, by one entry in
//! the index journal (`journal.rs`).

use std::{sync::Arc, time::Instant};

use redb::{Database, Durability};
use tokio::sync::mpsc;

use super::{
    index::{Batch, Job, Op, Reply, apply, read_counters},
    journal::{self, Journal},
};
use crate::{
    error::{BlobError, Result},
    metrics::BlobMetrics,
};

/// Most operations folded into one transaction.
const MAX_BATCH: usize = 256;

/// What the committer thread needs from the store around each batch.
pub(crate) struct CommitterHooks {
    /// Sees the counters after each commit.
    pub after_commit: Box<dyn Fn(super::index::Counters) + Send>,
    /// Called before each batch (test builds stop or break the committer here).
    pub before_batch: Box<dyn Fn() + Send>,
    /// Called once if the committer panics; it then stops and never commits again.
    pub on_fatal: Box<dyn Fn(String) + Send>,
}

/// Whether a failure aborts the whole transaction (storage-level: it may strike half-way
/// through an operation) rather than refusing one operation (which changes nothing).
pub(crate) fn aborts(e: &BlobError) -> bool {
    matches!(
        e,
        BlobError::Index(_) | BlobError::Corrupt(_) | BlobError::Io { .. } | BlobError::VolumeFull(_)
    )
}

/// Applies one batch and makes it durable: through the journal when it takes the batch
/// (the transaction then commits non-durably), else with a durable, quick-repair commit that
/// also covers every journal entry so far (the journal is emptied after it).
fn commit_batch(
    db: &Database,
    journal: &mut Journal,
    ops: Vec<Op>,
    metrics: &BlobMetrics,
) -> Result<Vec<Result<Reply>>> {
    let entry = journal.entry_for(&ops);
    let mut txn = db.begin_write()?;
    match &entry {
        Some(_) => txn.set_durability(Durability::None)?,
        None => txn.set_quick_repair(true),
    }
    let mut results = Vec::with_capacity(ops.len());
    let batch = Batch::new(&txn);
    for op in ops {
        match apply(&batch, op) {
            Err(e) if aborts(&e) => return Err(e),
            r => results.push(r),
        }
    }
    batch.finish()?;
    let Some((seq, bytes)) = entry else {
        journal::set_covered(&txn, journal.seq())?;
        txn.commit()?;
        journal.reset();
        return Ok(results);
    };
    journal::set_covered(&txn, seq)?;
    // Durable first, visible second: readers never see what a crash could take back.
    if let Err(e) = journal.append(seq, &bytes) {
        metrics.journal_appends.with_label_values(&["failed"]).inc();
        return Err(BlobError::io("append to the index journal", e));
    }
    if let Err(e) = txn.commit() {
        journal.unappend(bytes.len());
        metrics.journal_appends.with_label_values(&["failed"]).inc();
        return Err(e.into());
    }
    metrics.journal_appends.with_label_values(&["ok"]).inc();
    metrics.journal_bytes.inc_by(bytes.len() as u64);
    Ok(results)
}

/// Runs the committer on its own thread until every sender is gone. Each batch is one
/// transaction, durable by itself (quick-repair on, so a crash never needs a full repair at
/// start-up) or through the journal.
pub(crate) fn spawn_committer(
    db: Arc<Database>,
    mut rx: mpsc::Receiver<Job>,
    metrics: BlobMetrics,
    hooks: CommitterHooks,
    mut journal: Journal,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("blob-committer".into())
        .spawn(move || {
            let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
            while let Some(first) = rx.blocking_recv() {
                batch.push(first);
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(j) => batch.push(j),
                        Err(_) => break,
                    }
                }
                let started = Instant::now();
                metrics.commit_batch.observe(batch.len() as f64);
                let span = tracing::debug_span!("index_commit", ops = batch.len()).entered();
                // A panic while applying a batch must not leave a process that looks healthy:
                // the batch is refused, the committer stops, and the store reports it fatal.
                let (ops, senders): (Vec<Op>, Vec<_>) = batch.drain(..).map(|j| (j.op, (j.reply, j.content))).unzip();
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    (hooks.before_batch)();
                    commit_batch(&db, &mut journal, ops, &metrics)
                }));
                drop(span);
                metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
                match outcome {
                    Ok(Ok(results)) => {
                        // Counters first, so a caller that sees its reply also sees its effect.
                        match read_counters(&db) {
                            Ok(c) => (hooks.after_commit)(c),
                            Err(e) => tracing::error!(error = %e, "cannot read index counters"),
                        }
                        for ((tx, content), r) in senders.into_iter().zip(results) {
                            if let Some(mut c) = content {
                                if r.is_ok() {
                                    c.set_committed();
                                }
                                drop(c);
                            }
                            let _ = tx.send(r);
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "index commit failed; the batch is refused");
                        // Every job of the batch answers with the failure (a full volume is
                        // RESOURCE_EXHAUSTED, anything else UNAVAILABLE).
                        let full = e.is_volume_full();
                        let msg = e.to_string();
                        for (tx, content) in senders {
                            drop(content);
                            let r = if full {
                                BlobError::VolumeFull(msg.clone())
                            } else {
                                BlobError::Unavailable(format!("index commit failed ({msg}); retry the request"))
                            };
                            let _ = tx.send(Err(r));
                        }
                    }
                    Err(panic) => {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "unknown panic".into());
                        tracing::error!(panic = %what, "the index committer panicked; no further writes are accepted");
                        // Fatal first: no caller hears of the failure before the process is on its
                        // way out.
                        (hooks.on_fatal)(what);
                        drop(senders);
                        return;
                    }
                }
            }
        })
}
