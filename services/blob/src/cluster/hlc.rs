//! Hybrid logical clock: (physical ms, logical counter, pod id). Every local event and every
//! reading received moves the clock past what it has seen, so records written on pods with
//! skewed wall clocks still order causally; a reading too far in the future is refused rather
//! than dragging every pod's clock along.

use std::{
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::store::records::Hlc;

/// How far ahead of the local wall clock a received reading may be.
pub const MAX_AHEAD: Duration = Duration::from_secs(600);

/// A reading refused because it is too far in the future.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "clock reading from {node} is {ahead_ms} ms ahead of this pod's clock (more than {max_ms} ms): check NTP on both pods"
)]
pub struct FromTheFuture {
    /// The pod that made the reading.
    pub node: String,
    /// How far ahead it is.
    pub ahead_ms: u64,
    /// The bound.
    pub max_ms: u64,
}

type Wall = Box<dyn Fn() -> u64 + Send + Sync>;

/// The clock of one pod. Cheap to share behind an `Arc`.
pub struct Clock {
    node: String,
    last: Mutex<(u64, u32)>,
    wall: Wall,
    max_ahead_ms: u64,
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

impl Clock {
    /// The clock of pod `node` on the system wall clock.
    pub fn new(node: &str) -> Self {
        Self::with_wall(node, Box::new(wall_ms))
    }

    /// A clock on a given wall clock (tests skew it).
    pub fn with_wall(node: &str, wall: Wall) -> Self {
        Clock {
            node: node.to_string(),
            last: Mutex::new((0, 0)),
            wall,
            max_ahead_ms: MAX_AHEAD.as_millis() as u64,
        }
    }

    /// This pod's id in readings.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// A new reading for a local event (a write), later than every reading made or seen.
    pub fn now(&self) -> Hlc {
        let wall = (self.wall)();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let (pt, l) = if wall > last.0 {
            (wall, 0)
        } else {
            (last.0, last.1.saturating_add(1))
        };
        *last = (pt, l);
        Hlc {
            physical_ms: pt,
            logical: l,
            node_id: self.node.clone(),
        }
    }

    /// Takes in a reading received from another pod, so later local readings order after it.
    /// A reading more than [`MAX_AHEAD`] ahead of the wall clock is refused and leaves the
    /// clock as it was.
    pub fn observe(&self, seen: &Hlc) -> Result<(), FromTheFuture> {
        let wall = (self.wall)();
        if seen.physical_ms > wall.saturating_add(self.max_ahead_ms) {
            return Err(FromTheFuture {
                node: seen.node_id.clone(),
                ahead_ms: seen.physical_ms - wall,
                max_ms: self.max_ahead_ms,
            });
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let pt = wall.max(last.0).max(seen.physical_ms);
        let l = if pt == last.0 && pt == seen.physical_ms {
            last.1.max(seen.logical).saturating_add(1)
        } else if pt == last.0 {
            last.1.saturating_add(1)
        } else if pt == seen.physical_ms {
            seen.logical.saturating_add(1)
        } else {
            0
        };
        *last = (pt, l);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    };

    use super::*;
    use crate::store::replica::hlc_key;

    fn clock(node: &str, wall: Arc<AtomicU64>) -> Clock {
        Clock::with_wall(node, Box::new(move || wall.load(Ordering::SeqCst)))
    }

    #[test]
    fn readings_increase_even_when_the_wall_clock_stands_still_or_goes_back() {
        let wall = Arc::new(AtomicU64::new(1_000));
        let c = clock("a", wall.clone());
        let r1 = c.now();
        let r2 = c.now();
        wall.store(900, Ordering::SeqCst); // NTP stepped back
        let r3 = c.now();
        assert!(hlc_key(Some(&r1)) < hlc_key(Some(&r2)));
        assert!(hlc_key(Some(&r2)) < hlc_key(Some(&r3)));
        assert_eq!(r3.physical_ms, 1_000);
    }

    #[test]
    fn a_pod_behind_orders_its_writes_after_what_it_has_seen() {
        // Pod a's wall clock is 5 minutes ahead of pod b's.
        let wa = Arc::new(AtomicU64::new(1_000_000 + 300_000));
        let wb = Arc::new(AtomicU64::new(1_000_000));
        let a = clock("a", wa);
        let b = clock("b", wb.clone());
        let write_a = a.now();
        b.observe(&write_a).unwrap();
        let write_b = b.now();
        assert!(
            hlc_key(Some(&write_b)) > hlc_key(Some(&write_a)),
            "b's later write must win over a's earlier one despite b's slow clock"
        );
        // Equal physical and logical parts are ordered by pod id, so no two readings tie.
        let x = Hlc {
            physical_ms: 5,
            logical: 1,
            node_id: "a".into(),
        };
        let y = Hlc {
            node_id: "b".into(),
            ..x.clone()
        };
        assert!(hlc_key(Some(&x)) < hlc_key(Some(&y)));
        assert!(hlc_key(None) < hlc_key(Some(&x)));
    }

    #[test]
    fn readings_from_far_in_the_future_are_refused_and_change_nothing() {
        let wall = Arc::new(AtomicU64::new(1_000_000));
        let c = clock("a", wall);
        let before = c.now();
        let future = Hlc {
            physical_ms: 1_000_000 + MAX_AHEAD.as_millis() as u64 + 1,
            logical: 0,
            node_id: "z".into(),
        };
        let err = c.observe(&future).unwrap_err();
        assert_eq!(err.node, "z");
        let after = c.now();
        assert_eq!(after.physical_ms, before.physical_ms);
        // Within the bound the clock jumps forward.
        let near = Hlc {
            physical_ms: 1_000_000 + 60_000,
            logical: 7,
            node_id: "z".into(),
        };
        c.observe(&near).unwrap();
        let next = c.now();
        assert!(hlc_key(Some(&next)) > hlc_key(Some(&near)));
    }
}
