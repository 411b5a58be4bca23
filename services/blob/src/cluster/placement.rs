//! Placement: which pods own a partition. Rendezvous hashing over the members of the view
//! (removed peers are not in it), zones first, then nodes, then the rest, so every pod computes
//! the same owners from the same view and a membership change moves only the partitions whose
//! top scorers changed.

use std::collections::HashSet;

use crate::store::replica::PARTITIONS;

/// What placement needs to know of a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Stable id (pod name, or `host:port` for static discovery).
    pub id: String,
    /// Failure domain; empty when unknown.
    pub zone: String,
    /// Kubernetes node; empty when unknown.
    pub node: String,
}

/// Owners of every partition under one membership view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Replication factor in force (capped by the member count).
    pub factor: usize,
    owners: Vec<Vec<String>>,
}

fn score(partition: u32, id: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&partition.to_le_bytes());
    h.update(id.as_bytes());
    let b = h.finalize();
    let mut x = [0u8; 8];
    x.copy_from_slice(&b.as_bytes()[..8]);
    u64::from_le_bytes(x)
}

/// The `r` owners of `partition` among `members`, most preferred first.
pub fn owners_of(partition: u32, members: &[Member], r: usize) -> Vec<String> {
    let mut ranked: Vec<(u64, &Member)> = members.iter().map(|m| (score(partition, &m.id), m)).collect();
    // Ties (practically impossible) break by id so the order is total.
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.id.cmp(&b.1.id)));
    let r = r.min(ranked.len());
    let mut out: Vec<&Member> = Vec::with_capacity(r);
    let mut zones = HashSet::new();
    for (_, m) in &ranked {
        if out.len() == r {
            break;
        }
        if !m.zone.is_empty() && zones.insert(m.zone.as_str()) {
            out.push(m);
        }
    }
    let mut nodes: HashSet<&str> = out
        .iter()
        .filter(|m| !m.node.is_empty())
        .map(|m| m.node.as_str())
        .collect();
    for (_, m) in &ranked {
        if out.len() == r {
            break;
        }
        if !m.node.is_empty() && !out.iter().any(|o| o.id == m.id) && nodes.insert(m.node.as_str()) {
            out.push(m);
        }
    }
    for (_, m) in &ranked {
        if out.len() == r {
            break;
        }
        if !out.iter().any(|o| o.id == m.id) {
            out.push(m);
        }
    }
    out.into_iter().map(|m| m.id.clone()).collect()
}

impl Placement {
    /// Placement of every partition over `members` with replication factor `r`.
    pub fn new(members: &[Member], r: usize) -> Self {
        let factor = r.max(1).min(members.len().max(1));
        let owners = (0..PARTITIONS as u32).map(|p| owners_of(p, members, factor)).collect();
        Placement { factor, owners }
    }

    /// The owners of a partition, most preferred first (empty with no members).
    pub fn owners(&self, partition: u32) -> &[String] {
        self.owners.get(partition as usize).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Partitions `id` owns.
    pub fn partitions_of(&self, id: &str) -> Vec<u32> {
        (0..PARTITIONS as u32)
            .filter(|p| self.owners(*p).iter().any(|o| o == id))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, zone: &str, node: &str) -> Member {
        Member {
            id: id.into(),
            zone: zone.into(),
            node: node.into(),
        }
    }

    fn plain(n: usize) -> Vec<Member> {
        (0..n).map(|i| m(&format!("pod-{i}"), "", "")).collect()
    }

    #[test]
    fn owners_are_stable_distinct_and_capped_by_members() {
        let a = Placement::new(&plain(5), 3);
        let b = Placement::new(&plain(5).into_iter().rev().collect::<Vec<_>>(), 3);
        assert_eq!(a, b, "the order members are listed in must not matter");
        for p in 0..PARTITIONS as u32 {
            let o = a.owners(p);
            assert_eq!(o.len(), 3);
            let set: HashSet<_> = o.iter().collect();
            assert_eq!(set.len(), 3);
        }
        assert_eq!(Placement::new(&plain(2), 3).owners(7).len(), 2);
        assert_eq!(Placement::new(&plain(2), 3).factor, 2);
        assert!(Placement::new(&[], 3).owners(0).is_empty());
    }

    #[test]
    fn adding_a_member_moves_only_partitions_it_joins_and_about_its_share() {
        let before = Placement::new(&plain(5), 3);
        let after = Placement::new(&plain(6), 3);
        let mut moved = 0;
        for p in 0..PARTITIONS as u32 {
            let (o, n) = (before.owners(p), after.owners(p));
            let old: HashSet<_> = o.iter().collect();
            let new: HashSet<_> = n.iter().collect();
            if old != new {
                moved += 1;
                // Exactly one old owner gives way, to the new pod.
                assert!(
                    new.contains(&"pod-5".to_string()),
                    "partition {p} moved without the new pod"
                );
                assert_eq!(
                    old.intersection(&new).count(),
                    2,
                    "partition {p} moved more than one replica"
                );
            }
        }
        // The new pod's fair share is R/N of the partitions: 256 * 3 / 6 = 128.
        assert!((90..=166).contains(&moved), "{moved} partitions moved");
        // Removing it again restores the old placement exactly.
        assert_eq!(Placement::new(&plain(5), 3), before);
    }

    #[test]
    fn replicas_spread_over_zones_then_nodes() {
        let members = vec![
            m("a1", "za", "n1"),
            m("a2", "za", "n1"),
            m("a3", "za", "n2"),
            m("b1", "zb", "n3"),
            m("b2", "zb", "n3"),
            m("c1", "zc", "n4"),
        ];
        let pl = Placement::new(&members, 3);
        let zone = |id: &str| members.iter().find(|x| x.id == id).map(|x| x.zone.clone()).unwrap();
        for p in 0..PARTITIONS as u32 {
            let zones: HashSet<_> = pl.owners(p).iter().map(|o| zone(o)).collect();
            assert_eq!(zones.len(), 3, "partition {p}: {:?}", pl.owners(p));
        }
        // One zone with two nodes: replicas go to distinct nodes before doubling up.
        let members = vec![m("x1", "z", "n1"), m("x2", "z", "n1"), m("y1", "z", "n2")];
        let pl = Placement::new(&members, 2);
        let node = |id: &str| members.iter().find(|x| x.id == id).map(|x| x.node.clone()).unwrap();
        for p in 0..PARTITIONS as u32 {
            let nodes: HashSet<_> = pl.owners(p).iter().map(|o| node(o)).collect();
            assert_eq!(nodes.len(), 2, "partition {p}: {:?}", pl.owners(p));
        }
    }
}
