//! Discovery providers behind one trait: each runs as a task and reports the full set of
//! endpoints it currently sees; the registry turns that into membership changes.

pub mod dns;
pub mod kubernetes;

use futures_util::future::BoxFuture;
use peervault_proto::v1::MemberSource;

use crate::{
    error::PeerError,
    registry::{Discovered, Registry},
};

/// Where a provider reports to.
#[derive(Clone)]
pub struct DiscoverySink {
    registry: Registry,
    provider: &'static str,
}

impl DiscoverySink {
    /// A sink feeding `registry`, naming `provider` in metrics.
    pub fn new(registry: Registry, provider: &'static str) -> Self {
        DiscoverySink { registry, provider }
    }

    /// Reports the complete current set of endpoints.
    pub fn report(&self, endpoints: Vec<Discovered>) {
        self.registry.set_discovered(self.provider, endpoints);
    }

    /// Counts and logs a discovery error (the last reported set stays in force).
    pub fn error(&self, error: &dyn std::fmt::Display) {
        self.registry
            .metrics()
            .discovery_errors
            .with_label_values(&[self.provider])
            .inc();
        tracing::warn!(provider = self.provider, error = %error, "discovery error; keeping the last view");
    }
}

/// A source of blob endpoints.
pub trait Discovery: Send + 'static {
    /// Short name for metrics and logs (`static`, `dns`, `kubernetes`).
    fn name(&self) -> &'static str;
    /// Runs until dropped, reporting every change to `sink`.
    fn run(self: Box<Self>, sink: DiscoverySink) -> BoxFuture<'static, ()>;
}

/// A fixed list of `host:port`.
pub struct StaticDiscovery {
    endpoints: Vec<Discovered>,
}

impl StaticDiscovery {
    /// Parses `host:port` entries; an entry that does not parse is an error naming it.
    pub fn new(entries: &[String]) -> Result<Self, PeerError> {
        let mut endpoints = Vec::new();
        for e in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let (host, port) = split_host_port(e).map_err(|reason| {
                PeerError::Config(format!("invalid --peers entry '{e}': {reason} (expected HOST:PORT)"))
            })?;
            endpoints.push(Discovered::plain(&host, port, MemberSource::Static));
        }
        Ok(StaticDiscovery { endpoints })
    }
}

impl Discovery for StaticDiscovery {
    fn name(&self) -> &'static str {
        "static"
    }

    fn run(self: Box<Self>, sink: DiscoverySink) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            sink.report(self.endpoints);
        })
    }
}

/// Splits `host:port` (or `[v6]:port`) and checks both parts.
pub fn split_host_port(s: &str) -> Result<(String, u16), String> {
    let (host, port) = s.rsplit_once(':').ok_or("missing port")?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("port '{port}' is not a number from 1 to 65535"))?;
    if port == 0 {
        return Err("port 0 is not a usable port".into());
    }
    let host = if let Some(inner) = host.strip_prefix('[') {
        inner.strip_suffix(']').ok_or("unbalanced '['")?
    } else {
        host
    };
    check_host(host)?;
    Ok((host.to_string(), port))
}

/// Checks that `host` is an IP address or a DNS name.
pub fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("missing host".into());
    }
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.len() > 253 {
        return Err("host name longer than 253 characters".into());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("'{host}' is not a valid host name (empty or over-long label)"));
        }
        if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err(format!("'{host}' is not a valid host name or IP address"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_parsing() {
        assert_eq!(split_host_port("a.b:80").unwrap(), ("a.b".into(), 80));
        assert_eq!(split_host_port("[::1]:8082").unwrap(), ("::1".into(), 8082));
        assert_eq!(split_host_port("10.0.0.1:1").unwrap(), ("10.0.0.1".into(), 1));
        for bad in [
            "",
            "host",
            ":80",
            "h:0",
            "h:70000",
            "h:x",
            "bad host:1",
            "-a:1",
            "[::1:1",
            "a..b:1",
        ] {
            assert!(split_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn static_entries_are_checked() {
        assert_eq!(
            StaticDiscovery::new(&["a:1".into(), " ".into(), "b:2".into()])
                .unwrap()
                .endpoints
                .len(),
            2
        );
        let err = StaticDiscovery::new(&["a:1".into(), "nope".into()])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--peers") && err.contains("nope"), "{err}");
    }
}
