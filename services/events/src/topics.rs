//! Topics and event types of the published PeerVault WebSocket API.

use std::fmt;

/// A topic of the PeerVault WebSocket API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    /// `file_operations`: uploads, deletes, metadata updates, replication.
    FileOperations,
    /// `peer_network`: peers joining, leaving, changing health; topology changes.
    PeerNetwork,
    /// `system`: periodic system, storage, network and performance metrics.
    System,
    /// `alerts`: thresholds crossed.
    Alerts,
}

/// Every topic, in the published order.
pub const TOPICS: [Topic; 4] = [Topic::FileOperations, Topic::PeerNetwork, Topic::System, Topic::Alerts];

/// Topic names as a human-readable list, for error messages.
pub const TOPIC_LIST: &str = "file_operations, peer_network, system, alerts";

impl Topic {
    /// The topic's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Topic::FileOperations => "file_operations",
            Topic::PeerNetwork => "peer_network",
            Topic::System => "system",
            Topic::Alerts => "alerts",
        }
    }

    /// The topic of a wire name, if it is one.
    pub fn parse(s: &str) -> Option<Topic> {
        TOPICS.into_iter().find(|t| t.as_str() == s)
    }

    /// The event types published under this topic.
    pub fn types(self) -> &'static [&'static str] {
        match self {
            Topic::FileOperations => &["file_uploaded", "file_deleted", "file_updated", "file_replicated"],
            Topic::PeerNetwork => &[
                "peer_connected",
                "peer_disconnected",
                "peer_health_changed",
                "network_topology_changed",
            ],
            Topic::System => &[
                "system_metrics",
                "storage_metrics",
                "network_metrics",
                "performance_metrics",
            ],
            Topic::Alerts => &["performance_alert", "security_alert", "storage_alert", "network_alert"],
        }
    }

    /// A bit of a topic set ([`TopicSet`]).
    pub fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of topics, as a bit mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TopicSet(u8);

impl TopicSet {
    /// No topic.
    pub const EMPTY: TopicSet = TopicSet(0);
    /// Every topic.
    pub const ALL: TopicSet = TopicSet(0b1111);

    /// Whether `t` is in the set.
    pub fn contains(self, t: Topic) -> bool {
        self.0 & t.bit() != 0
    }

    /// Adds `t`; returns whether it was new.
    pub fn insert(&mut self, t: Topic) -> bool {
        let new = !self.contains(t);
        self.0 |= t.bit();
        new
    }

    /// Removes `t`; returns whether it was there.
    pub fn remove(&mut self, t: Topic) -> bool {
        let had = self.contains(t);
        self.0 &= !t.bit();
        had
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The topics in the set, in the published order.
    pub fn iter(self) -> impl Iterator<Item = Topic> {
        TOPICS.into_iter().filter(move |t| self.contains(*t))
    }
}

impl FromIterator<Topic> for TopicSet {
    fn from_iter<I: IntoIterator<Item = Topic>>(iter: I) -> Self {
        let mut s = TopicSet::EMPTY;
        for t in iter {
            s.insert(t);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_types_are_disjoint() {
        let mut seen = std::collections::HashSet::new();
        for t in TOPICS {
            assert_eq!(Topic::parse(t.as_str()), Some(t));
            for ty in t.types() {
                assert!(seen.insert(*ty), "{ty} in two topics");
            }
        }
        assert_eq!(Topic::parse("files"), None);
        let mut s = TopicSet::EMPTY;
        assert!(s.insert(Topic::Alerts));
        assert!(!s.insert(Topic::Alerts));
        assert!(s.contains(Topic::Alerts) && !s.contains(Topic::System));
        assert!(s.remove(Topic::Alerts) && s.is_empty());
        assert_eq!(TopicSet::ALL.iter().count(), 4);
    }
}
