//! Per-peer coalescing of small replication calls (record reads, pending and commit rounds).
//!
//! One [`Batcher`] per peer and call kind. A request that arrives while no call to that peer
//! is in flight is sent at once, alone (no added latency when idle); requests that arrive while
//! a call is in flight wait and go together in the next one, at most [`MAX_BATCH`] per call.
//! Every waiter gets its own item's result: a call that fails gives every waiter of the batch
//! the error, and a peer that answers for only part of a batch gives the rest an error. A waiter
//! that stops waiting (its request was cancelled) does not cancel the batch: the others still
//! get their answers, and a request not yet sent is left out of the next batch.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use futures_util::future::BoxFuture;
use prometheus::Histogram;
use tokio::sync::oneshot;
use tonic::Status;
use tracing::Instrument;

/// Most items in one batched call (the server refuses more than [`MAX_ITEMS`]).
pub const MAX_BATCH: usize = 256;

/// Most items a server accepts in one batched call.
pub const MAX_ITEMS: usize = 1024;

/// The call a batcher makes: the items in order, answered by one result per item in the same
/// order (fewer results than items: the rest failed), or one error for the whole call.
pub type BatchCall<Q, A> =
    Arc<dyn Fn(Vec<Q>) -> BoxFuture<'static, Result<Vec<Result<A, Status>>, Status>> + Send + Sync>;

/// A queued request: the item, where its answer goes, and the caller's span and W3C
/// traceparent, so the call that carries it stays in the caller's trace.
type Waiter<Q, A> = (Q, oneshot::Sender<Result<A, Status>>, tracing::Span, Option<String>);

struct State<Q, A> {
    queue: VecDeque<Waiter<Q, A>>,
    running: bool,
}

/// Coalesces concurrent calls of one kind to one peer. Cheap to clone.
pub struct Batcher<Q, A> {
    state: Arc<Mutex<State<Q, A>>>,
    call: BatchCall<Q, A>,
    max: usize,
    sizes: Option<Histogram>,
}

impl<Q, A> Clone for Batcher<Q, A> {
    fn clone(&self) -> Self {
        Batcher {
            state: self.state.clone(),
            call: self.call.clone(),
            max: self.max,
            sizes: self.sizes.clone(),
        }
    }
}

impl<Q: Send + 'static, A: Send + 'static> Batcher<Q, A> {
    /// A batcher making `call` with at most `max` items (at least 1); batch sizes are observed
    /// in `sizes`.
    pub fn new(call: BatchCall<Q, A>, max: usize, sizes: Option<Histogram>) -> Self {
        Batcher {
            state: Arc::new(Mutex::new(State {
                queue: VecDeque::new(),
                running: false,
            })),
            call,
            max: max.max(1),
            sizes,
        }
    }

