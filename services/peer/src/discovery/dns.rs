//! DNS discovery: the SRV records of a name (host and port of each pod), or its A/AAAA records
//! with a port from `--dns-port`, re-resolved on an interval. This is how a Kubernetes headless
//! Service and Docker network aliases present a set of pods.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use futures_util::future::BoxFuture;
use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
    proto::rr::{RData, RecordType},
};
use peervault_proto::v1::MemberSource;
use tracing::Instrument;

use super::{Discovery, DiscoverySink};
use crate::{error::PeerError, registry::Discovered};

/// Resolves `name` every `interval`.
pub struct DnsDiscovery {
    name: String,
    port: Option<u16>,
    interval: Duration,
    resolver: TokioResolver,
}

impl DnsDiscovery {
    /// Uses the system resolver configuration, or `server` (`ip:port`) when given.
    pub fn new(
        name: &str,
        port: Option<u16>,
        interval: Duration,
        server: Option<SocketAddr>,
    ) -> Result<Self, PeerError> {
        if name.trim().is_empty() {
            return Err(PeerError::Config("--discovery dns needs --dns-name".into()));
        }
        super::check_host(name).map_err(|e| PeerError::Config(format!("invalid --dns-name: {e}")))?;
        let mut builder = match server {
            Some(addr) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![ns]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => TokioResolver::builder_tokio()
                .map_err(|e| PeerError::Config(format!("cannot read the system DNS configuration: {e}")))?,
        };
        let opts = builder.options_mut();
        // Answers are never cached longer than one interval, so each round sees changes.
        opts.positive_max_ttl = Some(interval);
        opts.negative_max_ttl = Some(interval);
        opts.timeout = Duration::from_secs(2).min(interval.max(Duration::from_millis(200)));
        opts.attempts = 2;
        let resolver = builder
            .build()
            .map_err(|e| PeerError::Config(format!("cannot build the DNS resolver: {e}")))?;
        Ok(DnsDiscovery {
            name: name.to_string(),
            port,
            interval,
            resolver,
        })
    }

    /// One round: the endpoints the name has now. `Ok(empty)` when the name has no records.
    pub async fn resolve(&self) -> Result<Vec<Discovered>, String> {
        match self.port {
            Some(port) => match self.resolver.lookup_ip(self.name.as_str()).await {
                Ok(ips) => Ok(ips
                    .iter()
                    .map(|ip| {
                        let mut d = Discovered::plain(&ip.to_string(), port, MemberSource::Dns);
                        d.metadata.insert("dns_name".into(), self.name.clone());
                        d
                    })
                    .collect()),
                Err(e) if e.is_no_records_found() => Ok(Vec::new()),
                Err(e) => Err(format!("A/AAAA lookup of {}: {e}", self.name)),
            },
            None => {
                let lookup = match self.resolver.srv_lookup(self.name.as_str()).await {
                    Ok(l) => l,
                    Err(e) if e.is_no_records_found() => return Ok(Vec::new()),
                    Err(e) => return Err(format!("SRV lookup of {}: {e}", self.name)),
                };
                // Addresses the server sent along (additional section), by owner name.
                let mut glue: BTreeMap<String, String> = BTreeMap::new();
                for r in lookup.additionals() {
                    let ip = match &r.data {
                        RData::A(a) => a.0.to_string(),
                        RData::AAAA(a) => a.0.to_string(),
                        _ => continue,
                    };
                    glue.entry(r.name.to_ascii().to_ascii_lowercase()).or_insert(ip);
                }
                let mut out = Vec::new();
                for r in lookup.answers() {
                    if r.record_type() != RecordType::SRV {
                        continue;
                    }
                    let RData::SRV(srv) = &r.data else { continue };
                    let target = srv.target.to_ascii().to_ascii_lowercase();
                    let host = target.trim_end_matches('.').to_string();
                    if host.is_empty() {
                        continue;
                    }
                    let ip = match glue.get(&target) {
                        Some(ip) => ip.clone(),
                        None => match self.resolver.lookup_ip(target.as_str()).await {
                            Ok(ips) => match ips.iter().next() {
                                Some(ip) => ip.to_string(),
                                None => continue,
                            },
                            Err(e) => return Err(format!("address of SRV target {host}: {e}")),
                        },
                    };
                    let mut d = Discovered::plain(&ip, srv.port, MemberSource::Dns);
                    // The target name is the stable identity; the address may change.
                    d.id = format!("{host}:{}", srv.port);
                    d.metadata.insert("dns_name".into(), self.name.clone());
                    d.metadata.insert("dns_target".into(), host);
                    out.push(d);
                }
                Ok(out)
            }
        }
    }
}

impl Discovery for DnsDiscovery {
    fn name(&self) -> &'static str {
        "dns"
    }

    fn run(self: Box<Self>, sink: DiscoverySink) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let mut tick = tokio::time::interval(self.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tick.tick().await;
                let span = tracing::debug_span!("dns_resolve", name = %self.name);
                match self.resolve().instrument(span).await {
                    Ok(eps) => {
                        if failing {
                            tracing::info!(name = %self.name, endpoints = eps.len(), "DNS discovery resolves again");
                            failing = false;
                        }
                        sink.report(eps);
                    }
                    Err(e) => {
                        failing = true;
                        sink.error(&e);
                    }
                }
            }
        })
    }
}
