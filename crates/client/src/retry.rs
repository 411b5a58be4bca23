//! Exponential backoff with jitter for the retryable status codes.

use std::{future::Future, sync::Arc, time::Duration};

use tonic::Status;

use crate::error::{chain_text, is_retryable};

/// Called before each retry with (what, attempt number from 1, the status, the delay).
pub type RetryObserver = Arc<dyn Fn(&str, u32, &Status, Duration) + Send + Sync>;

/// How often and how patiently retryable failures (UNAVAILABLE, DEADLINE_EXCEEDED,
/// RESOURCE_EXHAUSTED) are retried: delays grow from `initial_backoff` by `multiplier` up to
/// `max_backoff`, each drawn at random between half and all of its value ("equal jitter"), so
/// that many clients do not retry in lockstep.
#[derive(Clone)]
pub struct RetryPolicy {
    /// Retries after the first attempt; 0 disables retrying.
    pub max_retries: u32,
    /// Delay before the first retry.
    pub initial_backoff: Duration,
    /// Upper bound of any delay.
    pub max_backoff: Duration,
    /// Growth factor of the delay.
    pub multiplier: f64,
    /// Told about every retry (the CLI prints a line per retry with `--verbose`).
    pub observer: Option<RetryObserver>,
}

impl std::fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_retries", &self.max_retries)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("multiplier", &self.multiplier)
            .finish_non_exhaustive()
    }
}

impl Default for RetryPolicy {
    /// 5 retries, 200 ms doubling up to 5 s (about 6 s of waiting in the worst case).
    fn default() -> Self {
        RetryPolicy {
            max_retries: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            multiplier: 2.0,
            observer: None,
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn none() -> Self {
        RetryPolicy {
            max_retries: 0,
            ..Default::default()
        }
    }

    /// The delay before retry number `attempt` (from 1), jittered.
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self.initial_backoff.as_secs_f64() * self.multiplier.max(1.0).powi(attempt.saturating_sub(1) as i32);
        let capped = base.min(self.max_backoff.as_secs_f64()).max(0.0);
        Duration::from_secs_f64(capped / 2.0 + fastrand::f64() * capped / 2.0)
    }

    /// Tells the observer (and the log) about a retry.
    pub(crate) fn note(&self, what: &str, attempt: u32, status: &Status, delay: Duration) {
        tracing::debug!(call = what, attempt, code = ?status.code(), error = %chain_text(status), ?delay, "retrying");
        if let Some(o) = &self.observer {
            o(what, attempt, status, delay);
        }
    }

    /// Runs `f` until it succeeds, fails with a non-retryable status, or retries run out.
    pub async fn run<T, F, Fut>(&self, what: &str, f: F) -> Result<T, Status>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut attempt = 0;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(s) if is_retryable(&s) && attempt < self.max_retries => {
                    attempt += 1;
                    let d = self.delay(attempt);
                    self.note(what, attempt, &s, d);
                    tokio::time::sleep(d).await;
                }
                Err(s) => return Err(s),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn fast(n: u32) -> RetryPolicy {
        RetryPolicy {
            max_retries: n,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(4),
            multiplier: 2.0,
            observer: None,
        }
    }

    #[test]
    fn delays_grow_are_capped_and_jittered() {
        let p = RetryPolicy::default();
        for attempt in 1..20 {
            let d = p.delay(attempt);
            let base = (0.2 * 2f64.powi(attempt as i32 - 1)).min(5.0);
            assert!(
                d.as_secs_f64() >= base / 2.0 - 1e-9 && d.as_secs_f64() <= base + 1e-9,
                "{attempt}: {d:?}"
            );
        }
        let distinct: std::collections::HashSet<_> = (0..20).map(|_| p.delay(3)).collect();
        assert!(distinct.len() > 1, "delays are jittered");
    }

    #[tokio::test]
    async fn unavailable_is_retried_until_it_succeeds() {
        let n = AtomicU32::new(0);
        let seen = Arc::new(AtomicU32::new(0));
        let s2 = seen.clone();
        let mut p = fast(5);
        p.observer = Some(Arc::new(move |_, _, _, _| {
            s2.fetch_add(1, Ordering::SeqCst);
        }));
        let r = p
            .run("x", || async {
                if n.fetch_add(1, Ordering::SeqCst) < 3 {
                    Err(Status::unavailable("down"))
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(n.load(Ordering::SeqCst), 4);
        assert_eq!(seen.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn invalid_argument_is_never_retried_and_retries_run_out() {
        let n = AtomicU32::new(0);
        let r: Result<(), _> = fast(5)
            .run("x", || async {
                n.fetch_add(1, Ordering::SeqCst);
                Err(Status::invalid_argument("bad"))
            })
            .await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        let n = AtomicU32::new(0);
        let r: Result<(), _> = fast(2)
            .run("x", || async {
                n.fetch_add(1, Ordering::SeqCst);
                Err(Status::deadline_exceeded("slow"))
            })
            .await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::DeadlineExceeded);
        assert_eq!(n.load(Ordering::SeqCst), 3);
    }
}
