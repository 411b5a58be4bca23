//! Time conversions every service needs: protobuf timestamps and RFC 3339 text.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost_types::Timestamp;

/// A time as a protobuf timestamp (times before the epoch become the epoch).
pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// Now as a protobuf timestamp.
pub fn now_timestamp() -> Timestamp {
    timestamp(SystemTime::now())
}

/// Nanoseconds since the epoch as a protobuf timestamp.
pub fn timestamp_from_ns(ns: i64) -> Timestamp {
    Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

/// A protobuf timestamp in RFC 3339 UTC with milliseconds (`2024-01-01T00:00:00.000Z`).
pub fn rfc3339(ts: &Timestamp) -> String {
    let t = UNIX_EPOCH
        + Duration::from_secs(ts.seconds.max(0) as u64)
        + Duration::from_nanos(ts.nanos.clamp(0, 999_999_999) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions() {
        assert_eq!(rfc3339(&timestamp_from_ns(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(&timestamp_from_ns(1_704_067_200_005_000_000)),
            "2024-01-01T00:00:00.005Z"
        );
        assert_eq!(
            rfc3339(&timestamp_from_ns(951_782_400_000_000_000)),
            "2000-02-29T00:00:00.000Z"
        );
        let t = UNIX_EPOCH + Duration::new(12, 34);
        assert_eq!(timestamp(t), timestamp_from_ns(12_000_000_034));
    }
}
