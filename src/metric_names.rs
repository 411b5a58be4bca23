//! The one list of every metric name PeerVault exports: the union of the per-crate `names::ALL`
//! lists. Dashboards and alert rules may use only these (plus Prometheus's own `up` and the
//! standard `process_*` metrics); `peervault metrics names` prints the list for the deploy tests,
//! which check the Grafana dashboards and alert rules against it. A crate that adds a metric adds
//! it to its own `names::ALL`, and it appears here with no further edit.

/// Every per-crate list, with the crate that owns it.
pub const LISTS: &[(&str, &[&str])] = &[
    ("peervault-runtime", peervault_runtime::metrics::names::ALL),
    ("peervault-blob", peervault_blob::metrics::names::ALL),
    ("blob cluster", peervault_blob::cluster::metrics::names::ALL),
    ("peervault-peer", peervault_peer::metrics::names::ALL),
    ("peervault-events", peervault_events::metrics::names::ALL),
    ("peervault-membership", peervault_membership::names::ALL),
    ("peervault-events-client", peervault_events_client::names::ALL),
];

/// The union, sorted, each name once.
pub fn all() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = LISTS.iter().flat_map(|(_, names)| names.iter().copied()).collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_across_crates_and_follow_the_conventions() {
        let total: usize = LISTS.iter().map(|(_, n)| n.len()).sum();
        assert_eq!(all().len(), total, "a metric name is listed by two crates");
        for name in all() {
            assert!(
                name.starts_with("peervault_") || name.starts_with("grpc_server_"),
                "{name}: domain metrics are peervault_*"
            );
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{name}: not a Prometheus snake_case name"
            );
        }
    }
}
