//! Health judgement: each check's outcome moves a peer between `unknown`, `healthy`,
//! `degraded` and `down`, with hysteresis so that one slow or lost check does not flap it.
//!
//! Rules, in order, after each check:
//! - `down_after` failures in a row → `down`;
//! - the first passing check of an `unknown` peer → `healthy` (or `degraded` when slow);
//! - a `down` or `degraded` peer needs `up_after` passing checks in a row to come back, and
//!   comes back `healthy` when the last one was fast, `degraded` otherwise;
//! - a `healthy` peer becomes `degraded` after two bad checks in a row (failed or slow).

use std::time::{Duration, Instant, SystemTime};

use peervault_proto::v1::PeerHealthState;

/// Health thresholds (from `--probe-*` flags).
#[derive(Debug, Clone, Copy)]
pub struct HealthPolicy {
    /// Interval between checks of one peer.
    pub interval: Duration,
    /// Deadline of one check.
    pub timeout: Duration,
    /// Failures in a row that make a peer `down`.
    pub down_after: u32,
    /// Passing checks in a row that bring a peer back to `healthy`.
    pub up_after: u32,
    /// A passing check slower than this is slow.
    pub slow: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            down_after: 3,
            up_after: 2,
            slow: Duration::from_millis(500),
        }
    }
}

impl HealthPolicy {
    /// Longest time from a peer stopping to it being reported `down`: the last check that
    /// passed may have just finished, then `down_after` checks each take the full timeout.
    pub fn detection_time(&self) -> Duration {
        (self.interval.max(self.timeout)) * self.down_after + self.timeout
    }
}

/// Outcome of one health check.
#[derive(Debug, Clone)]
pub enum ProbeOutcome {
    /// The peer answered SERVING after this round trip.
    Serving(Duration),
    /// The check failed; the reason is a short bounded label (`timeout`, `unavailable`,
    /// `not_serving`, ...) and the detail is for logs.
    Failed {
        /// Bounded label.
        reason: &'static str,
        /// Human-readable detail.
        detail: String,
    },
}

/// Everything known about one peer's health.
#[derive(Debug, Clone)]
pub struct HealthRecord {
    /// Current state.
    pub state: PeerHealthState,
    /// Failed checks in a row.
    pub consecutive_failures: u32,
    /// Passing checks in a row.
    pub consecutive_ok: u32,
    /// Failed or slow checks in a row.
    pub consecutive_bad: u32,
    /// Moving average of passing checks' latency, in milliseconds.
    pub latency_avg_ms: f64,
    /// Latency of the latest passing check, in milliseconds.
    pub latency_last_ms: f64,
    /// When the latest check ran.
    pub last_check: Option<SystemTime>,
    /// When a check last passed.
    pub last_seen: Option<SystemTime>,
    /// When the peer last went from not-up to up.
    pub up_since: Option<Instant>,
    /// Checks run.
    pub checks_total: u64,
    /// Checks failed.
    pub failures_total: u64,
    /// Reason of the latest failure.
    pub last_error: String,
}

impl Default for HealthRecord {
    fn default() -> Self {
        HealthRecord {
            state: PeerHealthState::Unknown,
            consecutive_failures: 0,
            consecutive_ok: 0,
            consecutive_bad: 0,
            latency_avg_ms: 0.0,
            latency_last_ms: 0.0,
            last_check: None,
            last_seen: None,
            up_since: None,
            checks_total: 0,
            failures_total: 0,
            last_error: String::new(),
        }
    }
}

/// Weight of the newest sample in the latency moving average.
const EWMA_ALPHA: f64 = 0.3;