    /// Sends `q` in the next batch and waits for its result.
    pub async fn call(&self, q: Q) -> Result<A, Status> {
        let (tx, rx) = oneshot::channel();
        let caller = tracing::Span::current();
        let traceparent = peervault_runtime::telemetry::current_traceparent();
        let start = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            s.queue.push_back((q, tx, caller, traceparent));
            !std::mem::replace(&mut s.running, true)
        };
        if start {
            // The sender runs on its own task, so a waiter that goes away never stops it.
            tokio::spawn(self.clone().drain());
        }
        rx.await
            .unwrap_or_else(|_| Err(Status::unavailable("the batched replication call was dropped")))
    }

    /// Sends batches until the queue is empty.
    async fn drain(self) {
        loop {
            let batch: Vec<Waiter<Q, A>> = {
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                // Requests whose callers stopped waiting are not sent at all.
                s.queue.retain(|(_, tx, _, _)| !tx.is_closed());
                if s.queue.is_empty() {
                    s.running = false;
                    return;
                }
                let n = s.queue.len().min(self.max);
                s.queue.drain(..n).collect()
            };
            if let Some(h) = &self.sizes {
                h.observe(batch.len() as f64);
            }
            let mut items = Vec::with_capacity(batch.len());
            let mut waiters = Vec::with_capacity(batch.len());
            let mut callers = Vec::with_capacity(batch.len());
            let mut traceparents = Vec::with_capacity(batch.len());
            for (q, tx, span, tp) in batch {
                items.push(q);
                waiters.push(tx);
                callers.push(span);
                traceparents.push(tp);
            }
            // A call carrying one request continues its caller's trace (an idle pod's writes
            // stay one trace across the replicas); one carrying several is a root linked to
            // every caller, the way a batched event publish is.
            let span = match callers.as_slice() {
                [one] => tracing::info_span!(parent: one, "replication_batch", items = 1),
                _ => {
                    let span = tracing::info_span!(parent: None, "replication_batch", items = callers.len());
                    peervault_runtime::telemetry::link_traceparents(
                        &span,
                        traceparents.iter().flatten().map(String::as_str),
                    );
                    span
                }
            };
            let fut = {
                let _entered = span.enter();
                (self.call)(items)
            };
            match fut.instrument(span).await {
                Ok(results) => {
                    let mut results = results.into_iter();
                    for tx in waiters {
                        let r = results.next().unwrap_or_else(|| {
                            Err(Status::internal("the replica answered for only part of a batched call"))
                        });
                        let _ = tx.send(r);
                    }
                }
                Err(st) => {
                    for tx in waiters {
                        let _ = tx.send(Err(st.clone()));
                    }
                }
            }
        }
    }
}

/// A batched item's status as sent on the wire (`None`: OK).
pub fn item_status(r: &Result<(), Status>) -> Option<peervault_proto::v1::ItemStatus> {
    match r {
        Ok(()) => None,
        Err(st) => Some(peervault_proto::v1::ItemStatus {
            code: st.code() as i32,
            message: st.message().to_string(),
        }),
    }
}