impl HealthRecord {
    /// Applies one check's outcome; returns the previous state when the state changed.
    pub fn apply(&mut self, outcome: &ProbeOutcome, policy: &HealthPolicy) -> Option<PeerHealthState> {
        let now = SystemTime::now();
        self.checks_total += 1;
        self.last_check = Some(now);
        let fast = match outcome {
            ProbeOutcome::Serving(rtt) => {
                let ms = rtt.as_secs_f64() * 1000.0;
                self.latency_last_ms = ms;
                self.latency_avg_ms = if self.consecutive_ok == 0 && self.latency_avg_ms == 0.0 {
                    ms
                } else {
                    EWMA_ALPHA * ms + (1.0 - EWMA_ALPHA) * self.latency_avg_ms
                };
                self.last_seen = Some(now);
                self.consecutive_failures = 0;
                self.consecutive_ok += 1;
                let fast = *rtt <= policy.slow;
                if fast {
                    self.consecutive_bad = 0;
                } else {
                    self.consecutive_bad += 1;
                }
                Some(fast)
            }
            ProbeOutcome::Failed { detail, .. } => {
                self.failures_total += 1;
                self.consecutive_failures += 1;
                self.consecutive_ok = 0;
                self.consecutive_bad += 1;
                self.last_error = detail.clone();
                None
            }
        };
        let prev = self.state;
        use PeerHealthState::*;
        let next = match (prev, fast) {
            (_, None) if self.consecutive_failures >= policy.down_after => Down,
            (Unknown, Some(true)) => Healthy,
            (Unknown, Some(false)) => Degraded,
            (Down | Degraded, Some(f)) if self.consecutive_ok >= policy.up_after => {
                if f {
                    Healthy
                } else {
                    Degraded
                }
            }
            (Healthy, _) if self.consecutive_bad >= 2 => Degraded,
            (s, _) => s,
        };
        if next == prev {
            return None;
        }
        let up = |s| matches!(s, Healthy | Degraded);
        if up(next) && !up(prev) {
            self.up_since = Some(Instant::now());
        } else if !up(next) {
            self.up_since = None;
        }
        self.state = next;
        Some(prev)
    }

    /// Seconds since the peer last came up; 0 when not up.
    pub fn uptime_seconds(&self) -> u64 {
        self.up_since.map(|t| t.elapsed().as_secs()).unwrap_or(0)
    }
}

/// The published status word of a state.
pub fn status_word(state: PeerHealthState) -> &'static str {
    match state {
        PeerHealthState::Unknown => "unknown",
        PeerHealthState::Healthy => "healthy",
        PeerHealthState::Degraded => "degraded",
        PeerHealthState::Down => "down",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PeerHealthState::*;

    fn ok(ms: u64) -> ProbeOutcome {
        ProbeOutcome::Serving(Duration::from_millis(ms))
    }
    fn fail() -> ProbeOutcome {
        ProbeOutcome::Failed {
            reason: "timeout",
            detail: "deadline exceeded".into(),
        }
    }

    #[test]
    fn first_success_is_healthy_and_failures_go_down_after_the_threshold() {
        let p = HealthPolicy::default();
        let mut h = HealthRecord::default();
        assert_eq!(h.apply(&ok(5), &p), Some(Unknown));
        assert_eq!(h.state, Healthy);
        h.apply(&fail(), &p);
        assert_eq!(h.state, Healthy, "one lost check must not flap");
        h.apply(&fail(), &p);
        assert_eq!(h.state, Degraded);
        h.apply(&fail(), &p);
        assert_eq!(h.state, Down);
        assert_eq!(h.uptime_seconds(), 0);
        h.apply(&ok(5), &p);
        assert_eq!(h.state, Down, "one success is not enough to come back");
        assert_eq!(h.apply(&ok(5), &p), Some(Down));
        assert_eq!(h.state, Healthy);
        assert_eq!(h.failures_total, 3);
        assert_eq!(h.checks_total, 6);
    }

    #[test]
    fn one_slow_check_does_not_degrade_two_do() {
        let p = HealthPolicy::default();
        let mut h = HealthRecord::default();
        h.apply(&ok(1), &p);
        h.apply(&ok(900), &p);
        assert_eq!(h.state, Healthy);
        h.apply(&ok(1), &p);
        h.apply(&ok(900), &p);
        assert_eq!(h.state, Healthy);
        h.apply(&ok(900), &p);
        assert_eq!(h.state, Degraded);
        h.apply(&ok(1), &p);
        assert_eq!(h.state, Healthy, "two passing checks in a row, the last fast");
    }

    #[test]
    fn a_peer_never_seen_goes_down_after_the_threshold() {
        let p = HealthPolicy {
            down_after: 2,
            ..Default::default()
        };
        let mut h = HealthRecord::default();
        h.apply(&fail(), &p);
        assert_eq!(h.state, Unknown);
        h.apply(&fail(), &p);
        assert_eq!(h.state, Down);
        assert!(h.last_seen.is_none());
    }

    #[test]
    fn latency_is_a_moving_average() {
        let p = HealthPolicy::default();
        let mut h = HealthRecord::default();
        h.apply(&ok(10), &p);
        assert!((h.latency_avg_ms - 10.0).abs() < 0.01);
        h.apply(&ok(20), &p);
        assert!((h.latency_avg_ms - 13.0).abs() < 0.01, "{}", h.latency_avg_ms);
    }

    #[test]
    fn detection_time_covers_the_checks_needed() {
        let p = HealthPolicy {
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(300),
            down_after: 3,
            ..Default::default()
        };
        assert_eq!(p.detection_time(), Duration::from_millis(1200));
    }
}