/// A received item's status as a result.
pub fn item_result(s: Option<peervault_proto::v1::ItemStatus>) -> Result<(), Status> {
    match s {
        Some(s) if s.code != 0 => Err(Status::new(tonic::Code::from(s.code), s.message)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use tokio::sync::Notify;

    use super::*;

    /// A call that records each batch and blocks until `gate` is opened (once per batch).
    fn gated(
        batches: Arc<Mutex<Vec<Vec<u32>>>>,
        gate: Arc<Notify>,
        answer: impl Fn(&[u32]) -> Result<Vec<Result<u32, Status>>, Status> + Send + Sync + 'static,
    ) -> BatchCall<u32, u32> {
        let answer = Arc::new(answer);
        Arc::new(move |items: Vec<u32>| {
            let batches = batches.clone();
            let gate = gate.clone();
            let answer = answer.clone();
            Box::pin(async move {
                batches.lock().unwrap().push(items.clone());
                gate.notified().await;
                answer(&items)
            })
        })
    }

    fn doubled(items: &[u32]) -> Result<Vec<Result<u32, Status>>, Status> {
        Ok(items.iter().map(|i| Ok(i * 2)).collect())
    }

    /// Waits until `n` batches were started.
    async fn started(batches: &Arc<Mutex<Vec<Vec<u32>>>>, n: usize) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while batches.lock().unwrap().len() < n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("batch started");
    }

    #[tokio::test]
    async fn an_idle_call_goes_alone_and_later_ones_share_the_next_batch() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Notify::new());
        let b = Batcher::new(gated(batches.clone(), gate.clone(), doubled), 3, None);
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.call(1).await }
        });
        started(&batches, 1).await;
        let rest: Vec<_> = (2..=6)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { b.call(i).await })
            })
            .collect();
        // Let the five queue up behind the call in flight.
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            batches.lock().unwrap().len(),
            1,
            "nothing is sent while a call is in flight"
        );
        gate.notify_one();
        assert_eq!(first.await.unwrap().unwrap(), 2);
        started(&batches, 2).await;
        gate.notify_one();
        started(&batches, 3).await;
        gate.notify_one();
        let got: Vec<u32> = futures_util::future::join_all(rest)
            .await
            .into_iter()
            .map(|r| r.unwrap().unwrap())
            .collect();
        assert_eq!(got, vec![4, 6, 8, 10, 12]);
        let seen = batches.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![vec![1], vec![2, 3, 4], vec![5, 6]],
            "bounded batches in arrival order"
        );
    }

    #[tokio::test]
    async fn a_failed_batch_gives_every_waiter_the_error() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Notify::new());
        let b = Batcher::new(
            gated(batches.clone(), gate.clone(), |_| Err(Status::unavailable("peer down"))),
            16,
            None,
        );
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.call(1).await }
        });
        started(&batches, 1).await;
        let rest: Vec<_> = (2..=4)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { b.call(i).await })
            })
            .collect();
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        started(&batches, 2).await;
        gate.notify_one();
        assert_eq!(first.await.unwrap().unwrap_err().code(), tonic::Code::Unavailable);
        for r in futures_util::future::join_all(rest).await {
            let e = r.unwrap().unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unavailable);
            assert_eq!(e.message(), "peer down");
        }
        assert_eq!(batches.lock().unwrap()[1], vec![2, 3, 4]);
    }

    #[tokio::test]
    async fn a_partial_answer_fails_only_the_unanswered_items() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Notify::new());
        // Answers the first item only, and the second with an item error.
        let b = Batcher::new(
            gated(batches.clone(), gate.clone(), |items| {
                Ok(items
                    .iter()
                    .take(2)
                    .enumerate()
                    .map(|(n, i)| if n == 0 { Ok(*i) } else { Err(Status::not_found("gone")) })
                    .collect())
            }),
            16,
            None,
        );
        let hold = tokio::spawn({
            let b = b.clone();
            async move { b.call(0).await }
        });
        started(&batches, 1).await;
        let rest: Vec<_> = (1..=3)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { b.call(i).await })
            })
            .collect();
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        assert_eq!(hold.await.unwrap().unwrap(), 0);
        started(&batches, 2).await;
        gate.notify_one();
        let got: Vec<Result<u32, Status>> = futures_util::future::join_all(rest)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(got[0].as_ref().unwrap(), &1);
        assert_eq!(got[1].as_ref().unwrap_err().code(), tonic::Code::NotFound);
        assert_eq!(got[2].as_ref().unwrap_err().code(), tonic::Code::Internal);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_does_not_cancel_the_batch_and_is_not_sent_later() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Notify::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let call = gated(batches.clone(), gate.clone(), doubled);
        let counted: BatchCall<u32, u32> = {
            let calls = calls.clone();
            Arc::new(move |items| {
                calls.fetch_add(1, Ordering::SeqCst);
                call(items)
            })
        };
        let b = Batcher::new(counted, 16, None);
        // The first waiter is cancelled while its call is in flight.
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.call(1).await }
        });
        started(&batches, 1).await;
        let keep = tokio::spawn({
            let b = b.clone();
            async move { b.call(2).await }
        });
        let dropped = tokio::spawn({
            let b = b.clone();
            async move { b.call(3).await }
        });
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        first.abort();
        dropped.abort();
        let _ = dropped.await;
        gate.notify_one();
        started(&batches, 2).await;
        gate.notify_one();
        assert_eq!(keep.await.unwrap().unwrap(), 4);
        // Item 3's caller left before its batch went out: it was not sent.
        assert_eq!(batches.lock().unwrap().clone(), vec![vec![1], vec![2]]);
        // And the batcher is idle again: a new call goes straight out.
        let again = tokio::spawn({
            let b = b.clone();
            async move { b.call(5).await }
        });
        started(&batches, 3).await;
        gate.notify_one();
        assert_eq!(again.await.unwrap().unwrap(), 10);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn item_statuses_round_trip() {
        assert!(item_result(item_status(&Ok(()))).is_ok());
        let e = item_result(item_status(&Err(Status::failed_precondition("no chunks")))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert_eq!(e.message(), "no chunks");
        assert!(item_result(Some(peervault_proto::v1::ItemStatus::default())).is_ok());
    }
}
